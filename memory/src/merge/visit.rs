//! One chunk of the scan: the per-page visit of [`Scanner::chunk`] under one
//! hold of the manager's lock (candidates, volatile pages, zero pages, then the
//! merge decisions of [`super::decide`]), with the vCPU hold and its budget.

use std::time::{Duration, Instant};

use crate::core::{Error, Result, Txn};
use crate::frame_table::Mapper;
use crate::page_table::PageFlags;
use crate::{sys, FrameNo, PAGE_SIZE};

use super::backoff::{skip_age, SMART_MIN_AGE};
use super::decide::valid_unstable;
use super::domains::DomainId;
use super::pages::{Class, VmScan};
use super::scanner::{Cand, Scanner, Target};
use super::stable::Key;
use super::tunables::{ChangeDetection, Tunables};
use super::unstable::Entry;
use super::zero::{hash_page, zero_hash};

impl Scanner {
    /// Smart scan, for a page about to be skipped (`m`, unshared, unchanged at
    /// its last visit with content hash `hash` on `frame`): whether an
    /// identical-looking partner already waits in the unstable index, so the
    /// page must be visited now. Otherwise the page takes (or keeps) its place
    /// in the index without being read. The index is rebuilt every full scan,
    /// so without this two identical pages whose skips fall in different scans
    /// would never meet (their ages grow out of step and both end up visited
    /// every ninth scan, at different scans).
    fn partner_waits(&mut self, t: &Txn<'_>, domain: DomainId, m: Mapper, hash: u64, frame: FrameNo) -> bool {
        let key = Key { domain, hash };
        match self.unstable.get(key) {
            Some(u) if u.mapper == m => false,
            Some(u) if valid_unstable(t.st, domain, &u, m) => true,
            _ => {
                self.unstable.insert(key, Entry { mapper: m, frame });
                false
            }
        }
    }

