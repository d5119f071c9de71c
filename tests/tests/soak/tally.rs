//! The soak's books: every request it sends, counted by status (0: no answer),
//! and every answer it did not allow, kept for the report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use api_client::{Client, Response};

/// Most unexpected answers kept verbatim (all are counted).
const KEEP: usize = 40;

/// Request counts by status and the unexpected answers.
#[derive(Default)]
pub struct Tally {
    by_status: Mutex<BTreeMap<u16, u64>>,
    unexpected: Mutex<Vec<String>>,
    unexpected_count: AtomicU64,
}

impl Tally {
    /// Counts one answer (`None`: no answer) and checks its status against `allowed`.
    pub fn count(&self, what: &str, r: Option<&Response>, err: &str, allowed: &[u16]) {
        let status = r.map_or(0, |r| r.status);
        *self.by_status.lock().unwrap().entry(status).or_default() += 1;
        if !allowed.contains(&status) {
            let body = r.map_or(err, |r| r.text());
            self.fail(format!("{what} -> {status} (allowed {allowed:?}): {}", &body[..body.len().min(300)]));
        }
    }

    /// Records a finding that is not a status (a mismatch, a VM in the wrong state).
    pub fn fail(&self, msg: String) {
        self.unexpected_count.fetch_add(1, Ordering::Relaxed);
        let mut u = self.unexpected.lock().unwrap();
        if u.len() < KEEP {
            u.push(msg);
        }
    }

    /// Requests sent so far.
    pub fn requests(&self) -> u64 {
        self.by_status.lock().unwrap().values().sum()
    }

    /// Counts by status.
    pub fn by_status(&self) -> BTreeMap<u16, u64> {
        self.by_status.lock().unwrap().clone()
    }

    /// How many findings, and the first ones.
    pub fn findings(&self) -> (u64, Vec<String>) {
        (self.unexpected_count.load(Ordering::Relaxed), self.unexpected.lock().unwrap().clone())
    }
}

/// One API client of the soak: a keep-alive connection (reconnected when the
/// server closed it) or a new connection per request.
pub struct Caller<'a> {
    sock: PathBuf,
    tally: &'a Tally,
    keep_alive: bool,
    conn: Option<Client>,
}

impl<'a> Caller<'a> {
    /// A caller on `sock` counting into `tally`.
    pub fn new(sock: &Path, tally: &'a Tally, keep_alive: bool) -> Self {
        Caller { sock: sock.to_path_buf(), tally, keep_alive, conn: None }
    }

    fn send(&mut self, method: &str, path: &str, body: Option<&str>) -> Result<Response, String> {
        if !self.keep_alive {
            return api_client::request(&self.sock, method, path, body).map_err(|e| e.to_string());
        }
        // A kept connection the server closed (idle timeout) fails once: retry on a new one.
        for fresh in [false, true] {
            if fresh || self.conn.is_none() {
                self.conn = Some(Client::unix(&self.sock).map_err(|e| e.to_string())?);
            }
            let Some(c) = self.conn.as_mut() else { continue };
            match c.request(method, path, body) {
                Ok(r) => return Ok(r),
                Err(e) if fresh => return Err(e.to_string()),
                Err(_) => self.conn = None,
            }
        }
        Err("unreachable".into())
    }

    /// Sends one request and counts its answer; `None` when there was none.
    pub fn call(&mut self, method: &str, path: &str, body: Option<&str>, allowed: &[u16]) -> Option<Response> {
        let what = format!("{method} {path} {}", body.map(|b| &b[..b.len().min(160)]).unwrap_or(""));
        match self.send(method, path, body) {
            Ok(r) => {
                self.tally.count(&what, Some(&r), "", allowed);
                Some(r)
            }
            Err(e) => {
                self.tally.count(&what, None, &e, allowed);
                None
            }
        }
    }

    /// `GET path` expecting 200 and JSON.
    pub fn get(&mut self, path: &str) -> Option<serde_json::Value> {
        self.call("GET", path, None, &[200]).and_then(|r| r.json_body().ok())
    }
}

/// A small deterministic generator (xorshift64*), one per worker.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next value below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}
