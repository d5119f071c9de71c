//! Raw userfaultfd: creation, API handshake, write-protect registration and
//! the write-protect operation (ioctls via libc; the structs and constants of
//! `linux/userfaultfd.h` they need are defined here). The event side of the
//! descriptor (reading fault events, waking the blocked writers) belongs to its
//! one reader, the Protector ([`crate::protector`]).
//!
//! The descriptor is **not** user-mode-only (so faults taken by the kernel on
//! behalf of the process, e.g. KVM or a `pread` into guest memory, are
//! reported too) and non-blocking. That needs root or CAP_SYS_PTRACE.
//!
//! [`trace`] timestamps the stages of a write fault on the handler thread
//! (benchmarks only; off unless enabled, then one relaxed load per ioctl).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Feature: events on `mremap` of registered ranges (registration then follows the move).
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// Feature: write protection of shmem and hugetlbfs.
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// Feature: write protection of not yet populated page-table entries.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;

const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_BIT: u64 = 0x06;

const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xC018_AA06;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub(crate) struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// Errors of the userfaultfd wrapper.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `userfaultfd` syscall failed (EPERM: needs root or CAP_SYS_PTRACE).
    #[error("userfaultfd(2): {0} (needs root or CAP_SYS_PTRACE for kernel-mode faults)")]
    Create(io::Error),
    /// The API handshake failed.
    #[error("UFFDIO_API: {0}")]
    Api(io::Error),
    /// A required feature is missing.
    #[error("userfaultfd feature bits {0:#x} missing (kernel offers {1:#x})")]
    MissingFeatures(u64, u64),
    /// Registration failed.
    #[error("UFFDIO_REGISTER {0:#x}+{1:#x}: {2}")]
    Register(u64, u64, io::Error),
    /// Registration succeeded but write-protect is not available on the range.
    #[error("UFFDIO_WRITEPROTECT not offered on {0:#x}")]
    NoWriteProtect(u64),
    /// Changing write protection failed.
    #[error("UFFDIO_WRITEPROTECT {0:#x}+{1:#x}: {2}")]
    WriteProtect(u64, u64, io::Error),
    /// Waking faulting threads failed.
    #[error("UFFDIO_WAKE {0:#x}+{1:#x}: {2}")]
    Wake(u64, u64, io::Error),
    /// Reading events failed.
    #[error("reading userfaultfd events: {0}")]
    Read(io::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A userfaultfd in write-protect mode.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
}

impl Uffd {
    /// Opens a userfaultfd (not user-mode-only, non-blocking), enabling the
    /// `wanted` features the kernel offers; fails if any of `required` is missing.
    pub fn new(wanted: u64, required: u64) -> Result<Self> {
        let offered = {
            let probe = Self::open()?;
            Self::handshake(&probe, 0)?
        };
        if offered & required != required {
            return Err(Error::MissingFeatures(required & !offered, offered));
        }
        let fd = Self::open()?;
        let features = wanted & offered;
        Self::handshake(&fd, features)?;
        Ok(Uffd { fd, features })
    }

    /// Whether a userfaultfd with write protection on shmem can be opened here
    /// (not user-mode-only); the error says why not.
    pub fn probe() -> Result<()> {
        Self::new(UFFD_FEATURE_WP_HUGETLBFS_SHMEM, UFFD_FEATURE_WP_HUGETLBFS_SHMEM).map(|_| ())
    }

    fn open() -> Result<OwnedFd> {
        // SAFETY: plain syscall; flags exclude UFFD_USER_MODE_ONLY on purpose.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(Error::Create(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    /// API handshake asking for `features`; returns the features the kernel offers.
    fn handshake(fd: &OwnedFd, features: u64) -> Result<u64> {
        let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes exactly one `UffdioApi`.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(Error::Api(io::Error::last_os_error()));
        }
        Ok(api.features)
    }

