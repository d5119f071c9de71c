//! The scanner: visits `pages_to_scan` guest pages per batch, VM after VM, in
//! chunks of at most [`CHUNK`] pages, each chunk under one hold of the
//! manager's lock (fault resolvers waiting for the lock go first between
//! chunks). Per page, as KSM's `cmp_and_merge_page`:
//!
//! 1. Pages mapping a shared frame, zero/discarded pages and pages without host
//!    memory (`mincore`) are not candidates.
//! 2. Change detection: with a dirty log, a page reported dirty (or written by
//!    a device) since its last visit is volatile and skipped, a clean one keeps
//!    its cached hash (no re-read); with checksums the page is hashed (xxh3)
//!    and is volatile if the hash differs from the previous visit's.
//! 3. Stable index (domain, hash) -> frame with room: join it. Consecutive
//!    pages matching consecutive stable frames are joined as one run.
//! 4. Zero content with `merge_zero_pages`: drop its memory ([`super::zero`]).
//! 5. Unstable index (domain, hash) -> another unmerged page: merge the pair
//!    (runs again), keeping the frame in the more occupied 2 MiB host frame;
//!    the kept frame enters the stable index. Otherwise the page enters the
//!    unstable index, which is cleared at every full scan.
//!
//! The per-page visit of one chunk is in [`super::visit`]. When memory is idle
//! the scanner backs off ([`super::backoff`]): in
//! dirty-log mode it stops rescanning and polls the dirty logs, in checksum
//! mode it skips long-unchanged pages (smart scan) and sleeps longer.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::{Core, Error, Result, Txn};
use crate::vcpu_gate::HoldBudget;
use crate::{FrameNo, VmId};

use super::domains::DomainId;
use super::pages::{Class, VmScan};
use super::stable::StableIndex;
use super::stats::MergeStats;
use super::tunables::{ChangeDetection, Tunables};
use super::unstable::UnstableIndex;

/// Most pages handled under one hold of the manager's lock.
pub(crate) const CHUNK: u32 = 256;
/// Most pages of a chunk that holds the vCPUs from its start (see [`crate::vcpu_gate`]).
const HOT_CHUNK: u32 = 1024;

/// A page that may be merged.
#[derive(Debug, Clone, Copy)]
pub(super) struct Cand {
    pub(super) page: u32,
    pub(super) frame: FrameNo,
    pub(super) hash: u64,
    /// Changed since the last visit: may only join a stable frame.
    pub(super) volatile: bool,
}

/// A VM to scan, as seen at the start of a batch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Target {
    pub(super) vm: VmId,
    pub(super) domain: DomainId,
    pub(super) host_addr: usize,
    pub(super) pages: u32,
}

/// State of the idle (dirty-log polling) mode.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Idle {
    /// [`super::backoff::fingerprint`] when the quiet scan ended.
    pub fp: u64,
    /// Last walk of the page flags for device writes.
    pub last_walk: Instant,
}

/// Event counters of the scanner.
#[derive(Debug, Default, Clone)]
pub(crate) struct Counters {
    pub pages_scanned: u64,
    pub full_scans: u64,
    pub merges: u64,
    pub merge_runs: u64,
    pub unmerges: u64,
    pub flips: u64,
    pub hash_mismatches: u64,
    pub cross_domain: u64,
    pub scan_ms_last: f64,
    pub scan_ms_total: f64,
    pub busy_ms_last: f64,
    pub busy_ms_total: f64,
    /// Full scans that walked every page (not idle polls), for the averages.
    pub walked_scans: u64,
    /// Checksum mode: page visits skipped by the smart scan.
    pub pages_skipped: u64,
    /// Polls of the dirty logs while idle.
    pub idle_polls: u64,
}

