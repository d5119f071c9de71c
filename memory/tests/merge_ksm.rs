//! The merger against the semantics of the kernel's KSM selftests
//! (tools/testing/selftests/mm/ksm_tests.c: -M merge, -U unmerge, -Z zero
//! pages, max_page_sharing chaining), plus unmerge-all, discards, merge
//! domains checked by physical frame numbers (/proc/self/pagemap), run merging
//! and the dirty-log change detection.

mod common;

use std::time::Duration;

use common::*;
use memory::merge::tunables::ChangeDetection;
use memory::{GuestMap, MemoryManager, Tunables, PAGE_SIZE};

fn tunables(mps: u32, merge_zero: bool) -> Tunables {
    Tunables {
        run: true,
        pages_to_scan: 10_000,
        sleep_ms: 0,
        max_page_sharing: mps,
        merge_zero_pages: merge_zero,
        change_detection: ChangeDetection::Checksum,
        hold_vcpus: false,
    }
}

/// Waits for `n` more full scans.
fn scans(mgr: &MemoryManager, n: u64) {
    let base = mgr.merger().stats().full_scans;
    assert!(mgr.merger().wait_full_scans(base + n, Duration::from_secs(60)), "no progress in full scans");
}

fn fill(g: &GuestMap, page: u32, value: u64) {
    // SAFETY: the page belongs to the live guest map `g`.
    unsafe { fill_page(g.page_addr(page).unwrap(), value) }
}

fn holds(g: &GuestMap, page: u32, value: u64) -> bool {
    // SAFETY: as above.
    unsafe { page_is(g.page_addr(page).unwrap(), value) }
}

/// ksm_tests.c `assert_ksm_pages_count`: expected (pages_shared, pages_sharing).
fn expected_counts(dupl: u64, mps: u64) -> (u64, u64) {
    if dupl % mps <= 1 {
        let shared = dupl / mps;
        (shared, shared * (mps - 1))
    } else {
        let shared = dupl / mps + 1;
        (shared, dupl - shared)
    }
}

#[test]
fn merge_identical_pages_like_ksm_m() {
    let Some(mgr) = manager_or_skip("merge_identical_pages_like_ksm_m", 64) else { return };
    let _w = Watchdog::new("merge_identical_pages_like_ksm_m", 120);
    for (dupl, mps) in [(100u32, 256u32), (25, 10), (11, 10), (20, 10), (9, 2)] {
        let g = mgr.create_guest(1, 1 << 20).unwrap();
        for p in 0..dupl {
            fill(&g, p, 0x5A5A_0000_0000_0001);
        }
        mgr.set_merge(1, true, 1).unwrap();
        mgr.merger().set_tunables(tunables(mps, false)).unwrap();
        scans(&mgr, 3);
        mgr.merger().set_run(false);
        let s = mgr.merger().stats();
        let want = expected_counts(u64::from(dupl), u64::from(mps));
        assert_eq!((s.pages_shared, s.pages_sharing), want, "{dupl} pages, max_page_sharing {mps}: {s:#?}");
        if want.0 * mps as u64 + 1 == u64::from(dupl) || dupl % mps == 1 {
            assert!(s.pages_unshared >= 1, "the leftover page stays unshared");
        }
        for p in 0..dupl {
            assert!(holds(&g, p, 0x5A5A_0000_0000_0001));
        }
        drop(g);
        assert_eq!(mgr.stats().frames_used, 0);
    }
}

