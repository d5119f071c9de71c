//! The real-image scenarios of `densevm bench merge`: guest RAM images of real
//! Linux boots (resources/images/build-ram-images.sh), one per VM (a pair of
//! images, or N clones of one), merged by densevm's merger and by the kernel's
//! KSM at full speed.
//!
//! Memory only: no vCPU runs. densevm's side is a memory manager of its own
//! whose guests are loaded with [`memory::MemoryManager::load_image`]; the
//! kernel's side is private anonymous memory (`MADV_MERGEABLE`) holding the same
//! pages. Both leave the images' all-zero pages without host memory, so neither
//! scans them. The ideal is computed from the images' contents: every group of
//! equal non-zero pages merged, `max_page_sharing` mappings per shared page.
//! densevm's merger thread runs at ksmd's nice value (5): on a shared machine
//! both then get the same share of a CPU, and the times compare.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use memory::merge::tunables::ChangeDetection;
use memory::{ManagerConfig, MemoryManager, Tunables, PAGE_SIZE};
use vm_memory::MmapRegion;

use super::kernel::Kernel;
use super::measure::{ksmd_pid, present_and_frames, set_thread_nice, task_cpu_s, task_nice};
use crate::commands::CommandError;

/// Interval between samples of the merge counters.
const SAMPLE: Duration = Duration::from_millis(5);
/// Bytes read per `pread` when loading or checking an image.
const CHUNK: usize = 2 << 20;

fn rt(e: impl std::fmt::Display) -> CommandError {
    CommandError::Runtime(e.to_string())
}

/// Which images the VMs hold.
#[derive(Clone, Debug)]
pub struct ImageSet {
    /// `image-pair` or `image-clones`.
    pub scenario: &'static str,
    /// The image of each VM (one path per VM).
    pub vms: Vec<PathBuf>,
    /// After the last change of pages_sharing, it must stay for this long (and
    /// two full scans) to count as final.
    pub settle: Duration,
    /// Longest wait for the final count.
    pub timeout: Duration,
}

/// What the images allow at best.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Ideal {
    /// Bytes of each image (= guest RAM).
    pub image_bytes: u64,
    /// Non-zero pages over all VMs.
    pub data_pages: u64,
    /// All-zero pages over all VMs (no host memory on either side).
    pub zero_pages: u64,
    /// pages_sharing when every group of equal non-zero pages is merged.
    pub pages_sharing: u64,
    /// pages_shared then.
    pub pages_shared: u64,
    /// The `max_page_sharing` it assumes.
    pub max_page_sharing: u64,
}

/// Counts of one contender at the end, and how fast it got there.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ImageResult {
    /// `densevm-full` or `ksm-full`.
    pub name: &'static str,
    /// Seconds from the start of merging until pages_sharing reached 95% of its final value.
    pub t95_s: Option<f64>,
    /// Seconds until pages_sharing last changed.
    pub final_s: Option<f64>,
    /// CPU seconds of the merging thread until 95% of final.
    pub cpu_s_to_95: Option<f64>,
    /// CPU seconds of the merging thread until the final count.
    pub cpu_s_to_final: Option<f64>,
    /// The count settled (no change for the settle time and two full scans).
    pub settled: bool,
    /// Final pages_sharing.
    pub pages_sharing: u64,
    /// Final pages_shared.
    pub pages_shared: u64,
    /// Zero pages merged (densevm's `zero_pages`, KSM's `ksm_zero_pages`).
    pub zero_pages: u64,
    /// pages_sharing / the ideal's.
    pub of_ideal: f64,
    /// Full scans until the final count.
    pub full_scans: u64,
    /// Host memory behind guest RAM before merging.
    pub host_bytes_before: u64,
    /// Host memory behind guest RAM after merging.
    pub host_bytes: u64,
    /// Guest pages whose content differs from their image afterwards (must be 0).
    pub mismatches: u64,
    /// densevm: the merger thread's nice value for the run (ksmd's, so that on a
    /// shared machine both get the same share of a CPU).
    pub merger_nice: Option<i32>,
    /// densevm: how the sharing was mapped (none for the kernel, which changes
    /// page table entries, not mappings).
    pub mapping: Option<MappingAccount>,
}

