//! The merger's back-off on idle memory (memory::merge::backoff): once clones
//! have converged, the scanner thread must cost little CPU compared with a
//! second of the same scanner with the back-off forbidden, and a
//! write made while it is backed off must still be noticed and merged or
//! unmerged within a bounded number of polls — with a dirty log (idle mode:
//! the scanner polls the logs and visits only written pages) and with
//! checksums (smart scan plus longer sleeps, at most 1 s).
//!
//! CPU time is the scanner thread's, from /proc/self/task/<tid>/schedstat
//! (nanoseconds) or, without schedstats, /proc/self/task/<tid>/stat (ticks).
//! Only a generous ratio is asserted, never an absolute time.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use memory::merge::tunables::ChangeDetection;
use memory::{GuestMap, MemoryManager, Tunables, VmId};

const VMS: u32 = 4;
const PAGES: u32 = 1024;
/// Pages `0..CLONE` hold the same content in every VM; the rest are unique.
const CLONE: u32 = 896;

fn clone_value(p: u32) -> u64 {
    0xC10E_0000_0000 + u64::from(p)
}

fn unique_value(vm: VmId, p: u32) -> u64 {
    (u64::from(vm) << 48) | 0x0001_0000_0000 | u64::from(p)
}

fn fill(g: &GuestMap, page: u32, value: u64) {
    // SAFETY: the page belongs to the live guest map `g`.
    unsafe { fill_page(g.page_addr(page).unwrap(), value) }
}

fn holds(g: &GuestMap, page: u32, value: u64) -> bool {
    // SAFETY: as above.
    unsafe { page_is(g.page_addr(page).unwrap(), value) }
}

