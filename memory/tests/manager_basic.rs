//! Basic behaviour of the memory manager against the real kernel: merging,
//! copy-on-write (copy and reuse), migration, discard, device writes, explicit
//! protection, syscalls writing into protected pages, VMA accounting.

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use memory::manager::MergeOutcome;
use memory::{PageFlags, PAGE_SIZE};

#[test]
fn create_write_destroy_returns_memory() {
    let Some(mgr) = manager_or_skip("create_write_destroy_returns_memory", 64) else {
        return;
    };
    let _w = Watchdog::new("create_write_destroy_returns_memory", 60);
    let guest = mgr.create_guest(1, 8 << 20).unwrap();
    assert_eq!(guest.host_addr() % (2 << 20), 0);
    let s = mgr.stats();
    assert_eq!(s.frames_used, 2048);
    assert_eq!(s.host_bytes, 0, "allocated but unwritten frames cost nothing");
    assert_eq!(s.vma_count, 1);
    let end = guest.host_addr() + guest.size();
    assert_eq!(maps_in_range(guest.host_addr(), end), 1);
    for p in 0..guest.pages() {
        // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
        unsafe { fill_page(guest.page_addr(p).unwrap(), u64::from(p)) };
    }
    assert_eq!(mgr.stats().host_bytes, 8 << 20);
    drop(guest);
    let s = mgr.stats();
    assert_eq!((s.frames_used, s.host_bytes, s.huge_frames_in_use), (0, 0, 0));
    assert_eq!(s.huge_frames_returned, 4);
}

#[test]
fn merge_copy_then_reuse() {
    let Some(mgr) = manager_or_skip("merge_copy_then_reuse", 64) else {
        return;
    };
    let _w = Watchdog::new("merge_copy_then_reuse", 60);
    // This test follows fault-time reuse (background reuse, which would make
    // the sole mapper writable before its write, is tests/background_reuse.rs's).
    mgr.set_background_reuse(false);
    let a = mgr.create_guest(1, 1 << 20).unwrap();
    let b = mgr.create_guest(2, 1 << 20).unwrap();
    // Frames are shared only inside a merge domain: put both VMs in domain 7.
    mgr.set_merge(1, false, 7).unwrap();
    mgr.set_merge(2, false, 7).unwrap();
    let (pa, pb) = (a.page_addr(3).unwrap(), b.page_addr(7).unwrap());
    // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
    unsafe {
        fill_page(pa, 0xabcd);
        fill_page(pb, 0xabcd);
    }
    let fa = a.frame_of(3).unwrap();
    let out = mgr.merge_pages((1, 3), (2, 7)).unwrap();
    let MergeOutcome::Merged { frame } = out else { panic!("{out:?}") };
    assert_eq!(a.frame_of(3).unwrap(), b.frame_of(7).unwrap());
    assert_eq!(mgr.frame_refs(frame), 2);
    let s = mgr.stats();
    assert_eq!((s.frames_shared, s.pages_sharing, s.protected_pages), (1, 1, 2));
    assert_eq!(s.host_bytes, 4096, "the dropped frame was punched");
    assert!(a.page_flags(3).unwrap().contains(PageFlags::SHARED));
    let _ = fa;

    // Write to b's page: copy.
    fill_page_from_thread(pb, 0x1111);
    // SAFETY: the page belongs to a guest map this test keeps alive (reads are always allowed).
    assert!(unsafe { page_is(pa, 0xabcd) }, "shared frame unchanged");
    // SAFETY: the page belongs to a guest map this test keeps alive (reads are always allowed).
    assert!(unsafe { page_is(pb, 0x1111) });
    assert_ne!(b.frame_of(7).unwrap(), frame);
    assert_eq!(mgr.frame_refs(frame), 1);
    assert_eq!(mgr.stats().counters.cow_copies, 1);

    // Write to a's page, now the only mapping of the merged frame: reuse.
    fill_page_from_thread(pa, 0x2222);
    // SAFETY: the page belongs to a guest map this test keeps alive (reads are always allowed).
    assert!(unsafe { page_is(pa, 0x2222) });
    assert_eq!(a.frame_of(3).unwrap(), frame, "reused in place");
    let s = mgr.stats();
    assert_eq!((s.counters.cow_copies, s.counters.cow_reuses), (1, 1));
    assert_eq!(s.protected_pages, 0);
    // Later writes do not fault.
    let faults = s.uffd_faults;
    // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
    unsafe { fill_page(pa, 0x3333) };
    assert_eq!(mgr.stats().uffd_faults, faults);
}

