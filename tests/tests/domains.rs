//! End-to-end tests of merge domains through the real daemon: a domain is
//! declared (`PUT /domains/{name}`) before a VM may join it; members of a
//! domain that merges across VMs share frames, members of one that does not
//! (and VMs of different domains) do not; an undeclared domain is a 400, a
//! conflicting re-declaration a 409, deleting a domain with members a 409.

mod common;

use std::time::Duration;

use common::{kvm_available, wait_for, Daemon, ResponseExt};
use serde_json::{json, Value};

/// Guest RAM of the test VMs (MiB) and what the workload fills of it.
const MEM_MIB: u64 = 16;
const FILL_MIB: u64 = 8;
const WAIT: Duration = Duration::from_secs(60);

/// An idle workload VM whose data pages are half identical across every VM
/// (shared seed 7), half its own; no zero pages; merging on; in `domain`.
fn vm(seed: u64, domain: Option<&str>) -> String {
    let mut v = json!({
        "vcpu_count": 1,
        "mem_size_mib": MEM_MIB,
        "boot": {"workload": {
            "fill_mib": FILL_MIB, "zero_fraction": 0.0, "shared_fraction": 0.5, "shared_seed": 7,
            "seed": seed, "write_fraction": 0.0, "writes_per_s": 0, "duration_s": 0
        }},
        "merge": {"enabled": true}
    });
    if let Some(d) = domain {
        v["merge"]["domain"] = json!(d);
    }
    v.to_string()
}

fn create_and_start(d: &Daemon, id: &str, seed: u64, domain: Option<&str>) {
    let r = d.req("PUT", &format!("/vms/{id}"), Some(&vm(seed, domain)));
    assert_eq!(r.status, 204, "create {id}: {}", r.text());
    let r = d.req("PUT", &format!("/vms/{id}/actions"), Some(r#"{"action_type": "InstanceStart"}"#));
    assert_eq!(r.status, 204, "start {id}: {}", r.text());
}

fn u(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("no {field} in {v}"))
}

fn merged(d: &Daemon, id: &str) -> u64 {
    u(&d.get(&format!("/vms/{id}/memory")), "merged_pages")
}

fn vm_count(d: &Daemon, name: &str) -> u64 {
    u(&d.get(&format!("/domains/{name}")), "vm_count")
}

#[test]
fn vms_join_only_declared_domains_and_share_only_inside_them() {
    let name = "vms_join_only_declared_domains_and_share_only_inside_them";
    if !kvm_available(name) {
        return;
    }
    let d = Daemon::start(&[]);

    // An undeclared domain is refused before anything is built.
    let r = d.req("PUT", "/vms/x", Some(&vm(1, Some("team-a"))));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.fault().contains("not declared") && r.fault().contains("PUT /domains/team-a"), "{}", r.fault());
    assert_eq!(d.get("/vms")["vms"], json!([]));

    // Declare; the same policy again is a no-op, another one a conflict.
    assert_eq!(d.req("PUT", "/domains/team-a", Some("{}")).status, 204);
    let r = d.req("PUT", "/domains/team-a", Some(r#"{"merge_across_vms": true, "max_vms": 65536}"#));
    assert_eq!(r.status, 204, "{}", r.text());
    let r = d.req("PUT", "/domains/team-a", Some(r#"{"max_vms": 3}"#));
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.fault().contains("team-a") && r.fault().contains("exists with policy"), "{}", r.fault());
    // A domain whose members do not share with each other, for at most 2 VMs.
    let solo = r#"{"merge_across_vms": false, "max_vms": 2}"#;
    assert_eq!(d.req("PUT", "/domains/solo", Some(solo)).status, 204);

    // a, b: team-a; s1, s2: solo; c: no domain (its own). All hold the same shared pages.
    for (id, seed, domain) in
        [("a", 11, Some("team-a")), ("b", 12, Some("team-a")), ("s1", 13, Some("solo")), ("s2", 14, Some("solo"))]
    {
        create_and_start(&d, id, seed, domain);
    }
    create_and_start(&d, "c", 15, None);
    // solo is full.
    let r = d.req("PUT", "/vms/s3", Some(&vm(16, Some("solo"))));
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.fault().contains("full"), "{}", r.fault());
    let list = d.get("/domains");
    let counts: Vec<(Value, Value)> = list["domains"]
        .as_array()
        .expect("domains")
        .iter()
        .map(|d| (d["domain_name"].clone(), d["vm_count"].clone()))
        .collect();
    assert_eq!(counts, [(json!("solo"), json!(2)), (json!("team-a"), json!(2))], "{list}");

    // Merge at full speed: a and b share their common pages; nobody else shares.
    let patch = json!({"run": true, "pages_to_scan": 4096, "sleep_ms": 5, "change_detection": "checksum"});
    let r = d.req("PATCH", "/memory/merge", Some(&patch.to_string()));
    assert_eq!(r.status, 200, "{}", r.text());
    let shared_pages = FILL_MIB * 256 / 2;
    wait_for("a and b to merge their common pages", WAIT, || {
        (merged(&d, "a") >= shared_pages * 9 / 10 && merged(&d, "b") >= shared_pages * 9 / 10).then_some(())
    });
    // Two more full scans: the others had every chance to merge.
    let scans = u(&d.get("/memory"), "full_scans");
    wait_for("two more full scans", WAIT, || (u(&d.get("/memory"), "full_scans") >= scans + 2).then_some(()));
    for id in ["s1", "s2", "c"] {
        let m = merged(&d, id);
        assert!(m < shared_pages / 10, "{id} merged {m} pages: it shares with no other VM");
    }

    // A domain with members cannot be deleted; it can once they are gone.
    let r = d.req("DELETE", "/domains/team-a", None);
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.fault().contains("a, b"), "{}", r.fault());
    assert_eq!(d.req("DELETE", "/vms/a", None).status, 204);
    assert_eq!(vm_count(&d, "team-a"), 1);
    let r = d.req("DELETE", "/domains/team-a", None);
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(d.req("DELETE", "/vms/b", None).status, 204);
    assert_eq!(d.req("DELETE", "/domains/team-a", None).status, 204);
    assert_eq!(d.req("GET", "/domains/team-a", None).status, 404);
    assert_eq!(d.req("DELETE", "/domains/team-a", None).status, 404);
    // Gone: naming it is a 400 again; declared anew, it takes VMs (and another policy).
    assert_eq!(d.req("PUT", "/vms/a2", Some(&vm(17, Some("team-a")))).status, 400);
    assert_eq!(d.req("PUT", "/domains/team-a", Some(r#"{"max_vms": 1}"#)).status, 204);
    create_and_start(&d, "a2", 17, Some("team-a"));
    assert_eq!(vm_count(&d, "team-a"), 1);
    assert_eq!(d.get("/vms/a2")["config"]["merge"], json!({"enabled": true, "domain": "team-a"}));
    // A failed creation leaves no member behind: solo still counts 2 after s3's 409.
    assert_eq!(vm_count(&d, "solo"), 2);
    for id in ["s1", "s2", "c", "a2"] {
        let w = &d.get(&format!("/vms/{id}"))["workload"];
        assert_eq!(w["mismatches"], 0, "{id}: {w}");
    }
}
