//! Measurement of one compaction pass's cost (run by hand:
//! `cargo test --release -p memory --test compaction_cost -- --ignored --nocapture`).
//!
//! The pool of `densevm bench compact` without KVM: `VMS` clone guests of
//! `PAGES` pages each, a hash-random share of their pages holding the clone
//! image and merged across the VMs so that 60% of all data frames are freed
//! (the frames left are private runs and shared frames with one mapper per VM),
//! then one `compact()` timed: wall time, CPU time of the pass's thread, pages
//! per second of each. Optional reader threads (`DENSEVM_COMPACT_READERS`, one
//! per VM) read every page of their VM in a loop, standing in for the guests'
//! verification; `DENSEVM_COMPACT_REPS` repetitions (default 5).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::*;
use memory::{GuestMap, MemoryManager, VmId, PAGE_SIZE};

const VMS: u32 = 8;
const PAGES: u32 = 8192;
/// Share of each VM's pages holding the clone image: merging frees
/// `SHARED * (VMS - 1) / VMS` = 60% of the data frames.
const SHARED: f64 = 0.6 * 8.0 / 7.0;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Whether page `p` holds the clone image (a hash of the page index).
fn is_shared(p: u32) -> bool {
    let mut h = u64::from(p).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 29;
    (h % 10_000) < (SHARED * 10_000.0) as u64
}

fn word(vm: VmId, p: u32) -> u64 {
    if is_shared(p) {
        0x5E00_0000_0000_0000 | u64::from(p)
    } else {
        0x7A00_0000_0000_0000 | (u64::from(vm) << 32) | u64::from(p)
    }
}

/// CPU seconds of the calling thread.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn clones(mgr: &Arc<MemoryManager>) -> Vec<GuestMap> {
    let guests: Vec<GuestMap> = (1..=VMS)
        .map(|vm| {
            let g = mgr.create_guest(vm, u64::from(PAGES) * PAGE_SIZE as u64).unwrap();
            mgr.set_merge(vm, false, 1).unwrap();
            for p in 0..PAGES {
                // SAFETY: a page of a live guest map, not shared yet.
                unsafe { fill_page(g.page_addr(p).unwrap(), word(vm, p)) };
            }
            g
        })
        .collect();
    for p in (0..PAGES).filter(|&p| is_shared(p)) {
        for vm in 2..=VMS {
            mgr.merge_pages((1, p), (vm, p)).unwrap();
        }
    }
    guests
}

#[test]
#[ignore]
fn measure_compaction_pass_cost() {
    let readers = env("DENSEVM_COMPACT_READERS", 0) != 0;
    let reps = env("DENSEVM_COMPACT_REPS", 5);
    let mut rows = Vec::new();
    for rep in 0..reps {
        if let Err(e) = memory::uffd::Uffd::probe() {
            skip("measure_compaction_pass_cost", &format!("userfaultfd write protection unavailable: {e}"));
            return;
        }
        // Scattered sharing needs more VMAs than the default vm.max_map_count (as `densevm` raises it).
        let mut config = memory::ManagerConfig::with_capacity(512 << 20);
        config.raise_max_map_count = true;
        let mgr = MemoryManager::new(config).unwrap();
        mgr.update_compaction(&memory::CompactionTunablesPatch { enabled: Some(false), ..Default::default() }).unwrap();
        let guests = clones(&mgr);
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = guests
            .iter()
            .filter(|_| readers)
            .map(|g| {
                let addrs: Vec<usize> = (0..g.pages()).map(|p| g.page_addr(p).unwrap()).collect();
                let (stop, reads, vm) = (stop.clone(), reads.clone(), g.vm_id());
                std::thread::spawn(move || {
                    let mut bad = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for (p, &a) in addrs.iter().enumerate() {
                            // SAFETY: a page of a live guest map (joined before the drop).
                            bad += u64::from(unsafe { read_word(a, 7) } != word(vm, p as u32));
                        }
                        reads.fetch_add(addrs.len() as u64, Ordering::Relaxed);
                    }
                    bad
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let (t0, c0, r0) = (Instant::now(), thread_cpu_s(), reads.load(Ordering::Relaxed));
        let report = mgr.compact().unwrap();
        let (wall, cpu, r1) = (t0.elapsed().as_secs_f64(), thread_cpu_s() - c0, reads.load(Ordering::Relaxed));
        stop.store(true, Ordering::Relaxed);
        let bad: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(bad, 0);
        assert_eq!(report.failures.total(), 0, "{report:?}");
        assert!(report.frames_2m_in_use_after <= report.ideal_frames_2m + 2, "{report:?}");
        for g in &guests {
            for p in 0..g.pages() {
                // SAFETY: a page of a live guest map.
                assert!(unsafe { page_is(g.page_addr(p).unwrap(), word(g.vm_id(), p)) });
            }
        }
        let n = report.pages_migrated as f64;
        eprintln!(
            "rep {rep}: {} pages, 2 MiB frames {} -> {} (ideal {}), wall {:.1} ms ({:.0} pages/s), cpu {:.1} ms ({:.0} \
             pages/cpu-s), reads during {:.0}/s",
            report.pages_migrated,
            report.frames_2m_in_use_before,
            report.frames_2m_in_use_after,
            report.ideal_frames_2m,
            wall * 1e3,
            n / wall,
            cpu * 1e3,
            n / cpu,
            (r1 - r0) as f64 / wall
        );
        eprintln!("  timing: {:?}", report.timing);
        rows.push((n / wall, n / cpu));
        drop(guests);
    }
    let stat = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        (v[0], v[v.len() / 2], v[v.len() - 1])
    };
    eprintln!("pages/s min/median/max {:.0?}", stat(rows.iter().map(|r| r.0).collect()));
    eprintln!("pages/cpu-s min/median/max {:.0?}", stat(rows.iter().map(|r| r.1).collect()));
}
