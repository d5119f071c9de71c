//! Completes an `fwait` that KVM's instruction emulator stopped on.
//!
//! Where KVM emulates guest-kernel code (kvm_pvm), an `fwait` (`9b`) at CPL 0 goes
//! to KVM's x86 emulator, which has no entry for it: it queues #UD and exits with
//! `KVM_EXIT_INTERNAL_ERROR`. Linux runs one on every task exit (`fpu__drop`),
//! so the Debian 6.1 kernel stopped there at guest time 213 s, right after SMP
//! bring-up. densevm does what the CPU does: with an unmasked x87 exception
//! pending (FSW.ES set) `fwait` raises #MF (CR0.NE set: the kernels densevm boots
//! run with it) at the `fwait` itself; otherwise it is a no-op and RIP moves past
//! it. Either way the #UD KVM queued is replaced.

use kvm_bindings::KVM_VCPUEVENT_VALID_PAYLOAD;
use kvm_ioctls::VcpuFd;

use super::exit_report::ExitReport;

/// Opcode of `fwait` (`wait`).
pub const FWAIT: u8 = 0x9b;
/// Vector of the x87 floating-point exception (#MF).
pub const MF_VECTOR: u8 = 16;
/// FSW's exception summary bit: an unmasked x87 exception is pending.
const FSW_ES: u16 = 1 << 7;

/// What completing the `fwait` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FwaitOutcome {
    /// No x87 exception pending: RIP moved past the `fwait`.
    Stepped,
    /// An unmasked x87 exception was pending: #MF delivered at the `fwait`.
    RaisedMf,
}

/// True when `report` is an emulation failure on an `fwait` at CPL 0.
pub fn is_unemulated_fwait(report: &ExitReport) -> bool {
    report.kernel_emulation_failure_opcode() == Some(FWAIT)
}

/// The outcome an `fwait` has with x87 status word `fsw`.
pub fn outcome(fsw: u16) -> FwaitOutcome {
    if fsw & FSW_ES != 0 {
        FwaitOutcome::RaisedMf
    } else {
        FwaitOutcome::Stepped
    }
}

/// Completes the `fwait` at RIP of `vcpu` as the CPU would (see the module).
pub fn complete_fwait(vcpu: &VcpuFd) -> Result<FwaitOutcome, String> {
    let fpu = vcpu.get_fpu().map_err(|e| format!("KVM_GET_FPU: {e}"))?;
    let mut events = vcpu.get_vcpu_events().map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
    let result = outcome(fpu.fsw);
    events.exception.pending = 0;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    events.exception_has_payload = 0;
    events.exception_payload = 0;
    events.flags &= !KVM_VCPUEVENT_VALID_PAYLOAD;
    match result {
        FwaitOutcome::Stepped => {
            let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
            regs.rip = regs.rip.wrapping_add(1);
            events.exception.injected = 0;
            events.exception.nr = 0;
            vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        }
        FwaitOutcome::RaisedMf => {
            // A fault: RIP stays at the fwait.
            events.exception.injected = 1;
            events.exception.nr = MF_VECTOR;
        }
    }
    vcpu.set_vcpu_events(&events).map_err(|e| format!("KVM_SET_VCPU_EVENTS: {e}"))?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::exit_report::test_report as report;
    use crate::arch::exit_report::UnexpectedExit;

    #[test]
    fn only_kernel_fwait_emulation_failures() {
        assert!(is_unemulated_fwait(&report(1, 0, &[0x9b, 0x0f])));
        assert!(!is_unemulated_fwait(&report(1, 3, &[0x9b])), "user mode");
        assert!(!is_unemulated_fwait(&report(3, 0, &[0x9b])), "not an emulation failure");
        assert!(!is_unemulated_fwait(&report(1, 0, &[0xcc])), "not fwait");
        assert!(!is_unemulated_fwait(&report(1, 0, &[])), "no code");
        let shutdown = ExitReport { exit: UnexpectedExit::Shutdown, ..report(1, 0, &[0x9b]) };
        assert!(!is_unemulated_fwait(&shutdown));
    }

    #[test]
    fn pending_exception_raises_mf() {
        assert_eq!(outcome(0), FwaitOutcome::Stepped);
        assert_eq!(outcome(0x3800), FwaitOutcome::Stepped, "TOP bits only");
        assert_eq!(outcome(0x0081), FwaitOutcome::RaisedMf, "IE with ES");
    }
}
