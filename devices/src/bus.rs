//! A port-I/O bus: maps port ranges to devices.

use std::sync::{Arc, Mutex};

/// A device on the bus. Offsets are relative to the device's base port.
pub trait BusDevice: Send {
    /// Handles a read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors inserting a device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The range overlaps a device already on the bus.
    #[error("port range {base:#x}+{len} overlaps another device")]
    Overlap {
        /// First port.
        base: u64,
        /// Number of ports.
        len: u64,
    },
    /// The range is empty.
    #[error("empty port range at {0:#x}")]
    Empty(u64),
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// The bus: a sorted, non-overlapping list of port ranges.
#[derive(Default)]
pub struct PioBus {
    entries: Vec<Entry>,
}

impl PioBus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base+len)`.
    pub fn insert(&mut self, device: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), Error> {
        if len == 0 {
            return Err(Error::Empty(base));
        }
        if self.entries.iter().any(|e| base < e.base + e.len && e.base < base + len) {
            return Err(Error::Overlap { base, len });
        }
        self.entries.push(Entry { base, len, device });
        self.entries.sort_by_key(|e| e.base);
        Ok(())
    }

    fn find(&self, port: u64) -> Option<(&Entry, u64)> {
        let e = self.entries.iter().find(|e| port >= e.base && port < e.base + e.len)?;
        Some((e, port - e.base))
    }

    /// Dispatches a read; returns false (and fills 0xff) when no device is there.
    pub fn read(&self, port: u64, data: &mut [u8]) -> bool {
        match self.find(port) {
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

    /// Dispatches a write; returns false when no device is there.
    pub fn write(&self, port: u64, data: &[u8]) -> bool {
        match self.find(port) {
            Some((e, off)) => {
                lock(&e.device).write(off, data);
                true
            }
            None => false,
        }
    }
}

fn lock(d: &Arc<Mutex<dyn BusDevice>>) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    // A device that panicked while holding its lock has no state worth protecting
    // from the guest: keep serving it.
    d.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let mut bus = PioBus::new();
        bus.insert(Arc::new(Mutex::new(Echo(1))), 0x3f8, 8).unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Echo(2))), 0x3fc, 8).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Echo(2))), 0x60, 0).is_err());
        bus.insert(Arc::new(Mutex::new(Echo(5))), 0x60, 5).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x64, &[9]));
        assert!(bus.read(0x60, &mut b));
        assert_eq!(b[0], 9);
        assert!(!bus.read(0x80, &mut b));
        assert_eq!(b[0], 0xff);
    }
}
