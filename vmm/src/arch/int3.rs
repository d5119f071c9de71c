//! Completes an `int3` that KVM's instruction emulator stopped on.
//!
//! Where KVM emulates guest-kernel code (kvm_pvm), an `int3` at CPL 0 goes to KVM's
//! x86 emulator, which cannot deliver software interrupts outside real mode
//! (`emulate_int` returns X86EMUL_UNHANDLEABLE in protected and long mode): it
//! queues #UD and exits with `KVM_EXIT_INTERNAL_ERROR`. Linux executes one on every
//! boot: `int3_selftest()` in `alternative_instructions()` (the Debian 6.1 kernel
//! stopped at `int3_selftest_ip+0x0` at guest time 207 s), and int3 is how it
//! patches live code. densevm does what the CPU does for `int3`: a #BP trap with
//! RIP past the instruction, through the guest's IDT (`KVM_SET_VCPU_EVENTS`,
//! replacing the #UD KVM queued).

use kvm_bindings::KVM_VCPUEVENT_VALID_PAYLOAD;
use kvm_ioctls::VcpuFd;

use super::exit_report::ExitReport;

/// Opcode of `int3`.
pub const INT3: u8 = 0xcc;
/// Vector of the breakpoint exception (#BP).
pub const BP_VECTOR: u8 = 3;

/// True when `report` is an emulation failure on an `int3` at CPL 0.
pub fn is_unemulated_int3(report: &ExitReport) -> bool {
    report.kernel_emulation_failure_opcode() == Some(INT3)
}

/// Delivers the #BP trap of the `int3` at RIP of `vcpu`: RIP moves past it and the
/// exception replaces the one KVM queued.
pub fn deliver_int3(vcpu: &VcpuFd) -> Result<(), String> {
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    let mut events = vcpu.get_vcpu_events().map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
    regs.rip = regs.rip.wrapping_add(1);
    events.exception.injected = 1;
    events.exception.pending = 0;
    events.exception.nr = BP_VECTOR;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    events.exception_has_payload = 0;
    events.exception_payload = 0;
    events.flags &= !KVM_VCPUEVENT_VALID_PAYLOAD;
    vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    vcpu.set_vcpu_events(&events).map_err(|e| format!("KVM_SET_VCPU_EVENTS: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::exit_report::test_report as report;
    use crate::arch::exit_report::UnexpectedExit;

    #[test]
    fn only_kernel_int3_emulation_failures() {
        assert!(is_unemulated_int3(&report(1, 0, &[0xcc, 0x90])));
        assert!(!is_unemulated_int3(&report(1, 3, &[0xcc])), "user mode");
        assert!(!is_unemulated_int3(&report(3, 0, &[0xcc])), "not an emulation failure");
        assert!(!is_unemulated_int3(&report(1, 0, &[0x0f, 0x0b])), "not int3");
        assert!(!is_unemulated_int3(&report(1, 0, &[])), "no code");
        let shutdown = ExitReport { exit: UnexpectedExit::Shutdown, ..report(1, 0, &[0xcc]) };
        assert!(!is_unemulated_int3(&shutdown));
    }
}
