//! Opening the files densevm reads on a request's behalf (kernel, initrd,
//! System.map) without trusting their paths.
//!
//! A path comes from an API client or the command line, and densevm runs as root
//! with every tenant's memory in one memfd, so a path is checked before a byte is
//! read:
//!
//! - it must resolve (`realpath`) and must not lead into `/proc`, `/dev` or `/sys`,
//!   nor to anything but a regular file (checked before `open`, so that opening a
//!   device node, whose `open` may have side effects, is not even tried);
//! - it is opened with `openat2(RESOLVE_NO_MAGICLINKS)` (a symlink to a magic
//!   link such as `/proc/self/fd/N` of the pool's memfd is refused by the kernel)
//!   and `O_NONBLOCK | O_CLOEXEC | O_NOCTTY`, so a FIFO or a device cannot block
//!   the caller in `open`;
//! - then the *opened* file is checked, so that a rename or symlink swap after the
//!   first checks gains nothing: `fstat` says it is a regular file, `fstatfs` that
//!   it is not on procfs or sysfs, and its real path (`readlink` of
//!   `/proc/self/fd/N`) must be outside `/proc`, `/dev` and `/sys` and, when the
//!   process has a [`PathPolicy`] (`serve --allowed-dir`), inside one of its
//!   allowed directories;
//! - its size must not exceed a cap given by the caller (a 4 GiB sparse "kernel"
//!   is refused before it is read).
//!
//! The process-wide policy is set once, at start ([`set_policy`]), as a chroot
//! would be: every later open obeys it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Trees from which no file is ever read.
const REFUSED_TREES: [&str; 3] = ["/proc", "/dev", "/sys"];

/// Largest kernel image accepted (an uncompressed `vmlinux` with debug
/// information is well under this; a bzImage is ~10 MiB).
pub const MAX_KERNEL_BYTES: u64 = 256 << 20;

/// Largest initrd accepted (a distribution's initramfs is 30..150 MiB; the
/// initrd is copied into guest RAM below 4 GiB, so a bigger one could not be
/// placed anyway).
pub const MAX_INITRD_BYTES: u64 = 1 << 30;

/// The process's path policy, once set.
static POLICY: OnceLock<PathPolicy> = OnceLock::new();

/// Errors of opening a file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path is empty.
    #[error("{what} path is empty")]
    Empty {
        /// "kernel", "initrd" or "System.map".
        what: &'static str,
    },
    /// The path does not resolve to a file.
    #[error("cannot resolve {what} {path}: {source}")]
    Resolve {
        /// "kernel", "initrd" or "System.map".
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The path resolves into `/proc`, `/dev` or `/sys`, leads through a magic
    /// link, or the file lives on such a file system.
    #[error("{what} {path} is refused: files are never read from /proc, /dev or /sys")]
    RefusedTree {
        /// "kernel", "initrd" or "System.map".
        what: &'static str,
        /// The resolved path.
        path: PathBuf,
    },
    /// The file is outside every allowed directory of the path policy.
    #[error("{what} {path} is refused: it is outside the allowed directories {dirs} (serve --allowed-dir)")]
    OutsideAllowed {
        /// "kernel", "initrd" or "System.map".
        what: &'static str,
        /// The opened file's real path.
        path: PathBuf,
        /// The allowed directories, listed.
        dirs: String,
    },
    /// Opening or inspecting the file failed.
    #[error("cannot read {what} {path}: {source}")]
    Io {
        /// "kernel", "initrd" or "System.map".
        what: &'static str,
        /// The resolved path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a regular file.
    #[error("{what} {path} is a {kind}, not a regular file")]
    NotRegular {
        /// "kernel", "initrd" or "System.map".
        what: &'static str,
        /// The resolved path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// The file is larger than allowed.
    #[error("{what} {path} has {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// "kernel", "initrd" or "System.map".
        what: &'static str,
        /// The resolved path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The cap.
        max: u64,
    },
    /// An allowed directory of a path policy is not usable.
    #[error("allowed directory {path}: {reason}")]
    BadAllowedDir {
        /// The directory given.
        path: PathBuf,
        /// Why it is refused.
        reason: String,
    },
    /// The process's path policy was set already.
    #[error("the path policy is set once, at start")]
    PolicySet,
}

/// Where files may be read from: anywhere but `/proc`, `/dev` and `/sys` (no
/// allowed directory, the default), or only beneath the allowed directories.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathPolicy {
    allowed: Vec<PathBuf>,
}

