//! The balloon's batched discard (`MemoryManager::discard_range`) against the
//! real kernel: host memory falls by the discarded amount, discarded pages read
//! zero and their next write is seen, shared frames lose one reference, and
//! writers on the VM's other pages running meanwhile lose nothing.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use memory::manager::{Error, DISCARD_BATCH, ZERO_REGION_MIN_RUN};
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

/// Which path each page of a discard takes (`ZERO_REGION_MIN_RUN`): a private
/// page in a run shorter than the minimum (runs are split by pages already on
/// the zero region) is discarded in place, keeping its own frame, punched,
/// with no new mapping; every other page goes to the zero region; the report
/// and the counters say exactly how many took the in-place path.
#[test]
fn short_runs_are_discarded_in_place() {
    let Some(mgr) = manager_or_skip("short_runs_are_discarded_in_place", 16) else {
        return;
    };
    let _w = Watchdog::new("short_runs_are_discarded_in_place", 60);
    assert_eq!(ZERO_REGION_MIN_RUN, 4, "the cases below are written for 4");
    let guest = mgr.create_guest(1, 4 << 20).unwrap();
    let pages = guest.pages();
    for p in 0..pages {
        // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
        unsafe { fill_page(guest.page_addr(p).unwrap(), u64::from(p) + 1) };
    }
    // Page 400 shares its frame with page 900 (outside every discard).
    // SAFETY: as above.
    unsafe {
        fill_page(guest.page_addr(400).unwrap(), 4242);
        fill_page(guest.page_addr(900).unwrap(), 4242);
    }
    assert!(matches!(mgr.merge_pages((1, 400), (1, 900)).unwrap(), memory::manager::MergeOutcome::Merged { .. }));
    let (host0, used0, in_place0) = (mgr.stats().host_bytes, mgr.stats().frames_used, in_place_count(&mgr));
    let (lo, hi) = (guest.page_addr(0).unwrap(), guest.page_addr(0).unwrap() + pages as usize * PAGE_SIZE);
    let maps0 = maps_in_range(lo, hi);

    // Isolated pages and runs of 2 and 3: in place, no new mapping.
    let a = mgr.discard_range(1, 100, 1).unwrap();
    let b = mgr.discard_range(1, 200, 3).unwrap();
    let c = mgr.discard_range(1, 250, 2).unwrap();
    assert_eq!((a.in_place, b.in_place, c.in_place), (1, 3, 2));
    assert_eq!((a.backed, b.backed, c.backed), (1, 3, 2));
    assert_eq!(maps_in_range(lo, hi), maps0, "discarding in place maps nothing");
    // A run of 4: the zero region.
    let d = mgr.discard_range(1, 300, 4).unwrap();
    assert_eq!((d.in_place, d.backed), (0, 4));
    // A short run holding a shared page: the shared page goes to the zero
    // region (it needs a new mapping either way), the private one stays.
    let e = mgr.discard_range(1, 400, 2).unwrap();
    assert_eq!((e.in_place, e.unshared, e.backed), (1, 1, 1));
    // 600..604 on the zero region first; then 598..607 is two short runs
    // (598, 599 and 604..607) around them.
    mgr.discard_range(1, 600, 4).unwrap();
    let f = mgr.discard_range(1, 598, 9).unwrap();
    assert_eq!((f.pages, f.in_place, f.backed), (9, 5, 5));

    let in_place: Vec<u32> = [100, 200, 201, 202, 250, 251, 401, 598, 599, 604, 605, 606].into();
    let zero_region: Vec<u32> = [300, 301, 302, 303, 400, 600, 601, 602, 603].into();
    for &p in &in_place {
        let frame = mgr.frame_of(1, p).unwrap();
        assert!(!mgr.is_zero_region_frame(frame), "page {p} in place");
        assert_eq!(mgr.frame_refs(frame), 1, "page {p} keeps its own frame");
        assert!(mgr.page_flags(1, p).unwrap().contains(PageFlags::ZERO.with(PageFlags::PROTECTED)), "page {p}");
    }
    for &p in &zero_region {
        assert!(mgr.is_zero_region_frame(mgr.frame_of(1, p).unwrap()), "page {p} on the zero region");
        assert!(mgr.page_flags(1, p).unwrap().contains(PageFlags::ZERO.with(PageFlags::PROTECTED)), "page {p}");
    }
    let s = mgr.stats();
    assert_eq!(s.counters.discards_in_place - in_place0, in_place.len() as u64);
    // Every private page's memory went back; the in-place pages keep their frames
    // (the zero-region pages' frames were freed, the shared one lost a mapper).
    assert_eq!(host0 - s.host_bytes, (in_place.len() + zero_region.len() - 1) as u64 * PAGE_SIZE as u64);
    assert_eq!(used0 - s.frames_used, (zero_region.len() - 1) as u64);
    for p in 0..pages {
        let want = match p {
            _ if in_place.contains(&p) || zero_region.contains(&p) => 0,
            900 => 4242,
            _ => u64::from(p) + 1,
        };
        // SAFETY: the page belongs to a guest map this test keeps alive (reads are always allowed).
        assert!(unsafe { page_is(guest.page_addr(p).unwrap(), want) }, "page {p}");
    }
    // The next write to a page discarded in place faults once and is seen.
    let faults = mgr.stats().counters.zero_page_faults;
    fill_page_from_thread(guest.page_addr(201).unwrap(), 0xfeed);
    // SAFETY: as above.
    assert!(unsafe { page_is(guest.page_addr(201).unwrap(), 0xfeed) });
    assert_eq!(mgr.stats().counters.zero_page_faults, faults + 1);
    assert!(!mgr.page_flags(1, 201).unwrap().contains(PageFlags::ZERO));
}

