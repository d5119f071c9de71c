//! Statistics without the manager's lock.
//!
//! - `published_stats_equal_the_locked_computation`: after merging, writes
//!   (copy-on-write), discards and compaction have stopped, every figure of
//!   [`MemoryManager::stats`] (the published figures, no lock) equals
//!   [`MemoryManager::stats_exact`] (taken under the lock), and each VM's
//!   merged pages equal a count over its pages' frames.
//! - `stats_latency_under_full_speed_merging` (ignored: a measurement, run with
//!   `cargo test --release -p memory --test stats_latency -- --ignored --nocapture`):
//!   per repetition, four fresh 64 MiB guests (90% of their pages clones
//!   across them) that the merger merges at full speed (no back-off, proactive
//!   compaction on) while `stats()` (lock-free) and `stats_exact()` (the lock,
//!   as the statistics took it before) are called in turn, 100 µs apart;
//!   `DENSEVM_STATS_REPS` repetitions (default 5) of `DENSEVM_STATS_CALLS`
//!   calls of each (default 1000); prints p50 / p99 / max per repetition and
//!   the min / median / max of each over the repetitions. Both read the
//!   process's mapping count from its cache, so the two differ only by the
//!   manager's lock.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{fill_page, fill_page_from_thread, manager_or_skip, Watchdog};
use memory::{ChangeDetection, GuestMap, MemoryManager, MemoryStats, Tunables, VmId, PAGE_SIZE};

/// The statistics that come from the manager's locked state, as JSON (the
/// fields read elsewhere, host bytes and the process's VMAs, are left out).
fn locked_part(s: &MemoryStats) -> serde_json::Value {
    let mut v = serde_json::to_value(s).unwrap();
    let obj = v.as_object_mut().unwrap();
    obj.remove("process_vma_count");
    obj.remove("merge");
    let merge = serde_json::json!({
        "pages_shared": s.merge.pages_shared,
        "pages_sharing": s.merge.pages_sharing,
        "zero_pages": s.merge.zero_pages,
        "general_profit": s.merge.general_profit,
    });
    obj.insert("merge_sharing".into(), merge);
    v
}

/// Guest pages of `vm` whose frame another guest page maps too (the count
/// the per-VM statistics keep as mappings change).
fn merged_by_scan(mgr: &MemoryManager, vm: VmId, pages: u32) -> u64 {
    (0..pages).filter(|&p| mgr.frame_refs(mgr.frame_of(vm, p).unwrap()) > 1).count() as u64
}

fn pattern(p: u32) -> u64 {
    0x5EED_0000 + u64::from(p % 16)
}

#[test]
fn published_stats_equal_the_locked_computation() {
    let name = "published_stats_equal_the_locked_computation";
    let Some(mgr) = manager_or_skip(name, 64) else { return };
    let _w = Watchdog::new(name, 120);
    // Nothing may change the state between the two readings compared below.
    let no_proactive = memory::CompactionTunablesPatch { enabled: Some(false), ..Default::default() };
    mgr.update_compaction(&no_proactive).unwrap();
    const PAGES: u32 = 512;
    let vms: [VmId; 3] = [1, 2, 3];
    let mut guests: Vec<GuestMap> =
        vms.iter().map(|&vm| mgr.create_guest(vm, u64::from(PAGES) * 4096).unwrap()).collect();
    for g in &guests {
        for p in 0..PAGES {
            // Page 300.. of every VM stays zero (merged as zero pages).
            if p < 300 {
                // SAFETY: a page of a live guest map; no other writer.
                unsafe { fill_page(g.page_addr(p).unwrap(), pattern(p)) };
            }
        }
    }
    // A fresh VM is in the published figures at once (creation publishes).
    assert_eq!(mgr.vm_memory_stats(3).unwrap().guest_pages, u64::from(PAGES));
    for &vm in &vms {
        mgr.set_merge(vm, true, 7).unwrap();
        // The settings are published with the call.
        assert!(mgr.vm_merge_stats(vm).unwrap().enabled);
    }
    mgr.merger()
        .set_tunables(Tunables {
            run: true,
            pages_to_scan: 100_000,
            sleep_ms: 0,
            merge_zero_pages: true,
            change_detection: ChangeDetection::Checksum,
            ..Tunables::default()
        })
        .unwrap();
    assert!(mgr.merger().wait_full_scans(4, Duration::from_secs(60)), "merging did not progress");
    mgr.merger().set_run(false);
    // Writes to merged pages (copy-on-write and reuse, resolved by the fault
    // handler), discards, a compaction pass.
    for (i, g) in guests.iter().enumerate() {
        for p in (0..300).step_by(7 + i) {
            fill_page_from_thread(g.page_addr(p).unwrap(), 0xAB00 + u64::from(p));
        }
        for p in (400..PAGES).step_by(5) {
            mgr.discard(vms[i], p).unwrap();
        }
    }
    // Write faults only mark the published figures stale: the next read
    // publishes them (nothing else holds the lock).
    let cow = mgr.stats().counters;
    assert!(cow.cow_copies + cow.cow_reuses > 0);
    mgr.compact().unwrap();
    drop(guests.pop());

    let (published, exact) = (mgr.stats(), mgr.stats_exact());
    assert_eq!(locked_part(&published), locked_part(&exact));
    assert!(published.pages_sharing > 0, "{published:?}");
    assert_eq!(published.counters, exact.counters);
    for &vm in &vms[..2] {
        let (vm_stats, merge) = (mgr.vm_memory_stats(vm).unwrap(), mgr.vm_merge_stats(vm).unwrap());
        assert_eq!(vm_stats.merged_pages, merged_by_scan(&mgr, vm, PAGES), "vm {vm}");
        assert!(vm_stats.merged_pages > 0, "vm {vm}");
        assert_eq!((vm_stats.guest_pages, merge.merged_pages), (u64::from(PAGES), vm_stats.merged_pages));
        assert!(vm_stats.cow_copies + vm_stats.cow_reuses > 0, "vm {vm}");
    }
    // The destroyed VM is gone from the published figures at once.
    assert!(mgr.vm_memory_stats(3).is_err());
    assert!(mgr.vm_merge_stats(3).is_err());
}

