//! The soak tier (issue 15, "Must show"): the real `densevm serve` for
//! `DENSEVM_SOAK_SECS` seconds (default 45; the 10-minute run is
//! `DENSEVM_SOAK_SECS=600`) under everything at once:
//!
//! - churn: workload VMs created, started, paused, resumed, stopped and deleted
//!   in loops (some with a balloon their guest inflates and deflates, whose
//!   target is changed meanwhile); each verified (0 mismatches) before it goes;
//! - merging at full speed (`sleep_ms` 0) with its settings changed and
//!   `UnmergeAll` now and then; compaction passes back to back;
//! - 50 API clients reading `/memory`, `/vms`, per-VM stats and `/metrics`
//!   (half on keep-alive connections, half one connection per request);
//! - the hostile inputs of issue 15 (`soak/hostile.rs`) interleaved.
//!
//! Then: the daemon answers, every surviving VM completes one more full
//! verification with 0 mismatches, commitment is back to the long-lived VMs',
//! and the daemon's fds, threads and anonymous RSS are back within
//! [`FD_SLACK`], [`THREAD_SLACK`] and [`RSS_SLACK_KIB`] of a baseline taken
//! after a warm-up in the same quiet state. Every answer's status is counted;
//! any status a request does not allow (a 5xx above all) fails the test.
//! Without /dev/kvm it prints `SKIPPED soak: <reason>` and passes.

mod common;
#[path = "soak/hostile.rs"]
mod hostile;
#[path = "soak/tally.rs"]
mod tally;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{kvm_available, scratch_dir, Daemon};
use serde_json::json;
use tally::{Caller, Rng, Tally};

/// VMs that live through the whole soak (the first has 2 vCPUs).
const KEEP: [&str; 3] = ["keep-0", "keep-1", "keep-2"];
const CLIENTS: usize = 50;
const CHURNERS: usize = 2;
const WARM_UP: Duration = Duration::from_secs(8);
/// Quiet time before the baseline: the API runtime's idle blocking threads end after 10 s.
const SETTLE: Duration = Duration::from_secs(12);
const WAIT: Duration = Duration::from_secs(60);
/// Tolerances of the figures after the soak over the baseline.
const FD_SLACK: usize = 4;
const THREAD_SLACK: usize = 4;
const RSS_SLACK_KIB: u64 = 32 << 10;
/// The merge settings of the quiet state (baseline and end).
const QUIET_MERGE: &str = r#"{"run": true, "pages_to_scan": 10000, "sleep_ms": 0, "change_detection": "checksum",
    "merge_zero_pages": true, "max_page_sharing": 256}"#;

fn action(a: &str) -> String {
    json!({ "action_type": a }).to_string()
}

/// A workload VM whose shared half is identical across all soak VMs (merging
/// has work) and which rewrites a tenth of its pages continuously.
fn vm_body(seed: u64, vcpus: u64, balloon: bool) -> String {
    let (mem, fill) = if balloon { (32, 16) } else { (16, 8) };
    let workload = json!({"fill_mib": fill, "zero_fraction": 0.1, "shared_fraction": 0.5, "shared_seed": 7,
        "seed": seed, "write_fraction": 0.1, "writes_per_s": 2000, "duration_s": 0});
    let mut v = json!({"vcpu_count": vcpus, "mem_size_mib": mem, "boot": {"workload": workload},
        "merge": {"enabled": true}});
    if balloon {
        v["boot"]["workload"]["balloon_hold_ms"] = json!(1000);
        v["balloon"] = json!({"amount_mib": 8, "deflate_on_oom": true, "stats_polling_interval_s": 1,
            "free_page_reporting": true});
    }
    v.to_string()
}

/// What the workers share.
struct Soak {
    sock: PathBuf,
    tally: Tally,
    stop: AtomicBool,
    /// Churn VMs that exist, and whether they have a balloon.
    live: Mutex<Vec<(String, bool)>>,
    next_vm: AtomicU64,
    created: AtomicU64,
    verified: AtomicU64,
    inflated_pages: AtomicU64,
    deflated_pages: AtomicU64,
    unmerges: AtomicU64,
    compactions: AtomicU64,
    hostile: Vec<hostile::Hostile>,
}

impl Soak {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }

    fn pause(&self, ms: u64) {
        std::thread::sleep(Duration::from_millis(ms));
    }

    fn random_live(&self, rng: &mut Rng) -> Option<(String, bool)> {
        let live = self.live.lock().unwrap();
        (!live.is_empty()).then(|| live[rng.below(live.len() as u64) as usize].clone())
    }
}

