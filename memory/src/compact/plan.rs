//! Pure planning of a compaction pass: which 2 MiB frames to empty (sources),
//! where each of their live frames goes (targets), in which order.
//!
//! No system calls and no manager state, so it can be model-tested on its own
//! (`tests/compaction_plan.rs`).
//!
//! ## Selection
//!
//! Sources are the least occupied 2 MiB frames holding live frames, taken in
//! order of occupancy while the live frames of all sources still fit in the
//! free slots of the remaining (non-source) in-use 2 MiB frames. With `L` live
//! frames in `n` in-use 2 MiB frames this stops exactly at `n - ideal` sources,
//! `ideal = ceil(L / 512)`: the sum of the `m` smallest occupancies fits in the
//! holes of the other `n - m` frames iff `L <= 512 (n - m)`. Targets are the
//! free slots of the non-source in-use frames: never a slot inside a source,
//! never an empty 2 MiB frame (that would use a new one).
//!
//! ## Placement: per-order free lists
//!
//! The free slots of the targets are kept as the buddy allocator's maximal
//! free blocks, one list per order ([`FreeLists`]), fullest target first. A
//! run of consecutive live frames of a source (usually consecutive guest pages
//! too) is cut into power-of-two chunks, largest first; a chunk of `2^k` frames
//! takes a free block of order `k` whole when one exists (no split), else the
//! lower part of the smallest larger block (whose rest goes back to the lists
//! at its orders), else it is halved. Order-0 chunks always fit while the
//! targets have free slots, so every planned source empties.

use std::collections::{HashMap, HashSet};

use crate::{FrameNo, HUGE_FRAME_PAGES, MAX_ORDER};

/// One 2 MiB frame holding live frames, as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HugeFrameUse {
    /// Index of the 2 MiB frame (its first 4 KiB frame is `index * 512`).
    pub index: u32,
    /// Offsets (0..512) of its allocated 4 KiB frames, ascending.
    pub used: Vec<u16>,
    /// Its free blocks as (offset, order), as the buddy allocator holds them.
    pub free_blocks: Vec<(u16, u8)>,
}

/// A planned pass.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// 2 MiB frames to empty, least occupied first.
    pub sources: Vec<u32>,
    /// (live frame, free target frame), source by source, runs in order.
    pub moves: Vec<(FrameNo, FrameNo)>,
    /// Frames of the sources no target slot was found for (empty unless the
    /// input is inconsistent).
    pub unplaced: Vec<FrameNo>,
    /// 2 MiB frames holding live frames.
    pub in_use: u64,
    /// ceil(allocated frames / 512).
    pub ideal: u64,
    /// The targets' free blocks no move was planned into: spare slots for a
    /// frame whose planned slot was taken before its move ran.
    pub spare: FreeLists,
}

/// Fewest 2 MiB frames `frames` 4 KiB frames fit in.
pub fn ideal_huge_frames(frames: u64) -> u64 {
    frames.div_ceil(u64::from(HUGE_FRAME_PAGES))
}

/// Picks the sources among `in_use` (2 MiB frames holding live frames): the
/// least occupied, as many as fit into the others' free slots.
pub fn select_sources(in_use: &[HugeFrameUse]) -> Vec<u32> {
    let mut order: Vec<&HugeFrameUse> = in_use.iter().filter(|h| !h.used.is_empty()).collect();
    order.sort_by_key(|h| (h.used.len(), h.index));
    let live: u64 = order.iter().map(|h| h.used.len() as u64).sum();
    let keep = ideal_huge_frames(live) as usize;
    let n = order.len();
    order.iter().take(n.saturating_sub(keep)).map(|h| h.index).collect()
}

