//! Address buses: each maps ranges of one address space (I/O ports or guest-physical
//! MMIO addresses) to devices, refuses overlapping ranges and dispatches accesses.
//!
//! [`PioBus`] serves the port-I/O exits of the vCPUs, [`MmioBus`] their MMIO exits. An
//! access is claimed only when it lies wholly inside one device's range; an access
//! nobody claims reads as all-ones and its writes go nowhere, and the caller learns
//! of it (to count and log it).

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};

#[cfg(test)]
mod tests;

/// A device on a bus. Offsets are relative to the device's base address.
pub trait BusDevice: Send {
    /// Handles a read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device as buses hold it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// The address space a bus serves.
pub trait AddressSpace {
    /// Name of the space in errors.
    const NAME: &'static str;
    /// Last valid address of the space.
    const LAST: u64;
}

/// The I/O-port space (16-bit ports).
#[derive(Debug)]
pub enum Pio {}

impl AddressSpace for Pio {
    const NAME: &'static str = "port";
    const LAST: u64 = 0xffff;
}

/// The guest-physical MMIO space.
#[derive(Debug)]
pub enum Mmio {}

impl AddressSpace for Mmio {
    const NAME: &'static str = "MMIO";
    const LAST: u64 = u64::MAX;
}

/// Errors inserting a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The range overlaps a device already on the bus.
    #[error("{space} range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}")]
    Overlap {
        /// Address space.
        space: &'static str,
        /// First address of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
        /// First address of the device already there.
        other_base: u64,
        /// Length of the device already there.
        other_len: u64,
    },
    /// The range is empty.
    #[error("empty {space} range at {base:#x}")]
    Empty {
        /// Address space.
        space: &'static str,
        /// First address.
        base: u64,
    },
    /// The range does not fit in the address space.
    #[error("{space} range {base:#x}+{len:#x} runs past the end of the address space ({last:#x})")]
    OutOfSpace {
        /// Address space.
        space: &'static str,
        /// First address.
        base: u64,
        /// Length.
        len: u64,
        /// Last address of the space.
        last: u64,
    },
}

struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A bus of address space `S`: non-overlapping ranges, each with its device.
pub struct Bus<S> {
    entries: BTreeMap<u64, Entry>,
    space: PhantomData<fn() -> S>,
}

/// The port-I/O bus.
pub type PioBus = Bus<Pio>;
/// The MMIO bus.
pub type MmioBus = Bus<Mmio>;

impl<S: AddressSpace> Default for Bus<S> {
    fn default() -> Self {
        Bus { entries: BTreeMap::new(), space: PhantomData }
    }
}

impl<S: AddressSpace> std::fmt::Debug for Bus<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.ranges().map(|(b, l)| format!("{b:#x}+{l:#x}")).collect();
        f.debug_struct("Bus").field("space", &S::NAME).field("ranges", &ranges).finish()
    }
}

impl<S: AddressSpace> Bus<S> {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base+len)`; refuses empty ranges, ranges past the
    /// end of the address space and ranges overlapping another device.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), Error> {
        if len == 0 {
            return Err(Error::Empty { space: S::NAME, base });
        }
        if base > S::LAST || len - 1 > S::LAST - base {
            return Err(Error::OutOfSpace { space: S::NAME, base, len, last: S::LAST });
        }
        let last = base + (len - 1);
        // Ranges on the bus do not overlap, so the one starting last at or before
        // `last` is the only one that can reach into the new range.
        if let Some((&other_base, other)) = self.entries.range(..=last).next_back() {
            if other_base + (other.len - 1) >= base {
                return Err(Error::Overlap { space: S::NAME, base, len, other_base, other_len: other.len });
            }
        }
        self.entries.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device claiming an access of `size` bytes at `addr` (wholly inside its
    /// range), with the access's offset in that range.
    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let (&base, entry) = self.entries.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add((size as u64).max(1))?;
        (end <= entry.len).then_some((entry, offset))
    }

    /// True when an access of `size` bytes at `addr` lies wholly inside one device.
    pub fn claims(&self, addr: u64, size: usize) -> bool {
        self.find(addr, size).is_some()
    }

    /// The `(base, len)` of every device range, in address order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.entries.iter().map(|(b, e)| (*b, e.len))
    }

    /// Number of devices on the bus.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no device is on the bus.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Dispatches a read; returns false (and fills `data` with 0xff) when no device
    /// claims the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, off)) => {
                lock(&e.device).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device claims the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, off)) => {
                lock(&e.device).write(off, data);
                true
            }
            None => false,
        }
    }
}

fn lock(d: &SharedDevice) -> MutexGuard<'_, dyn BusDevice + 'static> {
    // A device that panicked while holding its lock has no state worth protecting
    // from the guest: keep serving it.
    d.lock().unwrap_or_else(|p| p.into_inner())
}