#[test]
fn written_merged_pages_unmerge_like_ksm_u() {
    let Some(mgr) = manager_or_skip("written_merged_pages_unmerge_like_ksm_u", 64) else { return };
    let _w = Watchdog::new("written_merged_pages_unmerge_like_ksm_u", 120);
    let g = mgr.create_guest(1, 1 << 20).unwrap();
    fill(&g, 0, 7);
    fill(&g, 1, 7);
    mgr.set_merge(1, true, 1).unwrap();
    mgr.merger().set_tunables(tunables(256, false)).unwrap();
    scans(&mgr, 3);
    let s = mgr.merger().stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, 1));
    // Write to both merged pages (from threads: the writes fault).
    fill_page_from_thread(g.page_addr(0).unwrap(), 8);
    fill_page_from_thread(g.page_addr(1).unwrap(), 9);
    scans(&mgr, 1);
    let s = mgr.merger().stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (0, 0), "{s:#?}");
    assert!(holds(&g, 0, 8) && holds(&g, 1, 9));
    let vs = mgr.vm_merge_stats(1).unwrap();
    // The second write reused the frame at its fault, or found it already
    // taken over by the background reuse: exactly one of the two.
    assert_eq!((vs.cow_copies, vs.cow_reuses + vs.cow_background_reuses, vs.merged_pages), (1, 1, 0), "{vs:#?}");
}

#[test]
fn zero_pages_like_ksm_z() {
    let Some(mgr) = manager_or_skip("zero_pages_like_ksm_z", 64) else { return };
    let _w = Watchdog::new("zero_pages_like_ksm_z", 120);
    const N: u32 = 40;
    for merge_zero in [true, false] {
        let a = mgr.create_guest(1, 1 << 20).unwrap();
        let b = mgr.create_guest(2, 1 << 20).unwrap();
        for p in 0..N {
            // Written (so backed) but zero.
            fill(&a, p, 0);
            fill(&b, p, 0);
        }
        mgr.set_merge(1, true, 1).unwrap();
        mgr.set_merge(2, true, 2).unwrap();
        mgr.merger().set_tunables(tunables(256, merge_zero)).unwrap();
        scans(&mgr, 3);
        mgr.merger().set_run(false);
        let s = mgr.merger().stats();
        if merge_zero {
            // Across domains too; nothing shared, memory dropped.
            assert_eq!((s.zero_pages, s.pages_shared, s.pages_sharing), (u64::from(2 * N), 0, 0), "{s:#?}");
            assert_eq!(mgr.stats().host_bytes, 0);
            assert_eq!(mgr.vm_merge_stats(2).unwrap().zero_pages, u64::from(N));
            assert!(s.general_profit > 0);
            // A write to a zeroed page is seen and makes it ordinary.
            fill_page_from_thread(a.page_addr(3).unwrap(), 0x77);
            assert!(holds(&a, 3, 0x77) && holds(&a, 4, 0));
            assert_eq!(mgr.merger().stats().zero_pages, u64::from(2 * N - 1));
        } else {
            // Like any content, inside each domain only.
            assert_eq!(s.zero_pages, 0);
            assert_eq!((s.pages_shared, s.pages_sharing), (2, u64::from(2 * (N - 1))), "{s:#?}");
        }
        drop((a, b));
    }
}

#[test]
fn unmerge_all_restores_private_frames() {
    let Some(mgr) = manager_or_skip("unmerge_all_restores_private_frames", 64) else { return };
    let _w = Watchdog::new("unmerge_all_restores_private_frames", 120);
    let a = mgr.create_guest(1, 1 << 20).unwrap();
    let b = mgr.create_guest(2, 1 << 20).unwrap();
    for p in 0..200 {
        fill(&a, p, u64::from(p % 10) + 1);
        fill(&b, p, u64::from(p % 10) + 1);
    }
    for p in 200..220 {
        fill(&a, p, 0);
    }
    mgr.set_merge(1, true, 5).unwrap();
    mgr.set_merge(2, true, 5).unwrap();
    mgr.merger().set_tunables(tunables(256, true)).unwrap();
    scans(&mgr, 3);
    let s = mgr.merger().stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.zero_pages), (10, 390, 20), "{s:#?}");
    let changed = mgr.merger().unmerge_all().unwrap();
    assert_eq!(changed, 400 + 20);
    assert!(!mgr.merger().tunables().run);
    let s = mgr.stats();
    assert_eq!((s.merge.pages_shared, s.merge.pages_sharing, s.merge.zero_pages), (0, 0, 0));
    assert_eq!(s.merge.unmerges, 420);
    for (g, vm) in [(&a, 1), (&b, 2)] {
        for p in 0..200 {
            assert!(holds(g, p, u64::from(p % 10) + 1), "vm {vm} page {p}");
            let frame = g.frame_of(p).unwrap();
            assert_eq!(mgr.frame_refs(frame), 1);
            assert!(!g.page_flags(p).unwrap().contains(memory::PageFlags::PROTECTED));
        }
    }
    for p in 200..220 {
        assert!(holds(&a, p, 0));
    }
    // Writes no longer fault.
    let faults = mgr.stats().uffd_faults;
    fill(&a, 5, 0xfeed);
    assert_eq!(mgr.stats().uffd_faults, faults);
    // Unmerged copies land in contiguous blocks: few VMAs.
    assert!(s.vma_count < 40, "vma_count {}", s.vma_count);
}