/// densevm: what the sharing cost in host mappings.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct MappingAccount {
    /// Guest pages the merger mapped onto another frame.
    pub merges: u64,
    /// Remap calls (`mmap`s) those merges took.
    pub merge_runs: u64,
    /// Merges that kept the scanned page's frame instead of the indexed one.
    pub merge_choice_flips: u64,
    /// Host mappings (VMAs) over guest RAM at the end.
    pub vma_count: u64,
}

/// Reads every distinct image once and computes the ideal.
pub fn ideal(set: &ImageSet, max_page_sharing: u64) -> Result<Ideal, CommandError> {
    let mut distinct: Vec<(&PathBuf, u64)> = Vec::new();
    for p in &set.vms {
        match distinct.iter_mut().find(|(q, _)| *q == p) {
            Some((_, n)) => *n += 1,
            None => distinct.push((p, 1)),
        }
    }
    let mut size = None;
    let mut contents = Vec::new();
    for (path, _) in &distinct {
        let bytes = std::fs::read(path).map_err(|e| rt(format!("reading {}: {e}", path.display())))?;
        if bytes.is_empty() || bytes.len() % PAGE_SIZE != 0 {
            return Err(rt(format!("{}: {} bytes, not a positive multiple of 4 KiB", path.display(), bytes.len())));
        }
        if size.is_some_and(|s| s != bytes.len()) {
            return Err(rt(format!("{}: the images differ in size", path.display())));
        }
        size = Some(bytes.len());
        contents.push(bytes);
    }
    let mut ideal = Ideal { image_bytes: size.unwrap_or(0) as u64, max_page_sharing, ..Ideal::default() };
    let mut groups: HashMap<&[u8], u64> = HashMap::new();
    for ((_, times), bytes) in distinct.iter().zip(&contents) {
        for page in bytes.chunks_exact(PAGE_SIZE) {
            if memory::pool::is_zero(page) {
                ideal.zero_pages += times;
            } else {
                ideal.data_pages += times;
                *groups.entry(page).or_default() += times;
            }
        }
    }
    let mps = max_page_sharing.max(2);
    for &n in groups.values() {
        // KSM's chaining (ksm_tests.c): full frames of `mps`, a last one of >= 2.
        let shared = if n % mps <= 1 { n / mps } else { n / mps + 1 };
        ideal.pages_shared += shared;
        ideal.pages_sharing += if n % mps <= 1 { shared * (mps - 1) } else { n - shared };
    }
    Ok(ideal)
}

/// Merge counters sampled while a contender runs.
#[derive(Clone, Copy, Default)]
struct Counts {
    sharing: u64,
    shared: u64,
    scans: u64,
}

/// Samples `counts` until the count is final; fills the timing fields of `r`.
fn converge(
    r: &mut ImageResult,
    set: &ImageSet,
    mut counts: impl FnMut() -> Result<Counts, CommandError>,
    cpu: impl Fn() -> Option<f64>,
    interrupted: &dyn Fn() -> bool,
) -> Result<Counts, CommandError> {
    let (t0, cpu0) = (Instant::now(), cpu());
    let first = counts()?;
    let mut samples = vec![(0.0, first.sharing, cpu0)];
    let (mut last, mut change_at, mut change_scans) = (first, t0, first.scans);
    loop {
        if interrupted() {
            return Err(rt("interrupted"));
        }
        std::thread::sleep(SAMPLE);
        let c = counts()?;
        let now = Instant::now();
        if c.sharing != last.sharing {
            (change_at, change_scans) = (now, c.scans);
            samples.push(((now - t0).as_secs_f64(), c.sharing, cpu()));
        }
        last = c;
        if now - change_at >= set.settle && c.scans >= change_scans + 2 {
            r.settled = true;
            break;
        }
        if now - t0 >= set.timeout {
            break;
        }
    }
    let fin = last.sharing;
    let used = |c: Option<f64>| c.zip(cpu0).map(|(b, a)| b - a);
    if let Some(&(t, _, c)) = samples.iter().find(|s| s.1 as f64 >= 0.95 * fin as f64) {
        (r.t95_s, r.cpu_s_to_95) = (Some(t), used(c));
    }
    if let Some(&(t, _, c)) = samples.last() {
        (r.final_s, r.cpu_s_to_final) = (Some(t), used(c));
    }
    r.full_scans = last.scans - first.scans;
    (r.pages_sharing, r.pages_shared) = (last.sharing, last.shared);
    Ok(last)
}

