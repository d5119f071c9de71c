//! Balloon inflate: densevm's batched discard of 1 GiB of touched guest pages
//! (`MemoryManager::discard_range`, the path the balloon's inflate and free
//! page reporting take) against the kernel's own floor, in one run.
//!
//! Contenders, interleaved (the order rotates every repetition), each on
//! `DENSEVM_BENCH_MIB` MiB (default 1024) of pages written just before:
//! - `densevm`: a guest map of the memory manager, every page written, then
//!   one `discard_range` of all of it;
//! - `memfd_punch`: a `MAP_SHARED` mapping of a memfd, every page written,
//!   then one `fallocate(PUNCH_HOLE)` of all of it (unmaps and frees: the
//!   least any memfd-backed VMM can do to return the memory);
//! - `anon_dontneed`: private anonymous memory (4 KiB pages), every page
//!   written, then one `madvise(MADV_DONTNEED)` (what an anonymous-RAM VMM
//!   such as Firecracker does for an inflated range);
//! - `densevm_1mib`: as `densevm`, but one `discard_range` per 256 pages, as
//!   the balloon device receives them from Linux's driver (256 PFNs per
//!   descriptor, `VIRTIO_BALLOON_ARRAY_PFNS_MAX`) when the guest's free
//!   memory is contiguous;
//! - `densevm_scattered` and `memfd_punch_scattered`: the pages in a random
//!   order, 256 per batch, each batch sorted and coalesced into runs as the
//!   device does, one `discard_range` (resp. one `fallocate(PUNCH_HOLE)`) per
//!   run: a guest whose free pages are scattered (nearly every run is one
//!   page).
//!
//! Per contender: host (wall) time and the calling thread's CPU time of the
//! discard itself, min / median / max over `DENSEVM_BENCH_REPS` (default 5)
//! repetitions after one warm-up, pages/s at the median, and the memfd's
//! allocated bytes (`fstat` blocks; densevm: its pool's memfd) and the
//! process's RSS before and after each discard, so that the memory is seen to
//! go back. JSON goes to `$CARGO_TARGET_DIR/balloon_inflate.json` (default:
//! the workspace's `target/`). `DENSEVM_BENCH_ONLY=NAME` runs one contender
//! alone (for profiling).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use memory::{ManagerConfig, MemoryManager, PAGE_SIZE};
use serde::Serialize;

/// One discard measured.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sample {
    wall_s: f64,
    cpu_s: f64,
    /// The memfd's allocated bytes (0 for anonymous memory).
    alloc_before: u64,
    alloc_after: u64,
    /// The process's RSS (VmRSS).
    rss_before: u64,
    rss_after: u64,
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec the call writes.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// VmRSS of this process in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Bytes of host memory the file behind `fd` holds.
fn allocated(fd: i32) -> u64 {
    // SAFETY: an all-zero `stat` is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer; `fd` is open.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return 0;
    }
    st.st_blocks as u64 * 512
}

/// Writes one word into every page of `pages` pages at `base`.
fn touch(base: usize, pages: usize, seed: u64) {
    for p in 0..pages {
        // SAFETY: `base` is a writable mapping of `pages` pages owned by the caller.
        unsafe { std::ptr::write_volatile((base + p * PAGE_SIZE) as *mut u64, seed ^ p as u64 | 1) };
    }
}

/// Times `f` (host and thread CPU time).
fn timed(f: impl FnOnce()) -> (f64, f64) {
    let (c0, t0) = (thread_cpu_s(), Instant::now());
    f();
    (t0.elapsed().as_secs_f64(), thread_cpu_s() - c0)
}

/// Pages per balloon descriptor from Linux's driver (`VIRTIO_BALLOON_ARRAY_PFNS_MAX`).
const DRIVER_BATCH: usize = 256;

/// How the pages are handed to the discard.
#[derive(Clone, Copy)]
enum Order {
    /// One call for all of them.
    Whole,
    /// Ascending, [`DRIVER_BATCH`] pages per call.
    Batches,
    /// Shuffled, [`DRIVER_BATCH`] per batch, each batch sorted and coalesced into runs.
    Scattered,
}

