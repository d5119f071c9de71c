//! Per-page KSM state of this process's memory (from `/proc/self/pagemap` and
//! `/proc/kpageflags`), and the latency of host-thread writes to KSM-merged pages.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use vm_memory::MmapRegion;

use super::{Error, KsmControl};

/// `/proc/kpageflags` bit of a KSM page (`KPF_KSM`).
const KPF_KSM: u64 = 21;
/// `/proc/self/pagemap`: page present.
const PM_PRESENT: u64 = 1 << 63;
/// `/proc/self/pagemap`: page frame number bits.
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// For each of the `npages` 4 KiB pages at `addr` in this process: is it backed by
/// a KSM page now (from `/proc/self/pagemap` and `/proc/kpageflags`; needs root)?
/// Pages not present count as not merged.
pub fn ksm_page_flags(addr: u64, npages: u64) -> std::io::Result<Vec<bool>> {
    let pagemap = File::open("/proc/self/pagemap")?;
    let flags = File::open("/proc/kpageflags")?;
    let mut entries = vec![0u8; npages as usize * 8];
    pagemap.read_exact_at(&mut entries, addr / 4096 * 8)?;
    let mut merged = Vec::with_capacity(npages as usize);
    for chunk in entries.chunks_exact(8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let entry = u64::from_le_bytes(word);
        let pfn = entry & PM_PFN_MASK;
        let mut ksm = false;
        if entry & PM_PRESENT != 0 && pfn != 0 {
            flags.read_exact_at(&mut word, pfn * 8)?;
            ksm = (u64::from_le_bytes(word) >> KPF_KSM) & 1 == 1;
        }
        merged.push(ksm);
    }
    Ok(merged)
}

/// How many of the `npages` pages at `addr` are KSM pages (see [`ksm_page_flags`]).
pub fn ksm_pages_in(addr: u64, npages: u64) -> std::io::Result<u64> {
    Ok(ksm_page_flags(addr, npages)?.iter().filter(|m| **m).count() as u64)
}

/// Latency of host-thread writes to KSM-merged pages (the kernel's copy on write).
#[derive(Clone, Debug, serde::Serialize)]
pub struct MergedWriteTimes {
    /// Pages allocated, all with the same content.
    pub pages: u64,
    /// Pages KSM had merged when the writes started (only these are timed).
    pub pages_measured: u64,
    /// Median write latency.
    pub median_ns: f64,
    /// 99th percentile.
    pub p99_ns: f64,
    /// Mean.
    pub mean_ns: f64,
    /// Slowest write.
    pub max_ns: f64,
}

impl MergedWriteTimes {
    /// Statistics of per-page latencies `ns` (one per measured page) of `pages` pages.
    pub fn from_ns(pages: u64, mut ns: Vec<f64>) -> Self {
        ns.sort_by(f64::total_cmp);
        let n = ns.len();
        let at = |i: usize| ns.get(i).copied().unwrap_or(f64::NAN);
        MergedWriteTimes {
            pages,
            pages_measured: n as u64,
            median_ns: at(n / 2),
            p99_ns: at((n * 99).div_ceil(100).saturating_sub(1)),
            mean_ns: ns.iter().sum::<f64>() / n as f64,
            max_ns: at(n.saturating_sub(1)),
        }
    }
}

/// Allocates `pages` anonymous pages of identical content, offers them to KSM,
/// runs ksmd (`run=1`, with the other knobs as the caller set them) until every
/// page is merged or `timeout` passes, stops ksmd (`run=0`; merged pages stay
/// merged, and the scanner no longer competes for CPU), then times one 8-byte
/// store into each merged page. `interrupted` is polled while waiting.
pub fn time_writes_to_merged_pages(
    ksm: &mut KsmControl,
    pages: usize,
    timeout: Duration,
    interrupted: &dyn Fn() -> bool,
) -> Result<MergedWriteTimes, Error> {
    let len = pages * 4096;
    // Private anonymous memory (unmapped on drop), as guest RAM's anonymous backing.
    let mem = MmapRegion::<()>::new(len).map_err(|e| Error::Io("mmap", std::io::Error::other(e.to_string())))?;
    let base = mem.as_ptr();
    // SAFETY: the mapping is len bytes, readable and writable, owned by `mem`, and
    // only accessed through this slice until the timed writes below.
    let words = unsafe { std::slice::from_raw_parts_mut(base.cast::<u64>(), len / 8) };
    for (i, w) in words.iter_mut().enumerate() {
        *w = ((i % 512) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    }
    // SAFETY: madvise on the exact bounds of our mapping; it changes no content.
    if unsafe { libc::madvise(base.cast(), len, libc::MADV_MERGEABLE) } != 0 {
        return Err(Error::Io("madvise(MADV_MERGEABLE)", std::io::Error::last_os_error()));
    }
    let addr = base as u64;
    ksm.set("run", "1")?;
    let waited = ksm.wait_until("merge the host test pages", timeout, |_| {
        if interrupted() {
            return Err(Error::Interrupted);
        }
        Ok(ksm_pages_in(addr, pages as u64).map_err(|e| Error::Io("reading kpageflags", e))? >= pages as u64)
    });
    let stop = ksm.set("run", "0");
    let merged = ksm_page_flags(addr, pages as u64).map_err(|e| Error::Io("reading kpageflags", e))?;
    match waited {
        Err(e) if !merged.iter().any(|m| *m) => return Err(e),
        Err(Error::Interrupted) => return Err(Error::Interrupted),
        _ => stop?,
    }
    let mut ns = Vec::with_capacity(pages);
    for (i, _) in merged.iter().enumerate().filter(|(_, m)| **m) {
        let t0 = Instant::now();
        // SAFETY: page i lies inside our mapping; a volatile store so that it happens
        // here, between the two clock reads.
        unsafe { std::ptr::write_volatile(base.add(i * 4096).cast::<u64>(), !(i as u64)) };
        ns.push(t0.elapsed().as_nanos() as f64);
    }
    Ok(MergedWriteTimes::from_ns(pages as u64, ns))
}
