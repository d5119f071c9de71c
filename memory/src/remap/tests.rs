//! Tests of the batched remap protocol's failure handling, with a failed
//! write-protect step injected ([`inject`]).

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::AtomicBool;

use super::{PendingRemaps, RemapProtocol};
use crate::uffd::{self, Uffd};
use crate::{sys, PAGE_SIZE};

/// Fault injection: the write-protect step of a pending range fails.
pub(super) mod inject {
    use std::cell::Cell;

    thread_local! {
        static FAIL_AT: Cell<usize> = const { Cell::new(0) };
    }

    /// Makes protecting the pending range at `addr` fail on this thread (0: none).
    pub(in crate::remap) fn fail_at(addr: usize) {
        FAIL_AT.with(|f| f.set(addr));
    }

    /// Whether protecting the pending range at `addr` is to fail.
    pub(in crate::remap) fn fails(addr: usize) -> bool {
        addr != 0 && FAIL_AT.with(|f| f.get() == addr)
    }
}

const PAGES: usize = 8;

/// A registered guest range of [`PAGES`] pages over a memfd of twice as many.
struct Fixture {
    uffd: Uffd,
    memfd: OwnedFd,
    addr: usize,
    failed: AtomicBool,
}

impl Fixture {
    fn new(test: &str) -> Option<Fixture> {
        let wanted = uffd::UFFD_FEATURE_WP_HUGETLBFS_SHMEM | uffd::UFFD_FEATURE_WP_UNPOPULATED;
        let uffd = match Uffd::new(wanted, uffd::UFFD_FEATURE_WP_HUGETLBFS_SHMEM) {
            Ok(u) => u,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "SKIPPED {test}: userfaultfd write protection unavailable: {e}");
                return None;
            }
        };
        // SAFETY: memfd_create takes a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"remap-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor owned by nobody else.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own memfd.
        assert_eq!(unsafe { libc::ftruncate(memfd.as_raw_fd(), (2 * PAGES * PAGE_SIZE) as libc::off_t) }, 0);
        let addr = sys::map_shared(memfd.as_raw_fd(), 0, PAGES * PAGE_SIZE).expect("map");
        uffd.register_wp(addr, PAGES * PAGE_SIZE).expect("register");
        Some(Fixture { uffd, memfd, addr, failed: AtomicBool::new(false) })
    }

    fn protocol(&self) -> RemapProtocol<'_> {
        RemapProtocol::new(&self.uffd, self.memfd.as_raw_fd(), false, &self.failed)
    }

    fn page(&self, p: usize) -> usize {
        self.addr + p * PAGE_SIZE
    }

    /// Maps each of `pages` read-only to frame `PAGES + page` in one batch
    /// (one group) and finishes it.
    fn remap(&self, pages: &[usize]) -> super::Result<()> {
        let remap = self.protocol();
        let mut pending = PendingRemaps::default();
        for &p in pages {
            // SAFETY: the fixture's own guest range; frames of its own memfd.
            unsafe { remap.map_read_only(&mut pending, 0, self.page(p), PAGE_SIZE, (PAGES + p) as u32) }
                .expect("map read-only");
        }
        remap.finish(&mut pending)
    }

    /// Whether page `p` is mapped writable (from `/proc/self/maps`).
    fn writable(&self, p: usize) -> bool {
        let addr = self.page(p);
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        for line in maps.lines() {
            let mut fields = line.split_whitespace();
            let (range, perms) = (fields.next().unwrap_or(""), fields.next().unwrap_or(""));
            let Some((s, e)) = range.split_once('-') else { continue };
            let (s, e) = (usize::from_str_radix(s, 16).unwrap_or(0), usize::from_str_radix(e, 16).unwrap_or(0));
            if (s..e).contains(&addr) {
                return perms.starts_with("rw");
            }
        }
        panic!("page {p} at {addr:#x} is not mapped");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // SAFETY: the fixture's own mapping, referenced by nothing any more.
        let _ = unsafe { sys::unmap(self.addr, PAGES * PAGE_SIZE) };
    }
}

#[test]
fn a_range_failing_in_the_middle_of_a_group_stays_read_only() {
    let Some(f) = Fixture::new("a_range_failing_in_the_middle_of_a_group_stays_read_only") else { return };
    inject::fail_at(f.page(3));
    let result = f.remap(&[1, 3, 5]);
    inject::fail_at(0);
    assert!(result.is_err(), "the injected failure is reported");
    assert!(f.failed.load(std::sync::atomic::Ordering::Acquire), "the failure is marked");
    assert!(f.writable(1) && f.writable(5), "the ranges that finished are writable");
    assert!(!f.writable(3), "the range whose protection failed stays read-only");
}

#[test]
fn a_later_batch_never_makes_a_range_left_read_only_writable() {
    let Some(f) = Fixture::new("a_later_batch_never_makes_a_range_left_read_only_writable") else { return };
    inject::fail_at(f.page(3));
    assert!(f.remap(&[3]).is_err());
    inject::fail_at(0);
    assert!(!f.writable(3));
    // A later batch whose group spans the stranded range finishes.
    f.remap(&[1, 5]).expect("a batch without failure");
    assert!(f.writable(1) && f.writable(5), "the ranges that finished are writable");
    assert!(!f.writable(3), "the range left read-only by the failed batch became writable");
    assert!(f.protocol().failed());
}

#[test]
fn batches_without_failures_end_writable() {
    let Some(f) = Fixture::new("batches_without_failures_end_writable") else { return };
    f.remap(&[1, 2, 5]).expect("a batch without failure");
    assert!((0..PAGES).all(|p| f.writable(p)));
    assert!(!f.protocol().failed());
}
