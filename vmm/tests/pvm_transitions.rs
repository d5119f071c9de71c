//! Experiment (issue 14): which privilege transitions does this host's KVM carry out
//! as the CPU would, for a guest that is not PVM-aware, and does densevm's
//! completion of a user-mode `syscall` ([`vmm::arch::syscall_fixup`]) make them
//! architectural?
//!
//! A tiny guest (`pvm_transitions/guest.S`, assembled here with gcc) starts at CPL 3
//! and enters its ring-0 code by `syscall`, by `int 0x80` (IDT gate DPL 3) or by a
//! page fault; the ring-0 handler records what it sees (CS, SS, RSP, RCX, R11,
//! RFLAGS, the exception frame, CR2, its GS data) in a supervisor-only page and
//! returns (`sysretq` / `iretq`). Each probe runs in a fresh VM in a few
//! milliseconds. On a KVM that runs ring 0 natively every probe must be
//! architectural; on kvm_pvm the tests also pin down the deviations the README
//! documents, so that a change of the platform shows up here.

#[path = "pvm_transitions/rig.rs"]
mod rig;

use rig::{assemble, run, Entry, Outcome, Probe, Test, HIGH, NOT_PRESENT, R_FAULT, R_INT80, R_PF, R_SYSCALL};
use vmm::arch::syscall_fixup::DebugOutcome;

/// Linux's IA32_FMASK: TF, DF, IF, IOPL, AC, NT.
const LINUX_FMASK: u64 = 0x47700;
/// CR4.SMEP | CR4.SMAP.
const SMEP_SMAP: u64 = (1 << 20) | (1 << 21);

fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {why}");
}

fn guest(test: &str) -> Option<Vec<u8>> {
    if !std::path::Path::new("/dev/kvm").exists() {
        skip(&format!("{test}: no /dev/kvm"));
        return None;
    }
    match assemble() {
        Ok(g) => Some(g),
        Err(e) => {
            skip(&format!("{test}: cannot assemble the tiny guest: {e}"));
            None
        }
    }
}

fn kvm_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

fn probe(guest: &[u8], p: &Probe) -> Outcome {
    let o = run(guest, p).unwrap_or_else(|e| panic!("{}: {e}", p.name()));
    println!("{}: {o}", p.name());
    o
}

/// Checks that `o` is what every x86-64 CPU produces for `p`.
fn check_architectural(p: &Probe, o: &Outcome) -> Result<(), String> {
    let want_bells: &[u64] = match p.test {
        Test::Syscall => &[0x01, 0x10, 0x11, 0x02, 0xff],
        Test::Int80 => &[0x01, 0x20, 0x21, 0x02, 0xff],
        Test::PageFault | Test::JumpToLstar => &[0x01, 0x30, 0x31, 0x02, 0xff],
    };
    if o.bells != want_bells {
        return Err(format!("doorbells {:x?}, want {want_bells:x?}; {}", o.bells, o.fault_summary()));
    }
    match p.test {
        Test::Syscall => {
            let r = &o.results[R_SYSCALL..R_SYSCALL + 10];
            let lstar_rflags = 0x202 & !p.fmask;
            if r[5] != 0x10 || r[6] != 0x18 {
                return Err(format!("handler CS {:#x} SS {:#x}, want 0x10 0x18", r[5], r[6]));
            }
            if (r[2], r[3], r[4]) != (rig::U_SYSCALL_NEXT, 0x202, 0x5151) {
                return Err(format!("RCX {:#x} R11 {:#x} RAX {:#x}", r[2], r[3], r[4]));
            }
            if r[7] != lstar_rflags {
                return Err(format!("handler RFLAGS {:#x}, want {lstar_rflags:#x}", r[7]));
            }
            if p.entry == Entry::Linux && r[9] != rig::PERCPU {
                return Err(format!("GS after swapgs reads {:#x}, want the per-cpu area", r[9]));
            }
        }
        Test::Int80 => {
            let r = &o.results[R_INT80..R_INT80 + 8];
            if r[6] != 0x10 || r[2] != 0x33 {
                return Err(format!("handler CS {:#x}, frame CS {:#x}", r[6], r[2]));
            }
        }
        Test::PageFault => {
            let r = &o.results[R_PF..R_PF + 8];
            // Not present, read, user: error code 4, at the load.
            if r[1] != 4 || r[5] != NOT_PRESENT || r[6] != 0x10 || r[3] != 0x33 {
                return Err(format!("error {:#x} cr2 {:#x} frame CS {:#x} handler CS {:#x}", r[1], r[5], r[3], r[6]));
            }
        }
        Test::JumpToLstar => {
            let r = &o.results[R_PF..R_PF + 8];
            // Present, user, instruction fetch, at the supervisor-only handler.
            if (r[1], r[2], r[3], r[5]) != (0x15, 0x11000, 0x33, 0x11000) {
                return Err(format!("error {:#x} rip {:#x} frame CS {:#x} cr2 {:#x}", r[1], r[2], r[3], r[5]));
            }
        }
    }
    // Back at CPL 3 with what the kernel returned in RAX.
    if o.user[4] != 0x33 || o.user[3] != 0x600d {
        return Err(format!("back in user mode with CS {:#x} RAX {:#x}", o.user[4], o.user[3]));
    }
    Ok(())
}

fn syscall_probes(complete_in_vmm: bool) -> Vec<Probe> {
    let base = Probe { complete_in_vmm, ..Probe::base(Test::Syscall) };
    vec![
        base.clone(),
        Probe { high: true, ..base.clone() },
        Probe { entry: Entry::Linux, high: true, fmask: LINUX_FMASK, ..base.clone() },
        Probe { entry: Entry::Linux, high: true, fmask: LINUX_FMASK, cr4_extra: SMEP_SMAP, ..base },
    ]
}

