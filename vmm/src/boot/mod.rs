//! Boot sources.

pub mod linux;
pub mod ring0_probe;
