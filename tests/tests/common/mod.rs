//! Helpers of the API end-to-end tests: the real `densevm serve` daemon as a child
//! process, and the API client (`api_client`) with the assertions the tests make on its
//! responses.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a daemon may take to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);

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

/// Raw mode, for slow and oversized requests (not every test file uses it).
#[allow(unused_imports)]
pub use api_client::raw::{connect, read_response, request_bytes};
/// One HTTP response, as the shared API client parses it.
pub use api_client::Response;

/// What the tests assert on a response, beyond what the client offers.
pub trait ResponseExt {
    /// The body as JSON (panics with the body if it is not JSON).
    fn json(&self) -> Value;
    /// The `fault_message` of an error body (panics if there is none).
    fn fault(&self) -> String;
}

impl ResponseExt for Response {
    fn json(&self) -> Value {
        self.json_body().unwrap_or_else(|e| panic!("status {}: body is not JSON ({e}): {}", self.status, self.text()))
    }

    fn fault(&self) -> String {
        let v = self.json();
        v.get("fault_message")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("status {}: no fault_message in {v}", self.status))
            .to_string()
    }
}

/// One request over a new connection to `sock`.
pub fn request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Response {
    api_client::request(sock, method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
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

    /// Declares merge domain `name` with the default policy (`PUT /domains/{name}`),
    /// expecting 204: a VM may name only a declared domain.
    pub fn declare_domain(&self, name: &str) {
        let r = self.req("PUT", &format!("/domains/{name}"), Some("{}"));
        assert_eq!(r.status, 204, "PUT /domains/{name}: {}", r.text());
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
