//! The Protector: the userfaultfd registered in write-protect mode over every
//! VM's guest RAM, and the threads that handle its events.
//!
//! One handler thread polls the userfaultfd, reads write-fault events in
//! batches and hands their pages to the resolver callback (the memory core's
//! fault resolution), which resolves each fault under the manager's lock (copy,
//! reuse, or simply after an in-flight merge or migration finished); then the
//! thread wakes the writers, except those the resolver holds back (a
//! copy-on-write that found no free frame: see [`crate::core::commit`]). The thread may block on that lock: nothing the
//! lock holder does waits for this thread (no non-cooperative userfaultfd
//! events are enabled).
//!
//! Between faults the same thread does background work ([`Background`]):
//! whoever queues some rings its [`Doorbell`]; the thread then calls the
//! work function, one bounded batch per call, and goes on calling it while
//! it reports more left, taking the faults that arrived in between first
//! (the memory core's background reuse of sole-mapped merged pages:
//! `core/background_reuse.rs`).
//!
//! This module owns the event side of the userfaultfd: the `uffd_msg` format,
//! [`Uffd::read_events`] and [`Uffd::wake`] (the descriptor and its protection
//! ioctls are [`crate::uffd`]'s). So a write fault's walk enters each file
//! once: here (read), the core (resolve), the remap protocol and
//! [`crate::uffd`] (protect/register), and back here (wake). The handler
//! stamps each stage into [`crate::uffd::trace`] when a benchmark enabled it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::thread_hook::{ThreadKind, ThreadStartHook};
use crate::uffd::{self, Uffd};
use crate::PAGE_SIZE;

const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// `struct uffd_msg`: 32 bytes, event byte first, then a 24-byte union at offset 8.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

/// One event read from the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted at `addr` (page-aligned by the caller as needed).
    PageFault {
        /// Faulting address.
        addr: u64,
        /// The access was a write.
        write: bool,
        /// The fault is a write-protect fault.
        wp: bool,
    },
    /// A registered range moved with `mremap` (the mover waits until this is read).
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// Any other event code.
    Other(u8),
}

