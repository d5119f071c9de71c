//! The per-VM page table of the memory manager: guest page number -> frame and
//! flags, plus the VMA count the realized mapping needs.
//!
//! Pure bookkeeping: the host mappings are changed by [`crate::remap`], and this
//! table records what they are.

use crate::{FrameNo, VmId, PAGE_SIZE};

/// Flags of one guest page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageFlags(u8);

impl PageFlags {
    /// The page is backed by a frame (always true once the VM is realized).
    pub const MAPPED: PageFlags = PageFlags(1 << 0);
    /// The page is write-protected through the userfaultfd.
    pub const PROTECTED: PageFlags = PageFlags(1 << 1);
    /// The page maps a merged (shared/stable) frame; writes break sharing.
    pub const SHARED: PageFlags = PageFlags(1 << 2);
    /// The page is known to read as zero (discarded) and is protected so that
    /// the first write is seen.
    pub const ZERO: PageFlags = PageFlags(1 << 3);
    /// The VMM's device code wrote the page (through [`crate::GuestMap::write_bytes`]).
    pub const DEVICE_WRITTEN: PageFlags = PageFlags(1 << 4);
    /// A write fault on an explicitly protected page was resolved.
    pub const WRITE_FAULTED: PageFlags = PageFlags(1 << 5);
    /// The merger found the page all zero and dropped its host memory (KSM's
    /// `ksm_zero_pages`). Only meaningful together with [`PageFlags::ZERO`]:
    /// cleared whenever `ZERO` is.
    pub const MERGED_ZERO: PageFlags = PageFlags(1 << 6);
    /// Device code wrote the page since the merger last looked at it (the
    /// merger's own copy of [`PageFlags::DEVICE_WRITTEN`]).
    pub const MERGE_DIRTY: PageFlags = PageFlags(1 << 7);

    /// No flag set.
    pub const fn empty() -> Self {
        PageFlags(0)
    }

    /// Whether all flags of `other` are set.
    pub const fn contains(self, other: PageFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// `self` with the flags of `other` added.
    pub const fn with(self, other: PageFlags) -> Self {
        PageFlags(self.0 | other.0)
    }

    /// `self` with the flags of `other` removed.
    pub const fn without(self, other: PageFlags) -> Self {
        PageFlags(self.0 & !other.0)
    }

    /// Raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }
}

/// One guest page: the frame backing it and its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry {
    /// Frame backing the page.
    pub frame: FrameNo,
    /// Flags of the page.
    pub flags: PageFlags,
}

/// Guest page number -> frame and flags for one VM, realized at `host_addr`.
pub struct PageTable {
    vm: VmId,
    host_addr: usize,
    pages: Vec<PageEntry>,
    /// Number of i with frame(i+1) != frame(i)+1: each starts a new VMA.
    breaks: usize,
    protected: usize,
    zero: usize,
    merged_zero: usize,
    /// Write faults on this VM's pages resolved by copying a shared frame.
    cow_copies: u64,
    /// Write faults on this VM's pages resolved by reusing a merged frame.
    cow_reuses: u64,
}

impl PageTable {
    /// A table of VM `vm` whose pages are backed by `frames`, realized at `host_addr`.
    pub fn new(vm: VmId, host_addr: usize, frames: &[FrameNo]) -> Self {
        let pages: Vec<PageEntry> = frames.iter().map(|&frame| PageEntry { frame, flags: PageFlags::MAPPED }).collect();
        let breaks = frames.windows(2).filter(|w| u64::from(w[1]) != u64::from(w[0]) + 1).count();
        PageTable { vm, host_addr, pages, breaks, protected: 0, zero: 0, merged_zero: 0, cow_copies: 0, cow_reuses: 0 }
    }

    /// The VM this table belongs to.
    pub fn vm(&self) -> VmId {
        self.vm
    }

    /// Start of the guest RAM in the host address space.
    pub fn host_addr(&self) -> usize {
        self.host_addr
    }

    /// Number of guest pages.
    pub fn len(&self) -> u32 {
        self.pages.len() as u32
    }

    /// Whether the table has no page.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Host address of guest page `page`.
    pub fn page_addr(&self, page: u32) -> usize {
        self.host_addr + page as usize * PAGE_SIZE
    }

