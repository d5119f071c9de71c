//! Frame reference counts and reverse mappings (frame -> guest pages mapping it).
//!
//! A frame's reference count is the number of guest pages mapping it. Counts
//! only move by one, when a guest page starts or stops mapping the frame, so a
//! count reaches zero exactly when its last mapper is gone and is never reset
//! while another holder exists. Metadata is allocated per 2 MiB host frame on
//! first use and dropped when the host frame has no live frame.

use rustc_hash::FxHashMap;

use crate::{FrameNo, VmId, HUGE_FRAME_PAGES};

/// Errors of the frame table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The frame has no mapper but one was expected.
    #[error("frame {0} is not live")]
    NotLive(FrameNo),
    /// The frame is already live but was expected free.
    #[error("frame {0} is already live")]
    AlreadyLive(FrameNo),
    /// The mapper is not among the frame's mappers.
    #[error("vm {} page {} does not map frame {frame}", mapper.vm, mapper.page)]
    NotAMapper {
        /// The guest page.
        mapper: Mapper,
        /// The frame.
        frame: FrameNo,
    },
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A guest page mapping a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Mapper {
    /// The VM.
    pub vm: VmId,
    /// The guest page number.
    pub page: u32,
}

#[derive(Debug, Clone, Copy, Default)]
struct FrameMeta {
    refs: u32,
    /// The only mapper, valid when `refs == 1`.
    owner: Mapper,
}

/// Reference counts and reverse mappings of all live frames.
#[derive(Default)]
pub struct FrameTable {
    chunks: Vec<Option<Box<[FrameMeta]>>>,
    live_in_chunk: Vec<u16>,
    /// All mappers of frames with `refs > 1`.
    shared: FxHashMap<FrameNo, Vec<Mapper>>,
    live_frames: u64,
    mappings: u64,
    shared_mappings: u64,
    /// Per VM: its guest pages mapping a frame with `refs > 1` (absent: none).
    shared_by_vm: FxHashMap<VmId, u64>,
}

impl FrameTable {
    /// A table for a pool of `huge_frames` 2 MiB frames.
    pub fn new(huge_frames: u32) -> Self {
        FrameTable {
            chunks: (0..huge_frames).map(|_| None).collect(),
            live_in_chunk: vec![0; huge_frames as usize],
            ..Default::default()
        }
    }

    /// Reference count of `frame` (0 if free).
    pub fn refs(&self, frame: FrameNo) -> u32 {
        self.meta(frame).map_or(0, |m| m.refs)
    }