/// Plans a pass over the 2 MiB frames `in_use` (those holding live frames).
pub fn plan(in_use: &[HugeFrameUse]) -> Plan {
    let live: u64 = in_use.iter().map(|h| h.used.len() as u64).sum();
    let sources = select_sources(in_use);
    let is_source: HashSet<u32> = sources.iter().copied().collect();
    let by_index: HashMap<u32, &HugeFrameUse> = in_use.iter().map(|h| (h.index, h)).collect();
    let mut lists = FreeLists::default();
    for h in in_use.iter().filter(|h| !h.used.is_empty() && !is_source.contains(&h.index)) {
        let free = HUGE_FRAME_PAGES as usize - h.used.len();
        for &(offset, order) in &h.free_blocks {
            lists.push(free as u32, h.index * HUGE_FRAME_PAGES + u32::from(offset), order);
        }
    }
    let mut moves = Vec::new();
    let mut unplaced = Vec::new();
    for &src in &sources {
        let Some(h) = by_index.get(&src) else { continue };
        for (start, len) in runs(&h.used) {
            let first = src * HUGE_FRAME_PAGES + u32::from(start);
            place_run(&mut lists, first, u32::from(len), &mut moves, &mut unplaced);
        }
    }
    Plan {
        sources,
        moves,
        unplaced,
        in_use: in_use.iter().filter(|h| !h.used.is_empty()).count() as u64,
        ideal: ideal_huge_frames(live),
        spare: lists,
    }
}

/// Runs of consecutive offsets in ascending `used`, as (start, length).
fn runs(used: &[u16]) -> Vec<(u16, u16)> {
    let mut out: Vec<(u16, u16)> = Vec::new();
    for &o in used {
        match out.last_mut() {
            Some((s, l)) if *s + *l == o => *l += 1,
            _ => out.push((o, 1)),
        }
    }
    out
}

/// Places `len` consecutive frames from `first` into target blocks.
fn place_run(
    lists: &mut FreeLists,
    first: FrameNo,
    len: u32,
    moves: &mut Vec<(FrameNo, FrameNo)>,
    unplaced: &mut Vec<FrameNo>,
) {
    let mut done = 0;
    while done < len {
        if let Some(target) = lists.take_run(len - done) {
            moves.extend((0..len - done).map(|i| (first + done + i, target + i)));
            return;
        }
        let mut order = (31 - (len - done).leading_zeros()).min(u32::from(MAX_ORDER)) as u8;
        let block = loop {
            if let Some(b) = lists.take(order) {
                break Some(b);
            }
            if order == 0 {
                break None;
            }
            order -= 1;
        };
        let n = 1u32 << order;
        match block {
            Some(target) => moves.extend((0..n).map(|i| (first + done + i, target + i))),
            None => unplaced.extend((0..len - done).map(|i| first + done + i)),
        }
        if block.is_none() {
            return;
        }
        done += n;
    }
}

/// Free blocks of the target 2 MiB frames, one list per buddy order, the
/// fullest target (fewest free frames) first.
#[derive(Debug, Clone, Default)]
pub struct FreeLists {
    /// Per order: (free frames of its 2 MiB frame, first frame), sorted so that
    /// the last element is the one to take.
    lists: [Vec<(u32, FrameNo)>; MAX_ORDER as usize + 1],
    sorted: bool,
}

impl FreeLists {
    /// Adds a free block of `2^order` frames at `first`, in a 2 MiB frame with `free` free frames.
    pub fn push(&mut self, free: u32, first: FrameNo, order: u8) {
        if let Some(list) = self.lists.get_mut(order as usize) {
            list.push((free, first));
            self.sorted = false;
        }
    }

    /// Number of free frames in all lists.
    pub fn free_frames(&self) -> u64 {
        self.lists.iter().enumerate().map(|(k, l)| (l.len() as u64) << k).sum()
    }

