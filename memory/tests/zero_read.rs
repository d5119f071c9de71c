//! Issue 11's must-show: a guest *read* of a page whose zero frame was dropped
//! (zeroed by the merger, or discarded) does not allocate host memory, and a
//! later write to it still faults, is recorded and is seen.
//!
//! Measured from the outside: the pool memfd's allocated bytes (fstat
//! `st_blocks`) and the process's proportional set size (`Pss` of
//! /proc/self/smaps_rollup: a frame mapped by many pages counts once). The
//! process RSS is printed too, not asserted: RSS counts every page-table entry
//! of a shared frame again, so a shared zero frame read through many pages
//! would inflate it without costing host memory.

mod common;

use std::time::{Duration, Instant};

use common::*;
use memory::merge::tunables::ChangeDetection;
use memory::{GuestMap, PageFlags, Tunables, HUGE_FRAME_SIZE, PAGE_SIZE};

const PAGES: u32 = 4096;
/// Pages the merger zeroes: `0..ZEROED`.
const ZEROED: u32 = 1024;
/// Pages the balloon discards: `DISCARDED..DISCARDED + ZEROED`.
const DISCARDED: u32 = 2048;

fn tunables() -> Tunables {
    Tunables {
        run: true,
        pages_to_scan: 10_000,
        sleep_ms: 0,
        max_page_sharing: 256,
        merge_zero_pages: true,
        change_detection: ChangeDetection::Checksum,
        hold_vcpus: false,
    }
}

/// A kB field of /proc/self/smaps_rollup or /proc/self/status, in bytes.
fn proc_kb(file: &str, field: &str) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn pss() -> u64 {
    proc_kb("/proc/self/smaps_rollup", "Pss")
}

fn rss() -> u64 {
    proc_kb("/proc/self/status", "VmRSS")
}

fn dropped_pages() -> impl Iterator<Item = u32> {
    (0..ZEROED).chain(DISCARDED..DISCARDED + ZEROED)
}

/// Reads every dropped page from another thread; returns the pages not all zero.
fn read_dropped(g: &GuestMap) -> Vec<u32> {
    let addrs: Vec<(u32, usize)> = dropped_pages().map(|p| (p, g.page_addr(p).unwrap())).collect();
    std::thread::spawn(move || {
        addrs
            .into_iter()
            // SAFETY: the test keeps the GuestMap alive across the join.
            .filter(|&(_, a)| !unsafe { page_is(a, 0) })
            .map(|(p, _)| p)
            .collect()
    })
    .join()
    .expect("reader thread")
}

#[test]
fn reading_dropped_zero_pages_allocates_no_host_memory() {
    let Some(mgr) = manager_or_skip("reading_dropped_zero_pages_allocates_no_host_memory", 64) else { return };
    let _w = Watchdog::new("reading_dropped_zero_pages_allocates_no_host_memory", 120);
    let g = mgr.create_guest(1, u64::from(PAGES) * PAGE_SIZE as u64).unwrap();
    let value = |p: u32| (1u64 << 62) | u64::from(p);
    // Every page written (so it holds host memory); the merger's candidates with zeros.
    for p in 0..PAGES {
        // SAFETY: the page belongs to the live guest map `g`; no other thread writes it.
        unsafe { fill_page(g.page_addr(p).unwrap(), if p < ZEROED { 0 } else { value(p) }) };
    }
    mgr.set_merge(1, true, 1).unwrap();
    mgr.merger().set_tunables(tunables()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while mgr.merger().stats().zero_pages < u64::from(ZEROED) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    mgr.merger().set_run(false);
    assert_eq!(mgr.merger().stats().zero_pages, u64::from(ZEROED));
    let report = mgr.discard_range(1, DISCARDED, ZEROED).unwrap();
    assert_eq!(report.pages, u64::from(ZEROED));
    for p in dropped_pages() {
        let flags = g.page_flags(p).unwrap();
        assert!(flags.contains(PageFlags::PROTECTED.with(PageFlags::ZERO)), "page {p}: {flags:?}");
    }
    // Their frames went back to the pool (issue 13: used frames fall).
    let used_before = mgr.stats().frames_used;
    assert_eq!(used_before, u64::from(PAGES - 2 * ZEROED), "{:#?}", mgr.stats());

    let (host0, pss0, rss0) = (mgr.stats().host_bytes, pss(), rss());
    let not_zero = read_dropped(&g);
    let (host1, pss1, rss1) = (mgr.stats().host_bytes, pss(), rss());
    // Twice, to be sure nothing is allocated lazily on a later read.
    let not_zero_again = read_dropped(&g);
    let (host2, pss2) = (mgr.stats().host_bytes, pss());
    print_line(&format!(
        "reading {} dropped pages: memfd {host0} -> {host1} -> {host2} B, Pss {pss0} -> {pss1} -> {pss2} B, \
         RSS {rss0} -> {rss1} B, frames used {used_before}",
        2 * ZEROED
    ));
    assert!(not_zero.is_empty() && not_zero_again.is_empty(), "dropped pages read non-zero: {not_zero:?}");
    // At most one 2 MiB block of zeros for the whole host (plus slack), never one page per page read.
    let bound = HUGE_FRAME_SIZE as u64 + 64 * PAGE_SIZE as u64;
    let dropped_bytes = u64::from(2 * ZEROED) * PAGE_SIZE as u64;
    assert!(bound < dropped_bytes / 2);
    assert!(host2.saturating_sub(host0) <= bound, "reads allocated memfd memory: {host0} -> {host2}");
    assert!(pss2.saturating_sub(pss0) <= bound, "reads grew the Pss: {pss0} -> {pss2}");

    // A later write still faults, is recorded and is seen; the rest stay zero.
    let faults_before = mgr.stats().counters.zero_page_faults;
    let _ = g.take_write_faulted().unwrap();
    let written: Vec<u32> = dropped_pages().step_by(7).collect();
    for &p in &written {
        fill_page_from_thread(g.page_addr(p).unwrap(), value(p));
    }
    let s = mgr.stats();
    assert_eq!(s.counters.zero_page_faults - faults_before, written.len() as u64, "{:?}", s.counters);
    assert_eq!(g.take_write_faulted().unwrap(), written);
    assert_eq!(s.frames_used, used_before + written.len() as u64, "each written page took a frame");
    for p in dropped_pages() {
        let want = if written.contains(&p) { value(p) } else { 0 };
        // SAFETY: the page belongs to the live guest map `g`.
        assert!(unsafe { page_is(g.page_addr(p).unwrap(), want) }, "page {p}");
        let flags = g.page_flags(p).unwrap();
        assert_eq!(written.contains(&p), !flags.contains(PageFlags::ZERO), "page {p}: {flags:?}");
    }
    for p in (ZEROED..DISCARDED).chain(DISCARDED + ZEROED..PAGES) {
        // SAFETY: as above.
        assert!(unsafe { page_is(g.page_addr(p).unwrap(), value(p)) }, "page {p}");
    }
}

fn print_line(s: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{s}");
}
