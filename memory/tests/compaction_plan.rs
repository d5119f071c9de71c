//! Property tests of compaction's planning (`memory::compact::plan`) against
//! simple models: random allocation/free histories of a real buddy allocator,
//! then source/target selection and the per-order free lists.

use std::collections::{BTreeSet, HashSet};

use memory::compact::plan::{self, FreeLists, HugeFrameUse};
use memory::{BuddyAllocator, FrameNo, HUGE_FRAME_PAGES, MAX_ORDER};
use proptest::prelude::*;

/// Replays `ops` on an allocator of `huge` 2 MiB frames: (true, order) allocates
/// a block of `order`, (false, i) frees the i-th live block (modulo their number).
fn history(huge: u32, ops: &[(bool, u8)], frees_first: &[u16]) -> (BuddyAllocator, Vec<(FrameNo, u8)>) {
    let mut buddy = BuddyAllocator::new(huge);
    let mut live: Vec<(FrameNo, u8)> = Vec::new();
    for &(alloc, x) in ops {
        if alloc {
            if let Ok(f) = buddy.alloc(x % 4) {
                live.push((f, x % 4));
            }
        } else if !live.is_empty() {
            let (f, o) = live.swap_remove(x as usize % live.len());
            buddy.free(f, o).unwrap();
        }
    }
    // Free single frames out of the remaining blocks (scatter).
    for &i in frees_first {
        if live.is_empty() {
            break;
        }
        let (f, o) = live.swap_remove(i as usize % live.len());
        // Free all but the first frame of the block, one by one.
        for g in f + 1..f + (1 << o) {
            buddy.free(g, 0).unwrap();
        }
        live.push((f, 0));
    }
    (buddy, live)
}

fn snapshot(buddy: &BuddyAllocator) -> Vec<HugeFrameUse> {
    (0..buddy.huge_frames())
        .filter(|&hf| buddy.free_in_huge_frame(hf) < HUGE_FRAME_PAGES)
        .map(|hf| HugeFrameUse { index: hf, used: buddy.used_in(hf), free_blocks: buddy.free_blocks_in(hf) })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn selection_and_moves_reach_the_model_packing(
        huge in 1u32..8,
        ops in proptest::collection::vec((any::<bool>(), any::<u8>()), 0..600),
        scatter in proptest::collection::vec(any::<u16>(), 0..100),
    ) {
        let (mut buddy, _) = history(huge, &ops, &scatter);
        let in_use = snapshot(&buddy);
        let used: u64 = in_use.iter().map(|h| h.used.len() as u64).sum();
        prop_assert_eq!(used, buddy.total_frames() - buddy.free_frames());
        let p = plan::plan(&in_use);
        let ideal = used.div_ceil(u64::from(HUGE_FRAME_PAGES));
        prop_assert_eq!(p.ideal, ideal);
        prop_assert_eq!(p.in_use, in_use.len() as u64);
        prop_assert!(p.unplaced.is_empty());
        // The least occupied frames, as many as leave `ideal` in use.
        prop_assert_eq!(p.sources.len() as u64, in_use.len() as u64 - ideal);
        let sources: HashSet<u32> = p.sources.iter().copied().collect();
        let max_source = in_use.iter().filter(|h| sources.contains(&h.index)).map(|h| h.used.len()).max();
        let min_kept = in_use.iter().filter(|h| !sources.contains(&h.index)).map(|h| h.used.len()).min();
        if let (Some(a), Some(b)) = (max_source, min_kept) {
            prop_assert!(a <= b, "a source ({a} used) is fuller than a kept frame ({b} used)");
        }
        // Every frame of every source moves exactly once, to a distinct free
        // frame of a non-source, non-empty 2 MiB frame.
        let in_use_set: HashSet<u32> = in_use.iter().map(|h| h.index).collect();
        let mut from = BTreeSet::new();
        let mut to = BTreeSet::new();
        for &(f, t) in &p.moves {
            prop_assert!(sources.contains(&(f / HUGE_FRAME_PAGES)));
            prop_assert!(!sources.contains(&(t / HUGE_FRAME_PAGES)), "target {} inside a source", t);
            prop_assert!(in_use_set.contains(&(t / HUGE_FRAME_PAGES)), "target {} in an empty 2 MiB frame", t);
            prop_assert!(buddy.is_free(t));
            prop_assert!(from.insert(f) && to.insert(t));
        }
        let expected: BTreeSet<FrameNo> = in_use
            .iter()
            .filter(|h| sources.contains(&h.index))
            .flat_map(|h| h.used.iter().map(move |&o| h.index * HUGE_FRAME_PAGES + u32::from(o)))
            .collect();
        prop_assert_eq!(&from, &expected);
        // The moves fit: applied to the allocator, the frames in use are the packing.
        for &(f, t) in &p.moves {
            buddy.alloc_specific(t).unwrap();
            buddy.free(f, 0).unwrap();
        }
        prop_assert_eq!(u64::from(buddy.huge_frames() - buddy.empty_huge_frames()), ideal);
    }

    #[test]
    fn free_lists_match_a_block_model(
        huge in 1u32..4,
        ops in proptest::collection::vec((any::<bool>(), any::<u8>()), 0..300),
        takes in proptest::collection::vec(0u8..=MAX_ORDER, 0..200),
    ) {
        let (buddy, _) = history(huge, &ops, &[]);
        let mut lists = FreeLists::default();
        // Model: the listed blocks, as (first, order).
        let mut model: Vec<(FrameNo, u8)> = Vec::new();
        for hf in 0..buddy.huge_frames() {
            let free = buddy.free_in_huge_frame(hf);
            for (offset, order) in buddy.free_blocks_in(hf) {
                let first = hf * HUGE_FRAME_PAGES + u32::from(offset);
                lists.push(free, first, order);
                model.push((first, order));
            }
        }
        for k in takes {
            let exact = model.iter().any(|&(_, o)| o == k);
            let larger = model.iter().any(|&(_, o)| o >= k);
            let got = lists.take(k);
            prop_assert_eq!(got.is_some(), larger);
            let Some(b) = got else { continue };
            prop_assert_eq!(b % (1 << k), 0, "block {} misaligned for order {}", b, k);
            let i = model.iter().position(|&(f, o)| f <= b && b + (1 << k) <= f + (1 << o));
            prop_assert!(i.is_some(), "block {} of order {} was not free", b, k);
            let (f, o) = model.swap_remove(i.unwrap_or(0));
            prop_assert!(!exact || o == k, "split an order-{} block although an order-{} block was free", o, k);
            // Put back the buddy decomposition of the rest of the block.
            let mut head = f;
            let mut order = o;
            while order > k {
                order -= 1;
                let half = 1 << order;
                if b >= head + half {
                    model.push((head, order));
                    head += half;
                } else {
                    model.push((head + half, order));
                }
            }
            let model_free: u64 = model.iter().map(|&(_, o)| 1u64 << o).sum();
            prop_assert_eq!(lists.free_frames(), model_free);
        }
    }
}
