//! The rig of the privilege-transition experiment: assembles the tiny guest, builds
//! its GDT, TSS, IDT and page tables, runs one probe in a fresh VM and collects what
//! the guest and KVM reported.

use std::fmt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, kvm_userspace_memory_region, Msrs};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm::arch::cpl3::{self, Cpl3Start};
use vmm::arch::syscall_fixup::{DebugOutcome, SyscallFixup};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

const MEM: usize = 2 << 20;
/// A probe stops after this many doorbells (a fault loop).
const MAX_BELLS: usize = 24;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT: u64 = 0x4000;
const PDPT_HI: u64 = 0x5000;
const PD_HI: u64 = 0x6000;
const PT_HI: u64 = 0x7000;
const GDT: u64 = 0x8000;
const TSS: u64 = 0x8100;
const IDT: u64 = 0x9000;
const LOAD: u64 = 0x10000;
const KCODE: u64 = 0x11000;
const USER_DATA: u64 = 0x13000;
const KSTACK_TOP: u64 = 0x21000;
const USTACK_TOP: u64 = 0x31000;
const RESULTS: u64 = 0x40000;
/// The per-cpu area the Linux-like entry reaches through GS (IA32_KERNEL_GS_BASE).
pub const PERCPU: u64 = 0x40200;
const DOORBELL_VA: u64 = 0x1ff000;
const KDOORBELL_VA: u64 = 0x1fe000;
const DOORBELL_GPA: u64 = 0xd000_0000;
/// Where the kernel code pages are aliased in the high half (Linux's text address).
pub const HIGH: u64 = 0xffff_ffff_8100_0000;
/// A user address that is not mapped.
pub const NOT_PRESENT: u64 = 0x18_0000;
/// Address after the `syscall` of the user code (what RCX must hold).
pub const U_SYSCALL_NEXT: u64 = 0x1002a;
/// Index (in qwords) of the syscall record in the results page.
pub const R_SYSCALL: usize = 0;
/// Index of the `int 0x80` record.
pub const R_INT80: usize = 0x80 / 8;
/// Index of the #PF record.
pub const R_PF: usize = 0x100 / 8;
/// Index of the any-other-exception record.
pub const R_FAULT: usize = 0x180 / 8;

const GDT_ENTRIES: [u64; 10] = [
    0,
    0x00cf_9b00_0000_ffff, // 0x08 kernel CS32
    0x00af_9b00_0000_ffff, // 0x10 kernel CS (L)
    0x00cf_9300_0000_ffff, // 0x18 kernel DS
    0x00cf_fb00_0000_ffff, // 0x23 user CS32
    0x00cf_f300_0000_ffff, // 0x2b user DS
    0x00af_fb00_0000_ffff, // 0x33 user CS (L)
    0,
    0, // 0x40 TSS (filled in)
    0,
];

/// What the user code does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Test {
    /// `syscall` to LSTAR, `sysretq` back.
    Syscall,
    /// `int 0x80` through a DPL-3 interrupt gate, `iretq` back.
    Int80,
    /// A read of a not-present user page: #PF, `iretq` to a recovery address.
    PageFault,
    /// A `jmp` to LSTAR (the plain low handler) from CPL 3: a #PF, never a syscall.
    JumpToLstar,
}

/// Which syscall handler LSTAR points to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Records and `sysretq` on the user stack, no swapgs.
    Plain,
    /// Linux's prologue: swapgs, kernel stack from per-cpu data, frame, swapgs back.
    Linux,
}

/// One probe: a test and the machine state it runs under.
#[derive(Clone, Debug)]
pub struct Probe {
    /// What the user code does.
    pub test: Test,
    /// Syscall handler.
    pub entry: Entry,
    /// Handlers reached through the high-half alias (upper page-table levels without U).
    pub high: bool,
    /// The kernel code pages carry the U bit too.
    pub kernel_pages_user: bool,
    /// CR4 bits added (SMEP 1 << 20, SMAP 1 << 21).
    pub cr4_extra: u64,
    /// IA32_FMASK.
    pub fmask: u64,
    /// Arm a hardware execute breakpoint at LSTAR (KVM_SET_GUEST_DEBUG) and complete
    /// the syscall in the VMM when it fires at CPL 3.
    pub complete_in_vmm: bool,
}

