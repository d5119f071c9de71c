//! densevm VMM: KVM microVMs whose memory densevm owns.

pub mod api_bridge;
pub mod arch;
pub mod boot;
pub mod cli;
pub mod commands;
pub mod control;
pub mod dirty_log;
pub mod guest_ram;
pub mod host;
pub mod ksm;
pub mod scenarios;
pub mod vcpu;
pub mod vm;
pub mod workload;