/// CPU seconds the scanner thread used during `secs` of wall time.
fn scanner_cpu_over(mgr: &MemoryManager, secs: f64) -> f64 {
    let tid = mgr.merger().scanner_tid();
    let c0 = thread_cpu_s(tid);
    std::thread::sleep(Duration::from_secs_f64(secs));
    thread_cpu_s(tid) - c0
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "{what} not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

struct Setup {
    mgr: Arc<MemoryManager>,
    guests: Vec<GuestMap>,
    logs: Vec<Arc<SharedLog>>,
}

/// `VMS` guests of clone + unique pages, merging in one domain at full speed.
fn setup(name: &str, mode: ChangeDetection) -> Option<Setup> {
    let mgr = manager_or_skip(name, 64)?;
    let mut guests = Vec::new();
    let mut logs = Vec::new();
    for vm in 1..=VMS {
        let g = mgr.create_guest(vm, u64::from(PAGES) * 4096).unwrap();
        for p in 0..PAGES {
            fill(&g, p, if p < CLONE { clone_value(p) } else { unique_value(vm, p) });
        }
        let log = Arc::new(SharedLog::default());
        if mode == ChangeDetection::DirtyLog {
            mgr.set_dirty_log(vm, Box::new(LogHandle(log.clone()))).unwrap();
        }
        mgr.set_merge(vm, true, 1).unwrap();
        guests.push(g);
        logs.push(log);
    }
    let t = Tunables { pages_to_scan: 10_000, change_detection: mode, ..Tunables::full_speed() };
    mgr.merger().set_tunables(t).unwrap();
    let expected = u64::from(CLONE * (VMS - 1));
    wait_for("convergence", Duration::from_secs(30), || mgr.merger().stats().pages_sharing == expected);
    Some(Setup { mgr, guests, logs })
}

/// CPU of the scanner during `secs` with the back-off forbidden (it then
/// rescans the converged memory without pause, as before the back-off).
fn busy_cpu(s: &Setup, secs: f64) -> f64 {
    s.mgr.merger().set_backoff(false);
    let cpu = scanner_cpu_over(&s.mgr, secs);
    s.mgr.merger().set_backoff(true);
    cpu
}

#[test]
fn dirty_log_idle_backoff_is_cheap_and_still_sees_writes() {
    let name = "dirty_log_idle_backoff_is_cheap_and_still_sees_writes";
    let Some(s) = setup(name, ChangeDetection::DirtyLog) else { return };
    let _w = Watchdog::new("dirty_log_idle_backoff", 180);
    let (mgr, g) = (&s.mgr, &s.guests);
    wait_for("idle mode", Duration::from_secs(10), || mgr.merger().stats().idle);
    let idle = scanner_cpu_over(mgr, 1.0);
    let busy = busy_cpu(&s, 1.0);
    eprintln!("{name}: scanner CPU over 1 s: idle {:.4} s, busy {:.4} s", idle, busy);
    assert!(busy > 0.02, "the busy second did not keep the scanner busy ({busy} s)");
    assert!(idle * 5.0 < busy, "idle {idle} s vs busy {busy} s: no back-off");

    // Back to idle; then the same new content in a unique page of VMs 1 and 2,
    // written without a fault (private pages), reported only by the dirty logs.
    wait_for("idle mode again", Duration::from_secs(10), || mgr.merger().stats().idle);
    let before = mgr.merger().stats();
    let p = CLONE + 5;
    for (gm, log) in g.iter().zip(&s.logs).take(2) {
        fill(gm, p, 0xFEED_0000_0001);
        log.mark(p);
    }
    let took = wait_for("merge of a page written while idle", Duration::from_secs(5), || {
        mgr.merger().stats().pages_sharing == before.pages_sharing + 1
    });
    let after = mgr.merger().stats();
    assert_eq!(g[0].frame_of(p).unwrap(), g[1].frame_of(p).unwrap());
    assert!(after.idle, "an ordinary write must not end the idle mode: {after:#?}");
    let polls = after.idle_polls - before.idle_polls;
    assert!(polls <= 10, "merged only after {polls} polls ({took:?})");
    assert_eq!(after.merges, before.merges + 1, "before: {before:#?}\nafter: {after:#?}");
    eprintln!("{name}: page written while idle merged after {polls} polls ({took:?})");

    // A write to a merged (clone) page in VMs 3 and 4: copied on write at once,
    // then the two new copies merge with each other.
    let before = mgr.merger().stats();
    let q = 17;
    for (gm, log) in g.iter().zip(&s.logs).skip(2) {
        fill_page_from_thread(gm.page_addr(q).unwrap(), 0xBEEF_0000_0002);
        log.mark(q);
    }
    assert_eq!(mgr.merger().stats().pages_sharing, before.pages_sharing - 2);
    let took = wait_for("re-merge after copy on write", Duration::from_secs(5), || {
        mgr.merger().stats().pages_sharing == before.pages_sharing - 1
    });
    assert_eq!(g[2].frame_of(q).unwrap(), g[3].frame_of(q).unwrap());
    assert_ne!(g[0].frame_of(q).unwrap(), g[2].frame_of(q).unwrap());
    eprintln!("{name}: copied-on-write pages merged again after {took:?}");
    wait_for("idle mode after the writes", Duration::from_secs(10), || mgr.merger().stats().idle);
    for (i, gm) in g.iter().enumerate() {
        let vm = i as u32 + 1;
        assert!(holds(gm, q, if i >= 2 { 0xBEEF_0000_0002 } else { clone_value(q) }));
        assert!(holds(gm, p, if i < 2 { 0xFEED_0000_0001 } else { unique_value(vm, p) }));
        assert!(holds(gm, 3, clone_value(3)));
    }
}

#[test]
fn checksum_backoff_skips_and_sleeps_but_still_sees_writes() {
    let name = "checksum_backoff_skips_and_sleeps_but_still_sees_writes";
    let Some(s) = setup(name, ChangeDetection::Checksum) else { return };
    let _w = Watchdog::new("checksum_backoff", 180);
    let (mgr, g) = (&s.mgr, &s.guests);
    // Let the quiet scans grow the sleep to its bound.
    std::thread::sleep(Duration::from_secs(2));
    let idle = scanner_cpu_over(mgr, 1.0);
    let busy = busy_cpu(&s, 1.0);
    let st = mgr.merger().stats();
    eprintln!("{name}: scanner CPU over 1 s: idle {idle:.4} s, busy {busy:.4} s; pages_skipped {}", st.pages_skipped);
    assert!(!st.idle, "no idle mode without dirty logs");
    assert!(busy > 0.02, "the busy second did not keep the scanner busy ({busy} s)");
    assert!(idle * 5.0 < busy, "idle {idle} s vs busy {busy} s: no back-off");
    assert!(st.pages_skipped > 0, "smart scan skipped nothing: {st:#?}");

    // Let it back off again, then write the same content into two unique pages.
    std::thread::sleep(Duration::from_secs(2));
    let before = mgr.merger().stats();
    let p = CLONE + 9;
    for gm in &g[1..3] {
        fill(gm, p, 0xFEED_0000_0003);
    }
    // Checksums need two visits (changed, then stable), each after a sleep <= 1 s.
    // A page unchanged for many scans is skipped by the smart scan for up to 8
    // scans: with 1 s sleeps, up to ~10 s.
    let took = wait_for("merge of a page written during the back-off", Duration::from_secs(20), || {
        mgr.merger().stats().pages_sharing == before.pages_sharing + 1
    });
    assert_eq!(g[1].frame_of(p).unwrap(), g[2].frame_of(p).unwrap());
    assert!(holds(&g[1], p, 0xFEED_0000_0003) && holds(&g[0], p, unique_value(1, p)));
    eprintln!("{name}: page written during the back-off merged after {took:?}");
}

/// Smart scan must not keep two identical pages apart: the unstable index is
/// rebuilt every full scan, so two unshared pages that age out of step (each
/// skipped for up to 8 scans, at different scans) would never be visited in
/// the same scan and never merge. Pages of VM 1 are written one full scan
/// apart (so their ages differ), left to age, then VM 2 writes the same
/// content: every pair must merge.
#[test]
fn checksum_smart_scan_pairs_pages_that_aged_out_of_step() {
    let name = "checksum_smart_scan_pairs_pages_that_aged_out_of_step";
    let Some(mgr) = manager_or_skip(name, 64) else { return };
    let _w = Watchdog::new("smart_scan_pairs", 180);
    const N: u32 = 16;
    let value = |p: u32| 0x5EED_0000_0000 + u64::from(p);
    let g: Vec<GuestMap> = (1..=2).map(|vm| mgr.create_guest(vm, 64 * 4096).unwrap()).collect();
    for vm in 1..=2 {
        mgr.set_merge(vm, true, 1).unwrap();
    }
    let t = Tunables { pages_to_scan: 10_000, change_detection: ChangeDetection::Checksum, ..Tunables::full_speed() };
    mgr.merger().set_tunables(t).unwrap();
    let scans = || mgr.merger().stats().full_scans;
    for p in 0..N {
        fill(&g[0], p, value(p));
        assert!(mgr.merger().wait_full_scans(scans() + 1, Duration::from_secs(10)), "no full scan");
    }
    // Age them well into the longest skips (ages > 8: visited every 9th scan).
    assert!(mgr.merger().wait_full_scans(scans() + 14, Duration::from_secs(60)), "no full scans");
    assert!(mgr.merger().stats().pages_skipped > 0, "smart scan skipped nothing");
    for p in 0..N {
        fill(&g[1], p, value(p));
    }
    let took =
        wait_for("every pair to merge", Duration::from_secs(40), || mgr.merger().stats().pages_sharing == u64::from(N));
    for p in 0..N {
        assert_eq!(g[0].frame_of(p).unwrap(), g[1].frame_of(p).unwrap(), "page {p}");
        assert!(holds(&g[0], p, value(p)) && holds(&g[1], p, value(p)), "page {p}");
    }
    eprintln!("{name}: {N} pairs merged {took:?} after the second VM wrote them");
}