impl Probe {
    /// `test` with the simplest state: plain handler, low addresses, no CR4 extras.
    pub fn base(test: Test) -> Self {
        Probe {
            test,
            entry: Entry::Plain,
            high: false,
            kernel_pages_user: false,
            cr4_extra: 0,
            fmask: 0,
            complete_in_vmm: false,
        }
    }

    /// A short name for the probe's output.
    pub fn name(&self) -> String {
        let mut n = format!("{:?}/{:?}", self.test, self.entry);
        if self.high {
            n += "/high";
        }
        if self.kernel_pages_user {
            n += "/kpages-U";
        }
        if self.cr4_extra != 0 {
            n += &format!("/cr4+{:#x}", self.cr4_extra);
        }
        if self.fmask != 0 {
            n += &format!("/fmask={:#x}", self.fmask);
        }
        if self.complete_in_vmm {
            n += "/vmm-completes";
        }
        n
    }
}

/// What one probe run produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Doorbell codes in order.
    pub bells: Vec<u64>,
    /// Exits that were not doorbells, in words.
    pub exits: Vec<String>,
    /// The results page (supervisor-only) as qwords.
    pub results: Vec<u64>,
    /// The user data page as qwords.
    pub user: Vec<u64>,
    /// RIP, CS selector, CS DPL, CR3, CR2 at the end.
    pub last: (u64, u16, u8, u64, u64),
    /// What the syscall fixup did, in order.
    pub fixups: Vec<DebugOutcome>,
    /// Pending/injected exception at the end (nr, error code), if any.
    pub exception: Option<(u8, u32)>,
}

impl Outcome {
    /// The any-other-exception record, in words (empty when none was taken).
    pub fn fault_summary(&self) -> String {
        let r = &self.results[R_FAULT..R_FAULT + 8];
        if r[0] == 0 {
            return String::new();
        }
        format!(
            "guest exception vector {} stack [{:#x} {:#x} {:#x} {:#x}] cr2 {:#x}",
            r[2], r[3], r[4], r[5], r[6], r[7]
        )
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = |i: usize| self.results[i..i + 10].iter().map(|v| format!("{v:x}")).collect::<Vec<_>>().join(" ");
        write!(
            f,
            "bells {:x?} fixups {:x?} exits {:?} last rip {:#x} cs {:#x} dpl {} cr3 {:#x} cr2 {:#x} exc {:?}\n  syscall [{}]\n  int80 [{}]\n  pf [{}]\n  {}\n  user [{}]",
            self.bells,
            self.fixups,
            self.exits,
            self.last.0,
            self.last.1,
            self.last.2,
            self.last.3,
            self.last.4,
            self.exception,
            q(R_SYSCALL),
            q(R_INT80),
            q(R_PF),
            self.fault_summary(),
            self.user[..6].iter().map(|v| format!("{v:x}")).collect::<Vec<_>>().join(" "),
        )
    }
}

/// Assembles `guest.S` into the flat image loaded at 0x10000.
pub fn assemble() -> Result<Vec<u8>, String> {
    // Once per process: the tests run in parallel, and each building into (and then
    // removing) the same directory let one read another's half-written image or
    // lose its files (seen in a fresh-clone CI run: an emulation failure on garbage
    // code, and "No such file or directory").
    static IMAGE: std::sync::OnceLock<Result<Vec<u8>, String>> = std::sync::OnceLock::new();
    IMAGE.get_or_init(assemble_now).clone()
}

