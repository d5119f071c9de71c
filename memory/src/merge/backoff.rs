//! Back-off of the scanner when memory is idle, so that converged, unchanging
//! memory costs (almost) no CPU even at `sleep_ms` 0.
//!
//! A full scan is **quiet** when it merged nothing, zeroed nothing, found no
//! page newly changed (a page volatile at two visits in a row, e.g. a page a
//! guest rewrites all the time, does not count: it never merges anyway), had
//! no error, and nothing outside the scanner changed the guest maps meanwhile
//! (the `fingerprint`: fault resolutions — copies, reuses, zero-page and
//! protection faults —, unshares, discards, and the set of VMs and their
//! merge settings). Migrations (compaction) are not in it: they change frames,
//! not content, and a proactive pass after merging moves thousands of pages
//! at its paced rate, which kept the scanner rescanning at full speed for the
//! whole pass. The pages they moved are found instead (see below).
//!
//! - **Dirty-log mode** (every scanned VM has a dirty log): after a quiet full
//!   scan the scanner stops rescanning and goes **idle**: every [`IDLE_POLL`]
//!   it harvests the dirty logs and compares the fingerprint. A dirty page is
//!   marked changed (its cached hash and unstable-index entry dropped) and
//!   becomes *pending*; a pending page that stays clean for a poll interval is
//!   visited like in a scan (hashed, looked up in the stable and unstable
//!   indexes, merged). So the cost of idle memory follows its write rate, not
//!   its size. Pages written by devices (`MERGE_DIRTY`) and pages compaction
//!   moved (a hashed page on another frame than when hashed, a shared frame
//!   the stable index does not know) are found by a walk of the page table
//!   every [`DEVICE_WALK`] and visited at once. Any fingerprint change (a write to
//!   a merged page, a new or re-configured VM, a discard), a VM
//!   without a working dirty log, or any change of the tunables or of
//!   run/pause resumes full scanning at once. A poll that left nothing pending
//!   behind counts as a full scan (`full_scans`), since every page is then as
//!   up to date as a full scan would leave it; polls are also counted apart
//!   (`idle_polls`).
//! - **Checksum mode**: content can only be checked by reading it, so the
//!   scanner keeps scanning, but (1) like KSM's `smart_scan`, a page found
//!   unchanged and unshared at [`SMART_MIN_AGE`] visits in a row is skipped
//!   for a growing number of scans ([`skip_age`]: 1, 2, 4, then 8) — a
//!   skipped page still keeps its place in the unstable index unread, and is
//!   visited at once when an identical-looking partner waits there, so two
//!   pages that age out of step still meet —, and
//!   (2) after a quiet full scan it sleeps longer, doubling from
//!   [`QUIET_SLEEP_FIRST`] up to [`QUIET_SLEEP_MAX`]; any non-quiet scan
//!   resets both.

use std::time::{Duration, Instant};

use crate::core::{Error, Result, State};
use crate::frame_table::Mapper;
use crate::page_table::PageFlags;
use crate::{FrameNo, VmId};

use super::domains::DomainId;
use super::pages::{Class, VmScan};
use super::scanner::{Idle, Scanner, CHUNK};
use super::stable::Key;
use super::tunables::{ChangeDetection, Tunables};

/// Interval between two polls of the dirty logs while idle.
pub const IDLE_POLL: Duration = Duration::from_millis(100);
/// Longest interval between idle polls (see [`idle_poll_interval`]).
pub const IDLE_POLL_MAX: Duration = Duration::from_secs(2);

/// The interval between idle dirty-log polls for `tracked_pages` pages under the
/// scan rate of `pages_to_scan` pages per `sleep_ms`: a fifth of the time a full
/// scan takes at that rate (so a write is noticed five times sooner than a
/// rate-limited rescan would see it), between [`IDLE_POLL`] and [`IDLE_POLL_MAX`].
/// At full speed (no sleep) that is `IDLE_POLL`; at KSM's default rate (100 pages
/// every 20 ms) on a few hundred MiB it is two seconds, so an idle host costs one
/// dirty-log harvest per VM every two seconds.
pub fn idle_poll_interval(tracked_pages: u64, pages_to_scan: u32, sleep_ms: u64) -> Duration {
    let batches = tracked_pages.div_ceil(u64::from(pages_to_scan.max(1)));
    let full_scan = Duration::from_millis(sleep_ms.saturating_mul(batches));
    (full_scan / 5).clamp(IDLE_POLL, IDLE_POLL_MAX).max(Duration::from_millis(sleep_ms))
}
/// Interval between two walks of the page flags for device writes while idle.
pub const DEVICE_WALK: Duration = Duration::from_secs(1);
/// Checksum mode: the sleep after the first quiet full scan.
pub const QUIET_SLEEP_FIRST: Duration = Duration::from_millis(20);
/// Checksum mode: the longest sleep after quiet full scans.
pub const QUIET_SLEEP_MAX: Duration = Duration::from_secs(1);
/// Smart scan: visits a page is always checked at before skipping starts.
pub const SMART_MIN_AGE: u8 = 3;

