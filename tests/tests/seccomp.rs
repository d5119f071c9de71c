//! End-to-end tests of `--seccomp`: the daemon with `enforce` runs workload VMs with
//! merging at full speed to completion with 0 mismatches while every one of its
//! threads runs under a filter (API, event loop, vCPUs, merger, compactor, fault
//! handler, the API bridge's helpers), and `off` installs none. That a forbidden
//! syscall is refused in a filtered thread is shown by the unit tests of
//! `densevm/src/seccomp/tests.rs` (each in a thread of its own: the filters are
//! per thread).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{kvm_available, wait_for, Daemon};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// A workload VM with 2 vCPUs that fills 8 MiB (half of it common to every VM of
/// the test), rewrites a tenth continuously for `secs` seconds and then verifies
/// every page; merging on, in merge domain `d1`.
fn workload_vm(seed: u64, secs: u64) -> String {
    json!({
        "vcpu_count": 2,
        "mem_size_mib": 16,
        "boot": {"workload": {
            "fill_mib": 8, "zero_fraction": 0.1, "shared_fraction": 0.5, "shared_seed": 7,
            "seed": seed, "write_fraction": 0.1, "writes_per_s": 2000, "duration_s": secs
        }},
        "merge": {"enabled": true, "domain": "d1"}
    })
    .to_string()
}

fn expect_status(r: &common::Response, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
}

/// `Seccomp` mode (0 none, 2 filter) and number of stacked filters of every live
/// thread of `pid`, by thread name (`comm`).
fn thread_filters(pid: u32) -> BTreeMap<String, Vec<(u32, u32)>> {
    let mut out: BTreeMap<String, Vec<(u32, u32)>> = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for task in tasks.flatten() {
        let (Ok(comm), Ok(status)) =
            (std::fs::read_to_string(task.path().join("comm")), std::fs::read_to_string(task.path().join("status")))
        else {
            continue; // the thread ended meanwhile
        };
        let field = |name: &str| {
            status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<u32>().ok()).unwrap_or(0)
        };
        out.entry(comm.trim().to_string()).or_default().push((field("Seccomp:"), field("Seccomp_filters:")));
    }
    out
}

#[test]
fn enforce_runs_merging_workload_vms_to_completion_with_every_thread_filtered() {
    if !kvm_available("enforce_runs_merging_workload_vms_to_completion_with_every_thread_filtered") {
        return;
    }
    let mut d = Daemon::start(&["--seccomp", "enforce"]);
    d.declare_domain("d1");
    let ids = ["sc-a", "sc-b"];
    for (i, id) in ids.iter().enumerate() {
        expect_status(&d.req("PUT", &format!("/vms/{id}"), Some(&workload_vm(40 + i as u64, 6))), 204, "create");
    }
    for id in ids {
        let r = d.req("PUT", &format!("/vms/{id}/actions"), Some(r#"{"action_type": "InstanceStart"}"#));
        expect_status(&r, 204, "start");
    }
    // Merging at full speed, with the KVM dirty log as change detection.
    let patch = json!({"run": true, "pages_to_scan": 4096, "sleep_ms": 0, "merge_zero_pages": true,
                       "change_detection": "dirty_log"});
    expect_status(&d.req("PATCH", "/memory/merge", Some(&patch.to_string())), 200, "merge at full speed");
    wait_for("the VMs' common pages to be merged", WAIT, || {
        let m = d.get("/memory");
        (m["pages_sharing"].as_u64() > Some(0)).then_some(())
    });

    // Every thread runs under a filter; vCPU threads under two (the event loop's,
    // inherited, and their own).
    let threads = thread_filters(d.pid());
    for name in ["densevm", "densevm-api", "densevm-api-rt", "densevm-merger", "densevm-compact", "uffd-handler"] {
        let t = threads.get(name).unwrap_or_else(|| panic!("no thread {name}: {threads:?}"));
        assert!(t.iter().all(|&(mode, n)| mode == 2 && n >= 1), "{name}: {t:?}");
    }
    let vcpus: Vec<_> = threads.iter().filter(|(n, _)| n.starts_with("vcpu")).flat_map(|(_, t)| t).collect();
    assert_eq!(vcpus.len(), 4, "{threads:?}");
    assert!(vcpus.iter().all(|&&(mode, n)| mode == 2 && n >= 2), "{threads:?}");

    // The paths that run on helper threads and the compactor, under their filters.
    assert_eq!(d.get("/")["kvm"], true);
    for path in ["/memory", "/vms/sc-a/memory", "/metrics", "/memory/compaction"] {
        expect_status(&d.req("GET", path, None), 200, path);
    }
    let r = d.req("PUT", "/memory/compaction/actions", Some(r#"{"action_type": "Compact"}"#));
    expect_status(&r, 200, "compaction pass");

    // Both guests finish their run and verify every page.
    for id in ids {
        let vm = wait_for(&format!("{id} to finish"), WAIT, || {
            let vm = d.get(&format!("/vms/{id}"));
            assert_eq!(vm["workload"]["mismatches"], 0, "{vm}");
            (vm["state"] != "Running").then_some(vm)
        });
        assert_eq!(vm["exit_reason"], "workload finished", "{vm}");
        assert_eq!(vm["workload"]["phase"], "Done", "{vm}");
        assert_eq!(vm["workload"]["mismatches"], 0, "{vm}");
    }
    let r = d.req("PUT", "/memory/merge/actions", Some(r#"{"action_type": "UnmergeAll"}"#));
    expect_status(&r, 204, "unmerge all");
    for id in ids {
        expect_status(&d.req("DELETE", &format!("/vms/{id}"), None), 204, "delete");
    }
    let status = d.terminate(Duration::from_secs(30));
    let log = d.log_text();
    assert!(status.success(), "{status}:\n{log}");
    assert!(!log.contains("seccomp filter:"), "a filter failed to install:\n{log}");
}

#[test]
fn off_installs_no_filter_and_log_installs_them() {
    if !kvm_available("off_installs_no_filter_and_log_installs_them") {
        return;
    }
    for (mode, expect) in [("off", 0), ("log", 2)] {
        let mut d = Daemon::start(&["--seccomp", mode]);
        // A request has gone through the event loop, which installs its filter first.
        assert!(d.get("/vms")["vms"].is_array());
        let threads = thread_filters(d.pid());
        for name in ["densevm", "densevm-api", "densevm-merger", "densevm-compact", "uffd-handler"] {
            let t = threads.get(name).unwrap_or_else(|| panic!("no thread {name}: {threads:?}"));
            assert!(t.iter().all(|&(m, _)| m == expect), "--seccomp {mode}: {name}: {t:?}");
        }
        assert!(d.terminate(Duration::from_secs(30)).success());
    }
    // A bad mode is a usage error.
    let out = e2e::densevm(&["serve", "--api-sock", "/nonexistent/x.sock", "--seccomp", "strict"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn run_with_enforce_finishes_a_merging_workload() {
    if !kvm_available("run_with_enforce_finishes_a_merging_workload") {
        return;
    }
    let out = e2e::densevm(&["run", "--workload", "quick", "--merge", "--vcpus", "2", "--seccomp", "enforce"]);
    let summary = e2e::last_json_line(&out.stdout).unwrap_or_else(|| {
        panic!("no summary: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    assert!(out.status.success(), "{summary}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(summary["report"]["mismatches"], 0, "{summary}");
    assert_eq!(summary["timeline"]["exit_reason"], "workload finished", "{summary}");
}
