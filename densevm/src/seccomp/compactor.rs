//! The compactor's allow-list: the page operations of migrating frames.

use super::rules::{self, Rules};

/// The allow-list of the compactor thread.
pub fn rules() -> Rules {
    rules::union(rules::common(), rules::memory_ops())
}