/// Pages of `read(offset, buf)` (a guest's RAM) that differ from `image`.
fn mismatches(
    image: &File,
    len: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), CommandError>,
) -> Result<u64, CommandError> {
    let (mut want, mut got) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut bad = 0;
    let mut off = 0;
    while off < len {
        let n = CHUNK.min((len - off) as usize);
        image.read_exact_at(&mut want[..n], off).map_err(rt)?;
        read(off, &mut got[..n])?;
        bad += want[..n].chunks_exact(PAGE_SIZE).zip(got[..n].chunks_exact(PAGE_SIZE)).filter(|(a, b)| a != b).count()
            as u64;
        off += n as u64;
    }
    Ok(bad)
}

fn open(path: &PathBuf) -> Result<File, CommandError> {
    File::open(path).map_err(|e| rt(format!("opening {}: {e}", path.display())))
}

/// densevm's merger at full speed on guests loaded with the images.
pub fn densevm(set: &ImageSet, ideal: &Ideal, interrupted: &dyn Fn() -> bool) -> Result<ImageResult, CommandError> {
    let size = ideal.image_bytes;
    let n = set.vms.len() as u64;
    let capacity = (size * n * 2).next_multiple_of(memory::HUGE_FRAME_SIZE as u64);
    let mgr = MemoryManager::new(ManagerConfig::with_capacity(capacity)).map_err(rt)?;
    let mut guests = Vec::new();
    for (i, path) in set.vms.iter().enumerate() {
        let vm = i as u32 + 1;
        guests.push(mgr.create_guest(vm, size).map_err(rt)?);
        mgr.load_image(vm, &open(path)?).map_err(|e| rt(format!("loading {}: {e}", path.display())))?;
        mgr.set_merge(vm, true, 1).map_err(rt)?;
    }
    let mut r = ImageResult { name: "densevm-full", host_bytes_before: mgr.stats().host_bytes, ..Default::default() };
    let tid = mgr.merger().scanner_tid();
    let task = format!("/proc/self/task/{tid}");
    // ksmd runs at nice 5: the merger gets the same weight against other load.
    if let Some(nice) = ksmd_pid().and_then(|pid| task_nice(&format!("/proc/{pid}"))) {
        match set_thread_nice(tid, nice) {
            Ok(()) => r.merger_nice = Some(nice),
            Err(e) => tracing::warn!("setting the merger thread's nice value to ksmd's ({nice}): {e}"),
        }
    }
    let tunables = Tunables {
        merge_zero_pages: true,
        change_detection: ChangeDetection::Checksum,
        hold_vcpus: false,
        max_page_sharing: ideal.max_page_sharing as u32,
        ..Tunables::full_speed()
    };
    mgr.merger().set_tunables(tunables).map_err(rt)?;
    let counts = || {
        let s = mgr.merger().stats();
        Ok(Counts { sharing: s.pages_sharing, shared: s.pages_shared, scans: s.full_scans })
    };
    let res = converge(&mut r, set, counts, || task_cpu_s(&task), interrupted);
    mgr.merger().set_run(false);
    res?;
    let stats = mgr.stats();
    (r.host_bytes, r.zero_pages) = (stats.host_bytes, stats.merge.zero_pages);
    r.mapping = Some(MappingAccount {
        merges: stats.merge.merges,
        merge_runs: stats.merge.merge_runs,
        merge_choice_flips: stats.merge.merge_choice_flips,
        vma_count: stats.vma_count,
    });
    for (g, path) in guests.iter().zip(&set.vms) {
        r.mismatches += mismatches(&open(path)?, size, |off, buf| g.read_bytes(off, buf).map_err(rt))?;
    }
    r.of_ideal = r.pages_sharing as f64 / ideal.pages_sharing.max(1) as f64;
    Ok(r)
}

