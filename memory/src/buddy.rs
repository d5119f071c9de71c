//! Buddy allocator of 4 KiB frames grouped in 2 MiB host frames.
//!
//! Pure bookkeeping (no system calls), so it can be model-tested on its own.
//! Orders 0..=9; a free order-9 block is a whole empty 2 MiB host frame.
//! Allocation prefers partly used 2 MiB frames, the fullest first, and takes an
//! empty one only when no partly used frame can satisfy the request, so that
//! frees concentrate in few host frames and whole ones become empty (the idea
//! behind Linux's pageblock grouping).

use std::collections::BTreeSet;

use crate::{FrameNo, HUGE_FRAME_PAGES, MAX_ORDER};

/// Errors of the buddy allocator.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// No free block of the requested order (or larger) exists.
    #[error("no free block of order {0}")]
    OutOfFrames(u8),
    /// The order is larger than [`MAX_ORDER`].
    #[error("invalid order {0}")]
    InvalidOrder(u8),
    /// The block is outside the pool or not aligned to its order.
    #[error("frame {0} out of range or misaligned for order {1}")]
    BadBlock(FrameNo, u8),
    /// A frame of the block to free is already free (double free).
    #[error("frame {0} is not allocated")]
    NotAllocated(FrameNo),
    /// The frame asked for by [`BuddyAllocator::alloc_specific`] is in use.
    #[error("frame {0} is not free")]
    NotFree(FrameNo),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Word offset of each order's free bitmap inside [`HugeFrameState::bits`].
const BITMAP_OFFSET: [usize; 10] = [0, 8, 12, 14, 15, 16, 17, 18, 19, 20];
/// Number of bitmap words per 2 MiB host frame.
const BITMAP_WORDS: usize = 21;

/// Free-block bitmaps and free count of one 2 MiB host frame.
#[derive(Clone)]
struct HugeFrameState {
    /// Free 4 KiB frames in this host frame.
    free: u16,
    /// Bit `i` of order `k` set: block `i` (of size `2^k`) is a free block.
    bits: [u64; BITMAP_WORDS],
}

impl HugeFrameState {
    fn empty() -> Self {
        let mut bits = [0u64; BITMAP_WORDS];
        bits[BITMAP_OFFSET[MAX_ORDER as usize]] = 1;
        HugeFrameState { free: HUGE_FRAME_PAGES as u16, bits }
    }

    fn test(&self, order: u8, index: u32) -> bool {
        let word = BITMAP_OFFSET[order as usize] + (index / 64) as usize;
        self.bits[word] & (1u64 << (index % 64)) != 0
    }

    fn set(&mut self, order: u8, index: u32, value: bool) {
        let word = BITMAP_OFFSET[order as usize] + (index / 64) as usize;
        if value {
            self.bits[word] |= 1u64 << (index % 64);
        } else {
            self.bits[word] &= !(1u64 << (index % 64));
        }
    }

    /// Lowest free block index of `order`, if any.
    fn first(&self, order: u8) -> Option<u32> {
        let start = BITMAP_OFFSET[order as usize];
        let words = ((HUGE_FRAME_PAGES >> order) as usize).div_ceil(64);
        (0..words).find_map(|w| {
            let word = self.bits[start + w];
            (word != 0).then(|| (w * 64) as u32 + word.trailing_zeros())
        })
    }

    fn has_order(&self, order: u8) -> bool {
        let start = BITMAP_OFFSET[order as usize];
        let words = ((HUGE_FRAME_PAGES >> order) as usize).div_ceil(64);
        self.bits[start..start + words].iter().any(|&w| w != 0)
    }
}

/// What a free did to the 2 MiB host frame holding the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeOutcome {
    /// The host frame still holds live frames.
    PartlyUsed,
    /// The host frame (index given) has no live frame any more.
    HugeFrameEmptied(u32),
}

