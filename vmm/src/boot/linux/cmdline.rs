//! The Linux kernel command line densevm passes to a guest.

/// Largest command line (without its NUL) densevm writes when the kernel does not
/// say (an ELF vmlinux has no setup header; Linux's x86 COMMAND_LINE_SIZE is 2048).
pub const DEFAULT_CMDLINE_MAX: usize = 2047;

/// One virtio-mmio device, announced to the guest on the command line as
/// `virtio_mmio.device=<size>@<addr>:<irq>` (and in the DSDT, which owns the type).
pub use crate::arch::acpi::VirtioMmioSlot;

/// Errors building the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The command line does not fit the kernel's limit.
    #[error("kernel command line is {len} bytes, the kernel accepts at most {max}")]
    TooLong {
        /// Length of the built command line (without NUL).
        len: usize,
        /// Largest length accepted.
        max: usize,
    },
    /// The command line holds a byte Linux cannot take (NUL, control or non-ASCII).
    #[error("kernel command line has an invalid character {0:?} (printable ASCII only)")]
    InvalidChar(char),
    /// A virtio-mmio slot has size 0.
    #[error("virtio-mmio device at {0:#x} has size 0")]
    ZeroSizeDevice(u64),
}

/// Parameters added when the user's command line does not set them: a serial console,
/// reboot through the keyboard controller (the VMM sees the i8042 reset and stops the
/// VM), and reboot (so stop) one second after a panic instead of hanging.
const DEFAULTS: &[(&str, &str)] = &[("console=", "console=ttyS0"), ("reboot=", "reboot=k"), ("panic=", "panic=1")];

/// Parameters added, when absent, where KVM emulates guest-kernel instructions
/// (`kvm_pvm`, see `crate::arch::cpuid`), to keep the kernel off instructions KVM's
/// emulator lacks whose CPUID bit the VMM cannot clear there:
///
/// - `noxsave`: KVM's emulator has no XSAVE/XRSTOR (of group 15 only FXSAVE,
///   FXRSTOR, CLFLUSH); the Debian 6.1 kernel stopped at `xrstor64 (%rdi)` in
///   `fpu__init_system_xstate+0x9b8` (guest time 168 s). With `noxsave` it clears
///   xsave and what depends on it (AVX...) and uses FXSAVE/FXRSTOR.
/// - `clearcpuid=smap`: the emulator has no CLAC/STAC (`0f 01 ca`/`cb`); once
///   alternatives were applied the kernel stopped at `clac` in
///   `asm_common_interrupt+0x0` (guest time 370 s). kvm_pvm does not offer smap in
///   its supported CPUID, so the bit cannot be cleared there; without the feature
///   the CLAC/STAC sites stay NOPs. (`nosmap` is gone since Linux 5.19: 6.1 ignored
///   it and stopped at the same `clac`.) A user's own `clearcpuid=` replaces it.
/// - `clearcpuid=popcnt` (same parameter): the emulator has no POPCNT; with smap
///   off the kernel stopped at `popcnt %rdi,%rax` in `__bitmap_weight+0x41` (the
///   patched `hweight64`); without the feature it calls the software version.
/// - `clearcpuid=ssse3` (same parameter): kernel SIMD code needs instructions the
///   emulator lacks. The Debian kernel stopped at `ldmxcsr 0x4(%rsp)` in
///   `kernel_fpu_begin_mask+0x6e` (guest time 359 s, at the initramfs unpacking);
///   of its callers in that kernel (System.map and the disassembly) only
///   `blake2s_compress` (the RNG's hash, SSSE3 code) runs without EFI, and it uses
///   SIMD only when the CPU has SSSE3. `ldmxcsr` itself is completed by densevm
///   ([`crate::arch::mxcsr`]); the `pshufb`s after it could not be.
/// - `clearcpuid=erms,fsrm` (same parameter): not an emulator gap but its cost:
///   with ERMS/FSRM `memcpy`, `memset`, `clear_page` and the user copies are
///   `rep movsb`/`stosb`, which the emulator runs one byte per iteration; without
///   them they use `rep movsq`/`stosq`, 8 bytes per iteration.
/// - `nowatchdog`: with kernel code ~100 times slower than native, the soft-lockup
///   detector fires on ordinary boot work (the Debian kernel reported
///   `ftrace_check_work_func`, its check of 37609 ftrace sites, stuck for 26 s at
///   guest time 417 s, and again every 28 s), and each report's stack trace is
///   itself a few seconds of emulated kallsyms lookups and console output.
/// - `clocksource=kvm-clock`: keeps the clocksource the kernel boots on. Without
///   it the Debian kernel (with `tsc=reliable`) switched to the TSC in
///   `clocksource_done_booting`, through `stop_machine`, and stalled there under
///   emulation: soft lockups of `migration/0` every 28 s for 250 s of guest time
///   until it was stopped. With it, the switch is skipped (the chosen source is
///   already current) and that initcall passed at guest time 30 s.
/// - `initcall_blacklist=ftrace_check_for_weak_functions`: that initcall queues a
///   check of every ftrace call site (37609 in the Debian kernel, a kallsyms
///   lookup each) which took 220 s of emulated guest time. It only marks the
///   records of overridden weak functions as disabled, which matters to someone
///   who turns on function tracing for those; a user's own
///   `initcall_blacklist=` replaces it.
/// - `cryptomgr.notests`: the kernel tests each crypto algorithm as it registers;
///   the RSA and DH tests' multi-precision arithmetic (`mpihelp_submul_1`,
///   `mpihelp_addmul_1`: 37% of the emulated instructions, sampled with the
///   `kvm:kvm_emulate_insn` tracepoint) kept the Debian kernel busy from guest
///   time 190 s to 625 s before `/init`, and made its X.509 certificate load
///   wait 61 s (once time out: `Problem loading in-kernel X.509 certificate
///   (-110)`). With it, `/init` ran 11 s after the last initcall line. A kernel
///   booted with `fips=1` runs the tests anyway.
pub const EMULATED_KERNEL_PARAMS: &[(&str, &str)] = &[
    ("noxsave", "noxsave"),
    ("clearcpuid=", "clearcpuid=smap,popcnt,ssse3,erms,fsrm"),
    ("nowatchdog", "nowatchdog"),
    ("clocksource=", "clocksource=kvm-clock"),
    ("initcall_blacklist=", "initcall_blacklist=ftrace_check_for_weak_functions"),
    ("cryptomgr.notests", "cryptomgr.notests"),
];

