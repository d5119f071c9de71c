//! Retry of host-thread stores that hit a page in the read-only instant of the
//! remap protocol.
//!
//! [`crate::remap::RemapProtocol::remap_protected`] maps the new frame
//! `PROT_READ` for a moment (see that module for why). A host thread storing
//! into the page then gets SIGSEGV. The handler installed here recognizes a
//! fault on a page of a live guest range, waits until no remap of that page is
//! in flight, and returns, so the store is retried and ends in the userfaultfd
//! handler like any write to a protected page. Faults anywhere else go to the
//! previously installed handler (e.g. Rust's stack-overflow handler) or the
//! default action.
//!
//! Everything the handler touches is a static atomic (async-signal-safe).

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::PAGE_SIZE;

/// Most live guest ranges (VMs) at once: [`add_range`] refuses more, so every
/// guest range is always known to the handler.
pub const RANGE_SLOTS: usize = 4096;
/// Most remaps in flight at once ([`InFlight::begin`] waits for a slot).
const IN_FLIGHT_SLOTS: usize = 256;
/// Consecutive faults on one address with no remap seen before giving up.
const MAX_BLIND_RETRIES: u32 = 1_000_000;

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicUsize = AtomicUsize::new(0);
static RANGE_START: [AtomicUsize; RANGE_SLOTS] = [ZERO; RANGE_SLOTS];
static RANGE_END: [AtomicUsize; RANGE_SLOTS] = [ZERO; RANGE_SLOTS];
static IN_FLIGHT: [AtomicUsize; IN_FLIGHT_SLOTS] = [ZERO; IN_FLIGHT_SLOTS];
static IN_FLIGHT_END: [AtomicUsize; IN_FLIGHT_SLOTS] = [ZERO; IN_FLIGHT_SLOTS];
static INSTALLED: AtomicBool = AtomicBool::new(false);

struct PreviousAction(libc::sigaction);
// SAFETY: a plain C struct of integers and function addresses, written once
// before the handler is installed and only read afterwards.
unsafe impl Sync for PreviousAction {}
// SAFETY: see `Sync`.
unsafe impl Send for PreviousAction {}
static PREVIOUS: OnceLock<PreviousAction> = OnceLock::new();

thread_local! {
    static LAST_FAULT: Cell<(usize, u32)> = const { Cell::new((0, 0)) };
}

/// Installs the SIGSEGV handler once per process (later calls do nothing).
pub fn install() -> io::Result<()> {
    let mut result = Ok(());
    PREVIOUS.get_or_init(|| {
        // SAFETY: an all-zero sigaction is a valid "no handler" value to read into.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: as above; fields are set below before use.
        let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
        new.sa_sigaction = handler as *const () as usize;
        new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
        // SAFETY: `new.sa_mask` is a valid sigset to initialize; sigaction reads
        // `new` and writes `old`, both valid.
        let rc = unsafe {
            libc::sigemptyset(&mut new.sa_mask);
            libc::sigaction(libc::SIGSEGV, &new, &mut old)
        };
        if rc != 0 {
            result = Err(io::Error::last_os_error());
        } else {
            INSTALLED.store(true, Ordering::Release);
        }
        PreviousAction(old)
    });
    result
}

/// Whether the handler is installed.
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Acquire)
}

/// The range table is full: [`RANGE_SLOTS`] guest ranges are live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{RANGE_SLOTS} guest ranges are live, the most the write-retry table holds")]
pub struct RangeTableFull;

/// Declares `start..start+len` a live guest range (faults there are retried).
///
/// Refused when the table is full: a guest range the handler does not know
/// would turn a host thread's store in a remap's read-only instant into a
/// crash of the process, so such a guest must not exist.
pub(crate) fn add_range(start: usize, len: usize) -> Result<(), RangeTableFull> {
    for i in 0..RANGE_SLOTS {
        if RANGE_END[i].load(Ordering::Acquire) == 0
            && RANGE_START[i].compare_exchange(0, start, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            RANGE_END[i].store(start + len, Ordering::Release);
            return Ok(());
        }
    }
    Err(RangeTableFull)
}

/// Removes a range added with [`add_range`].
pub(crate) fn remove_range(start: usize) {
    for i in 0..RANGE_SLOTS {
        if RANGE_START[i].load(Ordering::Acquire) == start && start != 0 {
            RANGE_END[i].store(0, Ordering::Release);
            RANGE_START[i].store(0, Ordering::Release);
        }
    }
}

