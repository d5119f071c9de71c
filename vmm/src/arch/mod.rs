//! x86-64 vCPU setup and ACPI tables shared by the boot sources.

pub mod acpi;
pub mod cpl3;
pub mod cpuid;
pub mod exit_report;
pub mod fwait;
pub mod int3;
pub mod modrm;
pub mod mxcsr;
pub mod stack_scan;
pub mod syscall_fixup;
