//! Torture test of compaction under concurrent writers.
//!
//! The remap torture (`torture.rs`) plus compaction at full rate: writer threads
//! store version patterns into their own guest pages through the guest view
//! (checking before each write that the page still holds their last version),
//! a thread `pread`s file pages into its guest pages, a manager thread merges,
//! shares, unshares, discards, device-writes and protects pages, a churn thread
//! creates, fills, checks and destroys small VMs (scattering live frames over
//! the 2 MiB frames), and a compaction thread runs `compact()` back to back
//! while the proactive compactor runs at its highest rate too. A write that
//! landed in a migrated page's old frame would be lost (the writer's next check
//! or the final check sees the old version); a write into a shared frame would
//! change another mapper's content (the final model check sees it).
//! Afterwards every page must equal the model, through the guest view and the
//! alias, and every still-shared frame must hold what all its mappers expect.
//! The remap torture's machinery is `common/torture.rs`; this file adds the
//! compaction passes and the churning VMs.
//!
//! Runs ~3 s by default; set DENSEVM_TORTURE_SECS for longer. On a loaded host
//! the churn may not have scattered anything for the on-demand passes to move
//! by then (it destroys VMs only once 64 live): the run goes on, everything
//! still running, until an on-demand pass has migrated pages (at most
//! [`EXTRA_SECS`] more), so the test always exercises compaction.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::torture::{assert_no_failures, first_word, page_holds, print_counters_and_assert, torture_secs, Torture};
use common::*;
use memory::{VmId, PAGE_SIZE};

/// Longest extension of the run while no on-demand pass has migrated anything.
const EXTRA_SECS: u64 = 120;

/// Value of every word of page `page` of churn VM `vm`.
fn churn_word(vm: VmId, page: u32) -> u64 {
    0xC4_0000_0000 | (u64::from(vm) << 16) | u64::from(page)
}

