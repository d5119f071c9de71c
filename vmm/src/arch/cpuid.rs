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
///
/// kvm_pvm lets the VMM clear only the bits its `KVM_GET_SUPPORTED_CPUID` reports
/// (leaf 1 ECX there is just cx16, x2apic and hypervisor): the guest sees the
/// host's value of every other bit whatever `KVM_SET_CPUID2` says. Features outside
/// that set (xsave) are turned off on the kernel command line instead
/// ([`crate::boot::linux::cmdline::EMULATED_KERNEL_PARAMS`]).
pub const UNEMULATED_FEATURES: &[Feature] = &[Feature { leaf: 1, subleaf: 0, reg: Reg::Ecx, bit: 13, name: "cx16" }];

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
    fn the_list_names_each_bit_once() {
        let find = |name| UNEMULATED_FEATURES.iter().find(|f| f.name == name).map(|f| (f.leaf, f.reg, f.bit));
        assert_eq!(find("cx16"), Some((1, Reg::Ecx, 13)));
        for (i, a) in UNEMULATED_FEATURES.iter().enumerate() {
            for b in &UNEMULATED_FEATURES[i + 1..] {
                assert!((a.leaf, a.subleaf, a.reg, a.bit) != (b.leaf, b.subleaf, b.reg, b.bit), "{a:?} {b:?}");
            }
        }
    }
}

#[cfg(test)]
mod kvm_tests {
    use super::*;

    /// KVM keeps hidden the features densevm hides that it reports as supported
    /// (where /dev/kvm works).
    #[test]
    fn hidden_supported_features_stay_hidden() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            crate::boot::linux::tests::skip("hidden_supported_features_stay_hidden: /dev/kvm not usable");
            return;
        };
        let supported = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut wanted = for_vcpu(&supported, 0);
        hide(&mut wanted, UNEMULATED_FEATURES);
        vcpu.set_cpuid2(&wanted).unwrap();
        let got = vcpu.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
        let bit = |c: &CpuId, f: &Feature| {
            c.as_slice().iter().find(|e| e.function == f.leaf && e.index == f.subleaf).map(|e| {
                let mut e = *e;
                *reg_mut(&mut e, f.reg) >> f.bit & 1
            })
        };
        for f in UNEMULATED_FEATURES {
            if bit(&supported, f) == Some(1) {
                assert_eq!(bit(&got, f), Some(0), "{} is still visible to the guest", f.name);
            }
        }
    }
}
