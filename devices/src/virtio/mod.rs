//! virtio devices: the virtio-mmio transport ([`mmio::MmioTransport`]) and the
//! device models behind it ([`balloon::Balloon`]).
//!
//! The transport owns the virtqueues (rust-vmm `virtio-queue` split rings over the
//! guest's `GuestMemoryMmap`), the device status and feature negotiation, and the
//! interrupt status; a device model implements [`VirtioDevice`] and sees its
//! queues only through a [`QueueCtx`] while it handles a notification. The VMM
//! places a transport on its MMIO bus, gives it an interrupt trigger (an irqfd)
//! and may route each queue's notifications through an ioeventfd
//! ([`notify::QueueEvent`]).
//!
//! Everything the guest writes is input: a driver error sets the status bit
//! DEVICE_NEEDS_RESET (or refuses FEATURES_OK), a bad buffer is refused and
//! counted, logs are rate-limited ([`ratelimit::LogLimiter`]); nothing panics.

pub mod balloon;
pub mod chain;
pub mod mmio;
pub mod notify;
pub mod ratelimit;
#[cfg(test)]
pub(crate) mod test_utils;

use std::io;

use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vm_superio::Trigger;

pub use mmio::MmioTransport;

/// Feature bit: the device complies with virtio 1.x (required by this transport).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// The interrupt line of a device as the VMM hands it over (an irqfd in practice).
pub type InterruptTrigger = Box<dyn Trigger<E = io::Error> + Send>;

/// A device's interrupt: the InterruptStatus bits and the line that raises them.
pub struct Interrupt {
    status: u32,
    trigger: InterruptTrigger,
    failures: u64,
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupt").field("status", &self.status).field("failures", &self.failures).finish()
    }
}

impl Interrupt {
    fn new(trigger: InterruptTrigger) -> Self {
        Interrupt { status: 0, trigger, failures: 0 }
    }

    /// Sets `bits` in InterruptStatus and raises the line.
    fn raise(&mut self, bits: u32) {
        self.status |= bits;
        if let Err(e) = self.trigger.trigger() {
            self.failures += 1;
            if self.failures == 1 || self.failures.is_power_of_two() {
                tracing::warn!(failures = self.failures, "virtio: interrupt trigger failed: {e}");
            }
        }
    }
}

/// Errors that stop a device: the transport sets DEVICE_NEEDS_RESET on each.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ring itself is broken (e.g. the available index ran ahead by more than
    /// the queue size, or the used ring cannot be written).
    #[error("queue {queue}: {source}")]
    Queue {
        /// Queue index.
        queue: usize,
        /// What `virtio-queue` reported.
        source: virtio_queue::Error,
    },
    /// The available ring names a descriptor head past the descriptor table, which
    /// can never be returned to the driver.
    #[error("queue {queue}: available ring names head {head} past the table of {size}")]
    BadHead {
        /// Queue index.
        queue: usize,
        /// The head index.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// The device refused the features or queues the driver set up.
    #[error("activation failed: {0}")]
    Activate(String),
}

/// A device's access to its queues while it handles an event.
pub struct QueueCtx<'a> {
    mem: &'a GuestMemoryMmap,
    queues: &'a mut [Queue],
    irq: &'a mut Interrupt,
}

impl<'a> QueueCtx<'a> {
    /// The guest's memory.
    pub fn mem(&self) -> &'a GuestMemoryMmap {
        self.mem
    }

    /// True when queue `queue` exists and the driver made it ready.
    pub fn is_ready(&self, queue: usize) -> bool {
        self.queues.get(queue).is_some_and(|q| q.ready())
    }

    /// The next chain the driver made available on `queue`, if any.
    pub fn pop(&mut self, queue: usize) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, Error> {
        let mem = self.mem;
        let Some(q) = self.queues.get_mut(queue).filter(|q| q.ready()) else {
            return Ok(None);
        };
        let size = q.size();
        let chain = q.iter(mem).map_err(|source| Error::Queue { queue, source })?.next();
        match chain {
            Some(c) if c.head_index() >= size => Err(Error::BadHead { queue, head: c.head_index(), size }),
            c => Ok(c),
        }
    }

    /// Returns chain `head` to the driver on `queue`, `len` bytes written into it.
    pub fn add_used(&mut self, queue: usize, head: u16, len: u32) -> Result<(), Error> {
        let q = self.queues.get_mut(queue).ok_or(Error::Queue { queue, source: virtio_queue::Error::QueueNotReady })?;
        q.add_used(self.mem, head, len).map_err(|source| Error::Queue { queue, source })
    }

    /// Tells the driver that used buffers are waiting.
    pub fn signal_used(&mut self) {
        self.irq.raise(VIRTIO_MMIO_INT_VRING);
    }
}

/// A virtio device model behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (5 for the balloon).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the number of entries is the number of
    /// queues the device offers.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers (must include [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// Reads device configuration space at `offset` (bytes past the end read 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space at `offset`; read-only fields ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK having accepted `acked_features`.
    fn activate(&mut self, acked_features: u64, mem: &GuestMemoryMmap) -> Result<(), Error>;
    /// The driver notified `queue` (or the transport polls it after activation).
    fn process_queue(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) -> Result<(), Error>;
    /// The driver reset the device: return to the state before activation (the
    /// VMM's settings, e.g. a balloon's target, are kept).
    fn reset(&mut self);
}
