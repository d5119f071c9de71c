//! The balloon's memory statistics: the driver fills a buffer of
//! `(le16 tag, le64 value)` entries (10 bytes each, packed) on the stats queue.

use std::time::SystemTime;

/// Size of one statistics entry in the buffer.
pub const ENTRY_SIZE: usize = 10;

/// The spec's statistics tags (Linux `VIRTIO_BALLOON_S_*`).
pub mod tag {
    /// Memory swapped in.
    pub const SWAP_IN: u16 = 0;
    /// Memory swapped out.
    pub const SWAP_OUT: u16 = 1;
    /// Major page faults.
    pub const MAJFLT: u16 = 2;
    /// Minor page faults.
    pub const MINFLT: u16 = 3;
    /// Free memory.
    pub const MEMFREE: u16 = 4;
    /// Total memory.
    pub const MEMTOT: u16 = 5;
    /// Available memory.
    pub const AVAIL: u16 = 6;
    /// Disk caches.
    pub const CACHES: u16 = 7;
    /// Successful hugetlb allocations.
    pub const HTLB_PGALLOC: u16 = 8;
    /// Failed hugetlb allocations.
    pub const HTLB_PGFAIL: u16 = 9;
    /// OOM killer invocations.
    pub const OOM_KILL: u16 = 10;
    /// Allocation stalls.
    pub const ALLOC_STALL: u16 = 11;
    /// Pages scanned by kswapd.
    pub const ASYNC_SCAN: u16 = 12;
    /// Pages scanned directly.
    pub const DIRECT_SCAN: u16 = 13;
    /// Pages reclaimed by kswapd.
    pub const ASYNC_RECLAIM: u16 = 14;
    /// Pages reclaimed directly.
    pub const DIRECT_RECLAIM: u16 = 15;
}

/// The latest statistics the driver reported; a field is `None` when the driver
/// did not send its tag. Memory amounts are in bytes, the rest are counts.
/// Serialized (for the API, which adds the balloon's size and the time as
/// seconds since the epoch) without `updated_at`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BalloonStats {
    /// Memory swapped in (bytes).
    pub swap_in: Option<u64>,
    /// Memory swapped out (bytes).
    pub swap_out: Option<u64>,
    /// Major page faults.
    pub major_faults: Option<u64>,
    /// Minor page faults.
    pub minor_faults: Option<u64>,
    /// Free memory (bytes).
    pub free_memory: Option<u64>,
    /// Total memory (bytes).
    pub total_memory: Option<u64>,
    /// Available memory, as the guest estimates it (bytes).
    pub available_memory: Option<u64>,
    /// Disk caches (bytes).
    pub disk_caches: Option<u64>,
    /// Successful hugetlb page allocations.
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb page allocations.
    pub hugetlb_failures: Option<u64>,
    /// OOM killer invocations.
    pub oom_kills: Option<u64>,
    /// Allocation stalls.
    pub alloc_stalls: Option<u64>,
    /// Pages scanned by kswapd.
    pub async_scans: Option<u64>,
    /// Pages scanned directly.
    pub direct_scans: Option<u64>,
    /// Pages reclaimed by kswapd.
    pub async_reclaims: Option<u64>,
    /// Pages reclaimed directly.
    pub direct_reclaims: Option<u64>,
    /// When the device received them (None before the first buffer).
    #[serde(skip)]
    pub updated_at: Option<SystemTime>,
}

impl BalloonStats {
    /// Records one entry; false for a tag the spec does not define (ignored).
    pub fn set(&mut self, tag: u16, value: u64) -> bool {
        let field = match tag {
            tag::SWAP_IN => &mut self.swap_in,
            tag::SWAP_OUT => &mut self.swap_out,
            tag::MAJFLT => &mut self.major_faults,
            tag::MINFLT => &mut self.minor_faults,
            tag::MEMFREE => &mut self.free_memory,
            tag::MEMTOT => &mut self.total_memory,
            tag::AVAIL => &mut self.available_memory,
            tag::CACHES => &mut self.disk_caches,
            tag::HTLB_PGALLOC => &mut self.hugetlb_allocations,
            tag::HTLB_PGFAIL => &mut self.hugetlb_failures,
            tag::OOM_KILL => &mut self.oom_kills,
            tag::ALLOC_STALL => &mut self.alloc_stalls,
            tag::ASYNC_SCAN => &mut self.async_scans,
            tag::DIRECT_SCAN => &mut self.direct_scans,
            tag::ASYNC_RECLAIM => &mut self.async_reclaims,
            tag::DIRECT_RECLAIM => &mut self.direct_reclaims,
            _ => return false,
        };
        *field = Some(value);
        true
    }

    /// Parses a buffer of entries (its length a multiple of [`ENTRY_SIZE`]);
    /// returns the statistics and the number of entries with unknown tags.
    pub fn parse(buf: &[u8], now: SystemTime) -> (Self, u64) {
        let mut stats = BalloonStats { updated_at: Some(now), ..Default::default() };
        let mut unknown = 0;
        for e in buf.chunks_exact(ENTRY_SIZE) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut value = [0u8; 8];
            value.copy_from_slice(&e[2..]);
            if !stats.set(tag, u64::from_le_bytes(value)) {
                unknown += 1;
            }
        }
        (stats, unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_and_counts_unknown_tags() {
        let mut buf = Vec::new();
        for (t, v) in [(tag::MEMFREE, 1u64 << 30), (tag::OOM_KILL, 3), (99, 7), (tag::MEMTOT, 2 << 30)] {
            buf.extend_from_slice(&t.to_le_bytes());
            buf.extend_from_slice(&v.to_le_bytes());
        }
        let now = SystemTime::now();
        let (s, unknown) = BalloonStats::parse(&buf, now);
        assert_eq!(unknown, 1);
        assert_eq!(s.free_memory, Some(1 << 30));
        assert_eq!(s.total_memory, Some(2 << 30));
        assert_eq!(s.oom_kills, Some(3));
        assert_eq!(s.swap_in, None);
        assert_eq!(s.updated_at, Some(now));
    }
}
