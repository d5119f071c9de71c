//! End-to-end tests of `densevm serve`: the real daemon, driven over HTTP on its Unix
//! socket by the shared API client (see `common`).

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{connect, densevm_binary, kvm_available, read_response, request_bytes, wait_for, Daemon, ResponseExt};
use serde_json::{json, Value};

/// Guest RAM of the test VMs (MiB) and what the workload fills of it.
const MEM_MIB: u64 = 16;
const FILL_MIB: u64 = 8;
const WAIT: Duration = Duration::from_secs(30);

/// A workload VM: half its pages identical across VMs of the same `shared_seed`, a tenth
/// zero, a tenth rewritten continuously; merging on, all in merge domain `d1`.
fn workload_vm(seed: u64) -> String {
    json!({
        "vcpu_count": 1,
        "mem_size_mib": MEM_MIB,
        "boot": {"workload": {
            "fill_mib": FILL_MIB, "zero_fraction": 0.1, "shared_fraction": 0.5, "shared_seed": 7,
            "seed": seed, "write_fraction": 0.1, "writes_per_s": 2000, "duration_s": 0
        }},
        "merge": {"enabled": true, "domain": "d1"}
    })
    .to_string()
}

fn action(d: &Daemon, id: &str, action: &str) -> common::Response {
    d.req("PUT", &format!("/vms/{id}/actions"), Some(&json!({ "action_type": action }).to_string()))
}

fn expect_status(r: &common::Response, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
}

fn create_and_start(d: &Daemon, ids: &[&str]) {
    d.declare_domain("d1");
    for (i, id) in ids.iter().enumerate() {
        let r = d.req("PUT", &format!("/vms/{id}"), Some(&workload_vm(100 + i as u64)));
        expect_status(&r, 204, &format!("create {id}"));
    }
    for id in ids {
        expect_status(&action(d, id, "InstanceStart"), 204, &format!("start {id}"));
    }
}

fn report(d: &Daemon, id: &str) -> Value {
    d.get(&format!("/vms/{id}"))["workload"].clone()
}

fn pages_written(d: &Daemon, id: &str) -> u64 {
    report(d, id)["pages_written"].as_u64().expect("pages_written")
}

/// Waits until `id` is in its write loop and has rewritten at least one page.
fn wait_writing(d: &Daemon, id: &str) {
    wait_for(&format!("{id} to rewrite pages"), WAIT, || {
        let r = report(d, id);
        assert_eq!(r["mismatches"], 0, "{id}: {r}");
        (r["phase"] == "Writing" && r["pages_written"].as_u64() > Some(0)).then_some(())
    });
}

/// A bearer-token file (mode 0600) in a fresh scratch directory.
fn token_file(token: &str) -> std::path::PathBuf {
    let path = common::scratch_dir("token").join("api.token");
    std::fs::write(&path, format!("{token}\n")).expect("write token");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod token");
    path
}

fn u(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("no {field} in {v}"))
}

