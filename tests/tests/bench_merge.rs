//! `densevm bench merge --quick` through the real binary: every memory policy is
//! present in the JSON, densevm and the kernel's KSM both merged pages, the
//! guests verified every page after merging (0 mismatches), and the KSM knobs
//! are as they were before. No timing is asserted (the benchmark reports it).

use e2e::{densevm, kvm_available};
use serde_json::Value;

const KSM: &str = "/sys/kernel/mm/ksm";
const KNOBS: [&str; 5] = ["run", "pages_to_scan", "sleep_millisecs", "advisor_mode", "smart_scan"];

fn ksm_knobs() -> Vec<Option<String>> {
    KNOBS.iter().map(|k| std::fs::read_to_string(format!("{KSM}/{k}")).ok()).collect()
}

#[test]
fn bench_merge_quick_reports_every_policy() {
    if !kvm_available("bench_merge_quick_reports_every_policy") {
        return;
    }
    let json = std::env::temp_dir().join(format!("densevm-bench-merge-{}.json", std::process::id()));
    let before = ksm_knobs();
    let out = densevm(&["bench", "merge", "--quick", "--json", json.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench merge failed: {stdout}\n{stderr}");
    assert_eq!(ksm_knobs(), before, "the KSM knobs were not restored");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).unwrap();
    assert_eq!(v["benchmark"], "merge");
    assert_eq!(v["mismatches"], 0);
    let target = v["target_pages_sharing"].as_u64().unwrap();
    assert!(target > 0, "{v}");

    let ksm = v["kernel_ksm"]["available"].as_bool().unwrap();
    let mut names = vec!["none", "densevm-full", "densevm-full-nohold", "densevm-default"];
    if ksm {
        names.extend(["ksm-full", "ksm-default"]);
        assert!(v["kernel_ksm"]["restore_error"].is_null(), "{}", v["kernel_ksm"]);
    } else {
        let why = v["kernel_ksm"]["skipped_reason"].as_str().unwrap();
        assert!(!why.is_empty());
        assert!(stdout.contains("kernel KSM rows skipped"), "{stdout}");
        eprintln!("bench_merge: kernel KSM rows skipped: {why}");
    }
    let policies = v["policies"].as_array().unwrap();
    assert_eq!(policies.iter().map(|p| p["name"].as_str().unwrap()).collect::<Vec<_>>(), names);
    for p in policies {
        let name = p["name"].as_str().unwrap();
        assert_eq!(p["mismatches"], 0, "the guests verified every page: {p}");
        assert_eq!(p["verified_after_merge"], true, "a full verify pass after merging: {p}");
        assert!(p["host_bytes"].as_u64().unwrap() > 0, "{p}");
        if name == "none" {
            assert_eq!(p["pages_sharing"], 0, "{p}");
            continue;
        }
        let sharing = p["pages_sharing"].as_u64().unwrap();
        assert!(sharing > 0 && p["converged"] == true, "{name} merged nothing: {p}");
        assert!(sharing >= target, "{name}: {sharing} < {target}");
        assert!(p["converge_s"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["steady_cpu_per_s"].as_f64().is_some(), "{p}");
        // Merging saved host memory.
        assert!(p["host_bytes"].as_u64().unwrap() < p["host_bytes_before"].as_u64().unwrap(), "{p}");
        // The guests' pace while merging was measured; densevm says how long it held them.
        assert!(p["guest_verify_rate_idle"].as_f64().is_some_and(|r| r > 0.0), "{p}");
        match name {
            "densevm-full" => assert!(p["vcpu_holds"].as_u64().unwrap() > 0, "{p}"),
            "densevm-full-nohold" => assert_eq!(p["vcpu_holds"], 0, "{p}"),
            _ => {}
        }
    }
    if ksm {
        let pair = &v["ratios"]["pairs"]["densevm-full_vs_ksm-full"];
        assert!(pair["converge_speedup"].as_f64().unwrap() > 0.0, "{pair}");
        assert!(v["ratios"]["targets"]["idle_cpu_ratio_met"].is_boolean(), "{}", v["ratios"]);
    }
    assert!(stdout.contains("targets (full speed, same run)"), "{stdout}");
}

#[test]
fn bench_merge_runs_only_the_chosen_policies() {
    let bad = densevm(&["bench", "merge", "--policy", "fastest"]);
    assert_eq!(bad.status.code(), Some(2), "a bad policy name is a usage error");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("possible values"));
    if !kvm_available("bench_merge_runs_only_the_chosen_policies") {
        return;
    }
    let json = std::env::temp_dir().join(format!("densevm-bench-merge-only-{}.json", std::process::id()));
    let out = densevm(&["bench", "merge", "--quick", "--policy", "none", "--json", json.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).unwrap();
    let names: Vec<&str> = v["policies"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["none"]);
    assert_eq!(v["kernel_ksm"]["skipped_reason"], "not chosen (--policy)");
}
