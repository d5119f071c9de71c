//! The merger's (scanner's) allow-list: the page operations of merging (remaps,
//! write protection, hole punching, residency checks) and nothing else.

use super::rules::{self, Rules};

/// The allow-list of the merger thread.
pub fn rules() -> Rules {
    rules::union(rules::common(), rules::memory_ops())
}
