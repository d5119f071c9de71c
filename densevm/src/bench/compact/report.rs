//! The summary of `densevm bench compact`: min / median / max over the
//! repetitions of each metric, and the targets judged at the median.

use serde_json::{json, Value};

use crate::bench::report::{say, spread, Spread};

/// One repetition's numbers that the summary spreads.
#[derive(Clone, Debug, Default)]
pub struct RepNumbers {
    /// densevm's on-demand pass, pages migrated per second.
    pub densevm_pages_per_s: Option<f64>,
    /// densevm's on-demand pass, pages migrated per CPU second of its thread
    /// (less sensitive to a busy host than the wall-clock rate).
    pub densevm_pages_per_cpu_s: Option<f64>,
    /// The kernel's compaction, pages migrated per second (machine-wide).
    pub kernel_pages_per_s: Option<f64>,
    /// The kernel's compaction, pages migrated (machine-wide) per CPU second of
    /// the thread writing compact_memory (the kernel compacts in its context).
    pub kernel_pages_per_cpu_s: Option<f64>,
    /// densevm's pass: CPU time of its thread over its wall time.
    pub densevm_on_cpu_share: Option<f64>,
    /// The kernel's compact_memory write: CPU time of the writer over its wall time.
    pub kernel_on_cpu_share: Option<f64>,
    /// The kernel's compaction, pages of its own region moved per second.
    pub kernel_region_pages_per_s: Option<f64>,
    /// Share of the freeable 2 MiB frames the pass returned.
    pub fraction_returned: Option<f64>,
    /// 2 MiB frames in use after the pass beyond the ideal.
    pub frames_over_ideal: Option<f64>,
    /// Guest pace during the full-rate pass.
    pub pass_pace: Option<f64>,
    /// Guest pace under proactive compaction.
    pub proactive_pace: Option<f64>,
    /// Share of the full-rate pass the guests' vCPUs were held.
    pub pass_held_share: Option<f64>,
    /// Share of the proactive window the guests' vCPUs were held.
    pub proactive_held_share: Option<f64>,
    /// Seconds until proactive compaction settled.
    pub proactive_settle_s: Option<f64>,
    /// Share of the freeable 2 MiB frames proactive compaction returned.
    pub proactive_fraction_returned: Option<f64>,
}

impl RepNumbers {
    /// densevm pages/s over the kernel's, in this repetition.
    pub fn ratio(&self) -> Option<f64> {
        let (d, k) = (self.densevm_pages_per_s?, self.kernel_pages_per_s?);
        (k > 0.0 && d.is_finite()).then(|| d / k)
    }

    /// densevm pages per CPU second over the kernel's, in this repetition.
    pub fn cpu_ratio(&self) -> Option<f64> {
        let (d, k) = (self.densevm_pages_per_cpu_s?, self.kernel_pages_per_cpu_s?);
        (k > 0.0 && d.is_finite()).then(|| d / k)
    }

    /// densevm pages/s over the kernel's on its own region, in this repetition.
    pub fn region_ratio(&self) -> Option<f64> {
        let (d, k) = (self.densevm_pages_per_s?, self.kernel_region_pages_per_s?);
        (k > 0.0 && d.is_finite()).then(|| d / k)
    }
}

