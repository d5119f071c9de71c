//! `densevm bench merge --image-pair` / `--image-clones`: the repetitions of
//! the real-image scenario ([`super::images`]), densevm-full and ksm-full in
//! alternating order, their table, and the JSON.

use std::process::ExitCode;

use serde_json::json;

use super::images::{self, ImageSet};
use super::kernel::KernelRuns;
use super::{interrupted, rank, rt, summary, Options};
use crate::bench::report::fmt;
use crate::commands::CommandError;

fn print_images(rows: &[images::ImageResult]) {
    println!(
        "{:<14} {:>9} {:>10} {:>9} {:>10} {:>9} {:>9} {:>8} {:>7} {:>6} {:>9} {:>9} {:>4}",
        "contender",
        "95% s",
        "final s",
        "cpu 95%",
        "cpu final",
        "sharing",
        "shared",
        "of ideal",
        "zero",
        "scans",
        "MiB before",
        "MiB after",
        "bad"
    );
    for r in rows {
        println!(
            "{:<14} {:>9} {:>10} {:>9} {:>10} {:>9} {:>9} {:>8.4} {:>7} {:>6} {:>9.1} {:>9.1} {:>4}{}",
            r.name,
            fmt(r.t95_s, 3),
            fmt(r.final_s, 3),
            fmt(r.cpu_s_to_95, 3),
            fmt(r.cpu_s_to_final, 3),
            r.pages_sharing,
            r.pages_shared,
            r.of_ideal,
            r.zero_pages,
            r.full_scans,
            r.host_bytes_before as f64 / 1048576.0,
            r.host_bytes as f64 / 1048576.0,
            r.mismatches,
            if r.settled { "" } else { " (not settled)" }
        );
    }
    for r in rows {
        if let Some(m) = r.mapping {
            println!(
                "{}: {} merges in {} remaps ({:.2} pages per remap), {} choice flips, {} host mappings over guest RAM",
                r.name,
                m.merges,
                m.merge_runs,
                m.merges as f64 / m.merge_runs.max(1) as f64,
                m.merge_choice_flips,
                m.vma_count
            );
        }
    }
}

/// Runs the image scenario `set` `repeat` times.
pub fn run(o: &Options, set: &ImageSet, repeat: u32, chosen: &dyn Fn(&str) -> bool) -> Result<ExitCode, CommandError> {
    let mut kernel = KernelRuns::new(chosen("ksm-full"));
    let ideal = images::ideal(set, super::kernel::max_page_sharing())?;
    println!(
        "densevm bench merge {}: {} VMs x {} MiB real guest RAM images ({}), memory only (no vCPU runs: the images \
         are loaded into densevm guests and into anonymous memory for KSM); {} data pages, {} all-zero pages \
         (no host memory on either side); ideal pages_sharing {} (max_page_sharing {})",
        set.scenario,
        set.vms.len(),
        ideal.image_bytes >> 20,
        set.vms.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        ideal.data_pages,
        ideal.zero_pages,
        ideal.pages_sharing,
        ideal.max_page_sharing
    );
    let (mut reps, mut rep_json, mut mismatches) = (Vec::new(), Vec::new(), 0);
    for rep in 0..repeat {
        let ksm_first = rep % 2 == 1;
        let mut rows = Vec::new();
        for side in if ksm_first { [true, false] } else { [false, true] } {
            if side {
                kernel.with(&interrupted, |kernel| {
                    tracing::info!("bench merge {}: kernel KSM, full speed", set.scenario);
                    match images::ksm(set, &ideal, kernel, &interrupted) {
                        Ok(r) => rows.push(r),
                        Err(e) => kernel.failed("ksm-full", e),
                    }
                    kernel.flush_after("ksm-full");
                });
            } else if !side && chosen("densevm-full") {
                tracing::info!("bench merge {}: densevm merger, full speed", set.scenario);
                rows.push(images::densevm(set, &ideal, &interrupted)?);
            }
            if interrupted() {
                return Err(rt("interrupted"));
            }
        }
        rows.sort_by_key(|r| rank(r.name));
        println!("repetition {}/{repeat} ({} first)", rep + 1, if ksm_first { "kernel" } else { "densevm" });
        print_images(&rows);
        let find = |n: &str| rows.iter().find(|r| r.name == n);
        let ratios = summary::image_rep(find("densevm-full"), find("ksm-full"));
        mismatches += rows.iter().map(|r| r.mismatches).sum::<u64>();
        rep_json.push(json!({ "kernel_first": ksm_first, "contenders": rows, "ratios": ratios }));
        reps.push(ratios);
    }
    let kernel = kernel.finish();
    if let Some(why) = kernel["skipped_reason"].as_str() {
        println!("kernel KSM rows skipped: {why}");
    }
    let ratios = summary::images(&reps, set.scenario == "image-clones");
    let result = json!({
        "benchmark": "merge",
        "scenario": set.scenario,
        "quick": o.quick,
        "repeat": repeat,
        "images": set.vms,
        "memory_only": true,
        "ideal": ideal,
        "method": "memory only, no vCPU: each VM's RAM loaded from its image (densevm: MemoryManager::load_image \
                   into a manager of its own, checksum change detection, zero pages merged, max_page_sharing as \
                   the kernel's; kernel: private anonymous memory with MADV_MERGEABLE, pages_to_scan 10000, \
                   sleep 0); all-zero pages left without memory on both sides; final = pages_sharing unchanged \
                   for settle_s and two full scans; t95_s: first sample >= 95% of final; CPU from schedstat of \
                   the merger thread or ksmd; mismatches: guest pages differing from the image afterwards; \
                   contenders alternate in order between repetitions",
        "settle_s": set.settle.as_secs_f64(),
        "repetitions": rep_json,
        "kernel_ksm": kernel,
        "ratios": ratios,
        "mismatches": mismatches,
    });
    crate::bench::finish(&result, o.json.as_deref(), mismatches, "guest pages")
}
