//! The per-page cost of merging: zero pages punched in runs (one `fallocate`
//! per run of consecutive frames, not one per page), remapped runs that the
//! kernel merges into one VMA (the page tables' count of runs matches
//! /proc/self/maps), and — ignored, run by hand — the cost curve of scattered
//! sharing: pages_sharing vs host mappings vs merge time for two VMs sharing a
//! fraction p of their pages (docs/MERGING.md keeps the table).
//!
//! ```sh
//! cargo test --release -p memory --test merge_cost -- --ignored --nocapture cost_curve
//! ```

mod common;

use std::time::{Duration, Instant};

use common::*;
use memory::merge::tunables::ChangeDetection;
use memory::{CompactionTunablesPatch, GuestMap, ManagerConfig, MemoryManager, Tunables, PAGE_SIZE};

fn tunables(merge_zero: bool) -> Tunables {
    Tunables {
        run: true,
        pages_to_scan: 10_000,
        sleep_ms: 0,
        max_page_sharing: 256,
        merge_zero_pages: merge_zero,
        change_detection: ChangeDetection::Checksum,
        hold_vcpus: false,
    }
}

fn fill(g: &GuestMap, page: u32, value: u64) {
    // SAFETY: the page belongs to the live guest map `g`.
    unsafe { fill_page(g.page_addr(page).unwrap(), value) }
}

fn holds(g: &GuestMap, page: u32, value: u64) -> bool {
    // SAFETY: as above.
    unsafe { page_is(g.page_addr(page).unwrap(), value) }
}

/// Kernel VMAs over the guest RAM of `g` (from /proc/self/maps).
fn kernel_vmas(g: &GuestMap) -> usize {
    maps_in_range(g.host_addr(), g.host_addr() + g.size())
}

/// A unique non-zero content value for page `page` of VM `vm`.
fn unique(vm: u32, page: u32) -> u64 {
    (1 << 62) | (u64::from(vm) << 32) | u64::from(page)
}

/// Content shared by the two VMs: index `i` of the shared set.
fn common_value(i: u32) -> u64 {
    (3 << 60) | u64::from(i)
}