impl PathPolicy {
    /// A policy allowing only files beneath `dirs` (resolved now: each must be
    /// an existing directory outside `/proc`, `/dev` and `/sys`). No directory:
    /// no restriction beyond the refused trees.
    pub fn new<P: AsRef<Path>>(dirs: &[P]) -> Result<Self, Error> {
        let mut allowed = Vec::with_capacity(dirs.len());
        for dir in dirs {
            let dir = dir.as_ref();
            let bad = |reason: String| Error::BadAllowedDir { path: dir.to_path_buf(), reason };
            let real = std::fs::canonicalize(dir).map_err(|e| bad(e.to_string()))?;
            if !real.is_dir() {
                return Err(bad("not a directory".into()));
            }
            if in_refused_tree(&real) {
                return Err(bad("/proc, /dev and /sys are never allowed".into()));
            }
            allowed.push(real);
        }
        Ok(PathPolicy { allowed })
    }

    /// The allowed directories (resolved); empty: no restriction.
    pub fn allowed_dirs(&self) -> &[PathBuf] {
        &self.allowed
    }

    fn check(&self, what: &'static str, real: &Path) -> Result<(), Error> {
        if self.allowed.is_empty() || self.allowed.iter().any(|d| real.starts_with(d)) {
            return Ok(());
        }
        let dirs = self.allowed.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
        Err(Error::OutsideAllowed { what, path: real.to_path_buf(), dirs })
    }
}

/// Sets the process's path policy (once, before the first file is opened).
pub fn set_policy(policy: PathPolicy) -> Result<(), Error> {
    POLICY.set(policy).map_err(|_| Error::PolicySet)
}

/// The process's path policy (the default until [`set_policy`]).
pub fn policy() -> &'static PathPolicy {
    static DEFAULT: PathPolicy = PathPolicy { allowed: Vec::new() };
    POLICY.get().unwrap_or(&DEFAULT)
}

/// A checked, opened file.
#[derive(Debug)]
pub struct BootFile {
    /// The open file (positioned at its start).
    pub file: File,
    /// Its real path (of the opened file).
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

/// Opens `path` as the file `what` ("kernel", "initrd" or "System.map") under
/// the process's [`PathPolicy`], refusing it unless it is a regular file of at
/// most `max_bytes` outside `/proc`, `/dev` and `/sys`.
pub fn open(what: &'static str, path: &Path, max_bytes: u64) -> Result<BootFile, Error> {
    open_with(policy(), what, path, max_bytes)
}

/// [`open`] under `policy`.
pub fn open_with(policy: &PathPolicy, what: &'static str, path: &Path, max_bytes: u64) -> Result<BootFile, Error> {
    if path.as_os_str().is_empty() {
        return Err(Error::Empty { what });
    }
    // Checks before open: nothing under the refused trees and nothing but a
    // regular file is even opened.
    let resolved =
        std::fs::canonicalize(path).map_err(|source| Error::Resolve { what, path: path.to_path_buf(), source })?;
    if in_refused_tree(&resolved) {
        return Err(Error::RefusedTree { what, path: resolved });
    }
    policy.check(what, &resolved)?;
    let io = |source| Error::Io { what, path: resolved.clone(), source };
    let meta = std::fs::metadata(&resolved).map_err(io)?;
    not_regular(what, &resolved, meta.file_type())?;

    // The checks that count, on the opened file.
    let file = match open_no_magiclinks(&resolved) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(Error::RefusedTree { what, path: resolved }),
        Err(e) => return Err(io(e)),
    };
    let real = fd_path(&file).map_err(io)?;
    if in_refused_tree(&real) || on_refused_fs(&file).map_err(io)? {
        return Err(Error::RefusedTree { what, path: real });
    }
    let meta = file.metadata().map_err(io)?;
    not_regular(what, &real, meta.file_type())?;
    policy.check(what, &real)?;
    let size = meta.len();
    if size > max_bytes {
        return Err(Error::TooLarge { what, path: real, size, max: max_bytes });
    }
    Ok(BootFile { file, path: real, size })
}