#[test]
fn discarded_pages_are_not_counted() {
    let Some(mgr) = manager_or_skip("discarded_pages_are_not_counted", 64) else { return };
    let _w = Watchdog::new("discarded_pages_are_not_counted", 120);
    let g = mgr.create_guest(1, 1 << 20).unwrap();
    for p in 0..30 {
        fill(&g, p, 0x42);
        fill(&g, 100 + p, 0);
    }
    for p in 0..10 {
        g.discard(p).unwrap();
        g.discard(100 + p).unwrap();
    }
    mgr.set_merge(1, true, 1).unwrap();
    mgr.merger().set_tunables(tunables(256, true)).unwrap();
    scans(&mgr, 3);
    let s = mgr.merger().stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.zero_pages), (1, 19, 20), "{s:#?}");
    // Discarding a merged page or a zeroed page takes it out of the counts.
    g.discard(15).unwrap();
    g.discard(115).unwrap();
    let s = mgr.merger().stats();
    assert_eq!((s.pages_sharing, s.zero_pages), (18, 19));
}

#[test]
fn domains_never_share_frames() {
    let Some(mgr) = manager_or_skip("domains_never_share_frames", 64) else { return };
    let _w = Watchdog::new("domains_never_share_frames", 120);
    const N: u32 = 64;
    let guests: Vec<GuestMap> = (1..=4).map(|vm| mgr.create_guest(vm, 1 << 20).unwrap()).collect();
    for g in &guests {
        for p in 0..N {
            fill(g, p, u64::from(p % 8) + 0x1000);
        }
    }
    // VMs 1 and 2: domain 10; VM 3: domain 20; VM 4: its own (4).
    for (vm, d) in [(1, 10), (2, 10), (3, 20), (4, 4)] {
        mgr.set_merge(vm, true, d).unwrap();
    }
    mgr.merger().set_tunables(tunables(1000, true)).unwrap();
    scans(&mgr, 3);
    mgr.merger().set_run(false);
    let s = mgr.merger().stats();
    assert_eq!(s.cross_domain_refusals, 0);
    // 8 contents per domain, 3 domains.
    assert_eq!((s.pages_shared, s.pages_sharing), (24, u64::from(4 * N) - 24), "{s:#?}");
    let pfns: Vec<Vec<u64>> = guests.iter().map(|g| (0..N).map(|p| pfn(g.page_addr(p).unwrap())).collect()).collect();
    for (i, a) in pfns.iter().enumerate() {
        for (j, b) in pfns.iter().enumerate() {
            let same_domain = i == j || (i < 2 && j < 2);
            let common = a.iter().filter(|x| b.contains(x)).count();
            if same_domain {
                assert!(common >= 8, "VMs {} and {} share no frame", i + 1, j + 1);
            } else {
                assert_eq!(common, 0, "VMs {} and {} (different domains) share a physical frame", i + 1, j + 1);
            }
        }
    }
    // Within a domain, equal content means the same physical frame.
    assert_eq!(pfns[0][3], pfns[1][11]);
    // The manager refuses cross-domain merges outright.
    let err = mgr.merge_pages((1, 0), (3, 0)).unwrap_err();
    assert!(matches!(err, memory::manager::Error::CrossDomain { .. }), "{err}");
    let frame = mgr.frame_of(1, 0).unwrap();
    assert!(mgr.share(4, 0, frame).is_err());
    // Moving VM 2 to another domain unmerges it first.
    mgr.set_merge(2, true, 30).unwrap();
    let b: Vec<u64> = (0..N).map(|p| pfn(guests[1].page_addr(p).unwrap())).collect();
    let a: Vec<u64> = (0..N).map(|p| pfn(guests[0].page_addr(p).unwrap())).collect();
    assert_eq!(a.iter().filter(|x| b.contains(x)).count(), 0);
    for p in 0..N {
        assert!(holds(&guests[1], p, u64::from(p % 8) + 0x1000));
    }
}

