//! VM creation and deletion off the event loop.
//!
//! Building a VM takes seconds for a big one (KVM's memory-slot setup for
//! `KVM_SET_USER_MEMORY_REGION` grows with guest size, and a kernel and initrd are
//! read into guest RAM), and freeing one takes a while too. The event loop only
//! admits the request ([`vmm::host::Host::begin_create`] and `begin_remove`,
//! which reserve the VM's place against the maxima and the budget), hands the slow
//! part to a worker thread (`densevm-vmcreate`, `densevm-vmdelete`) and goes on
//! serving requests; the worker posts its result back here, the loop is woken
//! through [`Workers::wake_fd`], and [`Workers::take_done`] gives the results to
//! the bridge, which finishes them on the Host and answers the waiting client.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use api::types::VmConfig;
use api::ReplySender;
use vmm::host::{self, Creation, Removal};
use vmm::vm::Vm;
use vmm_sys_util::eventfd::EventFd;

/// A worker's result, to be finished on the event loop.
pub enum Done {
    /// A VM was built (or failed to be).
    Created {
        /// The VM's id.
        id: String,
        /// Its API configuration.
        config: VmConfig,
        /// The built VM, or why not.
        result: Box<Result<Vm, host::Error>>,
        /// Where the answer goes.
        reply: ReplySender,
        /// When the request was admitted.
        started: Instant,
    },
    /// A VM was stopped and freed.
    Deleted {
        /// The VM's id.
        id: String,
        /// Where the answer goes.
        reply: ReplySender,
        /// When the request was admitted.
        started: Instant,
    },
}

/// The worker threads' channel back to the event loop.
pub struct Workers {
    tx: Sender<Done>,
    rx: Receiver<Done>,
    wake: EventFd,
}

impl Workers {
    /// A channel with its wake-up eventfd.
    pub fn new() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        Ok(Workers { tx, rx, wake: EventFd::new(libc::EFD_NONBLOCK)? })
    }

    /// Readable when a worker posted a result (register it with the event loop).
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Builds `creation` on a new worker thread (on the caller's thread if no
    /// thread can be started) and posts the result.
    pub fn create(&self, creation: Creation, config: VmConfig, reply: ReplySender) {
        let id = creation.id().to_string();
        let (tx, wake) = (self.tx.clone(), self.wake_clone());
        let started = Instant::now();
        spawn_or_run("densevm-vmcreate", move || {
            let result = creation.build();
            let result = Box::new(result);
            post(&tx, wake.as_ref(), Done::Created { id, config, result, reply, started });
        });
    }

    /// Stops and frees `removal`'s VM on a new worker thread (on the caller's
    /// thread if no thread can be started) and posts that it is done.
    pub fn delete(&self, removal: Removal, reply: ReplySender) {
        let id = removal.id().to_string();
        let (tx, wake) = (self.tx.clone(), self.wake_clone());
        let started = Instant::now();
        spawn_or_run("densevm-vmdelete", move || {
            removal.finish();
            post(&tx, wake.as_ref(), Done::Deleted { id, reply, started });
        });
    }

    /// The results posted since the last call.
    pub fn take_done(&self) -> Vec<Done> {
        // Reset the wake-up counter first: a result posted after the drain wakes us again.
        let _ = self.wake.read();
        self.rx.try_iter().collect()
    }

    fn wake_clone(&self) -> Option<EventFd> {
        match self.wake.try_clone() {
            Ok(fd) => Some(fd),
            Err(e) => {
                // The loop still sees the result at its next wake-up (at most the
                // loop's timeout later).
                tracing::warn!("cannot clone the worker wake-up eventfd: {e}");
                None
            }
        }
    }
}

/// Sends `done` to the event loop and wakes it.
fn post(tx: &Sender<Done>, wake: Option<&EventFd>, done: Done) {
    if tx.send(done).is_err() {
        // The daemon is gone; the reply is dropped with the result.
        return;
    }
    if let Some(wake) = wake {
        let _ = wake.write(1);
    }
}

/// Runs `job` on a new thread called `name`, or here if no thread can be started
/// (slower for the other requests, but the job and its reply are not lost).
fn spawn_or_run(name: &str, job: impl FnOnce() + Send + 'static) {
    let job = Arc::new(Mutex::new(Some(job)));
    let runner = job.clone();
    let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
        if let Some(job) = lock(&runner).take() {
            job();
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot start thread {name} ({e}); running its job on the event loop");
        if let Some(job) = lock(&job).take() {
            job();
        }
    }
}

/// Locks `m`, tolerating a poisoned lock.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
