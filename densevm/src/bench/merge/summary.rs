//! The ratios of `densevm bench merge`: densevm against the kernel's KSM per
//! repetition, their min / median / max over the repetitions (the spread
//! helper shared by the benchmarks, [`crate::bench::report`]), and the targets judged at the median.

use serde_json::{json, Map, Value};

use super::images::ImageResult;
use super::policy::PolicyResult;
use crate::bench::report::{fmt, ratio, say, spread, Spread};

/// The pairs of contenders compared (densevm, kernel).
pub const PAIRS: [(&str, &str); 2] = [("densevm-full", "ksm-full"), ("densevm-default", "ksm-default")];

/// One repetition's ratios of the synthetic clones, per pair (printed).
pub fn synthetic_rep(results: &[PolicyResult]) -> Map<String, Value> {
    let find = |name: &str| results.iter().find(|r| r.name == name);
    let mut out = Map::new();
    for (d, k) in PAIRS {
        let (Some(d), Some(k)) = (find(d), find(k)) else { continue };
        let speedup = ratio(k.converge_s, d.converge_s);
        let cpu = ratio(d.cpu_s_to_converge, k.cpu_s_to_converge);
        let idle = ratio(d.steady_cpu_per_s, k.steady_cpu_per_s);
        let pace = ratio(d.guest_verify_rate_merging, d.guest_verify_rate_idle);
        println!(
            "{} vs {}: converges {}x faster, using {}x the CPU; idle CPU {}x the kernel's; guest pace {}",
            d.name,
            k.name,
            fmt(speedup, 2),
            fmt(cpu, 2),
            fmt(idle, 4),
            fmt(pace, 2)
        );
        out.insert(
            format!("{}_vs_{}", d.name, k.name),
            json!({
                "converge_speedup": speedup,
                "cpu_to_converge_ratio": cpu,
                "cpu_efficiency": ratio(k.cpu_s_to_converge, d.cpu_s_to_converge),
                "idle_cpu_ratio": idle,
                "guest_pace": pace,
                "host_bytes_ratio": ratio(Some(d.host_bytes as f64), Some(k.host_bytes as f64)),
            }),
        );
    }
    out
}

/// Prints `what: min median max` rows of the values of `key` in each repetition
/// of each pair; returns the spreads as `{pair: {key: spread}}`.
fn spreads(reps: &[Map<String, Value>], keys: &[(&str, &str, usize)]) -> Map<String, Value> {
    let order = |n: &String| PAIRS.iter().position(|(d, k)| format!("{d}_vs_{k}") == *n).unwrap_or(PAIRS.len());
    println!(
        "{:<58} {:>10} {:>10} {:>10} {:>3}",
        format!("over {} repetitions", reps.len()),
        "min",
        "median",
        "max",
        "n"
    );
    let mut pairs = Map::new();
    let names: Vec<String> = reps.iter().flat_map(|r| r.keys().cloned()).fold(Vec::new(), |mut v, k| {
        if !v.contains(&k) {
            v.push(k);
        }
        v
    });
    let mut names = names;
    names.sort_by_key(order);
    for pair in names {
        let mut pj = Map::new();
        for &(key, what, digits) in keys {
            let s: Option<Spread> = spread(reps.iter().map(|r| r.get(&pair).and_then(|p| p[key].as_f64())));
            let cell = |f: fn(&Spread) -> f64| s.as_ref().map(|s| format!("{:.digits$}", f(s))).unwrap_or("-".into());
            let n = s.map_or(0, |s| s.n);
            println!(
                "{:<58} {:>10} {:>10} {:>10} {n:>3}",
                format!("{pair}: {what}"),
                cell(|s| s.min),
                cell(|s| s.median),
                cell(|s| s.max)
            );
            pj.insert(key.into(), json!(s));
        }
        pairs.insert(pair, Value::Object(pj));
    }
    pairs
}

fn median(pairs: &Map<String, Value>, pair: &str, key: &str) -> Option<f64> {
    pairs.get(pair).and_then(|p| p[key]["median"].as_f64())
}

