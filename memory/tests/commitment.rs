//! Memory commitment (issue 15, finding 1, scaled down): a VM is admitted on
//! committed guest memory, not on free frames (which merging inflates); with an
//! explicit overcommit, a copy-on-write that finds no free frame marks the VM
//! out of memory, tells its handler once, keeps its writers blocked (no fault
//! storm), and the writers finish with every page intact once room is made;
//! unmerge-all without room is refused naming the frames missing.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use memory::manager::{CommitError, CommitPolicy, Error, OutOfMemoryHandler};
use memory::{GuestMap, MemoryManager, VmId, PAGE_SIZE};

/// Pool of the tests: 8 MiB (2048 frames); each VM is half of it.
const POOL_MIB: u64 = 8;
const VM_BYTES: u64 = 4 << 20;
const VM_PAGES: u32 = (VM_BYTES / PAGE_SIZE as u64) as u32;
/// Merge domain of the two identical VMs.
const DOMAIN: u32 = 7;

/// Content of page `p` of the identical VMs before the test writes.
fn original(p: u32) -> u64 {
    0x0C0_0000 + u64::from(p)
}

/// Content a writer gives page `p` of VM 1.
fn written(p: u32) -> u64 {
    0x0DD_0000 + u64::from(p)
}

/// VMs 1 and 2, identical, in one domain, every page merged: half the pool's
/// frames are free afterwards while all of it is committed.
fn two_merged_vms(mgr: &Arc<MemoryManager>) -> (GuestMap, GuestMap) {
    let a = mgr.create_guest(1, VM_BYTES).unwrap();
    let b = mgr.create_guest(2, VM_BYTES).unwrap();
    mgr.set_merge(1, false, DOMAIN).unwrap();
    mgr.set_merge(2, false, DOMAIN).unwrap();
    for p in 0..VM_PAGES {
        // SAFETY: pages of guest maps this test keeps alive; no other thread writes them.
        unsafe {
            fill_page(a.page_addr(p).unwrap(), original(p));
            fill_page(b.page_addr(p).unwrap(), original(p));
        }
        mgr.merge_pages((1, p), (2, p)).unwrap();
    }
    let s = mgr.stats();
    assert_eq!(s.frames_shared, u64::from(VM_PAGES));
    assert_eq!(s.frames_free, u64::from(VM_PAGES), "merging freed half the pool");
    assert_eq!(s.committed_bytes, 2 * VM_BYTES, "merging frees frames, not commitment");
    (a, b)
}

#[test]
fn a_vm_of_the_frames_merging_freed_is_refused() {
    let test = "a_vm_of_the_frames_merging_freed_is_refused";
    let Some(mgr) = manager_or_skip(test, POOL_MIB) else {
        return;
    };
    let _w = Watchdog::new(test, 60);
    let (_a, b) = two_merged_vms(&mgr);
    let s = mgr.stats();
    assert_eq!(s.commit_limit_bytes, POOL_MIB << 20);
    assert_eq!(s.host().committed_bytes, 2 * VM_BYTES);
    assert_eq!(s.host().commit_limit_bytes, POOL_MIB << 20);
    // Free frames would fit a third VM: commitment does not.
    for size in [VM_BYTES, PAGE_SIZE as u64] {
        match mgr.create_guest(3, size) {
            Err(Error::Commit(e @ CommitError::Overcommitted { .. })) => {
                let msg = e.to_string();
                assert!(msg.contains("8 MiB committed") && msg.contains("8 MiB limit"), "{msg}");
            }
            Err(e) => panic!("refused for the wrong reason: {e}"),
            Ok(_) => panic!("a VM of {size} bytes was admitted into a fully committed pool"),
        }
    }
    assert_eq!(mgr.stats().committed_bytes, 2 * VM_BYTES, "a refusal commits nothing");
    // Destroying a VM gives its commitment back.
    drop(b);
    let c = mgr.create_guest(3, VM_BYTES).unwrap();
    assert_eq!(mgr.stats().committed_bytes, 2 * VM_BYTES);
    drop(c);
    // Without overcommit every copy-on-write found a frame.
    assert_eq!(mgr.stats().counters.cow_no_frame, 0);
}

