//! End-to-end: a guest that stops on an exit densevm cannot handle is reported with
//! what KVM said, where the guest was and the code there. The guest is a hand-built
//! "kernel" (an ELF whose entry is `ud2`) booted by `densevm run --kernel`: where
//! ring-0 code runs natively the CPU raises #UD, which the empty boot IDT turns into
//! a triple fault (`KVM_EXIT_SHUTDOWN`); where KVM emulates ring 0 (kvm_pvm) its
//! emulator cannot decode `ud2` and stops the vCPU with `KVM_EXIT_INTERNAL_ERROR`
//! (suberror `KVM_INTERNAL_ERROR_EMULATION`). Either way the report names the exit,
//! RIP, the kernel symbol from `--system-map`, CPL 0 and the bytes `0f 0b` at RIP.
//!
//! A second tiny kernel executes `int3` with a #BP handler in its IDT: natively the
//! CPU delivers #BP; where KVM's emulator cannot (it stops on software interrupts in
//! long mode), densevm delivers it. Either way the handler runs with the RIP after
//! the `int3` on its stack.

mod common;

use std::path::Path;
use std::process::Output;

use common::{kvm_available, scratch_dir};
use e2e::{densevm, last_json_line};

/// Physical load address and entry of the tiny kernel (16 MiB, identity-mapped).
const ENTRY: u64 = 0x100_0000;

/// A minimal ELF64 vmlinux: one PT_LOAD of `code` at paddr [`ENTRY`], entry there.
fn tiny_kernel(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 0x78];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&ENTRY.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&0x40u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&0x40u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&0x38u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = &mut f[0x40..0x78];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
    ph[16..24].copy_from_slice(&ENTRY.to_le_bytes()); // p_vaddr
    ph[24..32].copy_from_slice(&ENTRY.to_le_bytes()); // p_paddr
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    f.resize(0x1000, 0);
    f.extend_from_slice(code);
    f
}

fn run_kernel(kernel: &Path, extra: &[&str]) -> Output {
    let kernel = kernel.to_str().expect("utf-8 path");
    let mut args = vec!["run", "--kernel", kernel, "--mem-mib", "64", "--serial", "none"];
    args.extend_from_slice(extra);
    densevm(&args)
}

