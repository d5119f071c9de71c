//! `densevm bench merge --quick` through the real binary: every memory policy is
//! present in the JSON, densevm and the kernel's KSM both merged pages, the
//! guests verified every page after merging (0 mismatches), and the KSM knobs
//! are as they were before; the image scenarios on small synthetic images
//! (merged to the ideal computed here, 0 mismatches). No timing is asserted (the
//! benchmark reports it).

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
    // --clones belongs to --image-clones.
    let bad = densevm(&["bench", "merge", "--clones", "3"]);
    assert_eq!(bad.status.code(), Some(2), "--clones without --image-clones is a usage error");
}

/// A small synthetic RAM image of `pages` pages: page `p` holds `content(p)`
/// repeated (0: an all-zero page).
fn write_image(path: &std::path::Path, pages: u64, content: impl Fn(u64) -> u64) {
    let bytes: Vec<u8> = (0..pages)
        .flat_map(|p| {
            let v = content(p);
            (0..512u64).flat_map(move |i| (if v == 0 { 0 } else { v ^ (i << 40) }).to_le_bytes())
        })
        .collect();
    std::fs::write(path, bytes).unwrap();
}

/// pages_sharing when every group of equal non-zero pages merges (groups below 256).
fn ideal_sharing(vms: &[&dyn Fn(u64) -> u64], pages: u64) -> u64 {
    let mut groups = std::collections::HashMap::new();
    for content in vms {
        for p in 0..pages {
            let v = content(p);
            if v != 0 {
                *groups.entry(v).or_insert(0u64) += 1;
            }
        }
    }
    groups.values().map(|n| n - 1).sum()
}

fn run_image_bench(args: &[&str], name: &str) -> Value {
    let json = std::env::temp_dir().join(format!("densevm-bench-merge-{name}-{}.json", std::process::id()));
    let mut all = vec!["bench", "merge", "--quick", "--json", json.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = densevm(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{all:?} failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("memory only"), "{stdout}");
    assert!(stdout.contains("targets (full speed, same run) at the median"), "{stdout}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).unwrap();
    v
}

fn check_image_run(v: &Value, scenario: &str, ideal: u64) {
    assert_eq!(v["benchmark"], "merge");
    assert_eq!(v["scenario"], scenario);
    assert_eq!(v["repeat"], 1, "--quick runs one repetition");
    assert_eq!(v["mismatches"], 0, "{v}");
    assert_eq!(v["ideal"]["pages_sharing"].as_u64(), Some(ideal), "{}", v["ideal"]);
    let rep = &v["repetitions"][0];
    let contenders = rep["contenders"].as_array().unwrap();
    let ksm = v["kernel_ksm"]["available"].as_bool().unwrap();
    let want: &[&str] = if ksm { &["densevm-full", "ksm-full"] } else { &["densevm-full"] };
    assert_eq!(contenders.iter().map(|c| c["name"].as_str().unwrap()).collect::<Vec<_>>(), want);
    for c in contenders {
        assert_eq!(c["mismatches"], 0, "{c}");
        assert!(c["settled"] == true, "{c}");
        assert!(c["of_ideal"].as_f64().unwrap() >= 0.99, "{c}");
        assert!(c["t95_s"].as_f64().is_some(), "{c}");
        assert!(c["host_bytes"].as_u64().unwrap() < c["host_bytes_before"].as_u64().unwrap(), "{c}");
    }
    if ksm {
        assert!(v["kernel_ksm"]["restore_error"].is_null(), "{}", v["kernel_ksm"]);
        let pair = &v["ratios"]["pairs"]["densevm-full_vs_ksm-full"];
        assert!(pair["t95_speedup"]["median"].as_f64().is_some_and(|s| s > 0.0), "{pair}");
    }
}

#[test]
fn bench_merge_image_scenarios_quick() {
    if !kvm_available("bench_merge_image_scenarios_quick") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("densevm-bench-merge-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a.ram"), dir.join("b.ram"));
    let pages = 2048;
    // Scattered sharing: every 4th page zero, every 4th one of 40 common contents,
    // the rest unique; image B holds A's unique pages shifted by 3 pages.
    let ca = |p: u64| match p % 4 {
        0 => 0,
        1 => 1 + p % 40,
        _ => 1000 + p,
    };
    let cb = |p: u64| match p % 4 {
        0 => 0,
        1 => 1 + (p / 4) % 40,
        _ => 1000 + (p + 3) % pages,
    };
    write_image(&a, pages, ca);
    write_image(&b, pages, cb);
    let before = ksm_knobs();
    let v = run_image_bench(&["--image-pair", a.to_str().unwrap(), b.to_str().unwrap()], "pair");
    check_image_run(&v, "image-pair", ideal_sharing(&[&ca, &cb], pages));
    assert_eq!(v["ideal"]["zero_pages"].as_u64(), Some(2 * pages / 4));
    let v = run_image_bench(&["--image-clones", a.to_str().unwrap(), "--clones", "3"], "clones");
    check_image_run(&v, "image-clones", ideal_sharing(&[&ca, &ca, &ca], pages));
    assert_eq!(ksm_knobs(), before, "the KSM knobs were not restored");

    // A size mismatch is a clear error.
    let c = dir.join("c.ram");
    write_image(&c, pages / 2, ca);
    let out = densevm(&["bench", "merge", "--quick", "--image-pair", a.to_str().unwrap(), c.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("differ in size"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(dir).unwrap();
}
