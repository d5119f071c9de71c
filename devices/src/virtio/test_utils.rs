//! A driver for tests: drives a transport through its registers exactly as a
//! guest's virtio-mmio driver does, with split rings it lays out in a real
//! `GuestMemoryMmap`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vm_superio::Trigger;

use super::{MmioTransport, VirtioDevice};
use crate::bus::BusDevice;

/// Guest memory size in tests.
pub const MEM_SIZE: u64 = 16 << 20;
/// Where test data buffers start.
pub const DATA: u64 = 0x10_0000;
/// Descriptor flag: device-writable.
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// Counts the interrupts it is asked to raise.
#[derive(Clone, Default)]
pub struct CountingTrigger(pub Arc<AtomicUsize>);

impl Trigger for CountingTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// The driver side of one split ring.
#[derive(Clone, Copy, Debug)]
pub struct Ring {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl Ring {
    /// The ring of queue `index`, laid out at `0x10000 * (index + 1)`.
    pub fn new(index: u32, size: u16) -> Self {
        let base = 0x10000 * u64::from(index + 1);
        Ring { size, desc: base, avail: base + 0x1000, used: base + 0x2000, next_desc: 0, avail_idx: 0 }
    }

    /// Writes descriptor `i` as given (no chaining done for the caller).
    pub fn write_desc(&self, mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc + 16 * u64::from(i));
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&b, at).expect("descriptor write");
    }

    /// Makes chain `head` available.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = GuestAddress(self.avail + 4 + 2 * u64::from(self.avail_idx % self.size));
        mem.write_obj(head.to_le(), slot).expect("avail write");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2)).expect("avail idx");
    }

    /// Sets the available index directly (to offer garbage).
    pub fn set_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        self.avail_idx = idx;
        mem.write_obj(idx.to_le(), GuestAddress(self.avail + 2)).expect("avail idx");
    }

    /// Writes a chain of `(addr, len, flags)` buffers and makes it available;
    /// returns its head.
    pub fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, flags)) in bufs.iter().enumerate() {
            let i = (self.next_desc + k as u16) % self.size;
            let last = k + 1 == bufs.len();
            let flags = if last { flags } else { flags | VRING_DESC_F_NEXT as u16 };
            self.write_desc(mem, i, addr, len, flags, (i + 1) % self.size);
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        self.publish(mem, head);
        head
    }

    /// The used index the device wrote.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).expect("used idx"))
    }

    /// Used element `n`: (head, length written).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, n: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(n % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).expect("used id");
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("used len");
        (u32::from_le(id), u32::from_le(len))
    }
}

/// A guest driver of one transport.
pub struct Driver<D> {
    pub t: MmioTransport<D>,
    pub mem: GuestMemoryMmap,
    pub irqs: Arc<AtomicUsize>,
    pub rings: Vec<Ring>,
}

impl<D: VirtioDevice> Driver<D> {
    /// A driver of `device` on fresh guest memory.
    pub fn new(device: D) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory");
        let trigger = CountingTrigger::default();
        let irqs = trigger.0.clone();
        let t = MmioTransport::new(device, mem.clone(), Box::new(trigger)).expect("transport");
        Driver { t, mem, irqs, rings: Vec::new() }
    }

    /// Reads a control register.
    pub fn r(&mut self, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(u64::from(reg), &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a control register.
    pub fn w(&mut self, reg: u32, v: u32) {
        self.t.write(u64::from(reg), &v.to_le_bytes());
    }

    /// Interrupts raised so far.
    pub fn irq_count(&self) -> usize {
        self.irqs.load(Ordering::SeqCst)
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&mut self) -> u64 {
        self.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let lo = self.r(VIRTIO_MMIO_DEVICE_FEATURES);
        self.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let hi = self.r(VIRTIO_MMIO_DEVICE_FEATURES);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Sets a status bit as drivers do (read, or in, write back).
    pub fn add_status(&mut self, bit: u32) {
        let s = self.r(VIRTIO_MMIO_STATUS);
        self.w(VIRTIO_MMIO_STATUS, s | bit);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; true when the device
    /// kept FEATURES_OK.
    pub fn negotiate(&mut self, features: u64) -> bool {
        self.w(VIRTIO_MMIO_STATUS, 0);
        self.rings.clear();
        assert_eq!(self.r(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.r(VIRTIO_MMIO_VERSION), 2);
        self.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.add_status(VIRTIO_CONFIG_S_DRIVER);
        self.device_features();
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        self.add_status(VIRTIO_CONFIG_S_FEATURES_OK);
        self.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK != 0
    }

    /// Sets queue `index` up on `ring` and makes it ready.
    pub fn setup_ring(&mut self, index: u32, ring: Ring) {
        // A fresh ring, as a driver allocates it (zeroed).
        let _ = self.mem.write_slice(&[0u8; 0x3000], GuestAddress(ring.desc));
        self.w(VIRTIO_MMIO_QUEUE_SEL, index);
        assert_eq!(self.r(VIRTIO_MMIO_QUEUE_READY), 0);
        assert!(self.r(VIRTIO_MMIO_QUEUE_NUM_MAX) >= u32::from(ring.size));
        self.w(VIRTIO_MMIO_QUEUE_NUM, u32::from(ring.size));
        for (lo, hi, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, ring.desc),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, ring.avail),
            (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH, ring.used),
        ] {
            self.w(lo, addr as u32);
            self.w(hi, (addr >> 32) as u32);
        }
        self.w(VIRTIO_MMIO_QUEUE_READY, 1);
        self.rings.push(ring);
    }

    /// The whole initialisation: negotiation, `queues` queues of `size`, DRIVER_OK.
    pub fn init(&mut self, features: u64, queues: u32, size: u16) {
        assert!(self.negotiate(features), "FEATURES_OK refused");
        for i in 0..queues {
            self.setup_ring(i, Ring::new(i, size));
        }
        self.add_status(VIRTIO_CONFIG_S_DRIVER_OK);
        assert!(self.t.is_active(), "status {:#x}", self.t.status());
    }

    /// Notifies queue `index` through QueueNotify.
    pub fn kick(&mut self, index: u32) {
        self.w(VIRTIO_MMIO_QUEUE_NOTIFY, index);
    }

    /// Reads and acknowledges the interrupt status.
    pub fn ack_irq(&mut self) -> u32 {
        let s = self.r(VIRTIO_MMIO_INTERRUPT_STATUS);
        self.w(VIRTIO_MMIO_INTERRUPT_ACK, s);
        s
    }

    /// True when the device set DEVICE_NEEDS_RESET.
    pub fn needs_reset(&mut self) -> bool {
        self.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET != 0
    }
}
