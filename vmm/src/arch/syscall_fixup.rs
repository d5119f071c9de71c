//! Completes a guest user-mode `syscall` that kvm_pvm leaves half done.
//!
//! Measured here (vmm/tests/pvm_transitions.rs): for a guest that is not PVM-aware,
//! kvm_pvm carries out a CPL-3 `syscall` only in part. RCX gets the return address,
//! R11 the RFLAGS, RFLAGS is masked with IA32_FMASK and RIP becomes IA32_LSTAR, but
//! CS/SS and the privilege level stay those of user mode: the vCPU fetches the
//! handler at CPL 3, the fetch of the supervisor-only page faults, and the guest gets
//! a #PF (error code P|U|I-fetch, CR2 = RIP = LSTAR, CS = user CS) through its IDT.
//! Linux reports that as `segfault at <entry_SYSCALL_64> ... error 15` and kills the
//! task. Exceptions from CPL 3 are delivered correctly (a #PF from user code reaches
//! its handler at CPL 0 and `iretq` returns), so the VMM can finish the job there.
//!
//! kvm_pvm does not exit to the VMM for that #PF, and hardware breakpoints set with
//! `KVM_SET_GUEST_DEBUG` do not fire in natively run CPL-3 code; they do fire in
//! emulated ring-0 code. So densevm puts an execute breakpoint on the guest's #PF
//! handler (IDT vector 14, re-read as the guest changes its IDT). When it fires and
//! the exception frame is that half-done `syscall` (user CS, RIP = CR2 = LSTAR, a
//! user instruction fetch, RFLAGS = R11 masked by IA32_FMASK: see
//! [`is_half_done_syscall`] for why a user jump to LSTAR does not pass), densevm drops
//! the frame and completes the instruction as
//! the CPU does: CS = IA32_STAR[47:32] (DPL 0), SS = that + 8, RIP = LSTAR, RSP and
//! RFLAGS from the frame (already masked; RF cleared), RCX/R11 as kvm_pvm set them.
//! Any other #PF is stepped over (single step without the breakpoint, then re-armed:
//! the host-debug breakpoint ignores RFLAGS.RF), so it costs two extra exits.

use kvm_bindings::{
    kvm_debug_exit_arch, kvm_guest_debug, kvm_msr_entry, Msrs, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// IA32_STAR.
pub const MSR_STAR: u32 = 0xc000_0081;
/// IA32_LSTAR.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// IA32_FMASK.
pub const MSR_FMASK: u32 = 0xc000_0084;
/// Page-fault vector.
pub const PF_VECTOR: u64 = 14;
/// #PF error code: the access was from user mode.
pub const PF_USER: u64 = 1 << 2;
/// #PF error code: the access was an instruction fetch.
pub const PF_FETCH: u64 = 1 << 4;
/// RFLAGS.RF.
pub const RFLAGS_RF: u64 = 1 << 16;
/// DR7 enabling breakpoint 0 locally, execute, 1 byte (bit 10 reads as 1).
pub const DR7_EXEC_BP0: u64 = 0x401;
/// DR6 bit of a single-step trap.
pub const DR6_BS: u64 = 1 << 14;

/// Errors of the syscall completion.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A vCPU ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// The MSR list for KVM_GET_MSRS could not be built, or KVM read fewer MSRs.
    #[error("cannot read IA32_STAR, IA32_LSTAR and IA32_FMASK")]
    Msrs,
    /// A guest virtual address did not translate.
    #[error("guest address {0:#x} is not mapped")]
    Unmapped(u64),
    /// Guest memory could not be read.
    #[error("reading guest memory at {gpa:#x}: {source}")]
    Memory {
        /// Guest-physical address.
        gpa: u64,
        /// Cause.
        source: vm_memory::GuestMemoryError,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// The frame the CPU pushes for a #PF: error code, RIP, CS, RFLAGS, RSP, SS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PfFrame {
    /// Error code.
    pub error_code: u64,
    /// Faulting RIP.
    pub rip: u64,
    /// CS at the fault.
    pub cs: u64,
    /// RFLAGS at the fault.
    pub rflags: u64,
    /// RSP at the fault.
    pub rsp: u64,
    /// SS at the fault.
    pub ss: u64,
}

impl PfFrame {
    /// The frame from the six quadwords at the handler's RSP.
    pub fn from_words(w: [u64; 6]) -> Self {
        PfFrame { error_code: w[0], rip: w[1], cs: w[2], rflags: w[3], rsp: w[4], ss: w[5] }
    }
}

/// The syscall MSRs the completion reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyscallMsrs {
    /// IA32_STAR.
    pub star: u64,
    /// IA32_LSTAR.
    pub lstar: u64,
    /// IA32_FMASK.
    pub fmask: u64,
}

