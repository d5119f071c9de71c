//! Starts a vCPU directly in 64-bit mode at CPL 3, the state that runs natively
//! under this platform's KVM (see DESIGN.md): long mode with paging, user code and
//! data segments, a present TSS, no IDT. Used by the workload guest.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;

/// CR0: PG | AM | WP | NE | ET | MP | PE.
pub const CR0: u64 = 0x8005_0033;
/// CR4: PAE | OSFXSR | OSXMMEXCPT.
pub const CR4: u64 = 0x20 | 0x200 | 0x400;
/// EFER: SCE | LME | LMA | NXE.
pub const EFER: u64 = 0xd01;
/// RFLAGS: IF and the reserved bit.
pub const RFLAGS: u64 = 0x202;
/// RFLAGS IOPL 3: port I/O allowed at CPL 3.
pub const RFLAGS_IOPL3: u64 = 3 << 12;

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_GET_SREGS failed.
    #[error("KVM_GET_SREGS: {0}")]
    GetSregs(kvm_ioctls::Error),
    /// KVM_SET_SREGS failed.
    #[error("KVM_SET_SREGS: {0}")]
    SetSregs(kvm_ioctls::Error),
    /// KVM_SET_REGS failed.
    #[error("KVM_SET_REGS: {0}")]
    SetRegs(kvm_ioctls::Error),
    /// KVM_SET_FPU failed.
    #[error("KVM_SET_FPU: {0}")]
    SetFpu(kvm_ioctls::Error),
}

/// Where and how a CPL-3 vCPU starts.
#[derive(Clone, Copy, Debug)]
pub struct Cpl3Start {
    /// Entry point.
    pub rip: u64,
    /// Initial stack pointer.
    pub rsp: u64,
    /// First argument (RDI).
    pub rdi: u64,
    /// PML4 address.
    pub cr3: u64,
    /// GDT base and number of entries.
    pub gdt: (u64, usize),
    /// TSS base and selector.
    pub tss: (u64, u16),
    /// Code and data selectors.
    pub selectors: (u16, u16),
    /// Allow port I/O (IOPL 3).
    pub io_privilege: bool,
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Computes the special registers of a CPL-3 start from the vCPU's current ones.
pub fn sregs(mut sregs: kvm_sregs, start: &Cpl3Start) -> kvm_sregs {
    let (cs, ds) = start.selectors;
    sregs.cs = segment(cs, true);
    let data = segment(ds, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: start.tss.0,
        limit: 103,
        selector: start.tss.1,
        type_: 11,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.ldt = kvm_segment { type_: 2, present: 1, unusable: 1, ..Default::default() };
    sregs.gdt.base = start.gdt.0;
    sregs.gdt.limit = (start.gdt.1 * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0;
    sregs.cr3 = start.cr3;
    sregs.cr4 = CR4;
    sregs.efer = EFER;
    sregs
}

/// Configures `vcpu` to start at CPL 3 in 64-bit mode.
pub fn configure(vcpu: &VcpuFd, start: &Cpl3Start) -> Result<(), Error> {
    let current = vcpu.get_sregs().map_err(Error::GetSregs)?;
    vcpu.set_sregs(&sregs(current, start)).map_err(Error::SetSregs)?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(Error::SetFpu)?;
    let regs = kvm_regs {
        rip: start.rip,
        rsp: start.rsp,
        rdi: start.rdi,
        rflags: RFLAGS | if start.io_privilege { RFLAGS_IOPL3 } else { 0 },
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(Error::SetRegs)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_segments_are_dpl3_long_mode() {
        let start = Cpl3Start {
            rip: 0x100000,
            rsp: 0xf0000,
            rdi: 0x40000,
            cr3: 0x8000,
            gdt: (0x1000, 10),
            tss: (0x2000, 0x40),
            selectors: (0x33, 0x2b),
            io_privilege: false,
        };
        let s = sregs(kvm_sregs::default(), &start);
        assert_eq!((s.cs.selector, s.cs.dpl, s.cs.l, s.cs.db), (0x33, 3, 1, 0));
        assert_eq!((s.ss.selector, s.ss.dpl, s.ss.db), (0x2b, 3, 1));
        assert_eq!((s.tr.selector, s.tr.type_, s.tr.present), (0x40, 11, 1));
        assert_eq!(s.gdt.limit, 79);
        assert_eq!((s.cr0, s.cr4, s.efer, s.cr3), (CR0, CR4, EFER, 0x8000));
    }
}
