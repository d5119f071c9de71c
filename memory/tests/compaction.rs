//! Host-side proof of compaction: after live frames were scattered over many
//! 2 MiB frames by real frees (VM deletion, merging), one `compact()` packs
//! them into at most ideal + 2 frames, returns the emptied ones, keeps every
//! page's content and sharing, and costs no host memory.
//!
//! Why VM deletion and merging, not discard: a discarded page keeps its frame
//! (a punched hole, protected, read as zero), so discarding frees no frame and
//! leaves nothing for compaction to gather.

mod common;

use common::*;
use memory::{GuestMap, MemoryManager, VmId, PAGE_SIZE};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Value of every word of page `page` of VM `vm` in these tests.
fn word(vm: VmId, page: u32) -> u64 {
    (u64::from(vm) << 32) | u64::from(page) | 0x5A00_0000_0000_0000
}

/// Resident set of this process in bytes (/proc/self/statm).
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * PAGE_SIZE as u64
}

/// Creates `count` VMs of 1..=`max_pages` pages each (ids from `first`),
/// writes every page, then drops a random 60% of them: the survivors' frames
/// are scattered over the 2 MiB frames the VMs filled in creation order.
fn scatter(mgr: &std::sync::Arc<MemoryManager>, first: VmId, count: u32, max_pages: u64, seed: u64) -> Vec<GuestMap> {
    let mut rng = Rng(seed);
    let mut guests = Vec::new();
    for i in 0..count {
        let pages = 1 + rng.below(max_pages);
        let g = mgr.create_guest(first + i, pages * PAGE_SIZE as u64).unwrap();
        for p in 0..g.pages() {
            // SAFETY: a page of a live guest map, written before any sharing.
            unsafe { fill_page(g.page_addr(p).unwrap(), word(g.vm_id(), p)) };
        }
        guests.push(g);
    }
    let mut survivors = Vec::new();
    for g in guests {
        if rng.below(100) >= 60 {
            survivors.push(g);
        }
    }
    survivors
}

fn check_contents(guests: &[GuestMap]) {
    for g in guests {
        for p in 0..g.pages() {
            // SAFETY: a page of a live guest map.
            assert!(unsafe { page_is(g.page_addr(p).unwrap(), word(g.vm_id(), p)) }, "vm {} page {p}", g.vm_id());
        }
    }
}

#[test]
fn compact_packs_a_scattered_pool() {
    let Some(mgr) = manager_or_skip("compact_packs_a_scattered_pool", 256) else {
        return;
    };
    mgr.update_compaction(&memory::CompactionTunablesPatch { enabled: Some(false), ..Default::default() }).unwrap();
    let guests = scatter(&mgr, 1000, 3000, 32, 0x1234_5678);
    let before = mgr.stats();
    let (rss_before, host_before) = (rss(), before.host_bytes);
    let report = mgr.compact().unwrap();
    let after = mgr.stats();
    let (rss_after, host_after) = (rss(), after.host_bytes);
    eprintln!(
        "compaction: {report:?}; {:.0} pages/s; host bytes {host_before} -> {host_after}, rss {rss_before} -> {rss_after}",
        report.pages_migrated as f64 / (report.duration_ms / 1000.0)
    );
    let freeable = report.frames_2m_in_use_before - report.ideal_frames_2m;
    assert!(freeable > 10, "the scatter left nothing to compact: {report:?}");
    assert!(report.frames_2m_in_use_after <= report.ideal_frames_2m + 2, "{report:?}");
    assert!(report.frames_2m_returned * 100 >= freeable * 95, "{report:?}");
    assert_eq!(report.failures.total(), 0);
    assert_eq!(after.huge_frames_in_use, report.frames_2m_in_use_after);
    assert_eq!(after.huge_frames_returned - before.huge_frames_returned, report.frames_2m_returned);
    // Every freed frame was punched when freed, so the memory the 2 MiB frames
    // still hold is the live frames': compaction moves it, it must not grow.
    assert!(host_after <= host_before + (2 << 20), "host bytes grew: {host_before} -> {host_after}");
    assert!(host_after <= after.frames_live * PAGE_SIZE as u64 + (2 << 20));
    assert!(rss_after <= rss_before + (4 << 20), "rss grew: {rss_before} -> {rss_after}");
    let stats = mgr.compaction_stats();
    assert_eq!((stats.passes, stats.proactive_passes), (1, 0));
    assert_eq!(stats.pages_migrated, report.pages_migrated);
    assert_eq!(stats.frames_2m_returned, report.frames_2m_returned);
    check_contents(&guests);
    // A second pass finds nothing more to do.
    let again = mgr.compact().unwrap();
    assert!(again.frames_2m_in_use_after <= again.frames_2m_in_use_before, "{again:?}");
    drop(guests);
    assert_eq!(mgr.stats().huge_frames_in_use, 0);
}
