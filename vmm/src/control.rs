//! Run control shared by a VM and its vCPU threads: run / pause / stop, kicks out of
//! KVM_RUN, and the events vCPUs report to the host's event loop.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// What vCPU threads should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// Run the guest.
    Run,
    /// Stay out of KVM_RUN until resumed.
    Pause,
    /// Leave the thread.
    Stop,
}

/// Something a vCPU reports to the VM's owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The workload guest filled and verified its memory.
    FillDone {
        /// vCPU index.
        vcpu: u32,
        /// When.
        at: Instant,
    },
    /// The workload guest finished (final verify done).
    Done {
        /// vCPU index.
        vcpu: u32,
    },
    /// The workload guest found a page that did not verify.
    Mismatch {
        /// vCPU index.
        vcpu: u32,
        /// Global data-page index.
        page: u64,
    },
    /// The guest asked for a reset or shut down (triple fault).
    Shutdown {
        /// vCPU index.
        vcpu: u32,
        /// Why.
        reason: String,
    },
    /// KVM_RUN failed in a way the vCPU cannot recover from.
    Error {
        /// vCPU index.
        vcpu: u32,
        /// What failed.
        message: String,
    },
}

struct ModeState {
    mode: RunMode,
    paused: u32,
    /// Outstanding [`VmControl::hold`]s: vCPUs stay out of KVM_RUN meanwhile.
    holds: u32,
    /// Registered vCPU threads and whether each is in guest mode, between
    /// [`VmControl::wait_runnable`] and [`VmControl::left_guest`] (those are
    /// kicked by [`VmControl::hold`]; a thread leaves the list under this lock
    /// before it exits, so an id here is always valid).
    threads: Vec<(libc::pthread_t, bool)>,
}

impl ModeState {
    fn in_guest(&self) -> bool {
        self.threads.iter().any(|&(_, in_guest)| in_guest)
    }
}

/// Shared control block of one VM.
pub struct VmControl {
    state: Mutex<ModeState>,
    changed: Condvar,
    events: Mutex<Vec<VcpuEvent>>,
    /// Why the memory manager could not give the VM a frame, once reported
    /// ([`VmControl::report_out_of_memory`]), until the owner takes it.
    out_of_memory: Mutex<Option<String>>,
    event_fd: EventFd,
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick-signal handler once per process, so that the signal
/// interrupts KVM_RUN with EINTR instead of killing the process.
pub fn install_kick_handler() -> Result<(), String> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| format!("cannot install the vCPU kick handler: {e}"));
    });
    result
}

