//! The frame pool: one memfd for the whole host, its alias mapping, and the
//! buddy allocator over its 4 KiB frames.
//!
//! The memfd is sized with `ftruncate` and stays sparse: a frame costs host
//! memory only once written. Freed blocks are punched at once
//! (`FALLOC_FL_PUNCH_HOLE`), so a freed frame gives its memory back and a newly
//! allocated frame always reads as zero. When the last live frame of a 2 MiB
//! host frame is freed the whole 2 MiB frame is punched and counted as returned.
//! Many frames are punched with one `fallocate` per run of consecutive frames
//! ([`FramePool::free_frames`], [`FramePool::punch_frames`]), never one per
//! frame: a punch walks every mapping of the memfd (the kernel's
//! `unmap_mapping_range`), so its cost grows with the number of guest VMAs.
//!
//! The **alias** is a `MAP_SHARED` mapping of the whole pool that is never
//! registered with userfaultfd: densevm reads, compares and copies frames only
//! through it, so it never faults on write protection.
//!
//! The **zero region**: the memfd is one 2 MiB frame longer than the pool. Those
//! [`HUGE_FRAME_PAGES`] frames after the pool's last one belong to no buddy
//! block, no reference count and no alias: nothing ever writes them, and every
//! guest page whose content was dropped (merger's zero pages, discards) maps one
//! of them read-only and write-protected, page `p` the frame
//! [`FramePool::zero_frame`]`(p)`, so that a run of such pages maps consecutive
//! offsets (one mapping per run). A read of such a page allocates at most the
//! region's own 2 MiB once for the whole host, where reading a punched frame of
//! its own allocated a page per page read (see docs/MERGE_COST.md).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::buddy::{self, BuddyAllocator, FreeOutcome};
use crate::{sys, FrameNo, HUGE_FRAME_PAGES, HUGE_FRAME_SIZE, MAX_ORDER, PAGE_SIZE};

/// Errors of the frame pool.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The capacity is zero or not a multiple of 2 MiB.
    #[error("pool capacity {0} is not a positive multiple of 2 MiB")]
    BadCapacity(u64),
    /// `memfd_create` failed.
    #[error("memfd_create: {0}")]
    Memfd(io::Error),
    /// `ftruncate` of the memfd failed.
    #[error("sizing the memfd: {0}")]
    Truncate(io::Error),
    /// Mapping the alias failed.
    #[error("mapping the alias: {0}")]
    Alias(io::Error),
    /// Punching a hole failed.
    #[error("punching frames {0}..+{1}: {2}")]
    Punch(FrameNo, u64, io::Error),
    /// The buddy allocator refused.
    #[error(transparent)]
    Buddy(#[from] buddy::Error),
    /// A frame number is outside the pool.
    #[error("frame {0} outside the pool")]
    OutOfRange(FrameNo),
    /// Writing frames through the memfd failed.
    #[error("writing frames from {0} through the memfd: {1}")]
    Write(FrameNo, io::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Configuration of the frame pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Size of the memfd in bytes (a multiple of 2 MiB). It is sparse, so this is
    /// address space and bookkeeping, not host memory.
    pub capacity_bytes: u64,
    /// Ask for shmem transparent huge pages (`MADV_HUGEPAGE` on the mappings).
    pub transparent_huge_pages: bool,
}

/// Whether shmem transparent huge pages back the pool.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ThpStatus {
    /// THP was asked for in the configuration.
    pub requested: bool,
    /// The host's policy (`shmem_enabled`) honours `MADV_HUGEPAGE` on shmem.
    pub honoured: bool,
    /// The selected value of /sys/kernel/mm/transparent_hugepage/shmem_enabled.
    pub shmem_enabled: String,
}

impl ThpStatus {
    /// Reads the host's shmem THP policy; `requested` says whether the pool asks
    /// for huge pages (`honoured` is false when it does not).
    pub fn probe(requested: bool) -> Self {
        let raw = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled").unwrap_or_default();
        let selected = raw
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
            .unwrap_or("unknown")
            .to_string();
        let honoured = requested && matches!(selected.as_str(), "always" | "within_size" | "advise" | "force");
        ThpStatus { requested, honoured, shmem_enabled: selected }
    }
}

