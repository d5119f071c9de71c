//! Compaction control for the API, from the memory manager's compactor.
//!
//! - `GET|PATCH /memory/compaction`: the compactor's tunables (the API's
//!   `CompactionConfig` is [`memory::CompactionTunables`], its patch a
//!   [`memory::CompactionTunablesPatch`], range-checked once by the API with the
//!   owner's `validate` and again, harmlessly, by the manager).
//! - `PUT /memory/compaction/actions` `Compact`: one pass at full rate
//!   ([`memory::MemoryManager::compact`]), run on a helper thread
//!   (`densevm-compreq`) so the event loop never waits for it; the reply (the
//!   pass's [`memory::CompactionReport`]) is sent from there.
//!
//! One on-demand pass at a time: a `Compact` that arrives while an earlier one
//! still runs is refused at once with 409 (a client that wants a pass retries
//! after the running one ends; a queue of identical passes would only re-walk a
//! packed pool). A proactive (background) pass in progress is not a conflict:
//! the on-demand pass waits for it inside the manager.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use api::types::{CompactionConfig, CompactionConfigPatch};
use api::{ApiError, ApiReply, ReplySender};
use memory::MemoryManager;

/// The compactor's tunables.
pub fn compaction_config(mgr: &MemoryManager) -> CompactionConfig {
    mgr.compaction_tunables()
}

/// Applies `patch` to the compactor's tunables (all or nothing); returns the result.
pub fn patch_compaction_config(
    mgr: &MemoryManager,
    patch: &CompactionConfigPatch,
) -> Result<CompactionConfig, ApiError> {
    mgr.update_compaction(patch).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Runs on-demand passes on helper threads, one at a time.
#[derive(Debug, Default)]
pub struct OnDemand {
    running: Arc<AtomicBool>,
}

/// Marks a pass as running until dropped (also when the helper thread panics).
#[derive(Debug)]
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl OnDemand {
    /// Claims the single on-demand slot, or `None` while a pass runs.
    fn claim(&self) -> Option<Running> {
        self.running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Running(self.running.clone()))
    }

    /// Starts one pass on a helper thread and answers `reply` from there with its
    /// report; answers 409 at once while an earlier pass runs.
    pub fn compact(&self, mgr: &Arc<MemoryManager>, reply: ReplySender) {
        let Some(running) = self.claim() else {
            let _ = reply.send(Err(ApiError::conflict(
                "a compaction pass requested over the API is already running; retry when it has ended",
            )));
            return;
        };
        let mgr = mgr.clone();
        // The closure owns `running` (and `reply`): if the spawn fails both are
        // dropped, which frees the slot and answers 500 ("dropped without answering").
        let spawned = std::thread::Builder::new().name("densevm-compreq".into()).spawn(move || {
            let _running = running;
            let result = match mgr.compact() {
                Ok(report) => {
                    tracing::info!(
                        "Compact: migrated {} pages, returned {} 2 MiB frames ({} -> {} in use, ideal {}) in {:.1} ms",
                        report.pages_migrated,
                        report.frames_2m_returned,
                        report.frames_2m_in_use_before,
                        report.frames_2m_in_use_after,
                        report.ideal_frames_2m,
                        report.duration_ms
                    );
                    Ok(ApiReply::CompactionReport(report))
                }
                Err(e) => Err(ApiError::internal(format!("Compact: {e}"))),
            };
            let _ = reply.send(result);
        });
        if let Err(e) = spawned {
            tracing::error!("cannot spawn the compaction request thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::{Duration, Instant};

    use super::*;
    use memory::ManagerConfig;

    #[test]
    fn tunables_round_trip() {
        let t = CompactionConfig { enabled: false, proactiveness: 5, max_pages_per_s: 300 };
        // The wire form is the tunables' own serde form.
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#"{"enabled":false,"proactiveness":5,"max_pages_per_s":300}"#);
        assert_eq!(serde_json::from_str::<CompactionConfig>(&json).unwrap(), t);
        // A value too large for the tunable is a bad request, not a wrap-around.
        let too_large = format!(r#"{{"proactiveness": {}}}"#, u64::from(u32::MAX) + 1);
        assert!(serde_json::from_str::<CompactionConfigPatch>(&too_large).is_err());
    }

    /// Polls `try_recv` until the reply comes (at most a minute).
    fn wait(mut try_recv: impl FnMut() -> Option<Result<ApiReply, ApiError>>) -> Result<ApiReply, ApiError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(r) = try_recv() {
                return r;
            }
            assert!(Instant::now() < deadline, "no reply within a minute");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Against a real (empty) manager: tunables, a pass answered from the helper
    /// thread, and 409 while the on-demand slot is taken.
    #[test]
    fn passes_one_at_a_time() {
        let mgr = match MemoryManager::new(ManagerConfig::with_capacity(16 << 20)) {
            Ok(m) => m,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "SKIPPED: memory manager unavailable: {e}");
                return;
            }
        };
        assert_eq!(compaction_config(&mgr), CompactionConfig::default());
        let patch = CompactionConfigPatch { enabled: Some(false), proactiveness: Some(0), ..Default::default() };
        let now = patch_compaction_config(&mgr, &patch).unwrap();
        assert_eq!(now, CompactionConfig { enabled: false, proactiveness: 0, ..CompactionConfig::default() });
        assert_eq!(compaction_config(&mgr), now);
        let bad = CompactionConfigPatch { max_pages_per_s: Some(0), enabled: Some(true), ..Default::default() };
        let e = patch_compaction_config(&mgr, &bad).unwrap_err();
        assert_eq!(e.kind, api::ErrorKind::BadRequest);
        assert!(e.fault_message.contains("max_pages_per_s"), "{}", e.fault_message);
        assert_eq!(compaction_config(&mgr), now, "an invalid patch changes nothing");

        let on_demand = OnDemand::default();
        let held = on_demand.claim().unwrap();
        let (reply, mut rx) = ReplySender::new();
        on_demand.compact(&mgr, reply);
        let e = wait(|| rx.try_recv().ok()).unwrap_err();
        assert_eq!(e.kind, api::ErrorKind::Conflict);
        assert!(e.fault_message.contains("already running"), "{}", e.fault_message);
        drop(held);

        let (reply, mut rx) = ReplySender::new();
        on_demand.compact(&mgr, reply);
        match wait(|| rx.try_recv().ok()) {
            Ok(ApiReply::CompactionReport(r)) => {
                assert_eq!((r.pages_migrated, r.frames_2m_returned, r.failures.total()), (0, 0, 0), "{r:?}");
            }
            other => panic!("{other:?}"),
        }
        // The slot is free again once the thread has answered.
        let deadline = Instant::now() + Duration::from_secs(10);
        while on_demand.claim().is_none() {
            assert!(Instant::now() < deadline, "the on-demand slot stayed taken");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(mgr.compaction_stats().passes, 1);
    }
}
