//! Guest pages as the balloon sees them: coalescing page frame numbers into
//! ranges for the backend, and the set of pages currently in the balloon.

use vm_memory::GuestAddress;

/// The balloon's page size (the virtio-balloon ABI is in 4 KiB pages whatever
/// the guest's page size).
pub const PAGE_SHIFT: u32 = 12;
/// The balloon's page size in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// A range of guest-physical memory: its start and length in bytes.
pub type Range = (GuestAddress, u64);

/// Coalesces page frame numbers (in any order, possibly repeated) into the
/// fewest sorted, disjoint, non-adjacent ranges covering exactly those pages.
pub fn coalesce(pfns: &mut [u64]) -> Vec<Range> {
    pfns.sort_unstable();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for &pfn in pfns.iter() {
        match ranges.last_mut() {
            Some((start, count)) if pfn < *start + *count => {}
            Some((start, count)) if pfn == *start + *count => *count += 1,
            _ => ranges.push((pfn, 1)),
        }
    }
    ranges.into_iter().map(|(start, count)| (GuestAddress(start << PAGE_SHIFT), count << PAGE_SHIFT)).collect()
}

/// Sorts byte ranges and merges overlapping or adjacent ones.
pub fn merge(ranges: &mut Vec<Range>) {
    ranges.sort_unstable_by_key(|r| r.0);
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for &(start, len) in ranges.iter() {
        match out.last_mut() {
            Some((s, l)) if start.0 <= s.0 + *l => *l = (*l).max(start.0 + len - s.0),
            _ => out.push((start, len)),
        }
    }
    *ranges = out;
}

/// One bit per guest page up to the end of guest memory: the pages in the balloon.
#[derive(Debug, Default)]
pub struct PageSet {
    words: Vec<u64>,
    pages: u64,
    len: u64,
}

impl PageSet {
    /// An empty set for pages `0..pages`.
    pub fn new(pages: u64) -> Self {
        PageSet { words: vec![0; pages.div_ceil(64) as usize], pages, len: 0 }
    }

    /// Adds `pfn`; false when it was already in the set or lies past the end.
    pub fn insert(&mut self, pfn: u64) -> bool {
        self.flip(pfn, true)
    }

    /// Removes `pfn`; false when it was not in the set.
    pub fn remove(&mut self, pfn: u64) -> bool {
        self.flip(pfn, false)
    }

    /// Empties the set.
    pub fn clear(&mut self) {
        self.words.fill(0);
        self.len = 0;
    }

    /// Pages in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn flip(&mut self, pfn: u64, set: bool) -> bool {
        if pfn >= self.pages {
            return false;
        }
        let (word, bit) = ((pfn / 64) as usize, 1u64 << (pfn % 64));
        let was = self.words[word] & bit != 0;
        if was == set {
            return false;
        }
        self.words[word] ^= bit;
        if set {
            self.len += 1;
        } else {
            self.len -= 1;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn coalesces_runs() {
        let mut pfns = vec![7, 3, 4, 5, 9, 8, 4, 20];
        let r = coalesce(&mut pfns);
        assert_eq!(
            r,
            vec![(GuestAddress(3 << 12), 3 << 12), (GuestAddress(7 << 12), 3 << 12), (GuestAddress(20 << 12), 1 << 12)]
        );
        assert!(coalesce(&mut []).is_empty());
    }

    #[test]
    fn merges_byte_ranges() {
        let mut r =
            vec![(GuestAddress(0x3000), 0x1000), (GuestAddress(0x1000), 0x2000), (GuestAddress(0x8000), 0x1000)];
        merge(&mut r);
        assert_eq!(r, vec![(GuestAddress(0x1000), 0x3000), (GuestAddress(0x8000), 0x1000)]);
    }

    #[test]
    fn page_set_tracks_membership() {
        let mut s = PageSet::new(100);
        assert!(s.insert(99));
        assert!(!s.insert(99));
        assert_eq!(s.len(), 1);
        assert!(!s.insert(100));
        assert!(s.remove(99));
        assert!(!s.remove(99));
        assert!(!s.remove(5));
        assert!(s.is_empty());
    }

    proptest! {
        #[test]
        fn coalesced_ranges_cover_exactly_the_pages(mut pfns in proptest::collection::vec(0u64..2048, 0..600)) {
            let want: BTreeSet<u64> = pfns.iter().copied().collect();
            let ranges = coalesce(&mut pfns);
            let mut got = BTreeSet::new();
            for (i, &(start, len)) in ranges.iter().enumerate() {
                prop_assert!(len > 0 && len % PAGE_SIZE == 0 && start.0 % PAGE_SIZE == 0);
                if i > 0 {
                    let (ps, pl) = ranges[i - 1];
                    // Sorted, disjoint and not adjacent (else they would be one range).
                    prop_assert!(ps.0 + pl < start.0);
                }
                for p in (start.0 >> PAGE_SHIFT)..((start.0 + len) >> PAGE_SHIFT) {
                    prop_assert!(got.insert(p));
                }
            }
            prop_assert_eq!(got, want);
        }
    }
}
