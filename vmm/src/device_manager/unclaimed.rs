//! Accounting of guest I/O accesses no device claims: counted per VM, and the first
//! few logged (a guest probing or spinning on an empty address cannot flood the log).

use std::sync::atomic::{AtomicU64, Ordering};

/// Unclaimed accesses a VM logs before it only counts them.
pub const LOGGED_UNCLAIMED: u64 = 16;

/// Counts of unclaimed guest accesses, by address space and direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnclaimedIo {
    /// Port reads no device claimed (they read all-ones).
    pub pio_reads: u64,
    /// Port writes no device claimed (dropped).
    pub pio_writes: u64,
    /// MMIO reads no device claimed (they read all-ones).
    pub mmio_reads: u64,
    /// MMIO writes no device claimed (dropped).
    pub mmio_writes: u64,
}

impl UnclaimedIo {
    /// All unclaimed accesses.
    pub fn total(&self) -> u64 {
        self.pio_reads + self.pio_writes + self.mmio_reads + self.mmio_writes
    }
}

/// Kind of an unclaimed access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    PioRead,
    PioWrite,
    MmioRead,
    MmioWrite,
}

impl Access {
    fn describe(self) -> (&'static str, &'static str) {
        match self {
            Access::PioRead => ("port", "read"),
            Access::PioWrite => ("port", "write"),
            Access::MmioRead => ("MMIO", "read"),
            Access::MmioWrite => ("MMIO", "write"),
        }
    }
}

/// The per-VM counters (shared by the VM's vCPU threads).
#[derive(Debug)]
pub(crate) struct UnclaimedCounter {
    vm_id: String,
    counts: [AtomicU64; 4],
    seen: AtomicU64,
}

impl UnclaimedCounter {
    pub(crate) fn new(vm_id: &str) -> Self {
        UnclaimedCounter { vm_id: vm_id.to_string(), counts: Default::default(), seen: AtomicU64::new(0) }
    }

    /// Counts an unclaimed access of `size` bytes at `addr`; logs the first
    /// [`LOGGED_UNCLAIMED`] of the VM.
    pub(crate) fn record(&self, access: Access, addr: u64, size: usize) {
        self.counts[access as usize].fetch_add(1, Ordering::Relaxed);
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        if n < LOGGED_UNCLAIMED {
            let (space, dir) = access.describe();
            tracing::warn!(vm = %self.vm_id, "unclaimed {space} {dir} of {size} bytes at {addr:#x}");
            if n + 1 == LOGGED_UNCLAIMED {
                tracing::warn!(vm = %self.vm_id, "further unclaimed accesses of this VM are counted, not logged");
            }
        }
    }

    /// A snapshot of the counts.
    pub(crate) fn snapshot(&self) -> UnclaimedIo {
        let get = |a: Access| self.counts[a as usize].load(Ordering::Relaxed);
        UnclaimedIo {
            pio_reads: get(Access::PioRead),
            pio_writes: get(Access::PioWrite),
            mmio_reads: get(Access::MmioRead),
            mmio_writes: get(Access::MmioWrite),
        }
    }
}