/// Exceptions raised at CPL 3 reach their ring-0 handler and `iretq` returns, on
/// every host (kvm_pvm included), with or without the #PF breakpoint.
#[test]
fn page_fault_from_cpl3_is_architectural() {
    let Some(g) = guest("page_fault_from_cpl3_is_architectural") else { return };
    for complete_in_vmm in [false, true] {
        for high in [false, true] {
            let p = Probe { high, complete_in_vmm, ..Probe::base(Test::PageFault) };
            let o = probe(&g, &p);
            if let Err(e) = check_architectural(&p, &o) {
                panic!("{}: {e}", p.name());
            }
            if complete_in_vmm && kvm_pvm() {
                // The breakpoint fired on the handler, the fault was not a syscall:
                // stepped over and re-armed.
                assert_eq!(o.fixups, [DebugOutcome::Stepping, DebugOutcome::Rearmed], "{}", p.name());
            }
        }
    }
}

/// User code that jumps to LSTAR itself gets the #PF the CPU raises, on every host:
/// densevm's completion does not take it for a syscall (its RFLAGS are not masked
/// by FMASK), whatever the user put in R11.
#[test]
fn user_jump_to_lstar_is_not_completed() {
    let Some(g) = guest("user_jump_to_lstar_is_not_completed") else { return };
    let p = Probe { fmask: LINUX_FMASK, complete_in_vmm: true, ..Probe::base(Test::JumpToLstar) };
    let o = probe(&g, &p);
    if let Err(e) = check_architectural(&p, &o) {
        panic!("{}: {e}", p.name());
    }
    assert!(!o.fixups.iter().any(|f| matches!(f, DebugOutcome::Completed(_))), "{o}");
}

/// With densevm completing it, a user `syscall` is architectural on every host:
/// kernel CS/SS, RCX/R11, FMASK, Linux's swapgs prologue with SMEP/SMAP, `sysretq`.
#[test]
fn syscall_completed_by_the_vmm_is_architectural() {
    let Some(g) = guest("syscall_completed_by_the_vmm_is_architectural") else { return };
    for p in syscall_probes(true) {
        let o = probe(&g, &p);
        if let Err(e) = check_architectural(&p, &o) {
            panic!("{}: {e}", p.name());
        }
        let completed = o.fixups.iter().filter(|f| matches!(f, DebugOutcome::Completed(_))).count();
        // Only where KVM left the syscall half done does densevm step in.
        assert_eq!(completed, usize::from(kvm_pvm()), "{}: {:x?}", p.name(), o.fixups);
    }
}

/// What the platform does on its own. Natively: the architecture. On kvm_pvm, the
/// deviation the README documents: RIP = LSTAR, RCX/R11 and FMASK done, but CS/SS
/// left at user mode, so the handler fetch faults (#PF, error P|U|fetch, CR2 = LSTAR,
/// frame CS = user CS); `int 0x80` through a DPL-3 gate raises #UD; a handler page
/// with the U bit runs at CPL 3 until its first supervisor access.
#[test]
fn transitions_without_the_vmm() {
    let Some(g) = guest("transitions_without_the_vmm") else { return };
    let pvm = kvm_pvm();
    for p in syscall_probes(false) {
        let o = probe(&g, &p);
        if !pvm {
            if let Err(e) = check_architectural(&p, &o) {
                panic!("{}: {e}", p.name());
            }
            continue;
        }
        let lstar = if p.high { HIGH } else { 0x11000 } + if p.entry == Entry::Linux { 0x100 } else { 0 };
        let r = &o.results[R_PF..R_PF + 10];
        let why = "kvm_pvm no longer leaves a user syscall half done? (then syscall_fixup is not needed: \
                   update README's Linux section)";
        assert_eq!(o.bells, [0x01, 0x30, 0x31, 0x02, 0xff], "{}: {why}", p.name());
        assert_eq!((r[1], r[2], r[3], r[5]), (0x15, lstar, 0x33, lstar), "{}: {why} {o}", p.name());
        assert_eq!(r[8] & !0x1_0000, 0x202 & !p.fmask, "{}: FMASK applied to RFLAGS", p.name());
        assert_eq!((o.user[0], o.user[1]), (rig::U_SYSCALL_NEXT, 0x202), "{}: RCX/R11 set", p.name());
    }

    let p = Probe { kernel_pages_user: true, ..Probe::base(Test::Syscall) };
    let o = probe(&g, &p);
    if pvm {
        // The handler page was fetched at CPL 3 (no fetch fault), and its first
        // instruction, a write to a supervisor-only page, faulted as a user write.
        let r = &o.results[R_PF..R_PF + 6];
        assert_eq!(o.bells, [0x01, 0x30, 0x31, 0x02, 0xff], "{o}");
        assert_eq!((r[1], r[2], r[3], r[5]), (0x7, 0x11000, 0x33, 0x1f_e000), "{o}");
    } else if let Err(e) = check_architectural(&p, &o) {
        panic!("{}: {e}", p.name());
    }

    for high in [false, true] {
        let p = Probe { high, ..Probe::base(Test::Int80) };
        let o = probe(&g, &p);
        if pvm {
            let f = &o.results[R_FAULT..R_FAULT + 8];
            assert_eq!(o.bells, [0x01, 0xee], "{}: {o}", p.name());
            assert_eq!((f[2], f[3], f[4]), (6, 0x10053, 0x33), "{}: #UD at the int 0x80", p.name());
        } else if let Err(e) = check_architectural(&p, &o) {
            panic!("{}: {e}", p.name());
        }
    }
}
