//! Errors of the merger's handle ([`super::Merger`]).
//!
//! A leaf: it names only the tunables' own error, so the memory manager's
//! error ([`crate::manager::Error::Merge`]) can carry it without importing the
//! merger.

use std::io;

use super::tunables;

/// Errors of the merger.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tunable is out of range.
    #[error(transparent)]
    Tunables(#[from] tunables::Error),
    /// Spawning the scanner thread failed.
    #[error("spawning the merge scanner: {0}")]
    Spawn(io::Error),
    /// The scanner thread is not running (stopped or panicked).
    #[error("the merge scanner is not running")]
    Stopped,
    /// Unmerging failed.
    #[error("unmerge-all failed: {0}")]
    Unmerge(String),
}
