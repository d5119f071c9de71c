//! Thin wrappers over the libc calls the memory manager makes.

use std::io;
use std::os::fd::RawFd;

/// Reserves `len` bytes of address space aligned to `align` (a power of two),
/// inaccessible and without commit charge.
pub(crate) fn reserve(len: usize, align: usize) -> io::Result<usize> {
    let padded = len + align;
    // SAFETY: a fresh anonymous PROT_NONE mapping at an address chosen by the
    // kernel touches no existing memory; the result is checked.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            padded,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = base as usize;
    let start = (base + align - 1) & !(align - 1);
    let end = start + len;
    // SAFETY: both trimmed pieces lie inside the reservation made above and
    // nothing else refers to them.
    unsafe {
        if start > base {
            libc::munmap(base as *mut libc::c_void, start - base);
        }
        if base + padded > end {
            libc::munmap(end as *mut libc::c_void, base + padded - end);
        }
    }
    Ok(start)
}

/// Maps `len` bytes of `fd` at `offset` shared and read-write at an address the
/// kernel chooses.
pub(crate) fn map_shared(fd: RawFd, offset: u64, len: usize) -> io::Result<usize> {
    // SAFETY: a new mapping at a kernel-chosen address touches no existing
    // memory; the result is checked.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            offset as libc::off_t,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(addr as usize)
}

/// Maps `len` bytes of `fd` at `offset` shared with protection `prot` at exactly
/// `addr`, replacing whatever was mapped there.
///
/// # Safety
///
/// `addr..addr+len` must be address space owned by the caller (a guest range or
/// a scratch mapping); anything mapped there is replaced.
pub(crate) unsafe fn map_shared_fixed(
    addr: usize,
    fd: RawFd,
    offset: u64,
    len: usize,
    prot: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the caller guarantees the range is its own (function contract).
    let res = unsafe {
        libc::mmap(addr as *mut libc::c_void, len, prot, libc::MAP_SHARED | libc::MAP_FIXED, fd, offset as libc::off_t)
    };
    if res == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Changes the protection of `addr..addr+len` (only ever to read-write here).
pub(crate) fn protect(addr: usize, len: usize, prot: libc::c_int) -> io::Result<()> {
    // SAFETY: only used to make a guest page we just mapped read-only writable
    // again; an invalid range yields an error, not UB.
    if unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unmaps `addr..addr+len`.
///
/// # Safety
///
/// The range must be owned by the caller and no longer referenced.
pub(crate) unsafe fn unmap(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller guarantees the range is its own (function contract).
    if unsafe { libc::munmap(addr as *mut libc::c_void, len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `madvise(addr, len, advice)`; advice never changes memory contents here.
pub(crate) fn advise(addr: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: only called with MADV_HUGEPAGE, which changes a VMA flag and no
    // memory contents; an invalid range yields an error, not UB.
    if unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Frees the host memory behind `fd` bytes `offset..offset+len` (reads as zero after).
pub(crate) fn punch_hole(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an fd we own; it touches no memory of this process
    // beyond what the kernel unmaps from page tables.
    let res = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if res != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `fd` bytes `offset..offset+len` hold no data (are a hole).
pub(crate) fn is_hole(fd: RawFd, offset: u64, len: u64) -> io::Result<bool> {
    // SAFETY: lseek on an fd we own; it only reads the file's extent map (the
    // memfd is never read or written through its file offset).
    let next = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
    if next < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENXIO) { Ok(true) } else { Err(err) };
    }
    Ok(next as u64 >= offset + len)
}

/// The stretches of `fd` bytes `offset..offset+len` that hold data, as
/// `(start, end)` byte offsets clipped to the range (`SEEK_DATA` / `SEEK_HOLE`
/// in turn; holes are what is left).
pub(crate) fn data_ranges(fd: RawFd, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let end = offset + len;
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        // SAFETY: as in `is_hole`: lseek only reads the file's extent map.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(err);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let stop = (hole as u64).min(end);
        out.push((data, stop));
        at = stop;
    }
    Ok(out)
}

/// Bytes of host memory the file behind `fd` holds (st_blocks * 512).
pub(crate) fn allocated_bytes(fd: RawFd) -> io::Result<u64> {
    // SAFETY: fstat writes only into the zeroed struct we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // The fstat syscall itself (the C library may use newfstatat, a path-taking
    // call): the statistics are read on threads whose seccomp filter allows an
    // fd's stat but no path lookup (the API server's).
    // SAFETY: `st` is a valid, writable stat buffer.
    if unsafe { libc::syscall(libc::SYS_fstat, fd, &mut st as *mut libc::stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_blocks as u64 * 512)
}

/// Number of mappings of this process (lines of /proc/self/maps).
pub(crate) fn process_map_count() -> io::Result<usize> {
    let maps = std::fs::read("/proc/self/maps")?;
    Ok(maps.iter().filter(|&&b| b == b'\n').count())
}

/// Residency of the pages of `addr..addr+len` (one byte per page, bit 0 set if
/// resident) into `out`. For a shared memfd mapping a page with no host memory
/// (a hole) reads as not resident.
pub(crate) fn mincore(addr: usize, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    out.resize(len.div_ceil(4096), 0);
    // SAFETY: `out` has one byte per page of the range; mincore only writes there
    // and fails with ENOMEM (no UB) if part of the range is not mapped.
    if unsafe { libc::mincore(addr as *mut libc::c_void, len, out.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's Linux thread id.
pub(crate) fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}
