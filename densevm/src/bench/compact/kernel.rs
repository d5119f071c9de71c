//! The kernel baseline of `densevm bench compact`: the kernel's own compaction
//! (`echo 1 > /proc/sys/vm/compact_memory`) after fragmenting the same amount
//! of anonymous memory the same way (touch every page, free a random 60% with
//! `MADV_DONTNEED`; `MADV_NOHUGEPAGE` first so that the region is 4 KiB pages,
//! as densevm's frames are).
//!
//! Two numbers, because the kernel compacts every zone of the machine, not
//! only our region:
//!
//! - machine-wide: `pgmigrate_success` from `/proc/vmstat` over the time the
//!   write took: every page it moved (other processes' too, and any other
//!   migration in the window). This is the kernel's migration throughput.
//! - own region: pages of our region whose physical frame changed
//!   (`/proc/self/pagemap` before and after, root only) over the same time:
//!   the region's share of that work, charged the whole write's duration.
//!
//! The region's share of the machine-wide migrations is reported too. (Tried
//! and dropped: compacting the machine once before allocating the region, to
//! take other work out of the measured window; the kernel then moved none of
//! the region's pages and ~1 100 pages machine-wide at ~37k pages/s, a baseline
//! that loses for the wrong reason.)

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use vm_memory::MmapRegion;

/// The kernel's compaction trigger.
pub const COMPACT_MEMORY: &str = "/proc/sys/vm/compact_memory";
/// `/proc/vmstat` counters reported as deltas (prefixes).
const COUNTERS: [&str; 3] = ["pgmigrate_", "compact_", "thp_"];
const PAGE: usize = 4096;

/// Errors of the kernel baseline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was attempted.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
}

fn sys(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Sys { what, source }
}

/// Our region's pages as the page map shows them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RegionFrames {
    /// Present pages.
    pub present: u64,
    /// Distinct 2 MiB physical blocks holding them (`None` without frame numbers).
    pub blocks_2m: Option<u64>,
    /// Fewest 2 MiB blocks they fit in.
    pub ideal_blocks_2m: u64,
}

/// One run of the kernel baseline.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KernelResult {
    /// Bytes of anonymous memory fragmented.
    pub region_bytes: u64,
    /// Pages freed with `MADV_DONTNEED` before compacting.
    pub pages_freed: u64,
    /// Seconds the write to compact_memory took.
    pub compact_s: f64,
    /// CPU seconds of the writing thread during the write: the kernel compacts
    /// in the writer's context, so this is its compaction's CPU time.
    pub compact_cpu_s: Option<f64>,
    /// `pgmigrate_success` delta: pages the kernel migrated in that time, machine-wide.
    pub pages_migrated: u64,
    /// `pages_migrated / compact_s`.
    pub pages_per_s: Option<f64>,
    /// `pages_migrated / compact_cpu_s`: per CPU second, less sensitive to a busy host.
    pub pages_per_cpu_s: Option<f64>,
    /// Deltas of the `/proc/vmstat` counters `pgmigrate_*`, `compact_*`, `thp_*` that changed.
    pub vmstat_deltas: BTreeMap<String, i64>,
    /// Pages of our region whose physical frame changed (`None` without frame numbers).
    pub region_pages_moved: Option<u64>,
    /// Our region before compacting.
    pub region_before: RegionFrames,
    /// Our region after compacting.
    pub region_after: RegionFrames,
    /// Surviving pages of our region whose content changed (must be 0).
    pub region_mismatches: u64,
    /// `region_pages_moved / compact_s`: the kernel's rate on our region alone.
    pub region_pages_per_s: Option<f64>,
    /// `region_pages_moved / pages_migrated`: our region's share of the migrations.
    pub region_share: Option<f64>,
}

/// Why the baseline cannot run here, if it cannot: compact_memory absent or
/// not writable.
pub fn unavailable() -> Option<String> {
    if !Path::new(COMPACT_MEMORY).exists() {
        return Some(format!("{COMPACT_MEMORY} is absent (kernel built without CONFIG_COMPACTION)"));
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(COMPACT_MEMORY)
        .err()
        .map(|e| format!("{COMPACT_MEMORY} is not writable: {e}"))
}

fn vmstat() -> BTreeMap<String, i64> {
    let text = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| COUNTERS.iter().any(|p| k.starts_with(p)))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
        .collect()
}

/// A private anonymous mapping (vm-memory's `MmapRegion`, as the KSM harness
/// uses), unmapped on drop.
struct Region {
    mem: MmapRegion<()>,
    len: usize,
}

impl Region {
    fn new(len: usize) -> Result<Self, Error> {
        let mem = MmapRegion::<()>::new(len).map_err(|e| sys("mmap")(std::io::Error::other(e.to_string())))?;
        let region = Region { mem, len };
        region.advise(0, len / PAGE, libc::MADV_NOHUGEPAGE, "madvise(MADV_NOHUGEPAGE)")?;
        Ok(region)
    }