/// Smart scan: how many scans to skip a page of `age` unchanged visits for
/// (KSM's `skip_age`).
pub fn skip_age(age: u8) -> u8 {
    match age {
        0..=3 => 1,
        4..=5 => 2,
        6..=8 => 4,
        _ => 8,
    }
}

/// The sleep after the `n`-th quiet full scan in a row (`n >= 1`).
pub fn quiet_sleep(n: u32) -> Duration {
    let doubled = QUIET_SLEEP_FIRST.saturating_mul(1u32 << n.saturating_sub(1).min(16));
    doubled.min(QUIET_SLEEP_MAX)
}

fn mix(words: &[u64]) -> u64 {
    let mut bytes = [0u8; 64];
    for (chunk, w) in bytes.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(&bytes[..words.len().min(8) * 8])
}

/// A digest of everything outside the scanner that changes what a scan would
/// find without showing in a dirty log: fault resolutions, unshares,
/// migrations, discards, the VMs (id, address, size) and their merge settings.
/// The scanner's own merges do not change it.
pub(crate) fn fingerprint(st: &State) -> u64 {
    let c = st.counters();
    let mut h = mix(&[
        c.cow_copies,
        c.cow_reuses,
        c.cow_background_reuses,
        c.zero_page_faults,
        c.protect_faults,
        c.fault_errors,
        c.unshares,
        c.discards,
    ]);
    // Order-independent sums over the (hash) maps.
    for (vm, t) in st.tables() {
        h = h.wrapping_add(mix(&[u64::from(vm), t.host_addr() as u64, u64::from(t.len())]));
    }
    for (vm, cfg) in st.merge_configs() {
        h = h.wrapping_add(mix(&[1 << 40 | u64::from(vm), u64::from(cfg.enabled), u64::from(cfg.domain)]));
    }
    h
}

/// What an idle poll did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Poll {
    /// Idle mode ended: scan now.
    pub resumed: bool,
    /// Pages are left to visit (budget or interruption): poll again after `sleep_ms`.
    pub more: bool,
}

/// Consecutive runs `(start, len)` of sorted distinct `pages`, at most `max` long.
fn runs(pages: &[u32], max: u32) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((s, n)) if *s + *n == p && *n < max => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

/// Pages of `a` not in `b` (both sorted).
fn minus(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len());
    let mut j = 0;
    for &p in a {
        while j < b.len() && b[j] < p {
            j += 1;
        }
        if j >= b.len() || b[j] != p {
            out.push(p);
        }
    }
    out
}

impl Scanner {
    /// Whether the scanner is idle (polling dirty logs instead of scanning).
    pub(crate) fn is_idle(&self) -> bool {
        self.idle.is_some()
    }

    /// The [`fingerprint`] now.
    pub(super) fn fingerprint(&self) -> u64 {
        fingerprint(&self.core.lock())
    }

    /// Changes the scanner saw or made so far (merges, zeroings, pages newly
    /// volatile, mismatches, errors); a quiet scan leaves it unchanged.
    pub(super) fn activity(&self) -> u64 {
        let c = &self.counters;
        let volatile: u64 = self.vms.values().map(|v| v.newly_volatile).sum();
        c.merges + c.hash_mismatches + c.cross_domain + self.extra_activity + volatile
    }

