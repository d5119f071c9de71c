//! CPUID for a vCPU: the host's `KVM_GET_SUPPORTED_CPUID` with per-vCPU APIC ids, and,
//! where KVM runs guest-kernel instructions through its instruction emulator, without
//! the features whose instructions that emulator cannot execute.
//!
//! Why: under a shadow-paging KVM such as `kvm_pvm` every guest write to a page KVM
//! write-protects (a page that is, or recently was, a guest page table) is emulated
//! by KVM's x86 emulator. An instruction it does not implement then stops the vCPU
//! with `KVM_EXIT_INTERNAL_ERROR` (suberror 1). Linux picks such instructions only
//! when CPUID offers their feature, so hiding the feature makes it use a fallback
//! the emulator handles. Each entry of [`UNEMULATED_FEATURES`] says what hit it.

use std::sync::OnceLock;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// One CPUID feature bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    /// Leaf (EAX input).
    pub leaf: u32,
    /// Subleaf (ECX input); ignored for leaves without subleaves.
    pub subleaf: u32,
    /// Register holding the bit.
    pub reg: Reg,
    /// Bit number.
    pub bit: u32,
    /// Linux's name of the feature (`/proc/cpuinfo` flag).
    pub name: &'static str,
}

/// Features hidden where KVM emulates guest-kernel instructions, with the reason:
///
/// - `cx16` (CMPXCHG16B): KVM's emulator refuses the 16-byte form (`em_cmpxchg8b`
///   returns X86EMUL_UNHANDLEABLE). The Debian 6.1 cloud kernel stopped at
///   `lock cmpxchg16b 0x20(%rbp)` in `get_partial_node.part.0+0xd0` (SLUB's
///   `cmpxchg_double` of a slab's freelist and counters) right after `Memory:` at
///   guest time 140 s. Without cx16 SLUB takes its slab-lock path.
/// - `xsave` (and `osxsave`, leaf 0xd, and the AVX family, whose state only XSAVE
///   manages): KVM's emulator implements none of XSAVE/XRSTOR/XSAVEOPT/XSAVES (of
///   group 15 it has only FXSAVE, FXRSTOR and CLFLUSH). The kernel then stopped at
///   `xrstor64 (%rdi)` in `fpu__init_system_xstate+0x9b8` (guest time 168 s). Without
///   xsave it manages the FPU with FXSAVE/FXRSTOR, which the emulator has.
pub const UNEMULATED_FEATURES: &[Feature] = &[
    f(1, 0, Reg::Ecx, 13, "cx16"),
    f(1, 0, Reg::Ecx, 26, "xsave"),
    f(1, 0, Reg::Ecx, 27, "osxsave"),
    f(1, 0, Reg::Ecx, 28, "avx"),
    f(1, 0, Reg::Ecx, 12, "fma"),
    f(1, 0, Reg::Ecx, 29, "f16c"),
    f(7, 0, Reg::Ebx, 5, "avx2"),
    f(7, 0, Reg::Ebx, 16, "avx512f"),
    f(7, 0, Reg::Ebx, 17, "avx512dq"),
    f(7, 0, Reg::Ebx, 21, "avx512ifma"),
    f(7, 0, Reg::Ebx, 26, "avx512pf"),
    f(7, 0, Reg::Ebx, 27, "avx512er"),
    f(7, 0, Reg::Ebx, 28, "avx512cd"),
    f(7, 0, Reg::Ebx, 30, "avx512bw"),
    f(7, 0, Reg::Ebx, 31, "avx512vl"),
    f(7, 0, Reg::Ecx, 1, "avx512vbmi"),
    f(7, 0, Reg::Ecx, 6, "avx512_vbmi2"),
    f(7, 0, Reg::Ecx, 9, "vaes"),
    f(7, 0, Reg::Ecx, 10, "vpclmulqdq"),
    f(7, 0, Reg::Ecx, 11, "avx512_vnni"),
    f(7, 0, Reg::Ecx, 12, "avx512_bitalg"),
    f(7, 0, Reg::Ecx, 14, "avx512_vpopcntdq"),
    f(7, 0, Reg::Edx, 2, "avx512_4vnniw"),
    f(7, 0, Reg::Edx, 3, "avx512_4fmaps"),
    f(7, 0, Reg::Edx, 8, "avx512_vp2intersect"),
    f(7, 0, Reg::Edx, 23, "avx512_fp16"),
    f(7, 1, Reg::Eax, 4, "avx_vnni"),
    f(7, 1, Reg::Eax, 5, "avx512_bf16"),
];

/// Leaves cleared entirely (every subleaf) with [`UNEMULATED_FEATURES`]: 0xd, the
/// XSAVE state components, which mean nothing without xsave.
pub const UNEMULATED_LEAVES: &[u32] = &[0xd];