/// Buddy allocator over `huge_frames * 512` frames.
pub struct BuddyAllocator {
    huge: Vec<HugeFrameState>,
    /// Per order 0..=8: host frames having a free block of that order, keyed by
    /// (free frames in the host frame, host frame index): fullest first.
    partial: [BTreeSet<(u16, u32)>; MAX_ORDER as usize],
    /// Host frames with no live frame.
    empty: BTreeSet<u32>,
    free_frames: u64,
    free_blocks: [u64; MAX_ORDER as usize + 1],
}

impl BuddyAllocator {
    /// Creates an allocator with every frame of `huge_frames` 2 MiB frames free.
    pub fn new(huge_frames: u32) -> Self {
        BuddyAllocator {
            huge: vec![HugeFrameState::empty(); huge_frames as usize],
            partial: Default::default(),
            empty: (0..huge_frames).collect(),
            free_frames: u64::from(huge_frames) * u64::from(HUGE_FRAME_PAGES),
            free_blocks: {
                let mut blocks = [0; MAX_ORDER as usize + 1];
                blocks[MAX_ORDER as usize] = u64::from(huge_frames);
                blocks
            },
        }
    }

    /// Number of 2 MiB host frames.
    pub fn huge_frames(&self) -> u32 {
        self.huge.len() as u32
    }

    /// Total number of 4 KiB frames.
    pub fn total_frames(&self) -> u64 {
        self.huge.len() as u64 * u64::from(HUGE_FRAME_PAGES)
    }

    /// Number of free 4 KiB frames.
    pub fn free_frames(&self) -> u64 {
        self.free_frames
    }

    /// Number of 2 MiB host frames with no live frame.
    pub fn empty_huge_frames(&self) -> u32 {
        self.empty.len() as u32
    }

    /// Free frames in host frame `hf`.
    pub fn free_in_huge_frame(&self, hf: u32) -> u32 {
        self.huge.get(hf as usize).map_or(0, |h| u32::from(h.free))
    }

    /// Number of free blocks of each order.
    pub fn free_blocks_by_order(&self) -> [u64; MAX_ORDER as usize + 1] {
        self.free_blocks
    }

    /// All free blocks as (first frame, order), for tests and diagnostics.
    pub fn free_block_list(&self) -> Vec<(FrameNo, u8)> {
        let mut out = Vec::new();
        for (hf, state) in self.huge.iter().enumerate() {
            for order in 0..=MAX_ORDER {
                for index in 0..(HUGE_FRAME_PAGES >> order) {
                    if state.test(order, index) {
                        out.push((hf as u32 * HUGE_FRAME_PAGES + (index << order), order));
                    }
                }
            }
        }
        out
    }

