//! Drives a [`Host`] with an event-manager loop until its VMs finish.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};

use crate::control::VcpuEvent;
use crate::host::{Host, HostEvent};

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating the event manager or running it failed.
    #[error("event loop: {0:?}")]
    EventManager(event_manager::Error),
}

/// Locks the host, tolerating a poisoned lock (the state is still consistent enough to
/// stop VMs).
pub fn lock(host: &Mutex<Host>) -> MutexGuard<'_, Host> {
    host.lock().unwrap_or_else(|p| p.into_inner())
}

/// The level of a guest's milestones (fill done, workload finished) in [`log_event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Milestones {
    /// Shown by default (a daemon, whose stderr is its log).
    Info,
    /// Hidden by default (an interactive command with its own progress output).
    Debug,
}

/// Logs one vCPU event of `e.vm_id`: mismatches and errors as errors, shutdowns as
/// info, milestones at `milestones`.
pub fn log_event(e: &HostEvent, milestones: Milestones) {
    let vm = &e.vm_id;
    let milestone = |vcpu: u32, what: &str| match milestones {
        Milestones::Info => tracing::info!(vm = %vm, vcpu, "{what}"),
        Milestones::Debug => tracing::debug!(vm = %vm, vcpu, "{what}"),
    };
    match &e.event {
        VcpuEvent::FillDone { vcpu, .. } => milestone(*vcpu, "fill done"),
        VcpuEvent::Done { vcpu } => milestone(*vcpu, "workload finished"),
        VcpuEvent::Mismatch { vcpu, page } => tracing::error!(vm = %vm, vcpu, page, "page did not verify"),
        VcpuEvent::Shutdown { vcpu, reason } => tracing::info!(vm = %vm, vcpu, "{reason}"),
        VcpuEvent::Error { vcpu, message } => tracing::error!(vm = %vm, vcpu, "{message}"),
    }
}

/// Runs the event loop until every VM finished, a termination signal arrived, or
/// `deadline` passed; calls `tick` about every `tick_every`. vCPU events are logged
/// with [`log_event`] (milestones at debug).
pub fn drive(
    host: Arc<Mutex<Host>>,
    tick_every: Duration,
    deadline: Option<Instant>,
    mut tick: impl FnMut(&Host),
) -> Result<(), Error> {
    let mut em: EventManager<Arc<Mutex<Host>>> = EventManager::new().map_err(Error::EventManager)?;
    em.add_subscriber(host.clone());
    let mut last_tick = Instant::now();
    loop {
        em.run_with_timeout(20).map_err(Error::EventManager)?;
        let mut h = lock(&host);
        for e in h.take_log() {
            log_event(&e, Milestones::Debug);
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
