//! Background reuse: a merged frame whose other mappers all left is made
//! writable in place by the fault handler's thread, so its last mapper's next
//! write does not fault; and, with writers storing into pages while their
//! sharers leave (copy-on-write, discard, unshare, VM destruction) and come
//! back (new merges between a page's queuing and its drain) and frames
//! migrate, no write is lost or lands in a shared frame.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use memory::{MemoryManager, PageFlags, VmId};

/// Waits until `cow_background_reuses` reaches `n` (the fault handler's thread
/// drains on its own); false after 10 s.
fn wait_background_reuses(mgr: &MemoryManager, n: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while mgr.stats_exact().counters.cow_background_reuses < n {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

#[test]
fn sole_mapper_is_made_writable_without_a_fault() {
    let name = "sole_mapper_is_made_writable_without_a_fault";
    let Some(mgr) = manager_or_skip(name, 64) else { return };
    let _w = Watchdog::new(name, 60);
    const N: u32 = 256;
    let bytes = u64::from(N) * 4096;
    let (a, b, c) =
        (mgr.create_guest(1, bytes).unwrap(), mgr.create_guest(2, bytes).unwrap(), mgr.create_guest(3, bytes).unwrap());
    for vm in 1..=3 {
        mgr.set_merge(vm, false, 7).unwrap();
    }
    for p in 0..N {
        for g in [&a, &b, &c] {
            // SAFETY: a page of a live guest map, written by no other thread now.
            unsafe { fill_page(g.page_addr(p).unwrap(), u64::from(p) + 1) };
        }
    }
    // Pages 0..N/2 of A share with B, pages N/2..N with C.
    for p in 0..N {
        let other = if p < N / 2 { 2 } else { 3 };
        mgr.merge_pages((1, p), (other, p)).unwrap();
    }
    let frames: Vec<u32> = (0..N).map(|p| a.frame_of(p).unwrap()).collect();
    // B's pages leave by copy-on-write (written from another thread: they fault).
    let b_addrs: Vec<usize> = (0..N / 2).map(|p| b.page_addr(p).unwrap()).collect();
    std::thread::spawn(move || {
        for (i, &addr) in b_addrs.iter().enumerate() {
            // SAFETY: pages of B, kept alive by the test until the join below.
            unsafe { fill_page(addr, 0xb000 + i as u64) };
        }
    })
    .join()
    .unwrap();
    // C's pages leave with C.
    drop(c);
    assert!(wait_background_reuses(&mgr, u64::from(N)), "{:#?}", mgr.stats_exact().counters);
    let s = mgr.stats_exact();
    assert_eq!(
        (s.counters.cow_copies, s.counters.cow_reuses, s.counters.cow_background_reuses),
        (u64::from(N / 2), 0, u64::from(N))
    );
    assert_eq!(mgr.background_reuse_pending(), 0);
    let vs = mgr.vm_merge_stats(1).unwrap();
    assert_eq!((vs.cow_copies, vs.cow_reuses, vs.cow_background_reuses), (0, 0, u64::from(N)));
    for p in 0..N {
        let flags = a.page_flags(p).unwrap();
        assert!(!flags.contains(PageFlags::PROTECTED) && !flags.contains(PageFlags::SHARED), "page {p}: {flags:?}");
        assert_eq!(a.frame_of(p).unwrap(), frames[p as usize], "page {p} reused in place");
    }
    // A's writes do not fault any more.
    let faults = s.uffd_faults;
    let a_addrs: Vec<usize> = (0..N).map(|p| a.page_addr(p).unwrap()).collect();
    std::thread::spawn(move || {
        for &addr in &a_addrs {
            // SAFETY: pages of A, kept alive by the test until the join below.
            unsafe { fill_page(addr, 0xa000) };
        }
    })
    .join()
    .unwrap();
    assert_eq!(mgr.stats_exact().uffd_faults, faults, "writes to reused pages faulted");
    for p in 0..N {
        // SAFETY: pages of live guest maps, written by no other thread now.
        unsafe {
            assert!(page_is(a.page_addr(p).unwrap(), 0xa000));
            if p < N / 2 {
                assert!(page_is(b.page_addr(p).unwrap(), 0xb000 + u64::from(p)));
            }
        }
    }
}

const PAGES: u32 = 1024;
const A: VmId = 1;
const B: VmId = 2;
const C: VmId = 3;

/// The initial content of page `p` (of every VM).
fn tag(p: u32) -> u64 {
    0x7a00_0000 + u64::from(p)
}

/// Pages of A no writer touches: their sharers come and go (re-merged with C).
fn churned(p: u32) -> bool {
    p.is_multiple_of(4)
}

#[test]
fn concurrent_writers_while_sharers_leave() {
    let name = "concurrent_writers_while_sharers_leave";
    let Some(mgr) = manager_or_skip(name, 64) else { return };
    let _w = Watchdog::new(name, 300);
    let bytes = u64::from(PAGES) * 4096;
    let a = mgr.create_guest(A, bytes).unwrap();
    let b = mgr.create_guest(B, bytes).unwrap();
    let c = mgr.create_guest(C, bytes).unwrap();
    for vm in [A, B, C] {
        mgr.set_merge(vm, false, 9).unwrap();
    }
    for p in 0..PAGES {
        for g in [&a, &b, &c] {
            // SAFETY: a page of a live guest map, written by no other thread now.
            unsafe { fill_page(g.page_addr(p).unwrap(), tag(p)) };
        }
        mgr.merge_pages((A, p), (B, p)).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let last: Arc<Vec<AtomicU64>> = Arc::new((0..PAGES).map(|p| AtomicU64::new(tag(p))).collect());
    let a_base = a.page_addr(0).unwrap();
    let b_base = b.page_addr(0).unwrap();
    let c_base = c.page_addr(0).unwrap();
    let mut threads = Vec::new();
    // Two writers store into A's pages (each page has one writer), through the
    // guest view: a store to a protected page blocks in a write fault.
    for w in 0..2u64 {
        let (stop, last) = (stop.clone(), last.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9 + w);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let p = rng.below(u64::from(PAGES)) as u32;
                if churned(p) || u64::from(p % 2) != w {
                    continue;
                }
                n += 1;
                let value = (w + 1) << 40 | n;
                // SAFETY: a page of A, kept alive until the threads are joined.
                unsafe { fill_page(a_base + p as usize * 4096, value) };
                last[p as usize].store(value, Ordering::Relaxed);
            }
            n
        }));
    }
    // B's pages leave: written (copy-on-write), discarded, unshared.
    let b_final: Arc<Vec<AtomicU64>> = Arc::new((0..PAGES).map(|p| AtomicU64::new(tag(p))).collect());
    {
        let (stop, mgr, b_final) = (stop.clone(), mgr.clone(), b_final.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0x51ed_2701);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let p = rng.below(u64::from(PAGES)) as u32;
                match rng.below(8) {
                    0..=4 => {
                        let value = 0xb << 40 | u64::from(p);
                        // SAFETY: a page of B, kept alive until the threads are joined.
                        unsafe { fill_page(b_base + p as usize * 4096, value) };
                        b_final[p as usize].store(value, Ordering::Relaxed);
                    }
                    5 => {
                        mgr.discard(B, p).unwrap();
                        b_final[p as usize].store(0, Ordering::Relaxed);
                    }
                    _ => {
                        mgr.unshare(B, p).unwrap();
                    }
                }
                n += 1;
                if n.is_multiple_of(64) {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            n
        }));
    }
    // The churned pages of A get new sharers (C) and lose them again, so that
    // pages are often re-shared between their queuing and their drain.
    {
        let (stop, mgr) = (stop.clone(), mgr.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0xc0ff_ee11);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let p = 4 * rng.below(u64::from(PAGES / 4)) as u32;
                mgr.merge_pages((A, p), (C, p)).unwrap();
                if rng.below(2) == 0 {
                    mgr.unshare(C, p).unwrap();
                } else {
                    // SAFETY: a page of C, kept alive until the threads are joined;
                    // the same content: C's page leaves by copy-on-write.
                    unsafe { fill_page(c_base + p as usize * 4096, tag(p)) };
                }
                n += 1;
            }
            n
        }));
    }
    // Frames of all three VMs migrate meanwhile.
    {
        let (stop, mgr) = (stop.clone(), mgr.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0xa11c_e5ed);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let vm = [A, B, C][rng.below(3) as usize];
                let p = rng.below(u64::from(PAGES)) as u32;
                if let Ok(frame) = mgr.frame_of(vm, p) {
                    // A frame freed or moved since the look-up is refused: fine.
                    n += u64::from(mgr.migrate(frame).is_ok());
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            n
        }));
    }
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let counts: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    // B's pages hold what was written last.
    for p in 0..PAGES {
        // SAFETY: a page of a live guest map, written by no thread now.
        let ok = unsafe { page_is(b.page_addr(p).unwrap(), b_final[p as usize].load(Ordering::Relaxed)) };
        assert!(ok, "B page {p}");
    }
    // The remaining sharers leave with B.
    drop(b);
    mgr.drain_background_reuse();
    let s = mgr.stats_exact();
    let mut sole_merged = 0;
    for p in 0..PAGES {
        let want = last[p as usize].load(Ordering::Relaxed);
        // SAFETY: pages of live guest maps, written by no thread now.
        unsafe {
            assert!(page_is(a.page_addr(p).unwrap(), want), "A page {p}: lost write (want {want:#x})");
            assert!(page_is(c.page_addr(p).unwrap(), tag(p)), "C page {p}");
        }
        for (vm, g) in [(A, &a), (C, &c)] {
            let frame = g.frame_of(p).unwrap();
            let flags = g.page_flags(p).unwrap();
            let refs = mgr.frame_refs(frame);
            if refs > 1 {
                assert!(flags.contains(PageFlags::SHARED.with(PageFlags::PROTECTED)), "VM {vm} page {p}: {flags:?}");
            } else if flags.contains(PageFlags::SHARED) {
                sole_merged += 1;
            }
        }
    }
    eprintln!(
        "writes: A {} + {}, B ops {}, C churn {}, migrations {}; cow_copies {} cow_reuses {} cow_background_reuses {} spurious_faults {} uffd_faults {}",
        counts[0],
        counts[1],
        counts[2],
        counts[3],
        counts[4],
        s.counters.cow_copies,
        s.counters.cow_reuses,
        s.counters.cow_background_reuses,
        s.counters.spurious_faults,
        s.uffd_faults
    );
    assert_eq!(sole_merged, 0, "sole-mapped merged pages left after the drain");
    assert_eq!(mgr.background_reuse_pending(), 0);
    assert!(s.counters.cow_background_reuses > 0);
    assert_eq!((s.counters.fault_errors, s.counters.remap_errors), (0, 0));
}
