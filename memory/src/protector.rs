//! The Protector: the userfaultfd registered in write-protect mode over every
//! VM's guest RAM, and the threads that handle its events.
//!
//! One handler thread polls the userfaultfd, reads write-fault events in
//! batches and hands their addresses to the resolver callback (the memory
//! manager), which resolves each fault under the manager's lock (copy, reuse,
//! or simply after an in-flight merge or migration finished) and wakes the
//! writer. The thread may block on that lock: nothing the lock holder does
//! waits for this thread (no non-cooperative userfaultfd events are enabled).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::uffd::{self, Event, Uffd};

/// Errors of the Protector.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating the stop eventfd failed.
    #[error("eventfd: {0}")]
    EventFd(io::Error),
    /// Spawning a thread failed.
    #[error("spawning {0}: {1}")]
    Spawn(&'static str, io::Error),
    /// A userfaultfd operation failed.
    #[error(transparent)]
    Uffd(#[from] uffd::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Counters kept by the Protector threads.
#[derive(Debug, Default)]
pub struct ProtectorCounters {
    /// Write-protect faults read.
    pub faults: AtomicU64,
    /// Remap events read (only with `UFFD_FEATURE_EVENT_REMAP`).
    pub remap_events: AtomicU64,
    /// Other events read (ignored).
    pub other_events: AtomicU64,
}

/// Owns the fault-handling thread of a userfaultfd; stops it on drop.
pub struct Protector {
    uffd: Arc<Uffd>,
    stop: OwnedFd,
    counters: Arc<ProtectorCounters>,
    handler: Option<JoinHandle<()>>,
}

impl Protector {
    /// Starts the handler thread. `resolve` is called on it with a batch of
    /// faulting addresses; it must resolve and wake every one of them.
    pub fn start<F>(uffd: Arc<Uffd>, resolve: F) -> Result<Self>
    where
        F: FnMut(&[u64]) + Send + 'static,
    {
        // SAFETY: plain syscall creating a new descriptor; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(Error::EventFd(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let stop = unsafe { OwnedFd::from_raw_fd(raw) };
        let counters = Arc::new(ProtectorCounters::default());
        let handler = {
            let uffd = uffd.clone();
            let counters = counters.clone();
            let stop_fd = stop.as_raw_fd();
            std::thread::Builder::new()
                .name("uffd-handler".into())
                .spawn(move || handle_loop(&uffd, stop_fd, &counters, resolve))
                .map_err(|e| Error::Spawn("uffd-handler", e))?
        };
        Ok(Protector { uffd, stop, counters, handler: Some(handler) })
    }

    /// The userfaultfd.
    pub fn uffd(&self) -> &Arc<Uffd> {
        &self.uffd
    }

    /// Event counters.
    pub fn counters(&self) -> &ProtectorCounters {
        &self.counters
    }
}

impl Drop for Protector {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if let Some(handle) = self.handler.take() {
            if handle.join().is_err() {
                tracing::error!("the userfaultfd handler thread panicked");
            }
        }
    }
}

fn handle_loop<F: FnMut(&[u64])>(uffd: &Uffd, stop_fd: i32, counters: &ProtectorCounters, mut resolve: F) {
    let mut events = Vec::with_capacity(64);
    let mut faults = Vec::with_capacity(64);
    loop {
        let mut fds = [
            libc::pollfd { fd: uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop_fd, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            tracing::error!("poll on userfaultfd: {err}");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        events.clear();
        if let Err(e) = uffd.read_events(&mut events) {
            tracing::error!("{e}");
            return;
        }
        faults.clear();
        for event in &events {
            match *event {
                Event::PageFault { addr, .. } => {
                    counters.faults.fetch_add(1, Ordering::Relaxed);
                    faults.push(addr);
                }
                Event::Remap { .. } => {
                    counters.remap_events.fetch_add(1, Ordering::Relaxed);
                }
                Event::Other(code) => {
                    counters.other_events.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("ignored userfaultfd event {code:#x}");
                }
            }
        }
        if !faults.is_empty() {
            resolve(&faults);
        }
    }
}
