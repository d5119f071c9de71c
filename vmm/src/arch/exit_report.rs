//! Reports of the vCPU exits densevm cannot handle (`KVM_EXIT_INTERNAL_ERROR`,
//! `KVM_EXIT_SHUTDOWN`, `KVM_EXIT_FAIL_ENTRY` and any other unexpected one): what
//! KVM said (suberror and data words of `kvm_run.internal`), where the guest was
//! (RIP, CPL, control registers, EFER) and the instruction bytes at RIP, read from
//! guest memory through `KVM_TRANSLATE`. The report is one line: it becomes the VM's
//! exit reason and the vCPU's error log line.

use std::fmt;

use kvm_bindings::{
    KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Bytes of code shown at RIP (the longest x86 instruction is 15 bytes).
pub const CODE_BYTES: usize = 16;
/// Most data words of `kvm_run.internal` (the size of its `data` array).
pub const MAX_DATA_WORDS: usize = 16;
const PAGE_SIZE: u64 = 4096;

/// An exit the vCPU loop cannot handle, with what KVM gave about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnexpectedExit {
    /// `KVM_EXIT_INTERNAL_ERROR`.
    InternalError {
        /// `kvm_run.internal.suberror` (`KVM_INTERNAL_ERROR_*`).
        suberror: u32,
        /// `kvm_run.internal.data[..ndata]`.
        data: Vec<u64>,
    },
    /// `KVM_EXIT_SHUTDOWN`: a triple fault (or a shutdown cycle).
    Shutdown,
    /// `KVM_EXIT_FAIL_ENTRY`: the hardware refused to enter the guest.
    FailEntry {
        /// `hardware_entry_failure_reason`.
        reason: u64,
        /// Host CPU of the failed entry.
        cpu: u32,
    },
    /// Any other exit the loop does not handle, by its `VcpuExit` name.
    Other(String),
}

/// The name and meaning of a `KVM_INTERNAL_ERROR_*` suberror.
pub fn suberror_name(suberror: u32) -> &'static str {
    match suberror {
        KVM_INTERNAL_ERROR_EMULATION => "KVM_INTERNAL_ERROR_EMULATION (KVM's instruction emulator failed)",
        KVM_INTERNAL_ERROR_SIMUL_EX => "KVM_INTERNAL_ERROR_SIMUL_EX (exception while delivering an exception)",
        KVM_INTERNAL_ERROR_DELIVERY_EV => {
            "KVM_INTERNAL_ERROR_DELIVERY_EV (exit while delivering an event to the guest)"
        }
        KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => {
            "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON (hardware exit KVM does not handle)"
        }
        _ => "unknown suberror",
    }
}

/// Reads `kvm_run.internal` after `KVM_RUN` returned `KVM_EXIT_INTERNAL_ERROR`
/// (kvm-ioctls' `VcpuExit::InternalError` does not carry it).
pub fn read_internal_error(vcpu: &mut VcpuFd) -> UnexpectedExit {
    let run = vcpu.get_kvm_run();
    if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
        return UnexpectedExit::Other(format!("InternalError (exit_reason {} in kvm_run)", run.exit_reason));
    }
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the kernel filled the
    // `internal` member of the union; it is plain integers, valid for any bits.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(MAX_DATA_WORDS);
    UnexpectedExit::InternalError { suberror: internal.suberror, data: internal.data[..n].to_vec() }
}

/// Where the guest was when it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuState {
    /// Instruction pointer.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Flags.
    pub rflags: u64,
    /// Code segment selector.
    pub cs: u16,
    /// Current privilege level (SS.DPL).
    pub cpl: u8,
    /// Control registers.
    pub cr0: u64,
    /// Last page-fault address.
    pub cr2: u64,
    /// Page-table base.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// Extended feature enable register.
    pub efer: u64,
}

impl CpuState {
    /// Reads the registers of `vcpu`.
    pub fn read(vcpu: &VcpuFd) -> Result<Self, String> {
        let regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        let sregs = vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        Ok(CpuState {
            rip: regs.rip,
            rsp: regs.rsp,
            rflags: regs.rflags,
            cs: sregs.cs.selector,
            cpl: sregs.ss.dpl,
            cr0: sregs.cr0,
            cr2: sregs.cr2,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
        })
    }
}