#[test]
fn clone_runs_merge_with_few_remaps() {
    let Some(mgr) = manager_or_skip("clone_runs_merge_with_few_remaps", 64) else { return };
    let _w = Watchdog::new("clone_runs_merge_with_few_remaps", 120);
    const PAGES: u32 = 1024;
    let guests: Vec<GuestMap> = (1..=3).map(|vm| mgr.create_guest(vm, 4 << 20).unwrap()).collect();
    for g in &guests {
        for p in 0..PAGES {
            fill(g, p, 0xC10E_0000 + u64::from(p));
        }
    }
    for vm in 1..=3 {
        mgr.set_merge(vm, true, 1).unwrap();
    }
    mgr.merger().set_tunables(tunables(256, false)).unwrap();
    scans(&mgr, 3);
    mgr.merger().set_run(false);
    let s = mgr.stats();
    assert_eq!((s.merge.pages_shared, s.merge.pages_sharing), (u64::from(PAGES), u64::from(2 * PAGES)));
    assert_eq!(s.merge.merges, u64::from(2 * PAGES));
    assert!(s.merge.merge_runs * 32 <= s.merge.merges, "runs {} for {} merges", s.merge.merge_runs, s.merge.merges);
    assert!(s.vma_count <= 12, "vma_count {}", s.vma_count);
    let end = guests[1].host_addr() + guests[1].size();
    assert!(maps_in_range(guests[1].host_addr(), end) <= 8);
    // Two guests' worth of frames were freed and their 2 MiB frames returned.
    assert!(s.huge_frames_returned >= 4, "{}", s.huge_frames_returned);
    for g in &guests {
        for p in (0..PAGES).step_by(97) {
            assert!(holds(g, p, 0xC10E_0000 + u64::from(p)));
        }
    }
}

#[test]
fn passive_compaction_keeps_fuller_huge_frame() {
    let Some(mgr) = manager_or_skip("passive_compaction_keeps_fuller_huge_frame", 64) else { return };
    let _w = Watchdog::new("passive_compaction_keeps_fuller_huge_frame", 120);
    // VM 1 (one page) sits alone in a 2 MiB frame; VM 2 fills a whole one.
    let a = mgr.create_guest(1, PAGE_SIZE as u64).unwrap();
    let b = mgr.create_guest(2, 2 << 20).unwrap();
    fill(&a, 0, 0xAB);
    fill(&b, 0, 0xAB);
    mgr.set_merge(1, true, 1).unwrap();
    mgr.set_merge(2, true, 1).unwrap();
    let fb = b.frame_of(0).unwrap();
    let returned = mgr.stats().huge_frames_returned;
    mgr.merger().set_tunables(tunables(256, false)).unwrap();
    scans(&mgr, 3);
    mgr.merger().set_run(false);
    // VM 1's page was indexed first (default: keep its frame), but VM 2's
    // frame is in the fuller 2 MiB frame: kept, and VM 1's 2 MiB frame emptied.
    assert_eq!(a.frame_of(0).unwrap(), fb);
    assert_eq!(mgr.merger().stats().merge_choice_flips, 1);
    assert_eq!(mgr.stats().huge_frames_returned, returned + 1);
    assert!(holds(&a, 0, 0xAB) && holds(&b, 0, 0xAB));
}

