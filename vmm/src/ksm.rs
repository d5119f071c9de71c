//! The kernel's KSM (kernel same-page merging), as a baseline for densevm's own
//! merging: a guard over the `/sys/kernel/mm/ksm` knobs that restores every value it
//! changed, the KSM counters, and a per-page check of which pages of a range are
//! KSM pages.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the kernel exposes KSM.
pub const KSM_SYSFS: &str = "/sys/kernel/mm/ksm";

/// Lock file that serializes densevm processes changing the KSM knobs (two
/// overlapping save/set/restore windows would restore each other's settings).
pub const LOCK_FILE: &str = "densevm-ksm.lock";
/// How long [`KsmControl::open`] waits for another densevm process's KSM benchmark.
const LOCK_WAIT: Duration = Duration::from_secs(300);

/// `/proc/kpageflags` bit of a KSM page (`KPF_KSM`).
const KPF_KSM: u64 = 21;
/// `/proc/self/pagemap`: page present.
const PM_PRESENT: u64 = 1 << 63;
/// `/proc/self/pagemap`: page frame number bits.
const PM_PFN_MASK: u64 = (1 << 55) - 1;

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
                eprintln!("densevm: waiting for another densevm process to release {}", path.display());
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
            eprintln!("densevm: {e}");
        }
    }
}

/// For each of the `npages` 4 KiB pages at `addr` in this process: is it backed by
/// a KSM page now (from `/proc/self/pagemap` and `/proc/kpageflags`; needs root)?
/// Pages not present count as not merged.
pub fn ksm_page_flags(addr: u64, npages: u64) -> std::io::Result<Vec<bool>> {
    let pagemap = File::open("/proc/self/pagemap")?;
    let flags = File::open("/proc/kpageflags")?;
    let mut entries = vec![0u8; npages as usize * 8];
    pagemap.read_exact_at(&mut entries, addr / 4096 * 8)?;
    let mut merged = Vec::with_capacity(npages as usize);
    for chunk in entries.chunks_exact(8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let entry = u64::from_le_bytes(word);
        let pfn = entry & PM_PFN_MASK;
        let mut ksm = false;
        if entry & PM_PRESENT != 0 && pfn != 0 {
            flags.read_exact_at(&mut word, pfn * 8)?;
            ksm = (u64::from_le_bytes(word) >> KPF_KSM) & 1 == 1;
        }
        merged.push(ksm);
    }
    Ok(merged)
}

/// How many of the `npages` pages at `addr` are KSM pages (see [`ksm_page_flags`]).
pub fn ksm_pages_in(addr: u64, npages: u64) -> std::io::Result<u64> {
    Ok(ksm_page_flags(addr, npages)?.iter().filter(|m| **m).count() as u64)
}

/// Latency of host-thread writes to KSM-merged pages (the kernel's copy on write).
#[derive(Clone, Debug, serde::Serialize)]
pub struct MergedWriteTimes {
    /// Pages allocated, all with the same content.
    pub pages: u64,
    /// Pages KSM had merged when the writes started (only these are timed).
    pub pages_measured: u64,
    /// Median write latency.
    pub median_ns: f64,
    /// 99th percentile.
    pub p99_ns: f64,
    /// Mean.
    pub mean_ns: f64,
    /// Slowest write.
    pub max_ns: f64,
}

impl MergedWriteTimes {
    /// Statistics of per-page latencies `ns` (one per measured page) of `pages` pages.
    pub fn from_ns(pages: u64, mut ns: Vec<f64>) -> Self {
        ns.sort_by(f64::total_cmp);
        let n = ns.len();
        let at = |i: usize| ns.get(i).copied().unwrap_or(f64::NAN);
        MergedWriteTimes {
            pages,
            pages_measured: n as u64,
            median_ns: at(n / 2),
            p99_ns: at((n * 99).div_ceil(100).saturating_sub(1)),
            mean_ns: ns.iter().sum::<f64>() / n as f64,
            max_ns: at(n.saturating_sub(1)),
        }
    }
}

/// Private anonymous pages, unmapped on drop.
struct AnonPages {
    ptr: *mut u8,
    len: usize,
}

