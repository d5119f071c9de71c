//! vCPU threads and their exit loop.

use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

use crate::arch::exit_report::{read_internal_error, ExitReport, UnexpectedExit};
use crate::arch::syscall_fixup::{DebugOutcome, SyscallFixup};
use crate::arch::{fwait, int3, mxcsr, stack_scan};
use crate::boot::linux::system_map::SystemMap;
use crate::control::{kick_signal, VcpuEvent, VmControl};
use crate::device_manager::{ExitAction, IoRouter};

/// Longest continuous run of transient `EFAULT`s (a page in a remap's read-only
/// instant) tolerated before the vCPU reports an error.
const EFAULT_GRACE: Duration = Duration::from_secs(5);

/// Run first thing on every vCPU thread (see [`set_thread_start_hook`]).
static THREAD_START: OnceLock<Arc<dyn Fn() + Send + Sync>> = OnceLock::new();

/// Sets the function every vCPU thread of this process runs first, before its loop
/// (e.g. to install the vCPU seccomp filter). Process-wide, set once: false if a
/// hook was set already (the first one stays).
pub fn set_thread_start_hook(hook: Arc<dyn Fn() + Send + Sync>) -> bool {
    THREAD_START.set(hook).is_ok()
}

/// What the vCPU loop needs besides its fd.
pub struct VcpuContext {
    /// vCPU index.
    pub index: u32,
    /// Run control and event sink.
    pub control: Arc<VmControl>,
    /// The VM's devices: every port-I/O and MMIO exit goes through them.
    pub io: Arc<IoRouter>,
    /// What the report of an exit the loop cannot handle reads.
    pub diag: ExitDiagnostics,
    /// Complete guest user-mode `syscall`s that KVM leaves half done (a Linux guest
    /// where kvm_pvm emulates ring 0; see [`crate::arch::syscall_fixup`]).
    pub complete_syscalls: bool,
}

/// What the vCPU reads to report an exit it cannot handle: the code at RIP in guest
/// RAM, and the kernel's System.map (read only then) to name the function at RIP.
#[derive(Debug, Clone)]
pub struct ExitDiagnostics {
    /// Guest RAM.
    pub memory: GuestMemoryMmap,
    /// The guest kernel's System.map, if known.
    pub system_map: Option<PathBuf>,
}

impl ExitDiagnostics {
    /// The report of `exit` on `vcpu`, without the symbol ([`Self::name_rip`]).
    pub fn report(&self, vcpu: &VcpuFd, exit: UnexpectedExit) -> ExitReport {
        ExitReport::collect(vcpu, &self.memory, exit)
    }

    /// Names the kernel function at the report's RIP and those whose return addresses
    /// are on the stack of `vcpu` ([`stack_scan`]), when a System.map is known.
    pub fn name_rip(&self, vcpu: &VcpuFd, report: &mut ExitReport) {
        if let (Some(path), Ok(cpu)) = (&self.system_map, &report.cpu) {
            match SystemMap::load(path) {
                Ok(map) => {
                    report.symbol = Some(map.lookup(cpu.rip).map_or_else(|| "no symbol".into(), |s| s.to_string()));
                    let stack = stack_scan::read_stack(&self.memory, cpu.rsp, stack_scan::STACK_WORDS, |gva| {
                        vcpu.translate_gva(gva).ok().filter(|t| t.valid != 0).map(|t| t.physical_address)
                    });
                    report.callers = stack_scan::callers(&map, &stack);
                }
                Err(e) => report.symbol = Some(format!("no symbol: {e}")),
            }
        }
    }
}

/// What the loop does after an exit.
enum Flow {
    /// Enter the guest again.
    Resume,
    /// Leave the loop (the event is pushed).
    Stop,
    /// Leave the loop after reporting this exit.
    Unexpected(UnexpectedExit),
    /// Leave the loop after reporting `KVM_EXIT_INTERNAL_ERROR` (read from `kvm_run`).
    InternalError,
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
    /// `int3`s KVM's emulator stopped on that densevm delivered ([`int3`]).
    pub int3_delivered: u64,
    /// `fwait`s KVM's emulator stopped on that densevm completed ([`fwait`]).
    pub fwait_completed: u64,
    /// `ldmxcsr`/`stmxcsr`s KVM's emulator stopped on that densevm completed ([`mxcsr`]).
    pub mxcsr_completed: u64,
    /// User-mode `syscall`s KVM left half done that densevm completed
    /// ([`crate::arch::syscall_fixup`]).
    pub syscalls_completed: u64,
    /// Other guest page faults stepped over by the syscall completion's breakpoint.
    pub page_faults_stepped: u64,
}

/// A running vCPU thread.
pub struct VcpuThread {
    handle: JoinHandle<VcpuStats>,
}