/// Reads up to [`CODE_BYTES`] bytes of code at guest-virtual `rip`, page by page,
/// translated with `translate` (guest-virtual to guest-physical, None if unmapped).
/// Returns the bytes read (fewer if a page is unmapped past the first) or why none.
pub fn read_code<M: GuestMemoryBackend>(
    mem: &M,
    rip: u64,
    mut translate: impl FnMut(u64) -> Result<Option<u64>, String>,
) -> Result<Vec<u8>, String> {
    let mut code = Vec::with_capacity(CODE_BYTES);
    let mut gva = rip;
    while code.len() < CODE_BYTES {
        let in_page = (PAGE_SIZE - gva % PAGE_SIZE).min((CODE_BYTES - code.len()) as u64) as usize;
        let gpa = match translate(gva) {
            Ok(Some(gpa)) => gpa,
            Ok(None) if code.is_empty() => return Err(format!("rip {rip:#x} is not mapped")),
            Err(e) if code.is_empty() => return Err(e),
            _ => break,
        };
        let mut buf = vec![0u8; in_page];
        match mem.read_slice(&mut buf, GuestAddress(gpa)) {
            Ok(()) => code.extend_from_slice(&buf),
            Err(e) if code.is_empty() => return Err(format!("gpa {gpa:#x}: {e}")),
            Err(_) => break,
        }
        gva = gva.wrapping_add(in_page as u64);
    }
    Ok(code)
}

/// [`read_code`] with `KVM_TRANSLATE` on `vcpu`.
pub fn read_code_at_rip<M: GuestMemoryBackend>(vcpu: &VcpuFd, mem: &M, rip: u64) -> Result<Vec<u8>, String> {
    read_code(mem, rip, |gva| {
        let t = vcpu.translate_gva(gva).map_err(|e| format!("KVM_TRANSLATE {gva:#x}: {e}"))?;
        Ok((t.valid != 0).then_some(t.physical_address))
    })
}

/// The report of one unexpected exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitReport {
    /// The exit.
    pub exit: UnexpectedExit,
    /// The registers, or why they could not be read.
    pub cpu: Result<CpuState, String>,
    /// Code bytes at RIP, or why they could not be read.
    pub code: Result<Vec<u8>, String>,
    /// The kernel symbol RIP is in (`name+0xoff`), when a System.map was given, or
    /// what went wrong looking it up.
    pub symbol: Option<String>,
    /// The kernel functions named by return addresses on the stack (with a
    /// System.map; [`super::stack_scan`]), innermost first.
    pub callers: Vec<String>,
}

impl ExitReport {
    /// The first code byte at RIP when this is an emulation failure of KVM at CPL 0
    /// (the instruction kvm_pvm's emulator could not run in guest-kernel code), so a
    /// caller can complete the instructions it knows ([`super::int3`], [`super::fwait`]).
    pub fn kernel_emulation_failure_opcode(&self) -> Option<u8> {
        self.kernel_emulation_failure_code()?.first().copied()
    }

    /// The code bytes at RIP when this is an emulation failure of KVM at CPL 0 (see
    /// [`Self::kernel_emulation_failure_opcode`]; [`super::mxcsr`] decodes them).
    pub fn kernel_emulation_failure_code(&self) -> Option<&[u8]> {
        let emulation = matches!(self.exit, UnexpectedExit::InternalError { suberror, .. } if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION);
        let kernel = matches!(&self.cpu, Ok(c) if c.cpl == 0);
        match &self.code {
            Ok(code) if emulation && kernel => Some(code),
            _ => None,
        }
    }

    /// Gathers the registers and code at RIP of `vcpu` (guest RAM `mem`) after `exit`.
    pub fn collect<M: GuestMemoryBackend>(vcpu: &VcpuFd, mem: &M, exit: UnexpectedExit) -> Self {
        let cpu = CpuState::read(vcpu);
        let code = match &cpu {
            Ok(c) => read_code_at_rip(vcpu, mem, c.rip),
            Err(_) => Err("no registers".into()),
        };
        ExitReport { exit, cpu, code, symbol: None, callers: Vec::new() }
    }
}

fn hex_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

fn hex_words(words: &[u64]) -> String {
    words.iter().map(|w| format!("{w:#x}")).collect::<Vec<_>>().join(" ")
}

