//! [`State`]: everything behind the manager's lock — the frame pool, the frame
//! table, every VM's page table, the VMA budget, the counters and the per-VM
//! merge settings.
//!
//! The fields are private to this module: callers change them through methods
//! named after what they do, which keep the invariants together:
//!
//! - a frame's reference count equals the number of page-table entries naming
//!   it (frames of the pool's zero region, [`crate::FramePool::zero_frame`],
//!   are counted by nobody: they are never allocated nor freed) ([`State::repoint`] moves one entry and both counts at once;
//!   [`State::add_guest`] / [`State::remove_guest`] and
//!   [`State::release_guest_frames`] do whole VMs);
//! - a frame goes back to the pool only with no reference left
//!   ([`State::free_unmapped`] refuses a mapped frame);
//! - a VM's page table, its host range and its merge settings come and go together.
//!
//! Reads hand out shared references ([`State::frames`], [`State::pool`],
//! [`State::table`]); the pool's content operations (copy, compare, punch)
//! take `&self` and change no bookkeeping.

use std::collections::BTreeMap;
use std::time::Duration;

use rustc_hash::FxHashMap;

use super::counters::{Counter, Counters};
use super::error::{Error, Result};
use super::merge_settings::VmMergeConfig;
use super::reuse_queue::ReuseQueue;
use crate::frame_table::{FrameTable, Mapper};
use crate::page_table::{PageEntry, PageFlags, PageTable};
use crate::pool::FramePool;
use crate::vma_budget::VmaBudget;
use crate::{FrameNo, VmId};

/// Everything behind the manager's lock.
pub(crate) struct State {
    pool: FramePool,
    frames: FrameTable,
    vms: FxHashMap<VmId, PageTable>,
    ranges: BTreeMap<usize, VmId>,
    budget: VmaBudget,
    counters: Counters,
    /// Merge settings of VMs that have any (absent: disabled, own domain).
    merge_cfg: FxHashMap<VmId, VmMergeConfig>,
    /// Sole-mapped merged pages waiting for background reuse.
    reuse: ReuseQueue,
}

/// How a write fault on a merged page was resolved (per-VM statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cow {
    /// The page got a private copy of a shared frame.
    Copy,
    /// The page took its merged frame over in place (at its write fault).
    Reuse,
    /// The page took its merged frame over in place before any write (its
    /// last other mapper had left: background reuse).
    BackgroundReuse,
}

impl State {
    /// The state of a new manager over `pool`.
    pub(super) fn new(pool: FramePool, budget: VmaBudget) -> Self {
        State {
            frames: FrameTable::new(pool.buddy().huge_frames()),
            pool,
            vms: FxHashMap::default(),
            ranges: BTreeMap::new(),
            budget,
            counters: Counters::default(),
            merge_cfg: FxHashMap::default(),
            reuse: ReuseQueue::default(),
        }
    }

    /// The frame pool (allocation goes through [`State::alloc`]).
    pub(crate) fn pool(&self) -> &FramePool {
        &self.pool
    }

    /// Reference counts and reverse mappings.
    pub(crate) fn frames(&self) -> &FrameTable {
        &self.frames
    }

    /// The page table of `vm`.
    pub(crate) fn table(&self, vm: VmId) -> Option<&PageTable> {
        self.vms.get(&vm)
    }

    /// Every VM's page table (in no particular order).
    pub(crate) fn tables(&self) -> impl Iterator<Item = (VmId, &PageTable)> {
        self.vms.iter().map(|(&vm, t)| (vm, t))
    }

    /// Whether page `m` maps a frame of the pool's zero region (its content was
    /// dropped: it is `PROTECTED | ZERO` and must never be made writable).
    pub(crate) fn on_zero_region(&self, m: Mapper) -> bool {
        self.entry(m).is_ok_and(|e| self.pool.is_zero_frame(e.frame))
    }

    /// Whether VM `vm` exists.
    pub(crate) fn has_vm(&self, vm: VmId) -> bool {
        self.vms.contains_key(&vm)
    }

    /// The VMA budget.
    pub(crate) fn budget(&self) -> &VmaBudget {
        &self.budget
    }

    /// Gives up the VMA budget's claim on the raised `vm.max_map_count` (see
    /// [`VmaBudget::release`]).
    pub(crate) fn release_vma_budget(&mut self) {
        self.budget.release();
    }

    /// The event counters.
    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Counts one event.
    pub(crate) fn count(&mut self, c: Counter) {
        self.counters.add(c, 1);
    }

    /// Counts `n` events.
    pub(crate) fn count_n(&mut self, c: Counter, n: u64) {
        self.counters.add(c, n);
    }