/// The runs `(first, count)` of `pages` pages, in the order `order` gives them.
fn runs(pages: usize, order: Order, seed: u64) -> Vec<(u32, u32)> {
    match order {
        Order::Whole => vec![(0, pages as u32)],
        Order::Batches => {
            (0..pages).step_by(DRIVER_BATCH).map(|p| (p as u32, DRIVER_BATCH.min(pages - p) as u32)).collect()
        }
        Order::Scattered => {
            // Fisher-Yates with xorshift64: a fixed permutation per seed.
            let mut all: Vec<u32> = (0..pages as u32).collect();
            let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            for i in (1..all.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                all.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut out = Vec::new();
            for batch in all.chunks_mut(DRIVER_BATCH) {
                batch.sort_unstable();
                for &p in batch.iter() {
                    match out.last_mut() {
                        Some((first, count)) if *first + *count == p => *count += 1,
                        _ => out.push((p, 1)),
                    }
                }
            }
            out
        }
    }
}

fn densevm(mgr: &std::sync::Arc<MemoryManager>, bytes: usize, seed: u64, order: Order) -> Sample {
    let guest = mgr.create_guest(1, bytes as u64).expect("guest");
    touch(guest.host_addr(), bytes / PAGE_SIZE, seed);
    let runs = runs(bytes / PAGE_SIZE, order, seed);
    let (alloc_before, rss_before) = (mgr.stats().host_bytes, rss());
    let (wall_s, cpu_s) = timed(|| {
        for &(first, count) in &runs {
            mgr.discard_range(1, first, count).expect("discard_range");
        }
    });
    let (alloc_after, rss_after) = (mgr.stats().host_bytes, rss());
    drop(guest);
    Sample { wall_s, cpu_s, alloc_before, alloc_after, rss_before, rss_after }
}

/// A fresh mapping of `bytes`: of a new memfd (`Some`) or anonymous.
fn map(bytes: usize, memfd: bool) -> (Option<OwnedFd>, usize) {
    let fd = memfd.then(|| {
        // SAFETY: the name is a valid C string; the returned fd is checked.
        let fd = unsafe { libc::memfd_create(c"balloon-bench".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on an fd we own.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), bytes as libc::off_t) }, 0);
        fd
    });
    let (flags, raw) = match &fd {
        Some(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
        None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
    };
    // SAFETY: a new mapping at an address of the kernel's choice.
    let addr = unsafe { libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, flags, raw, 0) };
    assert_ne!(addr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
    // 4 KiB pages, as densevm's pool (no THP): the same number of pages for all.
    // SAFETY: advice on the mapping just created.
    unsafe { libc::madvise(addr, bytes, libc::MADV_NOHUGEPAGE) };
    (fd, addr as usize)
}

