//! End to end: the balloon API of `densevm serve`. A workload VM created with a
//! balloon (`PUT /vms/{id}` with a `balloon` object) whose guest drives it
//! (scenario `balloon_hold_ms`: inflate to the target, hold, deflate); its size,
//! counters and statistics through `GET /vms/{id}/balloon[/statistics]`, a new
//! target and polling interval through `PATCH`, the gauges in `/metrics`, and the
//! errors: bad bodies 400, unknown VM 404, a VM without a balloon 400, a balloon
//! configured after start 409.

mod common;

use std::time::Duration;

use common::{kvm_available, wait_for, Daemon, ResponseExt};
use serde_json::{json, Value};

/// Balloon target (MiB) and the guest's fill.
const MIB: u64 = 16;
const FILL_MIB: u64 = 32;
const WAIT: Duration = Duration::from_secs(60);

fn vm(balloon: Option<Value>, hold_ms: Option<u64>) -> String {
    let mut workload = json!({"fill_mib": FILL_MIB, "duration_s": 1});
    if let Some(ms) = hold_ms {
        workload["balloon_hold_ms"] = json!(ms);
    }
    let mut v = json!({"vcpu_count": 1, "mem_size_mib": 64, "boot": {"workload": workload}});
    if let Some(b) = balloon {
        v["balloon"] = b;
    }
    v.to_string()
}

fn status(d: &Daemon, method: &str, path: &str, body: Option<&str>, want: u16) -> common::Response {
    let r = d.req(method, path, body);
    assert_eq!(r.status, want, "{method} {path} {body:?}: {}", r.text());
    r
}

