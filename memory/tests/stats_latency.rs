//! Statistics without the manager's lock.
//!
//! - `published_stats_equal_the_locked_computation`: after merging, writes
//!   (copy-on-write), discards and compaction have stopped, every figure of
//!   [`MemoryManager::stats`] (the published figures, no lock) equals
//!   [`MemoryManager::stats_exact`] (taken under the lock), and each VM's
//!   merged pages equal a count over its pages' frames.
//! - `stats_latency_under_full_speed_merging` (ignored: a measurement, run with
//!   `cargo test --release -p memory --test stats_latency -- --ignored --nocapture`):
//!   four 64 MiB guests of clone content, writers rewriting pages with a few
//!   patterns (so merging never converges), the merger at full speed without
//!   back-off and proactive compaction; samples `stats()` (lock-free) and
//!   `stats_exact()` (the lock, as the statistics took it before) interleaved,
//!   `DENSEVM_STATS_REPS` repetitions (default 5) of `DENSEVM_STATS_CALLS`
//!   calls each (default 1000), and prints p50 / p99 / max per repetition and
//!   the min / median / max of each over the repetitions. Both read the
//!   process's mapping count from its cache, so the two differ only by the
//!   manager's lock.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{fill_page, fill_page_from_thread, manager_or_skip, Rng, Watchdog};
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

/// Latency samples, sorted.
struct Samples(Vec<Duration>);

impl Samples {
    fn quantile(&self, q: f64) -> Duration {
        let i = ((self.0.len() as f64 - 1.0) * q).round() as usize;
        self.0[i]
    }
}

fn sample(calls: usize, f: impl Fn() -> MemoryStats) -> Samples {
    let mut v = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        std::hint::black_box(f());
        v.push(t.elapsed());
    }
    v.sort_unstable();
    Samples(v)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// min / median / max of `values` (milliseconds).
fn spread(mut values: Vec<f64>) -> String {
    values.sort_by(f64::total_cmp);
    format!("{:.3} / {:.3} / {:.3}", values[0], values[values.len() / 2], values[values.len() - 1])
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
    let guests: Vec<GuestMap> =
        (1..=4).map(|vm| mgr.create_guest(vm, u64::from(GUEST_PAGES) * PAGE_SIZE as u64).unwrap()).collect();
    for g in &guests {
        for p in 0..GUEST_PAGES {
            // 90% clone content across the VMs, the rest unique.
            let v = if p % 10 == 0 { u64::from(g.vm_id()) << 32 | u64::from(p) } else { pattern(p) };
            // SAFETY: a page of a live guest map; no other writer yet.
            unsafe { fill_page(g.page_addr(p).unwrap(), v) };
        }
        mgr.set_merge(g.vm_id(), true, 1).unwrap();
    }
    mgr.merger().set_backoff(false);
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
    mgr.update_compaction(&memory::CompactionTunablesPatch {
        enabled: Some(true),
        proactiveness: Some(1),
        ..Default::default()
    })
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let bases: Vec<usize> = guests.iter().map(|g| g.host_addr()).collect();
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (stop, writes, bases) = (stop.clone(), writes.clone(), bases.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w + 1));
                while !stop.load(Ordering::Relaxed) {
                    let base = bases[rng.below(bases.len() as u64) as usize];
                    let p = rng.below(u64::from(GUEST_PAGES)) as u32;
                    // SAFETY: a page of a live guest map (the maps outlive the writers).
                    unsafe { fill_page(base + p as usize * PAGE_SIZE, pattern(p + 1)) };
                    writes.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        })
        .collect();
    // Let merging get going.
    assert!(mgr.merger().wait_full_scans(1, Duration::from_secs(120)), "no full scan");
    let (mut old_p50, mut old_p99, mut old_max) = (Vec::new(), Vec::new(), Vec::new());
    let (mut new_p50, mut new_p99, mut new_max) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        let measure_old = |p50: &mut Vec<f64>, p99: &mut Vec<f64>, max: &mut Vec<f64>| {
            let s = sample(calls, || mgr.stats_exact());
            (p50.push(ms(s.quantile(0.5))), p99.push(ms(s.quantile(0.99))), max.push(ms(s.quantile(1.0))));
            s
        };
        let measure_new = |p50: &mut Vec<f64>, p99: &mut Vec<f64>, max: &mut Vec<f64>| {
            let s = sample(calls, || mgr.stats());
            (p50.push(ms(s.quantile(0.5))), p99.push(ms(s.quantile(0.99))), max.push(ms(s.quantile(1.0))));
            s
        };
        let (old, new) = if rep % 2 == 0 {
            let old = measure_old(&mut old_p50, &mut old_p99, &mut old_max);
            (old, measure_new(&mut new_p50, &mut new_p99, &mut new_max))
        } else {
            let new = measure_new(&mut new_p50, &mut new_p99, &mut new_max);
            (measure_old(&mut old_p50, &mut old_p99, &mut old_max), new)
        };
        let st = mgr.stats();
        println!(
            "rep {rep}: locked p50 {:.3} p99 {:.3} max {:.3} ms | lock-free p50 {:.3} p99 {:.3} max {:.3} ms \
             (pages_sharing {}, merges {}, cow {}, full scans {}, writes {}, vmas {})",
            ms(old.quantile(0.5)),
            ms(old.quantile(0.99)),
            ms(old.quantile(1.0)),
            ms(new.quantile(0.5)),
            ms(new.quantile(0.99)),
            ms(new.quantile(1.0)),
            st.pages_sharing,
            st.counters.merges,
            st.counters.cow_copies + st.counters.cow_reuses,
            st.merge.full_scans,
            writes.load(Ordering::Relaxed),
            st.process_vma_count,
        );
    }
    println!("{calls} calls x {reps} repetitions, min / median / max over the repetitions (ms):");
    println!("  locked    p50 {}  p99 {}  max {}", spread(old_p50), spread(old_p99), spread(old_max));
    println!("  lock-free p50 {}  p99 {}  max {}", spread(new_p50), spread(new_p99), spread(new_max));
    // What the statistics no longer do on the reader's time: count the
    // process's mappings (cached, refreshed in the background).
    let t = Instant::now();
    let lines = std::fs::read("/proc/self/maps").map_or(0, |m| m.iter().filter(|&&b| b == b'\n').count());
    println!("  one read of /proc/self/maps: {:.3} ms ({lines} mappings)", ms(t.elapsed()));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    mgr.merger().set_run(false);
}