/// Waits until VM `id` is in its write loop; false (a finding) when it is not within [`WAIT`].
fn wait_writing(c: &mut Caller, s: &Soak, id: &str) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let v = c.get(&format!("/vms/{id}")).unwrap_or_default();
        if v["workload"]["phase"] == "Writing" {
            return true;
        }
        s.pause(50);
    }
    s.tally.fail(format!("{id} did not reach its write loop within {WAIT:?}"));
    false
}

/// Checks that VM `id`'s guest found no mismatch (and counts its balloon's work).
fn verify(c: &mut Caller, s: &Soak, id: &str, balloon: bool) {
    let v = c.get(&format!("/vms/{id}")).unwrap_or_default();
    let w = &v["workload"];
    if w["mismatches"] != 0
        || w["phase"] == "Failed"
        || !["Running", "Paused"].contains(&v["state"].as_str().unwrap_or(""))
    {
        s.tally.fail(format!("{id}: {v}"));
    }
    s.verified.fetch_add(1, Ordering::Relaxed);
    if balloon {
        let b = c.get(&format!("/vms/{id}/balloon")).unwrap_or_default();
        s.inflated_pages.fetch_add(b["counters"]["inflated_pages"].as_u64().unwrap_or(0), Ordering::Relaxed);
        s.deflated_pages.fetch_add(b["counters"]["deflated_pages"].as_u64().unwrap_or(0), Ordering::Relaxed);
    }
}

/// Creates, starts, pauses, resumes, verifies and deletes VMs until told to stop.
fn churn(s: &Soak, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut c = Caller::new(&s.sock, &s.tally, true);
    while s.running() {
        let n = s.next_vm.fetch_add(1, Ordering::Relaxed);
        let (id, balloon) = (format!("churn-{n}"), n.is_multiple_of(3));
        let path = format!("/vms/{id}");
        if c.call("PUT", &path, Some(&vm_body(1000 + n, 1 + n % 2, balloon)), &[204]).map(|r| r.status) != Some(204) {
            s.pause(500);
            continue;
        }
        s.created.fetch_add(1, Ordering::Relaxed);
        s.live.lock().unwrap().push((id.clone(), balloon));
        let acts = format!("{path}/actions");
        c.call("PUT", &acts, Some(&action("InstanceStart")), &[204]);
        if wait_writing(&mut c, s, &id) {
            c.call("PUT", &acts, Some(&action("Pause")), &[204]);
            s.pause(100 + rng.below(400));
            c.call("PUT", &acts, Some(&action("Resume")), &[204]);
            s.pause(200 + rng.below(1500));
            verify(&mut c, s, &id, balloon);
            match rng.below(3) {
                0 => drop(c.call("PUT", &acts, Some(&action("Stop")), &[204])),
                1 => drop(c.call("PUT", &acts, Some(&action("Pause")), &[204])),
                _ => {}
            }
        }
        c.call("DELETE", &path, None, &[204]);
        s.live.lock().unwrap().retain(|(v, _)| *v != id);
    }
}

/// Merging at full speed, its settings changed every step, `UnmergeAll` every tenth.
fn merger(s: &Soak) {
    let mut c = Caller::new(&s.sock, &s.tally, true);
    let mut i = 0u64;
    while s.running() {
        i += 1;
        let (scan, sharing) = ([100, 1000, 10000, 100000][i as usize % 4], [2, 16, 256][i as usize % 3]);
        let detection = if i.is_multiple_of(3) { "dirty_log" } else { "checksum" };
        let patch = json!({"run": true, "pages_to_scan": scan, "sleep_ms": 0, "merge_zero_pages": i.is_multiple_of(2),
            "change_detection": detection, "max_page_sharing": sharing});
        c.call("PATCH", "/memory/merge", Some(&patch.to_string()), &[200]);
        s.pause(300);
        if i.is_multiple_of(10) {
            c.call("PUT", "/memory/merge/actions", Some(&action("UnmergeAll")), &[204]);
            s.unmerges.fetch_add(1, Ordering::Relaxed);
        }
        c.get("/memory/merge");
    }
}

/// Compaction passes back to back, with the background settings changed.
fn compactor(s: &Soak) {
    let mut rng = Rng::new(77);
    let mut c = Caller::new(&s.sock, &s.tally, true);
    while s.running() {
        let patch = json!({"enabled": true, "proactiveness": rng.below(60), "max_pages_per_s": 100_000});
        c.call("PATCH", "/memory/compaction", Some(&patch.to_string()), &[200]);
        if c.call("PUT", "/memory/compaction/actions", Some(&action("Compact")), &[200, 409])
            .is_some_and(|r| r.status == 200)
        {
            s.compactions.fetch_add(1, Ordering::Relaxed);
        }
        s.pause(100);
    }
}

