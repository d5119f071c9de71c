//! `densevm bench cow --quick` through the real binary: every case is present with
//! positive numbers, the guests verified every page, the copy and reuse cases went
//! through the intended fault paths, and the KSM knobs are as they were before;
//! with `--repeat 2` both orders run (densevm first, then the kernel first) and
//! every figure has its min / median / max over both, and every target of issue
//! 11 a verdict. No timing is asserted (the benchmark reports it).

use e2e::{densevm, kvm_available};
use serde_json::Value;

const KSM: &str = "/sys/kernel/mm/ksm";
const KNOBS: [&str; 4] = ["run", "pages_to_scan", "sleep_millisecs", "advisor_mode"];

fn ksm_knobs() -> Vec<Option<String>> {
    KNOBS.iter().map(|k| std::fs::read_to_string(format!("{KSM}/{k}")).ok()).collect()
}

fn positive(case: &Value, field: &str) -> f64 {
    let v = case[field].as_f64().unwrap_or_else(|| panic!("{field} missing in {case}"));
    assert!(v > 0.0 && v.is_finite(), "{field} = {v} in {case}");
    v
}

#[test]
fn bench_cow_quick_reports_every_case() {
    if !kvm_available("bench_cow_quick_reports_every_case") {
        return;
    }
    let json = std::env::temp_dir().join(format!("densevm-bench-cow-{}.json", std::process::id()));
    let before = ksm_knobs();
    let out = densevm(&["bench", "cow", "--quick", "--repeat", "2", "--json", json.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench cow failed: {stdout}\n{stderr}");
    assert_eq!(ksm_knobs(), before, "the KSM knobs were not restored");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).unwrap();
    assert_eq!(v["benchmark"], "cow");
    assert!(v["tsc_khz"].as_u64().unwrap() > 0);

    let ksm = v["kernel_ksm"]["available"].as_bool().unwrap();
    let mut names = vec!["private", "wp-only", "copy", "reuse", "reuse-bg"];
    if ksm {
        names.push("ksm-guest");
        let host = &v["kernel_ksm"]["host_write"];
        for f in ["median_ns", "p99_ns", "mean_ns", "pages_measured"] {
            positive(host, f);
        }
        assert!(v["kernel_ksm"]["restore_error"].is_null(), "{}", v["kernel_ksm"]);
    } else {
        let why = v["kernel_ksm"]["skipped_reason"].as_str().unwrap();
        assert!(!why.is_empty());
        assert!(stdout.contains("kernel KSM rows skipped"), "{stdout}");
        eprintln!("bench_cow: kernel KSM rows skipped: {why}");
    }
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.iter().map(|c| c["name"].as_str().unwrap()).collect::<Vec<_>>(), names);
    for c in cases {
        for f in ["mean_ns", "median_ns", "max_ns", "pages_measured"] {
            positive(c, f);
        }
        let pages = c["pages"].as_u64().unwrap();
        assert!(c["pages_measured"].as_u64().unwrap() <= pages, "{c}");
        if c["name"] == "ksm-guest" {
            positive(c, "pages_prepared");
        } else {
            assert_eq!(c["pages_prepared"].as_u64().unwrap(), pages, "every page prepared: {c}");
        }
        assert_eq!(c["mismatches"], 0, "the guests verified every page: {c}");
        for r in c["exit_reasons"].as_array().unwrap() {
            assert_eq!(r, "workload finished", "{c}");
        }
        match c["name"].as_str().unwrap() {
            "wp-only" => assert_eq!(c["protect_faults"].as_u64().unwrap(), pages, "protect path: {c}"),
            "copy" => assert_eq!(c["cow_copies"].as_u64().unwrap(), pages, "copy path: {c}"),
            "reuse" => {
                assert_eq!(c["cow_reuses"].as_u64().unwrap(), pages, "reuse path: {c}");
                assert_eq!(c["cow_copies"], 0, "{c}");
            }
            "reuse-bg" => {
                // Every page was taken over in the background before the writes,
                // and no measured write faulted.
                assert_eq!(c["cow_background_reuses"].as_u64().unwrap(), pages, "background reuse: {c}");
                assert_eq!((c["cow_reuses"].as_u64(), c["faulted_writes"].as_u64()), (Some(0), Some(0)), "{c}");
            }
            _ => {}
        }
    }
    for name in ["private-host", "wp-host", "copy-host", "reuse-host", "reuse-bg-host"] {
        let h = &v["host_thread_writes"][name];
        for f in ["median_ns", "p99_ns", "mean_ns", "pages_measured"] {
            positive(h, f);
        }
        assert_eq!(h["pages"], h["pages_measured"], "every page prepared: {name} {h}");
        let faulted = h["faulted_writes"].as_u64().unwrap();
        if name == "reuse-bg-host" {
            assert_eq!(faulted, 0, "writes after background reuse faulted: {h}");
            assert_eq!(h["background_reuses"], h["pages"], "{h}");
        } else if name == "private-host" {
            assert_eq!(faulted, 0, "writes to private pages faulted: {h}");
        } else {
            assert_eq!(faulted, h["pages"].as_u64().unwrap(), "every write faulted: {name} {h}");
        }
    }
    assert!(v["ratios"]["reuse_over_copy"].as_f64().unwrap() > 0.0);
    assert!(stdout.contains("reuse / copy"), "{stdout}");

    // Two interleaved repetitions, each with every case; spreads over both.
    assert_eq!(v["repeat"], 2);
    assert!(stdout.contains("repetition 2/2 (kernel first)"), "{stdout}");
    let reps = v["repetitions"].as_array().unwrap();
    assert_eq!(reps.len(), 2);
    for r in reps {
        let names_here: Vec<_> = r["cases"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names_here, names, "{r}");
        for c in r["cases"].as_array().unwrap() {
            assert_eq!(c["mismatches"], 0, "the guests verified every page: {c}");
        }
    }
    let mut figures = vec![
        "private",
        "wp-only",
        "copy",
        "reuse",
        "reuse-bg",
        "wp-host",
        "copy-host",
        "reuse-host",
        "reuse-bg-host",
        "reuse_over_copy",
        "reuse_bg_over_copy",
    ];
    if ksm {
        figures.extend(["ksm-guest", "ksm-host", "copy_over_ksm_guest", "copy_host_over_ksm_host"]);
    }
    for f in figures {
        let s = &v["spreads"][f];
        assert_eq!(s["n"], 2, "{f}: {s}");
        let (min, median, max) =
            (s["min"].as_f64().unwrap(), s["median"].as_f64().unwrap(), s["max"].as_f64().unwrap());
        assert!(min > 0.0 && min <= median && median <= max, "{f}: {s}");
        assert_eq!(v["ratios"][f].as_f64(), Some(median), "{f}");
    }
    for t in ["guest_copy", "sole_mapped", "host_thread"] {
        let met = &v["targets"][t]["met"];
        assert!(if ksm || t == "sole_mapped" { met.is_boolean() } else { met.is_null() }, "{t}: {}", v["targets"]);
    }
    assert!(stdout.contains("targets of issue 11"), "{stdout}");
}
