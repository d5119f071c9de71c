//! Unmerge-all while VMs are destroyed: a VM destroyed after unmerge-all
//! listed it is skipped (it has nothing left to unmerge), not an error. It used
//! to end unmerge-all with "unknown VM", which the API answered with 500 (found
//! by the daemon's soak test, tests/tests/soak.rs: `UnmergeAll` while VMs are
//! deleted).

mod common;

use std::time::Duration;

use common::*;
use memory::{GuestMap, PAGE_SIZE};

/// VMs per round, each of [`VM_BYTES`], every page merged with the same page of the others.
const VMS: u32 = 8;
const VM_BYTES: u64 = 2 << 20;
const VM_PAGES: u32 = (VM_BYTES / PAGE_SIZE as u64) as u32;
const POOL_MIB: u64 = 2 * VMS as u64 * (VM_BYTES >> 20);
const DOMAIN: u32 = 3;
const ROUNDS: u32 = 12;

#[test]
fn unmerge_all_skips_vms_destroyed_meanwhile() {
    let test = "unmerge_all_skips_vms_destroyed_meanwhile";
    let Some(mgr) = manager_or_skip(test, POOL_MIB) else {
        return;
    };
    let _w = Watchdog::new(test, 300);
    let mut survivors_checked = 0;
    for round in 0..ROUNDS {
        let ids: Vec<u32> = (0..VMS).map(|i| round * VMS + i + 1).collect();
        let mut maps: Vec<GuestMap> = ids.iter().map(|&id| mgr.create_guest(id, VM_BYTES).unwrap()).collect();
        for (map, &id) in maps.iter().zip(&ids) {
            mgr.set_merge(id, true, DOMAIN).unwrap();
            for p in 0..VM_PAGES {
                // SAFETY: a page of a guest map this test keeps alive; no other thread writes it.
                unsafe { fill_page(map.page_addr(p).unwrap(), 0xAB00 + u64::from(p)) };
            }
        }
        for &id in &ids[1..] {
            for p in 0..VM_PAGES {
                mgr.merge_pages((ids[0], p), (id, p)).unwrap();
            }
        }
        assert_eq!(mgr.stats().frames_shared, u64::from(VM_PAGES));
        let m = mgr.clone();
        let unmerge = std::thread::spawn(move || m.unmerge_all());
        // Destroy the VMs unmerge-all reaches last while it works on the first.
        std::thread::sleep(Duration::from_micros(500 * u64::from(round % 4)));
        let doomed = maps.split_off(VMS as usize / 2);
        drop(doomed);
        let result = unmerge.join().expect("unmerge-all thread");
        assert!(result.is_ok(), "round {round}: unmerge-all failed: {result:?}");
        // The VMs that remain hold their content on private frames.
        assert_eq!(mgr.stats().frames_shared, 0, "round {round}");
        for map in &maps {
            for p in (0..VM_PAGES).step_by(97) {
                // SAFETY: a page of a live guest map.
                assert!(unsafe { page_is(map.page_addr(p).unwrap(), 0xAB00 + u64::from(p)) }, "round {round} page {p}");
                survivors_checked += 1;
            }
        }
        drop(maps);
        assert_eq!(mgr.stats().frames_used, 0, "round {round}: frames left behind");
    }
    assert!(survivors_checked > 0);
}
