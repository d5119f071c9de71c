//! The device manager of one VM: it owns the port-I/O and MMIO buses, builds the
//! devices of the VM's boot source, routes every I/O exit of the vCPUs (through the
//! shared [`IoRouter`]), registers irqfds and ioeventfds for devices that want them,
//! and lists the devices' event fds for the host's event loop.
//!
//! To add a device: build it, place it on a bus with [`DeviceManager::register_pio`]
//! or [`DeviceManager::register_mmio`], take its interrupt from
//! [`DeviceManager::register_irqfd`] and its notification fds from
//! [`DeviceManager::register_mmio_ioeventfd`], and hand the event-loop side to
//! [`DeviceManager::subscribe`]. All of it happens while the VM is created, before
//! its vCPUs run.

mod doorbell;
mod eventfds;
mod events;
mod io;
mod legacy;
mod unclaimed;
mod virtio;

#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

use devices::trigger::EventFdTrigger;
use devices::SharedDevice;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

pub use doorbell::{ExitAction, WorkloadDoorbell, DOORBELL_LEN, MAX_GUEST_SLEEP};
pub use eventfds::{DataMatch, IOAPIC_PINS};
pub use events::{DeviceNotice, EventHandler, GUEST_POWER_OFF, GUEST_RESET, MAX_SUBSCRIPTIONS};
pub use io::IoRouter;
pub use legacy::COM1_PORTS;
pub use unclaimed::{UnclaimedIo, LOGGED_UNCLAIMED};
pub use virtio::{BALLOON_GSI, BALLOON_MMIO_BASE};

use crate::vm::SerialOut;
use doorbell::DoorbellReservation;
use eventfds::EventFds;
use events::Subscription;

/// Errors building or wiring devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bus refused the device's range.
    #[error(transparent)]
    Bus(#[from] devices::bus::Error),
    /// The vCPUs already share the buses.
    #[error("devices cannot be added once the VM's vCPUs run")]
    Started,
    /// irqfds need an in-kernel interrupt controller.
    #[error("cannot register an irqfd for GSI {0}: the VM has no in-kernel interrupt controller")]
    NoIrqChip(u32),
    /// The GSI has no default route.
    #[error("GSI {0} is not routed: the in-kernel IOAPIC has pins 0..{IOAPIC_PINS}")]
    GsiNotRouted(u32),
    /// Another device raises that GSI.
    #[error("GSI {0} already has an irqfd")]
    GsiTaken(u32),
    /// An ioeventfd already matches such writes.
    #[error("an ioeventfd at MMIO {addr:#x} already matches writes like {datamatch:?}")]
    IoeventfdTaken {
        /// Address.
        addr: u64,
        /// The refused match.
        datamatch: DataMatch,
    },
    /// The ioeventfd's register is not a device's.
    #[error("ioeventfd at MMIO {addr:#x} ({size} bytes) is not inside an MMIO device's range")]
    IoeventfdUnclaimed {
        /// Address.
        addr: u64,
        /// Access size matched.
        size: u64,
    },
    /// Too many event fds for the event loop.
    #[error("device {0}: too many event fds (at most {MAX_SUBSCRIPTIONS} per VM)")]
    TooManySubscriptions(&'static str),
    /// A KVM ioctl failed.
    #[error("{0}: {1}")]
    Kvm(String, kvm_ioctls::Error),
    /// An eventfd could not be created.
    #[error("creating the eventfd of the {0}: {1}")]
    EventFd(String, std::io::Error),
    /// Host I/O failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// A virtio transport could not be built.
    #[error("virtio device: {0}")]
    Virtio(String),
}

/// The devices of one VM.
pub struct DeviceManager {
    // Field order matters for teardown: devices go first, then the registry
    // deassigns and closes the irqfds and ioeventfds.
    io: Arc<IoRouter>,
    subscriptions: Vec<Subscription>,
    reset: Option<EventFdTrigger>,
    eventfds: EventFds,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let subscribed: Vec<_> = self.subscriptions.iter().map(|s| s.device).collect();
        f.debug_struct("DeviceManager")
            .field("io", &self.io)
            .field("subscriptions", &subscribed)
            .field("eventfds", &self.eventfds.counts())
            .finish()
    }
}

impl DeviceManager {
    /// An empty device manager for the VM `vm_id`; `irqchip` says whether the VM
    /// has an in-kernel interrupt controller (irqfds need one).
    pub fn new(vm_fd: Arc<VmFd>, vm_id: &str, irqchip: bool) -> Self {
        DeviceManager {
            io: Arc::new(IoRouter::new(vm_id)),
            subscriptions: Vec::new(),
            reset: None,
            eventfds: EventFds::new(vm_fd, irqchip),
        }
    }