#[test]
fn merge_refuses_different_pages() {
    let Some(mgr) = manager_or_skip("merge_refuses_different_pages", 64) else {
        return;
    };
    let _w = Watchdog::new("merge_refuses_different_pages", 60);
    let a = mgr.create_guest(1, 1 << 20).unwrap();
    // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
    unsafe {
        fill_page(a.page_addr(0).unwrap(), 1);
        fill_page(a.page_addr(1).unwrap(), 2);
    }
    assert_eq!(mgr.merge_pages((1, 0), (1, 1)).unwrap(), MergeOutcome::Differs);
    assert_eq!(mgr.stats().protected_pages, 0);
    // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
    unsafe { fill_page(a.page_addr(0).unwrap(), 5) };
    assert_eq!(mgr.stats().uffd_faults, 0);
}

#[test]
fn pread_into_shared_page_copies() {
    let Some(mgr) = manager_or_skip("pread_into_shared_page_copies", 64) else {
        return;
    };
    let _w = Watchdog::new("pread_into_shared_page_copies", 60);
    let a = mgr.create_guest(1, 1 << 20).unwrap();
    let (p0, p1) = (a.page_addr(0).unwrap(), a.page_addr(1).unwrap());
    // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
    unsafe {
        fill_page(p0, 9);
        fill_page(p1, 9);
    }
    assert!(matches!(mgr.merge_pages((1, 0), (1, 1)).unwrap(), MergeOutcome::Merged { .. }));
    let path = std::env::temp_dir().join(format!("densevm-pread-{}", std::process::id()));
    std::fs::write(&path, vec![0x5au8; PAGE_SIZE]).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    std::thread::spawn(move || {
        // SAFETY: p1 is a live guest page; the kernel writes into it.
        let buf = unsafe { std::slice::from_raw_parts_mut(p1 as *mut u8, PAGE_SIZE) };
        assert_eq!(file.read_at(buf, 0).unwrap(), PAGE_SIZE);
    })
    .join()
    .unwrap();
    std::fs::remove_file(&path).unwrap();
    // SAFETY: the page belongs to a guest map this test keeps alive (reads are always allowed).
    assert!(unsafe { page_is(p0, 9) });
    // SAFETY: the page belongs to a guest map this test keeps alive (reads are always allowed).
    assert!(unsafe { page_is(p1, 0x5a5a_5a5a_5a5a_5a5a) });
    assert_eq!(mgr.stats().counters.cow_copies, 1);
}

#[test]
fn migrate_shared_and_private_frames() {
    let Some(mgr) = manager_or_skip("migrate_shared_and_private_frames", 64) else {
        return;
    };
    let _w = Watchdog::new("migrate_shared_and_private_frames", 60);
    let a = mgr.create_guest(1, 1 << 20).unwrap();
    for p in 0..3 {
        // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
        unsafe { fill_page(a.page_addr(p).unwrap(), 77) };
    }
    mgr.merge_pages((1, 0), (1, 1)).unwrap();
    mgr.merge_pages((1, 0), (1, 2)).unwrap();
    let shared = a.frame_of(0).unwrap();
    assert_eq!(mgr.frame_refs(shared), 3);
    let new = mgr.migrate(shared).unwrap();
    assert_eq!(mgr.frame_refs(shared), 0);
    assert_eq!(mgr.frame_refs(new), 3);
    for p in 0..3 {
        assert_eq!(a.frame_of(p).unwrap(), new);
        // SAFETY: the page belongs to a guest map this test keeps alive (reads are always allowed).
        assert!(unsafe { page_is(a.page_addr(p).unwrap(), 77) });
    }
    // Still protected after migration: a write copies.
    fill_page_from_thread(a.page_addr(1).unwrap(), 78);
    // SAFETY: the page belongs to a guest map this test keeps alive (reads are always allowed).
    assert!(unsafe { page_is(a.page_addr(0).unwrap(), 77) });
    assert_eq!(mgr.stats().counters.cow_copies, 1);

    // A private page migrates and stays writable without faults.
    // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
    unsafe { fill_page(a.page_addr(10).unwrap(), 1010) };
    let old = a.frame_of(10).unwrap();
    let moved = mgr.migrate(old).unwrap();
    assert_ne!(moved, old);
    // SAFETY: the page belongs to a guest map this test keeps alive (reads are always allowed).
    assert!(unsafe { page_is(a.page_addr(10).unwrap(), 1010) });
    let faults = mgr.stats().uffd_faults;
    // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
    unsafe { fill_page(a.page_addr(10).unwrap(), 1011) };
    assert_eq!(mgr.stats().uffd_faults, faults);
    let mut word = [0u8; 8];
    a.read_bytes(10 * PAGE_SIZE as u64, &mut word).unwrap();
    assert_eq!(u64::from_ne_bytes(word), 1011);
}