    /// Features enabled on this descriptor (asked for and offered).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Registers `addr..addr+len` in write-protect mode.
    pub fn register_wp(&self, addr: usize, len: usize) -> Result<()> {
        let mut reg = UffdioRegister { range: range(addr, len), mode: UFFDIO_REGISTER_MODE_WP, ioctls: 0 };
        let t0 = trace::ioctl_start();
        // SAFETY: UFFDIO_REGISTER reads and writes exactly one `UffdioRegister`;
        // registration only changes how faults in the range are handled.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) };
        trace::ioctl_end(t0, trace::Ioctl::Register);
        if rc != 0 {
            return Err(Error::Register(addr as u64, len as u64, io::Error::last_os_error()));
        }
        if reg.ioctls & (1 << UFFDIO_WRITEPROTECT_BIT) == 0 {
            return Err(Error::NoWriteProtect(addr as u64));
        }
        Ok(())
    }

    /// Sets (`protect`) or clears write protection on `addr..addr+len`.
    ///
    /// Clearing wakes threads blocked on the range only if `wake` is set.
    /// Retries while the kernel reports `EAGAIN` (a concurrent `mremap` event).
    pub fn write_protect(&self, addr: usize, len: usize, protect: bool, wake: bool) -> Result<()> {
        let mut mode = 0;
        if protect {
            mode |= UFFDIO_WRITEPROTECT_MODE_WP;
        }
        // The kernel rejects DONTWAKE together with WP (protecting wakes nobody).
        if !protect && !wake {
            mode |= UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
        }
        loop {
            let mut wp = UffdioWriteprotect { range: range(addr, len), mode };
            let t0 = trace::ioctl_start();
            // SAFETY: UFFDIO_WRITEPROTECT reads exactly one `UffdioWriteprotect`;
            // it changes page protection only.
            let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) };
            trace::ioctl_end(t0, trace::Ioctl::WriteProtect);
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EAGAIN) {
                return Err(Error::WriteProtect(addr as u64, len as u64, err));
            }
            std::thread::yield_now();
        }
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The `uffdio_range` of `addr..addr+len`.
pub(crate) fn range(addr: usize, len: usize) -> UffdioRange {
    UffdioRange { start: addr as u64, len: len as u64 }
}

const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);

pub mod trace {
    //! Timestamps of the write-fault path, for benchmarks (`densevm bench cow`):
    //! per batch of faults the handler thread read, the TSC when its `poll`
    //! returned, when the events were read, when resolution started and ended
    //! (with the time spent in this module's protection and registration
    //! ioctls meanwhile) and when the wakes were done. Off by default; when
    //! off, every hook is one relaxed atomic load. Only the thread that opened
    //! a batch ([`crate::protector`]'s handler) records into it.

    use std::cell::RefCell;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    static ENABLED: AtomicBool = AtomicBool::new(false);
    /// Most batches kept between two [`take`]s (later ones are dropped).
    const MAX_BATCHES: usize = 1 << 20;
    static DONE: Mutex<Vec<Batch>> = Mutex::new(Vec::new());

    thread_local! {
        static OPEN: RefCell<Option<Batch>> = const { RefCell::new(None) };
    }

    /// The timestamps (TSC) of one batch of write faults on the handler thread.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
    pub struct Batch {
        /// `poll` on the userfaultfd returned (the handler runs).
        pub poll_return: u64,
        /// The events were read.
        pub read_done: u64,
        /// Write faults in the batch.
        pub faults: u32,
        /// The lowest faulting page (host address).
        pub first_page: u64,
        /// The resolver was called (before it takes the manager's lock).
        pub resolve_start: u64,
        /// The resolver returned (lock released).
        pub resolve_end: u64,
        /// Every writer was woken.
        pub wake_end: u64,
        /// `UFFDIO_WRITEPROTECT` calls during resolution.
        pub protect_ioctls: u32,
        /// TSC cycles in them.
        pub protect_cycles: u64,
        /// `UFFDIO_REGISTER` calls during resolution.
        pub register_ioctls: u32,
        /// TSC cycles in them.
        pub register_cycles: u64,
        /// `UFFDIO_WAKE` calls.
        pub wake_ioctls: u32,
    }