/// The kernel's KSM at full speed (10000 pages, no sleep) on anonymous memory
/// holding the images.
pub fn ksm(
    set: &ImageSet,
    ideal: &Ideal,
    kernel: &mut Kernel,
    interrupted: &dyn Fn() -> bool,
) -> Result<ImageResult, CommandError> {
    let Some(k) = kernel.usable() else { return Err(rt("KSM is not available")) };
    let size = ideal.image_bytes as usize;
    let mut regions = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    for path in &set.vms {
        let region = MmapRegion::<()>::new(size).map_err(rt)?;
        let file = open(path)?;
        let mut off = 0;
        while off < size {
            let n = CHUNK.min(size - off);
            file.read_exact_at(&mut buf[..n], off as u64).map_err(rt)?;
            for (i, page) in buf[..n].chunks_exact(PAGE_SIZE).enumerate() {
                if !memory::pool::is_zero(page) {
                    // SAFETY: the page lies inside `region`, a private mapping of
                    // `size` bytes that only this function uses.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            page.as_ptr(),
                            region.as_ptr().add(off + i * PAGE_SIZE),
                            PAGE_SIZE,
                        )
                    };
                }
            }
            off += n;
        }
        // SAFETY: madvise on the exact bounds of our mapping; it changes no content.
        if unsafe { libc::madvise(region.as_ptr().cast(), size, libc::MADV_MERGEABLE) } != 0 {
            return Err(rt(format!("madvise(MADV_MERGEABLE): {}", std::io::Error::last_os_error())));
        }
        regions.push(region);
    }
    let ranges: Vec<(u64, u64)> = regions.iter().map(|r| (r.as_ptr() as u64, size as u64)).collect();
    let frames = |sharing: u64| -> Result<u64, CommandError> {
        let (present, frames) = present_and_frames(&ranges).map_err(rt)?;
        Ok(frames.unwrap_or_else(|| present.saturating_sub(sharing)) * PAGE_SIZE as u64)
    };
    let mut r = ImageResult { name: "ksm-full", host_bytes_before: frames(0)?, ..Default::default() };
    let base = k.counters().map_err(rt)?;
    let zero0 = k.get_u64("ksm_zero_pages").unwrap_or(0);
    let task = ksmd_pid().map(|pid| format!("/proc/{pid}"));
    k.set("pages_to_scan", "10000").map_err(rt)?;
    k.set("sleep_millisecs", "0").map_err(rt)?;
    k.set("run", "1").map_err(rt)?;
    let k: &crate::bench::ksm::KsmControl = k;
    let counts = || {
        let c = k.counters().map_err(rt)?;
        Ok(Counts {
            sharing: c.pages_sharing.saturating_sub(base.pages_sharing),
            shared: c.pages_shared.saturating_sub(base.pages_shared),
            scans: c.full_scans.saturating_sub(base.full_scans),
        })
    };
    let res = converge(&mut r, set, counts, || task.as_deref().and_then(task_cpu_s), interrupted);
    r.zero_pages = k.get_u64("ksm_zero_pages").unwrap_or(0).saturating_sub(zero0);
    let last = res?;
    r.host_bytes = frames(last.sharing)?;
    for (region, path) in regions.iter().zip(&set.vms) {
        // SAFETY: `region` is a live mapping of `size` readable bytes; only read.
        let mem = unsafe { std::slice::from_raw_parts(region.as_ptr(), size) };
        r.mismatches += mismatches(&open(path)?, size as u64, |off, buf| {
            buf.copy_from_slice(&mem[off as usize..off as usize + buf.len()]);
            Ok(())
        })?;
    }
    r.of_ideal = r.pages_sharing as f64 / ideal.pages_sharing.max(1) as f64;
    Ok(r)
}
