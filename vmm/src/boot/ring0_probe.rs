//! Does this host's KVM run ring-0 (guest kernel) code natively?
//!
//! A stock Linux kernel boots under KVM only if it does. On VMX/SVM hosts it does; on
//! a software-assisted KVM such as `kvm_pvm` (which runs 64-bit CPL-3 code natively
//! but emulates ring-0 and real-mode code instruction by instruction) it does not.
//!
//! The probe looks at the loaded KVM modules and runs a tiny 64-bit ring-0 guest in a
//! throwaway VM: [`OUTER`] batches of [`INNER`] `dec ecx; jnz` iterations (5 million
//! in all), reporting each batch with an `out` to port 0xf4. Natively that takes a
//! few milliseconds; emulated it takes seconds or more, so the run is cut off at
//! [`BUDGET`] (the vCPU is kicked out of `KVM_RUN` with a signal if needed).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::linux::regs::{apply_boot_sregs, BOOT_GDT, BOOT_GDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR};

/// Iterations of the guest's inner loop between two reports.
pub const INNER: u32 = 10_000;
/// Number of reports (batches) the guest makes.
pub const OUTER: u64 = 500;
/// Time allowed for all batches; above it ring 0 is not native.
pub const BUDGET: Duration = Duration::from_millis(2000);
/// Below this the run counts as native (natively it takes ~5 ms; 100x margin for a
/// loaded or nested host).
pub const NATIVE_LIMIT: Duration = Duration::from_millis(500);

const MEM_SIZE: usize = 2 << 20;
const CODE_ADDR: u64 = 0x4000;
const REPORT_PORT: u16 = 0xf4;

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring0Probe {
    /// Ring-0 guest code runs natively: a stock Linux kernel can boot.
    pub native: bool,
    /// Why, in words (module seen, time measured).
    pub reason: String,
    /// Loop iterations the guest completed.
    pub iterations: u64,
    /// Wall time of the guest loop.
    pub elapsed: Duration,
}

/// `Ok(true)` if ring-0 guests run natively; `Err` with a reason if the probe itself
/// could not run (no /dev/kvm...).
pub fn ring0_runs_natively() -> Result<bool, String> {
    probe().map(|p| p.native)
}

/// KVM modules loaded that tell the kind of KVM (`kvm_pvm`, `kvm_intel`, `kvm_amd`).
pub fn kvm_modules() -> Vec<&'static str> {
    ["kvm_pvm", "kvm_intel", "kvm_amd"]
        .into_iter()
        .filter(|m| std::path::Path::new("/sys/module").join(m).exists())
        .collect()
}

/// Runs the probe: module check plus the timed ring-0 loop.
pub fn probe() -> Result<Ring0Probe, String> {
    let modules = kvm_modules();
    let (iterations, elapsed) = run_ring0_loop()?;
    let total = u64::from(INNER) * OUTER;
    let fast = iterations == total && elapsed <= NATIVE_LIMIT;
    let pvm = modules.contains(&"kvm_pvm");
    let rate = iterations as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6;
    let measured = format!(
        "a ring-0 guest loop ran {iterations} of {total} iterations in {:.1} ms ({rate:.1} M/s)",
        elapsed.as_secs_f64() * 1e3
    );
    let native = fast && !pvm;
    let reason = if pvm {
        format!(
            "KVM here is kvm_pvm (software-assisted: ring-0 guest code is emulated, so stock \
             Linux kernels boot in minutes, with densevm completing the user system calls KVM \
             leaves half done); {measured}"
        )
    } else if native {
        format!("ring-0 guest code runs natively (KVM modules: {modules:?}); {measured}")
    } else {
        format!(
            "ring-0 guest code is too slow to be native (limit {} ms; KVM modules: \
             {modules:?}); {measured}",
            NATIVE_LIMIT.as_millis()
        )
    };
    tracing::debug!(native, "ring-0 probe: {reason}");
    Ok(Ring0Probe { native, reason, iterations, elapsed })
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Anonymous guest RAM, unmapped on drop (after the VM that uses it).
struct GuestRam {
    ptr: *mut u8,
}

impl GuestRam {
    fn new() -> Result<Self, String> {
        // SAFETY: anonymous private mapping, no address hint; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(Self { ptr: ptr.cast() })
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) {
        let start = addr as usize;
        assert!(start + bytes.len() <= MEM_SIZE, "probe layout out of bounds");
        // SAFETY: the range is inside the MEM_SIZE mapping owned by self (checked above),
        // and the guest is not running yet.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(start), bytes.len()) };
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: ptr/MEM_SIZE is the mapping made in new(); nothing uses it after drop.
        unsafe { libc::munmap(self.ptr.cast(), MEM_SIZE) };
    }
}

/// The guest: `outer: mov ecx, INNER; inner: dec ecx; jnz inner; out 0xf4, al; jmp outer`.
fn guest_code() -> Vec<u8> {
    let mut code = vec![0xb9];
    code.extend_from_slice(&INNER.to_le_bytes());
    code.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc, 0xe6, REPORT_PORT as u8, 0xeb, 0xf3]);
    code
}