/// True when `frame` (with CR2 `cr2` and R11 `r11`) is the #PF kvm_pvm raises for a
/// half-done user `syscall`: a user-mode instruction fetch at LSTAR, from a user CS,
/// with RFLAGS = R11 masked by FMASK (RF aside, which the fault sets). The last
/// condition tells it from user code that jumps to LSTAR itself: that fault's RFLAGS
/// are not masked, and with IF in FMASK (as Linux sets it) CPL-3 code cannot clear
/// IF to fake it, so it cannot enter the kernel with RFLAGS or R11 of its choosing.
pub fn is_half_done_syscall(frame: &PfFrame, cr2: u64, r11: u64, msrs: &SyscallMsrs) -> bool {
    let lstar = msrs.lstar;
    lstar != 0
        && frame.rip == lstar
        && cr2 == lstar
        && frame.cs & 3 == 3
        && frame.error_code & (PF_USER | PF_FETCH) == PF_USER | PF_FETCH
        && frame.rflags & !RFLAGS_RF == r11 & !msrs.fmask & !RFLAGS_RF
}

/// Where and how the CPU is after a completed `syscall`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyscallEntry {
    /// RIP (LSTAR).
    pub rip: u64,
    /// RSP (unchanged by `syscall`: the user's).
    pub rsp: u64,
    /// RFLAGS (masked by kvm_pvm already; RF cleared).
    pub rflags: u64,
    /// Kernel CS selector (STAR[47:32], RPL 0).
    pub cs: u16,
    /// Kernel SS selector (CS + 8).
    pub ss: u16,
}

/// The state `syscall` would have produced, from the #PF frame and IA32_STAR.
pub fn completed_entry(frame: &PfFrame, star: u64, lstar: u64) -> SyscallEntry {
    let cs = ((star >> 32) as u16) & !3;
    SyscallEntry { rip: lstar, rsp: frame.rsp, rflags: frame.rflags & !RFLAGS_RF, cs, ss: cs.wrapping_add(8) }
}

/// Handler address of a present 64-bit IDT gate, or `None`.
pub fn gate_target(gate: &[u8; 16]) -> Option<u64> {
    if gate[5] & 0x80 == 0 {
        return None;
    }
    let lo = u64::from(u16::from_le_bytes([gate[0], gate[1]]));
    let mid = u64::from(u16::from_le_bytes([gate[6], gate[7]]));
    let hi = u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]));
    Some(lo | (mid << 16) | (hi << 32))
}

/// What a debug exit was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugOutcome {
    /// A half-done `syscall`: completed, the guest resumes at LSTAR at CPL 0.
    Completed(SyscallEntry),
    /// Another #PF: single-stepping past the handler's first instruction.
    Stepping,
    /// The step ended: the breakpoint is armed again.
    Rearmed,
    /// Not a debug exit this module asked for.
    NotOurs,
}

/// Per-vCPU state of the syscall completion.
#[derive(Debug, Default)]
pub struct SyscallFixup {
    breakpoint: Option<u64>,
    stepping: bool,
    /// Syscalls completed.
    pub completed: u64,
    /// Other page faults stepped over.
    pub stepped: u64,
}

fn translate(vcpu: &VcpuFd, gva: u64) -> Result<u64, Error> {
    let t = vcpu.translate_gva(gva).map_err(kvm("KVM_TRANSLATE"))?;
    if t.valid == 0 {
        return Err(Error::Unmapped(gva));
    }
    Ok(t.physical_address)
}

fn read_u64<M: GuestMemoryBackend>(vcpu: &VcpuFd, mem: &M, gva: u64) -> Result<u64, Error> {
    let gpa = translate(vcpu, gva)?;
    mem.read_obj(GuestAddress(gpa)).map_err(|source| Error::Memory { gpa, source })
}

