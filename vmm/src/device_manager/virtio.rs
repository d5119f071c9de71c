//! The VM's virtio-mmio devices: the balloon's transport on the MMIO bus, its
//! interrupt, one ioeventfd per queue and the statistics polling timer (a
//! timerfd in the event loop).
//!
//! Fixed window: the balloon's 4 KiB register window sits at
//! [`BALLOON_MMIO_BASE`] (3.25 GiB, inside the 32-bit MMIO gap that starts at
//! 3 GiB, the top of a Linux guest's RAM; clear of the workload doorbell, which
//! sits at a whole GiB, and of the IOAPIC, LAPIC and KVM's TSS pages near
//! 4 GiB), interrupting on IOAPIC pin [`BALLOON_GSI`] (IRQ 5: the serial port
//! takes 4, the i8042 1 and 12). A VM without an in-kernel interrupt controller
//! (the workload guest, whose driver polls the used rings) gets a plain eventfd
//! as the interrupt line.

use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::trigger::EventFdTrigger;
use devices::virtio::balloon::Balloon;
use devices::virtio::mmio::{MMIO_LEN, NOTIFY_OFFSET};
use devices::virtio::notify::QueueEvent;
use devices::virtio::MmioTransport;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{DataMatch, DeviceManager, DeviceNotice, Error, EventHandler};
use crate::balloon::{BackendMemory, BalloonDevice, BalloonSpec, MemoryBackend, SharedBalloon};

/// Guest-physical base of the balloon's virtio-mmio register window.
pub const BALLOON_MMIO_BASE: u64 = 0xd000_0000;
/// The balloon's interrupt (IOAPIC pin, GSI and legacy IRQ number).
pub const BALLOON_GSI: u32 = 5;
/// How often the statistics timer checks whether the polling interval elapsed.
const STATS_TICK: Duration = Duration::from_millis(100);

/// One queue's ioeventfd: its notifications go to the transport.
struct QueueHandler {
    event: QueueEvent,
    transport: SharedBalloon,
}

impl EventHandler for QueueHandler {
    fn event_fd(&self) -> &EventFd {
        self.event.event_fd()
    }

    fn handle(&mut self) -> Option<DeviceNotice> {
        let mut t = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        self.event.deliver(&mut *t);
        None
    }
}

impl DeviceManager {
    /// Places a virtio-balloon with `spec` on the MMIO bus at
    /// [`BALLOON_MMIO_BASE`] over guest memory `mem`, its pages discarded from
    /// `backend`; wires its interrupt, one ioeventfd per queue (subscribed to
    /// the event loop) and, with statistics, a polling timer (also subscribed).
    pub fn add_balloon(
        &mut self,
        spec: &BalloonSpec,
        mem: GuestMemoryMmap,
        backend: BackendMemory,
    ) -> Result<BalloonDevice, Error> {
        let returned = Arc::new(AtomicU64::new(0));
        let balloon = Balloon::new(spec.device_config(), Box::new(MemoryBackend::new(backend, returned.clone())));
        let irq = if self.eventfds.irqchip() {
            self.eventfds.register_irqfd(BALLOON_GSI)?
        } else {
            EventFdTrigger::new().map_err(|e| Error::EventFd("balloon interrupt".into(), e))?
        };
        let transport = MmioTransport::new(balloon, mem, Box::new(irq)).map_err(|e| Error::Virtio(e.to_string()))?;
        let queues = transport.queue_count();
        let shared: SharedBalloon = Arc::new(Mutex::new(transport));
        self.register_mmio(shared.clone(), BALLOON_MMIO_BASE, MMIO_LEN)?;
        for q in 0..queues {
            let fd = self.register_mmio_ioeventfd(BALLOON_MMIO_BASE + NOTIFY_OFFSET, DataMatch::U32(q))?;
            let handler = QueueHandler { event: QueueEvent::new(q, fd), transport: shared.clone() };
            self.subscribe("virtio-balloon", Box::new(handler))?;
        }
        if spec.stats_polling_interval_s > 0 {
            self.subscribe("virtio-balloon stats", Box::new(StatsTimer::new(shared.clone())?))?;
        }
        Ok(BalloonDevice::new(shared, returned, BALLOON_MMIO_BASE, BALLOON_GSI))
    }
}

/// The statistics timer: a timerfd firing every [`STATS_TICK`], watched by
/// the event loop like the queues' ioeventfds; each expiry asks the device to
/// poll (it requests statistics when its interval elapsed). Guest memory is
/// touched only on the event-loop thread, never after the VM's devices are gone.
struct StatsTimer {
    // A timerfd: reads, like an eventfd's, return an 8-byte count.
    fd: EventFd,
    transport: SharedBalloon,
}

impl StatsTimer {
    fn new(transport: SharedBalloon) -> Result<Self, Error> {
        let what = || "the balloon statistics timer".to_string();
        // SAFETY: plain syscall; the result is checked.
        let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if raw < 0 {
            return Err(Error::Io(what(), std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a timerfd just created and owned by nobody else; the
        // EventFd closes it when dropped and is only ever read (8 bytes).
        let fd = unsafe { EventFd::from_raw_fd(raw) };
        let tick = libc::timespec { tv_sec: 0, tv_nsec: STATS_TICK.as_nanos() as libc::c_long };
        let spec = libc::itimerspec { it_interval: tick, it_value: tick };
        // SAFETY: `fd` is a valid timerfd and `spec` a valid itimerspec; no old value is requested.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(Error::Io(what(), std::io::Error::last_os_error()));
        }
        Ok(StatsTimer { fd, transport })
    }
}

impl EventHandler for StatsTimer {
    fn event_fd(&self) -> &EventFd {
        &self.fd
    }

    fn handle(&mut self) -> Option<DeviceNotice> {
        if self.fd.read().is_ok() {
            self.transport.lock().unwrap_or_else(|e| e.into_inner()).poll_balloon_stats(Instant::now());
        }
        None
    }
}