/// Writes the data words of an emulation failure: with the instruction-bytes flag
/// (Linux 5.14+), word 0 is the flags, words 1-2 the instruction length and bytes,
/// and the next five the exit info (reason, info1, info2, interrupt info, error code).
fn fmt_emulation_data(f: &mut fmt::Formatter<'_>, data: &[u64]) -> fmt::Result {
    let flags = data.first().copied().unwrap_or(0);
    if flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) == 0 || data.len() < 3 {
        return write!(f, ", data [{}]", hex_words(data));
    }
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&data[1].to_le_bytes());
    raw[8..].copy_from_slice(&data[2].to_le_bytes());
    let len = usize::from(raw[0]).min(15);
    write!(f, ", instruction bytes (from KVM) {}", hex_bytes(&raw[1..1 + len]))?;
    if let Some(info) = data.get(3..8) {
        write!(
            f,
            ", exit info: reason {:#x} info1 {:#x} info2 {:#x} intr_info {:#x} error_code {:#x}",
            info[0], info[1], info[2], info[3], info[4]
        )?;
    }
    match data.get(8..) {
        Some(rest) if !rest.is_empty() => write!(f, ", more data [{}]", hex_words(rest)),
        _ => Ok(()),
    }
}

impl fmt::Display for UnexpectedExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnexpectedExit::InternalError { suberror, data } => {
                write!(f, "KVM_EXIT_INTERNAL_ERROR: suberror {suberror} {}", suberror_name(*suberror))?;
                if *suberror == KVM_INTERNAL_ERROR_EMULATION {
                    fmt_emulation_data(f, data)
                } else {
                    write!(f, ", data [{}]", hex_words(data))
                }
            }
            UnexpectedExit::Shutdown => write!(f, "KVM_EXIT_SHUTDOWN (triple fault or reset)"),
            UnexpectedExit::FailEntry { reason, cpu } => {
                write!(f, "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host CPU {cpu}")
            }
            UnexpectedExit::Other(name) => write!(f, "unexpected exit {name}"),
        }
    }
}

impl fmt::Display for ExitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.exit)?;
        match &self.cpu {
            Ok(c) => {
                write!(f, "; rip {:#x}", c.rip)?;
                if let Some(sym) = &self.symbol {
                    write!(f, " <{sym}>")?;
                }
                if !self.callers.is_empty() {
                    write!(f, " stack [{}]", self.callers.join(" "))?;
                }
                write!(
                    f,
                    " cs {:#x} cpl {} rsp {:#x} rflags {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
                    c.cs, c.cpl, c.rsp, c.rflags, c.cr0, c.cr2, c.cr3, c.cr4, c.efer
                )?;
            }
            Err(e) => write!(f, "; registers unreadable: {e}")?,
        }
        match &self.code {
            Ok(code) => write!(f, "; code at rip: {}", hex_bytes(code)),
            Err(e) => write!(f, "; code at rip unreadable: {e}"),
        }
    }
}

