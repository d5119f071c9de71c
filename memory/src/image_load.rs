//! Bulk loading of a RAM image (a file whose byte `n` is guest-physical
//! address `n`, e.g. a QEMU `memory-backend-file` saved after a boot) into a
//! VM's guest RAM before the VM starts.
//!
//! The file is read with `pread` in chunks of [`CHUNK_BYTES`] (outside the
//! manager's lock); each chunk is then copied under the lock, one transaction
//! per chunk, into the frames of its pages through the pool's alias, as
//! [`crate::GuestMap::write_bytes`] would (sharing broken first, the page
//! recorded as device-written), and the guest's view of them is filled
//! (`MADV_POPULATE_READ`, as if the guest had touched them). An all-zero 4 KiB page of the image is left
//! untouched when its frame holds no host memory (a fresh VM's frames hold
//! none): it reads as zero and costs nothing. Only a zero page over a frame
//! that holds data (a VM that already ran) is written with zeros.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::core::balloon::runs;
use crate::core::{Core, Error as CoreError};
use crate::frame_table::Mapper;
use crate::page_table::PageFlags;
use crate::pool::is_zero;
use crate::{FrameNo, VmId, PAGE_SIZE};

/// Bytes read and copied per chunk (one hold of the manager's lock).
pub const CHUNK_BYTES: usize = 2 << 20;

/// Errors of [`crate::MemoryManager::load_image`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image and the guest RAM differ in size.
    #[error("image is {image} bytes but VM {vm}'s guest RAM is {guest} bytes")]
    SizeMismatch {
        /// The VM.
        vm: VmId,
        /// Size of the image file.
        image: u64,
        /// Size of the guest RAM.
        guest: u64,
    },
    /// Reading the image failed (or it shrank while being read).
    #[error("reading the image at byte {offset}: {source}")]
    Read {
        /// Offset of the failed read.
        offset: u64,
        /// Why.
        source: io::Error,
    },
    /// The memory core refused (unknown VM, pool error).
    #[error(transparent)]
    Core(#[from] CoreError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// What [`crate::MemoryManager::load_image`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImageLoad {
    /// 4 KiB pages of the image.
    pub pages: u64,
    /// Pages with content, copied into their frames.
    pub data_pages: u64,
    /// All-zero pages, left without host memory.
    pub zero_pages: u64,
    /// All-zero pages whose frame held data and was overwritten with zeros.
    pub zero_pages_written: u64,
}

