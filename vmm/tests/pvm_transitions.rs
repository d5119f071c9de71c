//! Experiment (issue 14): which privilege transitions does this host's KVM carry out
//! as the CPU would, for a guest that is not PVM-aware?
//!
//! A tiny guest (`pvm_transitions/guest.S`, assembled here with gcc) starts at CPL 3
//! and enters its ring-0 code by `syscall`, by `int 0x80` (IDT gate DPL 3) or by a
//! page fault; the ring-0 handler records what it sees (CS, SS, RSP, RCX, R11, RFLAGS,
//! the exception frame, CR2) in a supervisor-only page and returns (`sysretq` /
//! `iretq`). Each probe runs in a fresh VM; every exit is logged. See the README's
//! Linux section for what it found on kvm_pvm.

#[path = "pvm_transitions/rig.rs"]
mod rig;

use rig::{assemble, run, Entry, Outcome, Probe, Test, R_FAULT, R_INT80, R_PF, R_SYSCALL};

fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {why}");
}

fn guest() -> Option<Vec<u8>> {
    if !std::path::Path::new("/dev/kvm").exists() {
        skip("pvm_transitions: no /dev/kvm");
        return None;
    }
    match assemble() {
        Ok(g) => Some(g),
        Err(e) => {
            skip(&format!("pvm_transitions: cannot assemble the guest: {e}"));
            None
        }
    }
}

fn show(name: &str, o: &Outcome) {
    println!("{name}: {o}");
}

/// The transitions every x86-64 CPU performs; on a KVM that runs ring-0 code
/// natively (or emulates it faithfully) each must hold.
fn check_architectural(test: Test, o: &Outcome) -> Result<(), String> {
    let want_bells: &[u64] = match test {
        Test::Syscall => &[0x01, 0x10, 0x11, 0x02, 0xff],
        Test::Int80 => &[0x01, 0x20, 0x21, 0x02, 0xff],
        Test::PageFault => &[0x01, 0x30, 0x31, 0x02, 0xff],
    };
    if o.bells != want_bells {
        return Err(format!("doorbells {:x?}, want {want_bells:x?}", o.bells));
    }
    match test {
        Test::Syscall => {
            let r = &o.results[R_SYSCALL..R_SYSCALL + 16];
            if r[5] != 0x10 || r[6] != 0x18 {
                return Err(format!("handler CS {:#x} SS {:#x}, want 0x10 0x18", r[5], r[6]));
            }
            if r[2] != rig::U_SYSCALL_NEXT {
                return Err(format!("RCX {:#x}, want the return address", r[2]));
            }
        }
        Test::Int80 => {
            let r = &o.results[R_INT80..R_INT80 + 16];
            if r[6] != 0x10 || r[2] != 0x33 {
                return Err(format!("handler CS {:#x}, frame CS {:#x}", r[6], r[2]));
            }
        }
        Test::PageFault => {
            let r = &o.results[R_PF..R_PF + 16];
            // Not present, read, user: error code 4.
            if r[1] != 4 || r[5] != rig::NOT_PRESENT || r[6] != 0x10 {
                return Err(format!("error {:#x} cr2 {:#x} handler CS {:#x}", r[1], r[5], r[6]));
            }
        }
    }
    if o.user[4] != 0x33 {
        return Err(format!("back in user mode with CS {:#x}", o.user[4]));
    }
    Ok(())
}

#[test]
fn transitions_from_cpl3() {
    let Some(guest) = guest() else { return };
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let mut failures = Vec::new();
    for probe in Probe::all() {
        let o = run(&guest, &probe).expect("probe VM runs");
        show(&probe.name(), &o);
        if let Err(e) = check_architectural(probe.test, &o) {
            failures.push(format!("{}: {e}; {}", probe.name(), o.fault_summary()));
        }
    }
    let _ = (R_FAULT, Entry::Plain);
    if !failures.is_empty() {
        let msg = failures.join("\n");
        if pvm {
            println!("kvm_pvm differs from the architecture in:\n{msg}");
        } else {
            panic!("{msg}");
        }
    }
}

#[test]
fn caps() {
    use kvm_ioctls::{Cap, Kvm};
    let kvm = Kvm::new().unwrap();
    for (n, c) in [("user msr", Cap::X86UserSpaceMsr), ("msr filter", Cap::X86MsrFilter), ("guest debug", Cap::SetGuestDebug), ("debugregs", Cap::Debugregs), ("exit hypercall", Cap::ExitHypercall)] {
        println!("{n}: {}", kvm.check_extension_int(c));
    }
    let l = kvm.get_msr_index_list().unwrap();
    println!("msrs: {:x?}", l.as_slice());
}
