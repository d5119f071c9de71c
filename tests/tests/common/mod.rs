//! Helpers of the API end-to-end tests: the real `densevm serve` daemon as a child
//! process, and a small HTTP/1.1 client over its Unix socket.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a daemon may take to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Read/write timeout of one HTTP exchange.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

pub use e2e::{densevm_bin as densevm_binary, kvm_available};

/// A fresh, empty directory for one daemon's socket.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "densevm-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// One HTTP response.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header lines (name lower-cased, value trimmed).
    pub headers: Vec<(String, String)>,
    /// Body bytes (chunked encoding removed).
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON (panics with the body if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("status {}: body is not JSON ({e}): {}", self.status, self.text()))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The `fault_message` of an error body (panics if there is none).
    pub fn fault(&self) -> String {
        let v = self.json();
        v.get("fault_message")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("status {}: no fault_message in {v}", self.status))
            .to_string()
    }
}

/// Writes a request with `Connection: close` on `stream`.
pub fn write_request(stream: &mut impl Write, method: &str, path: &str, body: Option<&str>) -> std::io::Result<()> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    stream.write_all(req.as_bytes())
}

/// Reads a whole response (the server closes the connection after it).
pub fn read_response(stream: &mut impl Read) -> std::io::Result<Response> {
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // A server that answered before reading the whole request body resets the
        // connection when it closes it; the answer came before the reset.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    parse_response(&raw).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad response: {}", String::from_utf8_lossy(&raw)))
    })
}

fn parse_response(raw: &[u8]) -> Option<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    if headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked")) {
        body = dechunk(&body)?;
    }
    Some(Response { status, headers, body })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&data[..eol]).ok()?.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// Connects to the Unix socket with I/O timeouts set.
pub fn connect(sock: &Path) -> std::io::Result<UnixStream> {
    let s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// One request over a new connection to `sock`.
pub fn request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Response {
    let mut s = connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    // The server may answer (e.g. 413) and close before it read all of a large body:
    // a failed write still leaves its answer to read.
    let written = write_request(&mut s, method, path, body);
    read_response(&mut s).unwrap_or_else(|e| panic!("{method} {path}: {e} (write: {written:?})"))
}

/// A `densevm serve` child process; killed (if still running) on drop.
pub struct Daemon {
    child: Child,
    /// The API socket.
    pub sock: PathBuf,
    dir: PathBuf,
    /// Every line the daemon wrote to stderr so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts `densevm serve --api-sock <fresh dir>/api.sock <extra>` and waits for its socket.
    pub fn start(extra: &[&str]) -> Daemon {
        let dir = scratch_dir("api");
        let sock = dir.join("api.sock");
        let mut child = Command::new(densevm_binary())
            .arg("serve")
            .arg("--api-sock")
            .arg(&sock)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn densevm serve");
        // Drain stderr continuously: a full pipe would block the daemon's logging.
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut d = Daemon { child, sock, dir, log };
        let deadline = Instant::now() + START_TIMEOUT;
        while UnixStream::connect(&d.sock).is_err() {
            if let Some(status) = d.child.try_wait().expect("try_wait") {
                panic!("densevm serve exited with {status} before serving:\n{}", d.log_text());
            }
            assert!(Instant::now() < deadline, "densevm serve did not create its socket:\n{}", d.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// The daemon's stderr so far.
    pub fn log_text(&self) -> String {
        // Give the reader thread a moment to catch up.
        std::thread::sleep(Duration::from_millis(50));
        self.log.lock().unwrap().join("\n")
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One request.
    pub fn req(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        request(&self.sock, method, path, body)
    }

    /// `GET path`, expecting 200 and JSON.
    pub fn get(&self, path: &str) -> Value {
        let r = self.req("GET", path, None);
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        r.json()
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "densevm serve did not exit after SIGTERM:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes (then panics with `what`).
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