    /// The guest pages mapping `frame`.
    pub fn mappers(&self, frame: FrameNo) -> Vec<Mapper> {
        match self.meta(frame) {
            Some(m) if m.refs == 1 => vec![m.owner],
            Some(m) if m.refs > 1 => self.shared.get(&frame).cloned().unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Number of frames with at least one mapper.
    pub fn live_frames(&self) -> u64 {
        self.live_frames
    }

    /// Number of frames with more than one mapper.
    pub fn shared_frames(&self) -> u64 {
        self.shared.len() as u64
    }

    /// Total number of (guest page -> frame) mappings, the sum of all counts.
    pub fn mappings(&self) -> u64 {
        self.mappings
    }

    /// Number of mappings of frames with more than one mapper.
    pub fn shared_mappings(&self) -> u64 {
        self.shared_mappings
    }

    /// Guest pages of `vm` mapping a frame that another guest page maps too
    /// (its share of [`FrameTable::shared_mappings`]; kept as mappings change).
    pub fn shared_mappings_of(&self, vm: VmId) -> u64 {
        self.shared_by_vm.get(&vm).copied().unwrap_or(0)
    }

    fn count_shared(&mut self, vm: VmId, add: bool) {
        let n = self.shared_by_vm.entry(vm).or_default();
        if add {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.shared_by_vm.remove(&vm);
            }
        }
    }

    /// Records that `mapper` maps `frame`; returns the new count.
    pub fn add(&mut self, frame: FrameNo, mapper: Mapper) -> u32 {
        let (hf, i) = split(frame);
        let chunk = self.chunks[hf]
            .get_or_insert_with(|| vec![FrameMeta::default(); HUGE_FRAME_PAGES as usize].into_boxed_slice());
        let meta = &mut chunk[i];
        meta.refs += 1;
        self.mappings += 1;
        let refs = meta.refs;
        match refs {
            1 => {
                meta.owner = mapper;
                self.live_frames += 1;
                self.live_in_chunk[hf] += 1;
            }
            2 => {
                let owner = meta.owner;
                self.shared.insert(frame, vec![owner, mapper]);
                self.shared_mappings += 2;
                self.count_shared(owner.vm, true);
                self.count_shared(mapper.vm, true);
            }
            _ => {
                self.shared.entry(frame).or_default().push(mapper);
                self.shared_mappings += 1;
                self.count_shared(mapper.vm, true);
            }
        }
        refs
    }

    /// Records that `mapper` no longer maps `frame`; returns the new count
    /// (0: the frame has no mapper left and may be freed).
    pub fn remove(&mut self, frame: FrameNo, mapper: Mapper) -> Result<u32> {
        let (hf, i) = split(frame);
        let meta = self
            .chunks
            .get_mut(hf)
            .and_then(|c| c.as_mut())
            .map(|c| &mut c[i])
            .filter(|m| m.refs > 0)
            .ok_or(Error::NotLive(frame))?;
        if meta.refs == 1 {
            if meta.owner != mapper {
                return Err(Error::NotAMapper { mapper, frame });
            }
            meta.refs = 0;
            self.mappings -= 1;
            self.live_frames -= 1;
            self.live_in_chunk[hf] -= 1;
            if self.live_in_chunk[hf] == 0 {
                self.chunks[hf] = None;
            }
            return Ok(0);
        }
        let list = self.shared.get_mut(&frame).ok_or(Error::NotLive(frame))?;
        let pos = list.iter().position(|&m| m == mapper).ok_or(Error::NotAMapper { mapper, frame })?;
        list.swap_remove(pos);
        meta.refs -= 1;
        let refs = meta.refs;
        let last = (refs == 1).then(|| list[0]);
        if let Some(owner) = last {
            meta.owner = owner;
        }
        self.mappings -= 1;
        self.shared_mappings -= 1;
        self.count_shared(mapper.vm, false);
        if let Some(owner) = last {
            self.shared.remove(&frame);
            self.shared_mappings -= 1;
            self.count_shared(owner.vm, false);
        }
        Ok(refs)
    }

    /// One mapper of `frame` (the first recorded), without allocating.
    pub fn first_mapper(&self, frame: FrameNo) -> Option<Mapper> {
        match self.meta(frame) {
            Some(m) if m.refs == 1 => Some(m.owner),
            Some(m) if m.refs > 1 => self.shared.get(&frame).and_then(|v| v.first().copied()),
            _ => None,
        }
    }

    /// The mappers of `frame` with more than one mapper, borrowed.
    pub fn shared_mappers(&self, frame: FrameNo) -> Option<&[Mapper]> {
        self.shared.get(&frame).map(Vec::as_slice)
    }

    fn meta(&self, frame: FrameNo) -> Option<&FrameMeta> {
        let (hf, i) = split(frame);
        self.chunks.get(hf)?.as_ref().map(|c| &c[i])
    }
}

fn split(frame: FrameNo) -> (usize, usize) {
    ((frame / HUGE_FRAME_PAGES) as usize, (frame % HUGE_FRAME_PAGES) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_reverse_map() {
        let mut t = FrameTable::new(2);
        let a = Mapper { vm: 1, page: 0 };
        let b = Mapper { vm: 2, page: 5 };
        assert_eq!(t.add(7, a), 1);
        assert_eq!(t.add(7, b), 2);
        assert_eq!((t.shared_frames(), t.shared_mappings()), (1, 2));
        assert_eq!((t.shared_mappings_of(1), t.shared_mappings_of(2)), (1, 1));
        assert_eq!(t.add(7, Mapper { vm: 2, page: 6 }), 3);
        assert_eq!(t.shared_mappings_of(2), 2);
        assert_eq!(t.remove(7, Mapper { vm: 2, page: 6 }), Ok(2));
        assert_eq!(t.shared_mappings_of(2), 1);
        assert_eq!(
            t.remove(7, Mapper { vm: 3, page: 0 }),
            Err(Error::NotAMapper { mapper: Mapper { vm: 3, page: 0 }, frame: 7 })
        );
        assert_eq!(t.remove(7, a), Ok(1));
        assert_eq!(t.mappers(7), vec![b]);
        // One mapper left: no VM maps a shared frame any more.
        assert_eq!((t.shared_mappings_of(1), t.shared_mappings_of(2)), (0, 0));
        assert!(t.shared_by_vm.is_empty());
        assert_eq!(t.remove(7, b), Ok(0));
        assert_eq!(t.remove(7, b), Err(Error::NotLive(7)));
        assert_eq!((t.live_frames(), t.mappings()), (0, 0));
    }
}