/// One memfd split into 2 MiB host frames of 512 4 KiB frames, with its alias.
pub struct FramePool {
    memfd: OwnedFd,
    alias: usize,
    capacity: u64,
    buddy: BuddyAllocator,
    thp: ThpStatus,
    huge_frames_returned: u64,
    punch_calls: AtomicU64,
}

// SAFETY: the alias is a process-wide shared mapping owned by this struct; the
// raw address is only dereferenced through methods whose callers synchronize
// (the manager's lock), and the mapping lives until drop.
unsafe impl Send for FramePool {}
// SAFETY: see `Send`; `&self` methods only read immutable fields or do syscalls.
unsafe impl Sync for FramePool {}

impl FramePool {
    /// Creates the memfd (sparse, `capacity_bytes` long) and maps its alias.
    pub fn new(config: &PoolConfig) -> Result<Self> {
        let capacity = config.capacity_bytes;
        if capacity == 0 || capacity & (HUGE_FRAME_SIZE as u64 - 1) != 0 {
            return Err(Error::BadCapacity(capacity));
        }
        let name = CString::new("densevm-pool").map_err(|e| Error::Memfd(e.into()))?;
        // SAFETY: `name` is a valid NUL-terminated string; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Memfd(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let length = capacity + HUGE_FRAME_SIZE as u64; // the pool, then the zero region
                                                        // SAFETY: ftruncate on the fd we own.
        if unsafe { libc::ftruncate(memfd.as_raw_fd(), length as libc::off_t) } != 0 {
            return Err(Error::Truncate(io::Error::last_os_error()));
        }
        let alias = sys::map_shared(memfd.as_raw_fd(), 0, capacity as usize).map_err(Error::Alias)?;
        let thp = ThpStatus::probe(config.transparent_huge_pages);
        if thp.requested {
            if let Err(e) = sys::advise(alias, capacity as usize, libc::MADV_HUGEPAGE) {
                tracing::warn!("MADV_HUGEPAGE on the pool alias: {e}");
            }
        }
        let huge_frames = (capacity / HUGE_FRAME_SIZE as u64) as u32;
        Ok(FramePool {
            memfd,
            alias,
            capacity,
            buddy: BuddyAllocator::new(huge_frames),
            thp,
            huge_frames_returned: 0,
            punch_calls: AtomicU64::new(0),
        })
    }

    /// The memfd.
    pub fn fd(&self) -> RawFd {
        self.memfd.as_raw_fd()
    }

    /// Size of the memfd in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Shmem transparent huge page status.
    pub fn thp(&self) -> &ThpStatus {
        &self.thp
    }

    /// The buddy allocator (read-only view for statistics and tests).
    pub fn buddy(&self) -> &BuddyAllocator {
        &self.buddy
    }

    /// Number of 2 MiB frames punched because they became empty, since creation.
    pub fn huge_frames_returned(&self) -> u64 {
        self.huge_frames_returned
    }

    /// The zero-region frame that guest page `page` maps once its content was
    /// dropped (never written, outside the pool: see the module documentation).
    pub fn zero_frame(&self, page: u32) -> FrameNo {
        self.zero_base() + page % HUGE_FRAME_PAGES
    }

    /// Whether `frame` lies in the zero region.
    pub fn is_zero_frame(&self, frame: FrameNo) -> bool {
        frame >= self.zero_base() && frame - self.zero_base() < HUGE_FRAME_PAGES
    }

    /// Frees the host memory the zero region holds (reads allocated it; it
    /// reads as zero after, as before).
    pub fn punch_zero_region(&self) -> Result<()> {
        self.punch(self.zero_base(), u64::from(HUGE_FRAME_PAGES))
    }

    fn zero_base(&self) -> FrameNo {
        self.buddy.huge_frames() * HUGE_FRAME_PAGES
    }

    /// Byte offset of `frame` in the memfd.
    pub fn offset_of(frame: FrameNo) -> u64 {
        u64::from(frame) * PAGE_SIZE as u64
    }