/// Formats a size like Linux's `memparse` reads it back (`4K`, `2M`, `1G`, or bytes).
fn size_str(size: u64) -> String {
    const K: u64 = 1 << 10;
    for (unit, suffix) in [(K << 20, "G"), (K << 10, "M"), (K, "K")] {
        if size.is_multiple_of(unit) {
            return format!("{}{suffix}", size / unit);
        }
    }
    size.to_string()
}

/// The `virtio_mmio.device=` parameter of one slot.
pub fn virtio_mmio_param(slot: &VirtioMmioSlot) -> Result<String, Error> {
    if slot.size == 0 {
        return Err(Error::ZeroSizeDevice(slot.addr));
    }
    Ok(format!("virtio_mmio.device={}@{:#x}:{}", size_str(slot.size), slot.addr, slot.irq))
}

/// Byte offset of a ` -- ` separator (outside double quotes) that starts the init
/// arguments, if any.
fn init_args_start(cmdline: &str) -> Option<usize> {
    let bytes = cmdline.as_bytes();
    let mut quoted = false;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'"' {
            quoted = !quoted;
        }
        let starts_token = i == 0 || bytes[i - 1] == b' ';
        let ends_token = bytes.get(i + 2).is_none_or(|&c| c == b' ');
        if !quoted && starts_token && ends_token && bytes[i..].starts_with(b"--") {
            return Some(i);
        }
    }
    None
}

/// Builds the command line: the user's parameters, the defaults it lacks
/// (`console=ttyS0`, `reboot=k`, `panic=1`), then one `virtio_mmio.device=` per slot;
/// init arguments after ` -- ` stay last. Fails if the result is longer than `max`
/// bytes (without the NUL the VMM appends).
pub fn build_cmdline(user: &str, slots: &[VirtioMmioSlot], max: usize) -> Result<String, Error> {
    build_cmdline_with(user, slots, &[], max)
}