fn set_debug(vcpu: &VcpuFd, breakpoint: Option<u64>, step: bool) -> Result<(), Error> {
    let mut dbg = kvm_guest_debug { control: KVM_GUESTDBG_ENABLE, ..Default::default() };
    if let Some(addr) = breakpoint {
        dbg.control |= KVM_GUESTDBG_USE_HW_BP;
        dbg.arch.debugreg[0] = addr;
        dbg.arch.debugreg[7] = DR7_EXEC_BP0;
    }
    if step {
        dbg.control |= KVM_GUESTDBG_SINGLESTEP;
    }
    vcpu.set_guest_debug(&dbg).map_err(kvm("KVM_SET_GUEST_DEBUG"))
}

fn read_msrs(vcpu: &VcpuFd) -> Result<SyscallMsrs, Error> {
    let entries = [MSR_STAR, MSR_LSTAR, MSR_FMASK].map(|index| kvm_msr_entry { index, ..Default::default() });
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::Msrs)?;
    if vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))? != entries.len() {
        return Err(Error::Msrs);
    }
    let s = msrs.as_slice();
    Ok(SyscallMsrs { star: s[0].data, lstar: s[1].data, fmask: s[2].data })
}

impl SyscallFixup {
    /// A fixup with no breakpoint yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The #PF handler address the breakpoint is on.
    pub fn breakpoint(&self) -> Option<u64> {
        self.breakpoint
    }

    /// Puts the breakpoint on the guest's current #PF handler (IDT vector 14) if it
    /// moved. Cheap when nothing changed (KVM_GET_SREGS, one translation, one read).
    pub fn refresh<M: GuestMemoryBackend>(&mut self, vcpu: &VcpuFd, mem: &M) -> Result<(), Error> {
        if self.stepping {
            return Ok(());
        }
        let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        if u64::from(sregs.idt.limit) < PF_VECTOR * 16 + 15 {
            return Ok(());
        }
        let gate_va = sregs.idt.base.wrapping_add(PF_VECTOR * 16);
        let gpa = translate(vcpu, gate_va)?;
        let mut gate = [0u8; 16];
        mem.read_slice(&mut gate, GuestAddress(gpa)).map_err(|source| Error::Memory { gpa, source })?;
        let target = gate_target(&gate);
        if target != self.breakpoint {
            set_debug(vcpu, target, false)?;
            tracing::debug!(target = ?target.map(|t| format!("{t:#x}")), "syscall fixup: #PF handler breakpoint");
            self.breakpoint = target;
        }
        Ok(())
    }

