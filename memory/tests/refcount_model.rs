//! Model-based test of GuestMap reference counts: after random sequences of
//! merge/share/unshare/migrate/discard/device-write/guest-write/guest-read/
//! protect over two VMs, the frame partition, every reference count, the
//! sharing statistics and every page's content equal a simple model.
//!
//! A discarded page maps the pool's zero region (frame `pool frames + page mod
//! 512`, counted by no reference and no used frame): the model's [`ZERO`]
//! group. It merges with nothing, stays there on unshare and migrate, reads as
//! zero, and leaves it for a fresh frame on a device write or a guest write
//! (resolved by the fault handler).

mod common;

use std::collections::HashMap;

use memory::manager::MergeOutcome;
use memory::{PageFlags, VmId, PAGE_SIZE};
use proptest::prelude::*;

const VMS: [(VmId, u32); 2] = [(1, 48), (2, 16)];
/// The pool's size in MiB, and its frames: the zero region's frames follow.
const POOL_MIB: u64 = 16;
const POOL_FRAMES: u32 = (POOL_MIB << 20) as u32 / PAGE_SIZE as u32;
/// The model's token of pages on the zero region.
const ZERO: u32 = u32::MAX;

#[derive(Debug, Clone)]
enum Op {
    Merge(usize, usize),
    Share(usize, usize),
    Unshare(usize),
    Migrate(usize),
    Discard(usize),
    Write(usize, u8),
    GuestWrite(usize, u8),
    GuestRead(usize),
    Protect(usize),
}

fn all_pages() -> Vec<(VmId, u32)> {
    VMS.iter().flat_map(|&(vm, n)| (0..n).map(move |p| (vm, p))).collect()
}

fn op() -> impl Strategy<Value = Op> {
    let n = all_pages().len();
    prop_oneof![
        5 => (0..n, 0..n).prop_map(|(a, b)| Op::Merge(a, b)),
        2 => (0..n, 0..n).prop_map(|(a, b)| Op::Share(a, b)),
        2 => (0..n).prop_map(Op::Unshare),
        2 => (0..n).prop_map(Op::Migrate),
        1 => (0..n).prop_map(Op::Discard),
        2 => (0..n, 0..3u8).prop_map(|(p, v)| Op::Write(p, v)),
        2 => (0..n, 0..3u8).prop_map(|(p, v)| Op::GuestWrite(p, v)),
        1 => (0..n).prop_map(Op::GuestRead),
        1 => (0..n).prop_map(Op::Protect),
    ]
}

/// The model: per page a sharing-group token and a content byte.
struct Model {
    token: Vec<u32>,
    content: Vec<u8>,
    next: u32,
}

