//! The merger at full speed (large `pages_to_scan`, no sleep) while writer
//! threads keep rewriting their pages with a few recurring patterns (so pages
//! keep merging and unmerging) and verify, before each write, that the page
//! still holds their last write. Afterwards every page must equal the model:
//! no lost write, no write leaked into a shared frame. Run once with checksums
//! and once with a dirty log fed by the writers (as KVM's would be).
//!
//! Runs ~2 s per mode by default; set DENSEVM_MERGE_TORTURE_SECS for longer.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use memory::merge::tunables::ChangeDetection;
use memory::{Tunables, VcpuGate, VmId, PAGE_SIZE};

/// A vCPU gate that counts holds (and the holds outstanding) and sums how long
/// they lasted, without holding anyone; each hold takes 2 ms (as kicking real
/// vCPUs out of guest mode may), so that holding all the time would be seen.
#[derive(Default)]
struct CountingGate {
    holds: AtomicU64,
    depth: std::sync::atomic::AtomicI64,
    held_since: Mutex<Option<Instant>>,
    held_ns: AtomicU64,
}

struct GateHandle(Arc<CountingGate>);

impl VcpuGate for GateHandle {
    fn hold(&self) -> bool {
        *self.0.held_since.lock().unwrap() = Some(Instant::now());
        std::thread::sleep(Duration::from_millis(2));
        self.0.holds.fetch_add(1, Ordering::SeqCst);
        self.0.depth.fetch_add(1, Ordering::SeqCst);
        true
    }

    fn release(&self) {
        let before = self.0.depth.fetch_sub(1, Ordering::SeqCst);
        assert!(before > 0, "release without hold");
        if let Some(since) = self.0.held_since.lock().unwrap().take() {
            self.0.held_ns.fetch_add(since.elapsed().as_nanos() as u64, Ordering::SeqCst);
        }
    }
}

const WRITERS: u32 = 3;
const PAGES_PER_WRITER: u32 = 48;
const IDLE: u32 = 192;
const PATTERNS: u64 = 6;

fn value(pattern: u64) -> u64 {
    0xC0C0_0000_0000 + pattern
}

