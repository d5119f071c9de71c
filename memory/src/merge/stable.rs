//! The stable index: content hash -> merged ("stable") frames, per merge domain.
//!
//! A key is (domain, hash), so a lookup can only ever propose frames of the
//! asking page's domain. Each key holds a chain of frames with the same
//! content: a frame takes at most `max_page_sharing` guest pages; when all
//! frames of a chain are full, the next pair of equal pages starts a new frame
//! in the chain (KSM's stable node chains). The hash only proposes: every
//! merge compares the full 4 KiB under write protection.

use std::collections::HashMap;

use rustc_hash::FxHashMap;

use crate::FrameNo;

use super::domains::DomainId;

/// Key of both indexes: a merge domain and a content hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The merge domain.
    pub domain: DomainId,
    /// xxh3 of the page content.
    pub hash: u64,
}

/// What a lookup learns about a frame of a chain (decided by the caller, who
/// sees the frame table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The frame can take one more guest page.
    Usable,
    /// The frame is valid but has `max_page_sharing` mappers.
    Full,
    /// The frame is no longer a merged frame of this content: drop it.
    Stale,
}

/// Content hash -> chain of stable frames, per domain.
#[derive(Debug, Default)]
pub struct StableIndex {
    /// Keyed by guest-controlled content hashes: std's keyed SipHash, so that
    /// a guest cannot fill one bucket.
    chains: HashMap<Key, Vec<FrameNo>>,
    /// Keyed by frame number (not guest-controlled): Fx, looked up for every
    /// merged page at every scan.
    by_frame: FxHashMap<FrameNo, Key>,
}

impl StableIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// The first usable frame of `key`'s chain, dropping stale frames on the
    /// way; `None` if the chain is empty or all its frames are full.
    pub fn find(&mut self, key: Key, mut judge: impl FnMut(FrameNo) -> Verdict) -> Option<FrameNo> {
        let chain = self.chains.get_mut(&key)?;
        let mut found = None;
        let by_frame = &mut self.by_frame;
        chain.retain(|&f| {
            if found.is_some() {
                return true;
            }
            match judge(f) {
                Verdict::Usable => {
                    found = Some(f);
                    true
                }
                Verdict::Full => true,
                Verdict::Stale => {
                    by_frame.remove(&f);
                    false
                }
            }
        });
        if chain.is_empty() {
            self.chains.remove(&key);
        }
        found
    }

    /// Whether `frame` is in `key`'s chain.
    pub fn contains(&self, key: Key, frame: FrameNo) -> bool {
        self.by_frame.get(&frame) == Some(&key)
    }

    /// The key `frame` is indexed under, if any.
    pub fn key_of(&self, frame: FrameNo) -> Option<Key> {
        self.by_frame.get(&frame).copied()
    }

    /// Adds `frame` to `key`'s chain; a frame indexed under another key moves.
    pub fn insert(&mut self, key: Key, frame: FrameNo) {
        match self.by_frame.get(&frame) {
            Some(&k) if k == key => return,
            Some(&k) => {
                self.remove(k, frame);
            }
            None => {}
        }
        self.chains.entry(key).or_default().push(frame);
        self.by_frame.insert(frame, key);
    }

    /// Removes `frame` from `key`'s chain; returns whether it was there.
    pub fn remove(&mut self, key: Key, frame: FrameNo) -> bool {
        if self.by_frame.get(&frame) != Some(&key) {
            return false;
        }
        self.by_frame.remove(&frame);
        if let Some(chain) = self.chains.get_mut(&key) {
            chain.retain(|&f| f != frame);
            if chain.is_empty() {
                self.chains.remove(&key);
            }
        }
        true
    }

    /// Frames of `key`'s chain, in order.
    pub fn chain(&self, key: Key) -> &[FrameNo] {
        self.chains.get(&key).map_or(&[], Vec::as_slice)
    }

    /// Frames in the index.
    pub fn len(&self) -> usize {
        self.by_frame.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.by_frame.is_empty()
    }

    /// Chains holding more than one frame (KSM's `stable_node_chains`).
    pub fn chains_with_dups(&self) -> usize {
        self.chains.values().filter(|c| c.len() > 1).count()
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.chains.clear();
        self.by_frame.clear();
    }

    /// Approximate heap bytes used.
    pub fn metadata_bytes(&self) -> usize {
        self.chains.capacity() * (std::mem::size_of::<Key>() + std::mem::size_of::<Vec<FrameNo>>() + 8)
            + self.by_frame.capacity() * (std::mem::size_of::<FrameNo>() + std::mem::size_of::<Key>() + 8)
    }
}
