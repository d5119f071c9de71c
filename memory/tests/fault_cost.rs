//! Measures what a write costs to a merged page: copy (frame shared by two
//! pages) versus reuse (only mapping of a merged frame), against a plain write.
//! Prints the numbers; asserts only that each path was taken.

mod common;

use std::time::Instant;

use common::*;
use memory::PAGE_SIZE;

const PAIRS: u32 = 1000;

fn timed_writes(addrs: Vec<usize>) -> f64 {
    std::thread::spawn(move || {
        let start = Instant::now();
        for &a in &addrs {
            // SAFETY: pages of a live guest map (the test joins before dropping it).
            unsafe { std::ptr::write_volatile(a as *mut u64, 0xfeed) };
        }
        start.elapsed().as_secs_f64() * 1e6 / addrs.len() as f64
    })
    .join()
    .expect("writer")
}

#[test]
fn copy_and_reuse_fault_cost() {
    let Some(mgr) = manager_or_skip("copy_and_reuse_fault_cost", 64) else {
        return;
    };
    let _w = Watchdog::new("fault_cost", 120);
    // The fault paths are measured: the sole mappers left by the copies must
    // still fault (fault-time reuse), not be made writable in the background
    // (tests/background_reuse.rs covers that).
    mgr.set_background_reuse(false);
    let g = mgr.create_guest(1, u64::from(2 * PAIRS + 64) * PAGE_SIZE as u64).unwrap();
    let a = |i: u32| g.page_addr(2 * i).unwrap();
    let b = |i: u32| g.page_addr(2 * i + 1).unwrap();
    for i in 0..PAIRS {
        // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
        unsafe {
            fill_page(a(i), u64::from(i));
            fill_page(b(i), u64::from(i));
        }
    }
    let start = Instant::now();
    for i in 0..PAIRS {
        mgr.merge_pages((1, 2 * i), (1, 2 * i + 1)).unwrap();
    }
    let merge_us = start.elapsed().as_secs_f64() * 1e6 / f64::from(PAIRS);
    let plain_us = timed_writes((2 * PAIRS..2 * PAIRS + 64).map(|p| g.page_addr(p).unwrap()).collect());
    let copy_us = timed_writes((0..PAIRS).map(a).collect());
    let reuse_us = timed_writes((0..PAIRS).map(b).collect());
    let s = mgr.stats();
    eprintln!(
        "fault cost: plain write {plain_us:.2} us, copy {copy_us:.1} us, reuse {reuse_us:.1} us (merge_pages {merge_us:.1} us each; {} copies, {} reuses)",
        s.counters.cow_copies, s.counters.cow_reuses
    );
    assert_eq!(s.counters.cow_copies, u64::from(PAIRS));
    assert_eq!(s.counters.cow_reuses, u64::from(PAIRS));
    let start = Instant::now();
    for i in 0..PAIRS {
        let f = mgr.frame_of(1, 2 * i).unwrap();
        mgr.migrate(f).unwrap();
    }
    eprintln!("migrate of a private page: {:.1} us each", start.elapsed().as_secs_f64() * 1e6 / f64::from(PAIRS));
}
