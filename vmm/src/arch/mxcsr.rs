//! Completes an `ldmxcsr`/`stmxcsr` that KVM's instruction emulator stopped on.
//!
//! Where KVM emulates guest-kernel code (kvm_pvm), SSE's control-register loads and
//! stores at CPL 0 go to KVM's x86 emulator, whose group 15 (`0f ae`) has only
//! FXSAVE, FXRSTOR and CLFLUSH: it queues #UD and exits with
//! `KVM_EXIT_INTERNAL_ERROR`. Linux runs `ldmxcsr` in `kernel_fpu_begin_mask` (it
//! loads the default MXCSR before kernel SIMD code); the Debian 6.1 kernel stopped
//! there at guest time 359 s, at the initramfs unpacking. densevm does what the CPU
//! does: it decodes the memory operand ([`super::modrm`]), translates its address
//! (`KVM_TRANSLATE`), moves the 32-bit value between guest memory and MXCSR
//! (`KVM_GET_FPU`/`KVM_SET_FPU`) and moves RIP past the instruction; an `ldmxcsr`
//! of a value with reserved bits set raises #GP(0) instead, as the CPU does. The
//! #UD KVM queued is replaced either way. Anything it cannot do as the CPU would
//! (CR0.TS or CR0.EM set, CR4.OSFXSR clear, an unmapped operand) is left as the
//! emulation failure it was.

use kvm_bindings::{kvm_fpu, KVM_VCPUEVENT_VALID_PAYLOAD};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::exit_report::ExitReport;
use super::modrm::{decode_0f_mem, Insn};

/// MXCSR bits a CPU with DAZ accepts (`MXCSR_MASK` of every x86-64 CPU KVM runs
/// on); `ldmxcsr` of a value with another bit set raises #GP(0).
pub const MXCSR_MASK: u32 = 0xffff;
/// Vector of the general-protection exception (#GP).
pub const GP_VECTOR: u8 = 13;
const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR4_OSFXSR: u64 = 1 << 9;

/// Which of the two instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MxcsrOp {
    /// `ldmxcsr m32` (`0f ae /2`): MXCSR from memory.
    Load,
    /// `stmxcsr m32` (`0f ae /3`): MXCSR to memory.
    Store,
}

/// A decoded `ldmxcsr`/`stmxcsr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MxcsrInsn {
    /// Load or store.
    pub op: MxcsrOp,
    /// The instruction (length and memory operand).
    pub insn: Insn,
}

/// What completing the instruction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MxcsrOutcome {
    /// MXCSR was loaded with this value; RIP moved past the instruction.
    Loaded(u32),
    /// This MXCSR value was stored; RIP moved past the instruction.
    Stored(u32),
    /// `ldmxcsr` of this value with reserved bits: #GP(0) delivered at it.
    RaisedGp(u32),
}

/// Decodes `code` as `ldmxcsr`/`stmxcsr` (legacy encoding, memory operand).
pub fn decode(code: &[u8]) -> Option<MxcsrInsn> {
    let insn = decode_0f_mem(code)?;
    let op = match (insn.opcode, insn.reg) {
        (0xae, 2) => MxcsrOp::Load,
        (0xae, 3) => MxcsrOp::Store,
        _ => return None,
    };
    Some(MxcsrInsn { op, insn })
}

/// The `ldmxcsr`/`stmxcsr` of `report` when it is an emulation failure at CPL 0 on
/// one of them.
pub fn unemulated_mxcsr(report: &ExitReport) -> Option<MxcsrInsn> {
    decode(report.kernel_emulation_failure_code()?)
}

/// True when the CPU would run SSE instructions with control registers `cr0`/`cr4`
/// (otherwise it raises #UD or #NM, which densevm leaves to the report).
pub fn sse_enabled(cr0: u64, cr4: u64) -> bool {
    cr0 & (CR0_EM | CR0_TS) == 0 && cr4 & CR4_OSFXSR != 0
}

