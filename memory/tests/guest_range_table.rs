//! The write-retry handler's table of guest ranges is bounded: a guest beyond
//! it would be unknown to the SIGSEGV handler, so a host thread's store in a
//! remap's read-only instant would crash the process. Creation is refused
//! instead, with a clear error, and succeeds again once a guest is gone.
//!
//! Its own test binary: the table is process-wide.

mod common;

use common::*;
use memory::manager::Error;
use memory::write_retry::RANGE_SLOTS;
use memory::PAGE_SIZE;

#[test]
fn guests_beyond_the_range_table_are_refused() {
    let Some(mgr) = manager_or_skip("guests_beyond_the_range_table_are_refused", 64) else {
        return;
    };
    let _w = Watchdog::new("guests_beyond_the_range_table_are_refused", 120);
    let mut guests = Vec::with_capacity(RANGE_SLOTS);
    for vm in 0..RANGE_SLOTS as u32 {
        guests.push(mgr.create_guest(vm + 1, PAGE_SIZE as u64).expect("a guest within the table"));
    }
    let free_before = mgr.stats().frames_free;
    let vm = RANGE_SLOTS as u32 + 1;
    match mgr.create_guest(vm, PAGE_SIZE as u64) {
        Err(Error::TooManyGuests(e)) => assert!(e.to_string().contains(&RANGE_SLOTS.to_string()), "{e}"),
        Err(e) => panic!("wrong error for guest {vm}: {e}"),
        Ok(_) => panic!("guest {vm} was created beyond the write-retry table ({RANGE_SLOTS} slots)"),
    }
    assert_eq!(mgr.stats().frames_free, free_before, "a refused guest keeps no frame");
    guests.pop();
    let again = mgr.create_guest(vm, PAGE_SIZE as u64).expect("room again after a guest is gone");
    drop(again);
    drop(guests);
    assert_eq!(mgr.stats().frames_used, 0);
}
