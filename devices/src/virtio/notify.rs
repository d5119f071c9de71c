//! Queue notifications through ioeventfds.
//!
//! A driver notifies queue `n` by writing `n` to the transport's QueueNotify
//! register ([`crate::virtio::mmio::NOTIFY_OFFSET`]). The VMM may register one
//! ioeventfd per queue on that address with `n` as the data match, so KVM signals
//! the fd instead of exiting to the vCPU loop; a [`QueueEvent`] pairs the fd with
//! its queue, and the VMM's handler calls [`QueueNotify::notify_queue`] on the
//! transport when the fd fires.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Something whose queues can be notified (a transport, through its lock).
pub trait QueueNotify: Send {
    /// The driver notified `queue`.
    fn notify_queue(&mut self, queue: u32);
}

/// An ioeventfd and the queue whose notifications it carries.
#[derive(Clone, Debug)]
pub struct QueueEvent {
    queue: u32,
    fd: Arc<EventFd>,
}

impl QueueEvent {
    /// Pairs `fd` (registered on QueueNotify with data match `queue`) with `queue`.
    pub fn new(queue: u32, fd: Arc<EventFd>) -> Self {
        QueueEvent { queue, fd }
    }

    /// The queue this fd notifies.
    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// The fd to watch.
    pub fn event_fd(&self) -> &EventFd {
        &self.fd
    }

    /// Consumes a pending notification; false when none is pending (the fd must be
    /// non-blocking, as the VMM's ioeventfds are).
    pub fn take(&self) -> bool {
        self.fd.read().is_ok()
    }

    /// Consumes a pending notification and, if there was one, hands it to `target`.
    pub fn deliver(&self, target: &mut dyn QueueNotify) -> bool {
        let pending = self.take();
        if pending {
            target.notify_queue(self.queue);
        }
        pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Seen(Vec<u32>);
    impl QueueNotify for Seen {
        fn notify_queue(&mut self, queue: u32) {
            self.0.push(queue);
        }
    }

    #[test]
    fn delivers_only_pending_notifications() {
        let fd = Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        let ev = QueueEvent::new(2, fd.clone());
        let mut seen = Seen::default();
        assert!(!ev.deliver(&mut seen));
        fd.write(1).expect("signal");
        assert!(ev.deliver(&mut seen));
        assert!(!ev.deliver(&mut seen));
        assert_eq!(seen.0, vec![2]);
        assert_eq!(ev.queue(), 2);
    }
}
