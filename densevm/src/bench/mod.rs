//! `densevm bench`: the benchmark harness (launch latency here; API latency, writes
//! to merged pages and merging against the kernel's KSM in the submodules, with the
//! kernel-KSM harness they share in [`ksm`]).

pub mod api_latency;
pub mod compact;
pub mod cow;
pub mod ksm;
pub mod linux_merge;
pub mod merge;
pub mod report;

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use crate::cli::{BenchArgs, BenchKind};
use crate::commands::CommandError;

/// Ends a benchmark: writes `result` as pretty JSON to `json_path` (when given),
/// then exits 1 with a FAILED line when `mismatches` of the guests' `pages` did not
/// verify, 0 otherwise.
pub(crate) fn finish(
    result: &serde_json::Value,
    json_path: Option<&std::path::Path>,
    mismatches: u64,
    pages: &str,
) -> Result<ExitCode, CommandError> {
    if let Some(path) = json_path {
        let text = serde_json::to_string_pretty(result).map_err(|e| CommandError::Runtime(e.to_string()))?;
        std::fs::write(path, text).map_err(|e| CommandError::Runtime(format!("writing {}: {e}", path.display())))?;
    }
    if mismatches > 0 {
        println!("result: FAILED: {mismatches} {pages} did not verify");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One launch of `densevm run --workload tiny`: returns (wall ms from spawn to the
/// first-report line, VMM ms from the child's main() to its first guest report).
/// The child is then stopped with SIGTERM, which must end it cleanly.
fn launch_once(exe: &std::path::Path, i: u32) -> Result<(f64, f64), CommandError> {
    let t0 = Instant::now();
    let mut child = Command::new(exe)
        .args(["run", "--workload", "tiny", "--serial", "none", "--id"])
        .arg(format!("bench{i}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CommandError::Runtime(format!("spawning {}: {e}", exe.display())))?;
    let stderr = child.stderr.take().ok_or_else(|| CommandError::Runtime("no stderr".into()))?;
    let mut vmm_ms = None;
    let mut wall = 0.0;
    for line in BufReader::new(stderr).lines() {
        let line = line.map_err(|e| CommandError::Runtime(e.to_string()))?;
        if let Some(rest) = line.strip_prefix("densevm: first guest report ") {
            wall = t0.elapsed().as_secs_f64() * 1e3;
            vmm_ms = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok());
            break;
        }
    }
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let out = child.wait_with_output().map_err(|e| CommandError::Runtime(e.to_string()))?;
    let vmm_ms = vmm_ms
        .ok_or_else(|| CommandError::Runtime(format!("launch {i}: the guest never reported ({})", out.status)))?;
    if !out.status.success() {
        return Err(CommandError::Runtime(format!(
            "launch {i}: SIGTERM did not stop the VM cleanly ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        )));
    }
    Ok((wall, vmm_ms))
}

/// Runs `densevm bench`.
pub fn main(args: BenchArgs) -> Result<ExitCode, CommandError> {
    match args.which {
        BenchKind::Api { requests, load_clients, repeat, baseline_exe, client_slice_us, json } => {
            let client_slice = client_slice_us.map(std::time::Duration::from_micros);
            api_latency::main(&api_latency::Options {
                requests,
                load_clients,
                repeat,
                baseline_exe,
                client_slice,
                json,
            })
        }
        BenchKind::Compact { quick, json, repeat } => compact::main(quick, json.as_deref(), repeat),
        BenchKind::Cow { quick, json, repeat } => cow::main(quick, json.as_deref(), repeat),
        BenchKind::Merge { quick, json, policies, repeat, image_pair, image_clones, clones } => {
            merge::main(&merge::Options { quick, json, policies, repeat, image_pair, image_clones, clones })
        }
        BenchKind::LinuxMerge { kernel_dir, initrd, vms, mem_mib, repeat } => {
            linux_merge::main(&linux_merge::Options { kernel_dir, initrd, vms, mem_mib, repeat })
        }
        BenchKind::Launch { launches, json } => {
            let exe = std::env::current_exe().map_err(|e| CommandError::Runtime(e.to_string()))?;
            let mut walls = Vec::new();
            let mut vmms = Vec::new();
            for i in 0..launches {
                let (w, v) = launch_once(&exe, i)?;
                walls.push(w);
                vmms.push(v);
            }
            let (vmm_median, wall_median) = (median(&mut vmms), median(&mut walls));
            let result = serde_json::json!({
                "benchmark": "launch",
                "launches": launches,
                "median_vmm_ms_to_first_report": vmm_median,
                "median_wall_ms_spawn_to_report": wall_median,
                "max_vmm_ms": vmms.iter().cloned().fold(0.0, f64::max),
                "target_vmm_ms": 20.0,
            });
            println!(
                "launch latency over {launches} launches: median {vmm_median:.2} ms VMM time (main() to first guest \
                 report), median {wall_median:.2} ms wall (spawn to report line); target <= 20 ms VMM time"
            );
            if let Some(path) = json {
                std::fs::write(&path, result.to_string())
                    .map_err(|e| CommandError::Runtime(format!("writing {}: {e}", path.display())))?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