impl Model {
    fn fresh(&mut self, i: usize) {
        self.token[i] = self.next;
        self.next += 1;
    }
    /// Pages sharing page `i`'s frame (0 on the zero region: no reference).
    fn group_size(&self, i: usize) -> u32 {
        if self.token[i] == ZERO {
            return 0;
        }
        self.token.iter().filter(|&&t| t == self.token[i]).count() as u32
    }
    /// Whether a write must give page `i` a new frame.
    fn must_leave(&self, i: usize) -> bool {
        self.token[i] == ZERO || self.group_size(i) > 1
    }
    fn join(&mut self, keep: usize, other: usize) {
        let (from, to) = (self.token[other], self.token[keep]);
        for t in self.token.iter_mut() {
            if *t == from {
                *t = to;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn refcounts_match_model(ops in proptest::collection::vec(op(), 1..50)) {
        let Some(mgr) = common::manager_or_skip("refcounts_match_model", POOL_MIB) else {
            return Ok(());
        };
        let _w = common::Watchdog::new("refcounts_match_model", 120);
        let guests: HashMap<VmId, memory::GuestMap> = VMS
            .iter()
            .map(|&(vm, n)| (vm, mgr.create_guest(vm, u64::from(n) * PAGE_SIZE as u64).unwrap()))
            .collect();
        // Cross-VM sharing needs one merge domain.
        for (vm, _) in VMS {
            mgr.set_merge(vm, false, 1).unwrap();
        }
        let pages = all_pages();
        let mut model = Model { token: (0..pages.len() as u32).collect(), content: vec![0; pages.len()], next: pages.len() as u32 };
        for (i, &(vm, p)) in pages.iter().enumerate() {
            let v = (i % 3) as u8;
            guests[&vm].write_bytes(u64::from(p) * PAGE_SIZE as u64, &[v; PAGE_SIZE]).unwrap();
            model.content[i] = v;
        }
        for op in ops {
            match op {
                Op::Merge(a, b) | Op::Share(a, b) => {
                    let out = if matches!(op, Op::Merge(..)) {
                        mgr.merge_pages(pages[a], pages[b]).unwrap()
                    } else {
                        let frame = mgr.frame_of(pages[a].0, pages[a].1).unwrap();
                        mgr.share(pages[b].0, pages[b].1, frame).unwrap()
                    };
                    let expected = if model.token[a] == ZERO && model.token[b] == ZERO {
                        MergeOutcome::AlreadyShared
                    } else if model.token[a] == ZERO || model.token[b] == ZERO {
                        MergeOutcome::Differs
                    } else if model.token[a] == model.token[b] {
                        MergeOutcome::AlreadyShared
                    } else if model.content[a] == model.content[b] {
                        model.join(a, b);
                        let frame = mgr.frame_of(pages[a].0, pages[a].1).unwrap();
                        MergeOutcome::Merged { frame }
                    } else {
                        MergeOutcome::Differs
                    };
                    prop_assert_eq!(out, expected);
                }
                Op::Unshare(i) => {
                    let changed = mgr.unshare(pages[i].0, pages[i].1).unwrap();
                    if model.group_size(i) > 1 {
                        prop_assert!(changed);
                        model.fresh(i);
                    }
                }
                Op::Migrate(i) => {
                    let frame = mgr.frame_of(pages[i].0, pages[i].1).unwrap();
                    let new = mgr.migrate(frame).unwrap();
                    if model.token[i] == ZERO {
                        prop_assert_eq!(new, frame, "the zero region stays");
                    } else {
                        prop_assert_ne!(new, frame);
                    }
                    prop_assert_eq!(mgr.frame_refs(frame), 0);
                }
                Op::Discard(i) => {
                    mgr.discard(pages[i].0, pages[i].1).unwrap();
                    model.token[i] = ZERO;
                    model.content[i] = 0;
                    prop_assert!(mgr.page_flags(pages[i].0, pages[i].1).unwrap().contains(PageFlags::ZERO));
                }
                Op::Write(i, v) => {
                    let (vm, p) = pages[i];
                    guests[&vm].write_bytes(u64::from(p) * PAGE_SIZE as u64, &[v; PAGE_SIZE]).unwrap();
                    if model.must_leave(i) {
                        model.fresh(i);
                    }
                    model.content[i] = v;
                }
                Op::GuestWrite(i, v) => {
                    // A store through the guest view (from another thread: it may
                    // block in a write fault until the handler resolves it).
                    let (vm, p) = pages[i];
                    common::fill_page_from_thread(guests[&vm].page_addr(p).unwrap(), u64::from_ne_bytes([v; 8]));
                    if model.must_leave(i) {
                        model.fresh(i);
                    }
                    model.content[i] = v;
                }
                Op::GuestRead(i) => {
                    let (vm, p) = pages[i];
                    let want = u64::from_ne_bytes([model.content[i]; 8]);
                    // SAFETY: a page of a live guest map; nothing writes it now.
                    let holds = unsafe { common::page_is(guests[&vm].page_addr(p).unwrap(), want) };
                    prop_assert!(holds, "guest read of page {:?}", pages[i]);
                }
                Op::Protect(i) => mgr.protect(pages[i].0, pages[i].1).unwrap(),
            }
            // Partition, counts, flags and contents against the model.
            let frames: Vec<u32> = pages.iter().map(|&(vm, p)| mgr.frame_of(vm, p).unwrap()).collect();
            for i in 0..pages.len() {
                let refs = mgr.frame_refs(frames[i]);
                prop_assert_eq!(refs, model.group_size(i), "refcount of page {:?}", pages[i]);
                let flags = mgr.page_flags(pages[i].0, pages[i].1).unwrap();
                if model.token[i] == ZERO {
                    prop_assert_eq!(frames[i], POOL_FRAMES + pages[i].1 % 512, "zero frame of page {:?}", pages[i]);
                    prop_assert!(flags.contains(PageFlags::PROTECTED.with(PageFlags::ZERO)), "{:?}", flags);
                } else {
                    prop_assert!(frames[i] < POOL_FRAMES);
                }
                if refs > 1 {
                    prop_assert!(flags.contains(PageFlags::SHARED) && flags.contains(PageFlags::PROTECTED));
                }
                let mut buf = vec![0u8; PAGE_SIZE];
                guests[&pages[i].0].read_bytes(u64::from(pages[i].1) * PAGE_SIZE as u64, &mut buf).unwrap();
                prop_assert!(buf.iter().all(|&b| b == model.content[i]), "content of page {:?}", pages[i]);
                for j in 0..i {
                    // Zero-region pages share a frame only at the same page number.
                    let same = model.token[i] == model.token[j]
                        && (model.token[i] != ZERO || pages[i].1 % 512 == pages[j].1 % 512);
                    prop_assert_eq!(frames[i] == frames[j], same);
                }
            }
            let s = mgr.stats();
            let mut groups: HashMap<u32, u64> = HashMap::new();
            for &t in model.token.iter().filter(|&&t| t != ZERO) {
                *groups.entry(t).or_default() += 1;
            }
            prop_assert_eq!(s.frames_live, groups.len() as u64);
            prop_assert_eq!(s.frames_used, groups.len() as u64);
            prop_assert_eq!(s.frames_shared, groups.values().filter(|&&n| n > 1).count() as u64);
            prop_assert_eq!(s.pages_sharing, groups.values().filter(|&&n| n > 1).map(|n| n - 1).sum::<u64>());
        }
        drop(guests);
        let s = mgr.stats();
        prop_assert_eq!((s.frames_used, s.host_bytes), (0, 0));
    }
}
