//! The virtio-mmio transport, virtio 1.x modern layout (register version 2).
//!
//! [`MmioTransport`] is a [`BusDevice`](crate::bus::BusDevice) the VMM places on its MMIO bus
//! ([`MMIO_LEN`] bytes). Control registers (below [`CONFIG_OFFSET`]) take only
//! aligned 32-bit accesses; the device's configuration space starts at
//! [`CONFIG_OFFSET`] and takes any width. The status follows the spec's
//! initialisation sequence (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK); the
//! driver's errors are refused:
//! - FEATURES_OK with a feature the device does not offer, or without
//!   VIRTIO_F_VERSION_1, is not taken (the driver reads it back unset);
//! - QueueReady on a ring outside guest memory or misaligned, or of an invalid
//!   size, an access of the wrong width, a broken available ring, or a device that
//!   fails to activate set DEVICE_NEEDS_RESET (with a configuration-change
//!   interrupt once DRIVER_OK is set) and the device stops serving its queues;
//! - writes the current state does not allow (features after FEATURES_OK, queue
//!   setup after DRIVER_OK, ...) are ignored.
//!
//! Each is counted ([`TransportCounters`]) and logged at a limited rate. Writing 0
//! to Status resets the transport, its queues and the device.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::ratelimit::LogLimiter;
use super::{Error, Interrupt, InterruptTrigger, QueueCtx, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::virtio::notify::QueueNotify;

mod registers;
#[cfg(test)]
pub(crate) mod tests;

/// "virt" in little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The register layout version (2: virtio 1.x).
pub const MMIO_VERSION: u32 = 2;
/// The vendor ID the transport reports.
pub const VENDOR_ID: u32 = 0;
/// Offset of QueueNotify (where the VMM registers a queue's ioeventfd).
pub const NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Offset of the device configuration space.
pub const CONFIG_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;
/// Size of the MMIO window of one transport.
pub const MMIO_LEN: u64 = 0x1000;

/// Counts of the driver's errors and of the transport's work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportCounters {
    /// Accesses of the wrong width or alignment, or at no register.
    pub bad_accesses: u64,
    /// Writes the current state does not allow (ignored).
    pub refused_writes: u64,
    /// FEATURES_OK refused (unsupported features or no VIRTIO_F_VERSION_1).
    pub refused_features: u64,
    /// Times DEVICE_NEEDS_RESET was set.
    pub needs_reset: u64,
    /// Queue notifications served.
    pub notifications: u64,
    /// Resets by the driver.
    pub resets: u64,
}