fn in_place_count(mgr: &memory::MemoryManager) -> u64 {
    mgr.stats().counters.discards_in_place
}

/// Scattered discards (both paths) while writers hammer every page: each of
/// `WRITERS` threads owns every `WRITERS`-th page of a stretch (so the
/// neighbours of a page it discards in place are written by the others all
/// along) and a block of its own where it discards runs of 1..12 pages (in
/// place and onto the zero region, next to each other); it checks every page
/// it reads against its model. At the end every page is checked, a page
/// flagged `ZERO` reads zero, and the counters add up.
#[test]
fn scattered_discards_with_concurrent_writers() {
    const WRITERS: u32 = 4;
    const SPREAD: u32 = 1024;
    const BLOCK: u32 = 256;
    let secs = std::env::var("DENSEVM_TORTURE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3u64);
    let Some(mgr) = manager_or_skip("scattered_discards_with_concurrent_writers", 32) else {
        return;
    };
    let _w = Watchdog::new("scattered_discards_with_concurrent_writers", secs + 120);
    let total = SPREAD + WRITERS * BLOCK;
    let guest = Arc::new(mgr.create_guest(1, u64::from(total) * PAGE_SIZE as u64).unwrap());
    let (discards0, in_place0) = (mgr.stats().counters.discards, in_place_count(&mgr));
    let workers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (g, mgr) = (guest.clone(), mgr.clone());
            std::thread::spawn(move || {
                let mine: Vec<u32> = (0..SPREAD)
                    .filter(|p| p % WRITERS == w)
                    .chain(SPREAD + w * BLOCK..SPREAD + (w + 1) * BLOCK)
                    .collect();
                let mut model = std::collections::HashMap::<u32, u64>::new();
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (u64::from(w + 1) << 40));
                let (mut ops, mut discarded, mut bad) = (0u64, 0u64, Vec::new());
                let start = std::time::Instant::now();
                while start.elapsed() < std::time::Duration::from_secs(secs) {
                    ops += 1;
                    let p = mine[rng.below(mine.len() as u64) as usize];
                    let want = model.get(&p).copied().unwrap_or(0);
                    // SAFETY: the page belongs to the live guest map `g`; this thread alone writes it.
                    if !unsafe { page_is(g.page_addr(p).unwrap(), want) } {
                        bad.push(format!("page {p} does not hold {want:#x}"));
                    }
                    match rng.below(100) {
                        0..=59 => {
                            let v = (u64::from(w + 1) << 56) | (ops << 16) | u64::from(p);
                            // SAFETY: as above.
                            unsafe { fill_page(g.page_addr(p).unwrap(), v) };
                            model.insert(p, v);
                        }
                        60..=84 if p < SPREAD => {
                            mgr.discard_range(1, p, 1).unwrap();
                            model.insert(p, 0);
                            discarded += 1;
                        }
                        _ if p >= SPREAD => {
                            let end = SPREAD + (w + 1) * BLOCK;
                            let len = (1 + rng.below(12) as u32).min(end - p);
                            mgr.discard_range(1, p, len).unwrap();
                            (p..p + len).for_each(|q| {
                                model.insert(q, 0);
                            });
                            discarded += u64::from(len);
                        }
                        _ => {}
                    }
                }
                (model, bad, ops, discarded)
            })
        })
        .collect();
    let mut model = std::collections::HashMap::new();
    let (mut failures, mut ops, mut discarded) = (Vec::new(), 0, 0);
    for h in workers {
        let (m, bad, n, d) = h.join().unwrap();
        model.extend(m);
        failures.extend(bad);
        ops += n;
        discarded += d;
    }
    assert!(failures.is_empty(), "{} mismatches, first: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    let (mut zero_flagged, mut on_zero_region) = (0, 0);
    for p in 0..total {
        let want = model.get(&p).copied().unwrap_or(0);
        let addr = guest.page_addr(p).unwrap();
        // SAFETY: the page belongs to a guest map this test keeps alive; the writers are joined.
        assert!(unsafe { page_is(addr, want) }, "page {p} does not hold {want:#x}");
        if mgr.page_flags(1, p).unwrap().contains(PageFlags::ZERO) {
            zero_flagged += 1;
            assert_eq!(want, 0, "page {p} flagged ZERO");
        }
        if mgr.is_zero_region_frame(mgr.frame_of(1, p).unwrap()) {
            on_zero_region += 1;
            assert_eq!(want, 0, "page {p} on the zero region");
        }
    }
    let s = mgr.stats();
    print_line(&format!(
        "scattered discards: {ops} ops in {secs} s, {discarded} pages discarded ({} in place), \
         {zero_flagged} pages flagged zero at the end ({on_zero_region} on the zero region), 0 mismatches",
        s.counters.discards_in_place - in_place0
    ));
    assert_eq!(s.counters.discards - discards0, discarded);
    let in_place = s.counters.discards_in_place - in_place0;
    assert!(in_place > 0 && in_place < discarded, "both paths taken: {in_place} of {discarded} in place");
    assert!(on_zero_region > 0, "some pages on the zero region");
    assert_eq!(s.frames_used, u64::from(total) - on_zero_region, "{s:#?}");
}

