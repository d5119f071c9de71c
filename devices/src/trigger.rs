//! An interrupt/event trigger backed by an eventfd (registered as an irqfd when the
//! VM has an interrupt controller, or merely read by the VMM otherwise).

use std::sync::Arc;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// Eventfd-backed trigger for vm-superio devices.
#[derive(Clone, Debug)]
pub struct EventFdTrigger(Arc<EventFd>);

impl EventFdTrigger {
    /// Creates a non-blocking trigger.
    pub fn new() -> std::io::Result<Self> {
        Ok(EventFdTrigger(Arc::new(EventFd::new(libc::EFD_NONBLOCK)?)))
    }

    /// The underlying eventfd (to register as an irqfd or poll).
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
