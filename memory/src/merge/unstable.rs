//! The unstable index: content hash -> one not yet merged guest page, per
//! merge domain, rebuilt every full scan (KSM's unstable tree). Entries may go
//! stale (the page changed, was merged or its VM is gone); the scanner checks
//! an entry before using it and the merge compares the full content anyway.

use std::collections::HashMap;

use crate::frame_table::Mapper;
use crate::{FrameNo, VmId};

use super::stable::Key;

/// A candidate page: who it is and the frame it mapped when inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The guest page.
    pub mapper: Mapper,
    /// Its frame at insertion.
    pub frame: FrameNo,
}

/// Content hash -> one unmerged page, per domain.
#[derive(Debug, Default)]
pub struct UnstableIndex {
    map: HashMap<Key, Entry>,
}

impl UnstableIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// The page recorded under `key`.
    pub fn get(&self, key: Key) -> Option<Entry> {
        self.map.get(&key).copied()
    }

    /// Records `entry` under `key`, replacing an older one.
    pub fn insert(&mut self, key: Key, entry: Entry) {
        self.map.insert(key, entry);
    }

    /// Removes `key`'s entry if it is `mapper`'s.
    pub fn remove(&mut self, key: Key, mapper: Mapper) {
        if self.map.get(&key).is_some_and(|e| e.mapper == mapper) {
            self.map.remove(&key);
        }
    }

    /// Entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Forgets the entries of VM `vm`'s pages (the VM is gone or re-learned)
    /// and gives back the memory of an index left mostly empty.
    pub fn forget_vm(&mut self, vm: VmId) {
        self.map.retain(|_, e| e.mapper.vm != vm);
        if self.map.len() < self.map.capacity() / 2 {
            self.map.shrink_to_fit();
        }
    }

    /// Forgets everything (start of a full scan).
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Approximate heap bytes used.
    pub fn metadata_bytes(&self) -> usize {
        self.map.capacity() * (std::mem::size_of::<Key>() + std::mem::size_of::<Entry>() + 8)
    }
}