fn start(d: &Daemon, id: &str) {
    status(d, "PUT", &format!("/vms/{id}/actions"), Some(r#"{"action_type": "InstanceStart"}"#), 204);
}

#[test]
fn balloon_over_the_api() {
    if !kvm_available("balloon_over_the_api") {
        return;
    }
    let d = Daemon::start(&[]);
    let balloon = json!({"amount_mib": MIB, "deflate_on_oom": true, "stats_polling_interval_s": 1,
        "free_page_reporting": false});
    status(&d, "PUT", "/vms/b", Some(&vm(Some(balloon), Some(6000))), 204);
    assert_eq!(d.get("/vms/b")["config"]["balloon"]["amount_mib"], MIB);
    let b = d.get("/vms/b/balloon");
    assert_eq!((b["amount_mib"].as_u64(), b["target_pages"].as_u64()), (Some(MIB), Some(MIB * 256)), "{b}");
    assert_eq!(b["deflate_on_oom"], true, "{b}");
    assert_eq!(b["actual_pages"], 0, "{b}");
    start(&d, "b");

    // The guest inflates to the target and holds it.
    let b = wait_for("the balloon to inflate", WAIT, || {
        let b = d.get("/vms/b/balloon");
        (b["actual_pages"] == MIB * 256).then_some(b)
    });
    assert_eq!(b["actual_mib"], MIB, "{b}");
    assert_eq!(b["counters"]["inflated_pages"], MIB * 256, "{b}");
    assert_eq!(b["counters"]["bytes_returned"], MIB << 20, "{b}");
    let text = d.req("GET", "/metrics", None).text().to_string();
    for line in [
        format!("densevm_vm_balloon_target_bytes{{vm_id=\"b\"}} {}", MIB << 20),
        format!("densevm_vm_balloon_actual_bytes{{vm_id=\"b\"}} {}", MIB << 20),
        format!("densevm_vm_balloon_inflated_pages{{vm_id=\"b\"}} {}", MIB * 256),
        format!("densevm_vm_balloon_returned_bytes{{vm_id=\"b\"}} {}", MIB << 20),
        "densevm_vm_balloon_reported_pages{vm_id=\"b\"} 0".to_string(),
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
    }

    // Statistics arrive (the guest's buffer at start, then answers while held).
    let s = wait_for("statistics while the balloon is held", WAIT, || {
        let s = d.get("/vms/b/balloon/statistics");
        (s["available_memory"] == (FILL_MIB - MIB) << 20).then_some(s)
    });
    assert_eq!(s["total_memory"], FILL_MIB << 20, "{s}");
    assert!(s["updated_at_unix_s"].as_f64().is_some(), "{s}");
    assert_eq!((s["target_mib"].as_u64(), s["actual_mib"].as_u64()), (Some(MIB), Some(MIB)), "{s}");
    status(&d, "PATCH", "/vms/b/balloon/statistics", Some(r#"{"stats_polling_interval_s": 2}"#), 204);
    assert_eq!(d.get("/vms/b")["config"]["balloon"]["stats_polling_interval_s"], 2);

    // A new target: the device's num_pages follows (this guest's driver reads it once).
    status(&d, "PATCH", "/vms/b/balloon", Some(r#"{"amount_mib": 8}"#), 204);
    let b = d.get("/vms/b/balloon");
    assert_eq!((b["amount_mib"].as_u64(), b["target_pages"].as_u64()), (Some(8), Some(8 * 256)), "{b}");
    assert_eq!(d.get("/vms/b/balloon/statistics")["target_mib"], 8);
    let too_big = status(&d, "PATCH", "/vms/b/balloon", Some(r#"{"amount_mib": 65}"#), 400).fault();
    assert!(too_big.contains("does not fit a guest of 64 MiB"), "{too_big}");

    // Configuring the balloon once the VM runs is refused.
    let late = status(&d, "PUT", "/vms/b/balloon", Some(r#"{"amount_mib": 4}"#), 409).fault();
    assert!(late.contains("before the VM starts"), "{late}");

    // The guest deflates after its hold and finds every page zero, then verifies all.
    let b = wait_for("the balloon to deflate", WAIT, || {
        let b = d.get("/vms/b/balloon");
        (b["counters"]["deflated_pages"] == MIB * 256).then_some(b)
    });
    assert_eq!(b["actual_pages"], 0, "{b}");
    let w = wait_for("the workload to finish", WAIT, || {
        let w = d.get("/vms/b")["workload"].clone();
        (w["phase"] == "Done" || w["phase"] == "Failed").then_some(w)
    });
    assert_eq!((w["phase"].as_str(), w["mismatches"].as_u64()), (Some("Done"), Some(0)), "{w}");
}

#[test]
fn balloon_errors_over_the_api() {
    if !kvm_available("balloon_errors_over_the_api") {
        return;
    }
    let d = Daemon::start(&[]);
    status(&d, "PUT", "/vms/plain", Some(&vm(None, None)), 204);
    for (method, path, body) in [
        ("GET", "/vms/plain/balloon", None),
        ("GET", "/vms/plain/balloon/statistics", None),
        ("PATCH", "/vms/plain/balloon", Some(r#"{"amount_mib": 1}"#)),
        ("PATCH", "/vms/plain/balloon/statistics", Some(r#"{"stats_polling_interval_s": 1}"#)),
    ] {
        let msg = status(&d, method, path, body, 400).fault();
        assert_eq!(msg, "VM plain has no balloon", "{method} {path}");
    }
    for (method, path, body) in [
        ("GET", "/vms/nope/balloon", None),
        ("GET", "/vms/nope/balloon/statistics", None),
        ("PUT", "/vms/nope/balloon", Some(r#"{"amount_mib": 1}"#)),
        ("PATCH", "/vms/nope/balloon", Some(r#"{"amount_mib": 1}"#)),
    ] {
        let msg = status(&d, method, path, body, 404).fault();
        assert!(msg.contains("nope"), "{method} {path}: {msg}");
    }
    for (method, path, body, says) in [
        ("PUT", "/vms/plain/balloon", "{\"amount_mib\": 1,", "malformed"),
        ("PUT", "/vms/plain/balloon", "[4]", "invalid request body"),
        ("PUT", "/vms/plain/balloon", r#"{"amount_mib": 4, "colour": 1}"#, "unknown field `colour`"),
        ("PUT", "/vms/plain/balloon", r#"{"amount_mib": 65}"#, "does not fit a guest of 64 MiB"),
        ("PATCH", "/vms/plain/balloon", r#"{"amount_mib": -1}"#, "amount_mib"),
        ("PATCH", "/vms/plain/balloon/statistics", r#"{"stats_polling_interval_s": 0}"#, "1..=65535"),
    ] {
        let msg = status(&d, method, path, Some(body), 400).fault();
        assert!(msg.to_lowercase().contains(&says.to_lowercase()), "{method} {path} {body}: {msg}");
    }

    // A created VM gets its balloon before it starts; statistics off: 400.
    status(&d, "PUT", "/vms/plain/balloon", Some(r#"{"amount_mib": 4}"#), 204);
    let b = d.get("/vms/plain/balloon");
    assert_eq!((b["amount_mib"].as_u64(), b["stats_polling_interval_s"].as_u64()), (Some(4), Some(0)), "{b}");
    assert_eq!(d.get("/vms/plain")["config"]["balloon"]["amount_mib"], 4);
    let off = status(&d, "GET", "/vms/plain/balloon/statistics", None, 400).fault();
    assert!(off.contains("statistics are not enabled"), "{off}");
    let off = status(&d, "PATCH", "/vms/plain/balloon/statistics", Some(r#"{"stats_polling_interval_s": 1}"#), 400);
    assert!(off.fault().contains("statistics are not enabled"), "{}", off.text());
    start(&d, "plain");
    status(&d, "PATCH", "/vms/plain/balloon", Some(r#"{"amount_mib": 2}"#), 204);
    status(&d, "PUT", "/vms/plain/balloon", Some(r#"{"amount_mib": 4}"#), 409);
    // A balloon larger than the VM in the VM's own body.
    let big = vm(Some(json!({"amount_mib": 65})), None);
    let msg = status(&d, "PUT", "/vms/big", Some(&big), 400).fault();
    assert!(msg.contains("balloon.amount_mib: must not exceed mem_size_mib"), "{msg}");
    // A workload that drives a balloon needs one.
    let msg = status(&d, "PUT", "/vms/nob", Some(&vm(None, Some(10))), 400).fault();
    assert!(msg.contains("needs a VM with a balloon"), "{msg}");
}
