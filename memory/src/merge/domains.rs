//! Merge domains, per-VM merge settings and the dirty-page source a VMM plugs in.
//!
//! Merging across VMs leaks information (a write to a merged page is slower)
//! and helps Rowhammer placement, so every VM belongs to a merge domain (by
//! default its own id) and frames are shared only between VMs of one domain.
//! This is enforced by construction, twice: the merger's indexes are keyed by
//! domain (a lookup can only propose a frame of the same domain), and every
//! sharing operation (the transaction's domain check) refuses a frame mapped
//! by a VM of another domain. Zero pages share nothing (their memory is
//! dropped) and are handled in every domain.
//!
//! The settings themselves are kept by the memory core, next to the pages they
//! govern; this module re-exports their types.

pub use crate::core::{DirtyLog, DomainId, VmMergeConfig};