/// The outcome of `ldmxcsr` of `value`.
pub fn load_outcome(value: u32) -> MxcsrOutcome {
    if value & !MXCSR_MASK != 0 {
        MxcsrOutcome::RaisedGp(value)
    } else {
        MxcsrOutcome::Loaded(value)
    }
}

/// Guest-physical address of the 4-byte operand at `gva`, which must not cross a
/// page boundary into another frame (translated with `translate`).
fn operand_gpa(gva: u64, mut translate: impl FnMut(u64) -> Result<Option<u64>, String>) -> Result<u64, String> {
    let gpa = translate(gva)?.ok_or_else(|| format!("operand {gva:#x} is not mapped"))?;
    let last = gva.wrapping_add(3);
    if last & !0xfff != gva & !0xfff {
        let last_gpa = translate(last)?.ok_or_else(|| format!("operand end {last:#x} is not mapped"))?;
        if last_gpa != gpa + 3 {
            return Err(format!("operand {gva:#x} straddles two frames"));
        }
    }
    Ok(gpa)
}

/// Moves the value of `m` between guest memory `mem` (operand at `gpa`) and `fpu`.
pub fn apply<M: GuestMemoryBackend>(
    m: &MxcsrInsn,
    fpu: &mut kvm_fpu,
    mem: &M,
    gpa: u64,
) -> Result<MxcsrOutcome, String> {
    match m.op {
        MxcsrOp::Load => {
            let value: u32 = mem.read_obj(GuestAddress(gpa)).map_err(|e| format!("read gpa {gpa:#x}: {e}"))?;
            let outcome = load_outcome(value);
            if let MxcsrOutcome::Loaded(v) = outcome {
                fpu.mxcsr = v;
            }
            Ok(outcome)
        }
        MxcsrOp::Store => {
            mem.write_obj(fpu.mxcsr, GuestAddress(gpa)).map_err(|e| format!("write gpa {gpa:#x}: {e}"))?;
            Ok(MxcsrOutcome::Stored(fpu.mxcsr))
        }
    }
}

