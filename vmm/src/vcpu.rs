//! vCPU threads and their exit loop.

use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::PioBus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::control::{kick_signal, RunMode, VcpuEvent, VmControl};
use crate::workload::abi;

/// Longest continuous run of transient `EFAULT`s (a page in a remap's read-only
/// instant) tolerated before the vCPU reports an error.
const EFAULT_GRACE: Duration = Duration::from_secs(5);
/// Longest idle wait a guest may request in one doorbell.
const MAX_GUEST_SLEEP: Duration = Duration::from_secs(1);

/// What the vCPU loop needs besides its fd.
pub struct VcpuContext {
    /// vCPU index.
    pub index: u32,
    /// Run control and event sink.
    pub control: Arc<VmControl>,
    /// Port-I/O devices.
    pub pio: Arc<PioBus>,
    /// Guest-physical address of the workload doorbell, if any.
    pub doorbell: Option<u64>,
    /// Guest memory (to read console lines the workload guest passes by address).
    pub memory: GuestMemoryMmap,
    /// Pause the whole VM when this vCPU reports its fill done (benchmarks and tests
    /// prepare memory states between fill and write loop).
    pub pause_after_fill: bool,
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
        VcpuExit::MmioWrite(addr, data) if Some(addr) == ctx.doorbell => {
            stats.doorbells += 1;
            let mut word = [0u8; 8];
            let n = data.len().min(8);
            word[..n].copy_from_slice(&data[..n]);
            doorbell(u64::from_le_bytes(word), ctx)
        }
        VcpuExit::MmioWrite(_, _) => true,
        VcpuExit::MmioRead(_, data) => {
            data.fill(0xff);
            true
        }
        VcpuExit::IoOut(port, data) => {
            ctx.pio.write(u64::from(port), data);
            true
        }
        VcpuExit::IoIn(port, data) => {
            ctx.pio.read(u64::from(port), data);
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

fn doorbell(word: u64, ctx: &VcpuContext) -> bool {
    let cmd = (word & 0xff) as u8;
    let arg = word >> 8;
    match cmd {
        abi::DB_SLEEP_US => {
            ctx.control.sleep(Duration::from_micros(arg).min(MAX_GUEST_SLEEP));
            true
        }
        abi::DB_FILL_DONE => {
            if ctx.pause_after_fill {
                ctx.control.set_mode(RunMode::Pause);
            }
            ctx.control.push_event(VcpuEvent::FillDone { vcpu: ctx.index, at: Instant::now() });
            true
        }
        abi::DB_MISMATCH => {
            ctx.control.push_event(VcpuEvent::Mismatch { vcpu: ctx.index, page: arg });
            true
        }
        abi::DB_PUTS => {
            let mut line = [0u8; abi::MAX_LINE];
            if ctx.memory.read_slice(&mut line, GuestAddress(arg)).is_ok() {
                let len = line.iter().position(|b| *b == 0).unwrap_or(line.len());
                for b in &line[..len] {
                    ctx.pio.write(devices::serial::COM1_PORT, &[*b]);
                }
            }
            true
        }
        abi::DB_DONE => {
            ctx.control.push_event(VcpuEvent::Done { vcpu: ctx.index });
            false
        }
        _ => true,
    }
}