#[test]
fn overcommit_keeps_the_cow_reserve() {
    let test = "overcommit_keeps_the_cow_reserve";
    let Some(mgr) = manager_or_skip(test, POOL_MIB) else {
        return;
    };
    let _w = Watchdog::new(test, 60);
    for ratio in [0.5, f64::NAN, 100.0] {
        let bad = CommitPolicy { overcommit_ratio: ratio, cow_reserve_frames: 0 };
        assert!(matches!(mgr.set_commit_policy(bad), Err(Error::Commit(CommitError::BadRatio(_)))));
    }
    let (a, _b) = two_merged_vms(&mgr);
    mgr.set_commit_policy(CommitPolicy { overcommit_ratio: 2.0, cow_reserve_frames: 256 }).unwrap();
    assert_eq!(mgr.stats().commit_limit_bytes, 2 * (POOL_MIB << 20));
    match mgr.create_guest(3, VM_BYTES) {
        Err(Error::Commit(CommitError::Reserve { free: 1024, needed: 1024, reserve: 256 })) => {}
        other => panic!("expected a reserve refusal, got {:?}", other.map(|g| g.size())),
    }
    let c = mgr.create_guest(3, VM_BYTES - 256 * PAGE_SIZE as u64).unwrap();
    assert_eq!(mgr.stats().frames_free, 256);
    // The reserve is there for copies-on-write: 256 of them succeed.
    for p in 0..256 {
        fill_page_from_thread(a.page_addr(p).unwrap(), written(p));
    }
    let s = mgr.stats();
    assert_eq!((s.counters.cow_copies, s.counters.cow_no_frame, s.frames_free), (256, 0, 0));
    drop(c);
}

/// Records the out-of-memory reports of the VMs it is registered for.
#[derive(Default)]
struct Reports(Mutex<Vec<(VmId, String)>>);

struct Handler(Arc<Reports>);

impl OutOfMemoryHandler for Handler {
    fn out_of_memory(&self, vm: VmId, reason: &str) {
        self.0 .0.lock().unwrap().push((vm, reason.to_string()));
    }
}

/// Waits up to 20 s for `cond`.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn cow_without_a_frame_holds_the_writers_until_room_is_made() {
    let test = "cow_without_a_frame_holds_the_writers_until_room_is_made";
    let Some(mgr) = manager_or_skip(test, POOL_MIB) else {
        return;
    };
    let _w = Watchdog::new(test, 120);
    let (a, b) = two_merged_vms(&mgr);
    // Overcommit without reserve: a third VM takes every frame merging freed.
    mgr.set_commit_policy(CommitPolicy { overcommit_ratio: 2.0, cow_reserve_frames: 0 }).unwrap();
    let c = mgr.create_guest(3, VM_BYTES).unwrap();
    assert_eq!(mgr.stats().frames_free, 0);
    let reports = Arc::new(Reports::default());
    mgr.set_out_of_memory_handler(1, Box::new(Handler(reports.clone()))).unwrap();
    assert!(!mgr.is_out_of_memory(1));

    // Four writers, each rewriting its own quarter of VM 1's (merged) pages.
    const WRITERS: u32 = 4;
    let done = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let addr = a.host_addr();
            let done = done.clone();
            std::thread::spawn(move || {
                for p in (w..VM_PAGES).step_by(WRITERS as usize) {
                    // SAFETY: VM 1's guest map outlives the join below; each page has one writer.
                    unsafe { fill_page(addr + p as usize * PAGE_SIZE, written(p)) };
                }
                done.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();

    wait_for("the VM to be marked out of memory", || mgr.is_out_of_memory(1));
    // Every writer ends up blocked on its first page; none spins.
    wait_for("every writer to be held", || mgr.stats().uffd_held_writers >= u64::from(WRITERS));
    let before = mgr.stats();
    std::thread::sleep(Duration::from_millis(500));
    let after = mgr.stats();
    assert_eq!(done.load(Ordering::SeqCst), 0, "a writer finished without a frame");
    assert_eq!(after.uffd_faults, before.uffd_faults, "held writers kept faulting");
    assert!(after.uffd_faults <= 4 * u64::from(WRITERS), "fault storm: {} faults", after.uffd_faults);
    assert_eq!(after.counters.cow_no_frame, before.counters.cow_no_frame);
    assert!(after.counters.cow_no_frame >= u64::from(WRITERS));
    assert_eq!(after.host().cow_no_frame, after.counters.cow_no_frame);
    assert_eq!(after.vms_out_of_memory, 1);
    assert_eq!(after.counters.fault_errors, 0, "no frame is not a fault error to retry");
    {
        let r = reports.0.lock().unwrap();
        assert_eq!(r.len(), 1, "the handler is told once per VM: {r:?}");
        assert_eq!(r[0].0, 1);
        assert!(r[0].1.contains("out of memory"), "{}", r[0].1);
    }

    // Unmerging needs a frame per merged page: refused, naming what is missing.
    match mgr.unmerge_all() {
        Err(Error::Commit(CommitError::NoRoomToUnmerge { needed, free, missing })) => {
            assert_eq!((free, missing), (0, needed));
            assert!(needed > 0 && needed <= u64::from(VM_PAGES));
        }
        other => panic!("expected a refusal for lack of frames, got {other:?}"),
    }

    // Room made: the VM's writers are retried and finish.
    drop(c);
    assert!(mgr.retry_out_of_memory(1).unwrap());
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), u64::from(WRITERS));
    assert!(!mgr.is_out_of_memory(1));
    assert_eq!(reports.0.lock().unwrap().len(), 1);
    for p in 0..VM_PAGES {
        assert!(page_holds(a.page_addr(p).unwrap(), written(p)), "VM 1 page {p}");
        assert!(page_holds(b.page_addr(p).unwrap(), original(p)), "VM 2 page {p}");
    }
    let s = mgr.stats();
    assert_eq!((s.frames_shared, s.counters.fault_errors, s.vms_out_of_memory), (0, 0, 0));
    assert_eq!(s.counters.cow_copies, u64::from(VM_PAGES), "every page of VM 1 got its own copy");
}

