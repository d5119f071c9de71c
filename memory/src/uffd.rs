//! Raw userfaultfd: creation, API handshake, write-protect registration and
//! the write-protect, wake and read operations (ioctls via libc; the structs
//! and constants of `linux/userfaultfd.h` are defined here).
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
const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xC018_AA06;

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
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

/// `struct uffd_msg`: 32 bytes, event byte first, then a 24-byte union at offset 8.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
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

/// One event read from the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted at `addr` (page-aligned by the caller as needed).
    PageFault {
        /// Faulting address.
        addr: u64,
        /// The access was a write.
        write: bool,
        /// The fault is a write-protect fault.
        wp: bool,
    },
    /// A registered range moved with `mremap` (the mover waits until this is read).
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// Any other event code.
    Other(u8),
}

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

    /// Wakes threads blocked on faults in `addr..addr+len`.
    pub fn wake(&self, addr: usize, len: usize) -> Result<()> {
        let mut r = range(addr, len);
        // SAFETY: UFFDIO_WAKE reads exactly one `UffdioRange`.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut r) } != 0 {
            return Err(Error::Wake(addr as u64, len as u64, io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Reads the pending events (non-blocking) into `out`; returns how many.
    pub fn read_events(&self, out: &mut Vec<Event>) -> Result<usize> {
        const BATCH: usize = 64;
        let mut msgs = [UffdMsg { event: 0, reserved1: 0, reserved2: 0, reserved3: 0, arg: [0; 3] }; BATCH];
        // SAFETY: the buffer is BATCH whole `uffd_msg`s; the kernel writes at most that.
        let n = unsafe {
            libc::read(self.fd.as_raw_fd(), msgs.as_mut_ptr() as *mut libc::c_void, std::mem::size_of_val(&msgs))
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return if err.raw_os_error() == Some(libc::EAGAIN) { Ok(0) } else { Err(Error::Read(err)) };
        }
        let count = n as usize / std::mem::size_of::<UffdMsg>();
        out.extend(msgs[..count].iter().map(|m| match m.event {
            UFFD_EVENT_PAGEFAULT => Event::PageFault {
                addr: m.arg[1],
                write: m.arg[0] & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                wp: m.arg[0] & UFFD_PAGEFAULT_FLAG_WP != 0,
            },
            UFFD_EVENT_REMAP => Event::Remap { from: m.arg[0], to: m.arg[1], len: m.arg[2] },
            other => Event::Other(other),
        }));
        Ok(count)
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn range(addr: usize, len: usize) -> UffdioRange {
    UffdioRange { start: addr as u64, len: len as u64 }
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);