    /// Builds the devices of a VM's boot source: the serial console (output to
    /// `serial`), the i8042, the ACPI sleep control register and, for the
    /// workload guest, its `doorbell`.
    pub fn add_boot_devices(&mut self, serial: &SerialOut, doorbell: Option<WorkloadDoorbell>) -> Result<(), Error> {
        self.add_serial(serial)?;
        self.add_i8042()?;
        self.add_acpi_sleep_control()?;
        if let Some(d) = doorbell {
            self.register_mmio(Arc::new(Mutex::new(DoorbellReservation)), d.gpa(), DOORBELL_LEN)?;
            self.router_mut()?.doorbell = Some(d);
        }
        Ok(())
    }

    fn router_mut(&mut self) -> Result<&mut IoRouter, Error> {
        Arc::get_mut(&mut self.io).ok_or(Error::Started)
    }

    /// Places `device` on the port-I/O bus at `[base, base+len)`.
    pub fn register_pio(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), Error> {
        Ok(self.router_mut()?.pio.insert(device, base, len)?)
    }

    /// Places `device` on the MMIO bus at `[base, base+len)`.
    pub fn register_mmio(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), Error> {
        Ok(self.router_mut()?.mmio.insert(device, base, len)?)
    }

    /// A trigger that raises `gsi` in the guest (an irqfd: KVM injects the
    /// interrupt when it is signalled). The VM needs an in-kernel interrupt
    /// controller, the GSI one of its IOAPIC pins not yet taken by another device.
    pub fn register_irqfd(&mut self, gsi: u32) -> Result<EventFdTrigger, Error> {
        self.eventfds.register_irqfd(gsi)
    }

    /// An eventfd KVM signals, instead of exiting to the vCPU loop, when the guest
    /// writes `addr` as `datamatch` says (e.g. a virtio-mmio QueueNotify of one
    /// queue). The register must lie inside an MMIO device placed with
    /// [`DeviceManager::register_mmio`]. Subscribe the fd to react to it.
    pub fn register_mmio_ioeventfd(&mut self, addr: u64, datamatch: DataMatch) -> Result<Arc<EventFd>, Error> {
        let size = datamatch.size().max(1) as usize;
        let doorbell = self.io.doorbell.as_ref().map(|d| d.gpa());
        let on_doorbell = doorbell
            .is_some_and(|gpa| addr < gpa.saturating_add(DOORBELL_LEN) && gpa < addr.saturating_add(size as u64));
        if on_doorbell || !self.io.mmio.claims(addr, size) {
            return Err(Error::IoeventfdUnclaimed { addr, size: size as u64 });
        }
        self.eventfds.register_mmio_ioeventfd(addr, datamatch)
    }

    /// Has the host's event loop watch `handler`'s fd for `device`; returns its index
    /// among [`DeviceManager::event_fds`].
    pub fn subscribe(&mut self, device: &'static str, handler: Box<dyn EventHandler>) -> Result<usize, Error> {
        if self.subscriptions.len() >= MAX_SUBSCRIPTIONS {
            return Err(Error::TooManySubscriptions(device));
        }
        self.subscriptions.push(Subscription { device, handler });
        Ok(self.subscriptions.len() - 1)
    }

    /// The devices' event fds the event loop watches, with their indices.
    pub fn event_fds(&self) -> impl Iterator<Item = (usize, &EventFd)> {
        self.subscriptions.iter().enumerate().map(|(i, s)| (i, s.handler.event_fd()))
    }

    /// Runs the handler of event fd `index` (readable); unknown indices do nothing.
    pub fn process_event(&mut self, index: usize) -> Option<DeviceNotice> {
        let s = self.subscriptions.get_mut(index)?;
        let notice = s.handler.handle();
        if let Some(n) = &notice {
            tracing::debug!(device = s.device, "device event: {n:?}");
        }
        notice
    }

    /// Runs every handler (each consumes whatever is pending on its fd).
    pub fn process_all(&mut self) -> Vec<DeviceNotice> {
        (0..self.subscriptions.len()).filter_map(|i| self.process_event(i)).collect()
    }

    /// The router the vCPU threads share.
    pub fn io(&self) -> &Arc<IoRouter> {
        &self.io
    }

    /// Guest accesses no device claimed so far.
    pub fn unclaimed(&self) -> UnclaimedIo {
        self.io.unclaimed()
    }

    /// The eventfd the i8042 signals on a guest reset request.
    pub fn reset_fd(&self) -> Option<&EventFd> {
        self.reset.as_ref().map(EventFdTrigger::event_fd)
    }
}