    /// Takes the first `len` frames (not a power of two, at most 512) of a
    /// listed block of the smallest order that holds them, only if one exists
    /// at exactly that order (no larger block is split for it); the rest of the
    /// block goes back to the lists as aligned blocks. Keeps a run that does
    /// not fill a power-of-two block in one piece: one remap instead of one
    /// per power-of-two chunk.
    pub fn take_run(&mut self, len: u32) -> Option<FrameNo> {
        if len < 2 || len.is_power_of_two() {
            return None;
        }
        let order = u8::try_from(32 - (len - 1).leading_zeros()).ok().filter(|&k| k <= MAX_ORDER)?;
        self.sort();
        let (free, first) = self.lists[order as usize].pop()?;
        let size = 1u32 << order;
        let mut at = len;
        while at < size {
            // The largest aligned block starting at `at` inside the block.
            let j = at.trailing_zeros().min(31 - (size - at).leading_zeros());
            let list = &mut self.lists[j as usize];
            let entry = (free, first + at);
            let pos = list.partition_point(|e| *e > entry);
            list.insert(pos, entry);
            at += 1 << j;
        }
        Some(first)
    }

    fn sort(&mut self) {
        if !self.sorted {
            for list in &mut self.lists {
                // Fullest first = smallest free count popped last.
                list.sort_unstable_by(|a, b| b.cmp(a));
            }
            self.sorted = true;
        }
    }

    /// Takes a block of exactly `2^order` frames: a listed block of that order,
    /// else the lower part of the smallest larger one (its other parts go back
    /// to the lists at their orders). Returns its first frame.
    pub fn take(&mut self, order: u8) -> Option<FrameNo> {
        self.sort();
        let k = (order..=MAX_ORDER).find(|&k| !self.lists[k as usize].is_empty())?;
        let (free, first) = self.lists[k as usize].pop()?;
        // Split down to `order`, returning the upper halves.
        for j in (order..k).rev() {
            let upper = first + (1 << j);
            let list = &mut self.lists[j as usize];
            let at = list.partition_point(|e| *e > (free, upper));
            list.insert(at, (free, upper));
        }
        Some(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hf(index: u32, used: &[u16], free_blocks: &[(u16, u8)]) -> HugeFrameUse {
        HugeFrameUse { index, used: used.to_vec(), free_blocks: free_blocks.to_vec() }
    }

    #[test]
    fn a_run_takes_a_block_of_its_order() {
        // Frame 0: 508 used, a free order-2 block at 508; frame 1: a run of 4 at 0.
        let full: Vec<u16> = (0..508).collect();
        let plan = plan(&[hf(0, &full, &[(508, 2)]), hf(1, &[0, 1, 2, 3], &[(4, 2), (8, 3)])]);
        assert_eq!(plan.sources, vec![1]);
        assert_eq!(plan.moves, vec![(512, 508), (513, 509), (514, 510), (515, 511)]);
        assert!(plan.unplaced.is_empty());
        assert_eq!((plan.in_use, plan.ideal), (2, 1));
    }

    #[test]
    fn a_run_of_three_takes_one_order_2_block() {
        let mut lists = FreeLists::default();
        lists.push(4, 4, 2);
        lists.push(4, 16, 1);
        lists.push(4, 20, 0);
        assert_eq!(lists.take_run(3), Some(4));
        // The block's last frame is back at order 0.
        assert_eq!(lists.free_frames(), 4);
        assert_eq!(lists.take_run(3), None);
        let mut moves = Vec::new();
        let mut unplaced = Vec::new();
        let mut lists = FreeLists::default();
        lists.push(8, 8, 3);
        place_run(&mut lists, 100, 5, &mut moves, &mut unplaced);
        assert_eq!(moves, (0..5).map(|i| (100 + i, 8 + i)).collect::<Vec<_>>());
        assert_eq!(lists.take(1), Some(14));
        assert_eq!(lists.take(0), Some(13));
        assert_eq!(lists.free_frames(), 0);
    }

    #[test]
    fn free_lists_split_larger_blocks() {
        let mut lists = FreeLists::default();
        lists.push(8, 8, 3);
        assert_eq!(lists.take(0), Some(8));
        assert_eq!(lists.free_frames(), 7);
        assert_eq!(lists.take(2), Some(12));
        assert_eq!(lists.take(1), Some(10));
        assert_eq!(lists.take(0), Some(9));
        assert_eq!(lists.take(0), None);
    }
}
