//! The merge decisions of the scanner for one candidate page: join a stable
//! frame, pair with an unstable page (choosing the frame to keep by 2 MiB
//! occupancy: passive compaction), or become a candidate itself; each extended
//! into a run of consecutive pages when the clone pattern allows.

use crate::core::{Error, Result, State, Txn};
use crate::frame_table::Mapper;
use crate::page_table::PageFlags;
use crate::{FrameNo, VmId, HUGE_FRAME_PAGES};

use super::domains::DomainId;
use super::pages::{Class, VmScan};
use super::scanner::{Cand, Scanner, Target};
use super::stable::{Key, Verdict};
use super::tunables::Tunables;
use super::unstable::Entry;

impl Scanner {
    /// Merges `cands[0]` (and a run of following candidates when possible);
    /// returns how many candidates were handled.
    pub(super) fn merge_candidate(
        &mut self,
        t: &mut Txn<'_>,
        vs: &mut VmScan,
        target: Target,
        cands: &[Cand],
        tun: &Tunables,
    ) -> Result<usize> {
        let (vm, domain, max) = (target.vm, target.domain, tun.max_page_sharing);
        let c = cands[0];
        let key = |c: &Cand| Key { domain, hash: c.hash };
        if let Some(f) = self.stable.find(key(&c), |f| judge(t.st, domain, max, f)) {
            let mut k = 1;
            while k < cands.len()
                && cands[k].page == c.page + k as u32
                && self.stable.contains(key(&cands[k]), f + k as u32)
                && judge(t.st, domain, max, f + k as u32) == Verdict::Usable
            {
                k += 1;
            }
            let ok = self.share(t, vm, c.page, f, k as u32, max)?;
            for (i, &merged) in ok.iter().enumerate() {
                let class = if merged { Class::Merged } else { Class::Unshared };
                vs.set_class(c.page + i as u32, class);
            }
            return Ok(k);
        }
        if c.volatile {
            vs.set_class(c.page, Class::Volatile);
            return Ok(1);
        }
        let me = Mapper { vm, page: c.page };
        let partner = self.unstable.get(key(&c)).filter(|u| valid_unstable(t.st, domain, u, me));
        let Some(u) = partner else {
            self.unstable.insert(key(&c), Entry { mapper: me, frame: c.frame });
            vs.set_class(c.page, Class::Unshared);
            return Ok(1);
        };
        let mut k = 1;
        while k < cands.len() && cands[k].page == c.page + k as u32 && !cands[k].volatile {
            let next = Mapper { vm: u.mapper.vm, page: u.mapper.page + k as u32 };
            let want = Entry { mapper: next, frame: u.frame + k as u32 };
            let got = self.unstable.get(key(&cands[k]));
            if got != Some(want) || !valid_unstable(t.st, domain, &want, me) {
                break;
            }
            k += 1;
        }
        // Which side keeps its frames: the one whose moving side then extends a
        // neighbouring mapping (adjacent guest pages on adjacent frames coalesce
        // into one VMA); otherwise passive compaction: keep the frames whose
        // 2 MiB host frames are fuller.
        let mine_contiguous = (0..k).all(|i| cands[i].frame == c.frame + i as u32);
        let k32 = k as u32;
        let flip = match (joins(t.st, me, u.frame, k32), mine_contiguous && joins(t.st, u.mapper, c.frame, k32)) {
            (false, true) => true,
            (true, _) => false,
            (false, false) => mine_contiguous && occupancy(t.st, c.frame, k) > occupancy(t.st, u.frame, k),
        };
        let ok = if flip {
            self.share(t, u.mapper.vm, u.mapper.page, c.frame, k as u32, max)?
        } else {
            self.share(t, vm, c.page, u.frame, k as u32, max)?
        };
        for (i, &merged) in ok.iter().enumerate() {
            let cand = cands[i];
            let q = Mapper { vm: u.mapper.vm, page: u.mapper.page + i as u32 };
            if merged {
                if flip {
                    self.counters.flips += 1;
                }
                let kept = if flip { cand.frame } else { u.frame + i as u32 };
                self.unstable.remove(key(&cand), q);
                self.stable.insert(key(&cand), kept);
                vs.set_class(cand.page, Class::Merged);
                if q.vm == vm {
                    vs.set_class(q.page, Class::Merged);
                } else if let Some(other) = self.vms.get_mut(&q.vm) {
                    other.set_class(q.page, Class::Merged);
                }
            } else {
                self.unstable.insert(key(&cand), Entry { mapper: Mapper { vm, page: cand.page }, frame: cand.frame });
                vs.set_class(cand.page, Class::Unshared);
            }
        }
        Ok(k)
    }

