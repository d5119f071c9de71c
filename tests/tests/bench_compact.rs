//! `densevm bench compact --quick` through the real binary: the JSON has one
//! repetition with densevm's full-rate pass, its proactive compaction and the
//! kernel baseline (its machine-wide and its own region's pages/s, or why it
//! was skipped), the guests verified every page (0 mismatches), the pass
//! migrated pages and returned a sane share of the freeable 2 MiB frames. No
//! timing is asserted (the benchmark reports it).

use e2e::{densevm, kvm_available};
use serde_json::Value;

fn fraction_ok(v: &Value) -> bool {
    v.as_f64().is_some_and(|f| (0.0..=1.0).contains(&f))
}

#[test]
fn bench_compact_quick_reports_densevm_and_the_kernel() {
    if !kvm_available("bench_compact_quick_reports_densevm_and_the_kernel") {
        return;
    }
    let json = std::env::temp_dir().join(format!("densevm-bench-compact-{}.json", std::process::id()));
    let out = densevm(&["bench", "compact", "--quick", "--json", json.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench compact failed: {stdout}\n{stderr}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).unwrap();
    assert_eq!(v["benchmark"], "compact");
    assert_eq!(v["repeat"], 1);
    assert_eq!(v["mismatches"], 0, "{v}");
    assert!(v["scatter_method"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    let reps = v["repetitions"].as_array().unwrap();
    assert_eq!(reps.len(), 1);
    let rep = &reps[0];

    let pass = &rep["densevm"]["pass"];
    assert_eq!(pass["mismatches"], 0, "the guests verified every page: {pass}");
    assert_eq!(pass["verified_after"], true, "a full verify pass after compaction: {pass}");
    let report = &pass["report"];
    assert!(report["pages_migrated"].as_u64().unwrap() > 0, "the pass migrated nothing: {report}");
    let (before, after, ideal) = (
        report["frames_2m_in_use_before"].as_u64().unwrap(),
        report["frames_2m_in_use_after"].as_u64().unwrap(),
        report["ideal_frames_2m"].as_u64().unwrap(),
    );
    assert!(before > ideal, "the scatter left nothing to compact: {report}");
    assert!(ideal <= after && after <= before, "{report}");
    assert!(fraction_ok(&pass["fraction_returned"]), "{pass}");
    assert!(pass["pages_per_s"].as_f64().is_some_and(|r| r > 0.0), "{pass}");
    assert!(pass["guest_verify_rate_idle"].as_f64().is_some_and(|r| r > 0.0), "{pass}");
    assert!(pass["guest_pace"].as_f64().is_some(), "{pass}");
    assert!(pass["host_bytes_before"].as_u64().unwrap() > 0 && pass["rss_before"].as_u64().unwrap() > 0, "{pass}");

    let pro = &rep["densevm"]["proactive"];
    assert_eq!(pro["mismatches"], 0, "{pro}");
    assert_eq!(pro["verified_after"], true, "{pro}");
    assert!(pro["pages_migrated"].as_u64().unwrap() > 0, "proactive compaction migrated nothing: {pro}");
    assert!(fraction_ok(&pro["fraction_returned"]), "{pro}");

    let kernel = &rep["kernel"];
    if kernel["available"] == true {
        let k = &kernel["result"];
        assert_eq!(k["region_mismatches"], 0, "{k}");
        assert!(k["compact_s"].as_f64().is_some_and(|s| s > 0.0), "{k}");
        assert!(k["pages_freed"].as_u64().unwrap() > 0, "{k}");
        // Both kernel figures: machine-wide and its own region's (when frame numbers are readable).
        assert!(k["pages_per_s"].as_f64().is_some(), "{k}");
        if let Some(moved) = k["region_pages_moved"].as_u64() {
            let rate = k["region_pages_per_s"].as_f64().unwrap();
            assert!(rate >= 0.0 && (moved == 0) == (rate == 0.0), "{k}");
        }
    } else {
        let why = kernel["skipped_reason"].as_str().unwrap();
        assert!(!why.is_empty());
        eprintln!("bench_compact: kernel baseline skipped: {why}");
    }

    let targets = &v["summary"]["targets"];
    for key in ["packs", "throughput", "throughput_region", "pass_pace", "proactive_pace"] {
        let met = &targets[key]["met"];
        assert!(met.is_boolean() || met.is_null(), "{key}: {targets}");
    }
    assert!(v["summary"]["spreads"]["densevm_pages_per_s"]["median"].as_f64().is_some(), "{}", v["summary"]);
    assert!(stdout.contains("targets (at the median, same run)"), "{stdout}");
    assert!(stdout.contains("ratio densevm / kernel (own region)"), "{stdout}");
}

#[test]
fn bench_compact_rejects_a_bad_repeat() {
    let bad = densevm(&["bench", "compact", "--repeat", "0"]);
    assert_eq!(bad.status.code(), Some(2), "--repeat 0 is a usage error");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--repeat"));
}
