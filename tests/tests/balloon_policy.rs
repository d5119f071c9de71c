//! End to end: the host memory budget policy of `densevm serve`
//! (`PATCH /memory/balloon-policy`). Several workload VMs with balloons and
//! statistics hold their balloon drivers (scenario `balloon_hold_ms`; the driver
//! follows the device's target). A budget below their use makes the policy raise
//! their targets: the balloons inflate and the pool's host memory in use
//! (`host_bytes_used`, and the memfd's allocated bytes) falls under the budget by
//! about what was inflated. A budget above their use makes it lower the targets
//! back to 0: the guests get their pages back, find them zero, refill them and
//! verify every page (0 mismatches). And deflate on OOM: a guest that deflates
//! below the target on its own (scenario `balloon_oom_deflate_mib`) is accepted,
//! counted, and keeps running.

mod common;

use std::time::Duration;

use common::{kvm_available, wait_for, Daemon, ResponseExt};
use serde_json::{json, Value};

const VMS: [&str; 3] = ["p0", "p1", "p2"];
const FILL_MIB: u64 = 48;
const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(60);

/// Bytes the frame pool's memfd (`memfd:densevm-pool`) of process `pid` holds.
fn pool_allocated_bytes(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc/pid/fd").flatten() {
        let path = entry.path();
        let Ok(target) = std::fs::read_link(&path) else { continue };
        if target.to_string_lossy().starts_with("/memfd:densevm-pool") {
            return std::fs::metadata(&path).map(|m| m.blocks() * 512).unwrap_or(0);
        }
    }
    panic!("no densevm-pool memfd in process {pid}");
}

fn status(d: &Daemon, method: &str, path: &str, body: Option<&str>, want: u16) -> common::Response {
    let r = d.req(method, path, body);
    assert_eq!(r.status, want, "{method} {path} {body:?}: {}", r.text());
    r
}

fn used(d: &Daemon) -> u64 {
    d.get("/memory")["host_bytes_used"].as_u64().expect("host_bytes_used")
}

fn balloons(d: &Daemon) -> Vec<Value> {
    VMS.iter().map(|id| d.get(&format!("/vms/{id}/balloon"))).collect()
}

fn pages(b: &[Value], field: &str) -> u64 {
    b.iter().map(|b| b[field].as_u64().unwrap_or(0)).sum()
}

