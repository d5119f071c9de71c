//! The figures of `densevm bench cow` per repetition, their min / median / max
//! over the interleaved repetitions (the shared [`crate::bench::report`]
//! helpers), and the write-fault targets of issue 11 judged at the median.

use serde_json::{json, Map, Value};

use crate::bench::report::{fmt, ratio, say, spread};

/// One figure: its JSON key, what it is, and its decimals in the table.
type Figure = (&'static str, &'static str, usize);

/// Latencies (ns, medians of one repetition), then ratios, in the order printed.
pub(super) const FIGURES: [Figure; 26] = [
    ("private", "guest: private page, ns", 0),
    ("wp-only", "guest: write-protected private page (round trip), ns", 0),
    ("copy", "guest: frame shared by 2 pages (copy), ns", 0),
    ("reuse", "guest: sole mapper of a merged frame, fault-time reuse, ns", 0),
    ("reuse-bg", "guest: sole mapper of a merged frame, background reuse, ns", 0),
    ("ksm-guest", "guest: kernel KSM copy-on-write, ns", 0),
    ("reuse_bg_faulted", "guest: background-reuse case, writes that still faulted", 0),
    ("private-host", "host thread: private page, ns", 0),
    ("wp-host", "host thread: write-protected private page, ns", 0),
    ("copy-host", "host thread: copy, ns", 0),
    ("reuse-host", "host thread: fault-time reuse, ns", 0),
    ("reuse-bg-host", "host thread: after background reuse, ns", 0),
    ("ksm-host", "host thread: kernel KSM copy-on-write, ns", 0),
    ("copy_over_ksm_guest", "ratio guest copy / kernel KSM (guest)", 2),
    ("reuse_over_copy", "ratio guest fault-time reuse / guest copy", 2),
    ("reuse_bg_over_copy", "ratio guest background reuse / guest copy", 2),
    ("reuse_bg_over_private", "ratio guest background reuse / private page", 2),
    ("reuse_over_ksm_guest", "ratio guest reuse / kernel KSM (guest)", 2),
    ("wp_over_ksm_guest", "ratio guest wp-only / kernel KSM (guest)", 2),
    ("copy_host_over_ksm_host", "ratio host copy / kernel KSM (host)", 2),
    ("reuse_host_over_ksm_host", "ratio host reuse / kernel KSM (host)", 2),
    ("wp_host_over_ksm_host", "ratio host wp-only / kernel KSM (host)", 2),
    ("reuse_host_over_copy_host", "ratio host reuse / host copy", 2),
    ("reuse_bg_host_over_copy_host", "ratio host background reuse / host copy", 2),
    ("reuse_bg_host_over_private_host", "ratio host background reuse / host private page", 2),
    ("copy_over_ksm_host", "ratio guest copy / kernel KSM (host thread)", 2),
];

/// The ratios of one repetition from its latencies (`lat`: case name -> median ns).
pub(super) fn ratios(lat: &Map<String, Value>) -> Map<String, Value> {
    let at = |k: &str| lat.get(k).and_then(Value::as_f64);
    let pairs = [
        ("copy_over_ksm_guest", "copy", "ksm-guest"),
        ("reuse_over_copy", "reuse", "copy"),
        ("reuse_over_ksm_guest", "reuse", "ksm-guest"),
        ("wp_over_ksm_guest", "wp-only", "ksm-guest"),
        ("copy_host_over_ksm_host", "copy-host", "ksm-host"),
        ("reuse_host_over_ksm_host", "reuse-host", "ksm-host"),
        ("wp_host_over_ksm_host", "wp-host", "ksm-host"),
        ("reuse_host_over_copy_host", "reuse-host", "copy-host"),
        ("reuse_bg_over_copy", "reuse-bg", "copy"),
        ("reuse_bg_over_private", "reuse-bg", "private"),
        ("reuse_bg_host_over_copy_host", "reuse-bg-host", "copy-host"),
        ("reuse_bg_host_over_private_host", "reuse-bg-host", "private-host"),
        ("copy_over_ksm_host", "copy", "ksm-host"),
    ];
    pairs.iter().map(|&(key, a, b)| (key.to_string(), json!(ratio(at(a), at(b))))).collect()
}