    /// Handles a `KVM_EXIT_DEBUG` (see the module).
    pub fn on_debug<M: GuestMemoryBackend>(
        &mut self,
        vcpu: &VcpuFd,
        mem: &M,
        exit: &kvm_debug_exit_arch,
    ) -> Result<DebugOutcome, Error> {
        if self.stepping {
            if exit.dr6 & DR6_BS == 0 {
                return Ok(DebugOutcome::NotOurs);
            }
            self.stepping = false;
            set_debug(vcpu, self.breakpoint, false)?;
            return Ok(DebugOutcome::Rearmed);
        }
        if self.breakpoint != Some(exit.pc) {
            return Ok(DebugOutcome::NotOurs);
        }
        let mut regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let mut words = [0u64; 6];
        for (i, w) in words.iter_mut().enumerate() {
            *w = read_u64(vcpu, mem, regs.rsp.wrapping_add(8 * i as u64))?;
        }
        let frame = PfFrame::from_words(words);
        let msrs = read_msrs(vcpu)?;
        if !is_half_done_syscall(&frame, sregs.cr2, regs.r11, &msrs) {
            self.stepping = true;
            self.stepped += 1;
            set_debug(vcpu, None, true)?;
            return Ok(DebugOutcome::Stepping);
        }
        let entry = completed_entry(&frame, msrs.star, msrs.lstar);
        sregs.cs.selector = entry.cs;
        sregs.cs.dpl = 0;
        sregs.cs.l = 1;
        sregs.cs.db = 0;
        sregs.cs.type_ = 11;
        sregs.ss.selector = entry.ss;
        sregs.ss.dpl = 0;
        sregs.ss.type_ = 3;
        regs.rip = entry.rip;
        regs.rsp = entry.rsp;
        regs.rflags = entry.rflags;
        vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
        self.completed += 1;
        Ok(DebugOutcome::Completed(entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LSTAR: u64 = 0xffff_ffff_8120_0040;

    fn frame(error_code: u64, rip: u64, cs: u64) -> PfFrame {
        PfFrame::from_words([error_code, rip, cs, 0x1_0046, 0x7fff_ed5d_f3c0, 0x2b])
    }

    const MSRS: SyscallMsrs = SyscallMsrs { star: (0x23 << 48) | (0x10 << 32), lstar: LSTAR, fmask: 0x47700 };
    /// RFLAGS of the user code at the `syscall` (IF set), so R11.
    const USER_RFLAGS: u64 = 0x246;

    #[test]
    fn recognizes_the_half_done_syscall() {
        // What the Linux guest reported: error 0x15 (P|U|fetch) at entry_SYSCALL_64,
        // RFLAGS masked (IF cleared), RF set by the fault.
        let ok = |f: &PfFrame| is_half_done_syscall(f, LSTAR, USER_RFLAGS, &MSRS);
        assert!(ok(&frame(0x15, LSTAR, 0x33)));
        assert!(ok(&frame(0x14, LSTAR, 0x33)), "not-present page");
        assert!(!ok(&frame(0x15, LSTAR, 0x10)), "kernel CS");
        assert!(!ok(&frame(0x05, LSTAR, 0x33)), "data read");
        assert!(!ok(&frame(0x11, LSTAR, 0x33)), "supervisor access");
        assert!(!ok(&frame(0x15, LSTAR + 4, 0x33)), "other RIP");
        assert!(!is_half_done_syscall(&frame(0x15, LSTAR, 0x33), 0x1000, USER_RFLAGS, &MSRS), "other CR2");
        let no_lstar = SyscallMsrs { lstar: 0, ..MSRS };
        assert!(!is_half_done_syscall(&frame(0x15, 0, 0x33), 0, USER_RFLAGS, &no_lstar), "no LSTAR");
    }

    #[test]
    fn a_user_jump_to_lstar_is_not_a_syscall() {
        // `jmp LSTAR` at CPL 3: the same fault, but RFLAGS not masked (IF still set),
        // whatever the user put in R11.
        let mut jumped = frame(0x15, LSTAR, 0x33);
        jumped.rflags = 0x1_0246;
        for r11 in [USER_RFLAGS, 0x3246, 0x246 & !0x200, 0x1_0246] {
            assert!(!is_half_done_syscall(&jumped, LSTAR, r11, &MSRS), "r11 {r11:#x}");
        }
        // A real syscall's R11 may differ from the frame only in FMASK's bits (IOPL 3
        // after iopl(3), say); in any other bit the fault was not a syscall.
        assert!(is_half_done_syscall(&frame(0x15, LSTAR, 0x33), LSTAR, 0x3246, &MSRS));
        assert!(!is_half_done_syscall(&frame(0x15, LSTAR, 0x33), LSTAR, 0x247, &MSRS), "CF");
    }

    #[test]
    fn completes_like_the_cpu() {
        let star = (0x23u64 << 48) | (0x10 << 32);
        let e = completed_entry(&frame(0x15, LSTAR, 0x33), star, LSTAR);
        assert_eq!(
            e,
            SyscallEntry { rip: LSTAR, rsp: 0x7fff_ed5d_f3c0, rflags: 0x46, cs: 0x10, ss: 0x18 },
            "RF cleared, kernel CS/SS from STAR, user RSP kept"
        );
        // An RPL in STAR's kernel field is dropped (the CPU forces RPL 0).
        assert_eq!(completed_entry(&frame(0x15, LSTAR, 0x33), 0x13u64 << 32, LSTAR).cs, 0x10);
    }

    #[test]
    fn reads_gate_targets() {
        let mut g = [0u8; 16];
        assert_eq!(gate_target(&g), None, "not present");
        g[0..2].copy_from_slice(&0x1234u16.to_le_bytes());
        g[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        g[5] = 0x8e;
        g[6..8].copy_from_slice(&0x8120u16.to_le_bytes());
        g[8..12].copy_from_slice(&0xffff_ffffu32.to_le_bytes());
        assert_eq!(gate_target(&g), Some(0xffff_ffff_8120_1234));
    }
}