/// Waits until the merger reports `pages_sharing >= want` (false on timeout).
fn wait_sharing(mgr: &MemoryManager, want: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if mgr.merger().stats().pages_sharing >= want {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

#[test]
fn zero_pages_are_punched_in_runs() {
    const PAGES: u32 = 4096;
    const STRIDE: u32 = 64;
    let Some(mgr) = manager_or_skip("zero_pages_are_punched_in_runs", 64) else { return };
    let _w = Watchdog::new("zero_pages_are_punched_in_runs", 120);
    let g = mgr.create_guest(1, u64::from(PAGES) * PAGE_SIZE as u64).unwrap();
    // Every page written (so it holds host memory); all zero but one in STRIDE.
    for p in 0..PAGES {
        fill(&g, p, if p % STRIDE == 0 { unique(1, p) } else { 0 });
    }
    let zero_pages = u64::from(PAGES - PAGES / STRIDE);
    let punches_before = mgr.stats().punch_calls;
    let started = Instant::now();
    mgr.set_merge(1, true, 1).unwrap();
    mgr.merger().set_tunables(tunables(true)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while mgr.merger().stats().zero_pages < zero_pages && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = started.elapsed();
    mgr.merger().set_run(false);
    let s = mgr.stats();
    let punches = s.punch_calls - punches_before;
    print_line(&format!(
        "zero-heavy: {} zero pages in {} runs: {punches} punch calls, {:.1} ms",
        s.merge.zero_pages,
        PAGES / STRIDE,
        elapsed.as_secs_f64() * 1e3
    ));
    assert_eq!(s.merge.zero_pages, zero_pages, "{s:#?}");
    // One punch per run of zero pages, split at most once more per chunk.
    let chunks = PAGES.div_ceil(256);
    assert!(punches <= u64::from(PAGES / STRIDE + chunks), "{punches} punches for {zero_pages} zero pages");
    assert!(s.host_bytes <= u64::from(PAGES / STRIDE + 512) * PAGE_SIZE as u64, "zeroed pages keep memory: {s:#?}");
    for p in 0..PAGES {
        assert!(holds(&g, p, if p % STRIDE == 0 { unique(1, p) } else { 0 }), "page {p}");
    }
    print_line(&format!("host bytes after reading every page: {}", mgr.stats().host_bytes));
}

/// Two VMs of `pages` pages; page `i` of `shared` in VM 2 holds the content of
/// page `partner[i]` of VM 1; every other page is unique.
struct Pair {
    a: GuestMap,
    b: GuestMap,
    shared: u64,
}

fn build_pair(mgr: &std::sync::Arc<MemoryManager>, pages: u32, fraction: f64, shuffled: bool, seed: u64) -> Pair {
    // Compaction would move frames (and mappings) while the test counts them.
    mgr.update_compaction(&CompactionTunablesPatch { enabled: Some(false), ..Default::default() }).unwrap();
    let bytes = u64::from(pages) * PAGE_SIZE as u64;
    let (a, b) = (mgr.create_guest(1, bytes).unwrap(), mgr.create_guest(2, bytes).unwrap());
    let mut rng = Rng(seed | 1);
    let set: Vec<u32> = (0..pages).filter(|_| (rng.below(1_000_000) as f64) < fraction * 1e6).collect();
    let mut partner = set.clone();
    if shuffled {
        for i in (1..partner.len()).rev() {
            partner.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }
    let mut in_set = vec![None; pages as usize];
    for (i, &p) in set.iter().enumerate() {
        in_set[p as usize] = Some(i);
    }
    for p in 0..pages {
        match in_set[p as usize] {
            Some(i) => {
                fill(&a, p, common_value(p));
                fill(&b, p, common_value(partner[i]));
            }
            None => {
                fill(&a, p, unique(1, p));
                fill(&b, p, unique(2, p));
            }
        }
    }
    Pair { a, b, shared: set.len() as u64 }
}

/// One row of the cost curve.
struct Row {
    pages_sharing: u64,
    guest_vmas: u64,
    kernel_vmas: usize,
    vmas_per_shared_page: f64,
    merge_s: f64,
    cpu_s: f64,
}

fn measure(mgr: &std::sync::Arc<MemoryManager>, pair: &Pair) -> Row {
    mgr.set_merge(1, true, 1).unwrap();
    mgr.set_merge(2, true, 1).unwrap();
    let started = Instant::now();
    let cpu0 = thread_cpu_s(mgr.merger().scanner_tid());
    mgr.merger().set_tunables(tunables(false)).unwrap();
    assert!(wait_sharing(mgr, pair.shared, Duration::from_secs(300)), "{:#?}", mgr.merger().stats());
    let merge_s = started.elapsed().as_secs_f64();
    let cpu_s = thread_cpu_s(mgr.merger().scanner_tid()) - cpu0;
    mgr.merger().set_run(false);
    let s = mgr.stats();
    Row {
        pages_sharing: s.pages_sharing,
        guest_vmas: s.vma_count,
        kernel_vmas: kernel_vmas(&pair.a) + kernel_vmas(&pair.b),
        vmas_per_shared_page: s.vmas_per_shared_page,
        merge_s,
        cpu_s,
    }
}

fn check_content(pair: &Pair, pages: u32, fraction: f64, shuffled: bool, seed: u64) {
    // Rebuild the expected layout from the same seed.
    let mut rng = Rng(seed | 1);
    let set: Vec<u32> = (0..pages).filter(|_| (rng.below(1_000_000) as f64) < fraction * 1e6).collect();
    let mut partner = set.clone();
    if shuffled {
        for i in (1..partner.len()).rev() {
            partner.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }
    let mut j = 0;
    for p in 0..pages {
        if set.get(j) == Some(&p) {
            assert!(holds(&pair.a, p, common_value(p)), "VM 1 page {p}");
            assert!(holds(&pair.b, p, common_value(partner[j])), "VM 2 page {p}");
            j += 1;
        } else {
            assert!(holds(&pair.a, p, unique(1, p)), "VM 1 page {p}");
            assert!(holds(&pair.b, p, unique(2, p)), "VM 2 page {p}");
        }
    }
}

#[test]
fn remapped_runs_coalesce_into_one_mapping() {
    // Same-offset sharing across chunk boundaries (several mmaps with
    // contiguous file offsets) and shuffled sharing: the kernel's VMAs over
    // guest RAM are exactly the page tables' runs of consecutive frames.
    const PAGES: u32 = 2048;
    for (shuffled, fraction) in [(false, 0.9), (false, 0.3), (true, 0.2)] {
        let Some(mgr) = manager_or_skip("remapped_runs_coalesce_into_one_mapping", 64) else { return };
        let _w = Watchdog::new("remapped_runs_coalesce_into_one_mapping", 120);
        let pair = build_pair(&mgr, PAGES, fraction, shuffled, 7);
        let row = measure(&mgr, &pair);
        assert_eq!(row.pages_sharing, pair.shared);
        assert_eq!(
            row.kernel_vmas as u64, row.guest_vmas,
            "shuffled {shuffled}, p {fraction}: /proc/self/maps disagrees with the runs of the page tables"
        );
        if !shuffled {
            // Same-offset sharing moves runs: far fewer mappings than shared pages.
            assert!(row.vmas_per_shared_page < 2.0, "p {fraction}: {} per shared page", row.vmas_per_shared_page);
        }
        check_content(&pair, PAGES, fraction, shuffled, 7);
    }
}

#[test]
#[ignore = "measurement: prints the cost curve of scattered sharing (minutes)"]
fn cost_curve() {
    const PAGES: u32 = 16384; // 64 MiB per VM
    let reps: usize = std::env::var("DENSEVM_COST_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    if let Err(e) = memory::uffd::Uffd::probe() {
        skip("cost_curve", &format!("userfaultfd write protection unavailable: {e}"));
        return;
    }
    print_line(&format!("two VMs of {PAGES} pages; p = fraction of VM 2's pages equal to a page of VM 1; {reps} runs"));
    print_line("| layout | p | pages_sharing | guest VMAs | kernel VMAs | VMAs/shared page | merge s (min/med/max) | merger CPU s (med) |");
    print_line("|---|---|---|---|---|---|---|---|");
    for shuffled in [false, true] {
        for fraction in [0.05, 0.2, 0.5, 0.9] {
            let mut rows = Vec::new();
            for rep in 0..reps {
                let mut config = ManagerConfig::with_capacity(256 << 20);
                config.raise_max_map_count = true;
                let mgr = MemoryManager::new(config).expect("manager");
                let seed = 11 + rep as u64;
                let pair = build_pair(&mgr, PAGES, fraction, shuffled, seed);
                let row = measure(&mgr, &pair);
                assert_eq!(
                    row.kernel_vmas as u64,
                    row.guest_vmas,
                    "{} {fraction}",
                    if shuffled { "shuffled" } else { "same" }
                );
                check_content(&pair, PAGES, fraction, shuffled, seed);
                rows.push(row);
            }
            let mut t: Vec<f64> = rows.iter().map(|r| r.merge_s).collect();
            t.sort_by(f64::total_cmp);
            let mut cpu: Vec<f64> = rows.iter().map(|r| r.cpu_s).collect();
            cpu.sort_by(f64::total_cmp);
            let r = &rows[0];
            print_line(&format!(
                "| {} | {fraction} | {} | {} | {} | {:.2} | {:.3} / {:.3} / {:.3} | {:.3} |",
                if shuffled { "shuffled" } else { "same offset" },
                r.pages_sharing,
                r.guest_vmas,
                r.kernel_vmas,
                r.vmas_per_shared_page,
                t[0],
                t[t.len() / 2],
                t[t.len() - 1],
                cpu[cpu.len() / 2],
            ));
        }
    }
}

#[test]
#[ignore = "measurement: zero pages dropped while the pool has ~16 K mappings"]
fn zero_punch_cost_with_many_mappings() {
    const PAGES: u32 = 16384;
    const STRIDE: u32 = 64;
    if let Err(e) = memory::uffd::Uffd::probe() {
        skip("zero_punch_cost_with_many_mappings", &format!("userfaultfd write protection unavailable: {e}"));
        return;
    }
    for rep in 0..3 {
        let mut config = ManagerConfig::with_capacity(512 << 20);
        config.raise_max_map_count = true;
        let mgr = MemoryManager::new(config).expect("manager");
        let pair = build_pair(&mgr, PAGES, 0.9, true, 5 + rep);
        let row = measure(&mgr, &pair);
        let g = mgr.create_guest(3, u64::from(PAGES) * PAGE_SIZE as u64).unwrap();
        for p in 0..PAGES {
            fill(&g, p, if p % STRIDE == 0 { unique(3, p) } else { 0 });
        }
        let zero_pages = u64::from(PAGES - PAGES / STRIDE);
        mgr.set_merge(1, false, 1).unwrap();
        mgr.set_merge(2, false, 1).unwrap();
        mgr.set_merge(3, true, 3).unwrap();
        let punches0 = mgr.stats().punch_calls;
        let cpu0 = thread_cpu_s(mgr.merger().scanner_tid());
        let started = Instant::now();
        mgr.merger().set_tunables(tunables(true)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(300);
        while mgr.merger().stats().zero_pages < zero_pages && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let wall = started.elapsed().as_secs_f64();
        let cpu = thread_cpu_s(mgr.merger().scanner_tid()) - cpu0;
        mgr.merger().set_run(false);
        let s = mgr.stats();
        assert_eq!(s.merge.zero_pages, zero_pages);
        print_line(&format!(
            "{} mappings of guest memory: {zero_pages} zero pages dropped with {} punch calls in {wall:.3} s, merger CPU {cpu:.3} s",
            row.kernel_vmas,
            s.punch_calls - punches0
        ));
    }
}
