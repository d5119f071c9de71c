//! `densevm bench api`: latency of `GET /memory` on a real `densevm serve` daemon
//! while its workload VMs run, merging scans at full speed and other clients load
//! the API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api_client::{Client, Response};

use crate::commands::CommandError;

const VMS: u32 = 4;

fn err(e: impl std::fmt::Display) -> CommandError {
    CommandError::Runtime(e.to_string())
}

/// Stops the daemon (SIGTERM) when dropped, so no run leaves one behind.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

fn start_daemon(sock: &Path) -> Result<Daemon, CommandError> {
    let exe = std::env::current_exe().map_err(err)?;
    let child = Command::new(exe)
        .args(["serve", "--api-sock"])
        .arg(sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(err)?;
    let daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Client::unix(sock).is_err() {
        if Instant::now() > deadline {
            return Err(err("the daemon did not open its socket within 20 s"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(daemon)
}

fn expect(r: Response, want: u16, what: &str) -> Result<String, CommandError> {
    if r.status != want {
        return Err(err(format!("{what}: HTTP {} {}", r.status, r.body)));
    }
    Ok(r.body)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs the benchmark; `requests` GET /memory calls are timed.
pub fn main(requests: u32, load_clients: u32, json: Option<&Path>) -> Result<ExitCode, CommandError> {
    let sock: PathBuf = std::env::temp_dir().join(format!("densevm-bench-api-{}.sock", std::process::id()));
    let _daemon = start_daemon(&sock)?;
    let mut c = Client::unix(&sock).map_err(err)?;
    expect(c.request("PUT", "/domains/bench", Some("{}")).map_err(err)?, 204, "declare the merge domain")?;
    for i in 0..VMS {
        let body = r#"{"vcpu_count": 1, "mem_size_mib": 48, "boot": {"workload": {"fill_mib": 32,
            "shared_fraction": 0.8, "zero_fraction": 0.1, "write_fraction": 0.1, "writes_per_s": 1000}},
            "merge": {"enabled": true, "domain": "bench"}}"#;
        expect(c.request("PUT", &format!("/vms/b{i}"), Some(body)).map_err(err)?, 204, "create VM")?;
        let start = r#"{"action_type": "InstanceStart"}"#;
        expect(c.request("PUT", &format!("/vms/b{i}/actions"), Some(start)).map_err(err)?, 204, "start VM")?;
    }
    let merge = r#"{"run": true, "pages_to_scan": 10000, "sleep_ms": 0, "merge_zero_pages": true}"#;
    expect(c.request("PATCH", "/memory/merge", Some(merge)).map_err(err)?, 200, "tune merging")?;

    let stop = Arc::new(AtomicBool::new(false));
    let load_requests = Arc::new(AtomicU64::new(0));
    let mut loaders = Vec::new();
    for i in 0..load_clients {
        let (sock, stop, count) = (sock.clone(), stop.clone(), load_requests.clone());
        loaders.push(std::thread::spawn(move || -> Result<(), String> {
            let mut c = Client::unix(&sock).map_err(|e| e.to_string())?;
            let path = if i % 2 == 0 { "/metrics" } else { "/vms" };
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                c.request("GET", path, None).map_err(|e| e.to_string())?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    let mut lat = Vec::with_capacity(requests as usize);
    let t0 = Instant::now();
    for _ in 0..requests {
        let t = Instant::now();
        expect(c.request("GET", "/memory", None).map_err(err)?, 200, "GET /memory")?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let wall = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.join().map_err(|_| err("a load client panicked"))?.map_err(err)?;
    }
    let memory: serde_json::Value =
        serde_json::from_str(&expect(c.request("GET", "/memory", None).map_err(err)?, 200, "GET /memory")?)
            .map_err(err)?;
    let mut mismatches = 0;
    for i in 0..VMS {
        let vm: serde_json::Value =
            serde_json::from_str(&expect(c.request("GET", &format!("/vms/b{i}"), None).map_err(err)?, 200, "GET vm")?)
                .map_err(err)?;
        mismatches += vm["workload"]["mismatches"].as_u64().unwrap_or(0);
    }
    lat.sort_by(f64::total_cmp);
    let result = serde_json::json!({
        "benchmark": "api",
        "requests": requests,
        "load_clients": load_clients,
        "load_requests": load_requests.load(Ordering::Relaxed),
        "get_memory_us_median": percentile(&lat, 0.5),
        "get_memory_us_p99": percentile(&lat, 0.99),
        "get_memory_us_max": percentile(&lat, 1.0),
        "requests_per_s": f64::from(requests) / wall,
        "pages_sharing_at_end": memory["pages_sharing"],
        "guest_mismatches": mismatches,
    });
    println!(
        "GET /memory over {requests} requests with {VMS} running VMs, merging at full speed and {load_clients} \
         clients loading /metrics and /vms ({} requests): median {:.0} us, p99 {:.0} us, max {:.0} us; \
         pages_sharing {} ; guest mismatches {mismatches}",
        load_requests.load(Ordering::Relaxed),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0),
        memory["pages_sharing"],
    );
    if let Some(path) = json {
        std::fs::write(path, result.to_string()).map_err(|e| err(format!("writing {}: {e}", path.display())))?;
    }
    Ok(if mismatches == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