    /// Counts a copy-on-write resolution of a page of `vm` (host-wide and per VM).
    pub(crate) fn count_cow(&mut self, vm: VmId, how: Cow) {
        let table = self.vms.get_mut(&vm);
        match how {
            Cow::Copy => {
                self.counters.cow_copies += 1;
                table.into_iter().for_each(PageTable::count_cow_copy);
            }
            Cow::Reuse => {
                self.counters.cow_reuses += 1;
                table.into_iter().for_each(PageTable::count_cow_reuse);
            }
            Cow::BackgroundReuse => {
                self.counters.cow_background_reuses += 1;
                table.into_iter().for_each(PageTable::count_cow_background_reuse);
            }
        }
    }

    /// The queue of sole-mapped merged pages (see [`ReuseQueue`]).
    pub(crate) fn reuse_queue(&mut self) -> &mut ReuseQueue {
        &mut self.reuse
    }

    /// Queues for background reuse the page left as the only mapper of
    /// `frame`, if it maps it as a merged page (`SHARED`).
    fn note_sole_mapper(&mut self, frame: FrameNo) {
        if !self.reuse.enabled() {
            return;
        }
        let Some(last) = self.frames.first_mapper(frame) else { return };
        if self.entry(last).is_ok_and(|e| e.frame == frame && e.flags.contains(PageFlags::SHARED)) {
            self.reuse.push(last, frame);
        }
    }

    /// Records one hold of vCPUs (see [`crate::vcpu_gate`]).
    pub(crate) fn count_vcpu_hold(&mut self, held: Duration, reached: bool) {
        self.counters.add_vcpu_hold(held, reached);
    }

    /// VMAs the guest maps use now.
    pub(crate) fn guest_vmas(&self) -> usize {
        self.vms.values().map(PageTable::vma_count).sum()
    }

    /// Whether an operation adding up to `new_vmas` VMAs, after which
    /// `shared_mappings` mappings of shared frames exist, fits the VMA budget
    /// (a refusal is counted).
    pub(crate) fn admit_vmas(&mut self, shared_mappings: u64, new_vmas: usize) -> bool {
        let guest_vmas = self.guest_vmas();
        self.budget.admit(guest_vmas, shared_mappings, new_vmas)
    }

    /// The VM and page at host address `addr`.
    pub(crate) fn lookup(&self, addr: usize) -> Option<Mapper> {
        let (_, &vm) = self.ranges.range(..=addr).next_back()?;
        let page = self.vms.get(&vm)?.page_at(addr)?;
        Some(Mapper { vm, page })
    }

    /// Merge settings of `vm` (default: disabled, domain = its id).
    pub(crate) fn merge_config(&self, vm: VmId) -> VmMergeConfig {
        self.merge_cfg.get(&vm).copied().unwrap_or_else(|| VmMergeConfig::default_for(vm))
    }

