//! The scanner's per-VM state: one small record per guest page (cached hash,
//! frame at hashing time, class of the last visit, smart-scan age), the
//! accumulated dirty bitmap of the VM's dirty log, and the pages the idle mode
//! still has to revisit ([`super::backoff`]).

use crate::FrameNo;

/// What the last visit found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Class {
    /// Never visited.
    Unvisited = 0,
    /// Changed since the previous visit.
    Volatile = 1,
    /// Unique so far (in the unstable index).
    Unshared = 2,
    /// Maps a shared frame.
    Merged = 3,
    /// Not a candidate: no host memory (never written, discarded, zeroed).
    Other = 4,
}

const CLASSES: usize = 5;

/// Per-page record (16 bytes).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PageState {
    /// Content hash at the last hashing.
    pub hash: u64,
    /// Frame the page mapped when hashed.
    pub frame: FrameNo,
    /// Whether `hash` is valid.
    pub hashed: bool,
    class: u8,
    /// Checksum mode: consecutive visits that found the page unchanged and
    /// still unshared (KSM's `rmap_item->age`, saturating).
    pub age: u8,
    /// Checksum mode: visits still to skip before the next check (KSM's
    /// `remaining_skips`).
    pub skips: u8,
}

/// Scan state of one VM.
pub(crate) struct VmScan {
    /// Host address of the VM's RAM when this state was created (identity).
    pub host_addr: usize,
    /// One record per guest page.
    pub pages: Vec<PageState>,
    /// Dirty pages reported by the dirty log and not yet visited.
    pub dirty: Vec<u64>,
    /// The dirty log is registered and answered at the last batch.
    pub dirty_log: bool,
    /// Idle mode: pages found changed at the last poll, to visit once they
    /// stay clean for a poll interval (sorted, no duplicates).
    pub pending: Vec<u32>,
    /// Pages that entered [`Class::Volatile`] from another class (changes seen).
    pub newly_volatile: u64,
    counts: [u64; CLASSES],
}

impl VmScan {
    /// State for a VM of `pages` pages at `host_addr`.
    pub fn new(host_addr: usize, pages: u32) -> Self {
        let mut counts = [0; CLASSES];
        counts[Class::Unvisited as usize] = u64::from(pages);
        VmScan {
            host_addr,
            pages: vec![PageState::default(); pages as usize],
            dirty: Vec::new(),
            dirty_log: false,
            pending: Vec::new(),
            newly_volatile: 0,
            counts,
        }
    }

    /// Records the class of page `p`.
    pub fn set_class(&mut self, p: u32, class: Class) {
        let Some(ps) = self.pages.get_mut(p as usize) else {
            return;
        };
        self.counts[ps.class as usize] -= 1;
        if class == Class::Volatile && ps.class != Class::Volatile as u8 {
            self.newly_volatile += 1;
        }
        ps.class = class as u8;
        self.counts[class as usize] += 1;
    }

    /// The class page `p` got at its last visit.
    pub fn class(&self, p: u32) -> Class {
        match self.pages.get(p as usize).map_or(0, |ps| ps.class) {
            1 => Class::Volatile,
            2 => Class::Unshared,
            3 => Class::Merged,
            4 => Class::Other,
            _ => Class::Unvisited,
        }
    }

    /// Number of pages of `class`.
    pub fn count(&self, class: Class) -> u64 {
        self.counts[class as usize]
    }

    /// ORs a dirty bitmap into the pending one.
    pub fn add_dirty(&mut self, words: &[u64]) {
        if self.dirty.len() < words.len() {
            self.dirty.resize(words.len(), 0);
        }
        for (d, w) in self.dirty.iter_mut().zip(words) {
            *d |= w;
        }
    }

    /// Whether page `p` was reported dirty since its last visit (and clears it).
    pub fn take_dirty(&mut self, p: u32) -> bool {
        let (w, b) = ((p / 64) as usize, p % 64);
        match self.dirty.get_mut(w) {
            Some(word) if *word & (1 << b) != 0 => {
                *word &= !(1 << b);
                true
            }
            _ => false,
        }
    }

    /// Moves every page with a pending dirty bit to `out` (ascending) and
    /// clears the bits.
    pub fn drain_dirty(&mut self, out: &mut Vec<u32>) {
        for (w, word) in self.dirty.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                let p = w as u64 * 64 + u64::from(b);
                if p < self.pages.len() as u64 {
                    out.push(p as u32);
                }
            }
        }
    }

    /// Heap bytes of this state.
    pub fn metadata_bytes(&self) -> usize {
        self.pages.capacity() * std::mem::size_of::<PageState>()
            + self.dirty.capacity() * 8
            + self.pending.capacity() * 4
    }
}