    /// [`super::ops::share_run`] with the scanner's accounting; refusals count as no merge.
    fn share(&mut self, t: &mut Txn<'_>, vm: VmId, first: u32, target: FrameNo, n: u32, max: u32) -> Result<Vec<bool>> {
        let differs_before = t.st.counters().merge_differs;
        match super::ops::share_run(t, vm, first, target, n, max) {
            Ok(ok) => {
                let merged = ok.iter().filter(|&&b| b).count() as u64;
                self.counters.merges += merged;
                self.counters.merge_runs += ok.windows(2).filter(|w| w[1] && !w[0]).count() as u64 + u64::from(ok[0]);
                self.counters.hash_mismatches += t.st.counters().merge_differs - differs_before;
                Ok(ok)
            }
            Err(Error::CrossDomain { a, da, b, db }) => {
                self.counters.cross_domain += 1;
                tracing::error!("merger proposed a frame of VM {b} (domain {db}) to VM {a} (domain {da})");
                Ok(vec![false; n as usize])
            }
            Err(Error::VmaBudget) => Ok(vec![false; n as usize]),
            Err(e) => Err(e),
        }
    }
}

/// Whether stable frame `f` can take one more page of `domain`.
fn judge(st: &State, domain: DomainId, max: u32, f: FrameNo) -> Verdict {
    let refs = st.frames().refs(f);
    let Some(m) = st.frames().first_mapper(f) else {
        return Verdict::Stale;
    };
    let Some(e) = st.table(m.vm).and_then(|t| t.get(m.page)) else {
        return Verdict::Stale;
    };
    if e.frame != f || !e.flags.contains(PageFlags::SHARED) || st.merge_config(m.vm).domain != domain {
        return Verdict::Stale;
    }
    if refs >= max {
        Verdict::Full
    } else {
        Verdict::Usable
    }
}

/// Whether unstable entry `u` still describes a private page of `domain` other than `me`.
pub(super) fn valid_unstable(st: &State, domain: DomainId, u: &Entry, me: Mapper) -> bool {
    if u.mapper == me {
        return false;
    }
    let cfg = st.merge_config(u.mapper.vm);
    let Some(e) = st.table(u.mapper.vm).and_then(|t| t.get(u.mapper.page)) else {
        return false;
    };
    cfg.enabled
        && cfg.domain == domain
        && e.frame == u.frame
        && st.frames().refs(u.frame) == 1
        && !e.flags.contains(PageFlags::SHARED)
        && !e.flags.contains(PageFlags::ZERO)
}

/// Whether mapping pages `m..m+n` onto frames `first..first+n` makes them
/// continue the mapping of a guest neighbour: page `m - 1` maps `first - 1` or
/// page `m + n` maps `first + n` (the kernel then merges the two VMAs).
fn joins(st: &State, m: Mapper, first: FrameNo, n: u32) -> bool {
    let Some(table) = st.table(m.vm) else {
        return false;
    };
    let before = m.page.checked_sub(1).zip(first.checked_sub(1));
    let after = m.page.checked_add(n).zip(first.checked_add(n));
    [before, after].into_iter().flatten().any(|(page, frame)| table.get(page).is_some_and(|e| e.frame == frame))
}

/// Live frames in the 2 MiB host frames of frames `first..first+n`, summed per page.
fn occupancy(st: &State, first: FrameNo, n: usize) -> u64 {
    (0..n as u32)
        .map(|i| {
            let hf = (first + i) / HUGE_FRAME_PAGES;
            u64::from(HUGE_FRAME_PAGES) - u64::from(st.pool().buddy().free_in_huge_frame(hf))
        })
        .sum()
}