    /// Called at the end of a full scan: decides between scanning on, sleeping
    /// longer (checksum mode) and going idle (dirty-log mode). Returns whether
    /// the scanner went idle (the unstable index is then kept).
    pub(super) fn after_full_scan(&mut self, vms: &[VmId], tun: &Tunables) -> bool {
        let (fp, activity) = (self.fingerprint(), self.activity());
        let quiet = self.scan_fp == Some(fp) && self.scan_activity == activity;
        (self.scan_fp, self.scan_activity) = (Some(fp), activity);
        if !quiet || !self.backoff_enabled {
            self.quiet_scans = 0;
            return false;
        }
        self.quiet_scans = self.quiet_scans.saturating_add(1);
        let logged = tun.change_detection == ChangeDetection::DirtyLog
            && vms.iter().all(|vm| self.vms.get(vm).is_some_and(|v| v.dirty_log));
        if !logged {
            self.quiet_sleep = Some(quiet_sleep(self.quiet_scans));
            return false;
        }
        for vs in self.vms.values_mut() {
            vs.pending = (0..vs.pages.len() as u32).filter(|&p| vs.class(p) == Class::Volatile).collect();
        }
        self.idle = Some(Idle { fp, last_walk: Instant::now() });
        true
    }

    /// The longer sleep owed after a quiet full scan in checksum mode (once).
    pub(crate) fn take_quiet_sleep(&mut self) -> Option<Duration> {
        self.quiet_sleep.take()
    }

    /// Ends idle mode: the next batch starts a fresh full scan.
    pub(crate) fn leave_idle(&mut self) {
        if self.idle.take().is_none() {
            return;
        }
        for vs in self.vms.values_mut() {
            // Pending pages stay volatile with no cached hash: the scan re-learns them.
            vs.pending = Vec::new();
        }
        self.restart_scan();
    }

    /// Forgets every back-off (tunables changed, paused and resumed, unmerge-all).
    pub(crate) fn reset_backoff(&mut self) {
        self.leave_idle();
        self.quiet_scans = 0;
        self.quiet_sleep = None;
    }

    /// Marks page `p` of `vm` as written: cached hash and unstable entry dropped.
    fn mark_changed(&mut self, vs: &mut VmScan, vm: VmId, domain: DomainId, p: u32) {
        let Some(&ps) = vs.pages.get(p as usize) else { return };
        if ps.hashed && vs.class(p) == Class::Unshared {
            self.unstable.remove(Key { domain, hash: ps.hash }, Mapper { vm, page: p });
        }
        let rec = &mut vs.pages[p as usize];
        (rec.hashed, rec.age, rec.skips) = (false, 0, 0);
        vs.set_class(p, Class::Volatile);
    }