/// Loads `file` into VM `vm`'s guest RAM (see the module documentation).
pub(crate) fn load(core: &Core, vm: VmId, file: &File) -> Result<ImageLoad> {
    let guest = {
        let st = core.lock();
        let table = st.table(vm).ok_or(CoreError::UnknownVm(vm))?;
        u64::from(table.len()) * PAGE_SIZE as u64
    };
    let image = file.metadata().map_err(|source| Error::Read { offset: 0, source })?.len();
    if image != guest {
        return Err(Error::SizeMismatch { vm, image, guest });
    }
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut report = ImageLoad::default();
    let mut offset = 0u64;
    while offset < image {
        let len = CHUNK_BYTES.min((image - offset) as usize);
        let chunk = &mut buf[..len];
        file.read_exact_at(chunk, offset).map_err(|source| Error::Read { offset, source })?;
        let first = (offset / PAGE_SIZE as u64) as u32;
        core.with_txn(|t| {
            let mut zeros: Vec<(u32, FrameNo)> = Vec::new();
            let mut data: Vec<u32> = Vec::new();
            for (i, bytes) in chunk.chunks_exact(PAGE_SIZE).enumerate() {
                let m = Mapper { vm, page: first + i as u32 };
                if is_zero(bytes) {
                    zeros.push((m.page, t.entry(m)?.frame));
                    continue;
                }
                t.break_sharing(m)?;
                let e = t.entry(m)?;
                t.st.pool().write(e.frame, 0, bytes)?;
                let flags = e.flags.with(PageFlags::DEVICE_WRITTEN).with(PageFlags::MERGE_DIRTY);
                t.set_flags(m, flags.without(PageFlags::ZERO))?;
                data.push(m.page);
                report.data_pages += 1;
            }
            // The guest's view maps the pages written, as it would had the guest
            // written them itself: its first access, and the merger's first read,
            // take no fault. A read fill (a write fill of a write-protected page
            // would wait for the fault handler, which waits for this lock); only
            // pages with content (filling a hole would allocate it).
            for (start, len) in runs(&data, |a, b| b == a + 1) {
                let addr = t.addr(Mapper { vm, page: start })?;
                t.remap.populate(addr, len as usize * PAGE_SIZE, false);
            }
            report.zero_pages += zeros.len() as u64;
            // Runs of consecutive frames: one hole check each (a fresh VM's frames
            // are all holes), page by page only where a run holds data.
            let mut start = 0;
            while start < zeros.len() {
                let mut end = start + 1;
                while end < zeros.len() && zeros[end].1 == zeros[end - 1].1 + 1 && zeros[end].0 == zeros[end - 1].0 + 1
                {
                    end += 1;
                }
                let run = &zeros[start..end];
                if !is_hole(t.st.pool(), run[0].1, run.len() as u64)? {
                    for &(page, frame) in run {
                        if !is_hole(t.st.pool(), frame, 1)? {
                            let m = Mapper { vm, page };
                            t.break_sharing(m)?;
                            let e = t.entry(m)?;
                            t.st.pool().write(e.frame, 0, &[0u8; PAGE_SIZE])?;
                            let flags = e.flags.with(PageFlags::DEVICE_WRITTEN).with(PageFlags::MERGE_DIRTY);
                            t.set_flags(m, flags.without(PageFlags::ZERO))?;
                            report.zero_pages_written += 1;
                        }
                    }
                }
                start = end;
            }
            Ok(())
        })?;
        report.pages += (len / PAGE_SIZE) as u64;
        offset += len as u64;
    }
    Ok(report)
}