/// Marks the calling thread's entry (if registered) as in guest mode or not.
fn set_in_guest(threads: &mut [(libc::pthread_t, bool)], in_guest: bool) {
    // SAFETY: pthread_self has no preconditions; pthread_equal compares ids.
    let me = unsafe { libc::pthread_self() };
    if let Some(entry) = threads.iter_mut().find(|(t, _)| {
        // SAFETY: pthread_equal only compares two thread ids; it dereferences nothing.
        let equal = unsafe { libc::pthread_equal(*t, me) };
        equal != 0
    }) {
        entry.1 = in_guest;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VmControl {
    /// Creates a control block in `Pause` mode (vCPUs wait for the first resume).
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(VmControl {
            state: Mutex::new(ModeState { mode: RunMode::Pause, paused: 0, holds: 0, threads: Vec::new() }),
            changed: Condvar::new(),
            events: Mutex::new(Vec::new()),
            out_of_memory: Mutex::new(None),
            event_fd: EventFd::new(libc::EFD_NONBLOCK)?,
        }))
    }

    /// The eventfd that becomes readable when events are pending.
    pub fn event_fd(&self) -> &EventFd {
        &self.event_fd
    }

    /// Current mode.
    pub fn mode(&self) -> RunMode {
        lock(&self.state).mode
    }

    /// Sets the mode and wakes sleeping vCPUs.
    pub fn set_mode(&self, mode: RunMode) {
        let mut s = lock(&self.state);
        if s.mode != RunMode::Stop {
            s.mode = mode;
        }
        self.changed.notify_all();
    }

    /// Called by a vCPU thread outside KVM_RUN: blocks while paused or held;
    /// returns false when the thread must stop. After true a registered thread
    /// ([`VmControl::register_thread`]) counts as in guest mode until it calls
    /// [`VmControl::left_guest`].
    pub fn wait_runnable(&self) -> bool {
        let mut s = lock(&self.state);
        loop {
            if s.mode == RunMode::Pause {
                s.paused += 1;
                self.changed.notify_all();
                while s.mode == RunMode::Pause {
                    s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
                }
                s.paused -= 1;
            } else if s.mode == RunMode::Run && s.holds > 0 {
                s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            } else {
                break;
            }
        }
        if s.mode == RunMode::Run {
            set_in_guest(&mut s.threads, true);
            true
        } else {
            false
        }
    }

    /// Called by a vCPU thread when KVM_RUN returned (see [`VmControl::wait_runnable`]).
    pub fn left_guest(&self) {
        let mut s = lock(&self.state);
        set_in_guest(&mut s.threads, false);
        if s.holds > 0 && !s.in_guest() {
            self.changed.notify_all();
        }
    }

    /// Registers the calling thread as a vCPU thread of this VM (kicked by holds).
    pub fn register_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        lock(&self.state).threads.push((me, false));
    }

    /// Removes the calling thread from the vCPU threads (before it exits).
    pub fn unregister_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        // SAFETY: pthread_equal only compares the two ids.
        lock(&self.state).threads.retain(|&(t, _)| unsafe { libc::pthread_equal(t, me) } == 0);
    }

    /// Keeps the vCPUs out of KVM_RUN until [`VmControl::release`]: kicks those in
    /// guest mode and waits up to `timeout` for them to leave it. Returns whether
    /// none is in guest mode (the hold stands either way; release it).
    pub fn hold(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.state);
        s.holds += 1;
        while s.in_guest() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            for &(t, _) in s.threads.iter().filter(|(_, in_guest)| *in_guest) {
                // SAFETY: `t` is a live vCPU thread: threads leave the list under
                // this lock before they exit. The kick signal has a no-op handler.
                unsafe { libc::pthread_kill(t, kick_signal()) };
            }
            // Re-kick now and then: a kick that lands just before KVM_RUN is lost.
            let wait = (deadline - now).min(Duration::from_micros(500));
            s = self.changed.wait_timeout(s, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    /// Ends one [`VmControl::hold`].
    pub fn release(&self) {
        let mut s = lock(&self.state);
        s.holds = s.holds.saturating_sub(1);
        if s.holds == 0 {
            self.changed.notify_all();
        }
    }

    /// Sleeps up to `d` (a guest idle wait); wakes early on a mode change.
    pub fn sleep(&self, d: Duration) {
        let s = lock(&self.state);
        if s.mode == RunMode::Run {
            let _ = self.changed.wait_timeout_while(s, d, |s| s.mode == RunMode::Run).map_err(|_| ());
        }
    }

    /// Waits (kicking with `kick`) until `n` vCPUs are parked or `timeout` passes.
    pub fn wait_paused(&self, n: u32, timeout: Duration, mut kick: impl FnMut()) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let s = lock(&self.state);
                if s.paused >= n || s.mode != RunMode::Pause {
                    return s.paused >= n;
                }
                let (s, _) = self.changed.wait_timeout(s, Duration::from_millis(1)).unwrap_or_else(|p| p.into_inner());
                if s.paused >= n {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            kick();
        }
    }

    /// Records an event and wakes the owner.
    pub fn push_event(&self, e: VcpuEvent) {
        lock(&self.events).push(e);
        // A full eventfd counter still wakes the reader: ignore EAGAIN.
        let _ = self.event_fd.write(1);
    }

    /// Reports that a copy-on-write of the VM found no free frame (called on
    /// the memory manager's fault thread; never blocks): the owner stops the
    /// VM with `reason` as its exit reason ([`VmControl::take_out_of_memory`]).
    pub fn report_out_of_memory(&self, reason: &str) {
        lock(&self.out_of_memory).get_or_insert_with(|| reason.to_string());
        let _ = self.event_fd.write(1);
    }

    /// The out-of-memory report, if one arrived since the last call.
    pub fn take_out_of_memory(&self) -> Option<String> {
        lock(&self.out_of_memory).take()
    }

    /// Takes the pending events.
    pub fn take_events(&self) -> Vec<VcpuEvent> {
        let _ = self.event_fd.read();
        std::mem::take(&mut *lock(&self.events))
    }
}

/// How long the merger waits for a VM's vCPUs to leave guest mode.
pub const HOLD_TIMEOUT: Duration = Duration::from_millis(5);

/// The VM's [`memory::VcpuGate`]: the merger holds its vCPUs out of KVM_RUN
/// while it remaps a chunk of the VM's pages.
pub struct ControlGate(pub Arc<VmControl>);

impl memory::VcpuGate for ControlGate {
    fn hold(&self) -> bool {
        self.0.hold(HOLD_TIMEOUT)
    }

    fn release(&self) {
        self.0.release()
    }
}

