//! Zero pages: detection and the hash of an all-zero page.
//!
//! With `merge_zero_pages` the merger does not share a zero frame through the
//! frame table: it maps the page onto the pool's never-written zero region
//! (one mapping per run of pages) and frees its frame (one punch per run of
//! consecutive frames), keeping it write-protected, so it reads as zero, a
//! read allocates no host memory, and its first write is seen (see
//! docs/MERGE_COST.md). Such pages are counted as `zero_pages` (KSM's
//! `ksm_zero_pages`) and, sharing nothing but the zero region, are allowed in
//! every domain.

use std::sync::OnceLock;

use crate::PAGE_SIZE;

pub use crate::pool::is_zero;

/// The content hash of an all-zero page.
pub fn zero_hash() -> u64 {
    static HASH: OnceLock<u64> = OnceLock::new();
    *HASH.get_or_init(|| hash_page(&[0u8; PAGE_SIZE]))
}

/// The content hash the merger uses (xxh3, 64 bits).
pub fn hash_page(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        assert_eq!(hash_page(&page), zero_hash());
        page[PAGE_SIZE - 1] = 1;
        assert!(!is_zero(&page));
        assert!(!is_zero(&page[1..]));
        assert_ne!(hash_page(&page), zero_hash());
    }
}