    /// Address of `frame` in the alias mapping.
    pub fn alias_addr(&self, frame: FrameNo) -> Result<usize> {
        if Self::offset_of(frame) >= self.capacity {
            return Err(Error::OutOfRange(frame));
        }
        Ok(self.alias + Self::offset_of(frame) as usize)
    }

    /// Allocates `2^order` contiguous frames (they read as zero).
    pub fn alloc(&mut self, order: u8) -> Result<FrameNo> {
        Ok(self.buddy.alloc(order)?)
    }

    /// Allocates exactly `frame` (it reads as zero).
    pub fn alloc_specific(&mut self, frame: FrameNo) -> Result<()> {
        Ok(self.buddy.alloc_specific(frame)?)
    }

    /// Frees a block and punches its memory (the whole 2 MiB frame if it emptied).
    ///
    /// No mapping other than the alias may still map the block.
    pub fn free(&mut self, frame: FrameNo, order: u8) -> Result<()> {
        let outcome = self.buddy.free(frame, order)?;
        let (start, count) = match outcome {
            FreeOutcome::HugeFrameEmptied(hf) => {
                self.huge_frames_returned += 1;
                (hf * HUGE_FRAME_PAGES, u64::from(HUGE_FRAME_PAGES))
            }
            FreeOutcome::PartlyUsed => (frame, 1u64 << order),
        };
        self.punch(start, count)
    }