/// The VM's [`memory::manager::OutOfMemoryHandler`]: a copy-on-write that finds no
/// free frame (only with overcommit) stops the VM, with an exit reason, from
/// the event loop (the blocked vCPU is kicked out of its fault by the stop).
pub struct ControlOutOfMemory(pub Arc<VmControl>);

impl memory::manager::OutOfMemoryHandler for ControlOutOfMemory {
    fn out_of_memory(&self, _vm: memory::VmId, reason: &str) {
        self.0.report_out_of_memory(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_parks_threads_and_resume_releases_them() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let c = VmControl::new().unwrap();
        c.set_mode(RunMode::Run);
        let rounds = Arc::new(AtomicU32::new(0));
        let (c2, r2) = (c.clone(), rounds.clone());
        let t = std::thread::spawn(move || {
            while c2.wait_runnable() {
                r2.fetch_add(1, Ordering::SeqCst);
                c2.sleep(Duration::from_millis(1));
            }
        });
        let wait_rounds = |n: u32| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while rounds.load(Ordering::SeqCst) < n {
                assert!(Instant::now() < deadline, "vCPU thread made no progress");
                std::thread::yield_now();
            }
        };
        wait_rounds(1);
        c.set_mode(RunMode::Pause);
        assert!(c.wait_paused(1, Duration::from_secs(5), || {}));
        let parked = rounds.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(rounds.load(Ordering::SeqCst), parked, "a paused thread kept running");
        c.set_mode(RunMode::Run);
        wait_rounds(parked + 1);
        c.push_event(VcpuEvent::Done { vcpu: 0 });
        // An out-of-memory report is kept once until taken.
        c.report_out_of_memory("first");
        c.report_out_of_memory("second");
        assert_eq!(c.take_out_of_memory().as_deref(), Some("first"));
        assert_eq!(c.take_out_of_memory(), None);
        c.set_mode(RunMode::Stop);
        t.join().unwrap();
        assert_eq!(c.take_events(), vec![VcpuEvent::Done { vcpu: 0 }]);
        // Stop is final.
        c.set_mode(RunMode::Run);
        assert_eq!(c.mode(), RunMode::Stop);
    }

    #[test]
    fn hold_keeps_threads_out_of_guest_mode_until_released() {
        use std::sync::atomic::{AtomicU32, Ordering};
        install_kick_handler().unwrap();
        let c = VmControl::new().unwrap();
        c.set_mode(RunMode::Run);
        let (rounds, in_guest) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let (c2, r2, g2) = (c.clone(), rounds.clone(), in_guest.clone());
        let t = std::thread::spawn(move || {
            c2.register_thread();
            while c2.wait_runnable() {
                g2.store(1, Ordering::SeqCst);
                r2.fetch_add(1, Ordering::SeqCst);
                // "Guest mode" lasts until a kick interrupts the sleep (as EINTR ends KVM_RUN).
                // SAFETY: plain libc sleep; a signal cuts it short.
                unsafe { libc::usleep(200_000) };
                g2.store(0, Ordering::SeqCst);
                c2.left_guest();
            }
            c2.unregister_thread();
        });
        while rounds.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        let started = Instant::now();
        assert!(c.hold(Duration::from_secs(5)), "the thread did not leave guest mode");
        assert!(started.elapsed() < Duration::from_millis(150), "hold waited for the sleep instead of kicking");
        assert_eq!(in_guest.load(Ordering::SeqCst), 0);
        let held_at = rounds.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(rounds.load(Ordering::SeqCst), held_at, "a held thread entered guest mode");
        // Holds nest: one release is not enough.
        assert!(c.hold(Duration::from_millis(10)));
        c.release();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(rounds.load(Ordering::SeqCst), held_at);
        c.release();
        let deadline = Instant::now() + Duration::from_secs(10);
        while rounds.load(Ordering::SeqCst) == held_at {
            assert!(Instant::now() < deadline, "the released thread did not run again");
            std::thread::yield_now();
        }
        // A hold gives up after its timeout if the thread does not leave guest mode
        // (here the test thread itself, whose kicks interrupt nothing).
        let stuck = VmControl::new().unwrap();
        stuck.set_mode(RunMode::Run);
        stuck.register_thread();
        assert!(stuck.wait_runnable());
        assert!(!stuck.hold(Duration::from_millis(20)));
        stuck.release();
        stuck.left_guest();
        stuck.unregister_thread();
        c.set_mode(RunMode::Stop);
        // Stop wins over a hold: the thread leaves.
        assert!(c.hold(Duration::from_secs(5)));
        t.join().unwrap();
        c.release();
    }
}
