//! A deleted VM's merger metadata (its per-page scan state and its entries in
//! the unstable index) is freed when the VM is destroyed, not when merging
//! runs again: with the merger stopped, `metadata_bytes` falls at once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use memory::{ChangeDetection, Tunables, PAGE_SIZE};

#[test]
fn a_destroyed_vms_merge_metadata_is_freed_at_once() {
    let name = "a_destroyed_vms_merge_metadata_is_freed_at_once";
    let Some(mgr) = manager_or_skip(name, 64) else { return };
    let _w = Watchdog::new(name, 120);
    const PAGES: u32 = 2048;
    let guests: Vec<_> = (1..=2).map(|vm| mgr.create_guest(vm, u64::from(PAGES) * PAGE_SIZE as u64).unwrap()).collect();
    for (i, g) in guests.iter().enumerate() {
        for p in 0..PAGES {
            // Distinct pages (unstable index entries), a few clones across the VMs.
            let value = if p % 8 == 0 { u64::from(p) } else { (i as u64 + 1) << 32 | u64::from(p) };
            // SAFETY: a page of a live guest map; no other writer.
            unsafe { fill_page(g.page_addr(p).unwrap(), value) };
        }
    }
    for vm in 1..=2 {
        mgr.set_merge(vm, true, 1).unwrap();
    }
    mgr.merger()
        .set_tunables(Tunables {
            run: true,
            pages_to_scan: 100_000,
            sleep_ms: 0,
            change_detection: ChangeDetection::Checksum,
            ..Tunables::default()
        })
        .unwrap();
    assert!(mgr.merger().wait_full_scans(2, Duration::from_secs(60)), "merging did not progress");
    mgr.merger().set_run(false);
    // The scanner publishes once more when it stops; wait for a stable figure.
    std::thread::sleep(Duration::from_millis(300));
    let before = mgr.merger().stats().metadata_bytes;
    assert!(before > u64::from(PAGES) * 2 * 8, "metadata of two VMs' pages: {before} bytes");
    let mut guests = guests;
    drop(guests.pop());
    let start = Instant::now();
    let mut after = mgr.merger().stats().metadata_bytes;
    while after * 10 > before * 7 && start.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
        after = mgr.merger().stats().metadata_bytes;
    }
    print_line(&format!(
        "merger metadata: {before} bytes with 2 VMs, {after} bytes {:?} after deleting one",
        start.elapsed()
    ));
    assert!(
        after * 10 <= before * 7,
        "merger metadata stayed at {after} of {before} bytes for {:?} after a VM was destroyed",
        start.elapsed()
    );
    assert!(mgr.vm_merge_stats(2).is_err());
    drop(guests);
}
