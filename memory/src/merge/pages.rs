//! The scanner's per-VM state: one small record per guest page (cached hash,
//! frame at hashing time, class of the last visit) and the accumulated dirty
//! bitmap of the VM's dirty log.

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
            counts,
        }
    }

    /// Records the class of page `p`.
    pub fn set_class(&mut self, p: u32, class: Class) {
        let Some(ps) = self.pages.get_mut(p as usize) else {
            return;
        };
        self.counts[ps.class as usize] -= 1;
        ps.class = class as u8;
        self.counts[class as usize] += 1;
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

    /// Heap bytes of this state.
    pub fn metadata_bytes(&self) -> usize {
        self.pages.capacity() * std::mem::size_of::<PageState>() + self.dirty.capacity() * 8
    }
}