#[test]
fn torture_compaction_under_concurrent_writers() {
    let Some(mgr) = manager_or_skip("torture_compaction_under_concurrent_writers", 96) else {
        return;
    };
    mgr.update_compaction(&memory::CompactionTunablesPatch {
        enabled: Some(true),
        proactiveness: Some(0),
        max_pages_per_s: Some(memory::compact::MAX_MAX_PAGES_PER_S),
    })
    .unwrap();
    let secs = torture_secs();
    let _w = Watchdog::new("compaction torture", secs + EXTRA_SECS + 180);
    let mut t = Torture::start(mgr, "compaction-torture");

    // Compaction at full rate, back to back.
    let on_demand_pages = Arc::new(AtomicU64::new(0));
    let compactor = {
        let (stop, failures, mgr) = (t.stop.clone(), t.failures.clone(), t.mgr.clone());
        let on_demand_pages = on_demand_pages.clone();
        std::thread::spawn(move || {
            let (mut passes, mut pages, mut returned) = (0u64, 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                match mgr.compact() {
                    Ok(r) => {
                        passes += 1;
                        pages += r.pages_migrated;
                        on_demand_pages.fetch_add(r.pages_migrated, Ordering::Relaxed);
                        returned += r.frames_2m_returned;
                        if r.failures.remap_failed > 0 {
                            failures.lock().unwrap().push(format!("compaction remap failures: {r:?}"));
                        }
                    }
                    Err(e) => failures.lock().unwrap().push(format!("compact: {e}")),
                }
            }
            (passes, pages, returned)
        })
    };

    // Churn: small VMs created, filled, checked and destroyed, scattering frames.
    let churn = {
        let (stop, failures, writes, mgr) = (t.stop.clone(), t.failures.clone(), t.writes.clone(), t.mgr.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(0x51ed_270b_2792_d3a1);
            let mut live: Vec<memory::GuestMap> = Vec::new();
            let (mut created, mut destroyed, mut next_id) = (0u64, 0u64, 1000u32);
            let check = |g: &memory::GuestMap, failures: &Mutex<Vec<String>>| {
                for p in 0..g.pages() {
                    let addr = g.page_addr(p).unwrap_or(0);
                    if !page_holds(addr, churn_word(g.vm_id(), p)) {
                        failures.lock().unwrap().push(format!(
                            "churn vm {} page {p} holds {:#x}, expected {:#x}",
                            g.vm_id(),
                            first_word(addr),
                            churn_word(g.vm_id(), p)
                        ));
                    }
                }
            };
            while !stop.load(Ordering::Relaxed) {
                if live.len() < 64 || (live.len() < 256 && rng.below(2) == 0) {
                    let pages = 1 + rng.below(64);
                    match mgr.create_guest(next_id, pages * PAGE_SIZE as u64) {
                        Ok(g) => {
                            for p in 0..g.pages() {
                                // SAFETY: a page of a live guest map owned by this thread.
                                unsafe { fill_page(g.page_addr(p).unwrap_or(0), churn_word(g.vm_id(), p)) };
                                writes.fetch_add(1, Ordering::Relaxed);
                            }
                            live.push(g);
                            created += 1;
                        }
                        Err(e) => failures.lock().unwrap().push(format!("create_guest: {e}")),
                    }
                    next_id = if next_id >= 1_000_000 { 1000 } else { next_id + 1 };
                } else {
                    let g = live.swap_remove(rng.below(live.len() as u64) as usize);
                    check(&g, &failures);
                    drop(g);
                    destroyed += 1;
                }
            }
            for g in &live {
                check(g, &failures);
            }
            (created, destroyed)
        })
    };

    // Manager thread (this one): as many operations as possible.
    let tolerated = |kind: u64, e: &memory::manager::Error| match e {
        // Share and migrate name a frame read in an earlier lock hold; the
        // compactor may have moved it since (freed: the operation changes
        // nothing; reused by a churn VM of another merge domain: share refuses).
        memory::manager::Error::FrameNotLive(_) => (40..50).contains(&kind) || (60..75).contains(&kind),
        memory::manager::Error::CrossDomain { .. } => (40..50).contains(&kind),
        _ => false,
    };
    let mut run = t.run_ops(secs, tolerated);
    let mut extended = 0;
    while on_demand_pages.load(Ordering::Relaxed) == 0 && extended < EXTRA_SECS {
        let more = t.run_ops(1, tolerated);
        run.ops.iter_mut().zip(more.ops).for_each(|(a, b)| *a += b);
        (run.raced, run.elapsed) = (run.raced + more.raced, run.elapsed + more.elapsed);
        extended += 1;
    }
    if extended > 0 {
        eprintln!("compaction torture: ran {extended} s longer until an on-demand pass migrated pages");
    }
    let expected = t.stop_and_join();
    let (passes, migrated, returned) = compactor.join().unwrap();
    let (created, destroyed) = churn.join().unwrap();
    // Quiesce: no proactive pass may move frames while the checks below name
    // them (an on-demand pass waits for a proactive one to end).
    let mgr = t.mgr.clone();
    mgr.update_compaction(&memory::CompactionTunablesPatch { enabled: Some(false), ..Default::default() }).unwrap();
    let last = mgr.compact().unwrap();
    assert_eq!(last.failures.remap_failed, 0, "{last:?}");

    let (fails, shared_frames) = t.check(&expected);
    let s = mgr.stats();
    t.print_ops(&run);
    let (elapsed, raced) = (run.elapsed, run.raced);
    let cs = mgr.compaction_stats();
    eprintln!(
        "compaction torture: {passes} on-demand passes ({:.1}/s), {migrated} pages migrated ({:.0}/s), {returned} 2 MiB frames returned; proactive passes {}, total pages migrated {}, failures {:?}; churn VMs created {created}, destroyed {destroyed}; share/migrate of a frame compaction had moved: {raced}",
        passes as f64 / elapsed,
        migrated as f64 / elapsed,
        cs.proactive_passes,
        cs.pages_migrated,
        cs.failures
    );
    print_counters_and_assert(&s, shared_frames);
    assert!(passes > 0 && migrated > 0, "the test did not exercise compaction");
    assert_no_failures(&fails);
}
