//! How guest A's data pages get their state before the timed writes: densevm's
//! protect / merge / unshare, or the kernel's KSM merging them.

use std::sync::atomic::Ordering;
use std::time::Duration;

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
    /// Merged with B's, then B's unshared: A is the sole mapper of a merged frame.
    Reuse,
    /// Anonymous RAM merged by the kernel's KSM.
    Ksm,
}

/// Prepares A's data pages `[first, first+n)`; returns how many got the intended state.
pub(super) fn prepare(host: &Host, prep: Prep, mem: [u32; 2], first: u32, n: u32) -> Result<u64, CommandError> {
    let mgr = host.memory();
    let mut done = 0;
    for p in first..first + n {
        match prep {
            Prep::Private | Prep::Ksm => return Ok(u64::from(n)),
            Prep::Protect => {
                mgr.protect(mem[0], p).map_err(rt)?;
                done += 1;
            }
            Prep::Copy | Prep::Reuse => {
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
    Ok(done)
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