    /// One poll of the idle mode (see the module documentation).
    pub(crate) fn poll_idle(&mut self, tun: &Tunables, interrupted: &dyn Fn() -> bool) -> Result<Poll> {
        let resumed = Poll { resumed: true, more: false };
        let Some(idle) = self.idle else { return Ok(resumed) };
        let targets = self.targets();
        if targets.is_empty() || tun.change_detection != ChangeDetection::DirtyLog {
            self.leave_idle();
            return Ok(resumed);
        }
        let walk_due = idle.last_walk.elapsed() >= DEVICE_WALK;
        let (fp, device) = {
            let st = self.core.lock();
            let mut device: Vec<(VmId, Vec<u32>)> = Vec::new();
            if walk_due {
                for t in &targets {
                    let Some(table) = st.table(t.vm) else { continue };
                    let scan = self.vms.get(&t.vm);
                    // Written by a device, or moved by compaction: a private page
                    // on another frame than the one it was hashed on (a merged
                    // page keeps the frame it was hashed on in its record), or a
                    // shared frame the stable index does not know.
                    let moved = |p: u32, frame: FrameNo| {
                        let hashed_on = scan
                            .filter(|vs| vs.class(p) != Class::Merged)
                            .and_then(|vs| vs.pages.get(p as usize))
                            .filter(|ps| ps.hashed);
                        hashed_on.is_some_and(|ps| ps.frame != frame)
                            || (st.frames().refs(frame) > 1 && self.stable.key_of(frame).is_none())
                    };
                    let pages: Vec<u32> = (0u32..)
                        .zip(table.entries())
                        .filter(|(p, e)| e.flags.contains(PageFlags::MERGE_DIRTY) || moved(*p, e.frame))
                        .map(|(p, _)| p)
                        .collect();
                    if !pages.is_empty() {
                        device.push((t.vm, pages));
                    }
                }
            }
            (fingerprint(&st), device)
        };
        if fp != idle.fp {
            self.leave_idle();
            return Ok(resumed);
        }
        if let Some(i) = self.idle.as_mut().filter(|_| walk_due) {
            i.last_walk = Instant::now();
        }
        for t in &targets {
            let log = self.core.dirty_log(t.vm);
            let Some(vs) = self.vms.get_mut(&t.vm) else { continue };
            let Some(log) = log.filter(|_| vs.dirty_log) else {
                self.leave_idle();
                return Ok(resumed);
            };
            self.dirty_buf.clear();
            if let Err(e) = log.take_dirty(&mut self.dirty_buf) {
                tracing::warn!("dirty log of VM {}: {e}; using checksums", t.vm);
                vs.dirty_log = false;
                self.leave_idle();
                return Ok(resumed);
            }
            vs.add_dirty(&self.dirty_buf);
        }
        let mut budget = tun.pages_to_scan as usize;
        let mut more = false;
        for t in &targets {
            let Some(mut vs) = self.vms.remove(&t.vm) else { continue };
            let mut dirty = Vec::new();
            vs.drain_dirty(&mut dirty);
            // Pending pages that stayed clean for a poll interval are visited now.
            let mut visit = minus(&std::mem::take(&mut vs.pending), &dirty);
            if let Some((_, pages)) = device.iter().find(|(vm, _)| *vm == t.vm) {
                visit.extend_from_slice(pages);
                visit.sort_unstable();
                visit.dedup();
            }
            for &p in &dirty {
                self.mark_changed(&mut vs, t.vm, t.domain, p);
            }
            let mut pending = dirty;
            if visit.len() > budget {
                more = true;
                pending.extend(visit.drain(budget..));
            }
            budget -= visit.len();
            self.vms.insert(t.vm, vs);
            let mut done = 0;
            for (start, n) in runs(&visit, CHUNK) {
                if interrupted() {
                    more = true;
                    break;
                }
                match self.chunk(*t, start, n, tun) {
                    Ok(_) => {}
                    Err(Error::UnknownVm(_)) => {
                        // Destroyed since this batch listed it: nothing more to visit.
                        tracing::debug!(vm = t.vm, "VM gone while merging it; its remaining pages are skipped");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!("merging VM {} pages {start}..+{n}: {e}", t.vm);
                        self.extra_activity += 1;
                        self.leave_idle();
                        return Ok(resumed);
                    }
                }
                done += n as usize;
                self.core.yield_to_faults();
            }
            let Some(vs) = self.vms.get_mut(&t.vm) else { continue };
            pending.extend(visit[..done].iter().copied().filter(|&p| vs.class(p) == Class::Volatile));
            pending.extend_from_slice(&visit[done..]);
            pending.sort_unstable();
            pending.dedup();
            vs.pending = pending;
        }
        self.counters.idle_polls += 1;
        if !more {
            self.counters.full_scans += 1;
        }
        Ok(Poll { resumed: false, more })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_poll_follows_the_scan_rate() {
        // Full speed: the shortest interval.
        assert_eq!(idle_poll_interval(65_536, 1_000_000, 0), IDLE_POLL);
        // KSM's default rate on 256 MiB: a full scan takes 13 s; polls every 2 s.
        assert_eq!(idle_poll_interval(65_536, 100, 20), IDLE_POLL_MAX);
        // 10k pages at 100 per 20 ms: 2 s per scan, polls every 400 ms.
        assert_eq!(idle_poll_interval(10_000, 100, 20), Duration::from_millis(400));
        // A long sleep between batches is never undercut.
        assert_eq!(idle_poll_interval(10, 100, 5_000), Duration::from_secs(5));
    }

    #[test]
    fn schedules() {
        assert_eq!((skip_age(0), skip_age(3), skip_age(5), skip_age(8), skip_age(200)), (1, 1, 2, 4, 8));
        assert_eq!(quiet_sleep(1), QUIET_SLEEP_FIRST);
        assert_eq!(quiet_sleep(2), QUIET_SLEEP_FIRST * 2);
        assert_eq!(quiet_sleep(40), QUIET_SLEEP_MAX);
    }

    #[test]
    fn page_sets() {
        assert_eq!(runs(&[1, 2, 3, 7, 8, 10], 2), [(1, 2), (3, 1), (7, 2), (10, 1)]);
        assert_eq!(minus(&[1, 2, 5, 9], &[2, 3, 9]), [1, 5]);
        assert!(runs(&[], 4).is_empty());
    }
}