    fn advise(&self, page: usize, pages: usize, advice: libc::c_int, what: &'static str) -> Result<(), Error> {
        // SAFETY: the range lies inside our mapping (callers pass pages < len / PAGE);
        // the advice only drops or re-describes its memory.
        let rc = unsafe { libc::madvise(self.mem.as_ptr().add(page * PAGE).cast(), pages * PAGE, advice) };
        if rc != 0 {
            return Err(sys(what)(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn word(&self, page: usize) -> *mut u64 {
        // SAFETY: page < len / PAGE (callers iterate the region's pages): inside the mapping.
        unsafe { self.mem.as_ptr().add(page * PAGE).cast() }
    }

    /// Physical frame numbers of the region's pages (0: absent or hidden).
    fn pfns(&self) -> Result<Vec<u64>, Error> {
        use std::os::unix::fs::FileExt;
        let pagemap = std::fs::File::open("/proc/self/pagemap").map_err(sys("opening /proc/self/pagemap"))?;
        let mut buf = vec![0u8; self.len / PAGE * 8];
        let offset = self.mem.as_ptr() as u64 / PAGE as u64 * 8;
        pagemap.read_exact_at(&mut buf, offset).map_err(sys("reading the page map"))?;
        Ok(buf
            .chunks_exact(8)
            .map(|e| {
                let entry = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
                if entry >> 63 == 1 {
                    (entry & ((1 << 55) - 1)).max(1)
                } else {
                    0
                }
            })
            .collect())
    }
}

fn frames_of(pfns: &[u64], have_pfns: bool) -> RegionFrames {
    let present: Vec<u64> = pfns.iter().copied().filter(|&p| p != 0).collect();
    let blocks = have_pfns.then(|| {
        let mut b: Vec<u64> = present.iter().map(|p| p >> 9).collect();
        b.sort_unstable();
        b.dedup();
        b.len() as u64
    });
    RegionFrames {
        present: present.len() as u64,
        blocks_2m: blocks,
        ideal_blocks_2m: (present.len() as u64).div_ceil(512),
    }
}

fn content(seed: u64, page: usize) -> u64 {
    (seed ^ (page as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1
}

/// Fragments `bytes` of anonymous memory (a random `freed` share of its pages,
/// drawn from `seed`) and runs the kernel's compaction once.
pub fn run(bytes: u64, freed: f64, seed: u64) -> Result<KernelResult, Error> {
    let region = Region::new(bytes as usize)?;
    let pages = region.len / PAGE;
    for i in 0..pages {
        // SAFETY: a page of our writable mapping; nothing else refers to it.
        unsafe { region.word(i).write_volatile(content(seed, i)) };
    }
    let mut rng = seed | 1;
    let mut keep = vec![true; pages];
    for k in keep.iter_mut() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        *k = (rng % 1_000_000) as f64 >= freed * 1_000_000.0;
    }
    let mut r = KernelResult { region_bytes: bytes, ..KernelResult::default() };
    let mut i = 0;
    while i < pages {
        if keep[i] {
            i += 1;
            continue;
        }
        let run = keep[i..].iter().take_while(|k| !**k).count();
        region.advise(i, run, libc::MADV_DONTNEED, "madvise(MADV_DONTNEED)")?;
        r.pages_freed += run as u64;
        i += run;
    }
    let before = region.pfns()?;
    let have_pfns = before.iter().zip(&keep).any(|(&p, &k)| k && p > 1);
    r.region_before = frames_of(&before, have_pfns);
    let (compact_s, cpu_s, deltas) = compact_machine()?;
    (r.compact_s, r.compact_cpu_s, r.vmstat_deltas) = (compact_s, cpu_s, deltas);
    r.pages_migrated = r.vmstat_deltas.get("pgmigrate_success").copied().unwrap_or(0).max(0) as u64;
    r.pages_per_s = (r.compact_s > 0.0).then(|| r.pages_migrated as f64 / r.compact_s);
    r.pages_per_cpu_s = r.compact_cpu_s.filter(|&c| c > 0.0).map(|c| r.pages_migrated as f64 / c);
    let after = region.pfns()?;
    r.region_after = frames_of(&after, have_pfns);
    r.region_pages_moved =
        have_pfns.then(|| before.iter().zip(&after).filter(|(&b, &a)| b != 0 && a != 0 && a != b).count() as u64);
    if let Some(moved) = r.region_pages_moved {
        r.region_pages_per_s = (r.compact_s > 0.0).then(|| moved as f64 / r.compact_s);
        r.region_share = (r.pages_migrated > 0).then(|| moved as f64 / r.pages_migrated as f64);
    }
    for (i, _) in keep.iter().enumerate().filter(|(_, k)| **k) {
        // SAFETY: a page of our mapping, read after the kernel moved it (or not).
        if unsafe { region.word(i).read_volatile() } != content(seed, i) {
            r.region_mismatches += 1;
        }
    }
    Ok(r)
}

/// CPU seconds of the calling thread.
fn thread_cpu_s() -> Option<f64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9)
}

/// One write to compact_memory: seconds it took, the writing thread's CPU
/// seconds meanwhile, and the `/proc/vmstat` counters that changed meanwhile.
type Compaction = (f64, Option<f64>, BTreeMap<String, i64>);

/// Writes 1 to compact_memory once (see [`Compaction`]).
fn compact_machine() -> Result<Compaction, Error> {
    let mut file =
        std::fs::OpenOptions::new().write(true).open(COMPACT_MEMORY).map_err(sys("opening compact_memory"))?;
    let counters0 = vmstat();
    let (t0, cpu0) = (Instant::now(), thread_cpu_s());
    file.write_all(b"1\n").map_err(sys("writing compact_memory"))?;
    let (took, cpu) = (t0.elapsed().as_secs_f64(), thread_cpu_s().zip(cpu0).map(|(b, a)| b - a));
    let mut deltas = BTreeMap::new();
    for (k, v1) in vmstat() {
        let d = v1 - counters0.get(&k).copied().unwrap_or(0);
        if d != 0 {
            deltas.insert(k, d);
        }
    }
    Ok((took, cpu, deltas))
}