/// Prints the spreads and the targets; returns them as JSON.
pub fn summarize(reps: &[RepNumbers]) -> Value {
    type Metric = (&'static str, &'static str, fn(&RepNumbers) -> Option<f64>, usize);
    let metrics: [Metric; 18] = [
        ("densevm_pages_per_s", "densevm pages migrated/s (full-rate pass)", |r| r.densevm_pages_per_s, 0),
        (
            "densevm_pages_per_cpu_s",
            "densevm pages migrated per CPU second of the pass",
            |r| r.densevm_pages_per_cpu_s,
            0,
        ),
        ("kernel_pages_per_s", "kernel pages migrated/s (compact_memory, machine-wide)", |r| r.kernel_pages_per_s, 0),
        ("ratio_densevm_to_kernel", "ratio densevm / kernel (machine-wide)", RepNumbers::ratio, 2),
        (
            "kernel_pages_per_cpu_s",
            "kernel pages migrated per CPU second (machine-wide)",
            |r| r.kernel_pages_per_cpu_s,
            0,
        ),
        ("ratio_densevm_to_kernel_cpu", "ratio densevm / kernel per CPU second", RepNumbers::cpu_ratio, 2),
        ("densevm_on_cpu_share", "densevm pass: CPU time / wall time", |r| r.densevm_on_cpu_share, 2),
        ("kernel_on_cpu_share", "kernel compact_memory: CPU time / wall time", |r| r.kernel_on_cpu_share, 2),
        ("kernel_region_pages_per_s", "kernel pages of its own region moved/s", |r| r.kernel_region_pages_per_s, 0),
        ("ratio_densevm_to_kernel_region", "ratio densevm / kernel (own region)", RepNumbers::region_ratio, 2),
        ("fraction_returned", "fraction of freeable 2 MiB frames returned", |r| r.fraction_returned, 3),
        ("frames_over_ideal", "2 MiB frames in use beyond ideal", |r| r.frames_over_ideal, 0),
        ("pass_guest_pace", "guest pace during the full-rate pass", |r| r.pass_pace, 2),
        ("pass_held_share", "share of the full-rate pass the vCPUs were held", |r| r.pass_held_share, 3),
        ("proactive_guest_pace", "guest pace under proactive compaction", |r| r.proactive_pace, 2),
        ("proactive_held_share", "share of the proactive window the vCPUs were held", |r| r.proactive_held_share, 3),
        ("proactive_settle_s", "proactive compaction: seconds to settle", |r| r.proactive_settle_s, 2),
        (
            "proactive_fraction_returned",
            "proactive: fraction of freeable 2 MiB frames returned",
            |r| r.proactive_fraction_returned,
            3,
        ),
    ];
    println!("{:<56} {:>12} {:>12} {:>12}", "over the repetitions", "min", "median", "max");
    let mut out = serde_json::Map::new();
    for (key, what, get, digits) in metrics {
        let s = spread(reps.iter().map(get));
        let cell = |f: fn(&Spread) -> f64| s.as_ref().map(|s| format!("{:.digits$}", f(s))).unwrap_or("-".into());
        println!("{what:<56} {:>12} {:>12} {:>12}", cell(|s| s.min), cell(|s| s.median), cell(|s| s.max));
        out.insert(key.into(), json!(s));
    }
    let median = |key: &str| out.get(key).and_then(|v| v["median"].as_f64());
    let packed = median("fraction_returned").zip(median("frames_over_ideal")).map(|(f, o)| f >= 0.95 && o <= 2.0);
    let faster = median("ratio_densevm_to_kernel").map(|r| r >= 1.0);
    let faster_region = median("ratio_densevm_to_kernel_region").map(|r| r >= 1.0);
    let pass_pace = median("pass_guest_pace").map(|p| p >= 0.5);
    let proactive_pace = median("proactive_guest_pace").map(|p| p >= 0.9);
    let targets = [
        ("packs", "one pass leaves at most ideal + 2 of the 2 MiB frames in use (>= 95% of freeable returned)", packed),
        ("throughput", "migration throughput >= the kernel's compaction (machine-wide pages/s)", faster),
        (
            "throughput_region",
            "migration throughput >= the kernel's compaction of its own region (region pages moved/s)",
            faster_region,
        ),
        ("pass_pace", "guest pace >= 0.5 during a full-speed pass", pass_pace),
        ("proactive_pace", "guest pace >= 0.9 under proactive compaction", proactive_pace),
    ];
    println!("targets (at the median, same run):");
    let mut tj = serde_json::Map::new();
    for (key, what, met) in targets {
        println!("  {what}: {}", say(met));
        tj.insert(key.into(), json!({ "target": what, "met": met }));
    }
    json!({ "spreads": out, "targets": tj })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_needs_both() {
        let r = RepNumbers { densevm_pages_per_s: Some(10.0), kernel_pages_per_s: Some(4.0), ..Default::default() };
        assert_eq!(r.ratio(), Some(2.5));
        assert_eq!(RepNumbers { kernel_pages_per_s: Some(0.0), ..r.clone() }.ratio(), None);
        assert_eq!(RepNumbers { densevm_pages_per_s: None, ..r.clone() }.ratio(), None);
        assert_eq!(r.region_ratio(), None);
        let r = RepNumbers { kernel_region_pages_per_s: Some(5.0), ..r };
        assert_eq!(r.region_ratio(), Some(2.0));
    }
}