/// Completes `m` at RIP of `vcpu` (guest RAM `mem`) as the CPU would (see the module).
pub fn complete<M: GuestMemoryBackend>(vcpu: &VcpuFd, mem: &M, m: &MxcsrInsn) -> Result<MxcsrOutcome, String> {
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    let sregs = vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    if !sse_enabled(sregs.cr0, sregs.cr4) {
        return Err(format!("SSE not usable (cr0 {:#x} cr4 {:#x})", sregs.cr0, sregs.cr4));
    }
    let gva = m.insn.effective_address(&regs, sregs.fs.base, sregs.gs.base);
    let gpa = operand_gpa(gva, |va| {
        let t = vcpu.translate_gva(va).map_err(|e| format!("KVM_TRANSLATE {va:#x}: {e}"))?;
        Ok((t.valid != 0).then_some(t.physical_address))
    })?;
    let mut fpu = vcpu.get_fpu().map_err(|e| format!("KVM_GET_FPU: {e}"))?;
    let mut events = vcpu.get_vcpu_events().map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
    let outcome = apply(m, &mut fpu, mem, gpa)?;
    events.exception.pending = 0;
    events.exception_has_payload = 0;
    events.exception_payload = 0;
    events.flags &= !KVM_VCPUEVENT_VALID_PAYLOAD;
    if let MxcsrOutcome::RaisedGp(_) = outcome {
        // A fault: RIP stays at the instruction.
        events.exception.injected = 1;
        events.exception.nr = GP_VECTOR;
        events.exception.has_error_code = 1;
        events.exception.error_code = 0;
    } else {
        events.exception.injected = 0;
        events.exception.nr = 0;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        if m.op == MxcsrOp::Load {
            vcpu.set_fpu(&fpu).map_err(|e| format!("KVM_SET_FPU: {e}"))?;
        }
        regs.rip = regs.rip.wrapping_add(m.insn.len as u64);
        vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    }
    vcpu.set_vcpu_events(&events).map_err(|e| format!("KVM_SET_VCPU_EVENTS: {e}"))?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::exit_report::test_report as report;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn decodes_only_ldmxcsr_and_stmxcsr() {
        let ld = decode(&[0x0f, 0xae, 0x55, 0xfc]).unwrap();
        assert_eq!((ld.op, ld.insn.len), (MxcsrOp::Load, 4));
        let st = decode(&[0x0f, 0xae, 0x5c, 0x24, 0x04]).unwrap();
        assert_eq!((st.op, st.insn.len), (MxcsrOp::Store, 5));
        assert_eq!(decode(&[0x0f, 0xae, 0x08]), None, "fxrstor (/1)");
        assert_eq!(decode(&[0x0f, 0xae, 0x20]), None, "xsave (/4)");
        assert_eq!(decode(&[0x0f, 0xaf, 0x10]), None, "imul, not group 15");
        assert_eq!(decode(&[0xc5, 0xf8, 0xae, 0x10]), None, "VEX vldmxcsr");
    }

    #[test]
    fn only_kernel_emulation_failures() {
        let code = [0x0f, 0xae, 0x5c, 0x24, 0x04];
        assert!(unemulated_mxcsr(&report(1, 0, &code)).is_some());
        assert!(unemulated_mxcsr(&report(1, 3, &code)).is_none(), "user mode");
        assert!(unemulated_mxcsr(&report(3, 0, &code)).is_none(), "not an emulation failure");
        assert!(unemulated_mxcsr(&report(1, 0, &[0x9b])).is_none(), "fwait");
    }

    #[test]
    fn sse_must_be_on() {
        assert!(sse_enabled(0x8005_0033, 0x0020_06b0));
        assert!(!sse_enabled(0x8005_003b, 0x0020_06b0), "CR0.TS");
        assert!(!sse_enabled(0x8005_0037, 0x0020_06b0), "CR0.EM");
        assert!(!sse_enabled(0x8005_0033, 0x0020_04b0), "no CR4.OSFXSR");
    }

    #[test]
    fn load_and_store_move_the_value() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        let mut fpu = kvm_fpu { mxcsr: 0x1f80, ..Default::default() };
        let st = decode(&[0x0f, 0xae, 0x18]).unwrap();
        assert_eq!(apply(&st, &mut fpu, &mem, 0x100).unwrap(), MxcsrOutcome::Stored(0x1f80));
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x100)).unwrap(), 0x1f80);
        let ld = decode(&[0x0f, 0xae, 0x10]).unwrap();
        mem.write_obj(0x9fc0u32, GuestAddress(0x200)).unwrap();
        assert_eq!(apply(&ld, &mut fpu, &mem, 0x200).unwrap(), MxcsrOutcome::Loaded(0x9fc0));
        assert_eq!(fpu.mxcsr, 0x9fc0);
        // Reserved bits: #GP, MXCSR unchanged.
        mem.write_obj(0x1_1f80u32, GuestAddress(0x200)).unwrap();
        assert_eq!(apply(&ld, &mut fpu, &mem, 0x200).unwrap(), MxcsrOutcome::RaisedGp(0x1_1f80));
        assert_eq!(fpu.mxcsr, 0x9fc0);
        assert!(apply(&ld, &mut fpu, &mem, 0x1ffe).is_err(), "past guest RAM");
    }

    #[test]
    fn operand_across_pages() {
        let contiguous = |va: u64| -> Result<Option<u64>, String> { Ok(Some(va - 0x10000)) };
        assert_eq!(operand_gpa(0x10ffe, contiguous).unwrap(), 0xffe);
        let split = |va: u64| -> Result<Option<u64>, String> {
            Ok(match va & !0xfff {
                0x10000 => Some(0x5000 + (va & 0xfff)),
                0x11000 => Some(0x9000 + (va & 0xfff)),
                _ => None,
            })
        };
        assert_eq!(operand_gpa(0x10ff0, split).unwrap(), 0x5ff0);
        assert!(operand_gpa(0x10ffe, split).unwrap_err().contains("straddles"));
        assert!(operand_gpa(0x11ffe, split).unwrap_err().contains("not mapped"));
        assert!(operand_gpa(0x30000, split).unwrap_err().contains("not mapped"));
    }
}