fn run(mode: ChangeDetection) {
    let name = "writers_and_full_speed_merger_lose_nothing";
    let Some(mgr) = manager_or_skip(name, 64) else { return };
    let secs: u64 = std::env::var("DENSEVM_MERGE_TORTURE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let _w = Watchdog::new("merge_concurrent", secs + 120);
    let vms: [(VmId, u32); 3] = [(1, 10), (2, 10), (3, 20)];
    let guests: Vec<_> = vms.iter().map(|&(vm, _)| mgr.create_guest(vm, 2 << 20).unwrap()).collect();
    let logs: Vec<Arc<SharedLog>> = vms.iter().map(|_| Arc::new(SharedLog::default())).collect();
    let bases: Vec<usize> = guests.iter().map(|g| g.host_addr()).collect();
    // Owned pages: writer w owns pages w*48.. in every VM; idle pages after.
    let mut model: Vec<Vec<u64>> = vec![vec![0; 512]; vms.len()];
    for (i, g) in guests.iter().enumerate() {
        for p in 0..WRITERS * PAGES_PER_WRITER + IDLE {
            let v = value(u64::from(p) % PATTERNS);
            // SAFETY: page of a live guest map; no other thread runs yet.
            unsafe { fill_page(g.page_addr(p).unwrap(), v) };
            model[i][p as usize] = v;
        }
    }
    for (i, &(vm, domain)) in vms.iter().enumerate() {
        mgr.set_merge(vm, true, domain).unwrap();
        if mode == ChangeDetection::DirtyLog {
            mgr.set_dirty_log(vm, Box::new(LogHandle(logs[i].clone()))).unwrap();
        }
    }
    let tunables = Tunables {
        run: true,
        pages_to_scan: 100_000,
        sleep_ms: 0,
        max_page_sharing: 8,
        merge_zero_pages: true,
        change_detection: mode,
        hold_vcpus: true,
    };
    // Gates that only count (the writers are not held, so writes still race the
    // remaps): every hold taken by a merge chunk must be released.
    let gates: Vec<Arc<CountingGate>> = vms.iter().map(|_| Arc::new(CountingGate::default())).collect();
    for (&(vm, _), gate) in vms.iter().zip(&gates) {
        mgr.set_vcpu_gate(vm, Box::new(GateHandle(gate.clone()))).unwrap();
    }
    mgr.merger().set_tunables(tunables).unwrap();
    let merging_since = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let writes = Arc::new(AtomicU64::new(0));
    let model = Arc::new(Mutex::new(model));
    let mut threads = Vec::new();
    for w in 0..WRITERS {
        let (stop, failures, writes, model, bases, logs) =
            (stop.clone(), failures.clone(), writes.clone(), model.clone(), bases.clone(), logs.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(w);
            let mut mine: Vec<Vec<u64>> = model.lock().unwrap().clone();
            let mut burst = 0u64;
            while !stop.load(Ordering::Relaxed) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let vmi = (rng % 3) as usize;
                let p = w * PAGES_PER_WRITER + ((rng >> 8) % u64::from(PAGES_PER_WRITER)) as u32;
                let addr = bases[vmi] + p as usize * PAGE_SIZE;
                let expect = mine[vmi][p as usize];
                // SAFETY: the page belongs to a live guest map owned by this writer.
                if !unsafe { page_is(addr, expect) } {
                    failures.lock().unwrap().push(format!("vm {} page {p}: lost write of {expect:#x}", vmi + 1));
                    return;
                }
                let mut next = (rng >> 20) % (PATTERNS + 1);
                if value(next) == expect || (next == PATTERNS && expect == 0) {
                    next = (next + 1) % PATTERNS;
                }
                let v = if next == PATTERNS { 0 } else { value(next) };
                logs[vmi].mark(p);
                // SAFETY: as above.
                unsafe { fill_page(addr, v) };
                mine[vmi][p as usize] = v;
                writes.fetch_add(1, Ordering::Relaxed);
                // Quiet phases longer than an idle dirty-log poll (100 ms): the
                // writer's pages go clean, get merged, and the next burst writes
                // merged pages, so the race between merges and writes is exercised
                // however fast the writers run (without pauses, dirty-log mode
                // rightly never merges pages rewritten between every poll).
                burst += 1;
                if burst.is_multiple_of(20_000) {
                    std::thread::sleep(Duration::from_millis(150));
                }
            }
            let mut m = model.lock().unwrap();
            for vmi in 0..3 {
                for p in w * PAGES_PER_WRITER..(w + 1) * PAGES_PER_WRITER {
                    m[vmi][p as usize] = mine[vmi][p as usize];
                }
            }
        }));
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) && failures.lock().unwrap().is_empty() {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let during = mgr.stats();
    mgr.merger().set_run(false);
    // A paused merger finishes its batch first: wait until no hold is left.
    let deadline = Instant::now() + Duration::from_secs(30);
    while gates.iter().any(|g| g.depth.load(Ordering::SeqCst) != 0) {
        assert!(Instant::now() < deadline, "a vCPU hold was never released");
        std::thread::sleep(Duration::from_millis(5));
    }
    let held: u64 = gates.iter().map(|g| g.holds.load(Ordering::SeqCst)).sum();
    assert!(held > 0 && during.counters.vcpu_holds > 0, "merging chunks held no vCPUs");
    // The guests' share of the time: a burst of 300 ms, then at most half of it
    // (plus one chunk's overdraft).
    let elapsed = merging_since.elapsed().as_secs_f64();
    for g in &gates {
        let held = g.held_ns.load(Ordering::SeqCst) as f64 / 1e9;
        assert!(held <= 0.3 + 0.5 * elapsed + 0.05, "vCPUs held {held:.3} s in {elapsed:.3} s");
    }
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "{failures:?}");
    let model = model.lock().unwrap();
    for (i, g) in guests.iter().enumerate() {
        for p in 0..WRITERS * PAGES_PER_WRITER + IDLE {
            // SAFETY: page of a live guest map; writers stopped.
            assert!(unsafe { page_is(g.page_addr(p).unwrap(), model[i][p as usize]) }, "vm {} page {p}", i + 1);
            // Every still-shared frame holds what each mapper expects.
            let frame = g.frame_of(p).unwrap();
            for (vm, q) in mgr.frame_mappers(frame) {
                let j = vms.iter().position(|&(v, _)| v == vm).unwrap();
                assert_eq!(model[j][q as usize], model[i][p as usize], "frame {frame} shared by different contents");
                assert_eq!(vms[j].1, vms[i].1, "frame {frame} shared across domains");
            }
        }
    }
    let m = &during.merge;
    eprintln!(
        "{mode:?}: {} writes, {} full scans, {} merges in {} runs, {} cow copies, {} reuses, {} zero, faults {}",
        writes.load(Ordering::Relaxed),
        m.full_scans,
        m.merges,
        m.merge_runs,
        during.counters.cow_copies,
        during.counters.cow_reuses,
        m.zero_pages,
        during.uffd_faults
    );
    assert!(m.full_scans > 5 && m.merges > 100, "the merger did work: {m:#?}");
    assert_eq!(m.cross_domain_refusals, 0);
    assert!(during.counters.cow_copies + during.counters.cow_reuses > 0);
}

#[test]
fn writers_and_full_speed_merger_lose_nothing_checksum() {
    run(ChangeDetection::Checksum);
}

#[test]
fn writers_and_full_speed_merger_lose_nothing_dirty_log() {
    run(ChangeDetection::DirtyLog);
}
