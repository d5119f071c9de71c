//! densevm's merger vs the kernel's KSM on the same content, in one run.
//!
//! Content: `GUESTS` guests of `MIB` MiB each; the first `SHARED` fraction of
//! each guest's pages is one common image (clones), the rest is unique per
//! guest. (a) densevm: the guests are densevm guest maps, merged by the merger
//! at full speed (pages_to_scan 10000, sleep 0) with checksums, then again
//! with a dirty log reporting nothing (clean clones, as a VMM with KVM dirty
//! logging would see them). (b) KSM: the same content in private anonymous
//! memory with MADV_MERGEABLE, /sys/kernel/mm/ksm set to pages_to_scan 10000,
//! sleep_millisecs 0, smart_scan 1 (its default), use_zero_pages 0,
//! max_page_sharing 256, and restored afterwards (also on panic).
//!
//! Reported per contender: time to converge (pages_sharing reaches the
//! expected count), pages merged, CPU seconds of the merging thread (ksmd's
//! /proc/<pid>/stat, the merger thread's /proc/self/task/<tid>/stat), and CPU
//! per second while idling over converged memory for `STEADY_S` seconds.
//! JSON goes to `$CARGO_TARGET_DIR/merge_vs_ksm.json` (default: the workspace's `target/`).
//! Environment: DENSEVM_BENCH_GUESTS, DENSEVM_BENCH_MIB, DENSEVM_BENCH_SHARED.

use std::time::{Duration, Instant};

use memory::merge::tunables::ChangeDetection;
use memory::{DirtyLog, ManagerConfig, MemoryManager, Tunables, PAGE_SIZE};
use serde::Serialize;

const KSM: &str = "/sys/kernel/mm/ksm";
const STEADY_S: f64 = 3.0;
const TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Serialize)]
struct Result {
    name: String,
    converge_s: f64,
    pages_shared: u64,
    pages_sharing: u64,
    cpu_s: f64,
    steady_cpu_per_s: f64,
    full_scans: u64,
    extra: serde_json::Value,
}

fn env(name: &str, default: f64) -> f64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Word `i` of page `p` of guest `g`.
fn word(shared_pages: usize, g: usize, p: usize, i: usize) -> u64 {
    let seed = if p < shared_pages { p as u64 } else { ((g as u64 + 1) << 40) | p as u64 };
    (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)) | 1
}

fn fill(base: usize, pages: usize, shared_pages: usize, g: usize) {
    for p in 0..pages {
        let page = (base + p * PAGE_SIZE) as *mut u64;
        for i in 0..PAGE_SIZE / 8 {
            // SAFETY: `base` is a writable mapping of `pages` pages owned by the caller.
            unsafe { page.add(i).write(word(shared_pages, g, p, i)) };
        }
    }
}

