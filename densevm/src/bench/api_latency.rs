//! `densevm bench api`: latency of `GET /memory` on a real `densevm serve` daemon
//! while its workload VMs run, merging scans at full speed and other clients load
//! the API. Repeated, with and without load clients, and optionally against a
//! baseline daemon binary (`--baseline-exe`), all cases interleaved in one run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api_client::{Client, Response};
use serde::Serialize;
use serde_json::Value;

use super::report::{cell, ratio, say, spread};
use crate::commands::CommandError;

const VMS: u32 = 4;
/// The target of issue 15: `GET /memory` p99 while merging at full speed.
const TARGET_P99_US: f64 = 1000.0;
/// Longest wait for the guests to fill their memory before the timed requests.
const FILL_TIMEOUT: Duration = Duration::from_secs(120);

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Timed `GET /memory` requests per run.
    pub requests: u32,
    /// Clients loading `/metrics` and `/vms` in the loaded case (0: only the idle case).
    pub load_clients: u32,
    /// Repetitions of every case.
    pub repeat: u32,
    /// Another densevm binary whose daemon is measured the same way, interleaved.
    pub baseline_exe: Option<PathBuf>,
    /// The scheduler slice the timed client asks for (as a latency-sensitive
    /// monitoring agent can); `None`: the kernel's default.
    pub client_slice: Option<Duration>,
    /// Where to write the JSON results.
    pub json: Option<PathBuf>,
}

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