fn assemble_now() -> Result<Vec<u8>, String> {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pvm_transitions/guest.S");
    let dir = std::env::temp_dir().join(format!("pvm-transitions-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let elf = dir.join("guest.elf");
    let bin = dir.join("guest.bin");
    let cc = std::env::var("DENSEVM_GUEST_CC").unwrap_or_else(|_| "gcc".into());
    let out = Command::new(&cc)
        .args(["-nostdlib", "-static", "-Wl,-Ttext=0x10000", "-Wl,--build-id=none", "-Wl,-N", "-o"])
        .arg(&elf)
        .arg(src)
        .output()
        .map_err(|e| format!("{cc}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cc}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let out = Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&elf)
        .arg(&bin)
        .output()
        .map_err(|e| format!("objcopy: {e}"))?;
    if !out.status.success() {
        return Err(format!("objcopy: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let image = std::fs::read(&bin).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(image)
}

fn gate(handler: u64, dpl: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&0x10u16.to_le_bytes());
    g[5] = 0x8e | (dpl << 5);
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

/// Guest memory for `probe`: image, tables, page tables.
fn build_memory(image: &[u8], probe: &Probe) -> GuestMemoryMmap {
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    mem.write_slice(image, GuestAddress(LOAD)).expect("image");
    let w = |addr: u64, v: u64| mem.write_obj(v, GuestAddress(addr)).expect("write");
    // GDT with a busy 64-bit TSS at 0x40.
    for (i, e) in GDT_ENTRIES.iter().enumerate() {
        w(GDT + 8 * i as u64, *e);
    }
    let tss_lo = 103 | ((TSS & 0xff_ffff) << 16) | (0x8bu64 << 40) | (((TSS >> 24) & 0xff) << 56);
    w(GDT + 0x40, tss_lo);
    w(GDT + 0x48, TSS >> 32);
    // TSS: RSP0 at offset 4, I/O map base past the limit.
    mem.write_obj(KSTACK_TOP, GuestAddress(TSS + 4)).expect("tss");
    mem.write_obj(104u16, GuestAddress(TSS + 102)).expect("tss");
    // IDT: stubs for 0..31, #PF handler, int 0x80 gate with DPL 3.
    let kbase = if probe.high { HIGH } else { KCODE };
    for v in 0..32u64 {
        let h = if v == 14 { kbase + 0x300 } else { kbase + 0x800 + 16 * v };
        mem.write_slice(&gate(h, 0), GuestAddress(IDT + 16 * v)).expect("idt");
    }
    mem.write_slice(&gate(kbase + 0x200, 3), GuestAddress(IDT + 16 * 0x80)).expect("idt");
    // Page tables: low 2 MiB identity with 4 KiB pages, U on upper levels.
    w(PML4, PDPT | 7);
    w(PDPT, PD | 7);
    w(PD, PT | 7);
    for page in 0..512u64 {
        let addr = page << 12;
        let user = matches!(addr, LOAD | USER_DATA) || (0x30000..USTACK_TOP).contains(&addr);
        let kcode = (KCODE..USER_DATA).contains(&addr);
        let entry = if addr == NOT_PRESENT {
            0
        } else if addr == DOORBELL_VA {
            DOORBELL_GPA | 7
        } else if addr == KDOORBELL_VA {
            DOORBELL_GPA | 3
        } else if user || (kcode && probe.kernel_pages_user) {
            addr | 7
        } else {
            addr | 3
        };
        w(PT + 8 * page, entry);
    }
    // High alias of the kernel code, Linux-like: no U on any level.
    w(PML4 + 8 * 511, PDPT_HI | 3);
    w(PDPT_HI + 8 * 510, PD_HI | 3);
    w(PD_HI + 8 * 8, PT_HI | 3);
    w(PT_HI, KCODE | 3 | 0x100);
    w(PT_HI + 8, (KCODE + 0x1000) | 3 | 0x100);
    // Per-cpu data for the Linux-like entry: self pointer, kernel stack top.
    w(PERCPU, PERCPU);
    w(PERCPU + 8, KSTACK_TOP);
    mem
}

extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Runs `probe` in a fresh VM (at most 10 s) and returns what it produced.
pub fn run(image: &[u8], probe: &Probe) -> Result<Outcome, String> {
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    let mem = build_memory(image, probe);
    let vm = kvm.create_vm().map_err(|e| e.to_string())?;
    let host = mem.get_host_address(GuestAddress(0)).map_err(|e| e.to_string())?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: the region is `mem`'s mapping, which outlives the VM (dropped after it).
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| e.to_string())?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    let cpuid = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(|e| e.to_string())?;
    vcpu.set_cpuid2(&cpuid).map_err(|e| e.to_string())?;
    let start = Cpl3Start {
        rip: match probe.test {
            Test::Syscall => LOAD,
            Test::Int80 => LOAD + 0x40,
            Test::PageFault => LOAD + 0x80,
            Test::JumpToLstar => LOAD + 0xc0,
        },
        rsp: USTACK_TOP - 0x100,
        rdi: 0,
        cr3: PML4,
        gdt: (GDT, GDT_ENTRIES.len()),
        tss: (TSS, 0x40),
        selectors: (0x33, 0x2b),
        io_privilege: false,
    };
    cpl3::configure(&vcpu, &start).map_err(|e| e.to_string())?;
    let mut sregs = vcpu.get_sregs().map_err(|e| e.to_string())?;
    sregs.idt.base = IDT;
    sregs.idt.limit = 256 * 16 - 1;
    sregs.cr4 |= probe.cr4_extra;
    vcpu.set_sregs(&sregs).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let lstar = match probe.entry {
        Entry::Plain => 0,
        Entry::Linux => 0x100,
    } + if probe.high { HIGH } else { KCODE };
    let msrs = [
        (0xc000_0081, (0x23u64 << 48) | (0x10 << 32)),
        (0xc000_0082, lstar),
        (0xc000_0084, probe.fmask),
        (0xc000_0102, PERCPU),
    ];
    let entries: Vec<kvm_msr_entry> =
        msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    let set = vcpu.set_msrs(&Msrs::from_entries(&entries).map_err(|e| format!("{e:?}"))?).map_err(|e| e.to_string())?;
    if set != entries.len() {
        return Err(format!("KVM_SET_MSRS set {set} of {}: {:#x} refused", entries.len(), msrs[set].0));
    }

    let mut fixup = SyscallFixup::new();
    if probe.complete_in_vmm {
        fixup.refresh(&vcpu, &mem).map_err(|e| e.to_string())?;
    }
    let thread_mem = mem.clone();
    register_signal_handler(SIGRTMIN() + 7, kick).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = stop.clone();
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let mut o = Outcome::default();
        loop {
            if thread_stop.load(Ordering::Acquire) {
                o.exits.push("timeout".into());
                break;
            }
            match vcpu.run() {
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    let mut b = [0u8; 8];
                    b[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
                    let code = u64::from_le_bytes(b);
                    if addr != DOORBELL_GPA {
                        o.exits.push(format!("mmio write {addr:#x} {code:#x}"));
                        break;
                    }
                    o.bells.push(code);
                    if code == 0xff || code == 0xee {
                        break;
                    }
                    if o.bells.len() >= MAX_BELLS {
                        o.exits.push(format!("stopped after {MAX_BELLS} doorbells"));
                        break;
                    }
                }
                Ok(VcpuExit::Intr) => {}
                Ok(VcpuExit::Debug(d)) => match fixup.on_debug(&vcpu, &thread_mem, &d) {
                    Ok(DebugOutcome::NotOurs) | Err(_) => {
                        o.exits.push(format!("debug exit pc {:#x} dr6 {:#x}", d.pc, d.dr6));
                        break;
                    }
                    Ok(outcome) => o.fixups.push(outcome),
                },
                Ok(VcpuExit::InternalError) => {
                    let r = vmm::arch::exit_report::read_internal_error(&mut vcpu);
                    o.exits.push(format!("{r:?}"));
                    break;
                }
                Ok(other) => {
                    o.exits.push(format!("{other:?}"));
                    break;
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    o.exits.push(format!("KVM_RUN: {e}"));
                    break;
                }
            }
        }
        if let (Ok(r), Ok(s)) = (vcpu.get_regs(), vcpu.get_sregs()) {
            o.last = (r.rip, s.cs.selector, s.cs.dpl, s.cr3, s.cr2);
        }
        if let Ok(ev) = vcpu.get_vcpu_events() {
            if ev.exception.pending != 0 || ev.exception.injected != 0 {
                o.exception = Some((ev.exception.nr, ev.exception.error_code));
            }
        }
        let _ = tx.send(o);
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut o = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(20))) {
            Ok(o) => break o,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                stop.store(true, Ordering::Release);
                let _ = handle.kill(SIGRTMIN() + 7);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err("vCPU thread died".into()),
        }
    };
    let _ = handle.join();
    let read_page = |gpa: u64| -> Vec<u64> {
        (0..512).map(|i| mem.read_obj::<u64>(GuestAddress(gpa + 8 * i)).unwrap_or(0)).collect()
    };
    o.results = read_page(RESULTS);
    o.user = read_page(USER_DATA);
    drop(vm);
    Ok(o)
}
