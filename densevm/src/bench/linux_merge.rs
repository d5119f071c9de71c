//! `densevm bench linux-merge`: merging real Linux guests. N microVMs boot the small
//! microVM kernel (`resources/linux/build-microvm-kernel.sh`) with the test
//! initramfs (`resources/linux/build-guest.sh`) and hold at their /init marker;
//! then densevm's merger at full speed (managed RAM, one merge domain) or the
//! kernel's KSM at full speed (the same guests on anonymous `MADV_MERGEABLE` RAM,
//! `use_zero_pages` 1) merges them. Contenders alternate over the repetitions;
//! per run: time to 95% and 99% of the settled count (grown by under 0.5% over
//! `STABLE`), the merger's (or ksmd's) CPU until 99%, pages_sharing and zero
//! pages merged.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use memory::Tunables;
use serde::Serialize;
use vmm::boot::linux::LinuxBootConfig;
use vmm::guest_ram::RamPolicy;
use vmm::host::{Host, HostConfig};
use vmm::vm::{BootSource, MergeSpec, SerialOut, VmSpec};

use super::ksm::KsmControl;
use super::merge::measure::{ksmd_pid, task_cpu_s};
use super::merge::{interrupted, policy::tend, rt};
use super::report::{cell, ratio, spread};
use crate::commands::CommandError;

const MARKER: &str = "DENSEVM-GUEST-READY";
const DOMAIN: &str = "linux-merge";
/// Boot to the marker (141-183 s measured on this loaded host).
const BOOT_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// The count is final once unchanged this long.
const STABLE: Duration = Duration::from_secs(5);
const MERGE_TIMEOUT: Duration = Duration::from_secs(300);

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory with the small kernel's `vmlinux`.
    pub kernel_dir: PathBuf,
    /// The initramfs (`resources/linux/out/initramfs.cpio.gz`).
    pub initrd: PathBuf,
    /// Guests per run.
    pub vms: u32,
    /// Guest RAM, MiB.
    pub mem_mib: u32,
    /// Repetitions (contenders alternate).
    pub repeat: u32,
}

/// One run of one contender.
#[derive(Debug, Clone, Serialize)]
struct Run {
    contender: &'static str,
    boot_s: f64,
    to_95_s: f64,
    to_final_s: f64,
    cpu_s: f64,
    pages_sharing: u64,
    zero_pages: u64,
}

fn spec(o: &Options, id: &str, log: &Path, ksm: bool) -> VmSpec {
    VmSpec {
        id: id.to_string(),
        vcpus: 1,
        mem_mib: u64::from(o.mem_mib),
        boot: BootSource::Linux(LinuxBootConfig {
            kernel: o.kernel_dir.join("vmlinux"),
            initrd: Some(o.initrd.clone()),
            cmdline: "console=ttyS0 lpj=4000000 tsc=reliable densevm.hold=3600".into(),
            virtio_mmio: Vec::new(),
            system_map: None,
        }),
        serial: SerialOut::File(log.to_path_buf()),
        ram: if ksm { RamPolicy::Anonymous { mergeable: true } } else { RamPolicy::Managed },
        pause_after_fill: false,
        merge: MergeSpec { enabled: !ksm, domain: Some(DOMAIN.into()) },
        balloon: None,
    }
}

/// (pages_sharing, zero pages) of the contender.
fn counts(host: &Host, ksm: Option<&KsmControl>) -> Result<(u64, u64), CommandError> {
    match ksm {
        Some(k) => {
            let c = k.counters().map_err(rt)?;
            let zero = if k.has("ksm_zero_pages") { k.get_u64("ksm_zero_pages").map_err(rt)? } else { 0 };
            Ok((c.pages_sharing, zero))
        }
        None => {
            let s = host.memory().stats();
            Ok((s.merge.pages_sharing, s.merge.zero_pages))
        }
    }
}

