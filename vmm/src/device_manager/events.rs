//! Device event fds the host's event loop watches, and what a device reports back
//! when one becomes readable.

use devices::trigger::EventFdTrigger;
use vmm_sys_util::eventfd::EventFd;

/// Most event fds the devices of one VM may subscribe (the host gives each VM a
/// block of 256 event-loop tokens, one of them for the vCPU events).
pub const MAX_SUBSCRIPTIONS: usize = 255;

/// The exit reason of a VM whose guest asked the i8042 for a reset (densevm does
/// not reboot guests: the VM ends).
pub const GUEST_RESET: &str = "guest requested a reset (i8042)";
/// The exit reason of a VM whose guest powered off through ACPI (S5).
pub const GUEST_POWER_OFF: &str = "guest powered off (ACPI S5)";

/// What a device asks of its VM after handling an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceNotice {
    /// The guest asked for a reset: the VM exits with this reason.
    Reset(String),
    /// The guest powered off: the VM exits with this reason.
    PowerOff(String),
}

/// A device's handler of one event fd, run on the event-loop thread.
pub trait EventHandler: Send {
    /// The fd the event loop watches.
    fn event_fd(&self) -> &EventFd;
    /// Consumes what is pending on the fd. It may be called when nothing is (the VM
    /// polls every handler when its owner processes events without an event loop),
    /// so it must not block: read the non-blocking fd and return `None` on EAGAIN.
    fn handle(&mut self) -> Option<DeviceNotice>;
}

/// The i8042's reset request: the VM exits when the guest asks for a reset.
pub(crate) struct ResetRequest(pub(crate) EventFdTrigger);

impl EventHandler for ResetRequest {
    fn event_fd(&self) -> &EventFd {
        self.0.event_fd()
    }

    fn handle(&mut self) -> Option<DeviceNotice> {
        self.0.event_fd().read().ok().map(|_| DeviceNotice::Reset(GUEST_RESET.into()))
    }
}

/// The ACPI sleep control register's S5 request: the VM exits when the guest powers off.
pub(crate) struct PowerOffRequest(pub(crate) EventFdTrigger);

impl EventHandler for PowerOffRequest {
    fn event_fd(&self) -> &EventFd {
        self.0.event_fd()
    }

    fn handle(&mut self) -> Option<DeviceNotice> {
        self.0.event_fd().read().ok().map(|_| DeviceNotice::PowerOff(GUEST_POWER_OFF.into()))
    }
}

/// A subscribed handler and the device it belongs to (for logs).
pub(crate) struct Subscription {
    pub(crate) device: &'static str,
    pub(crate) handler: Box<dyn EventHandler>,
}