impl Drop for AnonPages {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping created in `time_writes_to_merged_pages`,
        // and no reference into it outlives this value.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Allocates `pages` anonymous pages of identical content, offers them to KSM,
/// runs ksmd (`run=1`, with the other knobs as the caller set them) until every
/// page is merged or `timeout` passes, stops ksmd (`run=0`; merged pages stay
/// merged, and the scanner no longer competes for CPU), then times one 8-byte
/// store into each merged page. `interrupted` is polled while waiting.
pub fn time_writes_to_merged_pages(
    ksm: &mut KsmControl,
    pages: usize,
    timeout: Duration,
    interrupted: &dyn Fn() -> bool,
) -> Result<MergedWriteTimes, Error> {
    let len = pages * 4096;
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(Error::Io("mmap", std::io::Error::last_os_error()));
    }
    let mem = AnonPages { ptr: ptr.cast(), len };
    // SAFETY: the mapping is len bytes, readable and writable, owned by `mem`, and
    // only accessed through this slice until the timed writes below.
    let words = unsafe { std::slice::from_raw_parts_mut(mem.ptr.cast::<u64>(), len / 8) };
    for (i, w) in words.iter_mut().enumerate() {
        *w = ((i % 512) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    }
    // SAFETY: madvise on the exact bounds of our mapping; it changes no content.
    if unsafe { libc::madvise(mem.ptr.cast(), len, libc::MADV_MERGEABLE) } != 0 {
        return Err(Error::Io("madvise(MADV_MERGEABLE)", std::io::Error::last_os_error()));
    }
    let addr = mem.ptr as u64;
    ksm.set("run", "1")?;
    let waited = ksm.wait_until("merge the host test pages", timeout, |_| {
        if interrupted() {
            return Err(Error::Interrupted);
        }
        Ok(ksm_pages_in(addr, pages as u64).map_err(|e| Error::Io("reading kpageflags", e))? >= pages as u64)
    });
    let stop = ksm.set("run", "0");
    let merged = ksm_page_flags(addr, pages as u64).map_err(|e| Error::Io("reading kpageflags", e))?;
    match waited {
        Err(e) if !merged.iter().any(|m| *m) => return Err(e),
        Err(Error::Interrupted) => return Err(Error::Interrupted),
        _ => stop?,
    }
    let mut ns = Vec::with_capacity(pages);
    for (i, _) in merged.iter().enumerate().filter(|(_, m)| **m) {
        let t0 = Instant::now();
        // SAFETY: page i lies inside our mapping; a volatile store so that it happens
        // here, between the two clock reads.
        unsafe { std::ptr::write_volatile(mem.ptr.add(i * 4096).cast::<u64>(), !(i as u64)) };
        ns.push(t0.elapsed().as_nanos() as f64);
    }
    Ok(MergedWriteTimes::from_ns(pages as u64, ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sysfs(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("densevm-ksm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (knob, value) in [
            ("run", "0\n"),
            ("pages_to_scan", "100\n"),
            ("sleep_millisecs", "20\n"),
            ("advisor_mode", "[none] scan-time\n"),
            ("pages_shared", "3\n"),
            ("pages_sharing", "7\n"),
            ("pages_unshared", "1\n"),
            ("pages_volatile", "0\n"),
            ("full_scans", "12\n"),
        ] {
            std::fs::write(dir.join(knob), value).unwrap();
        }
        dir
    }

    fn read(dir: &Path, knob: &str) -> String {
        std::fs::read_to_string(dir.join(knob)).unwrap()
    }

    #[test]
    fn selected_value_takes_the_bracketed_choice() {
        assert_eq!(selected_value("[none] scan-time\n"), "none");
        assert_eq!(selected_value("none [scan-time]"), "scan-time");
        assert_eq!(selected_value("100\n"), "100");
    }

    #[test]
    fn set_saves_the_first_original_and_restore_writes_it_back() {
        let dir = fake_sysfs("restore");
        let mut k = KsmControl::at(&dir).unwrap();
        k.set("run", "1").unwrap();
        k.set("pages_to_scan", "10000").unwrap();
        k.set("pages_to_scan", "5000").unwrap();
        k.set("advisor_mode", "none").unwrap();
        assert_eq!(k.get_u64("pages_to_scan").unwrap(), 5000);
        assert_eq!(k.get("run").unwrap(), "1");
        let saved: Vec<_> = k.saved().iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(saved, [("run", "0"), ("pages_to_scan", "100"), ("advisor_mode", "none")]);
        k.restore().unwrap();
        assert_eq!(read(&dir, "run"), "0");
        assert_eq!(read(&dir, "pages_to_scan"), "100");
        assert_eq!(read(&dir, "sleep_millisecs"), "20\n", "untouched knobs stay as they were");
        assert!(k.saved().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn drop_restores_and_restore_reports_failures() {
        let dir = fake_sysfs("drop");
        {
            let mut k = KsmControl::at(&dir).unwrap();
            k.set("sleep_millisecs", "0").unwrap();
            assert_eq!(read(&dir, "sleep_millisecs"), "0");
        }
        assert_eq!(read(&dir, "sleep_millisecs"), "20");

        let mut k = KsmControl::at(&dir).unwrap();
        assert!(matches!(k.set("no_such_knob", "1"), Err(Error::Read { .. })));
        k.set("run", "1").unwrap();
        k.set("pages_to_scan", "9").unwrap();
        // A knob that cannot be written back: the others are still restored.
        std::fs::remove_file(dir.join("run")).unwrap();
        std::fs::create_dir(dir.join("run")).unwrap();
        assert!(matches!(k.restore(), Err(Error::Restore(_))));
        assert_eq!(read(&dir, "pages_to_scan"), "100");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn counters_and_missing_dir() {
        let dir = fake_sysfs("counters");
        let k = KsmControl::at(&dir).unwrap();
        let c = k.counters().unwrap();
        assert_eq!((c.pages_shared, c.pages_sharing, c.full_scans), (3, 7, 12));
        assert!(k.has("advisor_mode") && !k.has("smart_scan"));
        std::fs::write(dir.join("full_scans"), "many\n").unwrap();
        assert!(matches!(k.counters(), Err(Error::Parse { .. })));
        assert!(matches!(KsmControl::at(dir.join("absent")), Err(Error::Missing(_))));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
