//! Drives a [`Host`] with an event-manager loop until its VMs finish.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};

use super::CommandError;
use crate::control::VcpuEvent;
use crate::host::Host;

/// Locks the host, tolerating a poisoned lock (the state is still consistent enough to
/// stop VMs).
pub fn lock(host: &Mutex<Host>) -> MutexGuard<'_, Host> {
    host.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the event loop until every VM finished, a termination signal arrived, or
/// `deadline` passed; calls `tick` about every `tick_every`.
pub fn drive(
    host: Arc<Mutex<Host>>,
    tick_every: Duration,
    deadline: Option<Instant>,
    mut tick: impl FnMut(&Host),
) -> Result<(), CommandError> {
    let mut em: EventManager<Arc<Mutex<Host>>> =
        EventManager::new().map_err(|e| CommandError::Runtime(format!("event manager: {e:?}")))?;
    em.add_subscriber(host.clone());
    let mut last_tick = Instant::now();
    loop {
        em.run_with_timeout(20).map_err(|e| CommandError::Runtime(format!("event loop: {e:?}")))?;
        let mut h = lock(&host);
        for e in h.take_log() {
            match e.event {
                VcpuEvent::Mismatch { vcpu, page } => {
                    eprintln!("[{}] vcpu{vcpu}: page {page} did not verify", e.vm_id)
                }
                VcpuEvent::Shutdown { vcpu, reason } => eprintln!("[{}] vcpu{vcpu}: {reason}", e.vm_id),
                VcpuEvent::Error { vcpu, message } => eprintln!("[{}] vcpu{vcpu}: {message}", e.vm_id),
                VcpuEvent::FillDone { .. } | VcpuEvent::Done { .. } => {}
            }
        }
        if last_tick.elapsed() >= tick_every {
            tick(&h);
            last_tick = Instant::now();
        }
        if h.all_finished() || h.terminating() {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            h.stop_all();
            break;
        }
    }
    tick(&lock(&host));
    Ok(())
}
