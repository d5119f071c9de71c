//! Opening the files a boot reads (kernel, initrd) without trusting their paths.
//!
//! A path comes from an API client or the command line, and densevm runs as root
//! with every tenant's memory in one memfd, so a path is checked before a byte is
//! read:
//!
//! - it must resolve (`realpath`): a symlink into a magic link such as
//!   `/proc/self/fd/N` of the pool's memfd does not resolve and is refused;
//! - the resolved path must not be under `/proc`, `/dev` or `/sys`, and the opened
//!   file must not live on procfs, sysfs or a devtmpfs (checked with `fstatfs`
//!   on the file itself, so a later rename cannot smuggle one in);
//! - it is opened with `O_NONBLOCK`, so a FIFO or a device cannot block the
//!   caller in `open`, and must then be a regular file;
//! - its size must not exceed a cap given by the caller (a 4 GiB sparse "kernel"
//!   is refused before it is read).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Trees from which no boot file is ever read.
const REFUSED_TREES: [&str; 3] = ["/proc", "/dev", "/sys"];

/// Largest kernel image accepted (an uncompressed `vmlinux` with debug
/// information is well under this; a bzImage is ~10 MiB).
pub const MAX_KERNEL_BYTES: u64 = 256 << 20;

/// Errors of opening a boot file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path is empty.
    #[error("{what} path is empty")]
    Empty {
        /// "kernel" or "initrd".
        what: &'static str,
    },
    /// The path does not resolve to a file.
    #[error("cannot resolve {what} {path}: {source}")]
    Resolve {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The path resolves into `/proc`, `/dev` or `/sys`, or the file lives on
    /// such a file system.
    #[error("{what} {path} is refused: boot files are never read from /proc, /dev or /sys")]
    RefusedTree {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The resolved path.
        path: PathBuf,
    },
    /// Opening or inspecting the file failed.
    #[error("cannot read {what} {path}: {source}")]
    Io {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The resolved path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a regular file.
    #[error("{what} {path} is a {kind}, not a regular file")]
    NotRegular {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The resolved path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// The file is larger than allowed.
    #[error("{what} {path} has {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The resolved path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The cap.
        max: u64,
    },
}

/// A checked, opened boot file.
#[derive(Debug)]
pub struct BootFile {
    /// The open file (positioned at its start).
    pub file: File,
    /// Its resolved path.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

/// Opens `path` as the boot file `what` ("kernel" or "initrd"), refusing it
/// unless it is a regular file of at most `max_bytes` outside `/proc`, `/dev`
/// and `/sys`.
pub fn open(what: &'static str, path: &Path, max_bytes: u64) -> Result<BootFile, Error> {
    if path.as_os_str().is_empty() {
        return Err(Error::Empty { what });
    }
    let resolved =
        std::fs::canonicalize(path).map_err(|source| Error::Resolve { what, path: path.to_path_buf(), source })?;
    if REFUSED_TREES.iter().any(|t| resolved.starts_with(t)) {
        return Err(Error::RefusedTree { what, path: resolved });
    }
    let io = |source| Error::Io { what, path: resolved.clone(), source };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&resolved)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let ft = meta.file_type();
    if !ft.is_file() {
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
        return Err(Error::NotRegular { what, path: resolved, kind });
    }
    if on_refused_fs(&file).map_err(io)? {
        return Err(Error::RefusedTree { what, path: resolved });
    }
    let size = meta.len();
    if size > max_bytes {
        return Err(Error::TooLarge { what, path: resolved, size, max: max_bytes });
    }
    Ok(BootFile { file, path: resolved, size })
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
    fn empty_missing_and_directory_paths_are_clear_errors() {
        assert!(matches!(open("kernel", Path::new(""), 1), Err(Error::Empty { what: "kernel" })));
        assert!(matches!(open("kernel", Path::new("/nonexistent/densevm/k"), 1), Err(Error::Resolve { .. })));
        let dir = scratch("dir");
        assert!(matches!(open("kernel", &dir, u64::MAX), Err(Error::NotRegular { kind: "directory", .. })));
        let _ = std::fs::remove_dir_all(dir);
    }
}