fn start_daemon(exe: &Path, sock: &Path) -> Result<Daemon, CommandError> {
    let child = Command::new(exe)
        .args(["serve", "--api-sock"])
        .arg(sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| err(format!("starting {}: {e}", exe.display())))?;
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

fn get_json(c: &mut Client, path: &str) -> Result<Value, CommandError> {
    serde_json::from_str(&expect(c.request("GET", path, None).map_err(err)?, 200, path)?).map_err(err)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One measured run: a fresh daemon, its VMs filled, then the timed requests.
#[derive(Debug, Clone, Serialize)]
struct Run {
    daemon: String,
    load_clients: u32,
    median_us: f64,
    p99_us: f64,
    max_us: f64,
    load_requests: u64,
    /// Pages the merger scanned during the timed requests (it was working).
    pages_scanned_meanwhile: u64,
    pages_sharing_at_end: u64,
    guest_mismatches: u64,
}

fn create_vms(c: &mut Client) -> Result<(), CommandError> {
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
    // Time the requests while the guests write, not while they fill.
    let deadline = Instant::now() + FILL_TIMEOUT;
    loop {
        let vms = get_json(c, "/vms")?;
        let filled = vms["vms"].as_array().is_some_and(|v| {
            v.iter().all(|vm| matches!(vm["workload"]["phase"].as_str(), Some("Writing" | "Done" | "Failed")))
        });
        if filled {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(err(format!("the guests did not fill their memory within {} s", FILL_TIMEOUT.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn load_client(sock: PathBuf, path: &'static str, stop: Arc<AtomicBool>, count: Arc<AtomicU64>) -> Result<(), String> {
    let mut c = Client::unix(&sock).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        c.request("GET", path, None).map_err(|e| e.to_string())?;
        count.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

fn one_run(
    name: &str,
    exe: &Path,
    requests: u32,
    load_clients: u32,
    client_slice: Option<Duration>,
) -> Result<Run, CommandError> {
    let sock: PathBuf = std::env::temp_dir().join(format!("densevm-bench-api-{}.sock", std::process::id()));
    let _daemon = start_daemon(exe, &sock)?;
    let mut c = Client::unix(&sock).map_err(err)?;
    create_vms(&mut c)?;
    let scanned_before = get_json(&mut c, "/memory")?["pages_scanned"].as_u64().unwrap_or(0);
    let stop = Arc::new(AtomicBool::new(false));
    let load_requests = Arc::new(AtomicU64::new(0));
    let loaders: Vec<_> = (0..load_clients)
        .map(|i| {
            let (sock, stop, count) = (sock.clone(), stop.clone(), load_requests.clone());
            let path = if i % 2 == 0 { "/metrics" } else { "/vms" };
            std::thread::spawn(move || load_client(sock, path, stop, count))
        })
        .collect();
    // The load clients connect and get going before the timed requests start.
    let warm = Instant::now() + Duration::from_secs(10);
    while load_requests.load(Ordering::Relaxed) < u64::from(load_clients) && Instant::now() < warm {
        std::thread::sleep(Duration::from_millis(1));
    }
    if let Some(slice) = client_slice {
        api::sched::set_slice(slice).map_err(|e| err(format!("the timed client's scheduler slice: {e}")))?;
    }
    let mut lat = Vec::with_capacity(requests as usize);
    let timed = (|| {
        for _ in 0..requests {
            let t = Instant::now();
            expect(c.request("GET", "/memory", None).map_err(err)?, 200, "GET /memory")?;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok::<(), CommandError>(())
    })();
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.join().map_err(|_| err("a load client panicked"))?.map_err(err)?;
    }
    timed?;
    let memory = get_json(&mut c, "/memory")?;
    let mut mismatches = 0;
    for i in 0..VMS {
        mismatches += get_json(&mut c, &format!("/vms/b{i}"))?["workload"]["mismatches"].as_u64().unwrap_or(0);
    }
    lat.sort_by(f64::total_cmp);
    Ok(Run {
        daemon: name.to_string(),
        load_clients,
        median_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        max_us: percentile(&lat, 1.0),
        load_requests: load_requests.load(Ordering::Relaxed),
        pages_scanned_meanwhile: memory["pages_scanned"].as_u64().unwrap_or(0).saturating_sub(scanned_before),
        pages_sharing_at_end: memory["pages_sharing"].as_u64().unwrap_or(0),
        guest_mismatches: mismatches,
    })
}

/// Runs the benchmark.
pub fn main(o: &Options) -> Result<ExitCode, CommandError> {
    let this = std::env::current_exe().map_err(err)?;
    let mut daemons = vec![("densevm", this)];
    if let Some(b) = &o.baseline_exe {
        daemons.push(("baseline", b.clone()));
    }
    let mut cases = vec![0];
    if o.load_clients > 0 {
        cases.push(o.load_clients);
    }
    let mut runs = Vec::new();
    for rep in 0..o.repeat {
        for &lc in &cases {
            // The contenders' order alternates between repetitions.
            let mut order: Vec<_> = daemons.iter().collect();
            if rep % 2 == 1 {
                order.reverse();
            }
            for (name, exe) in order {
                let r = one_run(name, exe, o.requests, lc, o.client_slice)?;
                tracing::info!(
                    "rep {rep} {name} load {lc}: median {:.0} us, p99 {:.0} us, max {:.0} us, {} load requests, \
                     {} pages scanned meanwhile",
                    r.median_us,
                    r.p99_us,
                    r.max_us,
                    r.load_requests,
                    r.pages_scanned_meanwhile
                );
                runs.push(r);
            }
        }
    }
    let client = match o.client_slice {
        Some(s) => format!("a {} us scheduler slice", s.as_micros()),
        None => "the default scheduler slice".to_string(),
    };
    println!(
        "GET /memory, {} timed requests per run by a client on {client}, {VMS} workload VMs writing, merging at \
         full speed; {} repetitions, cases interleaved; min / median / max over the repetitions",
        o.requests, o.repeat
    );
    println!("| daemon | load clients | median µs | p99 µs | max µs | load requests | pages scanned meanwhile |");
    println!("|---|---|---|---|---|---|---|");
    let mut summary = Vec::new();
    let mut met = None;
    for (name, _) in &daemons {
        for &lc in &cases {
            let sel: Vec<&Run> = runs.iter().filter(|r| r.daemon == *name && r.load_clients == lc).collect();
            let of = |f: fn(&Run) -> f64| spread(sel.iter().map(|r| Some(f(r))));
            let (med, p99, max) = (of(|r| r.median_us), of(|r| r.p99_us), of(|r| r.max_us));
            let (load, scanned) = (of(|r| r.load_requests as f64), of(|r| r.pages_scanned_meanwhile as f64));
            println!(
                "| {name} | {lc} | {} | {} | {} | {} | {} |",
                cell(med, 0),
                cell(p99, 0),
                cell(max, 0),
                cell(load, 0),
                cell(scanned, 0)
            );
            if *name == "densevm" {
                let m = p99.map(|p| p.median <= TARGET_P99_US);
                met = Some(met.unwrap_or(true) && m.unwrap_or(false));
            }
            summary.push(
                serde_json::json!({"daemon": name, "load_clients": lc, "median_us": med, "p99_us": p99, "max_us": max}),
            );
        }
    }
    if o.baseline_exe.is_some() {
        for &lc in &cases {
            let pairs = runs.chunks(2 * cases.len()).map(|rep| {
                let find = |n: &str| rep.iter().find(|r| r.daemon == n && r.load_clients == lc).map(|r| r.p99_us);
                ratio(find("densevm"), find("baseline"))
            });
            println!("p99 densevm / baseline, {lc} load clients (same repetition): {}", cell(spread(pairs), 3));
        }
    }
    println!("target p99 <= {TARGET_P99_US:.0} us at the median, every case: {}", say(met));
    let mismatches: u64 = runs.iter().map(|r| r.guest_mismatches).sum();
    println!("guest mismatches over every run: {mismatches}");
    if let Some(path) = &o.json {
        let out = serde_json::json!({"benchmark": "api", "requests": o.requests, "repeat": o.repeat,
            "summary": summary, "runs": runs, "guest_mismatches": mismatches});
        std::fs::write(path, out.to_string()).map_err(|e| err(format!("writing {}: {e}", path.display())))?;
    }
    Ok(if mismatches == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
