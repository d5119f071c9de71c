//! Raw mode: request bytes written by hand and answers parsed from whatever bytes came
//! back, for clients that misbehave on purpose (partial or byte-by-byte requests, idle
//! connections, bodies past the server's limit). Ordinary requests use
//! [`Client`](crate::Client).

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::{Response, DEFAULT_TIMEOUT};

/// Most header fields an answer may have.
const MAX_HEADERS: usize = 64;

/// Errors of raw mode.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the answer failed.
    #[error("reading the answer: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a complete HTTP response.
    #[error("bad HTTP response ({reason}): {raw:?}")]
    Malformed {
        /// What is wrong.
        reason: String,
        /// The bytes received, as text.
        raw: String,
    },
}

fn malformed(reason: impl Into<String>, raw: &[u8]) -> Error {
    Error::Malformed { reason: reason.into(), raw: String::from_utf8_lossy(raw).into_owned() }
}

/// Connects to the Unix socket with read and write timeouts of [`DEFAULT_TIMEOUT`].
pub fn connect(path: &Path) -> std::io::Result<UnixStream> {
    let s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
    s.set_write_timeout(Some(DEFAULT_TIMEOUT))?;
    Ok(s)
}

/// The bytes of a request with `Connection: close`; a body goes with
/// `Content-Type: application/json` and its `Content-Length`.
pub fn request_bytes(method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(b) = body {
        r.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    r.push_str("\r\n");
    r.push_str(body.unwrap_or(""));
    r.into_bytes()
}

/// Reads until the server closes the connection and parses the answer.
///
/// A reset after some bytes arrived still yields them: a server that answers before
/// reading a whole request body resets the connection when it closes it.
pub fn read_response(stream: &mut impl Read) -> Result<Response, Error> {
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset && !raw.is_empty() => {}
        Err(e) => return Err(e.into()),
    }
    parse_response(&raw)
}

/// Parses one complete response from `raw` (status line, headers and a body framed by
/// `Content-Length`, chunked encoding or the end of the bytes).
pub fn parse_response(raw: &[u8]) -> Result<Response, Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Response::new(&mut fields);
    let end = match head.parse(raw) {
        Ok(httparse::Status::Complete(end)) => end,
        Ok(httparse::Status::Partial) => return Err(malformed("incomplete head", raw)),
        Err(e) => return Err(malformed(e.to_string(), raw)),
    };
    let status = head.code.ok_or_else(|| malformed("no status", raw))?;
    let headers: Vec<(String, String)> = head
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).trim().to_owned()))
        .collect();
    let field = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    let rest = &raw[end..];
    let body = if field("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        dechunk(rest).ok_or_else(|| malformed("bad chunked body", raw))?
    } else if let Some(len) = field("content-length") {
        let len: usize = len.parse().map_err(|_| malformed(format!("Content-Length {len:?}"), raw))?;
        rest.get(..len).ok_or_else(|| malformed(format!("body shorter than {len} bytes"), raw))?.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let (start, size) = match httparse::parse_chunk_size(data) {
            Ok(httparse::Status::Complete(c)) => c,
            _ => return None,
        };
        data = &data[start..];
        if size == 0 {
            return Some(out);
        }
        let size = usize::try_from(size).ok()?;
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size..)?.strip_prefix(b"\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_and_chunked_bodies() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi").unwrap();
        assert_eq!((r.status, r.header("content-type"), r.text()), (200, Some("text/plain"), "hi"));
        let r =
            parse_response(b"HTTP/1.1 413 X\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
                .unwrap();
        assert_eq!((r.status, r.text()), (413, "abcde"));
        let r = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert_eq!((r.status, r.text()), (204, ""));
    }

    #[test]
    fn malformed_answers_are_errors() {
        for bad in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        ] {
            assert!(matches!(parse_response(bad), Err(Error::Malformed { .. })), "{bad:?}");
        }
    }

    #[test]
    fn request_bytes_frame_the_body() {
        assert_eq!(
            request_bytes("PUT", "/vms/a", Some("{}")),
            b"PUT /vms/a HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
              Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        );
        assert!(request_bytes("GET", "/", None).ends_with(b"Connection: close\r\n\r\n"));
    }
}