#[test]
fn discard_frees_memory_and_reads_zero() {
    let Some(mgr) = manager_or_skip("discard_frees_memory_and_reads_zero", 64) else {
        return;
    };
    let _w = Watchdog::new("discard_frees_memory_and_reads_zero", 60);
    let a = mgr.create_guest(1, 1 << 20).unwrap();
    for p in 0..4 {
        // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
        unsafe { fill_page(a.page_addr(p).unwrap(), 5) };
    }
    mgr.merge_pages((1, 2), (1, 3)).unwrap();
    let before = mgr.stats().host_bytes;
    a.discard(0).unwrap();
    assert_eq!(mgr.stats().host_bytes, before - PAGE_SIZE as u64);
    assert!(a.page_flags(0).unwrap().contains(PageFlags::ZERO));
    // SAFETY: the page belongs to a guest map this test keeps alive (reads are always allowed).
    assert!(unsafe { page_is(a.page_addr(0).unwrap(), 0) });
    // Discarding a shared page leaves the other mapper alone.
    a.discard(3).unwrap();
    // SAFETY: the page belongs to a guest map this test keeps alive (reads are always allowed).
    assert!(unsafe { page_is(a.page_addr(3).unwrap(), 0) });
    // SAFETY: the page belongs to a guest map this test keeps alive (reads are always allowed).
    assert!(unsafe { page_is(a.page_addr(2).unwrap(), 5) });
    // First write to a discarded page faults once, then the page is normal.
    fill_page_from_thread(a.page_addr(0).unwrap(), 6);
    // SAFETY: the page belongs to a guest map this test keeps alive (reads are always allowed).
    assert!(unsafe { page_is(a.page_addr(0).unwrap(), 6) });
    let s = mgr.stats();
    assert_eq!(s.counters.zero_page_faults, 1);
    assert_eq!(s.counters.discards, 2);
}

#[test]
fn device_writes_break_sharing() {
    let Some(mgr) = manager_or_skip("device_writes_break_sharing", 64) else {
        return;
    };
    let _w = Watchdog::new("device_writes_break_sharing", 60);
    let a = mgr.create_guest(1, 1 << 20).unwrap();
    // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
    unsafe {
        fill_page(a.page_addr(0).unwrap(), 3);
        fill_page(a.page_addr(1).unwrap(), 3);
    }
    mgr.merge_pages((1, 0), (1, 1)).unwrap();
    // Write across the page boundary: touches pages 0 and 1.
    let gpa = PAGE_SIZE as u64 - 4;
    a.write_bytes(gpa, &[0xff; 8]).unwrap();
    assert_ne!(a.frame_of(0).unwrap(), a.frame_of(1).unwrap());
    let mut buf = [0u8; 8];
    a.read_bytes(gpa, &mut buf).unwrap();
    assert_eq!(buf, [0xff; 8]);
    // SAFETY: the page belongs to a guest map this test keeps alive (reads are always allowed).
    assert_eq!(unsafe { read_word(a.page_addr(0).unwrap(), 0) }, 3);
    assert_eq!(a.take_device_written().unwrap(), vec![0, 1]);
    assert!(a.take_device_written().unwrap().is_empty());
    assert!(a.write_bytes(a.size() as u64 - 2, &[0; 4]).is_err());
}

#[test]
fn explicit_protection_records_writes() {
    let Some(mgr) = manager_or_skip("explicit_protection_records_writes", 64) else {
        return;
    };
    let _w = Watchdog::new("explicit_protection_records_writes", 60);
    let a = mgr.create_guest(1, 1 << 20).unwrap();
    a.protect(5).unwrap();
    assert_eq!(mgr.stats().protected_pages, 1);
    fill_page_from_thread(a.page_addr(5).unwrap(), 42);
    // SAFETY: the page belongs to a guest map this test keeps alive (reads are always allowed).
    assert!(unsafe { page_is(a.page_addr(5).unwrap(), 42) });
    assert_eq!(a.take_write_faulted().unwrap(), vec![5]);
    let s = mgr.stats();
    assert_eq!((s.protected_pages, s.counters.protect_faults), (0, 1));
    a.protect(6).unwrap();
    a.unprotect(6).unwrap();
    // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
    unsafe { fill_page(a.page_addr(6).unwrap(), 1) };
    assert_eq!(mgr.stats().counters.protect_faults, 1);
}

#[test]
fn vma_estimate_matches_kernel() {
    let Some(mgr) = manager_or_skip("vma_estimate_matches_kernel", 64) else {
        return;
    };
    let _w = Watchdog::new("vma_estimate_matches_kernel", 60);
    let a = mgr.create_guest(1, 2 << 20).unwrap();
    for p in 0..64 {
        // SAFETY: the pages belong to a guest map this test keeps alive, and no other thread writes them now.
        unsafe { fill_page(a.page_addr(p).unwrap(), u64::from(p % 4)) };
    }
    for p in 4..64 {
        mgr.merge_pages((1, p % 4), (1, p)).unwrap();
    }
    let end = a.host_addr() + a.size();
    let real = maps_in_range(a.host_addr(), end);
    let s = mgr.stats();
    eprintln!("estimated {} VMAs, kernel has {real}", s.vma_count);
    assert_eq!(s.vma_count as usize, real);
    for p in 4..64 {
        a.unshare(p).unwrap();
    }
    let real = maps_in_range(a.host_addr(), end);
    assert_eq!(mgr.stats().vma_count as usize, real);
}
