//! Raw userfaultfd: creation, API handshake, write-protect registration and
//! the write-protect operation (ioctls via libc; the structs and constants of
//! `linux/userfaultfd.h` they need are defined here). The event side of the
//! descriptor (reading fault events, waking the blocked writers) belongs to its
//! one reader, the Protector ([`crate::protector`]).
//!
//! The descriptor is **not** user-mode-only (so faults taken by the kernel on
//! behalf of the process, e.g. KVM or a `pread` into guest memory, are
//! reported too) and non-blocking. That needs root or CAP_SYS_PTRACE.

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
        // SAFETY: UFFDIO_REGISTER reads and writes exactly one `UffdioRegister`;
        // registration only changes how faults in the range are handled.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
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
            // SAFETY: UFFDIO_WRITEPROTECT reads exactly one `UffdioWriteprotect`;
            // it changes page protection only.
            if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) } == 0 {
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