/// A report of an internal error `suberror` at CPL `cpl` with `code` at RIP (tests
/// of the instruction completions).
#[cfg(test)]
pub(crate) fn test_report(suberror: u32, cpl: u8, code: &[u8]) -> ExitReport {
    ExitReport {
        exit: UnexpectedExit::InternalError { suberror, data: vec![] },
        cpu: Ok(CpuState { cpl, ..Default::default() }),
        code: Ok(code.to_vec()),
        symbol: None,
        callers: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn cpu() -> CpuState {
        CpuState {
            rip: 0xffff_ffff_8100_1017,
            rsp: 0xffff_ffff_8260_3f00,
            rflags: 0x46,
            cs: 0x10,
            cpl: 0,
            cr0: 0x8005_0033,
            cr2: 0,
            cr3: 0x260_a000,
            cr4: 0x20_06b0,
            efer: 0xd01,
        }
    }

    #[test]
    fn emulation_failure_with_instruction_bytes() {
        // flags = INSTRUCTION_BYTES; insn_size 3, bytes 0f 01 d0 (xgetbv), padded with 0x90.
        let mut raw = [0x90u8; 16];
        raw[0] = 3;
        raw[1..4].copy_from_slice(&[0x0f, 0x01, 0xd0]);
        let w1 = u64::from_le_bytes(raw[..8].try_into().unwrap());
        let w2 = u64::from_le_bytes(raw[8..].try_into().unwrap());
        let exit = UnexpectedExit::InternalError { suberror: 1, data: vec![1, w1, w2, 0x30, 0x1, 0, 0, 0, 7] };
        let report = ExitReport {
            exit,
            cpu: Ok(cpu()),
            code: Ok(vec![0x0f, 0x01, 0xd0, 0xc3]),
            symbol: Some("native_write_cr4+0x17".into()),
            callers: vec!["x86_64_start_kernel+0x12".into(), "secondary_startup_64+0x9".into()],
        };
        assert_eq!(
            report.to_string(),
            "KVM_EXIT_INTERNAL_ERROR: suberror 1 KVM_INTERNAL_ERROR_EMULATION (KVM's instruction emulator \
             failed), instruction bytes (from KVM) 0f 01 d0, exit info: reason 0x30 info1 0x1 info2 0x0 \
             intr_info 0x0 error_code 0x0, more data [0x7]; rip 0xffffffff81001017 <native_write_cr4+0x17> \
             stack [x86_64_start_kernel+0x12 secondary_startup_64+0x9] cs 0x10 cpl 0 rsp 0xffffffff82603f00 rflags 0x46 cr0 0x80050033 cr2 0x0 cr3 0x260a000 \
             cr4 0x2006b0 efer 0xd01; code at rip: 0f 01 d0 c3"
        );
    }

    #[test]
    fn other_suberrors_and_exits() {
        let exit = UnexpectedExit::InternalError { suberror: 3, data: vec![0x8000_0b0e, 0x31] };
        let report = ExitReport {
            exit,
            cpu: Err("KVM_GET_REGS: EIO".into()),
            code: Err("no registers".into()),
            symbol: None,
            callers: vec![],
        };
        assert_eq!(
            report.to_string(),
            "KVM_EXIT_INTERNAL_ERROR: suberror 3 KVM_INTERNAL_ERROR_DELIVERY_EV (exit while delivering an \
             event to the guest), data [0x80000b0e 0x31]; registers unreadable: KVM_GET_REGS: EIO; code at \
             rip unreadable: no registers"
        );
        // Emulation failure of an old kernel: no flags, raw words.
        let old = UnexpectedExit::InternalError { suberror: 1, data: vec![] };
        assert!(old.to_string().ends_with("failed), data []"), "{old}");
        assert!(UnexpectedExit::InternalError { suberror: 2, data: vec![] }.to_string().contains("SIMUL_EX"));
        assert!(UnexpectedExit::InternalError { suberror: 4, data: vec![1] }
            .to_string()
            .contains("UNEXPECTED_EXIT_REASON"));
        assert!(UnexpectedExit::InternalError { suberror: 99, data: vec![] }.to_string().contains("99 unknown"));
        let shutdown = ExitReport {
            exit: UnexpectedExit::Shutdown,
            cpu: Ok(cpu()),
            code: Ok(vec![0x0f, 0x0b]),
            symbol: None,
            callers: vec![],
        };
        let s = shutdown.to_string();
        assert!(s.starts_with("KVM_EXIT_SHUTDOWN (triple fault or reset); rip 0xffffffff81001017 cs 0x10"), "{s}");
        assert!(s.ends_with("code at rip: 0f 0b"), "{s}");
        let fail = UnexpectedExit::FailEntry { reason: 0x21, cpu: 3 };
        assert_eq!(fail.to_string(), "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason 0x21 on host CPU 3");
        assert_eq!(UnexpectedExit::Other("Debug".into()).to_string(), "unexpected exit Debug");
    }

    #[test]
    fn code_is_read_page_by_page() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        mem.write_slice(&[0xaa; 8], GuestAddress(0x1ff8)).unwrap();
        mem.write_slice(&[0xbb; 8], GuestAddress(0x3000)).unwrap();
        // Virtual page 0x10000 -> physical 0x1000, 0x11000 -> 0x3000 (not contiguous).
        let map = |gva: u64| -> Result<Option<u64>, String> {
            Ok(match gva & !0xfff {
                0x10000 => Some(0x1000 + (gva & 0xfff)),
                0x11000 => Some(0x3000 + (gva & 0xfff)),
                _ => None,
            })
        };
        let code = read_code(&mem, 0x10ff8, map).unwrap();
        assert_eq!(code, [[0xaa; 8], [0xbb; 8]].concat());
        // A second page that is unmapped cuts the bytes short; an unmapped RIP is an error.
        assert_eq!(read_code(&mem, 0x11ffc, map).unwrap().len(), 4);
        assert_eq!(read_code(&mem, 0x20000, map).unwrap_err(), "rip 0x20000 is not mapped");
        // Outside guest RAM.
        let far = |gva: u64| -> Result<Option<u64>, String> { Ok(Some(gva + 0x10_0000)) };
        assert!(read_code(&mem, 0, far).unwrap_err().starts_with("gpa 0x100000"));
    }
}
