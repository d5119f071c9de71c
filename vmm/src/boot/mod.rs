//! Boot sources.

pub mod boot_file;
pub mod linux;
pub mod ring0_probe;
