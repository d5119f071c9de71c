//! The balloon routes over the real Unix socket, against a fake VMM: bodies,
//! validation, the life-cycle rule of `PUT`, and the `/metrics` gauges; the
//! budget policy's routes (`GET|PATCH /memory/balloon-policy`).

mod common;

use common::{Harness, RespExt};

const VM: &str = r#"{"vcpu_count": 1, "mem_size_mib": 128, "boot": {"workload": {"fill_mib": 64}}}"#;

#[test]
fn balloon_routes() {
    let h = Harness::new();
    let with = r#"{"vcpu_count": 1, "mem_size_mib": 128, "boot": {"workload": {"fill_mib": 64}},
        "balloon": {"amount_mib": 8, "stats_polling_interval_s": 1}}"#;
    assert_eq!(h.req("PUT", "/vms/b1", Some(with)).status, 204);
    let v = h.req("GET", "/vms/b1", None).json();
    assert_eq!(v["config"]["balloon"]["amount_mib"], 8, "{v}");
    let b = h.req("GET", "/vms/b1/balloon", None);
    assert_eq!(b.status, 200);
    let b = b.json();
    assert_eq!((b["amount_mib"].as_u64(), b["target_pages"].as_u64()), (Some(8), Some(2048)), "{b}");
    assert!(b["counters"]["inflated_pages"].is_u64(), "{b}");
    assert_eq!(h.req("PATCH", "/vms/b1/balloon", Some(r#"{"amount_mib": 16}"#)).status, 204);
    assert_eq!(h.req("GET", "/vms/b1/balloon", None).json()["amount_mib"], 16);
    let r = h.req("PATCH", "/vms/b1/balloon/statistics", Some(r#"{"stats_polling_interval_s": 2}"#));
    assert_eq!(r.status, 204);
    let s = h.req("GET", "/vms/b1/balloon/statistics", None);
    assert_eq!(s.status, 200);
    assert_eq!(s.json()["target_pages"], 4096);

    // Configured on a created VM; refused once it runs.
    assert_eq!(h.req("PUT", "/vms/b2", Some(VM)).status, 204);
    let r = h.req("GET", "/vms/b2/balloon", None);
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.fault().contains("no balloon"));
    assert_eq!(h.req("PUT", "/vms/b2/balloon", Some(r#"{"amount_mib": 4}"#)).status, 204);
    assert_eq!(h.req("GET", "/vms/b2/balloon", None).json()["amount_mib"], 4);
    assert_eq!(h.req("PUT", "/vms/b2/actions", Some(r#"{"action_type": "InstanceStart"}"#)).status, 204);
    let r = h.req("PUT", "/vms/b2/balloon", Some(r#"{"amount_mib": 4}"#));
    assert_eq!(r.status, 409, "{r:?}");

    let m = h.req("GET", "/metrics", None);
    assert_eq!(m.status, 200);
    let text = m.text();
    assert!(text.contains("densevm_vm_balloon_target_bytes{vm_id=\"b1\"} 16777216"), "{text}");
    assert!(text.contains("densevm_vm_balloon_target_bytes{vm_id=\"b2\"} 4194304"), "{text}");
    assert!(text.contains("# TYPE densevm_vm_balloon_returned_bytes gauge"), "{text}");

    assert_eq!(h.req("GET", "/vms/nope/balloon", None).status, 404);
    assert_eq!(h.req("PATCH", "/vms/nope/balloon", Some(r#"{"amount_mib": 1}"#)).status, 404);
}

#[test]
fn bad_balloon_bodies_are_400() {
    let h = Harness::new();
    assert_eq!(h.req("PUT", "/vms/b", Some(VM)).status, 204);
    for (method, path, body, needle) in [
        ("PUT", "/vms/b/balloon", r#"{"amount_mib": 65537}"#, "amount_mib: must be in 0..=65536"),
        ("PUT", "/vms/b/balloon", r#"{"deflate_on_oom": true}"#, "missing field `amount_mib`"),
        ("PUT", "/vms/b/balloon", r#"{"amount_mib": 1, "nope": 1}"#, "unknown field `nope`"),
        ("PUT", "/vms/b/balloon", r#"[1]"#, "invalid request body"),
        ("PATCH", "/vms/b/balloon", r#"{"amount_mib": -1}"#, "amount_mib"),
        ("PATCH", "/vms/b/balloon", r#"{"amount_mib": "8"}"#, "amount_mib"),
        ("PATCH", "/vms/b/balloon/statistics", r#"{"stats_polling_interval_s": 0}"#, "must be in 1..=65535"),
        ("PATCH", "/vms/b/balloon/statistics", r#"{"stats_polling_interval_s": 65536}"#, "stats_polling_interval_s"),
    ] {
        let r = h.req(method, path, Some(body));
        assert_eq!(r.status, 400, "{method} {path} {body}: {r:?}");
        let msg = r.fault();
        assert!(msg.contains(needle), "{method} {path} {body}: {msg}");
    }
    let r = h.req(
        "PUT",
        "/vms/c",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 16, "boot": {"workload": {"fill_mib": 8}}, "balloon": {"amount_mib": 32}}"#),
    );
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("balloon.amount_mib: must not exceed mem_size_mib"));
}

#[test]
fn balloon_policy_routes() {
    let h = Harness::new();
    let p = h.req("GET", "/memory/balloon-policy", None);
    assert_eq!(p.status, 200);
    let p = p.json();
    assert_eq!(p["host_budget_mib"], serde_json::Value::Null, "{p}");
    assert_eq!((p["max_step_mib"].as_u64(), p["interval_ms"].as_u64()), (Some(128), Some(1000)), "{p}");
    assert_eq!(p["band"], "off", "{p}");
    let r = h.req("PATCH", "/memory/balloon-policy", Some(r#"{"host_budget_mib": 512, "max_step_mib": 16}"#));
    assert_eq!(r.status, 200, "{r:?}");
    let p = r.json();
    assert_eq!((p["host_budget_mib"].as_u64(), p["max_step_mib"].as_u64()), (Some(512), Some(16)), "{p}");
    assert_eq!(p["host_budget_bytes"], 512u64 << 20, "{p}");
    assert_eq!(p["targets_mib"]["b1"], 8, "{p}");
    let text = h.req("GET", "/metrics", None).text().to_string();
    for line in [
        "densevm_balloon_policy_budget_bytes 536870912",
        "densevm_balloon_policy_host_used_bytes 67108864",
        "densevm_balloon_policy_actions_total 2",
        "densevm_balloon_policy_target_bytes{vm_id=\"b1\"} 8388608",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
    }
    let r = h.req("PATCH", "/memory/balloon-policy", Some(r#"{"host_budget_mib": null}"#));
    assert_eq!(r.json()["host_budget_mib"], serde_json::Value::Null);
    assert!(!h.req("GET", "/metrics", None).text().contains("densevm_balloon_policy_budget_bytes"));
    for (body, needle) in [
        (r#"{"host_budget_mib": 0}"#, "host_budget_mib: must be in 1..=16777216, got 0"),
        (r#"{"max_step_mib": 0}"#, "max_step_mib: must be in 1..=65536, got 0"),
        (r#"{"interval_ms": 100}"#, "interval_ms: must be in 200..=600000, got 100"),
        (r#"{"margin_mib": 70000}"#, "margin_mib: must be in 0..=65536"),
        (r#"{"host_budget_mib": -1}"#, "host_budget_mib"),
        (r#"{"budget": 1}"#, "unknown field `budget`"),
    ] {
        let r = h.req("PATCH", "/memory/balloon-policy", Some(body));
        assert_eq!(r.status, 400, "{body}: {r:?}");
        assert!(r.fault().contains(needle), "{body}: {}", r.fault());
    }
}
