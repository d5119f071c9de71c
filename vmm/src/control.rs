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
}

/// Shared control block of one VM.
pub struct VmControl {
    state: Mutex<ModeState>,
    changed: Condvar,
    events: Mutex<Vec<VcpuEvent>>,
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VmControl {
    /// Creates a control block in `Pause` mode (vCPUs wait for the first resume).
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(VmControl {
            state: Mutex::new(ModeState { mode: RunMode::Pause, paused: 0 }),
            changed: Condvar::new(),
            events: Mutex::new(Vec::new()),
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

    /// Called by a vCPU thread outside KVM_RUN: blocks while paused; returns false when
    /// the thread must stop.
    pub fn wait_runnable(&self) -> bool {
        let mut s = lock(&self.state);
        if s.mode == RunMode::Pause {
            s.paused += 1;
            self.changed.notify_all();
            while s.mode == RunMode::Pause {
                s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            s.paused -= 1;
        }
        s.mode == RunMode::Run
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

    /// Takes the pending events.
    pub fn take_events(&self) -> Vec<VcpuEvent> {
        let _ = self.event_fd.read();
        std::mem::take(&mut *lock(&self.events))
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
        c.set_mode(RunMode::Stop);
        t.join().unwrap();
        assert_eq!(c.take_events(), vec![VcpuEvent::Done { vcpu: 0 }]);
        // Stop is final.
        c.set_mode(RunMode::Run);
        assert_eq!(c.mode(), RunMode::Stop);
    }
}