#[test]
fn policy_brings_the_fleet_under_its_budget_and_back() {
    if !kvm_available("policy_brings_the_fleet_under_its_budget_and_back") {
        return;
    }
    let d = Daemon::start(&[]);
    for (i, id) in VMS.iter().enumerate() {
        let vm = json!({
            "vcpu_count": 1, "mem_size_mib": 64,
            "boot": {"workload": {"fill_mib": FILL_MIB, "seed": 100 + i, "duration_s": 1, "balloon_hold_ms": 25000}},
            "merge": {"enabled": false},
            "balloon": {"amount_mib": 0, "stats_polling_interval_s": 1}
        });
        status(&d, "PUT", &format!("/vms/{id}"), Some(&vm.to_string()), 204);
        status(&d, "PUT", &format!("/vms/{id}/actions"), Some(r#"{"action_type": "InstanceStart"}"#), 204);
    }
    // Every driver is up and holding once its statistics arrived.
    for id in VMS {
        wait_for(&format!("{id}'s balloon statistics"), WAIT, || {
            let s = d.get(&format!("/vms/{id}/balloon/statistics"));
            (s["total_memory"] == FILL_MIB * MIB).then_some(())
        });
    }
    let p = d.get("/memory/balloon-policy");
    assert_eq!(p["band"], "off", "{p}");
    let (before, memfd_before) = (used(&d), pool_allocated_bytes(d.pid()));
    assert!(before >= 3 * FILL_MIB * MIB, "{before}");

    // A budget 40 MiB below the use: the policy inflates the balloons.
    let budget_mib = before / MIB - 40;
    let body = json!({"host_budget_mib": budget_mib, "max_step_mib": 16, "interval_ms": 200, "margin_mib": 8});
    let p = status(&d, "PATCH", "/memory/balloon-policy", Some(&body.to_string()), 200).json();
    assert_eq!(p["host_budget_bytes"], budget_mib * MIB, "{p}");
    let p = wait_for("the use to fall under the budget", Duration::from_secs(30), || {
        let p = d.get("/memory/balloon-policy");
        let b = balloons(&d);
        let settled = pages(&b, "actual_pages") == pages(&b, "target_pages");
        (p["band"] != "over" && settled && p["host_bytes_used"].as_u64()? <= budget_mib * MIB).then_some(p)
    });
    assert!(p["actions"].as_u64().unwrap() >= 1, "{p}");
    assert!(!p["targets_mib"].as_object().unwrap().is_empty(), "{p}");
    assert_eq!(p["last_action"]["band"], "over", "{p}");
    let b = balloons(&d);
    let inflated = pages(&b, "actual_pages") * 4096;
    assert!(inflated >= 40 * MIB, "{b:?}");
    for (id, b) in VMS.iter().zip(&b) {
        let owned = p["targets_mib"][*id].as_u64().unwrap_or(0);
        assert_eq!(b["amount_mib"].as_u64(), Some(owned), "{id}: the target is the policy's: {b}");
    }
    // The pool's memory in use fell by what the balloons hold (give or take the
    // pages touched meanwhile), and so did the memfd's.
    let (after, memfd_after) = (used(&d), pool_allocated_bytes(d.pid()));
    let fell = before - after;
    assert!(fell.abs_diff(inflated) <= 2 * MIB, "host_bytes_used {before} -> {after}, inflated {inflated}");
    let memfd_fell = memfd_before.saturating_sub(memfd_after);
    assert!(memfd_fell.abs_diff(inflated) <= 2 * MIB, "memfd {memfd_before} -> {memfd_after}, inflated {inflated}");
    let text = d.req("GET", "/metrics", None).text().to_string();
    let budget_line = format!("densevm_balloon_policy_budget_bytes {}", budget_mib * MIB);
    assert!(text.lines().any(|l| l == budget_line), "{budget_line} missing from:\n{text}");
    assert!(text.contains("densevm_balloon_policy_target_bytes{vm_id=\"p"), "{text}");

    // Room again: the targets fall back to 0 and the guests get their pages back.
    let body = json!({"host_budget_mib": before / MIB + 200});
    status(&d, "PATCH", "/memory/balloon-policy", Some(&body.to_string()), 200);
    let p = wait_for("the targets to fall back", Duration::from_secs(30), || {
        let p = d.get("/memory/balloon-policy");
        let b = balloons(&d);
        (p["targets_mib"].as_object()?.is_empty() && pages(&b, "actual_pages") == 0).then_some(p)
    });
    assert_eq!(p["band"], "under", "{p}");
    assert_eq!(p["last_action"]["band"], "under", "{p}");
    for (id, b) in VMS.iter().zip(balloons(&d)) {
        let c = &b["counters"];
        assert_eq!(c["inflated_pages"], c["deflated_pages"], "{id}: {b}");
        assert_eq!(b["amount_mib"], 0, "{id}: {b}");
    }
    // Every guest verifies its pages after the hold: 0 mismatches.
    for id in VMS {
        let w = wait_for(&format!("{id}'s workload to finish"), WAIT, || {
            let w = d.get(&format!("/vms/{id}"))["workload"].clone();
            (w["phase"] == "Done" || w["phase"] == "Failed").then_some(w)
        });
        assert_eq!((w["phase"].as_str(), w["mismatches"].as_u64()), (Some("Done"), Some(0)), "{id}: {w}");
    }
    let log = d.log_text();
    assert!(log.contains("balloon policy:"), "{log}");
}

#[test]
fn guest_deflating_below_the_target_on_oom_is_accepted() {
    if !kvm_available("guest_deflating_below_the_target_on_oom_is_accepted") {
        return;
    }
    let d = Daemon::start(&[]);
    let vm = json!({
        "vcpu_count": 1, "mem_size_mib": 64,
        "boot": {"workload": {"fill_mib": 32, "duration_s": 1, "balloon_hold_ms": 5000, "balloon_oom_deflate_mib": 4}},
        "balloon": {"amount_mib": 16, "deflate_on_oom": true}
    });
    status(&d, "PUT", "/vms/oom", Some(&vm.to_string()), 204);
    status(&d, "PUT", "/vms/oom/actions", Some(r#"{"action_type": "InstanceStart"}"#), 204);
    // Inflated to 16 MiB, then 4 MiB taken back on its own: 12 MiB under a 16 MiB target.
    let b = wait_for("the guest to deflate below its target", WAIT, || {
        let b = d.get("/vms/oom/balloon");
        (b["counters"]["deflated_below_target_pages"] == 4 * 256 && b["actual_mib"] == 12).then_some(b)
    });
    assert_eq!(b["counters"]["inflated_pages"], 16 * 256, "{b}");
    assert_eq!((b["amount_mib"].as_u64(), b["actual_mib"].as_u64()), (Some(16), Some(12)), "{b}");
    let w = wait_for("the workload to finish", WAIT, || {
        let w = d.get("/vms/oom")["workload"].clone();
        (w["phase"] == "Done" || w["phase"] == "Failed").then_some(w)
    });
    assert_eq!((w["phase"].as_str(), w["mismatches"].as_u64()), (Some("Done"), Some(0)), "{w}");
    let b = d.get("/vms/oom/balloon");
    assert_eq!(
        (b["actual_pages"].as_u64(), b["counters"]["deflated_pages"].as_u64()),
        (Some(0), Some(16 * 256)),
        "{b}"
    );
}

#[test]
fn bad_policy_settings_are_400() {
    if !kvm_available("bad_policy_settings_are_400") {
        return;
    }
    let d = Daemon::start(&[]);
    for (body, says) in [
        (r#"{"host_budget_mib": 0}"#, "host_budget_mib: must be in 1..=16777216"),
        (r#"{"interval_ms": 50}"#, "interval_ms: must be in 200..=600000"),
        (r#"{"max_step_mib": 0}"#, "max_step_mib: must be in 1..=65536"),
        (r#"{"margin_mib": -1}"#, "margin_mib"),
        (r#"{"colour": 1}"#, "unknown field `colour`"),
    ] {
        let msg = status(&d, "PATCH", "/memory/balloon-policy", Some(body), 400).fault();
        assert!(msg.contains(says), "{body}: {msg}");
    }
    let p = d.get("/memory/balloon-policy");
    assert_eq!((p["host_budget_mib"].clone(), p["band"].as_str()), (Value::Null, Some("off")), "{p}");
}