#[test]
fn unhandled_exit_is_reported_with_rip_symbol_and_code() {
    if !kvm_available("unhandled_exit_is_reported_with_rip_symbol_and_code") {
        return;
    }
    let dir = scratch_dir("exitdiag");
    let kernel = dir.join("ud2-vmlinux");
    // ud2, then nops up to the 16 bytes shown.
    let mut code = vec![0x0f, 0x0b];
    code.resize(32, 0x90);
    std::fs::write(&kernel, tiny_kernel(&code)).expect("write kernel");
    let map = dir.join("System.map");
    std::fs::write(
        &map,
        format!("{:016x} A some_absolute\n{ENTRY:016x} T tiny_entry\n{:016x} T _etext\n", 0x10, ENTRY + 0x20),
    )
    .expect("write System.map");

    let out = run_kernel(&kernel, &["--system-map", map.to_str().expect("utf-8 path")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the guest did not end cleanly; stderr:\n{stderr}");
    let summary = last_json_line(&out.stdout).expect("final JSON line");
    let reason = summary["timeline"]["exit_reason"].as_str().expect("an exit reason").to_string();
    let emulated = reason.contains("KVM_EXIT_INTERNAL_ERROR");
    if emulated {
        assert!(
            reason.starts_with("error: KVM_EXIT_INTERNAL_ERROR: suberror 1 KVM_INTERNAL_ERROR_EMULATION"),
            "{reason}"
        );
    } else {
        assert!(reason.starts_with("guest shut down: KVM_EXIT_SHUTDOWN (triple fault or reset)"), "{reason}");
    }
    for part in ["; rip 0x1000000 <tiny_entry+0x0> cs 0x10 cpl 0 ", " efer 0x500", "; code at rip: 0f 0b 90 90 "] {
        assert!(reason.contains(part), "{part:?} not in {reason:?}");
    }
    // The same report is in the log.
    assert!(stderr.contains("code at rip: 0f 0b 90"), "no report in the log:\n{stderr}");
    eprintln!("exit report ({}): {reason}", if emulated { "ring 0 emulated" } else { "ring 0 native" });

    // Without --system-map: no symbol, the rest the same.
    let out = run_kernel(&kernel, &[]);
    let summary = last_json_line(&out.stdout).expect("final JSON line");
    let reason = summary["timeline"]["exit_reason"].as_str().expect("an exit reason");
    assert!(reason.contains("; rip 0x1000000 cs 0x10 cpl 0 "), "{reason}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn unusable_system_map_is_refused_before_the_guest_runs() {
    if !kvm_available("unusable_system_map_is_refused_before_the_guest_runs") {
        return;
    }
    let dir = scratch_dir("exitdiag-map");
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, tiny_kernel(&[0xf4])).expect("write kernel");
    // Debian's linux-image package ships this stub.
    let stub = dir.join("System.map-stub");
    std::fs::write(&stub, "ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n")
        .expect("write stub");
    let missing = dir.join("no-such-System.map");
    for (map, expect) in [(&stub, "lists no code symbol"), (&missing, "cannot read System.map")] {
        let out = run_kernel(&kernel, &["--system-map", map.to_str().expect("utf-8 path")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{map:?} was accepted");
        assert!(stderr.contains(expect), "expected {expect:?} for {map:?}; stderr:\n{stderr}");
        assert!(last_json_line(&out.stdout).is_none(), "a VM ran with {map:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A kernel that loads an IDT with a #BP gate and executes `int3`; the handler moves
/// the return RIP it finds on its stack into RSP and executes `ud2` (no #UD gate: a
/// triple fault), so the report's RSP is the RIP the #BP pushed.
fn int3_kernel() -> (Vec<u8>, u64, u64) {
    const HANDLER: usize = 0x100;
    const IDT: usize = 0x200;
    const IDTR: usize = 0x300;
    let mut code = vec![0x90u8; 0x310];
    // lidt [rip + (IDTR - 7)]; int3; ud2
    code[0..3].copy_from_slice(&[0x0f, 0x01, 0x1d]);
    code[3..7].copy_from_slice(&((IDTR - 7) as u32).to_le_bytes());
    code[7] = 0xcc;
    code[8..10].copy_from_slice(&[0x0f, 0x0b]);
    // handler: mov rax, [rsp]; mov rsp, rax; ud2
    code[HANDLER..HANDLER + 9].copy_from_slice(&[0x48, 0x8b, 0x04, 0x24, 0x48, 0x89, 0xc4, 0x0f, 0x0b]);
    // 64-bit interrupt gate for vector 3: handler, selector 0x10 (boot CS), present, DPL 0.
    let handler = ENTRY + HANDLER as u64;
    let gate = &mut code[IDT + 3 * 16..IDT + 4 * 16];
    gate.fill(0);
    gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&0x10u16.to_le_bytes());
    gate[5] = 0x8e;
    gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    gate[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    code[IDT..IDT + 3 * 16].fill(0);
    code[IDT + 4 * 16..IDT + 16 * 16].fill(0);
    code[IDTR..IDTR + 2].copy_from_slice(&(16u16 * 16 - 1).to_le_bytes());
    code[IDTR + 2..IDTR + 10].copy_from_slice(&(ENTRY + IDT as u64).to_le_bytes());
    (tiny_kernel(&code), handler + 7, ENTRY + 8)
}

#[test]
fn kernel_int3_reaches_the_guest_bp_handler() {
    if !kvm_available("kernel_int3_reaches_the_guest_bp_handler") {
        return;
    }
    let dir = scratch_dir("exitdiag-int3");
    let kernel = dir.join("int3-vmlinux");
    let (image, handler_ud2, after_int3) = int3_kernel();
    std::fs::write(&kernel, image).expect("write kernel");
    let out = run_kernel(&kernel, &[]);
    let summary = last_json_line(&out.stdout).expect("final JSON line");
    let reason = summary["timeline"]["exit_reason"].as_str().expect("an exit reason");
    let expect = format!("; rip {handler_ud2:#x} cs 0x10 cpl 0 rsp {after_int3:#x} ");
    assert!(reason.contains(&expect), "the #BP handler did not run with RIP {after_int3:#x} pushed: {reason}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Where KVM emulates guest-kernel code (kvm_pvm), an instruction its emulator lacks
/// (`xrstor64 (%rdi)`, group 15) stops the vCPU with an emulation failure, reported
/// with the instruction bytes KVM sends; natively (CR4.OSXSAVE clear) it is a #UD,
/// which the empty IDT turns into a triple fault.
#[test]
fn unemulated_instruction_is_reported_with_kvm_instruction_bytes() {
    if !kvm_available("unemulated_instruction_is_reported_with_kvm_instruction_bytes") {
        return;
    }
    let dir = scratch_dir("exitdiag-xrstor");
    let kernel = dir.join("xrstor-vmlinux");
    // mov edi, 0x2000; mov eax, 3; xor edx, edx; xrstor64 (%rdi); nops.
    let mut code = vec![0xbf, 0x00, 0x20, 0x00, 0x00, 0xb8, 0x03, 0x00, 0x00, 0x00, 0x31, 0xd2, 0x48, 0x0f, 0xae, 0x2f];
    code.resize(48, 0x90);
    std::fs::write(&kernel, tiny_kernel(&code)).expect("write kernel");
    let out = run_kernel(&kernel, &[]);
    let summary = last_json_line(&out.stdout).expect("final JSON line");
    let reason = summary["timeline"]["exit_reason"].as_str().expect("an exit reason");
    assert!(reason.contains("; rip 0x100000c cs 0x10 cpl 0 "), "{reason}");
    assert!(reason.contains("; code at rip: 48 0f ae 2f 90"), "{reason}");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(
            reason.starts_with(
                "error: KVM_EXIT_INTERNAL_ERROR: suberror 1 KVM_INTERNAL_ERROR_EMULATION (KVM's instruction \
                 emulator failed), instruction bytes (from KVM) 48 0f ae 2f 90"
            ),
            "{reason}"
        );
    } else {
        assert!(reason.contains("KVM_EXIT_SHUTDOWN") || reason.contains("KVM_EXIT_INTERNAL_ERROR"), "{reason}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
