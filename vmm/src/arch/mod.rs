//! x86-64 vCPU setup shared by the boot sources.

pub mod cpl3;
pub mod cpuid;
pub mod exit_report;
pub mod fwait;
pub mod int3;
