//! densevm VMM library: KVM microVMs whose memory densevm owns.
//!
//! The `densevm` crate builds the command (CLI, API daemon, benchmarks) on top of
//! this library; end-to-end tests use it directly too.

pub mod admission;
pub mod arch;
pub mod balloon;
pub mod boot;
pub mod control;
pub mod device_manager;
pub mod dirty_log;
pub mod domains;
pub mod driver;
pub mod error_kind;
pub mod guest_ram;
pub mod host;
pub mod scenarios;
pub mod vcpu;
pub mod vm;
pub mod workload;