/// A virtio device behind the virtio-mmio register interface.
pub struct MmioTransport<D> {
    device: D,
    mem: GuestMemoryMmap,
    irq: Interrupt,
    queues: Vec<Queue>,
    /// Queues given an invalid size or address since the last reset: QueueReady
    /// on them sets DEVICE_NEEDS_RESET.
    queue_bad: Vec<bool>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    status: u32,
    config_generation: u32,
    counters: TransportCounters,
    log: LogLimiter,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device` over the guest's memory, raising `trigger` for
    /// its interrupts; refuses a device whose queue sizes are invalid (0, above
    /// 32768 or not a power of two).
    pub fn new(device: D, mem: GuestMemoryMmap, trigger: InterruptTrigger) -> Result<Self, Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).map_err(|_| Error::Activate(format!("invalid queue size {max}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let n = queues.len();
        Ok(MmioTransport {
            device,
            mem,
            irq: Interrupt::new(trigger),
            queues,
            queue_bad: vec![false; n],
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
            counters: TransportCounters::default(),
            log: LogLimiter::new(),
        })
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, to change the VMM's settings; call
    /// [`MmioTransport::config_changed`] after changing its configuration space.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The transport's counters.
    pub fn counters(&self) -> TransportCounters {
        self.counters
    }

    /// Number of queues (the ioeventfd data matches are `0..queue_count()`).
    pub fn queue_count(&self) -> u32 {
        self.queues.len() as u32
    }

    /// True when the driver set DRIVER_OK and the device has not failed.
    pub fn is_active(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED) == 0
    }

    /// The device's configuration changed: bumps ConfigGeneration and, once the
    /// driver set DRIVER_OK, raises the configuration-change interrupt.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.irq.raise(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    /// Runs `f` on the device with its queues when the device is active (None
    /// otherwise); an error sets DEVICE_NEEDS_RESET.
    pub fn with_queues<R>(&mut self, f: impl FnOnce(&mut D, &mut QueueCtx<'_>) -> Result<R, Error>) -> Option<R> {
        if !self.is_active() {
            return None;
        }
        let mut ctx = QueueCtx { mem: &self.mem, queues: &mut self.queues, irq: &mut self.irq };
        match f(&mut self.device, &mut ctx) {
            Ok(r) => Some(r),
            Err(e) => {
                self.needs_reset(&e.to_string());
                None
            }
        }
    }

    /// Serves a notification of `queue` (an MMIO write of QueueNotify or its
    /// ioeventfd); ignored unless the device is active and the queue ready.
    pub fn process_queue(&mut self, queue: u32) {
        let q = queue as usize;
        if !self.is_active() || !self.queues.get(q).is_some_and(|q| q.ready()) {
            // Linux's balloon driver kicks its stats queue before DRIVER_OK: not an
            // error worth a warning (the buffer is served at activation).
            self.counters.refused_writes += 1;
            tracing::debug!(device = self.device.device_type(), "virtio-mmio: notification of queue {queue} not live");
            return;
        }
        self.counters.notifications += 1;
        self.with_queues(|dev, ctx| dev.process_queue(q, ctx));
    }

    fn needs_reset(&mut self, why: &str) {
        self.counters.needs_reset += 1;
        if self.log.allow() {
            tracing::warn!(device = self.device.device_type(), "virtio-mmio: device needs reset: {why}");
        }
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
                self.irq.raise(VIRTIO_MMIO_INT_CONFIG);
            }
        }
    }

    fn refuse(&mut self, why: &str) {
        self.counters.refused_writes += 1;
        if self.log.allow() {
            tracing::warn!(device = self.device.device_type(), "virtio-mmio: ignored: {why}");
        }
    }

    fn reset(&mut self) {
        self.counters.resets += 1;
        self.device.reset();
        self.queues.iter_mut().for_each(QueueT::reset);
        self.queue_bad.fill(false);
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.status = 0;
        self.irq.status = 0;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let current = self.status & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let wanted = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if wanted & current != current {
            return self.refuse(&format!("status {value:#x} clears bits of {:#x} without a reset", self.status));
        }
        let new = wanted & !current;
        if new & VIRTIO_CONFIG_S_FAILED != 0 {
            tracing::info!(
                device = self.device.device_type(),
                "virtio-mmio: the driver gave up on the device (FAILED)"
            );
        }
        let order = [
            (VIRTIO_CONFIG_S_ACKNOWLEDGE, 0),
            (VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE),
            (VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER),
            (VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK),
        ];
        for (bit, needs) in order {
            if new & bit == 0 {
                continue;
            }
            if self.status & needs != needs {
                return self.refuse(&format!("status bit {bit:#x} before {needs:#x}"));
            }
            match bit {
                VIRTIO_CONFIG_S_FEATURES_OK if !self.features_ok() => return,
                VIRTIO_CONFIG_S_DRIVER_OK => {
                    self.status |= bit;
                    // A device that needs a reset stays down until the driver resets it.
                    if self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
                        self.activate();
                    }
                }
                _ => self.status |= bit,
            }
        }
        self.status |= new & VIRTIO_CONFIG_S_FAILED;
    }

    fn features_ok(&mut self) -> bool {
        let unsupported = self.acked_features & !self.device.avail_features();
        if unsupported == 0 && self.acked_features & VIRTIO_F_VERSION_1 != 0 {
            return true;
        }
        self.counters.refused_features += 1;
        if self.log.allow() {
            tracing::warn!(
                device = self.device.device_type(),
                acked = format_args!("{:#x}", self.acked_features),
                unsupported = format_args!("{unsupported:#x}"),
                "virtio-mmio: FEATURES_OK refused (unsupported features or no VIRTIO_F_VERSION_1)"
            );
        }
        false
    }

    fn activate(&mut self) {
        if let Err(e) = self.device.activate(self.acked_features, &self.mem) {
            return self.needs_reset(&e.to_string());
        }
        // Buffers the driver made available before DRIVER_OK were not served.
        for q in 0..self.queues.len() {
            if self.queues[q].ready() {
                self.with_queues(|dev, ctx| dev.process_queue(q, ctx));
            }
        }
    }

    fn bad_access(&mut self, what: &str, fatal: bool) {
        self.counters.bad_accesses += 1;
        if fatal {
            self.needs_reset(what);
        } else if self.log.allow() {
            tracing::warn!(device = self.device.device_type(), "virtio-mmio: bad access: {what}");
        }
    }
}

impl<D: VirtioDevice> QueueNotify for MmioTransport<D> {
    fn notify_queue(&mut self, queue: u32) {
        self.process_queue(queue);
    }
}