#[test]
fn three_vms_memory_stats_merging_and_lifecycle() {
    if !kvm_available("three_vms_memory_stats_merging_and_lifecycle") {
        return;
    }
    let d = Daemon::start(&[]);
    d.declare_domain("d1");
    let ids = ["vm-a", "vm-b", "vm-c"];
    for (i, id) in ids.iter().enumerate() {
        let r = d.req("PUT", &format!("/vms/{id}"), Some(&workload_vm(100 + i as u64)));
        expect_status(&r, 204, "create");
    }
    let list = d.get("/vms");
    let vms = list["vms"].as_array().expect("vms");
    assert_eq!(vms.len(), 3, "{list}");
    assert!(vms.iter().all(|v| v["state"] == "Created"), "{list}");
    assert_eq!(vms[0]["config"]["merge"], json!({"enabled": true, "domain": "d1"}));
    assert_eq!(vms[0]["config"]["boot"]["workload"]["fill_mib"], FILL_MIB);
    let r = d.req("PUT", "/vms/vm-a", Some(&workload_vm(1)));
    expect_status(&r, 409, "create twice");
    assert!(r.fault().contains("exists"), "{}", r.fault());

    for id in ids {
        expect_status(&action(&d, id, "InstanceStart"), 204, "start");
    }
    let r = action(&d, "vm-a", "InstanceStart");
    expect_status(&r, 409, "start twice");
    for id in ids {
        wait_writing(&d, id);
        assert_eq!(d.get(&format!("/vms/{id}"))["state"], "Running");
    }

    // Memory statistics.
    let data_pages = FILL_MIB * 256;
    for id in ids {
        let m = d.get(&format!("/vms/{id}/memory"));
        assert_eq!(u(&m, "guest_pages"), MEM_MIB * 256, "{m}");
        let resident = u(&m, "resident_pages");
        // Every filled non-zero page is backed; nothing beyond guest RAM is.
        assert!(resident >= data_pages * 8 / 10 && resident <= MEM_MIB * 256, "{m}");
        assert_eq!(u(&report(&d, id), "data_pages"), data_pages);
    }
    let host = d.get("/memory");
    assert!(u(&host, "host_bytes_used") >= 3 * FILL_MIB * (1 << 20) * 8 / 10, "{host}");
    assert!(u(&host, "frames_2m_total") >= u(&host, "frames_2m_in_use"), "{host}");
    assert!(u(&host, "frames_2m_in_use") >= 3 * FILL_MIB / 2, "{host}");
    assert!(u(&host, "vma_count") >= 3, "{host}");
    assert!(host["fragmentation"].as_f64().is_some_and(|f| (0.0..=1.0).contains(&f)), "{host}");

    // Tune merging, read it back, watch it merge the pages the VMs have in common.
    assert_eq!(d.get("/memory/merge")["run"], false);
    let before = u(&d.get("/memory"), "host_bytes_used");
    let patch = json!({"run": true, "pages_to_scan": 4096, "sleep_ms": 5, "merge_zero_pages": true,
                       "change_detection": "checksum"});
    let r = d.req("PATCH", "/memory/merge", Some(&patch.to_string()));
    expect_status(&r, 200, "patch merge");
    let expect = json!({"run": true, "pages_to_scan": 4096, "sleep_ms": 5, "max_page_sharing": 256,
                        "merge_zero_pages": true, "change_detection": "checksum", "hold_vcpus": true});
    assert_eq!(r.json(), expect);
    assert_eq!(d.get("/memory/merge"), expect);
    let merged = wait_for("merging to share the common pages", WAIT, || {
        let h = d.get("/memory");
        // 2 of the 3 copies of each common page are saved.
        (u(&h, "pages_sharing") >= data_pages / 2 && u(&h, "full_scans") >= 1).then_some(h)
    });
    assert!(u(&merged, "pages_shared") > 0 && u(&merged, "pages_scanned") > 0, "{merged}");
    assert!(merged["general_profit"].as_i64() > Some(0), "{merged}");
    for id in ids {
        let m = d.get(&format!("/vms/{id}/memory"));
        assert!(u(&m, "merged_pages") > 0, "{id}: {m}");
    }
    let after = u(&d.get("/memory"), "host_bytes_used");
    assert!(after < before, "merging freed no host memory: {before} -> {after}");
    // The guests keep writing (copy-on-write where they hit merged pages).
    let w0 = pages_written(&d, "vm-a");
    wait_for("vm-a to keep writing", WAIT, || (pages_written(&d, "vm-a") > w0).then_some(()));
    let per_vm: Vec<Value> = ids.iter().map(|id| d.get(&format!("/vms/{id}/memory"))).collect();
    let h = d.get("/memory");
    for c in ["cow_copies", "cow_reuses"] {
        let sum: u64 = per_vm.iter().map(|m| u(m, c)).sum();
        assert!(u(&h, c) >= sum, "host {c} below the sum over VMs: {h} {per_vm:?}");
    }

    // Unmerge everything: no page shared any more, and the merger stopped.
    let r = d.req("PUT", "/memory/merge/actions", Some(r#"{"action_type": "UnmergeAll"}"#));
    expect_status(&r, 204, "UnmergeAll");
    let h = d.get("/memory");
    assert_eq!((u(&h, "pages_shared"), u(&h, "pages_sharing")), (0, 0), "{h}");
    assert_eq!(d.get("/memory/merge")["run"], false);
    for id in ids {
        assert_eq!(u(&d.get(&format!("/vms/{id}/memory")), "merged_pages"), 0);
    }

    // Pause / resume / stop / delete, with 409 for actions the state does not allow.
    expect_status(&action(&d, "vm-b", "Resume"), 409, "resume a running VM");
    expect_status(&action(&d, "vm-b", "Pause"), 204, "pause");
    assert_eq!(d.get("/vms/vm-b")["state"], "Paused");
    expect_status(&action(&d, "vm-b", "Pause"), 409, "pause twice");
    let frozen = pages_written(&d, "vm-b");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(pages_written(&d, "vm-b"), frozen, "a paused VM kept writing");
    expect_status(&action(&d, "vm-b", "Resume"), 204, "resume");
    wait_for("vm-b to write again", WAIT, || (pages_written(&d, "vm-b") > frozen).then_some(()));
    expect_status(&action(&d, "vm-b", "Stop"), 204, "stop");
    assert_eq!(d.get("/vms/vm-b")["state"], "Stopped");
    for a in ["Stop", "Pause", "Resume", "InstanceStart"] {
        let r = action(&d, "vm-b", a);
        expect_status(&r, 409, &format!("{a} on a stopped VM"));
        assert!(!r.fault().is_empty());
    }
    expect_status(&d.req("DELETE", "/vms/vm-b", None), 204, "delete");
    for (m, p, b) in [
        ("GET", "/vms/vm-b", None),
        ("GET", "/vms/vm-b/memory", None),
        ("DELETE", "/vms/vm-b", None),
        ("PUT", "/vms/vm-b/actions", Some(r#"{"action_type": "Pause"}"#)),
        ("GET", "/vms/nope", None),
    ] {
        let r = d.req(m, p, b);
        expect_status(&r, 404, &format!("{m} {p}"));
        assert!(r.fault().contains("vm-b") || r.fault().contains("nope"), "{}", r.fault());
    }
    assert_eq!(d.get("/vms")["vms"].as_array().map(Vec::len), Some(2));
    // A running VM can be deleted directly.
    expect_status(&d.req("DELETE", "/vms/vm-c", None), 204, "delete running");
    // The remaining VM never saw a corrupted page.
    let r = report(&d, "vm-a");
    assert_eq!(r["mismatches"], 0, "{r}");

    // Host facts.
    let info = d.get("/");
    assert_eq!(info["kvm"], true, "{info}");
    assert!(info["version"].as_str().is_some_and(|v| !v.is_empty()), "{info}");
    assert!(info["ring0_reason"].as_str().is_some_and(|v| !v.is_empty()), "{info}");
    let features = info["userfaultfd_features"].as_array().expect("userfaultfd_features");
    assert!(features.iter().any(|f| f == "WP_HUGETLBFS_SHMEM"), "{info}");
}

#[test]
fn bad_requests_are_answered_with_fault_messages() {
    if !kvm_available("bad_requests_are_answered_with_fault_messages") {
        return;
    }
    let d = Daemon::start(&[]);
    d.declare_domain("d1");
    let good = workload_vm(1);
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        ("PUT", "/vms/x", "{not json".into(), 400, ""),
        ("PUT", "/vms/x", good.replace("\"vcpu_count\"", "\"vcpus\""), 400, "vcpus"),
        ("PUT", "/vms/x", good.replace("\"vcpu_count\":1", "\"vcpu_count\":\"one\""), 400, "vcpu_count"),
        ("PUT", "/vms/x", good.replace("\"vcpu_count\":1", "\"vcpu_count\":0"), 400, "vcpu_count"),
        ("PUT", "/vms/x", good.replace("\"mem_size_mib\":16", "\"mem_size_mib\":70000"), 400, "mem_size_mib"),
        ("PUT", "/vms/x", good.replace("\"fill_mib\":8", "\"fill_mib\":32"), 400, "fill_mib"),
        ("PUT", "/vms/x", good.replace("\"zero_fraction\":0.1", "\"zero_fraction\":1.5"), 400, "zero_fraction"),
        ("PUT", "/vms/x", good.replace("\"seed\":1", "\"seeds\":1"), 400, "seeds"),
        ("PUT", "/vms/a.b", good.clone(), 400, "vm_id"),
        (
            "PUT",
            "/vms/x",
            good.replace("\"merge\"", "\"memory_image_path\":\"/tmp/img\",\"merge\""),
            400,
            "memory_image_path is not supported yet",
        ),
        ("PUT", "/vms/x", good.replace("\"fill_mib\":8", "\"fill_mib\":15"), 400, "RAM"),
        ("PUT", "/vms/x/actions", r#"{"action_type": "Reboot"}"#.into(), 400, "action_type"),
        ("PATCH", "/memory/merge", r#"{"pages_to_scan": 0}"#.into(), 400, "pages_to_scan"),
        ("PATCH", "/memory/merge", r#"{"max_page_sharing": 1}"#.into(), 400, "max_page_sharing"),
        ("PATCH", "/memory/merge", r#"{"sleep_ms": 60001}"#.into(), 400, "sleep_ms"),
        ("PATCH", "/memory/merge", r#"{"turbo": true}"#.into(), 400, "turbo"),
        ("PUT", "/memory/merge/actions", r#"{"action_type": "MergeAll"}"#.into(), 400, "action_type"),
        ("GET", "/no/such/route", String::new(), 404, ""),
        ("POST", "/vms", String::new(), 405, ""),
        ("DELETE", "/memory", String::new(), 405, ""),
    ];
    for (method, path, body, status, needle) in &cases {
        let body = (!body.is_empty()).then_some(body.as_str());
        let r = d.req(method, path, body);
        let what = format!("{method} {path} {}", body.map(|b| &b[..b.len().min(120)]).unwrap_or(""));
        assert_eq!(r.status, *status, "{what}: {}", r.text());
        let fault = r.fault();
        assert!(!fault.is_empty(), "{what}: empty fault_message");
        assert!(fault.contains(needle), "{what}: {fault:?} does not mention {needle:?}");
    }
    // A body over the limit (64 KiB): 413 as soon as the declared length is seen.
    let mut s = connect(&d.sock).expect("connect");
    let head = "PUT /vms/big HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
                Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n";
    s.write_all(head.as_bytes()).expect("write head");
    let _ = s.write_all(&[b' '; 4096]);
    let r = read_response(&mut s).expect("413 response");
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.fault().contains("limit"), "{}", r.fault());
    // Nothing was created, and the merge settings did not change.
    assert_eq!(d.get("/vms")["vms"], json!([]));
    assert_eq!(d.get("/memory/merge")["pages_to_scan"], 100);
}

#[test]
fn many_clients_some_slow_while_vms_keep_running() {
    if !kvm_available("many_clients_some_slow_while_vms_keep_running") {
        return;
    }
    let d = Arc::new(Daemon::start(&[]));
    let ids = ["c0", "c1", "c2"];
    create_and_start(&d, &ids);
    for id in ids {
        wait_writing(&d, id);
    }
    let before: Vec<u64> = ids.iter().map(|id| pages_written(&d, id)).collect();
    let done = Arc::new(AtomicBool::new(false));

    // Slow clients: send their request a few bytes at a time, or connect and say nothing.
    let mut slow = Vec::new();
    for i in 0..4 {
        let (sock, done) = (d.sock.clone(), done.clone());
        slow.push(std::thread::spawn(move || {
            let mut s = connect(&sock).expect("connect");
            if i % 2 == 0 {
                let req = request_bytes("GET", "/memory", None);
                for chunk in req.chunks(4) {
                    s.write_all(chunk).expect("slow write");
                    std::thread::sleep(Duration::from_millis(40));
                }
                let r = read_response(&mut s).expect("slow response");
                assert_eq!(r.status, 200, "{}", r.text());
            } else {
                // Silent: hold the connection until the fast clients are done.
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }));
    }
    // Fast clients: many at once.
    let slowest = Arc::new(AtomicU64::new(0));
    let mut fast = Vec::new();
    for t in 0..24 {
        let (d, slowest) = (d.clone(), slowest.clone());
        fast.push(std::thread::spawn(move || {
            let paths = ["/memory", "/vms", "/vms/c0", "/vms/c1/memory", "/memory/merge", "/metrics"];
            for i in 0..15 {
                let path = paths[(t + i) % paths.len()];
                let t0 = Instant::now();
                let r = d.req("GET", path, None);
                slowest.fetch_max(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
                assert_eq!(r.status, 200, "GET {path}: {}", r.text());
            }
        }));
    }
    for t in fast {
        t.join().expect("fast client");
    }
    done.store(true, Ordering::Relaxed);
    for t in slow {
        t.join().expect("slow client");
    }
    let slowest = slowest.load(Ordering::Relaxed);
    assert!(slowest < 5_000, "a request took {slowest} ms");
    // The VMs made progress during all this, and the metrics cover them.
    for (id, b) in ids.iter().zip(before) {
        wait_for(&format!("{id} to progress"), WAIT, || (pages_written(&d, id) > b).then_some(()));
        assert_eq!(report(&d, id)["mismatches"], 0);
    }
    let metrics = d.req("GET", "/metrics", None);
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    assert!(text.contains("densevm_vms{state=\"Running\"} 3"), "{text}");
    assert!(text.contains("densevm_vm_guest_pages{vm_id=\"c0\"} 4096"), "{text}");
}

#[test]
fn sigterm_stops_vms_and_removes_the_socket() {
    if !kvm_available("sigterm_stops_vms_and_removes_the_socket") {
        return;
    }
    const TOKEN: &str = "e2e-token-0123456789abcdef";
    let token = token_file(TOKEN);
    let token = token.to_str().expect("token path");
    let mut d = Daemon::start(&["--api-tcp", "127.0.0.1:0", "--api-token-file", token]);
    let mode = std::fs::metadata(&d.sock).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");

    // A second daemon refuses the live socket and leaves it alone.
    let out = Command::new(densevm_binary()).arg("serve").arg("--api-sock").arg(&d.sock).output().expect("spawn");
    assert!(!out.status.success(), "a second daemon started on a live socket");
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(d.sock.exists());
    // Non-loopback TCP is refused.
    let sock2 = d.sock.with_file_name("other.sock");
    let out = Command::new(densevm_binary())
        .arg("serve")
        .arg("--api-sock")
        .arg(&sock2)
        .args(["--api-tcp", "0.0.0.0:0", "--api-token-file", token])
        .output()
        .expect("spawn");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!sock2.exists());

    // The loopback TCP endpoint serves the same API.
    let log = d.log_text();
    let addr = log
        .lines()
        .find_map(|l| l.split("http://").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no TCP address in the log:\n{log}"))
        .to_string();
    let addr = addr.parse().unwrap_or_else(|e| panic!("TCP address {addr:?}: {e}"));
    let mut tcp = api_client::Client::tcp(addr).expect("connect TCP").with_token(TOKEN);
    let r = tcp.request("GET", "/vms", None).expect("TCP response");
    assert_eq!((r.status, r.json()), (200, json!({"vms": []})));

    create_and_start(&d, &["t0", "t1"]);
    wait_writing(&d, "t0");
    let status = d.terminate(Duration::from_secs(20));
    let log = d.log_text();
    assert_eq!(status.code(), Some(0), "exit status {status}:\n{log}");
    assert!(!d.sock.exists(), "socket left behind");
    assert!(log.contains("termination signal"), "{log}");
}
