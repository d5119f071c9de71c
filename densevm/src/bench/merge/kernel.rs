//! The kernel's KSM as a contender of `densevm bench merge`: waiting until
//! nobody else uses it, taking its knobs (restored when the guard drops) and
//! dropping its merged pages between contenders.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::bench::ksm::{KsmControl, KSM_SYSFS};
use crate::commands::CommandError;

/// How long to wait for another user of KSM to finish.
const KSM_BUSY_WAIT: Duration = Duration::from_secs(180);

fn rt(e: impl std::fmt::Display) -> CommandError {
    CommandError::Runtime(e.to_string())
}

/// Whether some process maps KSM pages (`/proc/<pid>/ksm_merging_pages` > 0).
fn someone_merging() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else { return true };
    dir.flatten().any(|e| {
        std::fs::read_to_string(e.path().join("ksm_merging_pages"))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0)
    })
}

/// Waits until nobody uses KSM: `run` 0 and no KSM page in use, or only stale
/// counts (pages_shared > 0 but no process maps a KSM page: left by processes
/// that exited while ksmd was stopped). Returns the stale pages_shared seen.
fn wait_ksm_free(ksm: &KsmControl, interrupted: &dyn Fn() -> bool) -> Result<u64, String> {
    let deadline = Instant::now() + KSM_BUSY_WAIT;
    loop {
        let (run, shared) = (ksm.get_u64("run"), ksm.get_u64("pages_shared"));
        match (run, shared) {
            (Ok(0), Ok(0)) => return Ok(0),
            (Ok(0), Ok(n)) if !someone_merging() => return Ok(n),
            (Err(e), _) | (_, Err(e)) => return Err(e.to_string()),
            (Ok(run), Ok(shared)) if Instant::now() >= deadline => {
                return Err(format!(
                    "KSM stayed in use for {KSM_BUSY_WAIT:?} (run={run}, pages_shared={shared}); not touching it"
                ))
            }
            _ => {}
        }
        if interrupted() {
            return Err("interrupted".into());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Unmerges whatever KSM still counts (only our own, now unmapped, guests or
/// stale counts: checked by [`wait_ksm_free`]) and stops ksmd.
pub(crate) fn flush_ksm(ksm: &mut KsmControl) -> Result<(), CommandError> {
    ksm.set("run", "2").map_err(rt)?;
    let res = ksm.wait_until("drop its merged pages", Duration::from_secs(60), |k| {
        Ok::<_, crate::bench::ksm::Error>(k.get_u64("pages_shared")? == 0)
    });
    ksm.set("run", "0").map_err(rt)?;
    res.map_err(rt)
}

/// The kernel's KSM taken for a benchmark run, or why not.
pub(crate) struct Kernel {
    /// The knob guard (`None` when KSM is unavailable or busy).
    pub ksm: Option<KsmControl>,
    /// Why the KSM contenders cannot run (or failed).
    pub error: Option<String>,
    found: Value,
    stale: u64,
}

impl Kernel {
    /// Takes KSM: waits until nobody uses it, drops stale counts, stops ksmd
    /// and turns the advisor off (every knob restored by [`Kernel::finish`]).
    pub fn take(interrupted: &dyn Fn() -> bool) -> Kernel {
        let unavailable = |why: String| Kernel { ksm: None, error: Some(why), found: Value::Null, stale: 0 };
        if !Path::new(KSM_SYSFS).join("run").exists() {
            return unavailable(format!("{KSM_SYSFS} is absent"));
        }
        let mut ksm = match KsmControl::open() {
            Ok(k) => k,
            Err(e) => return unavailable(e.to_string()),
        };
        let stale = match wait_ksm_free(&ksm, interrupted) {
            Ok(n) => n,
            Err(why) => return unavailable(why),
        };
        let knob = |k: &KsmControl, n: &str| k.get(n).ok();
        let found = json!({
            "smart_scan": knob(&ksm, "smart_scan"),
            "use_zero_pages": knob(&ksm, "use_zero_pages"),
            "max_page_sharing": knob(&ksm, "max_page_sharing"),
            "advisor_mode": knob(&ksm, "advisor_mode"),
        });
        let mut prepared = flush_ksm(&mut ksm);
        if prepared.is_ok() {
            prepared = ksm
                .set("run", "0")
                .and_then(|_| {
                    if ksm.has("advisor_mode") && ksm.get("advisor_mode")? != "none" {
                        ksm.set("advisor_mode", "none")?;
                    }
                    Ok(())
                })
                .map_err(rt);
        }
        let error = prepared.err().map(|e| e.to_string());
        Kernel { ksm: Some(ksm), error, found, stale }
    }

    /// The guard when KSM is usable (no error so far).
    pub fn usable(&mut self) -> Option<&mut KsmControl> {
        if self.error.is_some() {
            return None;
        }
        self.ksm.as_mut()
    }

    /// Records the failure of contender `name` (the first error is kept).
    pub fn failed(&mut self, name: &str, e: impl std::fmt::Display) {
        self.error.get_or_insert(format!("{name}: {e}"));
    }

    /// Drops KSM's merged pages after contender `name`.
    pub fn flush_after(&mut self, name: &str) {
        if let Some(k) = self.ksm.as_mut() {
            if let Err(e) = flush_ksm(k) {
                self.error.get_or_insert(format!("after {name}: {e}"));
            }
        }
    }

    /// Restores every knob; returns the JSON account of the kernel's side.
    pub fn finish(mut self) -> Value {
        let restore_error = self.ksm.as_mut().and_then(|k| k.restore().err()).map(|e| e.to_string());
        if let Some(e) = &restore_error {
            tracing::warn!("{e}");
        }
        json!({
            "available": self.error.is_none(),
            "skipped_reason": self.error,
            "stale_pages_shared_at_start": self.stale,
            "settings_found": self.found,
            "settings": "advisor_mode none; smart_scan, use_zero_pages and max_page_sharing as found; \
                         pages_to_scan/sleep_millisecs per policy; run=2 between policies to drop merged pages; \
                         every knob restored afterwards",
            "restore_error": restore_error,
        })
    }
}

/// The kernel's side over the repetitions of a run: KSM is taken for each
/// repetition's kernel contenders only (other densevm processes waiting for the
/// KSM lock get their turn in between), and the first failure ends it.
pub(crate) struct KernelRuns {
    report: Option<Value>,
    error: Option<String>,
}

impl KernelRuns {
    /// The kernel's side, or none when its contenders were not chosen.
    pub fn new(chosen: bool) -> Self {
        KernelRuns { report: None, error: (!chosen).then(|| "not chosen (--policy)".to_string()) }
    }

    /// Takes KSM, runs `f` with it unless it is unusable, and restores it.
    pub fn with(&mut self, interrupted: &dyn Fn() -> bool, f: impl FnOnce(&mut Kernel)) {
        if self.error.is_some() {
            return;
        }
        let mut kernel = Kernel::take(interrupted);
        if kernel.error.is_none() {
            f(&mut kernel);
        }
        let report = kernel.finish();
        if let Some(why) = report["skipped_reason"].as_str() {
            self.error = Some(why.to_string());
        }
        self.report.get_or_insert(report);
    }

    /// The JSON account (the first repetition's settings; available only if no
    /// repetition failed).
    pub fn finish(self) -> Value {
        let mut report = self.report.unwrap_or_else(|| json!({}));
        report["available"] = json!(self.error.is_none());
        report["skipped_reason"] = json!(self.error);
        report
    }
}

/// KSM's `max_page_sharing` (256 when unreadable).
pub(crate) fn max_page_sharing() -> u64 {
    std::fs::read_to_string(Path::new(KSM_SYSFS).join("max_page_sharing"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(256)
}
