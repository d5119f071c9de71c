//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod torture;

use std::sync::{Arc, Mutex};

use memory::uffd::Uffd;
use memory::{DirtyLog, ManagerConfig, MemoryManager, PAGE_SIZE};

/// A xorshift64 generator: reproducible pseudo-random choices.
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Prints `SKIPPED <test>: <why>` on the real stderr: not through `eprintln!`,
/// which the test harness captures (and hides) for passing tests.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "SKIPPED {test}: {why}");
    let _ = err.flush();
}

/// A manager with a pool of `mib` MiB, or `None` (with the reason printed) when
/// write-protect userfaultfd is not available here.
pub fn manager_or_skip(test: &str, mib: u64) -> Option<Arc<MemoryManager>> {
    if let Err(e) = Uffd::probe() {
        skip(test, &format!("userfaultfd write protection unavailable: {e}"));
        return None;
    }
    let mut config = ManagerConfig::with_capacity(mib << 20);
    config.raise_max_map_count = false;
    Some(MemoryManager::new(config).expect("memory manager"))
}

/// Fills a page through a raw pointer with `value` repeated.
///
/// # Safety
/// `addr` must be a writable guest page of a live GuestMap.
pub unsafe fn fill_page(addr: usize, value: u64) {
    let p = addr as *mut u64;
    for i in 0..PAGE_SIZE / 8 {
        // SAFETY: inside the page (caller's contract).
        unsafe { std::ptr::write_volatile(p.add(i), value) };
    }
}

/// Reads word `i` of the page at `addr`.
///
/// # Safety
/// `addr` must be a guest page of a live GuestMap.
pub unsafe fn read_word(addr: usize, i: usize) -> u64 {
    // SAFETY: inside the page (caller's contract).
    unsafe { std::ptr::read_volatile((addr as *const u64).add(i)) }
}

/// Whether the page at `addr` holds `value` in every word.
///
/// # Safety
/// `addr` must be a guest page of a live GuestMap.
pub unsafe fn page_is(addr: usize, value: u64) -> bool {
    // SAFETY: caller's contract.
    (0..PAGE_SIZE / 8).all(|i| unsafe { read_word(addr, i) } == value)
}

/// Aborts the process if dropped later than `secs` after creation (hang guard).
pub struct Watchdog(Arc<std::sync::atomic::AtomicBool>);

impl Watchdog {
    /// Starts a watchdog named `test`.
    pub fn new(test: &'static str, secs: u64) -> Self {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            while start.elapsed().as_secs() < secs {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            eprintln!("{test}: hung for {secs} s, aborting");
            std::process::abort();
        });
        Watchdog(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Number of mappings of this process inside `start..end` (from /proc/self/maps).
pub fn maps_in_range(start: usize, end: usize) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    maps.lines()
        .filter_map(|l| {
            let range = l.split_whitespace().next()?;
            let (a, b) = range.split_once('-')?;
            Some((usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?))
        })
        .filter(|&(a, b)| a < end && b > start)
        .count()
}

/// Writes `value` to every word of the page at `addr` from a new thread (so a
/// fault blocks that thread, not the test) and waits for it.
pub fn fill_page_from_thread(addr: usize, value: u64) {
    std::thread::spawn(move || {
        // SAFETY: the test keeps the GuestMap alive across the join.
        unsafe { fill_page(addr, value) }
    })
    .join()
    .expect("writer thread");
}

/// A dirty bitmap the tests set bits in (as KVM does for guest writes), shared
/// between writer threads and the merger through [`LogHandle`].
#[derive(Default)]
pub struct SharedLog(Mutex<Vec<u64>>);

impl SharedLog {
    /// Marks `page` written.
    pub fn mark(&self, page: u32) {
        let mut words = self.0.lock().unwrap();
        let w = (page / 64) as usize;
        if words.len() <= w {
            words.resize(w + 1, 0);
        }
        words[w] |= 1 << (page % 64);
    }
}

/// The merger's view of a [`SharedLog`]: each harvest takes the marks so far.
pub struct LogHandle(pub Arc<SharedLog>);

impl DirtyLog for LogHandle {
    fn take_dirty(&self, out: &mut Vec<u64>) -> Result<(), String> {
        out.extend(std::mem::take(&mut *self.0 .0.lock().unwrap()));
        Ok(())
    }
}

/// The physical frame number behind `addr` (touching the page first).
pub fn pfn(addr: usize) -> u64 {
    use std::os::unix::fs::FileExt;

    // SAFETY: `addr` is a readable guest page of a live map.
    let _ = unsafe { read_word(addr, 0) };
    let f = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, (addr / PAGE_SIZE * 8) as u64).unwrap();
    let e = u64::from_ne_bytes(b);
    assert!(e >> 63 == 1, "page at {addr:#x} not present");
    let pfn = e & ((1 << 55) - 1);
    assert_ne!(pfn, 0, "PFNs hidden (not root?)");
    pfn
}

/// CPU seconds of thread `tid` of this process, from
/// /proc/self/task/<tid>/schedstat (nanoseconds) or, without schedstats, its
/// stat (ticks).
pub fn thread_cpu_s(tid: i32) -> f64 {
    let base = format!("/proc/self/task/{tid}");
    if let Some(ns) = std::fs::read_to_string(format!("{base}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
    {
        return ns as f64 / 1e9;
    }
    let stat = std::fs::read_to_string(format!("{base}/stat")).expect("task stat");
    let rest = stat.rsplit_once(')').expect("stat format").1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// Writes `line` to stderr (shown with `--nocapture`; measurements print their rows).
pub fn print_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