    /// The VMs with explicit merge settings.
    pub(crate) fn merge_configs(&self) -> impl Iterator<Item = (VmId, VmMergeConfig)> + '_ {
        self.merge_cfg.iter().map(|(&vm, &c)| (vm, c))
    }

    /// Records the merge settings of `vm` (the caller unmerged it if needed).
    pub(crate) fn set_merge_config(&mut self, vm: VmId, cfg: VmMergeConfig) {
        self.merge_cfg.insert(vm, cfg);
    }

    /// The entry of page `m`.
    pub(crate) fn entry(&self, m: Mapper) -> Result<PageEntry> {
        let table = self.vms.get(&m.vm).ok_or(Error::UnknownVm(m.vm))?;
        table.get(m.page).ok_or(Error::OutOfRange(m.vm, u64::from(m.page)))
    }

    /// The host address of page `m`.
    pub(crate) fn addr(&self, m: Mapper) -> Result<usize> {
        let table = self.vms.get(&m.vm).ok_or(Error::UnknownVm(m.vm))?;
        if m.page >= table.len() {
            return Err(Error::OutOfRange(m.vm, u64::from(m.page)));
        }
        Ok(table.page_addr(m.page))
    }

    /// Sets the flags of page `m` (the caller changed the mapping to match).
    pub(crate) fn set_flags(&mut self, m: Mapper, flags: PageFlags) -> Result<()> {
        let table = self.vms.get_mut(&m.vm).ok_or(Error::UnknownVm(m.vm))?;
        table.set_flags(m.page, flags);
        Ok(())
    }

    /// Pages of `vm` flagged with `flag`, clearing the flag.
    pub(crate) fn take_flagged(&mut self, vm: VmId, flag: PageFlags) -> Result<Vec<u32>> {
        let table = self.vms.get_mut(&vm).ok_or(Error::UnknownVm(vm))?;
        let pages: Vec<u32> =
            (0..table.len()).filter(|&p| table.get(p).is_some_and(|e| e.flags.contains(flag))).collect();
        for &p in &pages {
            if let Some(e) = table.get(p) {
                table.set_flags(p, e.flags.without(flag));
            }
        }
        Ok(pages)
    }

    /// Allocates `2^order` contiguous frames (mapped by nobody yet).
    pub(crate) fn alloc(&mut self, order: u8) -> Result<FrameNo> {
        Ok(self.pool.alloc(order)?)
    }

    /// Allocates exactly the free frame `frame`.
    pub(crate) fn alloc_specific(&mut self, frame: FrameNo) -> Result<()> {
        Ok(self.pool.alloc_specific(frame)?)
    }

    /// Returns `frame`, which no guest page maps, to the pool.
    pub(crate) fn free_unmapped(&mut self, frame: FrameNo) -> Result<()> {
        self.check_unmapped(frame)?;
        Ok(self.pool.free(frame, 0)?)
    }

    /// Returns `frames` (single frames no guest page maps) to the pool, punching
    /// each contiguous run once; empties the list.
    pub(crate) fn free_unmapped_frames(&mut self, frames: &mut Vec<FrameNo>) -> Result<()> {
        for &f in frames.iter() {
            self.check_unmapped(f)?;
        }
        self.pool.free_frames(frames)?;
        frames.clear();
        Ok(())
    }

    /// Fails unless `frame` has no mapper left (it may then be freed).
    pub(crate) fn check_unmapped(&self, frame: FrameNo) -> Result<()> {
        if self.frames.refs(frame) != 0 {
            return Err(crate::frame_table::Error::AlreadyLive(frame).into());
        }
        Ok(())
    }

    /// Points page `m` at frame `new` with `flags` (the caller has remapped
    /// it; a zero-region frame takes and drops no reference): takes the page's reference on `new` before dropping the one on its
    /// old frame. Returns the old frame if it has no mapper left (for the
    /// caller to free with [`State::free_unmapped`] once no mapping of it remains).
    pub(crate) fn repoint(&mut self, m: Mapper, new: FrameNo, flags: PageFlags) -> Result<Option<FrameNo>> {
        self.repoint_with(m, new, |_| flags)
    }

    /// [`State::repoint`] with the new flags computed from the page's current
    /// ones (one look-up of the VM's table: the discard of a batch repoints
    /// every page).
    pub(crate) fn repoint_with(
        &mut self,
        m: Mapper,
        new: FrameNo,
        flags: impl FnOnce(PageFlags) -> PageFlags,
    ) -> Result<Option<FrameNo>> {
        let table = self.vms.get_mut(&m.vm).ok_or(Error::UnknownVm(m.vm))?;
        let entry = table.get(m.page).ok_or(Error::OutOfRange(m.vm, u64::from(m.page)))?;
        let old = entry.frame;
        let new_refs = if self.pool.is_zero_frame(new) { 0 } else { self.frames.add(new, m) };
        let new_flags = flags(entry.flags);
        table.set_frame(m.page, new);
        table.set_flags(m.page, new_flags);
        if new_refs == 1 && new_flags.contains(PageFlags::SHARED) && self.reuse.enabled() {
            // A sole-mapped merged page moved (migration): queued again with its
            // new frame (the entry of its old frame is stale now).
            self.reuse.push(m, new);
        }
        if self.pool.is_zero_frame(old) {
            return Ok(None);
        }
        match self.frames.remove(old, m)? {
            0 => Ok(Some(old)),
            1 => {
                self.note_sole_mapper(old);
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// Registers a new VM's page table (its frames allocated, its range
    /// realized): one reference per page, and its host range for lookups.
    pub(crate) fn add_guest(&mut self, table: PageTable) {
        let vm = table.vm();
        for (page, entry) in table.entries().iter().enumerate() {
            self.frames.add(entry.frame, Mapper { vm, page: page as u32 });
        }
        self.ranges.insert(table.host_addr(), vm);
        self.vms.insert(vm, table);
    }

    /// Removes VM `vm`'s page table, host range and merge settings; its frames
    /// stay referenced until [`State::release_guest_frames`] (after the caller
    /// unmapped the range).
    pub(crate) fn remove_guest(&mut self, vm: VmId) -> Result<PageTable> {
        let table = self.vms.remove(&vm).ok_or(Error::UnknownVm(vm))?;
        self.merge_cfg.remove(&vm);
        self.ranges.remove(&table.host_addr());
        Ok(table)
    }

    /// Drops the references of a removed VM's pages and frees the frames left
    /// without a mapper; the last VM gone, gives back the zero region's memory
    /// (reads of dropped pages allocated it).
    pub(crate) fn release_guest_frames(&mut self, table: &PageTable) -> Result<()> {
        if self.vms.is_empty() {
            self.pool.punch_zero_region()?;
        }
        let vm = table.vm();
        let mut to_free = Vec::new();
        for (page, entry) in table.entries().iter().enumerate() {
            if self.pool.is_zero_frame(entry.frame) {
                continue;
            }
            match self.frames.remove(entry.frame, Mapper { vm, page: page as u32 })? {
                0 => to_free.push(entry.frame),
                1 => self.note_sole_mapper(entry.frame),
                _ => {}
            }
        }
        self.free_unmapped_frames(&mut to_free)
    }
}