fn kernel(bytes: usize, seed: u64, memfd: bool, order: Order) -> Sample {
    let (fd, addr) = map(bytes, memfd);
    touch(addr, bytes / PAGE_SIZE, seed);
    let runs = runs(bytes / PAGE_SIZE, order, seed);
    let raw = fd.as_ref().map_or(-1, |f| f.as_raw_fd());
    let alloc = || if raw >= 0 { allocated(raw) } else { 0 };
    let (alloc_before, rss_before) = (alloc(), rss());
    let (wall_s, cpu_s) = timed(|| {
        for &(first, count) in &runs {
            let (off, len) = (first as usize * PAGE_SIZE, count as usize * PAGE_SIZE);
            let rc = if memfd {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                // SAFETY: fallocate on the memfd this function owns.
                unsafe { libc::fallocate(raw, mode, off as libc::off_t, len as libc::off_t) }
            } else {
                // SAFETY: the range lies in the private anonymous mapping created above.
                unsafe { libc::madvise((addr + off) as *mut libc::c_void, len, libc::MADV_DONTNEED) }
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        }
    });
    let (alloc_after, rss_after) = (alloc(), rss());
    // SAFETY: unmapping the mapping created above, no longer used.
    unsafe { libc::munmap(addr as *mut libc::c_void, bytes) };
    Sample { wall_s, cpu_s, alloc_before, alloc_after, rss_before, rss_after }
}

/// min / median / max of `v`.
fn spread(mut v: Vec<f64>) -> [f64; 3] {
    v.sort_by(f64::total_cmp);
    [v[0], v[v.len() / 2], v[v.len() - 1]]
}

fn main() {
    let mib = env("DENSEVM_BENCH_MIB", 1024) as usize;
    let reps = env("DENSEVM_BENCH_REPS", 5).max(1) as usize;
    let bytes = mib << 20;
    let pages = bytes / PAGE_SIZE;
    let mut config = ManagerConfig::with_capacity(bytes as u64 + (4 << 20));
    config.raise_max_map_count = false;
    let mgr = match MemoryManager::new(config) {
        Ok(m) => m,
        Err(e) => {
            println!("SKIPPED balloon_inflate: no memory manager on this host: {e}");
            return;
        }
    };
    let names =
        ["densevm", "memfd_punch", "anon_dontneed", "densevm_1mib", "densevm_scattered", "memfd_punch_scattered"];
    // For profiling one contender alone.
    let only = std::env::var("DENSEVM_BENCH_ONLY").ok();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); names.len()];
    for rep in 0..=reps {
        for k in 0..names.len() {
            let which = (k + rep) % names.len();
            if only.as_deref().is_some_and(|o| o != names[which]) {
                continue;
            }
            let seed = rep as u64 * 7 + which as u64;
            let s = match which {
                0 => densevm(&mgr, bytes, seed, Order::Whole),
                1 => kernel(bytes, seed, true, Order::Whole),
                2 => kernel(bytes, seed, false, Order::Whole),
                3 => densevm(&mgr, bytes, seed, Order::Batches),
                4 => densevm(&mgr, bytes, seed, Order::Scattered),
                _ => kernel(bytes, seed, true, Order::Scattered),
            };
            if rep > 0 {
                samples[which].push(s);
            }
        }
    }
    println!(
        "balloon inflate of {mib} MiB ({pages} touched 4 KiB pages), {reps} interleaved repetitions after a warm-up"
    );
    println!(
        "{:<22} {:>28} {:>28} {:>12}  alloc/RSS before -> after (MiB, last rep)",
        "", "host ms min/med/max", "CPU ms min/med/max", "pages/s"
    );
    let mut results = serde_json::Map::new();
    let mut medians = std::collections::HashMap::new();
    for (name, s) in names.iter().zip(&samples) {
        if s.is_empty() {
            continue;
        }
        let wall = spread(s.iter().map(|x| x.wall_s).collect());
        let cpu = spread(s.iter().map(|x| x.cpu_s).collect());
        let last = s[s.len() - 1];
        let m = |b: u64| b as f64 / f64::from(1u32 << 20);
        println!(
            "{name:<22} {:>8.1} {:>8.1} {:>8.1}   {:>8.1} {:>8.1} {:>8.1}   {:>12.0}  alloc {:.0} -> {:.0}, RSS {:.0} -> {:.0}",
            wall[0] * 1e3,
            wall[1] * 1e3,
            wall[2] * 1e3,
            cpu[0] * 1e3,
            cpu[1] * 1e3,
            cpu[2] * 1e3,
            pages as f64 / wall[1],
            m(last.alloc_before),
            m(last.alloc_after),
            m(last.rss_before),
            m(last.rss_after),
        );
        medians.insert(*name, (wall[1], cpu[1]));
        results.insert(
            (*name).into(),
            serde_json::json!({
                "host_ms": wall.map(|v| v * 1e3), "cpu_ms": cpu.map(|v| v * 1e3),
                "pages_per_s_median": pages as f64 / wall[1], "samples": s,
            }),
        );
    }
    let pairs = [
        ("densevm", "memfd_punch"),
        ("densevm", "anon_dontneed"),
        ("densevm_1mib", "memfd_punch"),
        ("densevm_scattered", "memfd_punch_scattered"),
    ];
    for (a, b) in pairs {
        if let (Some(&(aw, ac)), Some(&(bw, bc))) = (medians.get(a), medians.get(b)) {
            println!("{a} / {b}: host time {:.2}x, CPU time {:.2}x (medians)", aw / bw, ac / bc);
        }
    }
    // Issue 13's target: 1 GiB returned in at most 100 ms of host time.
    for name in ["densevm", "densevm_1mib", "densevm_scattered"] {
        if let Some(&(w, _)) = medians.get(name) {
            let per_gib = w * 1e3 * 1024.0 / mib as f64;
            let verdict = if per_gib <= 100.0 { "met" } else { "not met" };
            println!("{name}: {per_gib:.1} ms per GiB of host time at the median (target <= 100 ms: {verdict})");
        }
    }
    let dir =
        std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").into());
    let path = std::path::Path::new(&dir).join("balloon_inflate.json");
    let json = serde_json::json!({ "mib": mib, "pages": pages, "repetitions": reps, "results": results });
    match std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap_or_default()) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => println!("writing {}: {e}", path.display()),
    }
}
