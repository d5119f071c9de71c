//! How guest A's data pages get their state before the timed writes: densevm's
//! protect / merge / unshare, or the kernel's KSM merging them.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{rt, INTERRUPTED};
use crate::bench::ksm::{self, KsmControl};
use crate::commands::CommandError;
use vmm::host::Host;

/// How A's data pages are prepared before A resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Prep {
    /// Nothing: private frames.
    Private,
    /// Write-protected, not shared: the fault round trip alone (no remap).
    Protect,
    /// Merged with B's: every frame shared by 2 guest pages.
    Copy,
    /// Merged with B's, then B's unshared: A is the sole mapper of a merged
    /// frame, with background reuse off (the write reuses it at fault time).
    Reuse,
    /// As [`Prep::Reuse`] with background reuse on, measured after the fault
    /// handler's thread made A's pages writable in place (the default).
    ReuseBackground,
    /// Anonymous RAM merged by the kernel's KSM.
    Ksm,
}

/// Prepares A's data pages `[first, first+n)`; returns how many got the
/// intended state. Background reuse is off for [`Prep::Reuse`] (the caller
/// turns it on again after the measured writes) and on otherwise.
pub(super) fn prepare(host: &Host, prep: Prep, mem: [u32; 2], first: u32, n: u32) -> Result<u64, CommandError> {
    let mgr = host.memory();
    mgr.set_background_reuse(prep != Prep::Reuse);
    let mut done = 0;
    for p in first..first + n {
        match prep {
            Prep::Private | Prep::Ksm => return Ok(u64::from(n)),
            Prep::Protect => {
                mgr.protect(mem[0], p).map_err(rt)?;
                done += 1;
            }
            Prep::Copy | Prep::Reuse | Prep::ReuseBackground => {
                let merged = matches!(
                    mgr.merge_pages((mem[0], p), (mem[1], p)).map_err(rt)?,
                    memory::manager::MergeOutcome::Merged { .. }
                );
                if merged && (prep == Prep::Copy || mgr.unshare(mem[1], p).map_err(rt)?) {
                    done += 1;
                }
            }
        }
    }
    if prep == Prep::ReuseBackground {
        wait_background_reuse(host)?;
        // The intended state: A's pages private and writable, B's gone elsewhere.
        done = 0;
        for p in first..first + n {
            let flags = mgr.page_flags(mem[0], p).map_err(rt)?;
            let frame = mgr.frame_of(mem[0], p).map_err(rt)?;
            if !flags.contains(memory::PageFlags::PROTECTED) && mgr.frame_refs(frame) == 1 {
                done += 1;
            }
        }
    }
    Ok(done)
}

/// Waits until the fault handler's thread drained the background reuse queue
/// (it does so on its own); returns how long that took after the call.
pub(super) fn wait_background_reuse(host: &Host) -> Result<Duration, CommandError> {
    let start = Instant::now();
    while host.memory().background_reuse_pending() > 0 {
        if INTERRUPTED.load(Ordering::Relaxed) {
            return Err(rt("interrupted"));
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(rt("the background reuse did not drain within 60 s"));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(start.elapsed())
}

/// Waits until the kernel merged A's `n` data pages at host address `addr`, then
/// stops ksmd (merged pages stay merged) so that it does not compete for CPU.
pub(super) fn wait_ksm_merged(ksm: &mut KsmControl, addr: u64, n: u64) -> Result<u64, CommandError> {
    ksm.set("run", "1").map_err(rt)?;
    let res = ksm.wait_until("merge the guest's data pages", Duration::from_secs(60), |_| {
        if INTERRUPTED.load(Ordering::Relaxed) {
            return Err(ksm::Error::Interrupted);
        }
        Ok(ksm::ksm_pages_in(addr, n).map_err(|e| ksm::Error::Io("reading kpageflags", e))? >= n)
    });
    let merged = ksm::ksm_pages_in(addr, n).map_err(rt)?;
    ksm.set("run", "0").map_err(rt)?;
    match res {
        Err(ksm::Error::Interrupted) => Err(rt("interrupted")),
        Err(e) if merged == 0 => Err(rt(e)),
        _ => Ok(merged),
    }
}