fn in_refused_tree(path: &Path) -> bool {
    REFUSED_TREES.iter().any(|t| path.starts_with(t))
}

/// Refuses anything but a regular file, naming what it is.
fn not_regular(what: &'static str, path: &Path, ft: std::fs::FileType) -> Result<(), Error> {
    if ft.is_file() {
        return Ok(());
    }
    let kind = if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_socket() {
        "socket"
    } else {
        "special file"
    };
    Err(Error::NotRegular { what, path: path.to_path_buf(), kind })
}

/// Opens `path` (resolved: no symlink in it when it was checked) read-only,
/// non-blocking, close-on-exec, never as a controlling terminal, refusing
/// (`ELOOP`) to follow a magic link. Kernels without `openat2` (before 5.6) and
/// threads whose seccomp filter refuses it open it with `O_NOFOLLOW` instead (the caller's checks on the opened file still
/// refuse what a swapped-in link could reach).
fn open_no_magiclinks(path: &Path) -> std::io::Result<File> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
    // SAFETY: an all-zero open_how is a valid value of this plain C struct.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a valid NUL-terminated path and an open_how of the size
    // passed; the returned descriptor is owned by the File below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    // ENOSYS: a kernel before 5.6; EPERM: a seccomp filter that refuses openat2
    // because it cannot check its flags (densevm's vCPU threads).
    let fd = if fd < 0 && matches!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) {
        // SAFETY: open with a valid NUL-terminated path.
        i64::from(unsafe { libc::open(c.as_ptr(), flags | libc::O_NOFOLLOW) })
    } else {
        fd
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened by this function and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd as libc::c_int) })
}

/// The real path of an open file (`readlink` of its `/proc/self/fd` entry).
fn fd_path(file: &File) -> std::io::Result<PathBuf> {
    let p = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    if !p.is_absolute() {
        return Err(std::io::Error::other(format!("open file has no path ({})", p.display())));
    }
    Ok(p)
}

