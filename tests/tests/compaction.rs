//! End-to-end compaction through the daemon's API: workload guests whose live
//! frames are scattered, one `Compact` pass while they keep writing and
//! verifying, and what it gives back.
//!
//! How the frames scatter: every VM's RAM is allocated frame by frame when it is
//! created, so its frames start packed. Two VMs of one merge domain share most
//! of their content (a random 80 % of their data pages, by the workload's
//! per-page hash); merging them frees one frame of every common page, so the
//! 2 MiB frames in use become partly holes, scattered. The guests keep
//! verifying every page: a merged page reads its content through the shared
//! frame, and a page of the write set is rewritten through copy-on-write.
//! Case 1 then deletes one of the two VMs (VM churn): the survivor's pages are
//! left spread over both VMs' ranges, no frame shared any more. Case 2 keeps
//! both: the shared frames are among the scattered ones and move with both
//! mappers.
//!
//! Not chosen, after trying: discarding (balloon) pages under a running
//! workload guest breaks its verification for the rewritten ones (a discarded
//! page reads zero, the guest expects its own content), and both a discard and
//! a zero page merged into the zero page keep the page's frame allocated
//! (only its host memory is punched), so neither frees frames for compaction.
//!
//! What is asserted: 0 mismatches in every guest after it verified all its
//! pages again after the pass; the 2 MiB frames in use fall to at most the
//! ideal + 2; the pass returned 2 MiB frames; shared (merged) frames stay
//! shared (case 2); the pool's host memory (`host_bytes_used`) does not grow by
//! more than noise, nor the daemon's RSS by more than noise and one alias page
//! per migrated frame. Neither falls by 2 MiB per returned frame: the pool
//! punches every freed 4 KiB frame at once (no shmem THP), so the holes a pass
//! empties held no host memory any more, and each migration moves one backed
//! 4 KiB frame into one hole (measured here: `host_bytes_used` unchanged to the
//! byte, RSS about +1 MiB from the alias mapping the copies go through; the
//! test prints the numbers).

mod common;

use std::time::{Duration, Instant};

use common::{kvm_available, wait_for, Daemon, ResponseExt};
use serde_json::{json, Value};

/// Data the workload fills per VM (MiB), and the guest RAM that holds it.
const FILL_MIB: u64 = 32;
const MEM_MIB: u64 = FILL_MIB + 6;
/// Share of the guests' data pages with common content (merged: one frame of
/// each freed, scattered).
const SHARED_FRACTION: f64 = 0.8;
const WAIT: Duration = Duration::from_secs(90);
/// Growth of host memory or RSS over the pass that is still noise (the guests
/// keep running; the API and the pass allocate a little).
const NOISE_BYTES: u64 = 4 << 20;

/// Share of the data pages each guest rewrites, at `WRITES_PER_S`.
const WRITE_FRACTION: f64 = 0.05;

fn workload_vm(seed: u64) -> String {
    json!({
        "vcpu_count": 1,
        "mem_size_mib": MEM_MIB,
        "boot": {"workload": {
            "fill_mib": FILL_MIB, "zero_fraction": 0.0, "shared_fraction": SHARED_FRACTION,
            "shared_seed": 7, "seed": seed, "write_fraction": WRITE_FRACTION, "writes_per_s": 2000, "duration_s": 0
        }},
        "merge": {"enabled": true, "domain": "team"}
    })
    .to_string()
}

fn u(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("no {field} in {v}"))
}

fn report(d: &Daemon, id: &str) -> Value {
    d.get(&format!("/vms/{id}"))["workload"].clone()
}

/// The daemon's resident set (`Rss` of /proc/PID/smaps_rollup), in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).expect("smaps_rollup");
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix("Rss:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no Rss in smaps_rollup:\n{text}"));
    kib * 1024
}

/// Asks for `patch` and checks the answer is 200.
fn patch(d: &Daemon, path: &str, body: Value) -> Value {
    let r = d.req("PATCH", path, Some(&body.to_string()));
    assert_eq!(r.status, 200, "PATCH {path} {body}: {}", r.text());
    r.json()
}

