//! Model-based test of background reuse (the transition of a sole-mapped
//! merged page, `MAPPED PROTECTED SHARED` with one mapper, to `MAPPED`,
//! writable, before any write): after random sequences of merge / unshare /
//! migrate / discard / device write / guest write / VM destruction over two
//! VMs, every reference count, flag, content and the copy-on-write counters
//! equal a simple model.
//!
//! - With background reuse on, the queue is drained (on this thread, or by
//!   the fault handler's thread first) after every operation: every page left
//!   as the only mapper of a merged frame is made writable in place (same
//!   frame, neither `PROTECTED` nor `SHARED`), counted once in
//!   `cow_background_reuses` (host and its VM), and no write ever reuses a
//!   frame at fault time (`cow_reuses` stays 0).
//! - With it off, such a page stays `PROTECTED | SHARED` with one mapper
//!   and its next write (or unshare) reuses the frame at fault time
//!   (`cow_reuses`), never counted as a background reuse.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use memory::manager::MergeOutcome;
use memory::{GuestMap, MemoryManager, PageFlags, VmId, PAGE_SIZE};
use proptest::prelude::*;

const VMS: [(VmId, u32); 2] = [(1, 24), (2, 16)];
/// The model's token of pages on the zero region.
const ZERO: u32 = u32::MAX;

#[derive(Debug, Clone)]
enum Op {
    Merge(usize, usize),
    Unshare(usize),
    Migrate(usize),
    Discard(usize),
    Write(usize, u8),
    GuestWrite(usize, u8),
    DestroyVm2,
}

fn all_pages() -> Vec<(VmId, u32)> {
    VMS.iter().flat_map(|&(vm, n)| (0..n).map(move |p| (vm, p))).collect()
}

fn op() -> impl Strategy<Value = Op> {
    let n = all_pages().len();
    prop_oneof![
        8 => (0..n, 0..n).prop_map(|(a, b)| Op::Merge(a, b)),
        2 => (0..n).prop_map(Op::Unshare),
        2 => (0..n).prop_map(Op::Migrate),
        1 => (0..n).prop_map(Op::Discard),
        2 => (0..n, 1..3u8).prop_map(|(p, v)| Op::Write(p, v)),
        3 => (0..n, 1..3u8).prop_map(|(p, v)| Op::GuestWrite(p, v)),
        1 => Just(Op::DestroyVm2),
    ]
}

/// The model: per page a sharing-group token, a content byte and whether it
/// is the sole mapper of a merged frame (only with background reuse off).
struct Model {
    token: Vec<u32>,
    content: Vec<u8>,
    sole_merged: Vec<bool>,
    next: u32,
    /// Expected counters per VM: (copies, fault-time reuses, background reuses).
    counts: HashMap<VmId, (u64, u64, u64)>,
    /// The same, host-wide (destroyed VMs included).
    host: (u64, u64, u64),
    /// Pages the last operation left as sole mappers of a merged frame.
    left_alone: Vec<usize>,
}

impl Model {
    fn group(&self, i: usize) -> Vec<usize> {
        if self.token[i] == ZERO {
            return Vec::new();
        }
        (0..self.token.len()).filter(|&j| self.token[j] == self.token[i]).collect()
    }
    fn group_size(&self, i: usize) -> u32 {
        self.group(i).len() as u32
    }
    /// Page `i` leaves its group (copy, discard, VM gone: `token` is its new
    /// token); a group left with one page makes it a sole mapper.
    fn leave(&mut self, i: usize, token: u32) {
        let rest: Vec<usize> = self.group(i).into_iter().filter(|&j| j != i).collect();
        self.token[i] = token;
        self.sole_merged[i] = false;
        if rest.len() == 1 {
            self.left_alone.push(rest[0]);
        }
    }
    /// Counts one copy (0), fault-time reuse (1) or background reuse (2) of `vm`.
    fn count(&mut self, vm: VmId, kind: usize) {
        let c = self.counts.entry(vm).or_default();
        let h = &mut self.host;
        match kind {
            0 => (c.0, h.0) = (c.0 + 1, h.0 + 1),
            1 => (c.1, h.1) = (c.1 + 1, h.1 + 1),
            _ => (c.2, h.2) = (c.2 + 1, h.2 + 1),
        }
    }
    fn fresh(&mut self) -> u32 {
        self.next += 1;
        self.next
    }
    /// A write (device or guest) or an unshare of page `i`, with background reuse
    /// off or after the queue was drained.
    fn break_sharing(&mut self, i: usize, vm: VmId) {
        if self.token[i] == ZERO {
            let t = self.fresh();
            self.token[i] = t;
        } else if self.group_size(i) > 1 {
            self.count(vm, 0);
            let t = self.fresh();
            self.leave(i, t);
        } else if self.sole_merged[i] {
            self.count(vm, 1);
            self.sole_merged[i] = false;
        }
    }
}

