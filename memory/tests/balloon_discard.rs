//! The balloon's batched discard (`MemoryManager::discard_range`) against the
//! real kernel: host memory falls by the discarded amount, discarded pages read
//! zero and their next write is seen, shared frames lose one reference, and
//! writers on the VM's other pages running meanwhile lose nothing.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use memory::manager::{Error, DISCARD_BATCH};
use memory::{PageFlags, PAGE_SIZE};

#[test]
fn discard_range_with_concurrent_writers() {
    let Some(mgr) = manager_or_skip("discard_range_with_concurrent_writers", 64) else {
        return;
    };
    let _w = Watchdog::new("discard_range_with_concurrent_writers", 120);
    // 16 MiB: the first half is discarded (more than one batch), the second
    // half is written by other threads all along.
    let guest = mgr.create_guest(1, 16 << 20).unwrap();
    let pages = guest.pages();
    let half = pages / 2;
    assert!(half > 2 * DISCARD_BATCH);
    for p in 0..pages {
        // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
        unsafe { fill_page(guest.page_addr(p).unwrap(), u64::from(p) + 1) };
    }
    // Pages 10 and 11 share a frame inside the range; 12 shares with a page
    // outside it (which must keep its content).
    // SAFETY: as above.
    unsafe {
        fill_page(guest.page_addr(11).unwrap(), 11);
        fill_page(guest.page_addr(10).unwrap(), 11);
        fill_page(guest.page_addr(12).unwrap(), 7777);
        fill_page(guest.page_addr(pages - 1).unwrap(), 7777);
    }
    assert!(matches!(mgr.merge_pages((1, 10), (1, 11)).unwrap(), memory::manager::MergeOutcome::Merged { .. }));
    assert!(matches!(mgr.merge_pages((1, 12), (1, pages - 1)).unwrap(), memory::manager::MergeOutcome::Merged { .. }));
    let before = mgr.stats().host_bytes;

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u32)
        .map(|w| {
            let stop = stop.clone();
            let base = guest.page_addr(0).unwrap();
            std::thread::spawn(move || {
                // Each writer owns every other page of the second half (but the last one, shared).
                let mine: Vec<u32> = (half..pages - 1).filter(|p| p % 2 == w).collect();
                let mut round = 0u64;
                while !stop.load(Ordering::Acquire) {
                    round += 1;
                    for &p in &mine {
                        // SAFETY: the test keeps the GuestMap alive until the writers are joined; each page has one writer.
                        unsafe { fill_page(base + p as usize * PAGE_SIZE, (round << 32) | u64::from(p)) };
                    }
                }
                round
            })
        })
        .collect();

    let report = mgr.discard_range(1, 0, half).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    stop.store(true, Ordering::Release);
    let rounds: Vec<u64> = writers.into_iter().map(|h| h.join().unwrap()).collect();

    assert_eq!(report.pages, u64::from(half));
    assert_eq!(report.unshared, 2, "pages 10 and 12 left shared frames");
    // Page 11 was the last mapper of the frame it shared with 10 by then: private, backed.
    assert_eq!(report.backed, u64::from(half) - 2);
    let after = mgr.stats().host_bytes;
    // The range held half - 2 frames of its own (10 and 11 shared one, 12
    // shares the last page's, which stays): all punched, and the fresh frames
    // of 10 and 12 cost nothing.
    let freed = (u64::from(half) - 2) * PAGE_SIZE as u64;
    assert_eq!(before - after, freed, "host bytes {before} -> {after}");
    assert_eq!(mgr.stats().counters.discards, u64::from(half));

    let mut mismatches = 0u64;
    for p in 0..half {
        assert!(mgr.page_flags(1, p).unwrap().contains(PageFlags::ZERO.with(PageFlags::PROTECTED)), "page {p}");
        // SAFETY: the page belongs to a guest map this test keeps alive (reads are always allowed).
        if !unsafe { page_is(guest.page_addr(p).unwrap(), 0) } {
            mismatches += 1;
        }
    }
    for p in half..pages - 1 {
        let round = rounds[(p % 2) as usize];
        // SAFETY: as above; the writers are joined.
        let ok = unsafe { page_is(guest.page_addr(p).unwrap(), (round << 32) | u64::from(p)) };
        if !ok {
            mismatches += 1;
        }
    }
    // SAFETY: as above.
    if !unsafe { page_is(guest.page_addr(pages - 1).unwrap(), 7777) } {
        mismatches += 1;
    }
    assert_eq!(mismatches, 0);

    // The next write to a discarded page is seen.
    for p in [0, 10, 11, 12, half - 1] {
        fill_page_from_thread(guest.page_addr(p).unwrap(), 0xbeef + u64::from(p));
    }
    for p in 0..half {
        let want = if [0, 10, 11, 12, half - 1].contains(&p) { 0xbeef + u64::from(p) } else { 0 };
        // SAFETY: as above.
        assert!(unsafe { page_is(guest.page_addr(p).unwrap(), want) }, "page {p}");
    }
    // (Reading a punched shmem page allocates it again, so the reads above
    // re-backed the range: host bytes are not checked past this point.)
}

