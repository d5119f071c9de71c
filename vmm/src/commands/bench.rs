//! `densevm bench launch`: launch latency, process start to first guest report.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use super::CommandError;
use crate::cli::{BenchArgs, BenchKind};

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

/// One launch: (wall ms from spawn to the report line, VMM ms from main() to report).
fn launch_once(exe: &std::path::Path, i: u32) -> Result<(f64, f64), CommandError> {
    let t0 = Instant::now();
    let mut child = Command::new(exe)
        .args(["run", "--workload", "tiny", "--serial", "none", "--id"])
        .arg(format!("bench{i}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| CommandError::Runtime(format!("spawning {}: {e}", exe.display())))?;
    let stdout = child.stdout.take().ok_or_else(|| CommandError::Runtime("no stdout".into()))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).map_err(|e| CommandError::Runtime(e.to_string()))?;
    let wall = t0.elapsed().as_secs_f64() * 1e3;
    let status = child.wait().map_err(|e| CommandError::Runtime(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .map_err(|e| CommandError::Runtime(format!("launch {i}: bad report line {line:?}: {e}")))?;
    if !status.success() {
        return Err(CommandError::Runtime(format!("launch {i} failed: {line}")));
    }
    let vmm = v["first_report_ms"]
        .as_f64()
        .ok_or_else(|| CommandError::Runtime(format!("launch {i}: no first_report_ms in {line}")))?;
    Ok((wall, vmm))
}

/// Runs `densevm bench`.
pub fn main(args: BenchArgs) -> Result<ExitCode, CommandError> {
    match args.which {
        BenchKind::Launch { launches, json } => {
            let exe = std::env::current_exe().map_err(|e| CommandError::Runtime(e.to_string()))?;
            let mut walls = Vec::new();
            let mut vmms = Vec::new();
            for i in 0..launches {
                let (w, v) = launch_once(&exe, i)?;
                walls.push(w);
                vmms.push(v);
            }
            let result = serde_json::json!({
                "benchmark": "launch",
                "launches": launches,
                "median_vmm_ms_to_first_report": median(&mut vmms.clone()),
                "median_wall_ms_spawn_to_report": median(&mut walls.clone()),
                "max_vmm_ms": vmms.iter().cloned().fold(0.0, f64::max),
                "target_vmm_ms": 20.0,
            });
            println!(
                "launch latency over {launches} launches: median {:.2} ms VMM time (main() to first guest report), \
                 median {:.2} ms wall (spawn to report line); target <= 20 ms VMM time",
                median(&mut vmms),
                median(&mut walls)
            );
            if let Some(path) = json {
                std::fs::write(&path, result.to_string())
                    .map_err(|e| CommandError::Runtime(format!("writing {}: {e}", path.display())))?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
