//! Model-based tests of the buddy allocator and the frame pool: no frame handed
//! out twice, frees coalesce, partly used 2 MiB frames are preferred (fullest
//! first), empty 2 MiB frames are punched and counted.

use std::collections::BTreeSet;

use memory::buddy::BuddyAllocator;
use memory::{FramePool, PoolConfig, HUGE_FRAME_PAGES, HUGE_FRAME_SIZE, MAX_ORDER};
use proptest::prelude::*;

const HUGE_FRAMES: u32 = 4;

#[derive(Debug, Clone)]
enum Op {
    Alloc(u8),
    /// Free the aligned block of this order (or the largest fully allocated one
    /// below it) around the n-th allocated frame.
    Free(usize, u8),
    AllocSpecific(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..=MAX_ORDER).prop_map(Op::Alloc),
        4 => (any::<usize>(), 0..=MAX_ORDER).prop_map(|(i, o)| Op::Free(i, o)),
        1 => (0..HUGE_FRAMES * HUGE_FRAME_PAGES).prop_map(Op::AllocSpecific),
    ]
}

fn used_in(model: &BTreeSet<u32>, hf: u32) -> u32 {
    model.range(hf * HUGE_FRAME_PAGES..(hf + 1) * HUGE_FRAME_PAGES).count() as u32
}

fn block_free(model: &BTreeSet<u32>, start: u32, order: u8) -> bool {
    model.range(start..start + (1 << order)).next().is_none()
}

/// Host frames that are partly used and have a free aligned block of `order`.
fn partial_candidates(model: &BTreeSet<u32>, order: u8) -> Vec<(u32, u32)> {
    (0..HUGE_FRAMES)
        .filter_map(|hf| {
            let used = used_in(model, hf);
            if used == 0 || used == HUGE_FRAME_PAGES {
                return None;
            }
            let base = hf * HUGE_FRAME_PAGES;
            (0..HUGE_FRAME_PAGES >> order).any(|i| block_free(model, base + (i << order), order)).then_some((hf, used))
        })
        .collect()
}

/// Picks the block to free for `Op::Free`.
fn block_to_free(model: &BTreeSet<u32>, index: usize, order: u8) -> Option<(u32, u8)> {
    let frame = *model.iter().nth(index % model.len().max(1))?;
    (0..=order).rev().find_map(|k| {
        let start = frame & !((1u32 << k) - 1);
        let all = model.range(start..start + (1 << k)).count() == 1 << k;
        all.then_some((start, k))
    })
}