/// The pages being discarded are not write-protected before their run is
/// mapped onto the zero region: a writer storing into them all along loses
/// only what it wrote before the discard, every write after `discard_range`
/// returned is seen, and no write reaches the zero region (the discarded
/// pages nobody writes, which map the same zero frames, still read zero).
#[test]
fn discard_range_while_its_pages_are_written() {
    let Some(mgr) = manager_or_skip("discard_range_while_its_pages_are_written", 64) else {
        return;
    };
    let _w = Watchdog::new("discard_range_while_its_pages_are_written", 120);
    let guest = mgr.create_guest(1, 16 << 20).unwrap();
    let pages = guest.pages();
    let half = pages / 2;
    assert!(half >= 2 * DISCARD_BATCH, "the written pages cover every zero frame");
    for p in 0..pages {
        // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
        unsafe { fill_page(guest.page_addr(p).unwrap(), u64::from(p) + 1) };
    }
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let done = done.clone();
        let base = guest.page_addr(0).unwrap();
        std::thread::spawn(move || {
            // Rounds over pages 0..half until one that started after the discard returned.
            let mut round = 0u64;
            loop {
                round += 1;
                let after = done.load(Ordering::Acquire);
                for p in 0..half {
                    // SAFETY: the test keeps the GuestMap alive until the writer is joined; it is the only writer.
                    unsafe { fill_page(base + p as usize * PAGE_SIZE, (round << 32) | u64::from(p)) };
                }
                if after {
                    return round;
                }
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(5));
    let report = mgr.discard_range(1, 0, pages).unwrap();
    done.store(true, Ordering::Release);
    let last = writer.join().unwrap();
    assert_eq!(report.pages, u64::from(pages));

    let mut mismatches = Vec::new();
    for p in 0..pages {
        let want = if p < half { (last << 32) | u64::from(p) } else { 0 };
        // SAFETY: the page belongs to a guest map this test keeps alive; the writer is joined.
        if !unsafe { page_is(guest.page_addr(p).unwrap(), want) } {
            mismatches.push(p);
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} pages differ, first {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(8)]
    );
    for p in half..pages {
        assert!(mgr.is_zero_region_frame(mgr.frame_of(1, p).unwrap()), "page {p} still on the zero region");
    }
}

#[test]
fn discard_range_checks_the_range_first() {
    let Some(mgr) = manager_or_skip("discard_range_checks_the_range_first", 16) else {
        return;
    };
    let _w = Watchdog::new("discard_range_checks_the_range_first", 60);
    let guest = mgr.create_guest(1, 1 << 20).unwrap();
    let pages = guest.pages();
    for p in 0..pages {
        // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
        unsafe { fill_page(guest.page_addr(p).unwrap(), 3) };
    }
    let before = mgr.stats().host_bytes;
    assert!(matches!(mgr.discard_range(1, pages - 1, 2), Err(Error::OutOfRange(1, _))));
    assert!(matches!(mgr.discard_range(1, u32::MAX, 2), Err(Error::OutOfRange(1, _))));
    assert!(matches!(mgr.discard_range(2, 0, 1), Err(Error::UnknownVm(2))));
    assert_eq!(mgr.stats().host_bytes, before, "nothing discarded");
    // SAFETY: the page belongs to a guest map this test keeps alive (reads are always allowed).
    assert!(unsafe { page_is(guest.page_addr(pages - 1).unwrap(), 3) });
    // Empty and repeated ranges are fine; a discarded page is not backed twice.
    assert_eq!(mgr.discard_range(1, 0, 0).unwrap().pages, 0);
    assert_eq!(mgr.discard_range(1, 0, 4).unwrap().backed, 4);
    assert_eq!(mgr.discard_range(1, 0, 4).unwrap().backed, 0);
    assert_eq!(mgr.stats().host_bytes, before - 4 * PAGE_SIZE as u64);
}

/// Host time of discarding 256 MiB with `discard_range` against a loop of
/// per-page `discard`, interleaved (run with `--ignored --nocapture`).
#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn discard_range_against_per_page_discard() {
    let Some(mgr) = manager_or_skip("discard_range_against_per_page_discard", 1024) else {
        return;
    };
    let pages = (256u32 << 20) / PAGE_SIZE as u32;
    let (mut batched, mut single) = (Vec::new(), Vec::new());
    for rep in 0..6u32 {
        for batched_run in [true, false] {
            let guest = mgr.create_guest(1, u64::from(pages) * PAGE_SIZE as u64).unwrap();
            for p in 0..pages {
                // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
                unsafe { fill_page(guest.page_addr(p).unwrap(), u64::from(p) + u64::from(rep)) };
            }
            let t = std::time::Instant::now();
            if batched_run {
                mgr.discard_range(1, 0, pages).unwrap();
            } else {
                for p in 0..pages {
                    mgr.discard(1, p).unwrap();
                }
            }
            let secs = t.elapsed().as_secs_f64();
            assert_eq!(mgr.stats().host_bytes, 0);
            if rep > 0 {
                (if batched_run { &mut batched } else { &mut single }).push(secs);
            }
        }
    }
    for v in [&mut batched, &mut single] {
        v.sort_by(f64::total_cmp);
    }
    let show = |v: &[f64]| {
        format!("min {:.1} / median {:.1} / max {:.1} ms", v[0] * 1e3, v[v.len() / 2] * 1e3, v[v.len() - 1] * 1e3)
    };
    println!("discard 256 MiB ({pages} pages), 5 interleaved runs each after a warm-up:");
    println!("  discard_range: {} ({:.0} pages/s at the median)", show(&batched), f64::from(pages) / batched[2]);
    println!("  per-page discard: {}", show(&single));
    println!("  ratio per-page / batched (medians): {:.1}x", single[2] / batched[2]);
}