/// The scanner's state (owned by the scanner thread).
pub(crate) struct Scanner {
    pub(super) core: Arc<Core>,
    pub(super) vms: BTreeMap<VmId, VmScan>,
    pub(super) stable: StableIndex,
    pub(super) unstable: UnstableIndex,
    /// Next page to visit.
    cursor: (VmId, u32),
    scan_start: Instant,
    busy: Duration,
    pages_this_scan: u64,
    pub(crate) counters: Counters,
    pub(super) resident: Vec<u8>,
    pub(super) dirty_buf: Vec<u64>,
    /// Back-off allowed ([`super::Merger::set_backoff`]).
    pub(super) backoff_enabled: bool,
    /// Back-off: idle mode (dirty-log polling) when set.
    pub(super) idle: Option<Idle>,
    /// Back-off: quiet full scans in a row.
    pub(super) quiet_scans: u32,
    /// Back-off: the longer sleep owed after a quiet full scan (checksum mode).
    pub(super) quiet_sleep: Option<Duration>,
    /// Fingerprint of the guest maps when the previous full scan ended (none
    /// after a restart: the first scan is never quiet).
    pub(super) scan_fp: Option<u64>,
    /// [`Scanner::activity`] when the previous full scan ended.
    pub(super) scan_activity: u64,
    /// Zeroed pages, newly indexed shared frames and errors (part of the activity).
    pub(super) extra_activity: u64,
    /// The previous chunk merged pages: the next one holds the vCPUs from its
    /// start (see [`crate::vcpu_gate`]).
    pub(super) hot: bool,
    /// The vCPU hold time left to spend (the guests' share of the time).
    pub(super) hold_budget: HoldBudget,
}

impl Scanner {
    /// A scanner over `core`'s VMs.
    pub fn new(core: Arc<Core>) -> Self {
        Scanner {
            core,
            vms: BTreeMap::new(),
            stable: StableIndex::new(),
            unstable: UnstableIndex::new(),
            cursor: (0, 0),
            scan_start: Instant::now(),
            busy: Duration::ZERO,
            pages_this_scan: 0,
            counters: Counters::default(),
            resident: Vec::new(),
            dirty_buf: Vec::new(),
            backoff_enabled: true,
            idle: None,
            quiet_scans: 0,
            quiet_sleep: None,
            scan_fp: None,
            scan_activity: 0,
            extra_activity: 0,
            hot: false,
            hold_budget: HoldBudget::new(Instant::now()),
        }
    }

    /// Guest pages of every VM the scanner tracks.
    pub fn tracked_pages(&self) -> u64 {
        self.vms.values().map(|vs| vs.pages.len() as u64).sum()
    }

    /// Forgets the scan state of `vm` (its pages are re-learned).
    pub fn forget(&mut self, vm: VmId) {
        self.vms.remove(&vm);
        self.unstable.forget_vm(vm);
        self.reset_backoff();
    }

    /// Starts over with a fresh full scan (unstable index emptied).
    pub(super) fn restart_scan(&mut self) {
        self.unstable.clear();
        self.cursor = (0, 0);
        self.pages_this_scan = 0;
        self.busy = Duration::ZERO;
        self.scan_start = Instant::now();
        self.scan_fp = None;
    }

    pub(super) fn targets(&mut self) -> Vec<Target> {
        let st = self.core.lock();
        let mut out: Vec<Target> = st
            .merge_configs()
            .filter(|(_, c)| c.enabled)
            .filter_map(|(vm, c)| {
                let t = st.table(vm)?;
                Some(Target { vm, domain: c.domain, host_addr: t.host_addr(), pages: t.len() })
            })
            .collect();
        drop(st);
        out.sort_by_key(|t| t.vm);
        self.vms.retain(|vm, vs| out.iter().any(|t| t.vm == *vm && t.host_addr == vs.host_addr));
        for t in &out {
            self.vms.entry(t.vm).or_insert_with(|| VmScan::new(t.host_addr, t.pages));
        }
        out
    }

    /// Collects the dirty logs of the VMs to scan (without the manager's lock).
    fn refresh_dirty(&mut self, targets: &[Target], tun: &Tunables) {
        for t in targets {
            let Some(vs) = self.vms.get_mut(&t.vm) else { continue };
            let log = if tun.change_detection == ChangeDetection::DirtyLog { self.core.dirty_log(t.vm) } else { None };
            let Some(log) = log else {
                vs.dirty_log = false;
                continue;
            };
            self.dirty_buf.clear();
            match log.take_dirty(&mut self.dirty_buf) {
                Ok(()) => {
                    if !vs.dirty_log {
                        // Cached hashes predate the log: re-learn them.
                        vs.pages.iter_mut().for_each(|p| p.hashed = false);
                    }
                    vs.add_dirty(&self.dirty_buf);
                    vs.dirty_log = true;
                }
                Err(e) => {
                    tracing::warn!("dirty log of VM {}: {e}; using checksums", t.vm);
                    vs.dirty_log = false;
                }
            }
        }
    }