impl VcpuThread {
    /// Spawns the thread that runs `vcpu`.
    pub fn spawn(vcpu: VcpuFd, ctx: VcpuContext) -> std::io::Result<Self> {
        let handle = std::thread::Builder::new().name(format!("vcpu{}", ctx.index)).spawn(move || {
            if let Some(hook) = THREAD_START.get() {
                hook();
            }
            run_loop(vcpu, ctx)
        })?;
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
    let mut fixup = ctx.complete_syscalls.then(SyscallFixup::new);
    while ctx.control.wait_runnable() {
        if let Some(f) = fixup.as_mut() {
            // Follows the guest's #PF handler as it sets up and changes its IDT.
            if let Err(e) = f.refresh(&vcpu, &ctx.diag.memory) {
                tracing::trace!(vcpu = ctx.index, "syscall fixup: IDT not readable yet: {e}");
            }
        }
        let exit = vcpu.run();
        ctx.control.left_guest();
        stats.exits += 1;
        match exit {
            Ok(exit) => {
                efault_since = None;
                let flow = match (exit, fixup.as_mut()) {
                    (VcpuExit::Debug(debug), Some(f)) => match f.on_debug(&vcpu, &ctx.diag.memory, &debug) {
                        Ok(DebugOutcome::Completed(entry)) => {
                            stats.syscalls_completed += 1;
                            tracing::trace!(vcpu = ctx.index, "completed a user syscall: {entry:x?}");
                            Flow::Resume
                        }
                        Ok(DebugOutcome::Stepping) => {
                            stats.page_faults_stepped += 1;
                            Flow::Resume
                        }
                        Ok(DebugOutcome::Rearmed) => Flow::Resume,
                        Ok(DebugOutcome::NotOurs) => {
                            Flow::Unexpected(UnexpectedExit::Other(format!("Debug({debug:?})")))
                        }
                        Err(e) => Flow::Unexpected(UnexpectedExit::Other(format!(
                            "Debug({debug:?}): completing a user syscall failed: {e}"
                        ))),
                    },
                    (exit, _) => handle_exit(exit, &ctx, &mut stats),
                };
                let unexpected = match flow {
                    Flow::Resume => continue,
                    Flow::Stop => break,
                    Flow::InternalError => read_internal_error(&mut vcpu),
                    Flow::Unexpected(exit) => exit,
                };
                let mut report = ctx.diag.report(&vcpu, unexpected);
                if int3::is_unemulated_int3(&report) {
                    match int3::deliver_int3(&vcpu) {
                        Ok(()) => {
                            stats.int3_delivered += 1;
                            tracing::debug!(
                                vcpu = ctx.index,
                                "delivered #BP for the int3 KVM could not emulate: {report}"
                            );
                            continue;
                        }
                        Err(e) => tracing::warn!(vcpu = ctx.index, "cannot deliver #BP for an int3: {e}"),
                    }
                }
                if fwait::is_unemulated_fwait(&report) {
                    match fwait::complete_fwait(&vcpu) {
                        Ok(outcome) => {
                            stats.fwait_completed += 1;
                            tracing::debug!(
                                vcpu = ctx.index,
                                "completed the fwait KVM could not emulate ({outcome:?}): {report}"
                            );
                            continue;
                        }
                        Err(e) => tracing::warn!(vcpu = ctx.index, "cannot complete an fwait: {e}"),
                    }
                }
                if let Some(insn) = mxcsr::unemulated_mxcsr(&report) {
                    match mxcsr::complete(&vcpu, &ctx.diag.memory, &insn) {
                        Ok(outcome) => {
                            stats.mxcsr_completed += 1;
                            tracing::debug!(
                                vcpu = ctx.index,
                                "completed the {:?} KVM could not emulate ({outcome:?}): {report}",
                                insn.op
                            );
                            continue;
                        }
                        Err(e) => tracing::warn!(vcpu = ctx.index, "cannot complete an ldmxcsr/stmxcsr: {e}"),
                    }
                }
                ctx.diag.name_rip(&vcpu, &mut report);
                let event = match report.exit {
                    // The guest's own doing: a shutdown, as before, with the details.
                    UnexpectedExit::Shutdown => {
                        VcpuEvent::Shutdown { vcpu: ctx.index, reason: format!("guest shut down: {report}") }
                    }
                    _ => VcpuEvent::Error { vcpu: ctx.index, message: report.to_string() },
                };
                ctx.control.push_event(event);
                break;
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
    if stats.syscalls_completed > 0 || stats.page_faults_stepped > 0 {
        tracing::info!(
            vcpu = ctx.index,
            "completed {} user syscalls that KVM left half done (stepped over {} other page faults)",
            stats.syscalls_completed,
            stats.page_faults_stepped
        );
    }
    ctx.control.unregister_thread();
    stats
}

/// Handles one exit.
fn handle_exit(exit: VcpuExit, ctx: &VcpuContext, stats: &mut VcpuStats) -> Flow {
    match exit {
        VcpuExit::MmioWrite(addr, data) => {
            if ctx.io.is_doorbell(addr) {
                stats.doorbells += 1;
            }
            match ctx.io.mmio_write(ctx.index, addr, data) {
                ExitAction::Resume => Flow::Resume,
                _ => Flow::Stop,
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            ctx.io.mmio_read(addr, data);
            Flow::Resume
        }
        VcpuExit::IoOut(port, data) => {
            ctx.io.pio_write(port, data);
            Flow::Resume
        }
        VcpuExit::IoIn(port, data) => {
            ctx.io.pio_read(port, data);
            Flow::Resume
        }
        VcpuExit::Hlt => {
            ctx.control.push_event(VcpuEvent::Shutdown { vcpu: ctx.index, reason: "halted".into() });
            Flow::Stop
        }
        VcpuExit::SystemEvent(kind, _) => {
            ctx.control.push_event(VcpuEvent::Shutdown { vcpu: ctx.index, reason: format!("system event {kind}") });
            Flow::Stop
        }
        VcpuExit::Shutdown => Flow::Unexpected(UnexpectedExit::Shutdown),
        VcpuExit::InternalError => Flow::InternalError,
        VcpuExit::FailEntry(reason, cpu) => Flow::Unexpected(UnexpectedExit::FailEntry { reason, cpu }),
        other => Flow::Unexpected(UnexpectedExit::Other(format!("{other:?}"))),
    }
}
