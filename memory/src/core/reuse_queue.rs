//! The queue of sole-mapped merged pages waiting for background reuse (a
//! field of [`super::State`], so read and changed only under the manager's lock).
//!
//! When a merged frame's last other mapper leaves (copy-on-write, unmerge,
//! discard, migration, VM destruction), the page still mapping it is queued
//! here with the frame; the Protector's handler thread drains the queue in
//! batches between faults (`core/background_reuse.rs`), re-checking every
//! entry under the lock. An entry is only a hint: it may be stale by the
//! time it is drained (the page got a new sharer, was remapped, discarded,
//! written, its VM destroyed) and is then dropped. Whoever pushes rings the
//! Protector's doorbell when the lock is released (`Core`'s `StateGuard`).

use crate::frame_table::Mapper;
use crate::FrameNo;

/// Sole-mapped merged pages to make writable in the background.
#[derive(Debug)]
pub(crate) struct ReuseQueue {
    /// Queued (page, the frame it mapped when queued), in queuing order.
    entries: Vec<(Mapper, FrameNo)>,
    /// Something was queued since the doorbell last rang.
    ring: bool,
    /// Background reuse is on (the default); off, nothing is queued and the
    /// sole mapper's next write reuses the frame at fault time.
    enabled: bool,
}

impl Default for ReuseQueue {
    fn default() -> Self {
        ReuseQueue { entries: Vec::new(), ring: false, enabled: true }
    }
}

impl ReuseQueue {
    /// Queues page `m`, the last mapper of merged frame `frame` (nothing when disabled).
    pub(crate) fn push(&mut self, m: Mapper, frame: FrameNo) {
        if self.enabled {
            self.entries.push((m, frame));
            self.ring = true;
        }
    }

    /// Takes up to `max` entries, oldest first, sorted by page (so that runs of
    /// consecutive pages are adjacent) and without duplicates.
    pub(crate) fn take_batch(&mut self, max: usize) -> Vec<(Mapper, FrameNo)> {
        let n = self.entries.len().min(max);
        let mut batch: Vec<(Mapper, FrameNo)> = self.entries.drain(..n).collect();
        batch.sort_unstable();
        batch.dedup();
        batch
    }

    /// Entries waiting.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the doorbell must ring (clears the request).
    pub(crate) fn take_ring(&mut self) -> bool {
        std::mem::take(&mut self.ring)
    }

    /// Asks for the doorbell to ring at the lock's release (work is left).
    pub(crate) fn request_ring(&mut self) {
        self.ring = true;
    }

    /// Turns background reuse on or off; off also forgets what was queued
    /// (those pages are reused at their next write instead).
    pub(crate) fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        if !on {
            self.entries.clear();
            self.ring = false;
        }
    }

    /// Whether background reuse is on.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_sorted_deduplicated_and_bounded() {
        let mut q = ReuseQueue::default();
        let m = |page| Mapper { vm: 1, page };
        for (page, frame) in [(5, 50), (3, 30), (5, 50), (4, 40), (9, 90)] {
            q.push(m(page), frame);
        }
        assert!(q.take_ring() && !q.take_ring());
        assert_eq!(q.take_batch(4), vec![(m(3), 30), (m(4), 40), (m(5), 50)]);
        assert_eq!(q.len(), 1);
        q.set_enabled(false);
        q.push(m(1), 10);
        assert_eq!((q.len(), q.take_ring(), q.enabled()), (0, false, false));
    }
}