/// New balloon targets for the churn VMs with a balloon; reads their balloon and statistics.
fn balloons(s: &Soak) {
    let mut rng = Rng::new(99);
    let mut c = Caller::new(&s.sock, &s.tally, true);
    while s.running() {
        if let Some((id, true)) = s.random_live(&mut rng) {
            let body = json!({"amount_mib": 2 + rng.below(14)}).to_string();
            c.call("PATCH", &format!("/vms/{id}/balloon"), Some(&body), &[204, 404]);
            c.call("GET", &format!("/vms/{id}/balloon"), None, &[200, 404]);
            c.call("GET", &format!("/vms/{id}/balloon/statistics"), None, &[200, 404]);
        }
        s.pause(100);
    }
}

/// One API client: reads everything, on the long-lived VMs (200) and the churn VMs (200 or 404).
fn client(s: &Soak, n: usize) {
    let mut rng = Rng::new(n as u64 + 1000);
    let mut c = Caller::new(&s.sock, &s.tally, n.is_multiple_of(2));
    const HOST: [&str; 7] =
        ["/memory", "/vms", "/metrics", "/memory/merge", "/memory/compaction", "/", "/memory/balloon-policy"];
    while s.running() {
        match rng.below(4) {
            0 | 1 => drop(c.call("GET", HOST[rng.below(HOST.len() as u64) as usize], None, &[200])),
            2 => {
                let keep = KEEP[rng.below(KEEP.len() as u64) as usize];
                let tail = ["", "/memory"][rng.below(2) as usize];
                c.call("GET", &format!("/vms/{keep}{tail}"), None, &[200]);
            }
            _ => {
                if let Some((id, _)) = s.random_live(&mut rng) {
                    let tail = ["", "/memory"][rng.below(2) as usize];
                    c.call("GET", &format!("/vms/{id}{tail}"), None, &[200, 404]);
                }
            }
        }
        s.pause(5);
    }
}

/// The hostile inputs, one after another.
fn hostile_client(s: &Soak) {
    let mut c = Caller::new(&s.sock, &s.tally, false);
    while s.running() {
        for h in &s.hostile {
            hostile::send(h, &mut c, &s.sock, &s.tally);
            s.pause(20);
        }
    }
}

/// Runs every worker for `secs`, then stops and joins them.
fn run_phase(s: &Arc<Soak>, time: Duration) {
    s.stop.store(false, Ordering::Relaxed);
    let mut workers = Vec::new();
    let mut spawn = |f: Box<dyn FnOnce(&Soak) + Send>| {
        let s = s.clone();
        workers.push(std::thread::spawn(move || f(&s)));
    };
    for i in 0..CHURNERS {
        spawn(Box::new(move |s| churn(s, i as u64 + 1)));
    }
    spawn(Box::new(merger));
    spawn(Box::new(compactor));
    spawn(Box::new(balloons));
    spawn(Box::new(hostile_client));
    for n in 0..CLIENTS {
        spawn(Box::new(move |s| client(s, n)));
    }
    std::thread::sleep(time);
    s.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("soak worker panicked");
    }
}

/// The daemon's open fds, threads, anonymous RSS and total RSS (KiB).
#[derive(Debug, Clone, Copy)]
struct Figures {
    fds: usize,
    threads: usize,
    rss_anon_kib: u64,
    rss_kib: u64,
}

fn figures(pid: u32) -> Figures {
    let count = |dir: &str| std::fs::read_dir(format!("/proc/{pid}/{dir}")).map(|d| d.count()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Figures { fds: count("fd"), threads: count("task"), rss_anon_kib: kib("RssAnon:"), rss_kib: kib("VmRSS:") }
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let (anon, rss) = (self.rss_anon_kib as f64 / 1024.0, self.rss_kib as f64 / 1024.0);
        write!(f, "{} fds, {} threads, RssAnon {anon:.1} MiB, VmRSS {rss:.1} MiB", self.fds, self.threads)
    }
}

fn within(base: Figures, now: Figures) -> bool {
    now.fds <= base.fds + FD_SLACK
        && now.threads <= base.threads + THREAD_SLACK
        && now.rss_anon_kib <= base.rss_anon_kib + RSS_SLACK_KIB
}

