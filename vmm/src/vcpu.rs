//! vCPU threads and their exit loop.

use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::control::{kick_signal, VcpuEvent, VmControl};
use crate::device_manager::{ExitAction, IoRouter};

/// Longest continuous run of transient `EFAULT`s (a page in a remap's read-only
/// instant) tolerated before the vCPU reports an error.
const EFAULT_GRACE: Duration = Duration::from_secs(5);

/// What the vCPU loop needs besides its fd.
pub struct VcpuContext {
    /// vCPU index.
    pub index: u32,
    /// Run control and event sink.
    pub control: Arc<VmControl>,
    /// The VM's devices: every port-I/O and MMIO exit goes through them.
    pub io: Arc<IoRouter>,
}

/// Counters a vCPU keeps about its exits.
#[derive(Clone, Copy, Debug, Default)]
pub struct VcpuStats {
    /// KVM_RUN returns.
    pub exits: u64,
    /// Doorbell writes.
    pub doorbells: u64,
    /// Transient EFAULTs retried.
    pub efaults: u64,
}

/// A running vCPU thread.
pub struct VcpuThread {
    handle: JoinHandle<VcpuStats>,
}

impl VcpuThread {
    /// Spawns the thread that runs `vcpu`.
    pub fn spawn(vcpu: VcpuFd, ctx: VcpuContext) -> std::io::Result<Self> {
        let handle =
            std::thread::Builder::new().name(format!("vcpu{}", ctx.index)).spawn(move || run_loop(vcpu, ctx))?;
        Ok(VcpuThread { handle })
    }

    /// Interrupts KVM_RUN on this thread (no effect once it has exited).
    pub fn kick(&self) {
        if self.handle.is_finished() {
            return;
        }
        // SAFETY: the pthread id belongs to a thread we own and have not joined yet
        // (we hold its JoinHandle), so it is valid; the signal has a no-op handler.
        unsafe {
            libc::pthread_kill(self.handle.as_pthread_t(), kick_signal());
        }
    }

    /// True once the thread has left its loop.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Joins the thread.
    pub fn join(self) -> VcpuStats {
        self.handle.join().unwrap_or_default()
    }
}

fn run_loop(mut vcpu: VcpuFd, ctx: VcpuContext) -> VcpuStats {
    let mut stats = VcpuStats::default();
    let mut efault_since: Option<Instant> = None;
    ctx.control.register_thread();
    while ctx.control.wait_runnable() {
        let exit = vcpu.run();
        ctx.control.left_guest();
        stats.exits += 1;
        match exit {
            Ok(exit) => {
                efault_since = None;
                if !handle_exit(exit, &ctx, &mut stats) {
                    break;
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) if e.errno() == libc::EFAULT => {
                // A page of guest RAM is in the read-only instant of a remap: retry.
                stats.efaults += 1;
                let since = *efault_since.get_or_insert_with(Instant::now);
                if since.elapsed() > EFAULT_GRACE {
                    ctx.control.push_event(VcpuEvent::Error {
                        vcpu: ctx.index,
                        message: format!("KVM_RUN kept failing with EFAULT for {EFAULT_GRACE:?}"),
                    });
                    break;
                }
                std::thread::yield_now();
            }
            Err(e) => {
                ctx.control.push_event(VcpuEvent::Error { vcpu: ctx.index, message: format!("KVM_RUN: {e}") });
                break;
            }
        }
    }
    ctx.control.unregister_thread();
    stats
}

/// Handles one exit; returns false when the vCPU must leave its loop.
fn handle_exit(exit: VcpuExit, ctx: &VcpuContext, stats: &mut VcpuStats) -> bool {
    match exit {
        VcpuExit::MmioWrite(addr, data) => {
            if ctx.io.is_doorbell(addr) {
                stats.doorbells += 1;
            }
            ctx.io.mmio_write(ctx.index, addr, data) == ExitAction::Resume
        }
        VcpuExit::MmioRead(addr, data) => {
            ctx.io.mmio_read(addr, data);
            true
        }
        VcpuExit::IoOut(port, data) => {
            ctx.io.pio_write(port, data);
            true
        }
        VcpuExit::IoIn(port, data) => {
            ctx.io.pio_read(port, data);
            true
        }
        VcpuExit::Hlt => {
            ctx.control.push_event(VcpuEvent::Shutdown { vcpu: ctx.index, reason: "halted".into() });
            false
        }
        VcpuExit::Shutdown => {
            ctx.control.push_event(VcpuEvent::Shutdown {
                vcpu: ctx.index,
                reason: "guest shut down (triple fault or reset)".into(),
            });
            false
        }
        VcpuExit::SystemEvent(kind, _) => {
            ctx.control.push_event(VcpuEvent::Shutdown { vcpu: ctx.index, reason: format!("system event {kind}") });
            false
        }
        other => {
            ctx.control
                .push_event(VcpuEvent::Error { vcpu: ctx.index, message: format!("unexpected exit: {other:?}") });
            false
        }
    }
}