    /// Which ioctl [`ioctl_end`] timed.
    #[derive(Clone, Copy, Debug)]
    pub(crate) enum Ioctl {
        /// `UFFDIO_WRITEPROTECT`.
        WriteProtect,
        /// `UFFDIO_REGISTER`.
        Register,
    }

    /// The time stamp counter.
    pub fn tsc() -> u64 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `rdtsc` reads the time stamp counter; it touches no memory.
        return unsafe { core::arch::x86_64::_rdtsc() };
        #[cfg(not(target_arch = "x86_64"))]
        0
    }

    /// Starts (clearing what was recorded) or stops recording.
    pub fn enable(on: bool) {
        if on {
            DONE.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        ENABLED.store(on, Ordering::Release);
    }

    /// Whether recording is on.
    pub fn enabled() -> bool {
        ENABLED.load(Ordering::Relaxed)
    }

    /// Takes the batches recorded so far.
    pub fn take() -> Vec<Batch> {
        std::mem::take(&mut *DONE.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Opens a batch on this thread, stamped now (its `poll` returned).
    pub(crate) fn begin() {
        if enabled() {
            let b = Batch { poll_return: tsc(), ..Batch::default() };
            OPEN.with(|o| *o.borrow_mut() = Some(b));
        }
    }

    /// Updates this thread's open batch, if any.
    pub(crate) fn with(f: impl FnOnce(&mut Batch)) {
        if enabled() {
            OPEN.with(|o| o.borrow_mut().as_mut().map(f));
        }
    }

    /// Closes this thread's open batch; keeps it if it held a fault.
    pub(crate) fn finish() {
        if !enabled() {
            return;
        }
        if let Some(b) = OPEN.with(|o| o.borrow_mut().take()).filter(|b| b.faults > 0) {
            let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
            if done.len() < MAX_BATCHES {
                done.push(b);
            }
        }
    }

    /// The start of a timed ioctl: its TSC, or 0 when recording is off.
    pub(crate) fn ioctl_start() -> u64 {
        if enabled() {
            tsc()
        } else {
            0
        }
    }

    /// Adds the ioctl started at `t0` (from [`ioctl_start`]) to the open batch.
    pub(crate) fn ioctl_end(t0: u64, what: Ioctl) {
        if t0 == 0 {
            return;
        }
        let dt = tsc().saturating_sub(t0);
        with(|b| match what {
            Ioctl::WriteProtect => {
                b.protect_ioctls += 1;
                b.protect_cycles += dt;
            }
            Ioctl::Register => {
                b.register_ioctls += 1;
                b.register_cycles += dt;
            }
        });
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn records_batches_with_faults_only_while_enabled() {
            let page = 0xdead_0000;
            let mark = |b: &mut Batch| (b.faults, b.first_page) = (1, page);
            begin();
            with(mark);
            finish();
            assert!(!take().iter().any(|b| b.first_page == page), "recorded while off");
            enable(true);
            begin();
            with(mark);
            let t0 = ioctl_start();
            ioctl_end(t0, Ioctl::WriteProtect);
            ioctl_end(ioctl_start(), Ioctl::Register);
            with(|b| b.wake_end = tsc());
            finish();
            begin();
            finish();
            enable(false);
            assert_eq!(ioctl_start(), 0, "no timestamp while off");
            let got: Vec<Batch> = take().into_iter().filter(|b| b.first_page == page).collect();
            assert_eq!(got.len(), 1, "{got:?}");
            let b = got[0];
            assert_eq!((b.protect_ioctls, b.register_ioctls), (1, 1));
            assert!(b.poll_return > 0 && b.wake_end >= b.poll_return, "{b:?}");
        }
    }
}