/// Sends `Compact` from two clients at once: one pass runs and answers 200 with
/// its report; the other is 200 too (it came after) or 409 (it overlapped).
fn compact_twice_at_once(d: &Daemon) -> Value {
    let body = r#"{"action_type": "Compact"}"#;
    let sock = d.sock.clone();
    let other = std::thread::spawn(move || common::request(&sock, "PUT", "/memory/compaction/actions", Some(body)));
    let r = d.req("PUT", "/memory/compaction/actions", Some(body));
    let r2 = other.join().expect("second client");
    let mut reports = Vec::new();
    for r in [r, r2] {
        match r.status {
            200 => reports.push(r.json()),
            409 => assert!(r.fault().contains("already running"), "{}", r.fault()),
            s => panic!("Compact answered {s}: {}", r.text()),
        }
    }
    assert!(!reports.is_empty(), "neither Compact ran");
    // The pass that did the work is the one that migrated the most.
    reports.into_iter().max_by_key(|r| u(r, "pages_migrated")).expect("a report")
}

/// Creates and starts two VMs of one merge domain, scatters their frames by
/// merging their common pages, deletes the first VM if `delete_one`, runs one
/// pass while the guests left keep writing, and checks the result.
fn scatter_and_compact(name: &str, delete_one: bool) {
    if !kvm_available(name) {
        return;
    }
    let d = Daemon::start(&[]);
    d.declare_domain("team");
    // No background pass: the one the test asks for must find the scatter.
    let c = patch(&d, "/memory/compaction", json!({"enabled": false}));
    assert_eq!(c["enabled"], false, "{c}");
    let all = [("a", 31), ("b", 32)];
    for (id, seed) in all {
        let r = d.req("PUT", &format!("/vms/{id}"), Some(&workload_vm(seed)));
        assert_eq!(r.status, 204, "{name}: create {id}: {}", r.text());
    }
    for (id, _) in all {
        let r = d.req("PUT", &format!("/vms/{id}/actions"), Some(r#"{"action_type": "InstanceStart"}"#));
        assert_eq!(r.status, 204, "{name}: start {id}: {}", r.text());
    }
    for (id, _) in all {
        wait_for(&format!("{name}: {id} to rewrite pages"), WAIT, || {
            let r = report(&d, id);
            assert_eq!(r["mismatches"], 0, "{name}: {id}: {r}");
            (r["phase"] == "Writing" && r["pages_written"].as_u64() > Some(0)).then_some(())
        });
    }
    let data_pages = FILL_MIB * 256;
    let packed = d.get("/memory");

    // Scatter: merge the common pages until the counts settle.
    patch(
        &d,
        "/memory/merge",
        json!({"run": true, "pages_to_scan": 8192, "sleep_ms": 5, "change_detection": "checksum"}),
    );
    // Common pages outside both VMs' write sets (about 0.9 of them).
    let shared_expected = (data_pages as f64 * SHARED_FRACTION * 0.7) as u64;
    let mut last = 0;
    let mut stable = 0;
    wait_for(&format!("{name}: merging of the common pages to settle"), WAIT, || {
        let now = u(&d.get("/memory"), "pages_sharing");
        stable = if now == last { stable + 1 } else { 0 };
        last = now;
        std::thread::sleep(Duration::from_millis(200));
        (now >= shared_expected && stable >= 5).then_some(())
    });
    let m = patch(&d, "/memory/merge", json!({"run": false}));
    assert_eq!(m["run"], false);
    // Let the guests rewrite every page of their write sets (2000 writes/s over
    // a twentieth of the pages) so that copy-on-write settles before the pass.
    std::thread::sleep(Duration::from_secs(2));
    let vms: &[&str] = if delete_one {
        let r = d.req("DELETE", "/vms/a", None);
        assert_eq!(r.status, 204, "{name}: delete a: {}", r.text());
        assert_eq!(u(&d.get("/memory"), "pages_shared"), 0, "{name}: VM a's frames still shared");
        &["b"]
    } else {
        &["a", "b"]
    };

    let before = d.get("/memory");
    let rss_before = rss_bytes(d.pid());
    let cb = &before["compaction"];
    eprintln!(
        "{name}: packed {} 2 MiB frames in use, {} host bytes; scattered: {} in use, ideal {}, fragmentation {:.2}, \
         {} host bytes, RSS {rss_before}",
        u(&packed, "frames_2m_in_use"),
        u(&packed, "host_bytes_used"),
        u(&before, "frames_2m_in_use"),
        u(cb, "ideal_frames_2m"),
        cb["fragmentation"].as_f64().unwrap_or(-1.0),
        u(&before, "host_bytes_used"),
    );
    assert!(
        u(&before, "frames_2m_in_use") > u(cb, "ideal_frames_2m") + 2,
        "{name}: merging did not scatter the frames: {before}"
    );
    assert!(cb["fragmentation"].as_f64() > Some(0.2), "{name}: {before}");
    let written: Vec<u64> = vms.iter().map(|id| u(&report(&d, id), "pages_written")).collect();

    // One pass while the guests keep writing and verifying.
    let t0 = Instant::now();
    let rep = compact_twice_at_once(&d);
    let took = t0.elapsed();
    let after = d.get("/memory");
    let rss_after = rss_bytes(d.pid());
    let ca = &after["compaction"];
    eprintln!(
        "{name}: pass in {took:?}: {rep}; after: {} in use, ideal {}, fragmentation {:.2}, {} host bytes, RSS {rss_after}",
        u(&after, "frames_2m_in_use"),
        u(ca, "ideal_frames_2m"),
        ca["fragmentation"].as_f64().unwrap_or(-1.0),
        u(&after, "host_bytes_used"),
    );
    assert!(u(&rep, "pages_migrated") > 0, "{name}: {rep}");
    let returned = u(&rep, "frames_2m_returned");
    assert!(returned > 0, "{name}: {rep}");
    assert_eq!(rep["failures"]["remap_failed"], 0, "{name}: {rep}");
    assert_eq!(rep["failures"]["vma_budget"], 0, "{name}: {rep}");
    assert!(u(&rep, "frames_2m_in_use_after") <= u(&rep, "ideal_frames_2m") + 2, "{name}: {rep}");
    assert!(u(&after, "frames_2m_in_use") <= u(ca, "ideal_frames_2m") + 2, "{name}: {after}");
    assert!(u(&after, "frames_2m_in_use") < u(&before, "frames_2m_in_use"), "{name}: {before} -> {after}");
    assert!(u(&after, "frames_2m_returned") >= u(&before, "frames_2m_returned") + returned, "{name}: {after}");
    assert!(u(ca, "passes") >= 1 && u(ca, "pages_migrated") >= u(&rep, "pages_migrated"), "{name}: {after}");
    assert_eq!(u(ca, "proactive_passes"), 0, "{name}: {after}");
    // Compaction costs no host memory: what a pass moves was backed before.
    let (hb, ha) = (u(&before, "host_bytes_used"), u(&after, "host_bytes_used"));
    assert!(ha <= hb + NOISE_BYTES, "{name}: host_bytes_used grew from {hb} to {ha}");
    // The pass copies through densevm's alias mapping of the pool, which maps each
    // target frame once more: at most one page of RSS per migrated frame.
    let rss_slack = NOISE_BYTES + u(&rep, "pages_migrated") * 4096;
    assert!(rss_after <= rss_before + rss_slack, "{name}: RSS grew from {rss_before} to {rss_after}");
    // Shared frames moved with every mapper: still shared.
    if !delete_one {
        assert!(u(&after, "pages_shared") > 0, "{name}: {after}");
        assert_eq!(u(&after, "pages_shared"), u(&before, "pages_shared"), "{name}: {before} -> {after}");
        assert_eq!(u(&after, "pages_sharing"), u(&before, "pages_sharing"), "{name}: {before} -> {after}");
    }

    // The guests kept writing and, after verifying every page again, saw no
    // mismatch.
    for (id, w) in vms.iter().zip(written) {
        let verifies = u(&report(&d, id), "full_verifies");
        let r = wait_for(&format!("{name}: {id} to write and verify all its pages again"), WAIT, || {
            let r = report(&d, id);
            (u(&r, "pages_written") > w && u(&r, "full_verifies") >= verifies + 2).then_some(r)
        });
        assert_eq!(r["mismatches"], 0, "{name}: {id}: {r}");
        assert_eq!(d.get(&format!("/vms/{id}"))["state"], "Running", "{name}: {id}");
    }
    let metrics = d.req("GET", "/metrics", None);
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    assert!(text.lines().any(|l| l == format!("densevm_memory_compaction_passes_total {}", u(ca, "passes"))), "{text}");
    assert!(text.contains("densevm_memory_compaction_migration_failures_total{reason=\"remap_failed\"} 0"), "{text}");
}

/// Case 1: two VMs merged, then one deleted: the survivor's live frames are
/// scattered over both ranges (none shared); a pass packs them while it keeps
/// writing and verifying.
#[test]
fn scattered_frames_are_compacted_while_the_guest_verifies() {
    scatter_and_compact("scattered_frames_are_compacted_while_the_guest_verifies", true);
}

/// Case 2: two VMs of one merge domain with common content: the shared frames
/// (one frame mapped by both VMs) among the scattered ones move with both their
/// mappers and stay shared.
#[test]
fn merged_frames_among_the_scattered_ones_stay_shared() {
    scatter_and_compact("merged_frames_among_the_scattered_ones_stay_shared", false);
}

/// The real daemon checks compaction requests: ranges, unknown fields and
/// methods; a pass over an empty pool moves nothing.
#[test]
fn compaction_requests_are_checked() {
    let name = "compaction_requests_are_checked";
    if !kvm_available(name) {
        return;
    }
    let d = Daemon::start(&[]);
    let defaults = json!({"enabled": true, "proactiveness": 20, "max_pages_per_s": memory::compact::tunables::DEFAULT_MAX_PAGES_PER_S});
    assert_eq!(d.get("/memory/compaction"), defaults);
    for (method, path, body, status, needle) in [
        ("PATCH", "/memory/compaction", r#"{"proactiveness": 101}"#, 400, "proactiveness: must be in 0..=100"),
        ("PATCH", "/memory/compaction", r#"{"max_pages_per_s": 0}"#, 400, "max_pages_per_s: must be in 1..=100000000"),
        ("PATCH", "/memory/compaction", r#"{"enabled": true, "eager": 1}"#, 400, "unknown field `eager`"),
        ("PUT", "/memory/compaction/actions", r#"{"action_type": "Defrag"}"#, 400, "unknown variant"),
        ("GET", "/memory/compaction/actions", "", 405, "allowed: PUT"),
        ("PUT", "/memory/compaction", "{}", 405, "PATCH"),
    ] {
        let r = d.req(method, path, (!body.is_empty()).then_some(body));
        assert_eq!(r.status, status, "{name}: {method} {path} {body}: {}", r.text());
        assert!(r.fault().contains(needle), "{name}: {method} {path}: {:?} lacks {needle:?}", r.fault());
    }
    // Nothing changed.
    assert_eq!(d.get("/memory/compaction"), defaults);
    let r = d.req("PUT", "/memory/compaction/actions", Some(r#"{"action_type": "Compact"}"#));
    assert_eq!(r.status, 200, "{name}: {}", r.text());
    let rep = r.json();
    assert_eq!((u(&rep, "pages_migrated"), u(&rep, "frames_2m_returned")), (0, 0), "{name}: {rep}");
    assert!(u(&d.get("/memory")["compaction"], "passes") >= 1);
}