    /// Guest page holding host address `addr`, if inside this table's range.
    pub fn page_at(&self, addr: usize) -> Option<u32> {
        let offset = addr.checked_sub(self.host_addr)?;
        let page = offset / PAGE_SIZE;
        (page < self.pages.len()).then_some(page as u32)
    }

    /// Entry of `page`.
    pub fn get(&self, page: u32) -> Option<PageEntry> {
        self.pages.get(page as usize).copied()
    }

    /// All entries.
    pub fn entries(&self) -> &[PageEntry] {
        &self.pages
    }

    /// Changes the frame of `page` (the caller has remapped it), keeping the VMA count.
    pub fn set_frame(&mut self, page: u32, frame: FrameNo) {
        let i = page as usize;
        self.breaks -= self.breaks_around(i);
        self.pages[i].frame = frame;
        self.breaks += self.breaks_around(i);
    }

    /// Sets the flags of `page` (the caller has changed the mapping to match).
    /// `MERGED_ZERO` is dropped when `ZERO` is not set.
    pub fn set_flags(&mut self, page: u32, flags: PageFlags) {
        let flags = if flags.contains(PageFlags::ZERO) { flags } else { flags.without(PageFlags::MERGED_ZERO) };
        let entry = &mut self.pages[page as usize];
        let old = entry.flags;
        entry.flags = flags;
        for (flag, count) in [
            (PageFlags::PROTECTED, &mut self.protected),
            (PageFlags::ZERO, &mut self.zero),
            (PageFlags::MERGED_ZERO, &mut self.merged_zero),
        ] {
            match (old.contains(flag), flags.contains(flag)) {
                (false, true) => *count += 1,
                (true, false) => *count -= 1,
                _ => {}
            }
        }
    }

    /// Number of VMAs the realized mapping needs (runs of consecutive frames).
    pub fn vma_count(&self) -> usize {
        if self.pages.is_empty() {
            0
        } else {
            self.breaks + 1
        }
    }

    /// Number of write-protected pages.
    pub fn protected_count(&self) -> usize {
        self.protected
    }

    /// Number of pages known to be zero.
    pub fn zero_count(&self) -> usize {
        self.zero
    }

    /// Number of pages the merger found zero and dropped (still zero).
    pub fn merged_zero_count(&self) -> usize {
        self.merged_zero
    }

    /// Write faults on this VM's pages resolved by copy and by reuse.
    pub fn cow_counts(&self) -> (u64, u64) {
        (self.cow_copies, self.cow_reuses)
    }

    /// Counts a write fault on this VM resolved by copying a shared frame.
    pub(crate) fn count_cow_copy(&mut self) {
        self.cow_copies += 1;
    }

    /// Counts a write fault on this VM resolved by reusing a merged frame.
    pub(crate) fn count_cow_reuse(&mut self) {
        self.cow_reuses += 1;
    }

    fn breaks_around(&self, i: usize) -> usize {
        let frame = u64::from(self.pages[i].frame);
        let mut n = 0;
        if i > 0 && u64::from(self.pages[i - 1].frame) + 1 != frame {
            n += 1;
        }
        if i + 1 < self.pages.len() && frame + 1 != u64::from(self.pages[i + 1].frame) {
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vma_count_follows_runs() {
        let mut table = PageTable::new(1, 0x10000, &[10, 11, 12, 13]);
        assert_eq!(table.vma_count(), 1);
        table.set_frame(1, 50);
        assert_eq!(table.vma_count(), 3);
        table.set_frame(2, 51);
        assert_eq!(table.vma_count(), 3);
        table.set_frame(0, 49);
        assert_eq!(table.vma_count(), 2);
        table.set_frame(1, 11);
        table.set_frame(0, 10);
        table.set_frame(2, 12);
        assert_eq!(table.vma_count(), 1);
    }

    #[test]
    fn flag_counters() {
        let mut table = PageTable::new(1, 0, &[0, 1]);
        let f = PageFlags::MAPPED.with(PageFlags::PROTECTED);
        table.set_flags(0, f);
        table.set_flags(1, f.with(PageFlags::ZERO));
        assert_eq!((table.protected_count(), table.zero_count()), (2, 1));
        table.set_flags(1, PageFlags::MAPPED);
        assert_eq!((table.protected_count(), table.zero_count()), (1, 0));
        assert_eq!(table.page_at(0x1fff), Some(1));
        assert_eq!(table.page_at(0x2000), None);
    }
}