/// Pages discarded in place are not write-protected before their frame is
/// punched: a writer storing into them all along loses only what it wrote
/// before their discard, every write after `discard_range` returned is seen,
/// a page flagged `ZERO` reads zero, and their untouched neighbours keep their
/// content.
#[test]
fn isolated_discards_while_their_pages_are_written() {
    let Some(mgr) = manager_or_skip("isolated_discards_while_their_pages_are_written", 32) else {
        return;
    };
    let _w = Watchdog::new("isolated_discards_while_their_pages_are_written", 120);
    let guest = mgr.create_guest(1, 8 << 20).unwrap();
    let pages = guest.pages();
    for p in 0..pages {
        // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
        unsafe { fill_page(guest.page_addr(p).unwrap(), u64::from(p) + 1) };
    }
    let in_place0 = in_place_count(&mgr);
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let done = done.clone();
        let base = guest.page_addr(0).unwrap();
        std::thread::spawn(move || {
            // Rounds over the even pages until one that started after the discards returned.
            let mut round = 0u64;
            loop {
                round += 1;
                let after = done.load(Ordering::Acquire);
                for p in (0..pages).step_by(2) {
                    // SAFETY: the test keeps the GuestMap alive until the writer is joined; it is the only writer.
                    unsafe { fill_page(base + p as usize * PAGE_SIZE, (round << 32) | u64::from(p)) };
                }
                if after {
                    return round;
                }
            }
        })
    };
    // The even pages, one isolated page per call, several times over.
    for _ in 0..4 {
        for p in (0..pages).step_by(2) {
            let r = mgr.discard_range(1, p, 1).unwrap();
            assert_eq!(r.in_place, 1, "page {p}");
        }
    }
    done.store(true, Ordering::Release);
    let last = writer.join().unwrap();
    assert_eq!(in_place_count(&mgr) - in_place0, 4 * u64::from(pages / 2));
    let mut mismatches = Vec::new();
    for p in 0..pages {
        let want = if p % 2 == 0 { (last << 32) | u64::from(p) } else { u64::from(p) + 1 };
        // SAFETY: the page belongs to a guest map this test keeps alive; the writer is joined.
        if !unsafe { page_is(guest.page_addr(p).unwrap(), want) } {
            mismatches.push(p);
        }
        assert!(!mgr.page_flags(1, p).unwrap().contains(PageFlags::ZERO), "page {p} written, flagged ZERO");
    }
    assert!(
        mismatches.is_empty(),
        "{} pages differ, first {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(8)]
    );
}
