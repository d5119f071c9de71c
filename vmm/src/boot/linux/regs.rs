//! The 64-bit boot CPU state of the Linux x86-64 boot protocol: GDT, identity page
//! tables, control registers, general registers, FPU, MSRs and the local APIC's LINT
//! pins, and the CPUID a Linux guest gets.
//!
//! Boot protocol ("64-bit boot protocol" in Documentation/arch/x86/boot.rst): 64-bit
//! mode with paging on; the kernel, zero page and command line identity-mapped; a GDT
//! with flat `__BOOT_CS` (0x10, execute/read) and `__BOOT_DS` (0x18, read/write); CS =
//! 0x10, DS/ES/SS = 0x18; interrupts disabled; RSI = address of `boot_params`.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Guest-physical address of the boot GDT.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Guest-physical address of the (empty) boot IDT.
pub const BOOT_IDT_ADDR: u64 = 0x540;
/// Initial stack pointer (the kernel sets up its own stack at once).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Guest-physical address of the PML4 of the boot identity page tables.
pub const PML4_ADDR: u64 = 0x9000;
/// Guest-physical address of the PDPT of the boot identity page tables.
pub const PDPT_ADDR: u64 = 0xa000;
/// Guest-physical address of the first of the page directories (one per GiB).
pub const PD_ADDR: u64 = 0xb000;
/// GiB identity-mapped by the boot page tables (with 2 MiB pages): all of 32-bit space.
pub const IDENTITY_MAPPED_GIB: u64 = 4;

/// GDT selector of the boot code segment (`__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// GDT selector of the boot data segment (`__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
/// GDT selector of the boot TSS.
pub const BOOT_TSS: u16 = 0x20;

/// CR0: protection, monitor coprocessor, extension type, numeric error, paging.
pub const BOOT_CR0: u64 = 0x8000_0033;
/// CR4: physical address extension (required by long mode).
pub const BOOT_CR4: u64 = 0x20;
/// EFER: long mode enabled and active.
pub const BOOT_EFER: u64 = 0x500;

/// The boot GDT: null, null, 64-bit code (0x10), data (0x18), TSS (0x20, 16 bytes).
pub const BOOT_GDT: [u64; 6] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // code: G, L, P, DPL 0, execute/read, accessed
    gdt_entry(0xc093, 0, 0xfffff), // data: G, D/B, P, DPL 0, read/write, accessed
    gdt_entry(0x808b, 0, 0xfffff), // TSS: G, P, busy 64-bit TSS
    0,                             // upper half of the 16-byte TSS descriptor
];

/// MSRs set at boot (index, value): SYSENTER/SYSCALL state cleared, TSC 0, fast
/// strings enabled in MISC_ENABLE, MTRRs enabled with write-back as default type.
pub const BOOT_MSRS: [(u32, u64); 11] = [
    (0x174, 0),             // IA32_SYSENTER_CS
    (0x175, 0),             // IA32_SYSENTER_ESP
    (0x176, 0),             // IA32_SYSENTER_EIP
    (0xc000_0081, 0),       // STAR
    (0xc000_0082, 0),       // LSTAR
    (0xc000_0083, 0),       // CSTAR
    (0xc000_0084, 0),       // SYSCALL_MASK
    (0xc000_0102, 0),       // KERNEL_GS_BASE
    (0x10, 0),              // IA32_TSC
    (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
    (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
];

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

/// Errors setting up the boot CPU state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing the GDT, IDT or page tables to guest memory failed.
    #[error("cannot write the boot {what} to guest memory: {source}")]
    Memory {
        /// Which structure.
        what: &'static str,
        /// Cause.
        source: vm_memory::GuestMemoryError,
    },
    /// A KVM vCPU ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// KVM refused one of the boot MSRs.
    #[error("KVM accepted only {set} of {total} boot MSRs (first refused: {index:#x})")]
    Msrs {
        /// How many were set.
        set: usize,
        /// How many were given.
        total: usize,
        /// Index of the first MSR refused.
        index: u32,
    },
    /// The local APIC state could not be read: the VM has no in-kernel irqchip.
    #[error("cannot read the vCPU's local APIC ({0}); call create_irq_chip before creating vCPUs")]
    NoIrqChip(kvm_ioctls::Error),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// Encodes a GDT descriptor from its flags (access byte in bits 0..8, flags nibble in
/// bits 12..16), 32-bit base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << 32)
        | (((flags as u64) & 0xf0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << 32)
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// Decodes GDT entry `index` of `table` into the `kvm_segment` KVM loads for it.
pub fn segment_from_gdt(table: &[u64], index: usize) -> kvm_segment {
    let entry = table.get(index).copied().unwrap_or(0);
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32,
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the boot GDT, an empty IDT and identity page tables mapping the first
/// [`IDENTITY_MAPPED_GIB`] GiB with 2 MiB pages.
pub fn write_boot_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), Error> {
    let mem_err = |what| move |source| Error::Memory { what, source };
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_ADDR + 8 * i as u64)).map_err(mem_err("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_ADDR)).map_err(mem_err("IDT"))?;
    let pml4 = vec![0u8; 4096];
    mem.write_slice(&pml4, GuestAddress(PML4_ADDR)).map_err(mem_err("PML4"))?;
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR)).map_err(mem_err("PML4"))?;
    let mut pdpt = [0u64; 512];
    let mut pd = [0u64; 512];
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd_addr = PD_ADDR + gib * 0x1000;
        pdpt[gib as usize] = pd_addr | 0x3; // present, writable
        for (i, e) in pd.iter_mut().enumerate() {
            // present, writable, 2 MiB page
            *e = (gib << 30) | ((i as u64) << 21) | 0x83;
        }
        mem.write_slice(&le_bytes(&pd), GuestAddress(pd_addr)).map_err(mem_err("page directory"))?;
    }
    mem.write_slice(&le_bytes(&pdpt), GuestAddress(PDPT_ADDR)).map_err(mem_err("PDPT"))?;
    Ok(())
}