/// Back to the quiet state: only the long-lived VMs, merging at the quiet settings.
fn quiesce(c: &mut Caller) {
    c.call("PATCH", "/memory/merge", Some(QUIET_MERGE), &[200]);
    let vms = c.get("/vms").unwrap_or_default();
    let ids: Vec<&str> = vms["vms"].as_array().into_iter().flatten().filter_map(|v| v["vm_id"].as_str()).collect();
    assert_eq!(ids, KEEP, "only the long-lived VMs should be left: {vms}");
}

#[test]
fn soak() {
    if !kvm_available("soak") {
        return;
    }
    let secs = std::env::var("DENSEVM_SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(45);
    let dir = scratch_dir("soak-files");
    let d = Daemon::start(&["--allowed-dir", dir.to_str().expect("utf-8 dir")]);
    let s = Arc::new(Soak {
        sock: d.sock.clone(),
        tally: Tally::default(),
        stop: AtomicBool::new(false),
        live: Mutex::new(Vec::new()),
        next_vm: AtomicU64::new(0),
        created: AtomicU64::new(0),
        verified: AtomicU64::new(0),
        inflated_pages: AtomicU64::new(0),
        deflated_pages: AtomicU64::new(0),
        unmerges: AtomicU64::new(0),
        compactions: AtomicU64::new(0),
        hostile: hostile::requests(&dir, KEEP[0]),
    });
    let mut c = Caller::new(&d.sock, &s.tally, true);
    for (i, id) in KEEP.iter().enumerate() {
        c.call("PUT", &format!("/vms/{id}"), Some(&vm_body(i as u64, 1 + u64::from(i == 0), false)), &[204]);
        c.call("PUT", &format!("/vms/{id}/actions"), Some(&action("InstanceStart")), &[204]);
    }
    for id in KEEP {
        assert!(wait_writing(&mut c, &s, id), "{:?}\n{}", s.tally.findings(), d.log_text());
    }
    let committed = c.get("/memory").unwrap_or_default()["committed_bytes"].clone();
    run_phase(&s, WARM_UP);
    quiesce(&mut c);
    std::thread::sleep(SETTLE);
    let base = figures(d.pid());

    let t0 = Instant::now();
    let requests_before = s.tally.requests();
    run_phase(&s, Duration::from_secs(secs));
    let soaked = t0.elapsed();
    let requests = s.tally.requests() - requests_before;

    // The daemon answers; every surviving VM verifies all its pages once more.
    assert_eq!(c.call("GET", "/", None, &[200]).map(|r| r.status), Some(200), "{}", d.log_text());
    quiesce(&mut c);
    for id in KEEP {
        let passes =
            |c: &mut Caller| c.get(&format!("/vms/{id}")).unwrap_or_default()["workload"]["full_verifies"].as_u64();
        let before = passes(&mut c).unwrap_or(0);
        let deadline = Instant::now() + WAIT;
        while passes(&mut c) <= Some(before) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(passes(&mut c) > Some(before), "{id} completed no verification in {WAIT:?}");
        verify(&mut c, &s, id, false);
    }
    assert_eq!(c.get("/memory").unwrap_or_default()["committed_bytes"], committed, "commitment not given back");
    // Back to the baseline: polled, since deleted VMs' threads and the API's idle threads end a little later.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut after = figures(d.pid());
    while !within(base, after) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        after = figures(d.pid());
    }
    let log = d.log_text();
    let (errors, warnings) = (log.matches(" ERROR ").count(), log.matches(" WARN ").count());
    let notable: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ") || l.contains(" WARN ")).take(10).collect();
    let (findings, first) = s.tally.findings();
    let report = format!(
        "soak: {soaked:.0?} ({secs} s asked): {} VMs created, {} verified, {requests} requests in the soak ({} with the warm-up), \
         by status {:?}; {} UnmergeAll, {} Compact passes, balloon pages inflated {} deflated {}; daemon log {errors} ERROR, \
         {warnings} WARN lines\n{}\nsoak: baseline {base}\nsoak: after    {after}\nsoak: {findings} findings",
        s.created.load(Ordering::Relaxed),
        s.verified.load(Ordering::Relaxed),
        s.tally.requests(),
        s.tally.by_status(),
        s.unmerges.load(Ordering::Relaxed),
        s.compactions.load(Ordering::Relaxed),
        s.inflated_pages.load(Ordering::Relaxed),
        s.deflated_pages.load(Ordering::Relaxed),
        notable.join("\n"),
    );
    {
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "{report}");
    }
    assert!(findings == 0, "{report}\n{}\nlog:\n{log}", first.join("\n"));
    assert!(!log.contains("panicked"), "{report}\nlog:\n{log}");
    assert!(within(base, after), "{report}: fds, threads or RSS did not come back to the baseline");
    let _ = std::fs::remove_dir_all(dir);
}