/// Marks a range of pages as being remapped until dropped.
pub(crate) struct InFlight(usize);

impl InFlight {
    /// Marks the pages of `addr..addr+len` in flight (spins if every slot is busy).
    pub(crate) fn begin(addr: usize, len: usize) -> Self {
        let page = addr & !(PAGE_SIZE - 1);
        let end = (addr + len.max(1)).next_multiple_of(PAGE_SIZE);
        loop {
            for (i, slot) in IN_FLIGHT.iter().enumerate() {
                if slot.compare_exchange(0, page, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    IN_FLIGHT_END[i].store(end, Ordering::Release);
                    return InFlight(i);
                }
            }
            std::thread::yield_now();
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT_END[self.0].store(0, Ordering::Release);
        IN_FLIGHT[self.0].store(0, Ordering::Release);
    }
}

fn in_guest_range(addr: usize) -> bool {
    (0..RANGE_SLOTS).any(|i| {
        let start = RANGE_START[i].load(Ordering::Acquire);
        start != 0 && addr >= start && addr < RANGE_END[i].load(Ordering::Acquire)
    })
}

fn in_flight(page: usize) -> bool {
    IN_FLIGHT.iter().zip(&IN_FLIGHT_END).any(|(s, e)| {
        let start = s.load(Ordering::Acquire);
        // A slot whose end is not yet written counts for its first page.
        start != 0 && (start == page || (page > start && page < e.load(Ordering::Acquire)))
    })
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    if in_guest_range(addr) {
        let page = addr & !(PAGE_SIZE - 1);
        let mut waited = false;
        while in_flight(page) {
            waited = true;
            // SAFETY: sched_yield is async-signal-safe and has no arguments.
            unsafe { libc::sched_yield() };
        }
        let give_up = LAST_FAULT.with(|last| {
            let (prev_addr, count) = last.get();
            let count = if waited || prev_addr != addr { 0 } else { count + 1 };
            last.set((addr, count));
            count > MAX_BLIND_RETRIES
        });
        if !give_up {
            return; // Retry the store.
        }
    }
    chain(sig, info, ctx);
}

fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let Some(PreviousAction(prev)) = PREVIOUS.get() else {
        return;
    };
    let action = prev.sa_sigaction;
    if action == libc::SIG_DFL || action == libc::SIG_IGN {
        // SAFETY: restoring the default action; the faulting instruction re-runs
        // and the kernel applies it (terminates the process).
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
    } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it has
        // this signature; we pass the arguments we received.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(action) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a handler installed without SA_SIGINFO takes the signal number only.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(action) };
        f(sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host thread's store into the page of a guest range beyond the 256th
    /// (the table's size before it became [`RANGE_SLOTS`]), made in that page's
    /// read-only instant, waits until the remap ends and lands.
    #[test]
    fn a_store_into_range_300_in_its_read_only_instant_is_retried() {
        const RANGES: usize = 300;
        install().expect("install the handler");
        let base = crate::sys::reserve(RANGES * PAGE_SIZE, PAGE_SIZE).expect("address space");
        crate::sys::protect(base, RANGES * PAGE_SIZE, libc::PROT_READ | libc::PROT_WRITE).expect("read-write");
        for i in 0..RANGES {
            add_range(base + i * PAGE_SIZE, PAGE_SIZE).expect("room in the table");
        }
        let target = base + (RANGES - 1) * PAGE_SIZE;
        // The read-only instant of a remap of the last page.
        let in_flight = InFlight::begin(target, PAGE_SIZE);
        crate::sys::protect(target, PAGE_SIZE, libc::PROT_READ).expect("read-only");
        let remapper = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            crate::sys::protect(target, PAGE_SIZE, libc::PROT_READ | libc::PROT_WRITE).expect("writable");
            drop(in_flight);
        });
        // SAFETY: a page of our own mapping; the store faults until the
        // "remap" ends, then is retried by the handler's return.
        unsafe { std::ptr::write_volatile(target as *mut u64, 0x300) };
        remapper.join().expect("remapper");
        // SAFETY: as above, readable.
        assert_eq!(unsafe { std::ptr::read_volatile(target as *const u64) }, 0x300);
        for i in 0..RANGES {
            remove_range(base + i * PAGE_SIZE);
        }
        // SAFETY: our own mapping, no longer used.
        unsafe { crate::sys::unmap(base, RANGES * PAGE_SIZE) }.expect("unmap");
    }
}
