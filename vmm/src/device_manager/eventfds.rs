//! irqfds and ioeventfds: eventfds KVM signals a guest interrupt from (irqfd) or
//! signals when the guest writes a register (ioeventfd), without a vCPU exit to
//! userspace. The registry owns every eventfd it registers and deassigns and closes
//! them all when dropped (VM teardown).

use std::sync::Arc;

use devices::trigger::EventFdTrigger;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::Error;

/// GSIs the in-kernel IOAPIC routes by default (its pins; the PIC's are 0..16).
pub const IOAPIC_PINS: u32 = 24;

/// Which writes signal an ioeventfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataMatch {
    /// Any write, of any size.
    Any,
    /// 1-byte writes of this value.
    U8(u8),
    /// 2-byte writes of this value.
    U16(u16),
    /// 4-byte writes of this value (a virtio-mmio QueueNotify of one queue).
    U32(u32),
    /// 8-byte writes of this value.
    U64(u64),
}

impl DataMatch {
    /// Access size matched (0: any) and value.
    fn parts(self) -> (u32, Option<u64>) {
        match self {
            DataMatch::Any => (0, None),
            DataMatch::U8(v) => (1, Some(v.into())),
            DataMatch::U16(v) => (2, Some(v.into())),
            DataMatch::U32(v) => (4, Some(v.into())),
            DataMatch::U64(v) => (8, Some(v)),
        }
    }

    /// Access size matched (0: any).
    pub fn size(self) -> u32 {
        self.parts().0
    }

    /// True when KVM would refuse both at one address (its collision rule: either
    /// matches any size, or the sizes are equal and either matches any value or
    /// the values are equal).
    fn collides(self, other: DataMatch) -> bool {
        let ((len_a, val_a), (len_b, val_b)) = (self.parts(), other.parts());
        len_a == 0 || len_b == 0 || (len_a == len_b && val_a == val_b)
    }

    fn assign(self, vm: &VmFd, fd: &EventFd, addr: &IoEventAddress) -> Result<(), kvm_ioctls::Error> {
        match self {
            DataMatch::Any => vm.register_ioevent(fd, addr, NoDatamatch),
            DataMatch::U8(v) => vm.register_ioevent(fd, addr, v),
            DataMatch::U16(v) => vm.register_ioevent(fd, addr, v),
            DataMatch::U32(v) => vm.register_ioevent(fd, addr, v),
            DataMatch::U64(v) => vm.register_ioevent(fd, addr, v),
        }
    }

    fn deassign(self, vm: &VmFd, fd: &EventFd, addr: &IoEventAddress) -> Result<(), kvm_ioctls::Error> {
        match self {
            DataMatch::Any => vm.unregister_ioevent(fd, addr, NoDatamatch),
            DataMatch::U8(v) => vm.unregister_ioevent(fd, addr, v),
            DataMatch::U16(v) => vm.unregister_ioevent(fd, addr, v),
            DataMatch::U32(v) => vm.unregister_ioevent(fd, addr, v),
            DataMatch::U64(v) => vm.unregister_ioevent(fd, addr, v),
        }
    }
}

struct Irqfd {
    gsi: u32,
    trigger: EventFdTrigger,
}

struct Ioeventfd {
    addr: u64,
    datamatch: DataMatch,
    fd: Arc<EventFd>,
}

/// The irqfds and ioeventfds of one VM.
pub(crate) struct EventFds {
    vm_fd: Arc<VmFd>,
    irqchip: bool,
    irqfds: Vec<Irqfd>,
    ioeventfds: Vec<Ioeventfd>,
}

impl EventFds {
    /// An empty registry for `vm_fd`; `irqchip` says whether the VM has an in-kernel
    /// interrupt controller (irqfds need one).
    pub(crate) fn new(vm_fd: Arc<VmFd>, irqchip: bool) -> Self {
        EventFds { vm_fd, irqchip, irqfds: Vec::new(), ioeventfds: Vec::new() }
    }

    pub(crate) fn irqchip(&self) -> bool {
        self.irqchip
    }

    /// Creates an eventfd and has KVM raise `gsi` whenever it is signalled.
    pub(crate) fn register_irqfd(&mut self, gsi: u32) -> Result<EventFdTrigger, Error> {
        if !self.irqchip {
            return Err(Error::NoIrqChip(gsi));
        }
        if gsi >= IOAPIC_PINS {
            return Err(Error::GsiNotRouted(gsi));
        }
        if self.irqfds.iter().any(|i| i.gsi == gsi) {
            return Err(Error::GsiTaken(gsi));
        }
        let trigger = EventFdTrigger::new().map_err(|e| Error::EventFd(format!("irqfd for GSI {gsi}"), e))?;
        self.vm_fd
            .register_irqfd(trigger.event_fd(), gsi)
            .map_err(|e| Error::Kvm(format!("KVM_IRQFD (GSI {gsi})"), e))?;
        self.irqfds.push(Irqfd { gsi, trigger: trigger.clone() });
        Ok(trigger)
    }

    /// Creates an eventfd KVM signals on guest writes to the MMIO address `addr`
    /// that match `datamatch` (such writes no longer exit to the vCPU loop).
    pub(crate) fn register_mmio_ioeventfd(&mut self, addr: u64, datamatch: DataMatch) -> Result<Arc<EventFd>, Error> {
        if self.ioeventfds.iter().any(|i| i.addr == addr && i.datamatch.collides(datamatch)) {
            return Err(Error::IoeventfdTaken { addr, datamatch });
        }
        let what = || format!("ioeventfd at MMIO {addr:#x} ({datamatch:?})");
        let fd = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::EventFd(what(), e))?);
        datamatch
            .assign(&self.vm_fd, &fd, &IoEventAddress::Mmio(addr))
            .map_err(|e| Error::Kvm(format!("KVM_IOEVENTFD ({})", what()), e))?;
        self.ioeventfds.push(Ioeventfd { addr, datamatch, fd: fd.clone() });
        Ok(fd)
    }

    /// Number of registered irqfds and ioeventfds.
    pub(crate) fn counts(&self) -> (usize, usize) {
        (self.irqfds.len(), self.ioeventfds.len())
    }
}

impl Drop for EventFds {
    fn drop(&mut self) {
        // KVM would drop them with the VM, but the VM fd may outlive the devices
        // (the dirty-log reader shares it): deassign now, then the fds close.
        for i in self.irqfds.drain(..) {
            if let Err(e) = self.vm_fd.unregister_irqfd(i.trigger.event_fd(), i.gsi) {
                tracing::debug!("deassigning the irqfd of GSI {}: {e}", i.gsi);
            }
        }
        for i in self.ioeventfds.drain(..) {
            if let Err(e) = i.datamatch.deassign(&self.vm_fd, &i.fd, &IoEventAddress::Mmio(i.addr)) {
                tracing::debug!("deassigning the ioeventfd at {:#x}: {e}", i.addr);
            }
        }
    }
}