/// [`build_cmdline`] with `extra` parameters (key prefix, parameter) added after the
/// defaults when the user's command line has no parameter starting with the key.
pub fn build_cmdline_with(
    user: &str,
    slots: &[VirtioMmioSlot],
    extra: &[(&str, &str)],
    max: usize,
) -> Result<String, Error> {
    if let Some(c) = user.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
        return Err(Error::InvalidChar(c));
    }
    let (boot, init) = match init_args_start(user) {
        Some(i) => (&user[..i], Some(&user[i..])),
        None => (user, None),
    };
    let parts: Vec<&str> = boot.split(' ').filter(|s| !s.is_empty()).collect();
    let mut out = boot.trim().to_string();
    for (key, param) in DEFAULTS.iter().chain(extra) {
        if !parts.iter().any(|p| p.starts_with(key)) {
            push_param(&mut out, param);
        }
    }
    for slot in slots {
        push_param(&mut out, &virtio_mmio_param(slot)?);
    }
    if let Some(init) = init {
        push_param(&mut out, init.trim());
    }
    if out.len() > max {
        return Err(Error::TooLong { len: out.len(), max });
    }
    Ok(out)
}

fn push_param(out: &mut String, param: &str) {
    if !out.is_empty() {
        out.push(' ');
    }
    out.push_str(param);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(addr: u64, irq: u32) -> VirtioMmioSlot {
        VirtioMmioSlot { addr, size: 0x1000, irq }
    }

    #[test]
    fn adds_console_and_devices() {
        let c = build_cmdline("quiet", &[slot(0xd000_0000, 5), slot(0xd000_1000, 6)], 2047).unwrap();
        assert_eq!(
            c,
            "quiet console=ttyS0 reboot=k panic=1 \
             virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
    }

    #[test]
    fn keeps_user_console_and_init_args_last() {
        let c = build_cmdline("console=hvc0 panic=-1 -- init-arg", &[slot(0x1000, 9)], 2047).unwrap();
        assert_eq!(c, "console=hvc0 panic=-1 reboot=k virtio_mmio.device=4K@0x1000:9 -- init-arg");
        let c = build_cmdline("", &[], 2047).unwrap();
        assert_eq!(c, "console=ttyS0 reboot=k panic=1");
        // "--" inside quotes or inside a token is not the separator.
        let c = build_cmdline("a=\"x -- y\" b--c", &[], 2047).unwrap();
        assert_eq!(c, "a=\"x -- y\" b--c console=ttyS0 reboot=k panic=1");
    }

    #[test]
    fn extra_params_when_absent() {
        let c = build_cmdline_with("quiet", &[], EMULATED_KERNEL_PARAMS, 2047).unwrap();
        assert_eq!(
            c,
            "quiet console=ttyS0 reboot=k panic=1 noxsave clearcpuid=smap,popcnt,ssse3,erms,fsrm nowatchdog \
             clocksource=kvm-clock initcall_blacklist=ftrace_check_for_weak_functions cryptomgr.notests"
        );
        // A parameter the user gives (by its key) is not added again.
        let user = "noxsave clocksource=tsc initcall_blacklist=foo -- a";
        let c = build_cmdline_with(user, &[slot(0x1000, 9)], EMULATED_KERNEL_PARAMS, 2047).unwrap();
        assert_eq!(
            c,
            "noxsave clocksource=tsc initcall_blacklist=foo console=ttyS0 reboot=k panic=1 \
             clearcpuid=smap,popcnt,ssse3,erms,fsrm nowatchdog cryptomgr.notests virtio_mmio.device=4K@0x1000:9 -- a"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(size_str(0x200), "512");
        assert_eq!(size_str(0x1000), "4K");
        assert_eq!(size_str(0x20_0000), "2M");
        assert_eq!(size_str(1 << 30), "1G");
        let zero = VirtioMmioSlot { addr: 0x1000, size: 0, irq: 5 };
        assert_eq!(virtio_mmio_param(&zero), Err(Error::ZeroSizeDevice(0x1000)));
    }

    #[test]
    fn limits() {
        let long = "x".repeat(2047);
        let err = build_cmdline(&long, &[], 2047).unwrap_err();
        assert!(matches!(err, Error::TooLong { max: 2047, .. }), "{err}");
        let fits = "x".repeat(2047 - " console=ttyS0 reboot=k panic=1".len());
        assert_eq!(build_cmdline(&fits, &[], 2047).unwrap().len(), 2047);
        assert_eq!(build_cmdline("a\0b", &[], 2047), Err(Error::InvalidChar('\0')));
        assert_eq!(build_cmdline("a\nb", &[], 2047), Err(Error::InvalidChar('\n')));
        assert_eq!(build_cmdline("é", &[], 2047), Err(Error::InvalidChar('é')));
    }
}