    /// Visits up to `tun.pages_to_scan` pages with host memory (pages without,
    /// such as never-written or discarded ones, cost nothing, as in KSM, which
    /// only visits present pages), at most one lap of all pages; returns early
    /// when `interrupted` or when a full scan ends quiet (the caller then backs
    /// off: see [`super::backoff`]). Returns whether any VM is enabled.
    pub fn batch(&mut self, tun: &Tunables, interrupted: &dyn Fn() -> bool) -> Result<bool> {
        let started = Instant::now();
        let targets = self.targets();
        if targets.is_empty() {
            return Ok(false);
        }
        self.refresh_dirty(&targets, tun);
        let vms: Vec<VmId> = targets.iter().map(|t| t.vm).collect();
        let total: u64 = targets.iter().map(|t| u64::from(t.pages)).sum();
        let mut budget = u64::from(tun.pages_to_scan).min(total);
        let mut lap = total;
        while budget > 0 && lap > 0 && !interrupted() && self.idle.is_none() && self.quiet_sleep.is_none() {
            let Some(target) = targets.iter().find(|t| t.vm >= self.cursor.0).copied() else {
                self.end_full_scan(&vms, tun);
                self.cursor = (targets[0].vm, 0);
                continue;
            };
            if target.vm != self.cursor.0 {
                self.cursor = (target.vm, 0);
            }
            let start = self.cursor.1;
            // While merging is in full swing with the vCPUs held, nothing but host
            // threads wait for the lock: larger chunks mean fewer holds.
            let chunk = if self.hot && tun.hold_vcpus { HOT_CHUNK } else { CHUNK };
            let n = (target.pages - start).min(chunk).min(budget as u32);
            let charged = match self.chunk(target, start, n, tun) {
                Ok(resident) => resident,
                Err(Error::UnknownVm(_)) => {
                    // Destroyed since this batch listed it: skip the rest of it
                    // (one chunk error per remaining chunk would only flood the log).
                    tracing::debug!(vm = target.vm, "VM gone while merging it; its remaining pages are skipped");
                    lap = lap.saturating_sub(u64::from(target.pages - start));
                    self.cursor = (target.vm.saturating_add(1), 0);
                    if target.vm == VmId::MAX {
                        self.end_full_scan(&vms, tun);
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!("merging VM {} pages {start}..+{n}: {e}", target.vm);
                    self.extra_activity += 1;
                    n
                }
            };
            budget = budget.saturating_sub(u64::from(charged));
            lap = lap.saturating_sub(u64::from(n));
            self.pages_this_scan += u64::from(n);
            self.cursor.1 = start + n;
            if self.cursor.1 >= target.pages {
                self.cursor = (target.vm.saturating_add(1), 0);
                if target.vm == VmId::MAX {
                    self.end_full_scan(&vms, tun);
                }
            }
            self.core.yield_to_faults();
        }
        self.busy += started.elapsed();
        Ok(true)
    }

    fn end_full_scan(&mut self, vms: &[VmId], tun: &Tunables) {
        let mut idle = false;
        if self.pages_this_scan > 0 {
            let c = &mut self.counters;
            c.full_scans += 1;
            c.walked_scans += 1;
            c.scan_ms_last = self.scan_start.elapsed().as_secs_f64() * 1e3;
            c.scan_ms_total += c.scan_ms_last;
            c.busy_ms_last = self.busy.as_secs_f64() * 1e3;
            c.busy_ms_total += c.busy_ms_last;
            idle = self.after_full_scan(vms, tun);
        }
        self.pages_this_scan = 0;
        self.busy = Duration::ZERO;
        self.scan_start = Instant::now();
        if !idle {
            // Idle mode keeps the unstable index: pages settling later pair with it.
            self.unstable.clear();
        }
    }

    /// Background reuses counted so far for each of `targets` (VMs gone: absent).
    fn background_reuses(&self, targets: &[Target]) -> HashMap<VmId, u64> {
        let st = self.core.lock();
        targets.iter().filter_map(|t| Some((t.vm, st.table(t.vm)?.cow_background_reuses()))).collect()
    }

    /// Unmerges every VM with merging enabled (KSM's `run = 2`) and forgets the
    /// indexes; returns the number of pages changed. Pages left as the only
    /// mapper of a merged frame by the copies of the pages before them are
    /// taken over in place, by this unmerge or by the background reuse
    /// meanwhile (drained before returning): both count as changed.
    pub fn unmerge_all(&mut self) -> Result<u64> {
        let targets = self.targets();
        let reused_before = self.background_reuses(&targets);
        let mut total = 0;
        for &target in &targets {
            let mut start = 0;
            while start < target.pages {
                let n = (target.pages - start).min(4 * CHUNK);
                let core = self.core.clone();
                let mut guard = core.lock();
                let mut t = Txn::new(&mut guard, core.remap());
                let done = t.unshare_range(target.vm, start, n, true);
                drop(t);
                drop(guard);
                match done {
                    Ok(k) => total += k,
                    // Destroyed since it was listed: its frames went with it, nothing
                    // is left to unmerge (the table goes as a whole, under the lock).
                    Err(Error::UnknownVm(vm)) if vm == target.vm => {
                        tracing::debug!(vm, "VM gone while unmerging it; skipped");
                        break;
                    }
                    Err(e) => return Err(e),
                }
                self.core.yield_to_faults();
                start += n;
            }
        }
        self.core.drain_background_reuse_all();
        for (vm, after) in self.background_reuses(&targets) {
            total += after.saturating_sub(reused_before.get(&vm).copied().unwrap_or(after));
        }
        self.counters.unmerges += total;
        self.stable.clear();
        self.vms.clear();
        self.reset_backoff();
        self.restart_scan();
        Ok(total)
    }

    /// Fills the scanner's part of `s` (the caller adds the frame-table counts).
    pub fn fill_stats(&self, s: &mut MergeStats) {
        let c = &self.counters;
        s.pages_unshared = self.vms.values().map(|v| v.count(Class::Unshared)).sum();
        s.pages_volatile = self.vms.values().map(|v| v.count(Class::Volatile)).sum();
        s.pages_scanned = c.pages_scanned;
        s.full_scans = c.full_scans;
        s.stable_frames = self.stable.len() as u64;
        s.stable_node_chains = self.stable.chains_with_dups() as u64;
        s.merges = c.merges;
        s.merge_runs = c.merge_runs;
        s.unmerges = c.unmerges;
        s.merge_choice_flips = c.flips;
        s.hash_mismatches = c.hash_mismatches;
        s.cross_domain_refusals = c.cross_domain;
        let scans = c.walked_scans.max(1) as f64;
        (s.full_scan_ms_last, s.full_scan_ms_avg) = (c.scan_ms_last, c.scan_ms_total / scans);
        (s.merge_time_ms_last, s.merge_time_ms_avg) = (c.busy_ms_last, c.busy_ms_total / scans);
        s.pages_skipped = c.pages_skipped;
        s.idle = self.is_idle();
        s.idle_polls = c.idle_polls;
        s.vms_enabled = self.vms.len() as u64;
        s.vms_dirty_log = self.vms.values().filter(|v| v.dirty_log).count() as u64;
        s.metadata_bytes = (self.vms.values().map(VmScan::metadata_bytes).sum::<usize>()
            + self.stable.metadata_bytes()
            + self.unstable.metadata_bytes()) as u64;
    }

    /// Per VM: (volatile, unshared, dirty log in use).
    pub fn vm_counts(&self) -> HashMap<VmId, (u64, u64, bool)> {
        self.vms
            .iter()
            .map(|(&vm, v)| (vm, (v.count(Class::Volatile), v.count(Class::Unshared), v.dirty_log)))
            .collect()
    }
}
