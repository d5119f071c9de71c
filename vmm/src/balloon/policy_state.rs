//! The host memory budget policy as the daemon runs it: its settings, the
//! targets it set, its last action, and one step against a [`Host`] (read the
//! pool's use and the VMs' balloons, [`plan`], set the new targets, log).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::policy::{
    band, plan, BalloonPolicyConfig, BalloonPolicyPatch, BalloonTargetChange, Error, PolicyBand, VmInput,
};
use crate::host::Host;
use crate::vm::VmState;

/// What a step changed.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BalloonPolicyAction {
    /// When, in seconds since the Unix epoch.
    pub at_unix_s: f64,
    /// Where the use stood (`over`: targets rose; `under`: they fell).
    pub band: PolicyBand,
    /// The pool's host memory in use then, bytes.
    pub host_bytes_used: u64,
    /// The targets changed.
    pub changes: Vec<BalloonTargetChange>,
}

/// `GET /memory/balloon-policy`: the settings and the policy's state.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BalloonPolicyStatus {
    /// The settings.
    #[serde(flatten)]
    pub config: BalloonPolicyConfig,
    /// The budget in bytes (null: no policy).
    pub host_budget_bytes: Option<u64>,
    /// Host memory the frame pool uses now (`GET /memory`'s `host_bytes_used`).
    pub host_bytes_used: u64,
    /// Where that stands against the budget.
    pub band: PolicyBand,
    /// The balloon targets (MiB) the policy set and still owns, per VM id.
    pub targets_mib: BTreeMap<String, u32>,
    /// Steps that changed targets since the daemon started.
    pub actions: u64,
    /// The last of them.
    pub last_action: Option<BalloonPolicyAction>,
}

/// The policy: settings, owned targets, last action, and when the next step is due.
#[derive(Debug, Default)]
pub struct BalloonPolicy {
    config: BalloonPolicyConfig,
    owned: BTreeMap<String, u32>,
    actions: u64,
    last_action: Option<BalloonPolicyAction>,
    next_due: Option<Instant>,
    /// Per VM: the timestamp of the latest statistics seen and the balloon's
    /// actual size (MiB) when the policy first saw them.
    seen: BTreeMap<String, (f64, u32)>,
}

impl BalloonPolicy {
    /// The settings.
    pub fn config(&self) -> BalloonPolicyConfig {
        self.config
    }

    /// Applies `patch` (all or nothing); the next step is due at once.
    pub fn update(&mut self, patch: &BalloonPolicyPatch) -> Result<BalloonPolicyConfig, Error> {
        let config = patch.apply(&self.config);
        config.validate()?;
        self.config = config;
        self.next_due = None;
        Ok(config)
    }

    /// The settings and state, with the pool's use `host_bytes_used`.
    pub fn status(&self, host_bytes_used: u64) -> BalloonPolicyStatus {
        BalloonPolicyStatus {
            config: self.config,
            host_budget_bytes: self.config.host_budget_mib.map(|m| m.saturating_mul(1 << 20)),
            host_bytes_used,
            band: band(&self.config, host_bytes_used),
            targets_mib: self.owned.clone(),
            actions: self.actions,
            last_action: self.last_action.clone(),
        }
    }

    /// Runs a step on `host` when one is due at `now` (a budget is set and
    /// `interval_ms` elapsed since the last); returns what it changed.
    pub fn tick(&mut self, host: &Host, now: Instant) -> Option<&BalloonPolicyAction> {
        if self.config.host_budget_mib.is_none() || self.next_due.is_some_and(|due| now < due) {
            return None;
        }
        self.next_due = Some(now + Duration::from_millis(self.config.interval_ms.into()));
        let used = host.memory().stats().host_bytes;
        if !self.step(host, used) {
            return None;
        }
        self.last_action.as_ref()
    }

    /// One step with the pool's use `used`; true when targets changed.
    fn step(&mut self, host: &Host, used: u64) -> bool {
        let vms = self.inputs(host);
        // Targets changed by others, and VMs gone or stopped, are no longer ours.
        self.owned.retain(|id, mib| vms.iter().any(|v| &v.id == id && v.target_mib == *mib));
        let p = plan(&self.config, used, &vms, &self.owned);
        let mut done = Vec::with_capacity(p.changes.len());
        for c in p.changes {
            if let Err(e) = host.set_balloon_target(&c.vm_id, c.to_mib) {
                tracing::warn!(vm_id = %c.vm_id, "balloon policy: cannot set the target to {} MiB: {e}", c.to_mib);
                continue;
            }
            if c.to_mib == 0 {
                self.owned.remove(&c.vm_id);
            } else {
                self.owned.insert(c.vm_id.clone(), c.to_mib);
            }
            done.push(c);
        }
        if done.is_empty() {
            return false;
        }
        let summary: Vec<String> =
            done.iter().map(|c| format!("{} {} -> {} MiB", c.vm_id, c.from_mib, c.to_mib)).collect();
        tracing::info!(
            band = ?p.band,
            host_mib_used = used >> 20,
            budget_mib = self.config.host_budget_mib.unwrap_or(0),
            "balloon policy: {}",
            summary.join(", ")
        );
        let at_unix_s = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        self.actions += 1;
        self.last_action = Some(BalloonPolicyAction { at_unix_s, band: p.band, host_bytes_used: used, changes: done });
        true
    }
}

impl BalloonPolicy {
    /// The running VMs with a balloon, as the policy sees them. Statistics are
    /// up to a polling interval old: pages the balloon took since they were
    /// sent (its growth since the policy first saw them) are not free any more.
    fn inputs(&mut self, host: &Host) -> Vec<VmInput> {
        let mib = |pages: u32| pages / super::PAGES_PER_MIB;
        let mut vms = Vec::new();
        for vm in host.vms().filter(|vm| vm.state() == VmState::Running) {
            let Some(b) = vm.balloon() else { continue };
            let info = b.info();
            let actual_mib = mib(info.actual_pages);
            let mut free_mib = None;
            if b.poll_period().is_some() {
                let s = b.statistics();
                let free = s
                    .guest
                    .available_memory
                    .or(s.guest.free_memory)
                    .map(|bytes| u32::try_from(bytes >> 20).unwrap_or(u32::MAX));
                if let (Some(free), Some(at)) = (free, s.updated_at_unix_s) {
                    let seen = self.seen.entry(vm.id().to_string()).or_insert((at, actual_mib));
                    if seen.0 != at {
                        *seen = (at, actual_mib);
                    }
                    free_mib = Some(free.saturating_sub(actual_mib.saturating_sub(seen.1)));
                }
            }
            vms.push(VmInput {
                id: vm.id().to_string(),
                mem_mib: u32::try_from(vm.spec().mem_mib).unwrap_or(u32::MAX),
                target_mib: mib(info.target_pages),
                actual_mib,
                free_mib,
            });
        }
        self.seen.retain(|id, _| vms.iter().any(|v| &v.id == id));
        vms
    }
}
