//! CPUID for a vCPU: the host's `KVM_GET_SUPPORTED_CPUID` with per-vCPU APIC ids.

use kvm_bindings::CpuId;

/// Adjusts the supported CPUID for vCPU `index`: its initial APIC id in leaf 1 and
/// its x2APIC id in leaf 0xb, so that every vCPU sees a distinct id.
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
    cpuid
}
