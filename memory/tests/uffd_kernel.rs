//! Facts about the kernel that the remap protocol relies on (or had to avoid),
//! checked on the machine running the tests.

mod common;

use memory::uffd::{Uffd, UFFD_FEATURE_EVENT_REMAP, UFFD_FEATURE_WP_HUGETLBFS_SHMEM};
use memory::PAGE_SIZE;

/// The VmFlags line of the mapping holding `addr`.
fn vm_flags_at(addr: usize) -> String {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((a, b)) = line.split_whitespace().next().and_then(|r| r.split_once('-')) {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = a <= addr && addr < b;
                continue;
            }
        }
        if inside && line.starts_with("VmFlags") {
            return line.to_string();
        }
    }
    String::new()
}

fn uffd_or_skip(test: &str, features: u64) -> Option<Uffd> {
    match Uffd::new(features, UFFD_FEATURE_WP_HUGETLBFS_SHMEM) {
        Ok(u) => Some(u),
        Err(e) => {
            common::skip(test, &e.to_string());
            None
        }
    }
}

fn memfd_mapping(len: usize, offset: i64) -> (i32, usize) {
    // SAFETY: fresh memfd and a fresh shared mapping of it at a kernel-chosen address.
    unsafe {
        let fd = libc::memfd_create(c"uffd-kernel-test".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, 4 << 20), 0);
        let addr =
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, offset);
        assert_ne!(addr, libc::MAP_FAILED);
        (fd, addr as usize)
    }
}

/// With `UFFD_FEATURE_EVENT_REMAP`, `mremap` of a registered range keeps the
/// registration (it follows the move) and delivers a remap event; the mremap
/// caller blocks until the event is read, so a reader must be running. densevm
/// does not use this route (its remap protocol has a read-only instant instead,
/// and a remap event read by the fault handler while the remapper holds the
/// manager's lock would need care), but the fact is checked here.
#[test]
fn mremap_keeps_registration_with_event_remap() {
    let Some(uffd) = uffd_or_skip(
        "mremap_keeps_registration_with_event_remap",
        UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_EVENT_REMAP,
    ) else {
        return;
    };
    let (_fd, scratch) = memfd_mapping(PAGE_SIZE, 0);
    let (_fd2, target) = memfd_mapping(2 * PAGE_SIZE, 0);
    uffd.register_wp(scratch, PAGE_SIZE).unwrap();
    assert!(vm_flags_at(scratch).contains(" uw"));
    let events = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let mut events = Vec::new();
            while events.is_empty() && std::time::Instant::now() < deadline {
                uffd.read_events(&mut events).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            events
        });
        // SAFETY: both ranges are mappings made above, used by nobody else.
        let moved = unsafe {
            libc::mremap(
                scratch as *mut libc::c_void,
                PAGE_SIZE,
                PAGE_SIZE,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                (target + PAGE_SIZE) as *mut libc::c_void,
            )
        };
        assert_eq!(moved as usize, target + PAGE_SIZE);
        reader.join().unwrap()
    });
    let kept = vm_flags_at(target + PAGE_SIZE).contains(" uw");
    eprintln!("mremap with EVENT_REMAP: registration {}, events read: {events:?}", if kept { "kept" } else { "LOST" });
    assert!(kept, "registration lost by mremap with EVENT_REMAP");
    assert_eq!(events.len(), 1, "one remap event: {events:?}");
}

/// `mmap(MAP_FIXED)` over a registered range drops the registration of the new
/// mapping; registering again and protecting works, and protection survives
/// `mprotect` (the read-only-instant protocol relies on all three).
#[test]
fn map_fixed_drops_registration_and_wp_survives_mprotect() {
    let Some(uffd) = uffd_or_skip("map_fixed_drops_registration", UFFD_FEATURE_WP_HUGETLBFS_SHMEM) else {
        return;
    };
    let (fd, base) = memfd_mapping(4 * PAGE_SIZE, 0);
    uffd.register_wp(base, 4 * PAGE_SIZE).unwrap();
    let page = base + PAGE_SIZE;
    // SAFETY: `page` is inside the mapping made above.
    let res = unsafe {
        libc::mmap(
            page as *mut libc::c_void,
            PAGE_SIZE,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd,
            3 * PAGE_SIZE as i64,
        )
    };
    assert_eq!(res as usize, page);
    assert!(!vm_flags_at(page).contains(" uw"), "registration dropped");
    uffd.register_wp(page, PAGE_SIZE).unwrap();
    uffd.write_protect(page, PAGE_SIZE, true, false).unwrap();
    // SAFETY: `page` is our mapping.
    assert_eq!(unsafe { libc::mprotect(page as *mut libc::c_void, PAGE_SIZE, libc::PROT_READ | libc::PROT_WRITE) }, 0);
    // A write must now block in the userfaultfd: do it from a thread, see the event.
    let writer = std::thread::spawn(move || {
        // SAFETY: the mapping lives until the test ends (after the join).
        unsafe { std::ptr::write_volatile(page as *mut u64, 7) };
    });
    let mut events = Vec::new();
    let start = std::time::Instant::now();
    while events.is_empty() && start.elapsed().as_secs() < 5 {
        uffd.read_events(&mut events).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(!events.is_empty(), "write to a protected page was not trapped");
    uffd.write_protect(page, PAGE_SIZE, false, true).unwrap();
    writer.join().unwrap();
    // The kernel merged the re-registered page back with its neighbours? (info)
    eprintln!("page flags after re-register: {}", vm_flags_at(page));
}

/// Punching a hole under a write-protected shmem page keeps it protected.
#[test]
fn punch_hole_keeps_write_protection() {
    let Some(uffd) = uffd_or_skip("punch_hole_keeps_write_protection", UFFD_FEATURE_WP_HUGETLBFS_SHMEM) else {
        return;
    };
    let (fd, base) = memfd_mapping(PAGE_SIZE, 0);
    // SAFETY: `base` is our mapping.
    unsafe { std::ptr::write_volatile(base as *mut u64, 1) };
    uffd.register_wp(base, PAGE_SIZE).unwrap();
    uffd.write_protect(base, PAGE_SIZE, true, false).unwrap();
    // SAFETY: fallocate on our memfd.
    let rc =
        unsafe { libc::fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 0, PAGE_SIZE as i64) };
    assert_eq!(rc, 0);
    let writer = std::thread::spawn(move || {
        // SAFETY: the mapping lives until the test ends (after the join).
        unsafe { std::ptr::write_volatile(base as *mut u64, 2) };
    });
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut events = Vec::new();
    uffd.read_events(&mut events).unwrap();
    eprintln!("write after punch: events {events:?}");
    uffd.write_protect(base, PAGE_SIZE, false, true).unwrap();
    writer.join().unwrap();
    assert_eq!(events.len(), 1, "protection lost by the punch");
}