    /// Frees many single frames (sorted in place), punching each run of
    /// consecutive freed frames once (a 2 MiB frame emptied by the batch is
    /// punched whole, as [`FramePool::free`] does). Frames freed before an error
    /// are punched all the same.
    ///
    /// No mapping other than the alias may still map the frames.
    ///
    /// Each run of consecutive frames goes to the buddy allocator as its
    /// largest aligned blocks (a whole 2 MiB frame is one free of order 9,
    /// not 512 of order 0); a block refused (one of its frames is free
    /// already) is freed frame by frame up to the refused frame.
    pub fn free_frames(&mut self, frames: &mut [FrameNo]) -> Result<()> {
        frames.sort_unstable();
        let mut ranges: Vec<(FrameNo, u64)> = Vec::with_capacity(frames.len().min(64));
        let mut failed = None;
        'runs: for (start, len) in aligned_blocks(frames) {
            let blocks = if len == 1 { vec![(start, 0)] } else { block_orders(start, len) };
            for (frame, order) in blocks {
                match self.buddy.free(frame, order) {
                    Ok(outcome) => self.record_freed(&mut ranges, frame, order, outcome),
                    Err(_) if order > 0 => {
                        for f in frame..frame + (1 << order) {
                            match self.buddy.free(f, 0) {
                                Ok(outcome) => self.record_freed(&mut ranges, f, 0, outcome),
                                Err(e) => {
                                    failed = Some(e);
                                    break 'runs;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        failed = Some(e);
                        break 'runs;
                    }
                }
            }
        }
        for (start, len) in self.bridge_free_gaps(coalesce(ranges)) {
            self.punch(start, len)?;
        }
        failed.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Joins consecutive ranges to punch (sorted, disjoint) that lie in one
    /// 2 MiB frame and are separated only by free frames: a free frame is a
    /// hole already (every free is punched) and nothing maps it but the alias,
    /// so punching it again changes nothing, and one `fallocate` replaces
    /// several (compaction frees the scattered live frames of a 2 MiB frame).
    fn bridge_free_gaps(&self, ranges: Vec<(FrameNo, u64)>) -> Vec<(FrameNo, u64)> {
        let mut out: Vec<(FrameNo, u64)> = Vec::with_capacity(ranges.len());
        for (start, len) in ranges {
            if let Some((s, l)) = out.last_mut() {
                let end = u64::from(*s) + *l;
                let same_huge = (end - 1) / u64::from(HUGE_FRAME_PAGES) == u64::from(start / HUGE_FRAME_PAGES);
                if same_huge && (end..u64::from(start)).all(|f| self.buddy.is_free(f as FrameNo)) {
                    *l = u64::from(start) + len - u64::from(*s);
                    continue;
                }
            }
            out.push((start, len));
        }
        out
    }

    /// Notes the range to punch after a block of `2^order` frames at `frame` was freed.
    fn record_freed(&mut self, ranges: &mut Vec<(FrameNo, u64)>, frame: FrameNo, order: u8, outcome: FreeOutcome) {
        match outcome {
            FreeOutcome::HugeFrameEmptied(hf) => {
                self.huge_frames_returned += 1;
                ranges.push((hf * HUGE_FRAME_PAGES, u64::from(HUGE_FRAME_PAGES)));
            }
            FreeOutcome::PartlyUsed => ranges.push((frame, 1u64 << order)),
        }
    }

    /// Frees the host memory of every frame of `frames` (sorted and deduplicated
    /// in place; the frames stay allocated and read as zero after), one punch per
    /// run of consecutive frames. Returns the number of punches.
    pub fn punch_frames(&self, frames: &mut Vec<FrameNo>) -> Result<usize> {
        frames.sort_unstable();
        frames.dedup();
        let runs = coalesce(frames.iter().map(|&f| (f, 1)).collect());
        for &(start, len) in &runs {
            self.punch(start, len)?;
        }
        Ok(runs.len())
    }

    /// Frees the host memory of `count` frames from `frame`; they read as zero after.
    pub fn punch(&self, frame: FrameNo, count: u64) -> Result<()> {
        self.punch_calls.fetch_add(1, Ordering::Relaxed);
        sys::punch_hole(self.fd(), Self::offset_of(frame), count * PAGE_SIZE as u64)
            .map_err(|e| Error::Punch(frame, count, e))
    }

    /// Holes punched (`fallocate(PUNCH_HOLE)` calls) since creation.
    pub fn punch_calls(&self) -> u64 {
        self.punch_calls.load(Ordering::Relaxed)
    }

    /// Whether `count` frames from `frame` hold no host memory.
    pub fn is_hole(&self, frame: FrameNo, count: u64) -> io::Result<bool> {
        sys::is_hole(self.fd(), Self::offset_of(frame), count * PAGE_SIZE as u64)
    }

    /// The runs of frames among `frame..frame + count` that hold host memory,
    /// as `(first, count)` (the others are holes and read as zero).
    pub fn data_runs(&self, frame: FrameNo, count: u32) -> io::Result<Vec<(FrameNo, u32)>> {
        let page = PAGE_SIZE as u64;
        let ranges = sys::data_ranges(self.fd(), Self::offset_of(frame), u64::from(count) * page)?;
        let mut runs: Vec<(FrameNo, u32)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            let first = (start / page) as FrameNo;
            let last = end.div_ceil(page) as FrameNo;
            match runs.last_mut() {
                Some((f, n)) if *f + *n >= first => *n = last - *f,
                _ => runs.push((first, last - first)),
            }
        }
        Ok(runs)
    }

    /// Copies frame `src` to frame `dst`: read through the alias, written with
    /// [`FramePool::write_frames`] (no alias mapping of `dst` is left behind).
    pub fn copy_frame(&self, src: FrameNo, dst: FrameNo) -> Result<()> {
        if src == dst {
            return Ok(());
        }
        let bytes = self.frame_bytes(src)?;
        self.write_frames(dst, bytes)
    }

    /// Writes `data` (whole frames) into the frames from `dst` with `pwrite` on
    /// the memfd, not through the alias: a store through the alias would leave
    /// a page-table entry for every written frame there, and shared memory
    /// mapped twice (alias and guest view) counts twice in the process's RSS
    /// until the frame is punched. `data` must not lie in the frames written.
    pub fn write_frames(&self, dst: FrameNo, data: &[u8]) -> Result<()> {
        let end = Self::offset_of(dst).checked_add(data.len() as u64);
        if !data.len().is_multiple_of(PAGE_SIZE) || end.is_none_or(|end| end > self.capacity) {
            return Err(Error::OutOfRange(dst));
        }
        let mut done = 0;
        while done < data.len() {
            let rest = &data[done..];
            let offset = Self::offset_of(dst) + done as u64;
            // SAFETY: `rest` is a valid readable buffer of `rest.len()` bytes; pwrite
            // only reads it and writes the memfd's pages at `offset` (checked above
            // to lie inside the pool).
            let n = unsafe { libc::pwrite(self.fd(), rest.as_ptr().cast(), rest.len(), offset as libc::off_t) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Write(dst, err));
            }
            if n == 0 {
                return Err(Error::Write(dst, io::ErrorKind::WriteZero.into()));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Whether frames `a` and `b` hold the same 4 KiB (compared through the alias).
    pub fn frames_equal(&self, a: FrameNo, b: FrameNo) -> Result<bool> {
        let (pa, pb) = (self.alias_addr(a)?, self.alias_addr(b)?);
        // SAFETY: both are whole frames inside the alias mapping; memcmp only reads.
        let cmp = unsafe { libc::memcmp(pa as *const libc::c_void, pb as *const libc::c_void, PAGE_SIZE) };
        Ok(cmp == 0)
    }

    /// Whether `frame` reads as all zero (through the alias; the frame must be
    /// backed, or reading it allocates host memory).
    pub fn frame_is_zero(&self, frame: FrameNo) -> Result<bool> {
        Ok(is_zero(self.frame_bytes(frame)?))
    }

    /// The 4 KiB of `frame` through the alias (racy if a guest writes it; used
    /// only for hashing and comparisons that are re-verified under protection).
    pub fn frame_bytes(&self, frame: FrameNo) -> Result<&[u8]> {
        let addr = self.alias_addr(frame)?;
        // SAFETY: the frame lies inside the alias mapping, which lives as long as
        // `self`; the bytes are plain integers for which any value is valid.
        Ok(unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE_SIZE) })
    }

    /// Copies bytes of `frame` from `offset` into `buf` through the alias.
    pub fn read(&self, frame: FrameNo, offset: usize, buf: &mut [u8]) -> Result<()> {
        let addr = self.checked_span(frame, offset, buf.len())?;
        // SAFETY: the span lies inside one frame of the alias mapping (checked).
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into `frame` at `offset` through the alias.
    pub fn write(&self, frame: FrameNo, offset: usize, data: &[u8]) -> Result<()> {
        let addr = self.checked_span(frame, offset, data.len())?;
        // SAFETY: the span lies inside one frame of the alias mapping (checked).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
        Ok(())
    }

    fn checked_span(&self, frame: FrameNo, offset: usize, len: usize) -> Result<usize> {
        if offset.checked_add(len).is_none_or(|end| end > PAGE_SIZE) {
            return Err(Error::OutOfRange(frame));
        }
        Ok(self.alias_addr(frame)? + offset)
    }

    /// Bytes of host memory the memfd holds (fstat `st_blocks * 512`).
    pub fn host_bytes(&self) -> u64 {
        sys::allocated_bytes(self.fd()).unwrap_or(0)
    }
}

/// Sorts `ranges` (start, length) and merges the overlapping and adjacent ones.
/// Runs `(first, length)` of consecutive frames of the sorted `frames` (a
/// repeated frame starts a new run, so that its second free is refused).
fn aligned_blocks(frames: &[FrameNo]) -> Vec<(FrameNo, u32)> {
    let mut out: Vec<(FrameNo, u32)> = Vec::new();
    for &f in frames {
        match out.last_mut() {
            Some((s, l)) if u64::from(*s) + u64::from(*l) == u64::from(f) => *l += 1,
            _ => out.push((f, 1)),
        }
    }
    out
}

/// The largest aligned buddy blocks `(first frame, order)` covering `len`
/// frames from `start`, in order (none crosses a 2 MiB frame).
fn block_orders(start: FrameNo, len: u32) -> Vec<(FrameNo, u8)> {
    let mut out = Vec::new();
    let (mut at, end) = (start, u64::from(start) + u64::from(len));
    while u64::from(at) < end {
        let left = end - u64::from(at);
        let mut order = at.trailing_zeros().min(u32::from(MAX_ORDER)) as u8;
        while (1u64 << order) > left {
            order -= 1;
        }
        out.push((at, order));
        at += 1 << order;
    }
    out
}

fn coalesce(mut ranges: Vec<(FrameNo, u64)>) -> Vec<(FrameNo, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(FrameNo, u64)> = Vec::with_capacity(ranges.len());
    for (start, len) in ranges {
        match out.last_mut() {
            Some((s, l)) if u64::from(*s) + *l >= u64::from(start) => {
                *l = (*l).max(u64::from(start) + len - u64::from(*s));
            }
            _ => out.push((start, len)),
        }
    }
    out
}

/// Whether every byte of `bytes` is zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: reinterpreting initialized bytes as u64 words is valid for any
        // value; align_to only returns the correctly aligned middle part.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

impl Drop for FramePool {
    fn drop(&mut self) {
        // SAFETY: the alias was mapped in `new` with this length and is only
        // referenced through `self`, which is going away.
        if let Err(e) = unsafe { sys::unmap(self.alias, self.capacity as usize) } {
            tracing::warn!("unmapping the pool alias: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> FramePool {
        FramePool::new(&PoolConfig { capacity_bytes: 2 * HUGE_FRAME_SIZE as u64, transparent_huge_pages: false })
            .expect("pool")
    }

    fn fill(pool: &FramePool, frame: FrameNo) {
        pool.write(frame, 0, &[0xA5; PAGE_SIZE]).expect("write");
    }

    #[test]
    fn data_runs_list_the_frames_with_memory() {
        let pool = pool();
        assert_eq!(pool.data_runs(0, 1024).unwrap(), vec![]);
        for f in [3, 4, 5, 9, 511, 512, 700] {
            fill(&pool, f);
        }
        assert_eq!(pool.data_runs(0, 1024).unwrap(), vec![(3, 3), (9, 1), (511, 2), (700, 1)]);
        // Clipped to the range asked.
        assert_eq!(pool.data_runs(4, 6).unwrap(), vec![(4, 2), (9, 1)]);
        assert_eq!(pool.data_runs(512, 100).unwrap(), vec![(512, 1)]);
        assert_eq!(pool.data_runs(6, 3).unwrap(), vec![]);
        pool.punch(4, 1).unwrap();
        assert_eq!(pool.data_runs(0, 10).unwrap(), vec![(3, 1), (5, 1), (9, 1)]);
    }

    #[test]
    fn coalesce_merges_adjacent_and_overlapping_runs() {
        assert_eq!(coalesce(vec![(9, 1), (3, 1), (4, 2), (10, 1), (20, 1)]), vec![(3, 3), (9, 2), (20, 1)]);
        assert_eq!(coalesce(vec![(0, 512), (5, 1), (511, 1), (512, 1)]), vec![(0, 513)]);
        assert_eq!(coalesce(Vec::new()), Vec::new());
    }

    #[test]
    fn runs_split_into_largest_aligned_blocks() {
        assert_eq!(aligned_blocks(&[1, 2, 3, 3, 7]), vec![(1, 3), (3, 1), (7, 1)]);
        assert_eq!(block_orders(1, 3), vec![(1, 0), (2, 1)]);
        assert_eq!(block_orders(0, 1024), vec![(0, 9), (512, 9)]);
        assert_eq!(block_orders(510, 515), vec![(510, 1), (512, 9), (1024, 0)]);
        let blocks = block_orders(3, 700);
        assert_eq!(blocks.iter().map(|&(_, k)| 1u32 << k).sum::<u32>(), 700);
        assert!(blocks.iter().all(|&(f, k)| f % (1 << k) == 0));
    }

    #[test]
    fn free_frames_punches_across_free_gaps_of_one_huge_frame() {
        let mut pool = pool();
        for f in 0..1024 {
            pool.alloc_specific(f).unwrap();
        }
        for f in [10, 12, 511, 512] {
            fill(&pool, f);
        }
        pool.free_frames(&mut (4..9).collect::<Vec<_>>()).unwrap();
        // 3 and 9 around the free 4..9: one punch of 3..10; 11 and 13 around the
        // allocated 12: two; 510 and 513 in two 2 MiB frames: two.
        for (frames, punches) in [(vec![9, 3], 1), (vec![11, 13], 2), (vec![510, 513], 2)] {
            let before = pool.punch_calls();
            pool.free_frames(&mut frames.clone()).unwrap();
            assert_eq!(pool.punch_calls() - before, punches, "{frames:?}");
        }
        assert!((3..10).chain([11, 13, 510, 513]).all(|f| pool.buddy().is_free(f)));
        // The allocated frames between keep their content.
        for f in [10, 12, 511, 512] {
            assert!(!pool.buddy().is_free(f) && !pool.is_hole(f, 1).unwrap(), "{f}");
        }
    }

    #[test]
    fn free_frames_of_whole_huge_frames_and_a_double_free() {
        let mut pool = pool();
        for f in 0..1024 {
            pool.alloc_specific(f).unwrap();
        }
        let mut frames: Vec<FrameNo> = (0..1024).filter(|&f| f != 700).collect();
        let before = pool.punch_calls();
        pool.free_frames(&mut frames).unwrap();
        assert_eq!(pool.huge_frames_returned(), 1);
        assert_eq!(pool.buddy().free_frames(), 1023);
        assert_eq!(pool.punch_calls() - before, 2, "0..700 and 701..1024");
        // 700 free, then a block holding a free frame: the frames before it are
        // freed one by one, the rest stays.
        pool.free_frames(&mut [700]).unwrap();
        pool.alloc_specific(5).unwrap();
        pool.alloc_specific(6).unwrap();
        pool.alloc_specific(7).unwrap();
        assert!(pool.free_frames(&mut [4, 5, 6, 7]).is_err());
        assert_eq!(pool.buddy().free_frames(), 1024 - 3);
        assert!(pool.free_frames(&mut [5, 6, 7]).is_ok());
        assert_eq!(pool.buddy().free_frames(), 1024);
    }

    #[test]
    fn punch_frames_punches_once_per_run() {
        let pool = pool();
        let mut frames = vec![9, 3, 4, 5, 10, 20, 3];
        for &f in &frames {
            fill(&pool, f);
        }
        fill(&pool, 6);
        let before = pool.punch_calls();
        assert_eq!(pool.punch_frames(&mut frames).unwrap(), 3);
        assert_eq!(pool.punch_calls() - before, 3, "one fallocate per run, not per frame");
        assert!(pool.is_hole(3, 3).unwrap() && pool.is_hole(9, 2).unwrap() && pool.is_hole(20, 1).unwrap());
        assert!(!pool.is_hole(6, 1).unwrap(), "a frame outside the runs keeps its memory");
        assert!(pool.frame_is_zero(4).unwrap());
    }

    #[test]
    fn free_frames_punches_once_per_freed_run() {
        let mut pool = pool();
        // Frames 0..8 allocated and written; 0 stays allocated.
        for f in 0..8 {
            pool.alloc_specific(f).unwrap();
            fill(&pool, f);
        }
        let before = pool.punch_calls();
        pool.free_frames(&mut [6, 2, 3, 1, 5]).unwrap();
        assert_eq!(pool.punch_calls() - before, 2, "frames 1..4 and 5..7: one punch each");
        assert!(pool.is_hole(1, 3).unwrap() && pool.is_hole(5, 2).unwrap());
        assert!(!pool.is_hole(0, 1).unwrap() && !pool.is_hole(4, 1).unwrap() && !pool.is_hole(7, 1).unwrap());
        // The rest empties the 2 MiB frame: one punch of all of it.
        let before = pool.punch_calls();
        pool.free_frames(&mut [7, 0, 4]).unwrap();
        assert_eq!(pool.punch_calls() - before, 1);
        assert_eq!(pool.huge_frames_returned(), 1);
        assert!(pool.is_hole(0, u64::from(HUGE_FRAME_PAGES)).unwrap());
        // A double free fails, changing nothing else.
        assert!(pool.free_frames(&mut [3]).is_err());
    }
}