/// The targets of issue 11 for writes to merged pages: (key, what, ratio, limit).
const TARGETS: [(&str, &str, &str, f64); 3] = [
    ("guest_copy", "guest-observed copy <= kernel KSM copy-on-write", "copy_over_ksm_guest", 1.0),
    ("sole_mapped", "write to a sole-mapped merged page <= 0.5x densevm's copy", "reuse_bg_over_copy", 0.5),
    ("host_thread", "host-thread write to a merged page <= 3x the kernel's", "copy_host_over_ksm_host", 3.0),
];

/// Prints the spreads of every figure over `reps` (each repetition's figures:
/// latencies and ratios by key) and the targets at the median; returns
/// `{spreads, medians, targets}`.
pub(super) fn summarize(reps: &[Map<String, Value>]) -> Value {
    println!(
        "{:<58} {:>10} {:>10} {:>10} {:>3}",
        format!("over {} repetition(s)", reps.len()),
        "min",
        "median",
        "max",
        "n"
    );
    let mut spreads = Map::new();
    let mut medians = Map::new();
    for (key, what, digits) in FIGURES {
        let s = spread(reps.iter().map(|r| r.get(key).and_then(Value::as_f64)));
        let n = s.map_or(0, |s| s.n);
        println!(
            "{what:<58} {:>10} {:>10} {:>10} {n:>3}",
            fmt(s.map(|s| s.min), digits),
            fmt(s.map(|s| s.median), digits),
            fmt(s.map(|s| s.max), digits)
        );
        spreads.insert(key.into(), json!(s));
        medians.insert(key.into(), json!(s.map(|s| s.median)));
    }
    println!("targets of issue 11 (at the median, same run):");
    let mut targets = Map::new();
    for (key, what, figure, limit) in TARGETS {
        let median = medians.get(figure).and_then(Value::as_f64);
        let met = median.map(|m| m <= limit);
        println!("  {what}: {} (median {})", say(met), fmt(median, 2));
        targets
            .insert(key.into(), json!({ "target": what, "ratio": figure, "max": limit, "median": median, "met": met }));
    }
    json!({ "spreads": spreads, "medians": medians, "targets": targets })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lat(v: &[(&str, f64)]) -> Map<String, Value> {
        v.iter().map(|(k, x)| (k.to_string(), json!(x))).collect()
    }

    #[test]
    fn ratios_need_both_sides() {
        let r = ratios(&lat(&[("copy", 40.0), ("reuse", 10.0), ("ksm-guest", 20.0)]));
        assert_eq!(r["copy_over_ksm_guest"], json!(2.0));
        assert_eq!(r["reuse_over_copy"], json!(0.25));
        assert!(r["copy_host_over_ksm_host"].is_null());
    }

    #[test]
    fn targets_are_judged_at_the_median() {
        let rep = |copy: f64, reuse: f64| {
            let mut l = lat(&[("copy", copy), ("reuse", reuse), ("ksm-guest", 20.0)]);
            let r = ratios(&l);
            l.extend(r);
            l
        };
        // Copy / KSM: 0.5, 3.0, 0.9 -> median 0.9 (met); reuse / copy: 0.2, 0.9, 0.6 -> 0.6 (not met).
        let rep = |copy: f64, reuse: f64| {
            let mut l = rep(copy, reuse);
            l.insert("reuse-bg".into(), json!(reuse));
            l.extend(ratios(&l));
            l
        };
        let v = summarize(&[rep(10.0, 2.0), rep(60.0, 54.0), rep(18.0, 10.8)]);
        assert_eq!(v["targets"]["guest_copy"]["met"], json!(true));
        assert_eq!(v["targets"]["sole_mapped"]["met"], json!(false));
        assert!(v["targets"]["host_thread"]["met"].is_null());
        assert_eq!(v["spreads"]["copy"]["max"], json!(60.0));
        assert_eq!(v["spreads"]["copy"]["n"], json!(3));
    }
}
