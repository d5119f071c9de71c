//! Holding a VM's vCPUs out of guest mode while the merger remaps a batch of its
//! pages.
//!
//! Every remap changes the host mapping behind guest pages, and KVM follows
//! through its MMU notifier: it zaps the translations and bumps the VM's
//! invalidation sequence, and a vCPU fault that overlaps any invalidation of its
//! VM is retried from the start. A vCPU that touches freshly remapped pages of
//! its own VM while the merger keeps remapping others therefore retries its
//! faults again and again, each time taking the process's `mmap_lock` for
//! reading (KVM resolves faults on write-protected pages through the slow GUP
//! path), which the merger's `mmap` in turn waits for. Measured here with 8 idle
//! clones: merging took 5x longer with the guests running than with them paused.
//!
//! The faults that get in the way are not only those of the VM being merged:
//! every vCPU refaulting pages merged a moment earlier (in any VM) takes the
//! `mmap_lock` for reading, and each `mmap` of the merger waits for all of them.
//! Measured here with 8 idle 32 MiB clones: 1.2 s to merge them with the guests
//! running, 0.24 s with the guests paused, 1.2 s again when only the chunk's own
//! VM was held, 0.3 s when every merging VM was held during each chunk.
//!
//! A [`VcpuGate`], registered per VM by the VMM, lets the scanner hold the
//! vCPUs of every merging VM outside `KVM_RUN` from the first remap of a chunk
//! until the chunk ends (about a millisecond for 256 pages) and release them
//! after: the guests see short pauses instead of faults that queue behind the
//! merger's `mmap`s. Chunks with nothing to remap (the idle steady state) hold
//! nothing. The gate is an optimization only: if vCPUs do not leave guest mode
//! in time the chunk runs anyway, as safe as without the gate.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// Keeps one VM's vCPUs out of guest mode on request (implemented by the VMM).
pub trait VcpuGate: Send + Sync {
    /// Stops the VM's vCPUs from entering guest mode and waits (briefly) until
    /// none is in it; returns whether that was reached. Every call is paired
    /// with one [`VcpuGate::release`].
    fn hold(&self) -> bool;
    /// Lets the vCPUs run again.
    fn release(&self);
}

/// Holds on a set of vCPU gates, taken together and released together.
pub(crate) struct HeldVcpus {
    gates: Vec<Arc<dyn VcpuGate>>,
    since: Instant,
    /// Every gate's vCPUs left guest mode in time.
    pub(crate) reached: bool,
}

impl HeldVcpus {
    /// Holds every gate of `gates` (see [`VcpuGate::hold`]).
    pub(crate) fn hold(gates: Vec<Arc<dyn VcpuGate>>) -> Self {
        let since = Instant::now();
        let mut reached = true;
        for g in &gates {
            reached &= g.hold();
        }
        HeldVcpus { gates, since, reached }
    }

    /// Releases every gate; returns how long they were held.
    pub(crate) fn release(mut self) -> Duration {
        self.release_all();
        self.since.elapsed()
    }

    fn release_all(&mut self) {
        for g in self.gates.drain(..) {
            g.release();
        }
    }
}

impl Drop for HeldVcpus {
    fn drop(&mut self) {
        self.release_all();
    }
}