/// utime + stime of a task's stat file, in seconds.
fn cpu_seconds(stat_path: &str) -> f64 {
    let Ok(s) = std::fs::read_to_string(stat_path) else { return f64::NAN };
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else { return f64::NAN };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state is field 3, utime 14, stime 15 (1-based) -> indices 11, 12.
    let ticks: u64 = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// Clean clones: nothing is ever dirty.
struct CleanLog;
impl DirtyLog for CleanLog {
    fn take_dirty(&self, _out: &mut Vec<u64>) -> std::result::Result<(), String> {
        Ok(())
    }
}

fn densevm(name: &str, mode: ChangeDetection, guests: usize, pages: usize, shared_pages: usize) -> Result {
    let expected = (shared_pages * (guests - 1)) as u64;
    let capacity = ((guests * pages * PAGE_SIZE) as u64).next_multiple_of(2 << 20) + (64 << 20);
    let mgr = MemoryManager::new(ManagerConfig::with_capacity(capacity)).expect("memory manager");
    let maps: Vec<_> =
        (0..guests).map(|g| mgr.create_guest(g as u32 + 1, (pages * PAGE_SIZE) as u64).expect("guest")).collect();
    for (g, m) in maps.iter().enumerate() {
        fill(m.host_addr(), pages, shared_pages, g);
        if mode == ChangeDetection::DirtyLog {
            mgr.set_dirty_log(m.vm_id(), Box::new(CleanLog)).expect("dirty log");
        }
        mgr.set_merge(m.vm_id(), true, 1).expect("set_merge");
    }
    let host_before = mgr.stats().host_bytes;
    let tid = mgr.merger().scanner_tid();
    let stat = format!("/proc/self/task/{tid}/stat");
    let t = Tunables { pages_to_scan: 10_000, change_detection: mode, ..Tunables::full_speed() };
    let cpu0 = cpu_seconds(&stat);
    let start = Instant::now();
    mgr.merger().set_tunables(t).expect("tunables");
    while mgr.merger().stats().pages_sharing < expected && start.elapsed() < TIMEOUT {
        std::thread::sleep(Duration::from_millis(2));
    }
    let converge_s = start.elapsed().as_secs_f64();
    let cpu1 = cpu_seconds(&stat);
    let s_conv = mgr.stats();
    std::thread::sleep(Duration::from_secs_f64(STEADY_S));
    let cpu2 = cpu_seconds(&stat);
    mgr.merger().set_run(false);
    let s = mgr.stats();
    let unmerge_start = Instant::now();
    let unmerged = mgr.merger().unmerge_all().expect("unmerge_all");
    let unmerge_s = unmerge_start.elapsed().as_secs_f64();
    Result {
        name: name.into(),
        converge_s,
        pages_shared: s_conv.merge.pages_shared,
        pages_sharing: s_conv.merge.pages_sharing,
        cpu_s: cpu1 - cpu0,
        steady_cpu_per_s: (cpu2 - cpu1) / STEADY_S,
        full_scans: s_conv.merge.full_scans,
        extra: serde_json::json!({
            "merges": s_conv.merge.merges,
            "merge_runs": s_conv.merge.merge_runs,
            "merge_choice_flips": s_conv.merge.merge_choice_flips,
            "vma_count": s_conv.vma_count,
            "host_bytes_before": host_before,
            "host_bytes_after": s_conv.host_bytes,
            "huge_frames_returned": s_conv.huge_frames_returned,
            "general_profit": s_conv.merge.general_profit,
            "metadata_bytes": s_conv.merge.metadata_bytes,
            "full_scan_ms_avg": s.merge.full_scan_ms_avg,
            "steady_full_scans": s.merge.full_scans - s_conv.merge.full_scans,
            "unmerge_all_s": unmerge_s,
            "unmerged_pages": unmerged,
        }),
    }
}

/// Saved /sys/kernel/mm/ksm settings, restored on drop (also while unwinding).
struct KsmGuard(Vec<(String, String)>);

impl KsmGuard {
    const KNOBS: [&'static str; 7] =
        ["run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "smart_scan", "use_zero_pages", "advisor_mode"];

    fn save() -> Self {
        let mut saved = Vec::new();
        for k in Self::KNOBS {
            if let Ok(v) = std::fs::read_to_string(format!("{KSM}/{k}")) {
                let v = v.trim();
                // advisor_mode reads as "[none] scan-time".
                let v = v.split_whitespace().find(|w| w.starts_with('[')).map_or(v, |w| w.trim_matches(['[', ']']));
                saved.push((k.to_string(), v.to_string()));
            }
        }
        KsmGuard(saved)
    }
}

impl Drop for KsmGuard {
    fn drop(&mut self) {
        // Unmerge what the benchmark left, then restore every knob (run last).
        let _ = set("run", "2");
        for (k, v) in self.0.iter().filter(|(k, _)| k != "run") {
            if let Err(e) = set(k, v) {
                eprintln!("restoring {KSM}/{k}={v}: {e}");
            }
        }
        if let Some((_, v)) = self.0.iter().find(|(k, _)| k == "run") {
            if let Err(e) = set("run", v) {
                eprintln!("restoring {KSM}/run={v}: {e}");
            }
        }
        eprintln!("restored {KSM}: {:?}", self.0);
    }
}

fn set(knob: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(format!("{KSM}/{knob}"), value)
}

fn get(knob: &str) -> u64 {
    std::fs::read_to_string(format!("{KSM}/{knob}")).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

fn ksmd_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "ksmd").then_some(pid)
    })
}

fn kernel_ksm(guests: usize, pages: usize, shared_pages: usize) -> std::result::Result<Result, String> {
    let expected = (shared_pages * (guests - 1)) as u64;
    let pid = ksmd_pid().ok_or("no ksmd thread")?;
    let stat = format!("/proc/{pid}/stat");
    // run=2 unmerges every process's KSM pages: do not disturb another user.
    if get("run") != 0 || get("pages_shared") > 0 {
        return Err(format!(
            "KSM is in use (run={}, pages_shared={}); not touching it",
            get("run"),
            get("pages_shared")
        ));
    }
    let _guard = KsmGuard::save();
    set("run", "2").map_err(|e| format!("run=2: {e}"))?;
    for (k, v) in [("pages_to_scan", "10000"), ("sleep_millisecs", "0"), ("max_page_sharing", "256")] {
        set(k, v).map_err(|e| format!("{k}={v}: {e}"))?;
    }
    let _ = set("advisor_mode", "none");
    let _ = set("smart_scan", "1");
    let _ = set("use_zero_pages", "0");
    let len = guests * pages * PAGE_SIZE;
    // SAFETY: a fresh private anonymous mapping; unmapped below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let base = base as usize;
    for g in 0..guests {
        fill(base + g * pages * PAGE_SIZE, pages, shared_pages, g);
    }
    // SAFETY: advice on our own mapping; contents are unchanged.
    if unsafe { libc::madvise(base as *mut libc::c_void, len, libc::MADV_MERGEABLE) } != 0 {
        return Err(format!("madvise: {}", std::io::Error::last_os_error()));
    }
    let scans0 = get("full_scans");
    let cpu0 = cpu_seconds(&stat);
    let start = Instant::now();
    set("run", "1").map_err(|e| format!("run=1: {e}"))?;
    while get("pages_sharing") < expected && start.elapsed() < TIMEOUT {
        std::thread::sleep(Duration::from_millis(2));
    }
    let converge_s = start.elapsed().as_secs_f64();
    let cpu1 = cpu_seconds(&stat);
    let (shared, sharing, scans) = (get("pages_shared"), get("pages_sharing"), get("full_scans") - scans0);
    std::thread::sleep(Duration::from_secs_f64(STEADY_S));
    let cpu2 = cpu_seconds(&stat);
    let steady_scans = get("full_scans") - scans0 - scans;
    let unmerge_start = Instant::now();
    set("run", "2").map_err(|e| format!("run=2: {e}"))?;
    let unmerge_s = unmerge_start.elapsed().as_secs_f64();
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(base as *mut libc::c_void, len) };
    Ok(Result {
        name: "kernel KSM (pages_to_scan 10000, sleep 0, smart_scan 1)".into(),
        converge_s,
        pages_shared: shared,
        pages_sharing: sharing,
        cpu_s: cpu1 - cpu0,
        steady_cpu_per_s: (cpu2 - cpu1) / STEADY_S,
        full_scans: scans,
        extra: serde_json::json!({ "steady_full_scans": steady_scans, "unmerge_all_s": unmerge_s, "ksmd_pid": pid }),
    })
}

