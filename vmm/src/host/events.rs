//! The host as an event-manager subscriber: termination signals, and each
//! VM's vCPU-event and device-event fds, told apart by their event data.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::{Error, Host, HostEvent, FD_INDEX_MASK, SIGNAL_TOKEN};

static SIGNAL_EVENT_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_terminate(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = SIGNAL_EVENT_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; fd is an eventfd kept open for the
        // process's life once stored; the buffer is 8 valid bytes.
        unsafe {
            libc::write(fd, (&one as *const u64).cast(), 8);
        }
    }
}

impl Host {
    /// Routes SIGINT and SIGTERM to this host's event loop (a clean stop of every VM).
    pub fn handle_termination_signals(&self) -> Result<(), Error> {
        // The eventfd lives as long as the host; a second host replaces it.
        SIGNAL_EVENT_FD.store(self.signal_fd.as_raw_fd(), Ordering::Relaxed);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            vmm_sys_util::signal::register_signal_handler(sig, on_terminate)
                .map_err(|e| Error::Io(format!("installing a handler for signal {sig}: {e}")))?;
        }
        Ok(())
    }

    /// Registers the fds of VMs created since the last registration.
    pub fn register_new(&mut self, ops: &mut EventOps) {
        for token in std::mem::take(&mut self.unregistered) {
            if let Some(e) = self.vms.values().find(|e| e.token == token) {
                let _ = ops.add(Events::with_data(e.vm.event_fd(), token, EventSet::IN));
                for (i, fd) in e.vm.device_event_fds() {
                    if let Err(err) = ops.add(Events::with_data(fd, device_token(token, i), EventSet::IN)) {
                        tracing::warn!(vm = %e.vm.id(), "cannot watch device event fd {i}: {err:?}");
                    }
                }
            }
        }
    }

    pub(super) fn on_vm_event(&mut self, token: u32) {
        let (vm_token, index) = split_token(token);
        if let Some(e) = self.vms.values_mut().find(|e| e.token == vm_token) {
            let events = match index {
                0 => e.vm.handle_events(),
                i => e.vm.handle_device_event(i as usize - 1),
            };
            for event in events {
                self.log.push(HostEvent { vm_id: e.vm.id().to_string(), event });
            }
        }
    }
}

/// Event data of a VM's device event fd `index` (the VM's own token is `vm_token`).
pub(super) fn device_token(vm_token: u32, index: usize) -> u32 {
    // The device manager caps subscriptions below the index mask.
    vm_token | ((index as u32 + 1) & FD_INDEX_MASK)
}

/// The VM token and fd index (0: vCPU events, 1 + i: device event fd i) of `token`.
pub(super) fn split_token(token: u32) -> (u32, u32) {
    (token & !FD_INDEX_MASK, token & FD_INDEX_MASK)
}

impl MutEventSubscriber for Host {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token == SIGNAL_TOKEN {
            let _ = self.signal_fd.read();
            self.terminate = true;
            self.stop_all();
        } else {
            self.on_vm_event(token);
        }
        self.register_new(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::with_data(&self.signal_fd, SIGNAL_TOKEN, EventSet::IN));
        self.register_new(ops);
    }
}