fn new_vm2(mgr: &Arc<MemoryManager>, pages: &[(VmId, u32)], model: &mut Model) -> GuestMap {
    let g = mgr.create_guest(2, u64::from(VMS[1].1) * PAGE_SIZE as u64).unwrap();
    mgr.set_merge(2, false, 1).unwrap();
    for (i, &(vm, p)) in pages.iter().enumerate().filter(|(_, &(vm, _))| vm == 2) {
        let v = 1 + (i % 3) as u8;
        g.write_bytes(u64::from(p) * PAGE_SIZE as u64, &[v; PAGE_SIZE]).unwrap();
        model.content[i] = v;
        let t = model.fresh();
        model.token[i] = t;
        model.sole_merged[i] = false;
        let _ = vm;
    }
    g
}

fn run(ops: Vec<Op>, background: bool) -> Result<(), TestCaseError> {
    let name = "background_reuse_matches_model";
    let Some(mgr) = common::manager_or_skip(name, 16) else {
        return Ok(());
    };
    let _w = common::Watchdog::new(name, 120);
    mgr.set_background_reuse(background);
    let pages = all_pages();
    let n = pages.len();
    let mut model = Model {
        token: vec![0; n],
        content: vec![0; n],
        sole_merged: vec![false; n],
        next: 0,
        counts: HashMap::new(),
        host: (0, 0, 0),
        left_alone: Vec::new(),
    };
    let g1 = mgr.create_guest(1, u64::from(VMS[0].1) * PAGE_SIZE as u64).unwrap();
    mgr.set_merge(1, false, 1).unwrap();
    for (i, &(_, p)) in pages.iter().enumerate().filter(|(_, &(vm, _))| vm == 1) {
        let v = 1 + (i % 3) as u8;
        g1.write_bytes(u64::from(p) * PAGE_SIZE as u64, &[v; PAGE_SIZE]).unwrap();
        model.content[i] = v;
        model.token[i] = model.fresh();
    }
    let mut guests: HashMap<VmId, GuestMap> = HashMap::new();
    guests.insert(1, g1);
    let g2 = new_vm2(&mgr, &pages, &mut model);
    guests.insert(2, g2);
    for op in ops {
        model.left_alone.clear();
        match op {
            Op::Merge(a, b) => {
                let out = mgr.merge_pages(pages[a], pages[b]).unwrap();
                let expected = if model.token[a] == ZERO || model.token[b] == ZERO {
                    None
                } else if model.token[a] == model.token[b] {
                    Some(MergeOutcome::AlreadyShared)
                } else if model.content[a] == model.content[b] {
                    let (from, to) = (model.token[b], model.token[a]);
                    for j in 0..n {
                        if model.token[j] == from {
                            model.token[j] = to;
                        }
                        if model.token[j] == to {
                            model.sole_merged[j] = false;
                        }
                    }
                    let frame = mgr.frame_of(pages[a].0, pages[a].1).unwrap();
                    Some(MergeOutcome::Merged { frame })
                } else {
                    Some(MergeOutcome::Differs)
                };
                if let Some(expected) = expected {
                    prop_assert_eq!(out, expected);
                } else {
                    prop_assert!(!matches!(out, MergeOutcome::Merged { .. }), "{:?}", out);
                }
            }
            Op::Unshare(i) => {
                if model.token[i] != ZERO {
                    mgr.unshare(pages[i].0, pages[i].1).unwrap();
                    model.break_sharing(i, pages[i].0);
                }
            }
            Op::Migrate(i) => {
                let frame = mgr.frame_of(pages[i].0, pages[i].1).unwrap();
                mgr.migrate(frame).unwrap();
            }
            Op::Discard(i) => {
                mgr.discard(pages[i].0, pages[i].1).unwrap();
                model.leave(i, ZERO);
                model.content[i] = 0;
            }
            Op::Write(i, v) => {
                let (vm, p) = pages[i];
                guests[&vm].write_bytes(u64::from(p) * PAGE_SIZE as u64, &[v; PAGE_SIZE]).unwrap();
                model.break_sharing(i, vm);
                model.content[i] = v;
            }
            Op::GuestWrite(i, v) => {
                let (vm, p) = pages[i];
                common::fill_page_from_thread(guests[&vm].page_addr(p).unwrap(), u64::from_ne_bytes([v; 8]));
                model.break_sharing(i, vm);
                model.content[i] = v;
            }
            Op::DestroyVm2 => {
                drop(guests.remove(&2));
                for i in (0..n).filter(|&i| pages[i].0 == 2) {
                    model.leave(i, ZERO);
                }
                model.counts.remove(&2);
                model.left_alone.retain(|&i| pages[i].0 != 2);
                let g2 = new_vm2(&mgr, &pages, &mut model);
                guests.insert(2, g2);
            }
        }
        // The pages the operation left alone on a merged frame.
        let alone = std::mem::take(&mut model.left_alone);
        let before: Vec<u32> = alone.iter().map(|&i| mgr.frame_of(pages[i].0, pages[i].1).unwrap()).collect();
        if background {
            mgr.drain_background_reuse();
            prop_assert_eq!(mgr.background_reuse_pending(), 0);
            for (k, &i) in alone.iter().enumerate() {
                let (vm, p) = pages[i];
                model.count(vm, 2);
                let flags = mgr.page_flags(vm, p).unwrap();
                prop_assert!(
                    !flags.contains(PageFlags::PROTECTED) && !flags.contains(PageFlags::SHARED),
                    "page {:?} reused in the background: {:?}",
                    pages[i],
                    flags
                );
                prop_assert_eq!(mgr.frame_of(vm, p).unwrap(), before[k], "reused in place");
            }
        } else {
            for &i in &alone {
                model.sole_merged[i] = true;
            }
        }
        // Counts, flags and contents against the model.
        for (i, &(vm, p)) in pages.iter().enumerate() {
            let frame = mgr.frame_of(vm, p).unwrap();
            let flags = mgr.page_flags(vm, p).unwrap();
            let group = model.group_size(i);
            if model.token[i] != ZERO {
                prop_assert_eq!(mgr.frame_refs(frame), group, "refcount of page {:?}", pages[i]);
            }
            let merged = group > 1 || model.sole_merged[i];
            prop_assert_eq!(flags.contains(PageFlags::SHARED), merged, "page {:?}: {:?}", pages[i], flags);
            if merged {
                prop_assert!(flags.contains(PageFlags::PROTECTED), "page {:?}: {:?}", pages[i], flags);
            }
            let mut buf = vec![0u8; PAGE_SIZE];
            guests[&vm].read_bytes(u64::from(p) * PAGE_SIZE as u64, &mut buf).unwrap();
            prop_assert!(buf.iter().all(|&b| b == model.content[i]), "content of page {:?}", pages[i]);
        }
        let s = mgr.stats_exact();
        // Host-wide counters include a destroyed VM 2's; per-VM ones restart.
        let vs: Vec<_> = [1, 2].iter().map(|&vm| mgr.vm_merge_stats(vm).unwrap()).collect();
        for (k, vm) in [1u32, 2].into_iter().enumerate() {
            let want = model.counts.get(&vm).copied().unwrap_or_default();
            prop_assert_eq!(
                (vs[k].cow_copies, vs[k].cow_reuses, vs[k].cow_background_reuses),
                want,
                "counters of VM {}",
                vm
            );
        }
        let c = &s.counters;
        prop_assert_eq!((c.cow_copies, c.cow_reuses, c.cow_background_reuses), model.host, "host-wide counters");
        if background {
            prop_assert_eq!(c.cow_reuses, 0, "no write found a sole-mapped merged page");
        } else {
            prop_assert_eq!(c.cow_background_reuses, 0);
        }
    }
    drop(guests);
    let s = mgr.stats();
    prop_assert_eq!((s.frames_used, s.host_bytes), (0, 0));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn background_reuse_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, true)?;
    }

    #[test]
    fn fault_time_reuse_matches_model_without_background(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, false)?;
    }
}