    /// The free blocks of 2 MiB frame `hf` as (offset inside it, order), by
    /// ascending order then offset (empty if `hf` is outside the pool).
    pub fn free_blocks_in(&self, hf: u32) -> Vec<(u16, u8)> {
        let Some(state) = self.huge.get(hf as usize) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for order in 0..=MAX_ORDER {
            let start = BITMAP_OFFSET[order as usize];
            let words = ((HUGE_FRAME_PAGES >> order) as usize).div_ceil(64);
            for (w, &word) in state.bits[start..start + words].iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let index = (w * 64) as u32 + bits.trailing_zeros();
                    bits &= bits - 1;
                    out.push(((index << order) as u16, order));
                }
            }
        }
        out
    }

    /// The allocated frames' offsets (0..512) inside 2 MiB frame `hf`, ascending.
    pub fn used_in(&self, hf: u32) -> Vec<u16> {
        if hf as usize >= self.huge.len() {
            return Vec::new();
        }
        let mut free = [false; HUGE_FRAME_PAGES as usize];
        for (offset, order) in self.free_blocks_in(hf) {
            let n = 1usize << order;
            free[offset as usize..offset as usize + n].iter_mut().for_each(|f| *f = true);
        }
        (0..HUGE_FRAME_PAGES as u16).filter(|&o| !free[o as usize]).collect()
    }

    /// Whether `frame` is currently free.
    pub fn is_free(&self, frame: FrameNo) -> bool {
        let (hf, offset) = split(frame);
        let Some(state) = self.huge.get(hf as usize) else {
            return false;
        };
        (0..=MAX_ORDER).any(|order| state.test(order, offset >> order))
    }

    /// Allocates a block of `2^order` frames, aligned to its size.
    ///
    /// Among partly used 2 MiB frames that can satisfy the request, the one with
    /// the fewest free frames wins (ties: the smallest block order, then the lowest
    /// host frame); an empty 2 MiB frame is used only when none can.
    pub fn alloc(&mut self, order: u8) -> Result<FrameNo> {
        if order > MAX_ORDER {
            return Err(Error::InvalidOrder(order));
        }
        let best =
            (order..MAX_ORDER).filter_map(|k| self.partial[k as usize].first().map(|&(free, hf)| (free, k, hf))).min();
        let (hf, block_order) = match best {
            Some((_, k, hf)) => (hf, k),
            None => match self.empty.first() {
                Some(&hf) => (hf, MAX_ORDER),
                None => return Err(Error::OutOfFrames(order)),
            },
        };
        self.detach(hf);
        let state = &mut self.huge[hf as usize];
        let index = state.first(block_order).unwrap_or(0);
        state.set(block_order, index, false);
        self.free_blocks[block_order as usize] -= 1;
        let offset = index << block_order;
        let mut k = block_order;
        while k > order {
            k -= 1;
            let upper = offset + (1 << k);
            state.set(k, upper >> k, true);
            self.free_blocks[k as usize] += 1;
        }
        // The lower half was kept each time: `offset` is the allocated block.
        state.free -= 1 << order;
        self.free_frames -= 1 << order;
        self.attach(hf);
        Ok(hf * HUGE_FRAME_PAGES + offset)
    }

    /// Allocates exactly `frame` (order 0), splitting the free block holding it.
    pub fn alloc_specific(&mut self, frame: FrameNo) -> Result<()> {
        let (hf, offset) = split(frame);
        if hf as usize >= self.huge.len() {
            return Err(Error::BadBlock(frame, 0));
        }
        let order =
            (0..=MAX_ORDER).find(|&k| self.huge[hf as usize].test(k, offset >> k)).ok_or(Error::NotFree(frame))?;
        self.detach(hf);
        let state = &mut self.huge[hf as usize];
        state.set(order, offset >> order, false);
        self.free_blocks[order as usize] -= 1;
        let mut head = offset & !((1 << order) - 1);
        let mut k = order;
        while k > 0 {
            k -= 1;
            let half = 1 << k;
            // Free the half that does not hold `frame`.
            if offset >= head + half {
                state.set(k, head >> k, true);
                head += half;
            } else {
                state.set(k, (head + half) >> k, true);
            }
            self.free_blocks[k as usize] += 1;
        }
        state.free -= 1;
        self.free_frames -= 1;
        self.attach(hf);
        Ok(())
    }

    /// Frees the block of `2^order` frames starting at `frame`, coalescing buddies.
    ///
    /// The block need not have been allocated with the same order: any aligned
    /// block whose frames are all allocated may be freed (e.g. single frames of an
    /// order-9 allocation, one by one).
    pub fn free(&mut self, frame: FrameNo, order: u8) -> Result<FreeOutcome> {
        if order > MAX_ORDER {
            return Err(Error::InvalidOrder(order));
        }
        let (hf, offset) = split(frame);
        if hf as usize >= self.huge.len() || offset & ((1 << order) - 1) != 0 {
            return Err(Error::BadBlock(frame, order));
        }
        if let Some(f) = (frame..frame + (1 << order)).find(|&f| self.is_free(f)) {
            return Err(Error::NotAllocated(f));
        }
        self.detach(hf);
        let state = &mut self.huge[hf as usize];
        let mut head = offset;
        let mut k = order;
        while k < MAX_ORDER {
            let buddy = head ^ (1 << k);
            if !state.test(k, buddy >> k) {
                break;
            }
            state.set(k, buddy >> k, false);
            self.free_blocks[k as usize] -= 1;
            head = head.min(buddy);
            k += 1;
        }
        state.set(k, head >> k, true);
        self.free_blocks[k as usize] += 1;
        state.free += 1 << order;
        self.free_frames += 1 << order;
        self.attach(hf);
        Ok(if k == MAX_ORDER { FreeOutcome::HugeFrameEmptied(hf) } else { FreeOutcome::PartlyUsed })
    }

    /// Removes `hf` from the preference indexes (before its free count changes).
    fn detach(&mut self, hf: u32) {
        let state = &self.huge[hf as usize];
        if u32::from(state.free) == HUGE_FRAME_PAGES {
            self.empty.remove(&hf);
            return;
        }
        for k in 0..MAX_ORDER {
            if state.has_order(k) {
                self.partial[k as usize].remove(&(state.free, hf));
            }
        }
    }

    /// Puts `hf` back in the preference indexes with its current free count.
    fn attach(&mut self, hf: u32) {
        let state = &self.huge[hf as usize];
        if u32::from(state.free) == HUGE_FRAME_PAGES {
            self.empty.insert(hf);
            return;
        }
        for k in 0..MAX_ORDER {
            if state.has_order(k) {
                self.partial[k as usize].insert((state.free, hf));
            }
        }
    }
}