fn le_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Puts long-mode boot state into `sregs` (segments, GDT/IDT, CR0/CR3/CR4, EFER);
/// the rest (APIC base, interrupt bitmap...) is left as KVM reported it.
pub fn apply_boot_sregs(sregs: &mut kvm_sregs) {
    let code = segment_from_gdt(&BOOT_GDT, usize::from(BOOT_CS / 8));
    let data = segment_from_gdt(&BOOT_GDT, usize::from(BOOT_DS / 8));
    let tss = segment_from_gdt(&BOOT_GDT, usize::from(BOOT_TSS / 8));
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = BOOT_CR0;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = BOOT_CR4;
    sregs.efer = BOOT_EFER;
}

/// General registers at the kernel's 64-bit entry.
pub fn boot_regs(entry: GuestAddress, boot_params: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsi: boot_params.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        ..Default::default()
    }
}

/// FPU state at reset (x87 control word 0x37f, MXCSR 0x1f80).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// CPUID for a Linux guest vCPU: what KVM supports, with the vCPU's APIC ID in leaves
/// 0x1, 0xb and 0x1f and the hypervisor bit set. Pass it to `VcpuFd::set_cpuid2`
/// before [`configure_vcpu`].
pub fn boot_cpuid(kvm: &Kvm, apic_id: u8) -> Result<CpuId, Error> {
    let mut cpuid =
        kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(apic_id) << 24);
                e.ecx |= 1 << 31;
            }
            0xb | 0x1f => e.edx = u32::from(apic_id),
            _ => {}
        }
    }
    Ok(cpuid)
}

/// Programs the local APIC's LINT0 as ExtINT (the 8259 PIC's output) and LINT1 as NMI,
/// as a PC BIOS leaves them: Linux booted without MP/ACPI tables relies on it.
fn set_lint(vcpu: &VcpuFd) -> Result<(), Error> {
    let mut lapic = vcpu.get_lapic().map_err(Error::NoIrqChip)?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut bytes = [0u8; 4];
        for (b, c) in bytes.iter_mut().zip(&lapic.regs[reg..reg + 4]) {
            *b = *c as u8;
        }
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (c, b) in lapic.regs[reg..reg + 4].iter_mut().zip(value.to_le_bytes()) {
            *c = b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

/// Loads the boot state into the boot vCPU: sregs, regs, FPU, MSRs and LINT pins.
pub fn configure_vcpu(vcpu: &VcpuFd, regs: &kvm_regs) -> Result<(), Error> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    apply_boot_sregs(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(regs).map_err(kvm_err("KVM_SET_REGS"))?;
    vcpu.set_fpu(&boot_fpu()).map_err(kvm_err("KVM_SET_FPU"))?;
    let entries: Vec<kvm_msr_entry> =
        BOOT_MSRS.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::Msrs { set: 0, total: entries.len(), index: 0 })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(Error::Msrs { set, total: entries.len(), index: entries.get(set).map_or(0, |e| e.index) });
    }
    set_lint(vcpu)
}