fn is_hole(pool: &crate::pool::FramePool, frame: FrameNo, count: u64) -> std::result::Result<bool, CoreError> {
    pool.is_hole(frame, count).map_err(CoreError::Mapping)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use super::*;
    use crate::{ManagerConfig, MemoryManager};

    fn manager(test: &str) -> Option<Arc<MemoryManager>> {
        if let Err(e) = crate::uffd::Uffd::probe() {
            // Not eprintln!: the harness would hide it for a passing test.
            let _ = writeln!(io::stderr().lock(), "SKIPPED {test}: userfaultfd write protection unavailable: {e}");
            return None;
        }
        let mut config = ManagerConfig::with_capacity(64 << 20);
        config.raise_max_map_count = false;
        Some(MemoryManager::new(config).expect("memory manager"))
    }

    /// A temporary image file of `pages` pages: page `p` holds `content(p)`
    /// repeated (0 = an all-zero page).
    fn image(name: &str, pages: u32, content: impl Fn(u32) -> u64) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("densevm-image-{name}-{}.ram", std::process::id()));
        let mut f = File::options().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        for p in 0..pages {
            let v = content(p);
            let page: Vec<u8> =
                (0..PAGE_SIZE / 8).flat_map(|i| (if v == 0 { 0 } else { v ^ i as u64 }).to_le_bytes()).collect();
            f.write_all(&page).unwrap();
        }
        (path, f)
    }

    fn expected(v: u64) -> Vec<u8> {
        (0..PAGE_SIZE / 8).flat_map(|i| (if v == 0 { 0 } else { v ^ i as u64 }).to_le_bytes()).collect()
    }

    #[test]
    fn content_round_trips_and_zero_pages_cost_nothing() {
        let Some(mgr) = manager("content_round_trips_and_zero_pages_cost_nothing") else { return };
        // 1200 pages (not a multiple of the chunk): every third page zero.
        let pages = 1200u32;
        let content = |p: u32| if p.is_multiple_of(3) { 0 } else { 0x1000 + u64::from(p) };
        let (path, file) = image("roundtrip", pages, content);
        let g = mgr.create_guest(1, u64::from(pages) * PAGE_SIZE as u64).unwrap();
        let before = mgr.stats().host_bytes;
        let r = mgr.load_image(1, &file).unwrap();
        assert_eq!((r.pages, r.data_pages, r.zero_pages, r.zero_pages_written), (1200, 800, 400, 0));
        // Only the data pages got host memory.
        let grown = mgr.stats().host_bytes - before;
        assert_eq!(grown, 800 * PAGE_SIZE as u64, "host bytes grew by {grown}");
        for p in 0..pages {
            assert!(!g.page_flags(p).unwrap().contains(PageFlags::ZERO));
            let frame = g.frame_of(p).unwrap();
            let hole = mgr.core().lock().pool().is_hole(frame, 1).unwrap();
            assert_eq!(hole, content(p) == 0, "page {p}");
        }
        // The guest range reads the image (zero pages last: reading them allocates).
        for p in (0..pages).filter(|p| content(*p) != 0).chain((0..pages).filter(|p| content(*p) == 0)) {
            let addr = g.page_addr(p).unwrap();
            // SAFETY: the page lies in the live guest map `g`; only read.
            let got = unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE_SIZE) };
            assert!(got == expected(content(p)).as_slice(), "page {p} differs");
        }
        // Data pages are recorded as device-written (a VMM's dirty tracking sees them).
        assert_eq!(g.take_device_written().unwrap().len(), 800);
        drop(g);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn reloading_a_used_guest_overwrites_merged_and_stale_pages() {
        let Some(mgr) = manager("reloading_a_used_guest_overwrites_merged_and_stale_pages") else { return };
        let pages = 64u32;
        let size = u64::from(pages) * PAGE_SIZE as u64;
        let (pa, fa) = image("first", pages, |p| 7 + u64::from(p % 2));
        let (pb, fb) = image("second", pages, |p| if p < 32 { 0 } else { 100 + u64::from(p) });
        let g = mgr.create_guest(1, size).unwrap();
        let h = mgr.create_guest(2, size).unwrap();
        mgr.load_image(1, &fa).unwrap();
        mgr.load_image(2, &fa).unwrap();
        mgr.set_merge(1, false, 1).unwrap();
        mgr.set_merge(2, false, 1).unwrap();
        // Page 0 of both VMs on one frame.
        assert!(matches!(mgr.merge_pages((1, 0), (2, 0)).unwrap(), crate::manager::MergeOutcome::Merged { .. }));
        let r = mgr.load_image(1, &fb).unwrap();
        assert_eq!((r.data_pages, r.zero_pages, r.zero_pages_written), (32, 32, 32));
        let mut buf = vec![0u8; PAGE_SIZE];
        for p in 0..pages {
            g.read_bytes(u64::from(p) * PAGE_SIZE as u64, &mut buf).unwrap();
            let want = if p < 32 { 0 } else { 100 + u64::from(p) };
            assert!(buf == expected(want), "vm 1 page {p}");
            h.read_bytes(u64::from(p) * PAGE_SIZE as u64, &mut buf).unwrap();
            assert!(buf == expected(7 + u64::from(p % 2)), "vm 2 page {p} changed");
        }
        drop((g, h));
        std::fs::remove_file(pa).unwrap();
        std::fs::remove_file(pb).unwrap();
    }

    #[test]
    fn size_mismatch_and_unknown_vm_are_errors() {
        let Some(mgr) = manager("size_mismatch_and_unknown_vm_are_errors") else { return };
        let (path, file) = image("small", 3, |p| u64::from(p) + 1);
        let _g = mgr.create_guest(1, 4 * PAGE_SIZE as u64).unwrap();
        match mgr.load_image(1, &file) {
            Err(Error::SizeMismatch { vm: 1, image, guest }) => {
                assert_eq!((image, guest), (3 * PAGE_SIZE as u64, 4 * PAGE_SIZE as u64))
            }
            other => panic!("expected a size mismatch, got {other:?}"),
        }
        assert!(matches!(mgr.load_image(9, &file), Err(Error::Core(CoreError::UnknownVm(9)))));
        std::fs::remove_file(path).unwrap();
    }
}