/// Splits a frame number into (host frame, offset inside it).
fn split(frame: FrameNo) -> (u32, u32) {
    (frame / HUGE_FRAME_PAGES, frame % HUGE_FRAME_PAGES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_coalesces_to_empty() {
        let mut buddy = BuddyAllocator::new(2);
        let a = buddy.alloc(0).unwrap();
        let b = buddy.alloc(0).unwrap();
        assert_eq!((a, b), (0, 1));
        assert_eq!(buddy.empty_huge_frames(), 1);
        assert_eq!(buddy.free(a, 0), Ok(FreeOutcome::PartlyUsed));
        assert_eq!(buddy.free(b, 0), Ok(FreeOutcome::HugeFrameEmptied(0)));
        assert_eq!(buddy.free(b, 0), Err(Error::NotAllocated(1)));
        assert_eq!(buddy.free_frames(), 1024);
        assert_eq!(buddy.free_block_list(), vec![(0, 9), (512, 9)]);
    }

    #[test]
    fn prefers_fullest_partly_used() {
        let mut buddy = BuddyAllocator::new(3);
        let a = buddy.alloc(9).unwrap();
        let b = buddy.alloc(9).unwrap();
        // Leave 2 free frames in `a`'s host frame and 4 in `b`'s.
        buddy.free(a, 1).unwrap();
        buddy.free(b + 4, 2).unwrap();
        assert_eq!(buddy.alloc(0).unwrap(), a);
        assert_eq!(buddy.alloc(0).unwrap(), a + 1);
        assert_eq!(buddy.alloc(0).unwrap(), b + 4);
    }

    #[test]
    fn alloc_specific_splits() {
        let mut buddy = BuddyAllocator::new(1);
        buddy.alloc_specific(77).unwrap();
        assert!(!buddy.is_free(77));
        assert_eq!(buddy.free_frames(), 511);
        assert_eq!(buddy.alloc_specific(77), Err(Error::NotFree(77)));
        assert_eq!(buddy.free(77, 0), Ok(FreeOutcome::HugeFrameEmptied(0)));
    }

    #[test]
    fn free_blocks_and_used_of_one_huge_frame() {
        let mut buddy = BuddyAllocator::new(2);
        buddy.alloc_specific(3).unwrap();
        assert_eq!(buddy.used_in(0), vec![3]);
        let blocks = buddy.free_blocks_in(0);
        assert_eq!(blocks.iter().map(|&(_, k)| 1u32 << k).sum::<u32>(), 511);
        assert!(blocks.contains(&(2, 0)) && blocks.contains(&(0, 1)) && blocks.contains(&(256, 8)));
        assert_eq!(buddy.free_blocks_in(1), vec![(0, 9)]);
        assert!(buddy.used_in(1).is_empty());
    }
}