/// Spreads and targets of the synthetic clones: `ratios` of the JSON.
pub fn synthetic(reps: &[Map<String, Value>]) -> Value {
    let keys = [
        ("converge_speedup", "kernel time / densevm time", 2),
        ("cpu_to_converge_ratio", "densevm CPU / kernel CPU", 2),
        ("idle_cpu_ratio", "idle CPU densevm / kernel", 4),
        ("guest_pace", "densevm guest pace while merging", 2),
    ];
    let spreads = spreads(reps, &keys);
    let full = "densevm-full_vs_ksm-full";
    let (speed, cpu) = (median(&spreads, full, "converge_speedup"), median(&spreads, full, "cpu_to_converge_ratio"));
    let speed_met = speed.zip(cpu).map(|(s, c)| s >= 5.0 && c <= 1.05);
    let pace_met = median(&spreads, full, "guest_pace").map(|p| p >= 0.8);
    let idle_met = median(&spreads, full, "idle_cpu_ratio").map(|i| i <= 0.1);
    println!(
        "targets (full speed, same run) at the median: clones merge >= 5x faster than the kernel at no more CPU: {}; \
         guest pace >= 0.8 while merging: {}; idle CPU <= 1/10 of the kernel's: {}",
        say(speed_met),
        say(pace_met),
        say(idle_met)
    );
    // The medians, for readers of one number per ratio.
    let mut pairs = Map::new();
    for (name, sp) in &spreads {
        let mut p = Map::new();
        for (key, _, _) in keys {
            p.insert(key.into(), json!(sp[key]["median"].as_f64()));
        }
        p.insert("spread".into(), sp.clone());
        pairs.insert(name.clone(), Value::Object(p));
    }
    json!({
        "pairs": pairs,
        "targets": {
            "clone_merge_speedup_min": 5.0,
            "clone_merge_speedup_met": speed_met,
            "guest_pace_min": 0.8,
            "guest_pace_met": pace_met,
            "idle_cpu_ratio_max": 0.1,
            "idle_cpu_ratio_met": idle_met,
        },
    })
}

/// One repetition's ratios of an image scenario (printed).
pub fn image_rep(d: Option<&ImageResult>, k: Option<&ImageResult>) -> Map<String, Value> {
    let mut out = Map::new();
    let (Some(d), Some(k)) = (d, k) else { return out };
    let speedup = ratio(k.t95_s, d.t95_s);
    let speedup_final = ratio(k.final_s, d.final_s);
    let cpu = ratio(d.cpu_s_to_final, k.cpu_s_to_final);
    println!(
        "densevm-full vs ksm-full: 95% of final {}x faster (final count {}x), using {}x the CPU",
        fmt(speedup, 2),
        fmt(speedup_final, 2),
        fmt(cpu, 2)
    );
    out.insert(
        "densevm-full_vs_ksm-full".into(),
        json!({
            "t95_speedup": speedup,
            "final_speedup": speedup_final,
            "cpu_to_final_ratio": cpu,
            "densevm_of_ideal": d.of_ideal,
            "ksm_of_ideal": k.of_ideal,
        }),
    );
    out
}

/// Spreads and targets of an image scenario (`clones`: the clone scenario's
/// target of 2x applies).
pub fn images(reps: &[Map<String, Value>], clones: bool) -> Value {
    let keys = [
        ("t95_speedup", "kernel / densevm time to 95% of final", 2),
        ("final_speedup", "kernel / densevm time to the final count", 2),
        ("cpu_to_final_ratio", "densevm CPU / kernel CPU (to final)", 2),
        ("densevm_of_ideal", "densevm pages_sharing / ideal", 4),
        ("ksm_of_ideal", "kernel pages_sharing / ideal", 4),
    ];
    let spreads = spreads(reps, &keys);
    let pair = "densevm-full_vs_ksm-full";
    let at = |key| median(&spreads, pair, key);
    let want = if clones { 2.0 } else { 1.0 };
    let faster = at("t95_speedup")
        .zip(at("cpu_to_final_ratio"))
        .map(|(s, c)| (if clones { s >= want } else { s > want }) && c <= 1.0);
    let saves = at("densevm_of_ideal").map(|f| f >= 0.99);
    let what = if clones { ">= 2x faster than the kernel" } else { "faster than the kernel" };
    println!(
        "targets (full speed, same run) at the median: densevm converges {what} with no more CPU: {}; \
         saves >= 99% of the ideal: {}",
        say(faster),
        say(saves)
    );
    json!({
        "pairs": spreads,
        "targets": {
            "speedup_min": want,
            "faster_at_no_more_cpu_met": faster,
            "of_ideal_min": 0.99,
            "of_ideal_met": saves,
        },
    })
}