const fn f(leaf: u32, subleaf: u32, reg: Reg, bit: u32, name: &'static str) -> Feature {
    Feature { leaf, subleaf, reg, bit, name }
}

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// Clears `features` in `cpuid`. Leaves with a subleaf (`KVM_CPUID_FLAG_SIGNIFCANT_INDEX`)
/// match on it too.
pub fn hide(cpuid: &mut CpuId, features: &[Feature]) {
    for e in cpuid.as_mut_slice() {
        let indexed = e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0;
        for f in features {
            if e.function == f.leaf && (!indexed || e.index == f.subleaf) {
                *reg_mut(e, f.reg) &= !(1 << f.bit);
            }
        }
    }
}

/// Zeroes the registers of every subleaf of `leaves` in `cpuid`.
pub fn clear_leaves(cpuid: &mut CpuId, leaves: &[u32]) {
    for e in cpuid.as_mut_slice().iter_mut().filter(|e| leaves.contains(&e.function)) {
        (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
    }
}

/// True where KVM emulates guest-kernel instructions (the `kvm_pvm` module is loaded:
/// shadow paging, see the module doc). Checked once per process.
pub fn kernel_instructions_emulated() -> bool {
    static EMULATED: OnceLock<bool> = OnceLock::new();
    *EMULATED.get_or_init(|| std::path::Path::new("/sys/module/kvm_pvm").exists())
}

/// Adjusts the supported CPUID for vCPU `index`: its initial APIC id in leaf 1 and
/// its x2APIC id in leaf 0xb, so that every vCPU sees a distinct id; where
/// [`kernel_instructions_emulated`], without [`UNEMULATED_FEATURES`].
pub fn for_vcpu(supported: &CpuId, index: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(index) << 24);
            }
            0xb => {
                entry.edx = u32::from(index);
            }
            _ => {}
        }
    }
    if kernel_instructions_emulated() {
        hide(&mut cpuid, UNEMULATED_FEATURES);
        clear_leaves(&mut cpuid, UNEMULATED_LEAVES);
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, flags: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, flags, ecx, ebx: !0, ..Default::default() }
    }

    #[test]
    fn hides_only_the_named_bits() {
        let flag = kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        let mut cpuid =
            CpuId::from_entries(&[entry(1, 0, 0, !0), entry(7, 0, flag, !0), entry(7, 1, flag, !0)]).unwrap();
        let features = [
            Feature { leaf: 1, subleaf: 0, reg: Reg::Ecx, bit: 13, name: "cx16" },
            Feature { leaf: 7, subleaf: 1, reg: Reg::Ecx, bit: 3, name: "test" },
        ];
        hide(&mut cpuid, &features);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ecx, !(1 << 13));
        assert_eq!(e[0].ebx, !0, "other registers untouched");
        assert_eq!(e[1].ecx, !0, "subleaf 0 of an indexed leaf untouched");
        assert_eq!(e[2].ecx, !(1 << 3));
    }

    #[test]
    fn apic_ids_per_vcpu() {
        let cpuid = CpuId::from_entries(&[entry(1, 0, 0, 0), entry(0xb, 0, 0, 0)]).unwrap();
        let c = for_vcpu(&cpuid, 3);
        assert_eq!(c.as_slice()[0].ebx >> 24, 3);
        assert_eq!(c.as_slice()[1].edx, 3);
    }

    #[test]
    fn cleared_leaves_are_zero() {
        let mut cpuid = CpuId::from_entries(&[entry(0xd, 0, 0, 7), entry(0xd, 1, 0, 7), entry(1, 0, 0, 7)]).unwrap();
        clear_leaves(&mut cpuid, &[0xd]);
        let e = cpuid.as_slice();
        assert_eq!((e[0].ebx, e[0].ecx, e[1].ecx), (0, 0, 0));
        assert_eq!((e[2].ebx, e[2].ecx), (!0, 7));
    }

    #[test]
    fn the_list_names_each_bit_once() {
        let find = |name| UNEMULATED_FEATURES.iter().find(|f| f.name == name).map(|f| (f.leaf, f.reg, f.bit));
        assert_eq!(find("cx16"), Some((1, Reg::Ecx, 13)));
        assert_eq!(find("xsave"), Some((1, Reg::Ecx, 26)));
        assert_eq!(find("avx2"), Some((7, Reg::Ebx, 5)));
        for (i, a) in UNEMULATED_FEATURES.iter().enumerate() {
            for b in &UNEMULATED_FEATURES[i + 1..] {
                assert!((a.leaf, a.subleaf, a.reg, a.bit) != (b.leaf, b.subleaf, b.reg, b.bit), "{a:?} {b:?}");
            }
        }
    }
}
