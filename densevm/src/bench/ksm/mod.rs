//! The kernel's KSM (kernel same-page merging), as a baseline for densevm's own
//! merging: a guard over the `/sys/kernel/mm/ksm` knobs that restores every value it
//! changed, the KSM counters, and a per-page check of which pages of a range are
//! KSM pages.

mod pages;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use pages::{ksm_pages_in, time_writes_to_merged_pages, MergedWriteTimes};

/// Where the kernel exposes KSM.
pub const KSM_SYSFS: &str = "/sys/kernel/mm/ksm";

/// Lock file that serializes densevm processes changing the KSM knobs (two
/// overlapping save/set/restore windows would restore each other's settings).
pub const LOCK_FILE: &str = "densevm-ksm.lock";
/// How long [`KsmControl::open`] waits for another densevm process's KSM benchmark.
const LOCK_WAIT: Duration = Duration::from_secs(300);

/// Errors of the KSM interface.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel has no KSM (or sysfs is not mounted).
    #[error("{0} does not exist (kernel built without CONFIG_KSM, or sysfs not mounted)")]
    Missing(PathBuf),
    /// A knob could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A knob could not be written.
    #[error("writing {value:?} to {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The value.
        value: String,
        /// Why.
        source: std::io::Error,
    },
    /// A knob did not hold a number.
    #[error("{path} holds {value:?}, not a number")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Its content.
        value: String,
    },
    /// Some knobs could not be restored.
    #[error("restoring KSM settings failed: {0}")]
    Restore(String),
    /// KSM did not reach the awaited state in time.
    #[error("KSM did not {0} within {1:?}")]
    Timeout(&'static str, Duration),
    /// A system call or /proc read failed.
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    /// The caller asked to stop.
    #[error("interrupted")]
    Interrupted,
    /// Another process held the KSM lock for too long.
    #[error("another densevm process kept {0} locked for {1:?}")]
    Busy(PathBuf, Duration),
}

/// The KSM counters a benchmark reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KsmCounters {
    /// Shared KSM pages in use.
    pub pages_shared: u64,
    /// Further mappings of shared pages (the memory saved, in pages).
    pub pages_sharing: u64,
    /// Pages scanned but not merged.
    pub pages_unshared: u64,
    /// Pages changing too fast to merge.
    pub pages_volatile: u64,
    /// Completed scans of all mergeable memory.
    pub full_scans: u64,
}

/// The value a knob file selects: `[none] scan-time` selects `none`; a plain value
/// selects itself (trailing newline removed).
pub fn selected_value(content: &str) -> String {
    let t = content.trim();
    match (t.find('['), t.find(']')) {
        (Some(a), Some(b)) if a < b => t[a + 1..b].to_string(),
        _ => t.to_string(),
    }
}

/// Guard over the KSM sysfs knobs: [`KsmControl::set`] remembers each knob's
/// original value the first time it changes it, and [`KsmControl::restore`] (also
/// run on drop, e.g. when a benchmark fails half-way) writes them back in reverse
/// order.
#[derive(Debug)]
pub struct KsmControl {
    dir: PathBuf,
    saved: Vec<(String, String)>,
    // Dropped after `Drop::drop` restored the knobs.
    _lock: Option<File>,
}

