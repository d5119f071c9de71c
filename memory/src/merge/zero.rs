//! Zero pages: detection and the hash of an all-zero page.
//!
//! With `merge_zero_pages` the merger does not share a zero frame (every
//! scattered remapped page would cost a VMA): it drops the page's host memory
//! (punches its frame, one punch per run of consecutive frames) and keeps it
//! write-protected, so it reads as zero and its first write is seen. A read
//! does fault host memory back in (shmem maps no shared zero page: see
//! docs/MERGE_COST.md). Such pages are counted as `zero_pages` (KSM's
//! `ksm_zero_pages`) and, sharing nothing, are allowed in every domain.

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
