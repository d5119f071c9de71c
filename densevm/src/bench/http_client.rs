//! A minimal HTTP/1.1 client over a Unix socket, for the benchmarks that drive
//! `densevm serve` (keep-alive, `Content-Length` bodies only: what the daemon
//! sends).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Socket I/O failed.
    #[error("http over unix socket: {0}")]
    Io(#[from] std::io::Error),
    /// The response was not understood.
    #[error("bad http response: {0}")]
    Protocol(String),
}

/// One keep-alive connection.
pub struct UnixHttp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl UnixHttp {
    /// Connects to the daemon's socket.
    pub fn connect(path: &Path) -> Result<Self, Error> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(UnixHttp { writer: stream.try_clone()?, reader: BufReader::new(stream) })
    }

    /// Sends a request and returns (status, body).
    pub fn request(&mut self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String), Error> {
        let body = body.unwrap_or("");
        write!(
            self.writer,
            "{method} {path} HTTP/1.1\r\nHost: densevm\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line)?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::Protocol(format!("status line {status_line:?}")))?;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(Error::Protocol("connection closed in headers".into()));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().map_err(|_| Error::Protocol(format!("length {value:?}")))?;
                }
            }
        }
        let mut buf = vec![0u8; length];
        self.reader.read_exact(&mut buf)?;
        Ok((status, String::from_utf8_lossy(&buf).into_owned()))
    }
}