/// Runs the ring-0 loop in a throwaway VM; returns (iterations done, elapsed).
fn run_ring0_loop() -> Result<(u64, Duration), String> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let mut ram = GuestRam::new()?;
    for (i, e) in BOOT_GDT.iter().enumerate() {
        ram.write(BOOT_GDT_ADDR + 8 * i as u64, &e.to_le_bytes());
    }
    ram.write(PML4_ADDR, &(PDPT_ADDR | 3).to_le_bytes());
    ram.write(PDPT_ADDR, &(PD_ADDR | 3).to_le_bytes());
    ram.write(PD_ADDR, &0x83u64.to_le_bytes()); // first 2 MiB, present+writable+large
    ram.write(CODE_ADDR, &guest_code());

    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: ram.ptr as u64,
    };
    // SAFETY: the region is a live mapping of MEM_SIZE bytes that outlives the VM
    // (`ram` is declared before `vm`, so it is dropped after it).
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
    vcpu.set_cpuid2(&cpuid).map_err(|e| format!("KVM_SET_CPUID2: {e}"))?;
    let mut sregs = vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    apply_boot_sregs(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let regs = kvm_regs { rip: CODE_ADDR, rsp: 0x8000, rflags: 2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))?;

    let kick = SIGRTMIN() + 6;
    register_signal_handler(kick, kick_handler).map_err(|e| format!("sigaction: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let thread_stop = stop.clone();
    let handle = std::thread::Builder::new()
        .name("ring0-probe".into())
        .spawn(move || {
            let start = Instant::now();
            let mut batches = 0u64;
            let outcome = loop {
                if batches == OUTER || thread_stop.load(Ordering::Acquire) {
                    break Ok(());
                }
                match vcpu.run() {
                    Ok(VcpuExit::IoOut(REPORT_PORT, _)) => batches += 1,
                    Ok(VcpuExit::Intr) => {}
                    Ok(other) => break Err(format!("unexpected exit {other:?}")),
                    Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                    Err(e) => break Err(format!("KVM_RUN: {e}")),
                }
            };
            let _ = tx.send(outcome.map(|()| (batches * u64::from(INNER), start.elapsed())));
        })
        .map_err(|e| format!("spawn: {e}"))?;

    let deadline = Instant::now() + BUDGET;
    let result = loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait.max(Duration::from_millis(20))) {
            Ok(r) => break r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Over budget: ask the vCPU thread to stop and kick it out of KVM_RUN;
                // repeat until it answers (a kick between two runs is lost).
                stop.store(true, Ordering::Release);
                let _ = handle.kill(kick);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break Err("probe vCPU thread died".to_string()),
        }
    };
    let _ = handle.join();
    drop(vm);
    drop(ram);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_code_encodes_the_loop() {
        let code = guest_code();
        assert_eq!(code.len(), 13);
        // jnz jumps back to `dec ecx` at 5, jmp back to 0.
        assert_eq!(9 + (code[8] as i8) as i64, 5);
        assert_eq!(13 + (code[12] as i8) as i64, 0);
    }

    #[test]
    fn boot_ring0_probe_reports_reason() {
        if !std::path::Path::new("/dev/kvm").exists() {
            crate::boot::linux::tests::skip("boot_ring0_probe_reports_reason: no /dev/kvm");
            return;
        }
        let p = probe().expect("probe runs");
        // What the probe found is in every assertion's message (the probe itself logs
        // it through `tracing` at debug level).
        assert!(!p.reason.is_empty(), "{p:?}");
        assert!(p.elapsed < BUDGET + Duration::from_secs(5), "{p:?}");
        if kvm_modules().contains(&"kvm_pvm") {
            assert!(!p.native, "{p:?}");
        }
    }
}