fn main() {
    if !std::path::Path::new(KSM).exists() {
        println!("SKIPPED merge_vs_ksm: {KSM} is absent (kernel without KSM)");
        return;
    }
    if let Err(e) = memory::uffd::Uffd::probe() {
        println!("SKIPPED merge_vs_ksm: userfaultfd write protection unavailable: {e}");
        return;
    }
    let guests = env("DENSEVM_BENCH_GUESTS", 8.0) as usize;
    let mib = env("DENSEVM_BENCH_MIB", 32.0) as usize;
    let shared = env("DENSEVM_BENCH_SHARED", 0.75);
    let pages = mib * 256;
    let shared_pages = (pages as f64 * shared) as usize;
    println!(
        "merge_vs_ksm: {guests} guests x {mib} MiB ({} MiB), {:.0}% clone image; expected pages_sharing {}",
        guests * mib,
        shared * 100.0,
        shared_pages * (guests - 1)
    );
    let outcome = std::panic::catch_unwind(|| {
        let a = densevm(
            "densevm merger (checksum, 10000 pages, sleep 0)",
            ChangeDetection::Checksum,
            guests,
            pages,
            shared_pages,
        );
        let b = densevm(
            "densevm merger (dirty log, 10000 pages, sleep 0)",
            ChangeDetection::DirtyLog,
            guests,
            pages,
            shared_pages,
        );
        let k = kernel_ksm(guests, pages, shared_pages);
        (a, b, k)
    });
    let Ok((a, b, k)) = outcome else {
        eprintln!("merge_vs_ksm: panicked (KSM settings were restored)");
        std::process::exit(1);
    };
    let mut all = vec![a.clone(), b.clone()];
    match &k {
        Ok(k) => all.push(k.clone()),
        Err(e) => println!("kernel KSM baseline skipped: {e}"),
    }
    println!(
        "{:<58} {:>10} {:>9} {:>9} {:>8} {:>12} {:>6}",
        "", "converge s", "shared", "sharing", "cpu s", "steady cpu/s", "scans"
    );
    for r in &all {
        println!(
            "{:<58} {:>10.3} {:>9} {:>9} {:>8.2} {:>12.3} {:>6}",
            r.name, r.converge_s, r.pages_shared, r.pages_sharing, r.cpu_s, r.steady_cpu_per_s, r.full_scans
        );
        println!("    {}", r.extra);
    }
    let mut ratios = serde_json::Map::new();
    if let Ok(k) = &k {
        for r in [&a, &b] {
            let conv = r.converge_s / k.converge_s;
            let cpu = r.cpu_s / k.cpu_s;
            let steady = r.steady_cpu_per_s / k.steady_cpu_per_s;
            println!("{} vs kernel: converge time x{conv:.2}, CPU x{cpu:.2}, steady CPU x{steady:.2}", r.name);
            ratios.insert(r.name.clone(), serde_json::json!({ "converge": conv, "cpu": cpu, "steady_cpu": steady }));
        }
    }
    // Benches run in the package's directory: the default target is the workspace's.
    let dir =
        std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").into());
    let path = std::path::Path::new(&dir).join("merge_vs_ksm.json");
    let json = serde_json::json!({
        "guests": guests, "mib_per_guest": mib, "shared_fraction": shared,
        "results": all, "ratios_densevm_vs_kernel": ratios,
    });
    match std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap_or_default()) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => println!("writing {}: {e}", path.display()),
    }
}