/// Latency samples.
#[derive(Default)]
struct Samples(Vec<Duration>);

impl Samples {
    fn time(&mut self, f: impl FnOnce() -> MemoryStats) {
        let t = Instant::now();
        std::hint::black_box(f());
        self.0.push(t.elapsed());
    }

    /// p50, p99 and max in milliseconds.
    fn summary(mut self) -> [f64; 3] {
        self.0.sort_unstable();
        let q = |q: f64| ms(self.0[((self.0.len() as f64 - 1.0) * q).round() as usize]);
        [q(0.5), q(0.99), q(1.0)]
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// min / median / max of `values` (milliseconds).
fn spread(mut values: Vec<f64>) -> String {
    values.sort_by(f64::total_cmp);
    format!("{:.3} / {:.3} / {:.3}", values[0], values[values.len() / 2], values[values.len() - 1])
}

/// Creates `n` guests of `pages` pages (VM ids from `first`), 90% of their
/// pages clones across the VMs (content seeded by `seed`), merging enabled.
fn clone_guests(mgr: &Arc<MemoryManager>, first: VmId, n: u32, pages: u32, seed: u64) -> Vec<GuestMap> {
    (first..first + n)
        .map(|vm| {
            let g = mgr.create_guest(vm, u64::from(pages) * PAGE_SIZE as u64).unwrap();
            for p in 0..pages {
                let v = if p % 10 == 0 { u64::from(vm) << 32 | u64::from(p) } else { seed << 40 | u64::from(p % 4096) };
                // SAFETY: a page of a live guest map; no other writer yet.
                unsafe { fill_page(g.page_addr(p).unwrap(), v) };
            }
            mgr.set_merge(vm, true, 1).unwrap();
            g
        })
        .collect()
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn stats_latency_under_full_speed_merging() {
    let name = "stats_latency_under_full_speed_merging";
    let Some(mgr) = manager_or_skip(name, 512) else { return };
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|s| s.parse().ok()).unwrap_or(d);
    let (reps, calls) = (env("DENSEVM_STATS_REPS", 5), env("DENSEVM_STATS_CALLS", 1000));
    let _w = Watchdog::new(name, 3600);
    const GUEST_PAGES: u32 = 64 << 8; // 64 MiB
    mgr.merger().set_backoff(false);
    let proactive =
        memory::CompactionTunablesPatch { enabled: Some(true), proactiveness: Some(5), ..Default::default() };
    mgr.update_compaction(&proactive).unwrap();
    let mut results: [Vec<[f64; 3]>; 2] = [Vec::new(), Vec::new()];
    for rep in 0..reps {
        // Fresh guests each repetition: the merger merges their clone pages
        // (long chunks under the manager's lock) while the statistics are read.
        let guests = clone_guests(&mgr, 1 + 4 * rep as u32, 4, GUEST_PAGES, rep as u64 + 1);
        let merges_before = mgr.stats().counters.merges;
        mgr.merger()
            .set_tunables(Tunables {
                run: true,
                pages_to_scan: 100_000,
                sleep_ms: 0,
                merge_zero_pages: true,
                change_detection: ChangeDetection::Checksum,
                hold_vcpus: false,
                ..Tunables::default()
            })
            .unwrap();
        // One locked and one lock-free reading in turn (which goes first
        // alternates), 100 µs apart, as clients polling would.
        let (mut locked, mut free) = (Samples::default(), Samples::default());
        let started = Instant::now();
        for i in 0..calls {
            if (i + rep) % 2 == 0 {
                locked.time(|| mgr.stats_exact());
                free.time(|| mgr.stats());
            } else {
                free.time(|| mgr.stats());
                locked.time(|| mgr.stats_exact());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let elapsed = started.elapsed();
        mgr.merger().set_run(false);
        let st = mgr.stats_exact();
        let (l, f) = (locked.summary(), free.summary());
        println!(
            "rep {rep}: locked p50 {:.3} p99 {:.3} max {:.3} ms | lock-free p50 {:.3} p99 {:.3} max {:.3} ms \
             ({:.1} s, {} merges meanwhile, pages_sharing {}, compaction passes {}, process VMAs {})",
            l[0],
            l[1],
            l[2],
            f[0],
            f[1],
            f[2],
            elapsed.as_secs_f64(),
            st.counters.merges - merges_before,
            st.pages_sharing,
            st.compaction.passes,
            st.process_vma_count,
        );
        results[0].push(l);
        results[1].push(f);
        drop(guests);
    }
    println!("{calls} calls x {reps} repetitions, min / median / max over the repetitions (ms):");
    for (label, r) in [("locked   ", &results[0]), ("lock-free", &results[1])] {
        let col = |i: usize| spread(r.iter().map(|x| x[i]).collect());
        println!("  {label} p50 {}  p99 {}  max {}", col(0), col(1), col(2));
    }
    // What the statistics no longer do on the reader's time: count the
    // process's mappings (cached, refreshed in the background).
    let t = Instant::now();
    let lines = std::fs::read("/proc/self/maps").map_or(0, |m| m.iter().filter(|&&b| b == b'\n').count());
    println!("  one read of /proc/self/maps: {:.3} ms ({lines} mappings)", ms(t.elapsed()));
}
