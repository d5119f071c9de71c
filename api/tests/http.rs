//! The HTTP layer over the real Unix socket, against a fake VMM.

// `MergeConfig` (the merger's `Tunables`) is `Copy`; common/ still clones it.
mod common;

use std::time::Duration;

use common::{Harness, RespExt};

const VM: &str = r#"{"vcpu_count": 2, "mem_size_mib": 128,
    "boot": {"workload": {"fill_mib": 64, "shared_fraction": 0.5}},
    "merge": {"enabled": true, "domain": "d1"}}"#;

#[test]
fn every_endpoint_happy_path() {
    let h = Harness::new();
    let r = h.req("GET", "/", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["version"], "0.1.0-test");
    assert_eq!(r.json()["kvm_api_version"], 12);

    assert_eq!(h.req("PUT", "/vms/vm-1", Some(VM)).status, 204);
    let kernel = r#"{"vcpu_count": 1, "mem_size_mib": 64, "boot": {"kernel":
        {"kernel_image_path": "/k", "initrd_path": "/i", "boot_args": "console=ttyS0"}}}"#;
    assert_eq!(h.req("PUT", "/vms/k_2", Some(kernel)).status, 204);

    let r = h.req("GET", "/vms", None);
    assert_eq!(r.status, 200);
    let vms = r.json()["vms"].as_array().unwrap().clone();
    assert_eq!(vms.len(), 2);

    let r = h.req("GET", "/vms/vm-1", None);
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["state"], "Created");
    assert_eq!(v["config"]["boot"]["workload"]["fill_mib"], 64);
    assert_eq!(v["config"]["merge"]["domain"], "d1");

    for (action, state) in
        [("InstanceStart", "Running"), ("Pause", "Paused"), ("Resume", "Running"), ("Stop", "Stopped")]
    {
        let body = format!(r#"{{"action_type": "{action}"}}"#);
        let r = h.req("PUT", "/vms/vm-1/actions", Some(&body));
        assert_eq!(r.status, 204, "{action}: {r:?}");
        assert_eq!(h.req("GET", "/vms/vm-1", None).json()["state"], state);
    }

    let r = h.req("GET", "/vms/vm-1/memory", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["guest_pages"], 128 * 256);
    assert_eq!(r.json()["cow_reuses"], 2);
    assert_eq!(r.json()["cow_background_reuses"], 6);

    let r = h.req("GET", "/memory", None);
    assert_eq!(r.status, 200);
    let m = r.json();
    assert_eq!(m["pages_sharing"], 33);
    assert_eq!(m["fragmentation"], 0.5);
    // 22 fields (with `cow_background_reuses`), `compaction` (the compactor's
    // statistics), memory commitment's 3 (`committed_bytes`,
    // `commit_limit_bytes`, `cow_no_frame`) and the discards' 2
    // (`pages_discarded`, `pages_discarded_in_place`).
    assert_eq!(m.as_object().unwrap().len(), 28);
    assert_eq!((m["pages_discarded"].as_u64(), m["pages_discarded_in_place"].as_u64()), (Some(0), Some(0)));
    assert_eq!(m["cow_background_reuses"], 0);
    assert_eq!((m["committed_bytes"].as_u64(), m["cow_no_frame"].as_u64()), (Some(0), Some(0)));
    assert!(m["compaction"].is_object(), "{m}");

    let r = h.req("GET", "/memory/merge", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["change_detection"], "dirty_log");
    assert_eq!(r.json()["hold_vcpus"], true);
    let r = h.req(
        "PATCH",
        "/memory/merge",
        Some(r#"{"run": true, "pages_to_scan": 5000, "change_detection": "checksum"}"#),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["pages_to_scan"], 5000);
    assert_eq!(r.json()["sleep_ms"], 20);
    assert_eq!(h.req("GET", "/memory/merge", None).json()["run"], true);
    let r = h.req("PUT", "/memory/merge/actions", Some(r#"{"action_type": "UnmergeAll"}"#));
    assert_eq!(r.status, 204);

    assert_eq!(m["compaction"]["passes"], 3);
    let r = h.req("GET", "/memory/compaction", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        serde_json::json!({"enabled": true, "proactiveness": 20, "max_pages_per_s": memory::compact::tunables::DEFAULT_MAX_PAGES_PER_S})
    );
    let r = h.req("PATCH", "/memory/compaction", Some(r#"{"proactiveness": 0, "max_pages_per_s": 100000000}"#));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), serde_json::json!({"enabled": true, "proactiveness": 0, "max_pages_per_s": 100000000}));
    assert_eq!(h.req("PATCH", "/memory/compaction", Some(r#"{"enabled": false}"#)).json()["proactiveness"], 0);
    assert_eq!(h.req("GET", "/memory/compaction", None).json()["enabled"], false);
    let r = h.req("PUT", "/memory/compaction/actions", Some(r#"{"action_type": "Compact"}"#));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let report = r.json();
    assert_eq!(report["pages_migrated"], 700);
    assert_eq!(report["frames_2m_returned"], 2);
    assert_eq!(report["failures"]["vma_budget"], 0);

    let r = h.req("GET", "/metrics", None);
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    assert!(r.body.contains("densevm_vm_guest_pages{vm_id=\"vm-1\"} 32768"), "{}", r.body);
    assert!(r.body.contains("densevm_vm_state{vm_id=\"k_2\",state=\"Created\"} 1"));
    assert!(r.body.contains("densevm_memory_pages_shared 7"));

    let r = h.req("GET", "/openapi.json", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.body, api::openapi::openapi_json());

    assert_eq!(h.req("DELETE", "/vms/vm-1", None).status, 204);
    let r = h.req("GET", "/vms/vm-1", None);
    assert_eq!(r.status, 404);
    assert!(r.fault().contains("vm-1"));
}

#[test]
fn vmm_errors_pass_through() {
    let h = Harness::new();
    assert_eq!(h.req("PUT", "/vms/a", Some(VM)).status, 204);
    let r = h.req("PUT", "/vms/a", Some(VM));
    assert_eq!(r.status, 409);
    assert!(r.fault().contains("exists"));
    let r = h.req("PUT", "/vms/a/actions", Some(r#"{"action_type": "Resume"}"#));
    assert_eq!(r.status, 409);
    assert_eq!(r.fault(), "cannot Resume a Created VM");
    for (m, p) in [("GET", "/vms/nope"), ("DELETE", "/vms/nope"), ("GET", "/vms/nope/memory")] {
        let r = h.req(m, p, None);
        assert_eq!(r.status, 404, "{m} {p}");
        r.fault();
    }
    let r = h.req("PUT", "/vms/nope/actions", Some(r#"{"action_type": "Stop"}"#));
    assert_eq!(r.status, 404);
}

#[test]
fn bad_requests_are_400_with_a_fault_message() {
    let h = Harness::new();
    let cases: &[(&str, &str, &str, &str)] = &[
        ("PUT", "/vms/a", "{\"vcpu_count\": 1,", "malformed JSON"),
        ("PUT", "/vms/a", "", "empty"),
        ("PUT", "/vms/a", "[1, 2]", "invalid request body"),
        (
            "PUT",
            "/vms/a",
            r#"{"vcpu_count": 1, "mem_size_mib": 64, "boot": {"workload": {}}, "cpus": 2}"#,
            "unknown field `cpus`",
        ),
        (
            "PUT",
            "/vms/a",
            r#"{"vcpu_count": 1, "mem_size_mib": 64, "boot": {"workload": {"fil_mib": 1}}}"#,
            "boot.workload.fil_mib: unknown field `fil_mib`",
        ),
        (
            "PUT",
            "/vms/a",
            r#"{"vcpu_count": "one", "mem_size_mib": 64, "boot": {"workload": {}}}"#,
            "vcpu_count: invalid type",
        ),
        (
            "PUT",
            "/vms/a",
            r#"{"vcpu_count": 33, "mem_size_mib": 64, "boot": {"workload": {"fill_mib": 8}}}"#,
            "vcpu_count: must be in 1..=32, got 33",
        ),
        (
            "PUT",
            "/vms/a",
            r#"{"vcpu_count": 1, "mem_size_mib": 65537, "boot": {"workload": {"fill_mib": 8}}}"#,
            "mem_size_mib: must be in 1..=65536",
        ),
        (
            "PUT",
            "/vms/a",
            r#"{"vcpu_count": 1, "mem_size_mib": 64, "boot": {"workload": {"zero_fraction": 2}}}"#,
            "boot.workload.zero_fraction",
        ),
        (
            "PUT",
            "/vms/a",
            r#"{"vcpu_count": 1, "mem_size_mib": 64, "boot": {"floppy": {}}}"#,
            "unknown variant `floppy`",
        ),
        (
            "PUT",
            "/vms/a",
            r#"{"vcpu_count": 1, "mem_size_mib": 64, "boot": {"workload": {"fill_mib": 8}},
                "merge": {"enabled": true, "domain": "bad domain"}}"#,
            "merge.domain",
        ),
        ("PUT", "/vms/a.b", VM, "invalid vm_id"),
        ("PUT", &format!("/vms/{}", "x".repeat(65)), VM, "vm_id: must be 1..=64"),
        ("GET", "/vms/%2e%2e", "", "invalid vm_id"),
        ("PUT", "/vms/a/actions", r#"{"action_type": "Reboot"}"#, "unknown variant"),
        ("PUT", "/vms/a/actions", r#"{}"#, "missing field `action_type`"),
        ("PATCH", "/memory/merge", r#"{"sleep_ms": 60001}"#, "sleep_ms: must be in 0..=60000"),
        ("PATCH", "/memory/merge", r#"{"pages_to_scan": 0}"#, "pages_to_scan"),
        ("PATCH", "/memory/merge", r#"{"max_page_sharing": 1}"#, "max_page_sharing"),
        ("PATCH", "/memory/merge", r#"{"run": "yes"}"#, "run: invalid type"),
        ("PATCH", "/memory/merge", r#"{"change_detection": "magic"}"#, "unknown variant"),
        ("PATCH", "/memory/merge", r#"{"scan": 1}"#, "unknown field"),
        ("PUT", "/memory/merge/actions", r#"{"action_type": "MergeAll"}"#, "unknown variant"),
        ("PATCH", "/memory/compaction", r#"{"proactiveness": 101}"#, "proactiveness: must be in 0..=100, got 101"),
        ("PATCH", "/memory/compaction", r#"{"proactiveness": -1}"#, "proactiveness: invalid value"),
        ("PATCH", "/memory/compaction", r#"{"max_pages_per_s": 0}"#, "max_pages_per_s: must be in 1..=100000000"),
        (
            "PATCH",
            "/memory/compaction",
            r#"{"max_pages_per_s": 100000001}"#,
            "max_pages_per_s: must be in 1..=100000000",
        ),
        ("PATCH", "/memory/compaction", r#"{"enabled": "yes"}"#, "enabled: invalid type"),
        ("PATCH", "/memory/compaction", r#"{"eager": true}"#, "unknown field `eager`"),
        ("PATCH", "/memory/compaction", "5", "invalid request body: invalid type: integer"),
        ("PUT", "/memory/compaction/actions", r#"{"action_type": "Defrag"}"#, "unknown variant `Defrag`"),
        ("PUT", "/memory/compaction/actions", r#"{"action_type": "Compact", "now": 1}"#, "unknown field `now`"),
        ("PUT", "/memory/compaction/actions", r#"{}"#, "missing field `action_type`"),
    ];
    for (method, path, body, expect) in cases {
        let body = if body.is_empty() && *method == "GET" { None } else { Some(*body) };
        let r = h.req(method, path, body);
        assert_eq!(r.status, 400, "{method} {path} {body:?}: {r:?}");
        let msg = r.fault();
        assert!(msg.contains(expect), "{method} {path}: {msg:?} lacks {expect:?}");
    }
    // Nothing reached the VMM.
    assert_eq!(h.req("GET", "/vms", None).json()["vms"], serde_json::json!([]));
    assert_eq!(h.req("GET", "/memory/compaction", None).json()["proactiveness"], 20);
}

#[test]
fn unknown_route_404_and_wrong_method_405_are_json() {
    let h = Harness::new();
    for path in ["/nope", "/vms/a/b/c", "/vms/", "/memory/merge/x", "/memory/compaction/x"] {
        let r = h.req("GET", path, None);
        assert_eq!(r.status, 404, "{path}");
        assert!(r.fault().contains(path), "{path}");
    }
    for (m, p, allowed) in [
        ("POST", "/vms/a", "PUT"),
        ("DELETE", "/memory", "GET"),
        ("GET", "/vms/a/actions", "PUT"),
        ("PUT", "/memory/merge", "PATCH"),
        ("PUT", "/memory/compaction", "PATCH"),
        ("DELETE", "/memory/compaction", "GET"),
        ("GET", "/memory/compaction/actions", "PUT"),
        ("POST", "/memory/compaction/actions", "PUT"),
        ("PATCH", "/", "GET"),
    ] {
        let r = h.req(m, p, Some("{}"));
        assert_eq!(r.status, 405, "{m} {p}");
        assert!(r.header("allow").unwrap().contains(allowed), "{r:?}");
        let msg = r.fault();
        assert!(msg.contains(m) && msg.contains(p), "{msg}");
        assert!(msg.contains("allowed: ") && msg.contains(allowed), "{msg}");
    }
}

#[test]
fn body_over_the_cap_is_413() {
    let h = Harness::with(|c| c.max_body_bytes = 1024);
    // Declared too large: rejected before the body is read.
    let big = format!(r#"{{"run": true, "pad": "{}"}}"#, "x".repeat(2000));
    let r = h.req("PATCH", "/memory/merge", Some(&big));
    assert_eq!(r.status, 413);
    assert!(r.fault().contains("1024"));
    // Chunked (no Content-Length): cut off while reading.
    let mut raw = b"PATCH /memory/merge HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                    Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    for _ in 0..4 {
        raw.extend_from_slice(format!("200\r\n{}\r\n", " ".repeat(0x200)).as_bytes());
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let r = common::exchange(common::connect(&h.sock), &raw);
    assert_eq!(r.status, 413, "{r:?}");
    r.fault();
    // Just under the cap is fine.
    let ok = format!(r#"{{"run": true}}{}"#, " ".repeat(1000));
    assert_eq!(h.req("PATCH", "/memory/merge", Some(&ok)).status, 200);
}

#[test]
fn stuck_vmm_times_out_with_503() {
    let h = Harness::with(|c| c.vmm_timeout = Duration::from_millis(300));
    let t = std::time::Instant::now();
    let r = h.req("GET", "/vms/stall-1", None);
    assert_eq!(r.status, 503);
    assert!(r.fault().contains("did not answer GetVm"), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    // The late answer goes nowhere, harmlessly.
    let late = h.vmm.as_ref().unwrap().stalled.lock().unwrap().pop().unwrap();
    assert!(late.is_closed());
    assert!(!late.send(Ok(api::ApiReply::Empty)));
    assert_eq!(h.req("GET", "/", None).status, 200);
}

#[test]
fn vmm_gone_is_503() {
    let mut h = Harness::new();
    h.vmm.take();
    let r = h.req("GET", "/memory", None);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.fault().contains("not running"));
}

/// Finding 7 of issue 15: arrays were accepted where objects are expected.
#[test]
fn bodies_must_be_json_objects() {
    let h = Harness::new();
    let r = h.req("PUT", "/vms/x", Some(r#"[1, 8, {"workload": {"fill_mib": 8}}]"#));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.fault().contains("expected a JSON object"), "{r:?}");
    let r = h.req("PATCH", "/memory/merge", Some("[null, null]"));
    assert_eq!(r.status, 400, "{r:?}");
    let r = h.req("PUT", "/vms/x", Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "boot": {"workload": [8, 0.5]}}"#));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.fault().contains("boot.workload: invalid type: sequence"), "{r:?}");
    assert_eq!(h.req("GET", "/vms", None).json()["vms"], serde_json::json!([]));
    // An integer may be written with a zero fraction.
    let r = h.req("PUT", "/vms/x", Some(r#"{"vcpu_count": 1.0, "mem_size_mib": 16252.0, "boot": {"workload": {}}}"#));
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(h.req("GET", "/vms/x", None).json()["config"]["mem_size_mib"], 16252);
}

/// Finding 7 of issue 15: the Content-Type was not checked.
#[test]
fn bodies_must_be_sent_as_json() {
    let h = Harness::new();
    let body = r#"{"action_type": "UnmergeAll"}"#;
    for ct in [Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("application/jsonx"), None] {
        let ct_line = ct.map(|c| format!("Content-Type: {c}\r\n")).unwrap_or_default();
        let raw = format!(
            "PUT /memory/merge/actions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{ct_line}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let r = common::exchange(common::connect(&h.sock), raw.as_bytes());
        assert_eq!(r.status, 415, "{ct:?}: {r:?}");
        assert!(r.fault().contains("application/json"), "{r:?}");
    }
    let raw = format!(
        "PUT /memory/merge/actions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: Application/JSON; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(common::exchange(common::connect(&h.sock), raw.as_bytes()).status, 204);
    // No body expected: no Content-Type needed.
    let r = common::exchange(common::connect(&h.sock), b"GET /vms HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(h.req("DELETE", "/vms/nope", None).status, 404);
}

/// The domain routes over HTTP (the fake VMM keeps a real registry): declare,
/// idempotent re-PUT, conflicting re-PUT, get, list, delete; bad names and
/// policies are 400 before the VMM is asked.
#[test]
fn domain_routes() {
    let h = Harness::new();
    assert_eq!(h.req("GET", "/domains", None).json(), serde_json::json!({"domains": []}));
    assert_eq!(h.req("PUT", "/domains/team-a", Some("{}")).status, 204);
    assert_eq!(h.req("PUT", "/domains/team-a", Some(r#"{"merge_across_vms": true, "max_vms": 65536}"#)).status, 204);
    let r = h.req("PUT", "/domains/team-a", Some(r#"{"max_vms": 2}"#));
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.fault().contains("exists with policy"), "{}", r.fault());
    let solo = r#"{"merge_across_vms": false, "max_vms": 1}"#;
    assert_eq!(h.req("PUT", "/domains/solo_1", Some(solo)).status, 204);
    let r = h.req("GET", "/domains/solo_1", None);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        serde_json::json!({"domain_name": "solo_1", "policy": {"merge_across_vms": false, "max_vms": 1}, "vm_count": 0})
    );
    let list = h.req("GET", "/domains", None).json();
    let names: Vec<_> = list["domains"].as_array().unwrap().iter().map(|d| d["domain_name"].clone()).collect();
    assert_eq!(names, ["solo_1", "team-a"]);
    for (method, path, body, status, needle) in [
        ("PUT", "/domains/a.b", Some("{}"), 400, "domain_name"),
        ("PUT", &format!("/domains/{}", "x".repeat(65)), Some("{}"), 400, "domain_name"),
        ("PUT", "/domains/d", Some(r#"{"max_vms": 0}"#), 400, "max_vms: must be in 1..=65536"),
        ("PUT", "/domains/d", Some(r#"{"max_vms": 65537}"#), 400, "max_vms: must be in 1..=65536"),
        ("PUT", "/domains/d", Some(r#"{"merge": true}"#), 400, "unknown field"),
        ("PUT", "/domains/d", Some("[]"), 400, "expected a JSON object"),
        ("GET", "/domains/nope", None, 404, "nope"),
        ("DELETE", "/domains/nope", None, 404, "nope"),
        ("GET", "/domains/a%20b", None, 400, "domain_name"),
    ] {
        let r = h.req(method, path, body);
        assert_eq!(r.status, status, "{method} {path}: {r:?}");
        assert!(r.fault().contains(needle), "{method} {path}: {}", r.fault());
    }
    assert_eq!(h.req("DELETE", "/domains/team-a", None).status, 204);
    assert_eq!(h.req("GET", "/domains/team-a", None).status, 404);
    // Declared again after deletion, with another policy.
    assert_eq!(h.req("PUT", "/domains/team-a", Some(r#"{"max_vms": 2}"#)).status, 204);
}