/// True when `file` lives on procfs, sysfs or a devtmpfs.
fn on_refused_fs(file: &File) -> std::io::Result<bool> {
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `file` is an open descriptor and `st` a valid, writable statfs.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // devtmpfs reports TMPFS_MAGIC; a regular file on it is still refused by the
    // path check (it is mounted at /dev).
    const PROC_SUPER_MAGIC: i64 = 0x9fa0;
    const SYSFS_MAGIC: i64 = 0x6265_6572;
    let magic = st.f_type as i64;
    Ok(magic == PROC_SUPER_MAGIC || magic == SYSFS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("densevm-bootfile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn regular_file_opens_with_its_size() {
        let dir = scratch("ok");
        let p = dir.join("k");
        std::fs::write(&p, b"0123456789").expect("write");
        let f = open("kernel", &p, 10).expect("a regular file within the cap opens");
        assert_eq!(f.size, 10);
        assert!(matches!(open("kernel", &p, 9), Err(Error::TooLarge { size: 10, max: 9, .. })));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn fifo_is_refused_without_blocking() {
        let dir = scratch("fifo");
        let p = dir.join("fifo");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        // With no writer, a blocking open would hang here forever.
        let err = open("initrd", &p, u64::MAX).expect_err("a FIFO is no boot file");
        assert!(matches!(err, Error::NotRegular { kind: "FIFO", .. }), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn system_trees_and_magic_links_are_refused() {
        for p in ["/proc/self/mem", "/proc/self/status", "/dev/null", "/sys/kernel/mm/ksm/run"] {
            let err = open("initrd", Path::new(p), u64::MAX).expect_err(p);
            assert!(matches!(err, Error::RefusedTree { .. } | Error::Resolve { .. }), "{p}: {err}");
        }
        // A symlink elsewhere that points into /proc is refused by its resolved path.
        let dir = scratch("link");
        let link = dir.join("status");
        std::os::unix::fs::symlink("/proc/self/status", &link).expect("symlink");
        assert!(matches!(open("initrd", &link, u64::MAX), Err(Error::RefusedTree { .. })));
        // A memfd reached through its /proc/self/fd magic link does not resolve to a file.
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"densevm-bootfile-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        let magic = dir.join("pool");
        std::os::unix::fs::symlink(format!("/proc/self/fd/{fd}"), &magic).expect("symlink");
        let err = open("initrd", &magic, u64::MAX).expect_err("the pool memfd is no boot file");
        assert!(matches!(err, Error::RefusedTree { .. } | Error::Resolve { .. }), "{err}");
        // SAFETY: closing the memfd this test created.
        unsafe { libc::close(fd) };
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn allowed_dirs_confine_paths_by_the_opened_file() {
        let dir = scratch("policy");
        let inside = dir.join("in");
        let outside = dir.join("out");
        std::fs::create_dir_all(&inside).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(inside.join("k"), b"k").expect("write");
        std::fs::write(outside.join("k"), b"k").expect("write");
        let policy = PathPolicy::new(&[&inside]).expect("an existing directory is a policy");
        assert!(open_with(&policy, "kernel", &inside.join("k"), 1).is_ok());
        let err = open_with(&policy, "kernel", &outside.join("k"), 1).expect_err("outside");
        assert!(matches!(err, Error::OutsideAllowed { .. }), "{err}");
        assert!(err.to_string().contains("--allowed-dir"), "{err}");
        // `..` and a symlink inside that points outside are judged by where they lead.
        let err = open_with(&policy, "kernel", &inside.join("../out/k"), 1).expect_err("dot-dot");
        assert!(matches!(err, Error::OutsideAllowed { .. }), "{err}");
        std::os::unix::fs::symlink(outside.join("k"), inside.join("link")).expect("symlink");
        let err = open_with(&policy, "kernel", &inside.join("link"), 1).expect_err("symlink out");
        assert!(matches!(err, Error::OutsideAllowed { .. }), "{err}");
        // The refused trees stay refused whatever is allowed, and cannot be allowed.
        assert!(matches!(
            open_with(&policy, "initrd", Path::new("/proc/self/status"), u64::MAX),
            Err(Error::RefusedTree { .. })
        ));
        for bad in ["/proc", "/dev/shm", "/nonexistent/densevm"] {
            assert!(matches!(PathPolicy::new(&[bad]), Err(Error::BadAllowedDir { .. })), "{bad}");
        }
        assert!(matches!(PathPolicy::new(&[inside.join("k")]), Err(Error::BadAllowedDir { .. })));
        assert!(PathPolicy::new::<&Path>(&[]).expect("no dir").allowed_dirs().is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn empty_missing_and_directory_paths_are_clear_errors() {
        assert!(matches!(open("kernel", Path::new(""), 1), Err(Error::Empty { what: "kernel" })));
        assert!(matches!(open("kernel", Path::new("/nonexistent/densevm/k"), 1), Err(Error::Resolve { .. })));
        let dir = scratch("dir");
        assert!(matches!(open("kernel", &dir, u64::MAX), Err(Error::NotRegular { kind: "directory", .. })));
        let _ = std::fs::remove_dir_all(dir);
    }
}