/// Free blocks must tile the free frames exactly, and be fully coalesced.
fn check_free_blocks(buddy: &BuddyAllocator, model: &BTreeSet<u32>) -> Result<(), TestCaseError> {
    let blocks = buddy.free_block_list();
    let mut covered = BTreeSet::new();
    let set: BTreeSet<(u32, u8)> = blocks.iter().copied().collect();
    for &(start, order) in &blocks {
        for f in start..start + (1 << order) {
            prop_assert!(!model.contains(&f), "allocated frame {} listed free", f);
            prop_assert!(covered.insert(f), "frame {} in two free blocks", f);
        }
        if order < MAX_ORDER {
            let buddy_start = start ^ (1 << order);
            prop_assert!(!set.contains(&(buddy_start, order)), "buddies {} and {} not coalesced", start, buddy_start);
        }
    }
    let total = HUGE_FRAMES * HUGE_FRAME_PAGES;
    prop_assert_eq!(covered.len() as u32 + model.len() as u32, total);
    prop_assert_eq!(buddy.free_frames(), u64::from(total) - model.len() as u64);
    let empty = (0..HUGE_FRAMES).filter(|&hf| used_in(model, hf) == 0).count() as u32;
    prop_assert_eq!(buddy.empty_huge_frames(), empty);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn buddy_matches_model(ops in proptest::collection::vec(op(), 1..120)) {
        let mut buddy = BuddyAllocator::new(HUGE_FRAMES);
        let mut model = BTreeSet::new();
        for op in ops {
            match op {
                Op::Alloc(order) => {
                    let candidates = partial_candidates(&model, order);
                    let any_empty = (0..HUGE_FRAMES).any(|hf| used_in(&model, hf) == 0);
                    match buddy.alloc(order) {
                        Ok(start) => {
                            prop_assert_eq!(start % (1 << order), 0, "misaligned");
                            prop_assert!(start + (1 << order) <= HUGE_FRAMES * HUGE_FRAME_PAGES);
                            prop_assert!(block_free(&model, start, order), "frame handed out twice");
                            let hf = start / HUGE_FRAME_PAGES;
                            if !candidates.is_empty() {
                                let fullest = candidates.iter().map(|&(_, u)| u).max().unwrap_or(0);
                                let chosen = candidates.iter().find(|&&(h, _)| h == hf);
                                prop_assert!(chosen.is_some(), "took an empty 2 MiB frame while a partly used one fits");
                                prop_assert_eq!(chosen.map(|c| c.1), Some(fullest), "not the fullest 2 MiB frame");
                            }
                            model.extend(start..start + (1 << order));
                        }
                        Err(_) => prop_assert!(candidates.is_empty() && !any_empty, "alloc failed though a block fits"),
                    }
                }
                Op::Free(index, order) => {
                    if let Some((start, k)) = block_to_free(&model, index, order) {
                        let before = used_in(&model, start / HUGE_FRAME_PAGES);
                        let outcome = buddy.free(start, k).unwrap();
                        for f in start..start + (1 << k) {
                            model.remove(&f);
                        }
                        let emptied = before == 1 << k;
                        prop_assert_eq!(matches!(outcome, memory::buddy::FreeOutcome::HugeFrameEmptied(_)), emptied);
                        prop_assert!(buddy.free(start, k).is_err(), "double free accepted");
                    }
                }
                Op::AllocSpecific(frame) => {
                    let res = buddy.alloc_specific(frame);
                    prop_assert_eq!(res.is_ok(), !model.contains(&frame));
                    model.insert(frame);
                }
            }
            check_free_blocks(&buddy, &model)?;
        }
    }

    #[test]
    fn pool_punches_empty_huge_frames(ops in proptest::collection::vec((any::<bool>(), any::<usize>()), 1..80)) {
        let config = PoolConfig { capacity_bytes: (HUGE_FRAMES as u64) * HUGE_FRAME_SIZE as u64, transparent_huge_pages: false };
        let mut pool = FramePool::new(&config).unwrap();
        let mut live: Vec<u32> = Vec::new();
        let mut returned = 0u64;
        for (alloc, pick) in ops {
            if alloc || live.is_empty() {
                let Ok(frame) = pool.alloc(0) else { continue };
                prop_assert!(pool.is_hole(frame, 1).unwrap(), "new frame not zero/unbacked");
                pool.write(frame, 0, &frame.to_ne_bytes()).unwrap();
                live.push(frame);
            } else {
                let frame = live.swap_remove(pick % live.len());
                let hf = frame / HUGE_FRAME_PAGES;
                pool.free(frame, 0).unwrap();
                prop_assert!(pool.is_hole(frame, 1).unwrap(), "freed frame still holds memory");
                if !live.iter().any(|&f| f / HUGE_FRAME_PAGES == hf) {
                    returned += 1;
                    prop_assert!(pool.is_hole(hf * HUGE_FRAME_PAGES, u64::from(HUGE_FRAME_PAGES)).unwrap());
                }
            }
            prop_assert_eq!(pool.huge_frames_returned(), returned);
            prop_assert_eq!(pool.host_bytes(), live.len() as u64 * 4096);
            for &f in &live {
                let mut buf = [0u8; 4];
                pool.read(f, 0, &mut buf).unwrap();
                prop_assert_eq!(u32::from_ne_bytes(buf), f, "live frame clobbered");
            }
        }
    }
}