impl KsmControl {
    /// Controls the kernel's KSM at [`KSM_SYSFS`], holding an exclusive lock on
    /// [`LOCK_FILE`] in the temp directory (waiting while another densevm process
    /// holds it) until dropped.
    pub fn open() -> Result<Self, Error> {
        let mut k = Self::at(KSM_SYSFS)?;
        let path = std::env::temp_dir().join(LOCK_FILE);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::Io("opening the KSM lock file", e))?;
        let (deadline, mut waited) = (Instant::now() + LOCK_WAIT, false);
        // SAFETY: flock on a descriptor we own; no memory is involved.
        while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(Error::Io("locking the KSM lock file", e));
            }
            if Instant::now() >= deadline {
                return Err(Error::Busy(path, LOCK_WAIT));
            }
            if !waited {
                tracing::info!("waiting for another densevm process to release {}", path.display());
                waited = true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        k._lock = Some(file);
        Ok(k)
    }

    /// Controls the KSM knobs in `dir` (a stand-in directory in tests).
    pub fn at(dir: impl AsRef<Path>) -> Result<Self, Error> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.join("run").exists() {
            return Err(Error::Missing(dir));
        }
        Ok(KsmControl { dir, saved: Vec::new(), _lock: None })
    }

    /// True when the knob exists (newer kernels have more of them).
    pub fn has(&self, knob: &str) -> bool {
        self.dir.join(knob).exists()
    }

    /// The value a knob selects (see [`selected_value`]).
    pub fn get(&self, knob: &str) -> Result<String, Error> {
        let path = self.dir.join(knob);
        std::fs::read_to_string(&path).map(|s| selected_value(&s)).map_err(|source| Error::Read { path, source })
    }

    /// A numeric knob or counter.
    pub fn get_u64(&self, knob: &str) -> Result<u64, Error> {
        let value = self.get(knob)?;
        value.parse().map_err(|_| Error::Parse { path: self.dir.join(knob), value })
    }

    fn write(&self, knob: &str, value: &str) -> Result<(), Error> {
        let path = self.dir.join(knob);
        std::fs::write(&path, value).map_err(|source| Error::Write { path, value: value.to_string(), source })
    }

    /// Sets a knob, saving its original value first (once per knob).
    pub fn set(&mut self, knob: &str, value: &str) -> Result<(), Error> {
        if !self.saved.iter().any(|(k, _)| k == knob) {
            let old = self.get(knob)?;
            self.saved.push((knob.to_string(), old));
        }
        self.write(knob, value)
    }

    /// Sets KSM up for the full-speed baseline (scanner stopped until the caller
    /// sets `run=1`; `pages_to_scan=10000`, `sleep_millisecs=0`, `advisor_mode=none`;
    /// `smart_scan` left as found). Everything is restored by the guard.
    pub fn full_speed(mut self) -> Result<Self, Error> {
        self.set("run", "0")?;
        self.set("pages_to_scan", "10000")?;
        self.set("sleep_millisecs", "0")?;
        if self.has("advisor_mode") && self.get("advisor_mode")? != "none" {
            self.set("advisor_mode", "none")?;
        }
        Ok(self)
    }

    /// The knobs changed so far, with their original values.
    #[cfg(test)]
    pub fn saved(&self) -> &[(String, String)] {
        &self.saved
    }

    /// Writes every saved value back (newest change first) and forgets them. Tries
    /// every knob even when one fails.
    pub fn restore(&mut self) -> Result<(), Error> {
        let mut failures = Vec::new();
        while let Some((knob, value)) = self.saved.pop() {
            if let Err(e) = self.write(&knob, &value) {
                failures.push(e.to_string());
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::Restore(failures.join("; ")))
        }
    }

    /// The current counters.
    pub fn counters(&self) -> Result<KsmCounters, Error> {
        Ok(KsmCounters {
            pages_shared: self.get_u64("pages_shared")?,
            pages_sharing: self.get_u64("pages_sharing")?,
            pages_unshared: self.get_u64("pages_unshared")?,
            pages_volatile: self.get_u64("pages_volatile")?,
            full_scans: self.get_u64("full_scans")?,
        })
    }

    /// Waits until `done()` holds, checking every 10 ms; `done` may fail (e.g. an
    /// interrupted benchmark), which ends the wait with that error.
    pub fn wait_until<E: From<Error>>(
        &self,
        what: &'static str,
        timeout: Duration,
        mut done: impl FnMut(&Self) -> Result<bool, E>,
    ) -> Result<(), E> {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(what, timeout).into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for KsmControl {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            tracing::error!("{e}");
        }
    }
}