#[test]
fn dirty_log_skips_written_pages_and_merges_clean_ones_at_once() {
    /// Reports pages 0..8 dirty at every call (written all the time).
    struct TestLog;
    impl memory::DirtyLog for TestLog {
        fn take_dirty(&self, out: &mut Vec<u64>) -> Result<(), String> {
            out.push(0xff);
            Ok(())
        }
    }
    let Some(mgr) = manager_or_skip("dirty_log_skips_written_pages", 64) else { return };
    let _w = Watchdog::new("dirty_log_skips_written_pages", 120);
    let g = mgr.create_guest(1, 1 << 20).unwrap();
    for p in 0..64 {
        fill(&g, p, 0x99);
    }
    mgr.set_dirty_log(1, Box::new(TestLog)).unwrap();
    mgr.set_merge(1, true, 1).unwrap();
    let mut t = tunables(256, false);
    t.change_detection = ChangeDetection::DirtyLog;
    mgr.merger().set_tunables(t).unwrap();
    // Clean pages merge in the first full scan (no second checksum visit needed).
    scans(&mgr, 1);
    mgr.merger().set_run(false);
    let s = mgr.merger().stats();
    assert_eq!(s.vms_dirty_log, 1);
    assert_eq!((s.pages_shared, s.pages_sharing), (1, 55), "{s:#?}");
    let vs = mgr.vm_merge_stats(1).unwrap();
    assert!(vs.dirty_log);
    assert_eq!(vs.pages_volatile, 8, "{vs:#?}");
    // A device write marks the page changed for the merger as well.
    g.write_bytes(20 * PAGE_SIZE as u64, &[1, 2, 3]).unwrap();
    g.write_bytes(20 * PAGE_SIZE as u64, &[0x99, 0, 0]).unwrap();
    assert!(g.page_flags(20).unwrap().contains(memory::PageFlags::MERGE_DIRTY));
    assert_eq!(mgr.merger().stats().pages_sharing, 54);
    mgr.merger().set_run(true);
    scans(&mgr, 2);
    mgr.merger().set_run(false);
    assert!(!g.page_flags(20).unwrap().contains(memory::PageFlags::MERGE_DIRTY));
    assert_eq!(mgr.merger().stats().pages_sharing, 55);
    assert!(holds(&g, 20, 0x99));
}

#[test]
fn tunables_validate_and_round_trip() {
    let Some(mgr) = manager_or_skip("tunables_validate_and_round_trip", 16) else { return };
    let m = mgr.merger();
    assert_eq!(m.tunables(), Tunables::default());
    let err = m.update(|t| t.max_page_sharing = 1).unwrap_err();
    assert!(err.to_string().contains("max_page_sharing = 1"), "{err}");
    let t = m.update(|t| {
        t.pages_to_scan = 5000;
        t.change_detection = ChangeDetection::Checksum;
    });
    assert_eq!(t.unwrap().pages_to_scan, 5000);
    assert_eq!(m.tunables().change_detection, ChangeDetection::Checksum);
    assert!(m.set_tunables(Tunables { sleep_ms: 1_000_000, ..Tunables::default() }).is_err());
    let json = serde_json::to_value(mgr.stats()).unwrap();
    for k in [
        "pages_shared",
        "pages_sharing",
        "pages_unshared",
        "pages_volatile",
        "full_scans",
        "zero_pages",
        "general_profit",
    ] {
        assert!(json["merge"].get(k).is_some(), "{k}");
    }
}