impl Uffd {
    /// Wakes threads blocked on faults in `addr..addr+len`.
    pub fn wake(&self, addr: usize, len: usize) -> uffd::Result<()> {
        let mut r = uffd::range(addr, len);
        // SAFETY: UFFDIO_WAKE reads exactly one `UffdioRange`.
        if unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_WAKE, &mut r) } != 0 {
            return Err(uffd::Error::Wake(addr as u64, len as u64, io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Reads the pending events (non-blocking) into `out`; returns how many.
    pub fn read_events(&self, out: &mut Vec<Event>) -> uffd::Result<usize> {
        const BATCH: usize = 64;
        let mut msgs = [UffdMsg { event: 0, reserved1: 0, reserved2: 0, reserved3: 0, arg: [0; 3] }; BATCH];
        // SAFETY: the buffer is BATCH whole `uffd_msg`s; the kernel writes at most that.
        let n = unsafe {
            libc::read(self.as_raw_fd(), msgs.as_mut_ptr() as *mut libc::c_void, std::mem::size_of_val(&msgs))
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return if err.raw_os_error() == Some(libc::EAGAIN) { Ok(0) } else { Err(uffd::Error::Read(err)) };
        }
        let count = n as usize / std::mem::size_of::<UffdMsg>();
        out.extend(msgs[..count].iter().map(|m| match m.event {
            UFFD_EVENT_PAGEFAULT => Event::PageFault {
                addr: m.arg[1],
                write: m.arg[0] & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                wp: m.arg[0] & UFFD_PAGEFAULT_FLAG_WP != 0,
            },
            UFFD_EVENT_REMAP => Event::Remap { from: m.arg[0], to: m.arg[1], len: m.arg[2] },
            other => Event::Other(other),
        }));
        Ok(count)
    }
}

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
    /// Wakes of resolved writers that failed (each is logged; the writer
    /// stays blocked until the next wake of its page).
    pub wake_errors: AtomicU64,
    /// Faults whose writers the resolver kept blocked (no free frame for
    /// their copy-on-write) instead of waking them.
    pub held_writers: AtomicU64,
}

/// An eventfd that wakes the handler thread for its [`Background`] work.
#[derive(Debug)]
pub struct Doorbell(OwnedFd);

impl Doorbell {
    /// A new, silent doorbell.
    pub fn new() -> Result<Self> {
        // SAFETY: plain syscall creating a new descriptor; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(Error::EventFd(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        Ok(Doorbell(unsafe { OwnedFd::from_raw_fd(raw) }))
    }

    /// Rings: the handler thread runs its background work soon (rings before
    /// it ran coalesce into one run).
    pub fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. It cannot block
        // (non-blocking) and can only fail on counter overflow, when it is rung anyway.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Silences the bell (called by the handler thread before it runs the work).
    fn clear(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 (non-blocking: EAGAIN when silent).
        unsafe { libc::read(self.0.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    }

    fn fd(&self) -> i32 {
        self.0.as_raw_fd()
    }
}

/// Work the handler thread does when its [`Doorbell`] rings and no fault
/// waits: `work` does one bounded batch and returns whether more is left
/// (then it is called again after the faults that arrived meanwhile).
pub struct Background {
    /// Rung by whoever queues work.
    pub bell: Arc<Doorbell>,
    /// One batch of the work; true if more is left.
    pub work: Box<dyn FnMut() -> bool + Send>,
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
    /// faulting pages (page-aligned, sorted, distinct) and an empty list; it
    /// must resolve every one of them (or count and log why not), and push
    /// onto the list the pages whose writers must stay blocked (a
    /// copy-on-write that found no free frame: waking the writer would only
    /// make it fault again at once). The thread then wakes every other writer
    /// (after an error too: the writer retries and faults again); a held
    /// writer is woken by whoever makes room or ends the VM (counted in
    /// [`ProtectorCounters::held_writers`]). `hook` runs first on the thread.
    pub fn start<F>(uffd: Arc<Uffd>, hook: Option<ThreadStartHook>, resolve: F) -> Result<Self>
    where
        F: FnMut(&[u64], &mut Vec<u64>) + Send + 'static,
    {
        Self::start_with_background(uffd, hook, resolve, None)
    }

    /// [`Protector::start`], the thread also doing `background`'s work
    /// between faults (faults always go first).
    pub fn start_with_background<F>(
        uffd: Arc<Uffd>,
        hook: Option<ThreadStartHook>,
        resolve: F,
        background: Option<Background>,
    ) -> Result<Self>
    where
        F: FnMut(&[u64], &mut Vec<u64>) + Send + 'static,
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
                .spawn(move || {
                    crate::thread_hook::started(hook.as_ref(), ThreadKind::FaultHandler);
                    handle_loop(&uffd, stop_fd, &counters, resolve, background)
                })
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

fn handle_loop<F: FnMut(&[u64], &mut Vec<u64>)>(
    uffd: &Uffd,
    stop_fd: i32,
    counters: &ProtectorCounters,
    mut resolve: F,
    mut background: Option<Background>,
) {
    let mut events = Vec::with_capacity(64);
    let mut faults = Vec::with_capacity(64);
    let mut held = Vec::new();
    // Background work is left over from the last batch: poll without waiting.
    let mut more_background = false;
    let bell_fd = background.as_ref().map_or(-1, |b| b.bell.fd());
    loop {
        let mut fds = [
            libc::pollfd { fd: uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop_fd, events: libc::POLLIN, revents: 0 },
            // A negative descriptor is ignored by poll.
            libc::pollfd { fd: bell_fd, events: libc::POLLIN, revents: 0 },
        ];
        let timeout = if more_background { 0 } else { -1 };
        // SAFETY: `fds` is a valid array of three pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, timeout) };
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
        if fds[0].revents != 0 {
            uffd::trace::begin();
            events.clear();
            if let Err(e) = uffd.read_events(&mut events) {
                tracing::error!("{e}");
                return;
            }
            uffd::trace::with(|b| b.read_done = uffd::trace::tsc());
            handle_faults(uffd, counters, &events, &mut faults, &mut held, &mut resolve);
            uffd::trace::finish();
            if !faults.is_empty() {
                // Faults first: look for more before any background work.
                continue;
            }
        }
        let Some(bg) = background.as_mut() else { continue };
        if fds[2].revents != 0 {
            bg.bell.clear();
            more_background = true;
        }
        if more_background {
            more_background = (bg.work)();
        }
    }
}

/// Counts `events`, resolves their faults and wakes the writers not held;
/// leaves the faults' pages in `faults`.
fn handle_faults<F: FnMut(&[u64], &mut Vec<u64>)>(
    uffd: &Uffd,
    counters: &ProtectorCounters,
    events: &[Event],
    faults: &mut Vec<u64>,
    held: &mut Vec<u64>,
    resolve: &mut F,
) {
    faults.clear();
    for event in events {
        match *event {
            Event::PageFault { addr, .. } => {
                counters.faults.fetch_add(1, Ordering::Relaxed);
                faults.push(addr & !(PAGE_SIZE as u64 - 1));
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
    if faults.is_empty() {
        return;
    }
    faults.sort_unstable();
    faults.dedup();
    held.clear();
    uffd::trace::with(|b| {
        (b.faults, b.first_page, b.resolve_start) = (faults.len() as u32, faults[0], uffd::trace::tsc())
    });
    resolve(faults, held);
    uffd::trace::with(|b| b.resolve_end = uffd::trace::tsc());
    held.sort_unstable();
    counters.held_writers.fetch_add(held.len() as u64, Ordering::Relaxed);
    for &page in faults.iter().filter(|p| held.binary_search(p).is_err()) {
        if let Err(e) = uffd.wake(page as usize, PAGE_SIZE) {
            counters.wake_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!("waking writers at {page:#x}: {e}");
        }
    }
    uffd::trace::with(|b| {
        (b.wake_ioctls, b.wake_end) = (faults.len().saturating_sub(held.len()) as u32, uffd::trace::tsc())
    });
}