fn one_run(host: &mut Host, o: &Options, rep: u32, ksm: Option<&mut KsmControl>) -> Result<Run, CommandError> {
    let contender = if ksm.is_some() { "ksm-full" } else { "densevm-full" };
    let dir = std::env::temp_dir().join(format!("densevm-linux-merge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(rt)?;
    let ids: Vec<String> = (0..o.vms).map(|i| format!("lx-{rep}-{contender}-{i}")).collect();
    let logs: Vec<PathBuf> = ids.iter().map(|id| dir.join(format!("{id}.log"))).collect();
    for (id, log) in ids.iter().zip(&logs) {
        host.create_vm(spec(o, id, log, ksm.is_some()))?;
    }
    let result = (|| {
        let t0 = Instant::now();
        for id in &ids {
            host.vm_mut(id)?.start().map_err(rt)?;
        }
        // The console may carry bytes that are not UTF-8: search the raw bytes.
        let marked =
            |l: &PathBuf| std::fs::read(l).is_ok_and(|b| b.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()));
        while !logs.iter().all(marked) {
            if t0.elapsed() > BOOT_TIMEOUT || interrupted() {
                return Err(rt(format!("the guests did not print {MARKER} within {BOOT_TIMEOUT:?}")));
            }
            tend(host, &ids)?;
            std::thread::sleep(Duration::from_millis(200));
        }
        let boot_s = t0.elapsed().as_secs_f64();
        // Merge from here, full speed.
        let task = match &ksm {
            Some(_) => ksmd_pid().map(|pid| format!("/proc/{pid}")),
            None => Some(format!("/proc/self/task/{}", host.memory().merger().scanner_tid())),
        };
        let cpu0 = task.as_deref().and_then(task_cpu_s).unwrap_or(0.0);
        let ksm = match ksm {
            Some(k) => {
                k.set("use_zero_pages", "1").map_err(rt)?;
                k.set("run", "1").map_err(rt)?;
                Some(k)
            }
            None => {
                let t = Tunables { merge_zero_pages: true, ..Tunables::full_speed() };
                host.memory().merger().set_tunables(t).map_err(rt)?;
                None
            }
        };
        let t1 = Instant::now();
        // (seconds since merging started, count, merger CPU seconds since then)
        let mut samples: Vec<(f64, u64, f64)> = Vec::new();
        let mut logged = Instant::now();
        loop {
            tend(host, &ids)?;
            let (sharing, zero) = counts(host, ksm.as_deref())?;
            let (now, total) = (t1.elapsed().as_secs_f64(), sharing + zero);
            let cpu = task.as_deref().and_then(task_cpu_s).unwrap_or(0.0) - cpu0;
            samples.push((now, total, cpu));
            // Settled: grown by under 0.5% over the last STABLE (idle guests' kernels
            // keep writing a few pages, so the count never freezes).
            let before = samples.iter().rev().find(|s| now - s.0 >= STABLE.as_secs_f64()).map(|s| s.1);
            if before.is_some_and(|b| total > 0 && total as f64 <= b as f64 * 1.005) {
                break;
            }
            if logged.elapsed() >= Duration::from_secs(10) {
                tracing::info!("{contender}: {sharing} pages sharing, {zero} zero pages after {now:.1} s");
                logged = Instant::now();
            }
            if t1.elapsed() > MERGE_TIMEOUT || interrupted() {
                return Err(rt(format!("merging did not settle within {MERGE_TIMEOUT:?}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (sharing, zero) = counts(host, ksm.as_deref())?;
        let final_total = sharing + zero;
        let first = |frac: f64| samples.iter().find(|s| s.1 as f64 >= frac * final_total as f64);
        let at = |frac: f64| first(frac).map(|s| s.0);
        // "Final": 99% of the settled count (it still creeps up by a few pages).
        let run = Run {
            contender,
            boot_s,
            to_95_s: at(0.95).unwrap_or(f64::NAN),
            to_final_s: at(0.99).unwrap_or(f64::NAN),
            cpu_s: first(0.99).map_or(f64::NAN, |s| s.2),
            pages_sharing: sharing,
            zero_pages: zero,
        };
        if let Some(k) = ksm {
            k.set("run", "2").map_err(rt)?;
        }
        Ok(run)
    })();
    for id in &ids {
        let _ = host.remove_vm(id, None);
    }
    host.memory().merger().set_run(false);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Runs the benchmark.
pub fn main(o: &Options) -> Result<ExitCode, CommandError> {
    if !o.kernel_dir.join("vmlinux").exists() {
        return Err(CommandError::Input(format!("{} has no vmlinux", o.kernel_dir.display())));
    }
    if !o.initrd.exists() {
        return Err(CommandError::Input(format!("no initramfs at {}", o.initrd.display())));
    }
    let mut host = Host::new(HostConfig::default())?;
    host.declare_domain(DOMAIN, vmm::domains::DomainPolicy::default())?;
    let mut ksm = KsmControl::open().map_err(rt)?.full_speed().map_err(rt)?;
    let mut runs = Vec::new();
    for rep in 0..o.repeat {
        for use_ksm in if rep % 2 == 0 { [false, true] } else { [true, false] } {
            let r = one_run(&mut host, o, rep, use_ksm.then_some(&mut ksm))?;
            tracing::info!("rep {rep}: {r:?}");
            runs.push(r);
        }
    }
    ksm.restore().map_err(rt)?;
    println!(
        "{} Linux microVMs of {} MiB (small kernel + busybox initramfs, held at their /init marker), merged at \
         full speed from the marker; {} repetitions, contenders alternating; min / median / max",
        o.vms, o.mem_mib, o.repeat
    );
    println!("| contender | boot s | to 95% s | to 99% s | CPU s to 99% | pages_sharing | zero pages |");
    println!("|---|---|---|---|---|---|---|");
    let of = |c: &str, f: fn(&Run) -> f64, d: usize| {
        cell(spread(runs.iter().filter(|r| r.contender == c).map(|r| Some(f(r)))), d)
    };
    for c in ["densevm-full", "ksm-full"] {
        println!(
            "| {c} | {} | {} | {} | {} | {} | {} |",
            of(c, |r| r.boot_s, 0),
            of(c, |r| r.to_95_s, 2),
            of(c, |r| r.to_final_s, 2),
            of(c, |r| r.cpu_s, 3),
            of(c, |r| r.pages_sharing as f64, 0),
            of(c, |r| r.zero_pages as f64, 0)
        );
    }
    let pairs = |f: fn(&Run) -> f64| {
        spread(runs.chunks(2).map(|p| {
            let get = |c: &str| p.iter().find(|r| r.contender == c).map(f);
            ratio(get("ksm-full"), get("densevm-full"))
        }))
    };
    if let Some(s) = pairs(|r| r.to_95_s) {
        println!("KSM time / densevm time to 95% (same repetition): {:.2} / {:.2} / {:.2}", s.min, s.median, s.max);
    }
    if let Some(s) = pairs(|r| r.cpu_s) {
        println!("KSM CPU / densevm CPU (same repetition): {:.2} / {:.2} / {:.2}", s.min, s.median, s.max);
    }
    Ok(ExitCode::SUCCESS)
}