/// Whether every word of the page at `addr` holds `value`.
fn page_holds(addr: usize, value: u64) -> bool {
    // SAFETY: `addr` is a page of a live guest map (kept alive by the test).
    unsafe { page_is(addr, value) }
}

/// Merged zero pages map the pool's zero region and give their frames back,
/// so unmerging them needs a frame each: with those frames taken by an
/// overcommitted VM, unmerge-all is refused up front naming them.
#[test]
fn unmerge_all_counts_the_frames_merged_zero_pages_need() {
    let test = "unmerge_all_counts_the_frames_merged_zero_pages_need";
    let Some(mgr) = manager_or_skip(test, POOL_MIB) else {
        return;
    };
    let _w = Watchdog::new(test, 120);
    let a = mgr.create_guest(1, VM_BYTES).unwrap();
    for p in 0..VM_PAGES {
        // SAFETY: a page of a guest map this test keeps alive; no other thread writes it.
        unsafe { fill_page(a.page_addr(p).unwrap(), 0) };
    }
    mgr.set_merge(1, true, DOMAIN).unwrap();
    let t = memory::Tunables { merge_zero_pages: true, ..memory::Tunables::full_speed() };
    mgr.merger().set_tunables(t).unwrap();
    wait_for("every page to be merged as a zero page", || mgr.stats().zero_pages == u64::from(VM_PAGES));
    mgr.merger().set_run(false);
    let free = mgr.stats().frames_free;
    assert!(free >= 2 * u64::from(VM_PAGES) - 8, "zero pages kept their frames: {free} free");
    mgr.set_commit_policy(CommitPolicy { overcommit_ratio: 2.0, cow_reserve_frames: 0 }).unwrap();
    let c = mgr.create_guest(2, free * PAGE_SIZE as u64).unwrap();
    assert_eq!(mgr.stats().frames_free, 0);
    match mgr.unmerge_all() {
        Err(Error::Commit(CommitError::NoRoomToUnmerge { needed, free, missing })) => {
            assert_eq!((needed, free, missing), (u64::from(VM_PAGES), 0, u64::from(VM_PAGES)));
        }
        other => panic!("expected a refusal naming the zero pages' frames, got {other:?}"),
    }
    drop(c);
    assert!(mgr.unmerge_all().is_ok());
    for p in 0..VM_PAGES {
        assert!(page_holds(a.page_addr(p).unwrap(), 0), "page {p}");
    }
}