    /// Visits pages `start..start+n` of `target`; returns how many had host memory.
    pub(super) fn chunk(&mut self, target: Target, start: u32, n: u32, tun: &Tunables) -> Result<u32> {
        if tun.hold_vcpus {
            // The guests' share of the time (see `crate::vcpu_gate::HoldBudget`).
            let wait = self.hold_budget.wait(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
        let core = self.core.clone();
        let mut guard = core.lock();
        let held_before = guard.counters().vcpu_hold_us;
        let mut t = Txn::new(&mut guard, core.remap());
        if tun.hold_vcpus {
            // Held at the chunk's first change, or at once while merging is in full
            // swing (the previous chunk merged); released when `t` drops.
            t.gates = core.vcpu_gates();
            if self.hot {
                t.hold_vcpus();
            }
        }
        let merges_before = self.counters.merges;
        let Some(mut vs) = self.vms.remove(&target.vm) else {
            return Ok(0);
        };
        let result = self.chunk_locked(&mut t, &mut vs, target, start, n, tun);
        let finished = t.finish_remaps().and_then(|()| t.free_deferred());
        drop(t);
        let held = Duration::from_micros(guard.counters().vcpu_hold_us - held_before);
        drop(guard);
        if !held.is_zero() {
            self.hold_budget.spend(held, Instant::now());
        }
        self.hot = self.counters.merges > merges_before;
        self.vms.insert(target.vm, vs);
        let resident = result?;
        finished?;
        Ok(resident)
    }

    fn chunk_locked(
        &mut self,
        t: &mut Txn<'_>,
        vs: &mut VmScan,
        target: Target,
        start: u32,
        n: u32,
        tun: &Tunables,
    ) -> Result<u32> {
        let vm = target.vm;
        let mut residency = Residency::new(t.addr(Mapper { vm, page: start })?, n);
        let mut resident = 0;
        let use_log = tun.change_detection == ChangeDetection::DirtyLog && vs.dirty_log;
        let mut cands = Vec::with_capacity(n as usize);
        let mut zeros = Vec::new();
        for i in 0..n {
            let p = start + i;
            let m = Mapper { vm, page: p };
            let e = t.entry(m)?;
            self.counters.pages_scanned += 1;
            let device_dirty = e.flags.contains(PageFlags::MERGE_DIRTY);
            if device_dirty {
                t.set_flags(m, e.flags.without(PageFlags::MERGE_DIRTY))?;
            }
            let log_dirty = use_log && vs.take_dirty(p);
            let refs = t.st.frames().refs(e.frame);
            if refs > 1 || e.flags.contains(PageFlags::SHARED) {
                resident += 1;
                vs.set_class(p, Class::Merged);
                if refs > 1 && self.stable.key_of(e.frame).is_none() && t.check_domain(vm, e.frame).is_ok() {
                    // A shared frame the index does not know (migrated, merged by hand).
                    let hash = hash_page(t.page_bytes(m)?);
                    self.stable.insert(Key { domain: target.domain, hash }, e.frame);
                    self.extra_activity += 1;
                }
                continue;
            }
            let ps = vs.pages[p as usize];
            // A private page hashed on its current frame had host memory then and
            // still has: a frame loses its memory only to a punch, which gives
            // the page another frame or the ZERO flag. Only the others are
            // asked (`mincore`): reading a hole would allocate host memory.
            let known = ps.hashed && ps.frame == e.frame;
            if e.flags.contains(PageFlags::ZERO) || !(known || residency.resident(&mut self.resident, i)?) {
                vs.pages[p as usize].hashed = false;
                vs.set_class(p, Class::Other);
                continue;
            }
            resident += 1;
            let was_unshared = vs.class(p) == Class::Unshared;
            let (hash, volatile) = if use_log {
                if log_dirty || device_dirty {
                    if ps.hashed && was_unshared {
                        // Its unstable entry describes old content.
                        self.unstable.remove(Key { domain: target.domain, hash: ps.hash }, m);
                    }
                    vs.pages[p as usize].hashed = false;
                    vs.set_class(p, Class::Volatile);
                    continue;
                }
                if ps.hashed && ps.frame == e.frame {
                    (ps.hash, false)
                } else {
                    (hash_page(t.page_bytes(m)?), false)
                }
            } else {
                // Smart scan (KSM's smart_scan): a page unchanged and unshared at
                // several visits in a row is skipped for a growing number of scans.
                let rec = &mut vs.pages[p as usize];
                if self.backoff_enabled && ps.hashed && was_unshared && !device_dirty && ps.frame == e.frame {
                    rec.age = ps.age.saturating_add(1);
                    if ps.age >= SMART_MIN_AGE {
                        if ps.skips > 0 && !self.partner_waits(t, target.domain, m, ps.hash, e.frame) {
                            rec.skips = ps.skips - 1;
                            self.counters.pages_skipped += 1;
                            continue;
                        }
                        rec.skips = skip_age(ps.age);
                    }
                } else {
                    (rec.age, rec.skips) = (0, 0);
                }
                let h = hash_page(t.page_bytes(m)?);
                let changed = device_dirty || !ps.hashed || ps.hash != h;
                if changed {
                    (rec.age, rec.skips) = (0, 0);
                }
                (h, changed)
            };
            let rec = &mut vs.pages[p as usize];
            (rec.hash, rec.frame, rec.hashed) = (hash, e.frame, true);
            if tun.merge_zero_pages && hash == zero_hash() {
                if volatile {
                    vs.set_class(p, Class::Volatile);
                } else {
                    zeros.push(p);
                }
                continue;
            }
            cands.push(Cand { page: p, frame: e.frame, hash, volatile });
        }
        if !zeros.is_empty() {
            let zeroed = super::ops::zero_run(t, vm, &zeros)?;
            self.extra_activity += zeroed.iter().filter(|&&z| z).count() as u64;
            for (&p, &z) in zeros.iter().zip(&zeroed) {
                vs.set_class(p, if z { Class::Other } else { Class::Volatile });
                if z {
                    vs.pages[p as usize].hashed = false;
                }
            }
        }
        let mut j = 0;
        while j < cands.len() {
            j += self.merge_candidate(t, vs, target, &cands[j..], tun)?;
        }
        Ok(resident)
    }
}

/// Pages asked of `mincore` at once when a page's residency is unknown.
const RESIDENCY_WINDOW: u32 = 64;

/// The residency of a chunk's pages, asked of the kernel lazily, a window at a
/// time, only for the pages whose residency the scanner does not know.
struct Residency {
    /// Host address of the chunk's first page.
    addr: usize,
    /// Pages in the chunk.
    n: u32,
    /// Chunk-relative pages `lo..hi` are in the buffer.
    lo: u32,
    hi: u32,
}

impl Residency {
    fn new(addr: usize, n: u32) -> Self {
        Residency { addr, n, lo: 0, hi: 0 }
    }

    /// Whether chunk page `i` has host memory (`buf` holds the last window).
    fn resident(&mut self, buf: &mut Vec<u8>, i: u32) -> Result<bool> {
        if i < self.lo || i >= self.hi {
            let len = RESIDENCY_WINDOW.min(self.n - i);
            let addr = self.addr + i as usize * PAGE_SIZE;
            sys::mincore(addr, len as usize * PAGE_SIZE, buf).map_err(Error::Mapping)?;
            (self.lo, self.hi) = (i, i + len);
        }
        Ok(buf.get((i - self.lo) as usize).is_some_and(|r| r & 1 == 1))
    }
}
