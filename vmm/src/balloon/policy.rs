//! The host memory budget policy of the balloons (`GET|PATCH
//! /memory/balloon-policy`): with a budget set, densevm compares the host memory
//! its guests use (the frame pool's `host_bytes_used`, as `GET /memory` reports
//! it) with the budget every `interval_ms`.
//!
//! - Over the budget, it raises the balloon targets of the VMs with the most free
//!   guest memory until the use falls to the middle of the band
//!   `[budget - margin, budget]`: at most `max_step_mib` MiB per step over all
//!   VMs, spread over the largest givers (their free memory is levelled down). A VM's free memory is its balloon statistics'
//!   `available_memory` (else `free_memory`) less the part of its target the guest
//!   has not inflated yet; a VM without statistics counts by its unballooned size.
//!   Every VM keeps [`RESERVE_DIVISOR`]-th of its RAM out of the balloon.
//! - More than `margin_mib` below the budget, it lowers the targets it raised,
//!   the VMs with the least free memory first, at most `max_step_mib` per step and
//!   never by more than the room below `budget - margin` (a guest may touch every
//!   page it gets back).
//! - In between it does nothing (the hysteresis keeps it from oscillating).
//!
//! The policy owns only the targets it set: a target changed by someone else
//! (`PATCH /vms/{id}/balloon`) is left alone from then on, until the policy
//! raises it again. [`plan`] is the pure decision (inputs: budget, use, per-VM
//! free memory and targets; output: new targets); [`BalloonPolicy`] keeps the
//! settings, the targets it set and its last action.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// A MiB in bytes.
const MIB: u64 = 1 << 20;
/// Largest budget accepted, MiB (16 TiB).
pub const MAX_BUDGET_MIB: u64 = 16 << 20;
/// Largest `max_step_mib`.
pub const MAX_STEP_MIB: u32 = 65536;
/// Shortest `interval_ms` (the daemon's event loop checks at least every 200 ms).
pub const MIN_INTERVAL_MS: u32 = 200;
/// Longest `interval_ms` (10 minutes).
pub const MAX_INTERVAL_MS: u32 = 600_000;
/// Largest `margin_mib`.
pub const MAX_MARGIN_MIB: u32 = 65536;
/// A VM keeps `mem / RESERVE_DIVISOR` of its RAM out of the balloon.
pub const RESERVE_DIVISOR: u32 = 16;

/// Errors of the policy's settings.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A setting lies outside its range.
    #[error("{field}: must be in {min}..={max}, got {value}")]
    OutOfRange {
        /// The setting.
        field: &'static str,
        /// Its value.
        value: u64,
        /// Smallest accepted.
        min: u64,
        /// Largest accepted.
        max: u64,
    },
}

/// The policy's settings (`GET /memory/balloon-policy` shows them with the state).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BalloonPolicyConfig {
    /// Host memory for guest memory in MiB (the frame pool's `host_bytes_used`);
    /// null: no policy (targets it set stay as they are).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 16777216))]
    pub host_budget_mib: Option<u64>,
    /// Largest change of all balloon targets together per step, in MiB.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 65536))]
    pub max_step_mib: u32,
    /// Milliseconds between steps.
    #[cfg_attr(feature = "openapi", schema(minimum = 200, maximum = 600000))]
    pub interval_ms: u32,
    /// Targets are lowered only when the use is more than this below the budget (MiB).
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 65536))]
    pub margin_mib: u32,
}

impl Default for BalloonPolicyConfig {
    fn default() -> Self {
        BalloonPolicyConfig { host_budget_mib: None, max_step_mib: 128, interval_ms: 1000, margin_mib: 64 }
    }
}

fn check(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), Error> {
    if value < min || value > max {
        return Err(Error::OutOfRange { field, value, min, max });
    }
    Ok(())
}

impl BalloonPolicyConfig {
    /// Checks every setting's range.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(b) = self.host_budget_mib {
            check("host_budget_mib", b, 1, MAX_BUDGET_MIB)?;
        }
        check("max_step_mib", self.max_step_mib.into(), 1, MAX_STEP_MIB.into())?;
        check("interval_ms", self.interval_ms.into(), MIN_INTERVAL_MS.into(), MAX_INTERVAL_MS.into())?;
        check("margin_mib", self.margin_mib.into(), 0, MAX_MARGIN_MIB.into())
    }
}

/// `Some(None)` for an explicit null, `Some(Some(v))` for a value; absent
/// fields stay `None` through `#[serde(default)]`.
fn nullable<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(d).map(Some)
}

/// Body of `PATCH /memory/balloon-policy`: the settings to change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BalloonPolicyPatch {
    /// New budget in MiB, or null to turn the policy off.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>, minimum = 1, maximum = 16777216))]
    pub host_budget_mib: Option<Option<u64>>,
    /// New largest change per step, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 65536))]
    pub max_step_mib: Option<u32>,
    /// New interval between steps, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 200, maximum = 600000))]
    pub interval_ms: Option<u32>,
    /// New hysteresis margin, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 65536))]
    pub margin_mib: Option<u32>,
}

impl BalloonPolicyPatch {
    /// `config` with the patch applied.
    pub fn apply(&self, config: &BalloonPolicyConfig) -> BalloonPolicyConfig {
        BalloonPolicyConfig {
            host_budget_mib: self.host_budget_mib.unwrap_or(config.host_budget_mib),
            max_step_mib: self.max_step_mib.unwrap_or(config.max_step_mib),
            interval_ms: self.interval_ms.unwrap_or(config.interval_ms),
            margin_mib: self.margin_mib.unwrap_or(config.margin_mib),
        }
    }

    /// Checks the ranges of the fields present.
    pub fn validate(&self) -> Result<(), Error> {
        let full = BalloonPolicyConfig { host_budget_mib: None, ..BalloonPolicyConfig::default() };
        self.apply(&full).validate()
    }
}

/// Where the host's use stands against the budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum PolicyBand {
    /// No budget: the policy is off.
    Off,
    /// Over the budget: targets rise.
    Over,
    /// Within the margin below the budget: nothing changes.
    Within,
    /// More than the margin below the budget: the targets the policy set fall.
    Under,
}

/// What the policy knows of a running VM with a balloon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmInput {
    /// The VM's id.
    pub id: String,
    /// Its RAM in MiB.
    pub mem_mib: u32,
    /// Its balloon target in MiB.
    pub target_mib: u32,
    /// The size its driver reports, MiB.
    pub actual_mib: u32,
    /// Free guest memory from its statistics (`available_memory`, else
    /// `free_memory`), MiB; None without statistics.
    pub free_mib: Option<u32>,
}

impl VmInput {
    /// MiB the policy may still add to this VM's target.
    fn givable_mib(&self) -> u32 {
        let reserve = self.mem_mib.div_ceil(RESERVE_DIVISOR);
        let ceiling = self.mem_mib.saturating_sub(reserve).saturating_sub(self.target_mib);
        match self.free_mib {
            Some(free) => {
                let pending = self.target_mib.saturating_sub(self.actual_mib);
                free.saturating_sub(pending).saturating_sub(reserve).min(ceiling)
            }
            None => ceiling,
        }
    }

    /// Free memory for ordering the VMs (MiB): the statistics' figure, else the
    /// unballooned size.
    fn free_for_order(&self) -> u32 {
        self.free_mib.unwrap_or(self.mem_mib.saturating_sub(self.target_mib))
    }
}

/// A target the policy changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BalloonTargetChange {
    /// The VM.
    pub vm_id: String,
    /// Its target before, MiB.
    pub from_mib: u32,
    /// Its new target, MiB.
    pub to_mib: u32,
}

/// The decision of one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Where the use stood.
    pub band: PolicyBand,
    /// The targets to change (empty: nothing to do, or nothing possible).
    pub changes: Vec<BalloonTargetChange>,
}

/// Decides one step: `used_bytes` of host memory against `config`'s budget, the
/// running VMs with a balloon in `vms`, and `owned`, the targets (MiB) the policy
/// set and still owns (a VM's current target equal to it).
pub fn plan(config: &BalloonPolicyConfig, used_bytes: u64, vms: &[VmInput], owned: &BTreeMap<String, u32>) -> Plan {
    let band = band(config, used_bytes);
    let (Some(budget_mib), margin) = (config.host_budget_mib, u64::from(config.margin_mib) * MIB) else {
        return Plan { band, changes: Vec::new() };
    };
    let budget = budget_mib.saturating_mul(MIB);
    let step = u64::from(config.max_step_mib);
    let changes = match band {
        // Aim at the middle of the band.
        PolicyBand::Over => inflate(vms, (used_bytes - budget.saturating_sub(margin / 2)).div_ceil(MIB).min(step)),
        PolicyBand::Under => deflate(vms, owned, ((budget - margin - used_bytes) / MIB).min(step)),
        PolicyBand::Off | PolicyBand::Within => Vec::new(),
    };
    Plan { band, changes }
}

/// Where `used_bytes` stands against `config`'s budget.
pub fn band(config: &BalloonPolicyConfig, used_bytes: u64) -> PolicyBand {
    let Some(budget_mib) = config.host_budget_mib else {
        return PolicyBand::Off;
    };
    let budget = budget_mib.saturating_mul(MIB);
    if used_bytes > budget {
        PolicyBand::Over
    } else if used_bytes.saturating_add(u64::from(config.margin_mib) * MIB) < budget {
        PolicyBand::Under
    } else {
        PolicyBand::Within
    }
}

/// Raises targets by `need` MiB in all, taken from the VMs that can give most:
/// their givable memory is levelled down (water-filling), so a small step is
/// spread over the freest VMs instead of landing on one.
fn inflate(vms: &[VmInput], need: u64) -> Vec<BalloonTargetChange> {
    let mut order: Vec<(&VmInput, u64)> =
        vms.iter().map(|v| (v, u64::from(v.givable_mib()))).filter(|(_, g)| *g > 0).collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.id.cmp(&b.0.id)));
    // The level L the top k VMs come down to: sum(g_i - L) = need.
    let (mut k, mut sum) = (0, 0u64);
    let mut level = 0;
    while k < order.len() {
        sum += order[k].1;
        k += 1;
        let next = order.get(k).map_or(0, |o| o.1);
        if sum - next * k as u64 >= need {
            level = (sum - need).div_ceil(k as u64);
            break;
        }
    }
    let mut left = need;
    let mut takes: Vec<u64> = order[..k].iter().map(|(_, g)| g.saturating_sub(level)).collect();
    left -= takes.iter().sum::<u64>().min(left);
    // Rounding: one more MiB from the first VMs (each still gives at most its givable).
    for (t, (_, g)) in takes.iter_mut().zip(&order) {
        if left == 0 {
            break;
        }
        if *t < *g {
            *t += 1;
            left -= 1;
        }
    }
    order[..k]
        .iter()
        .zip(takes)
        .filter(|(_, t)| *t > 0)
        .map(|((vm, _), t)| BalloonTargetChange {
            vm_id: vm.id.clone(),
            from_mib: vm.target_mib,
            // `t` is at most `givable_mib`, a u32.
            to_mib: vm.target_mib.saturating_add(u32::try_from(t).unwrap_or(u32::MAX)),
        })
        .collect()
}

/// Lowers the targets the policy owns by `room` MiB in all, the VMs with the
/// least free memory first.
fn deflate(vms: &[VmInput], owned: &BTreeMap<String, u32>, mut room: u64) -> Vec<BalloonTargetChange> {
    let mut order: Vec<&VmInput> =
        vms.iter().filter(|v| v.target_mib > 0 && owned.get(&v.id) == Some(&v.target_mib)).collect();
    order.sort_by(|a, b| a.free_for_order().cmp(&b.free_for_order()).then_with(|| a.id.cmp(&b.id)));
    let mut changes = Vec::new();
    for vm in order {
        if room == 0 {
            break;
        }
        let give = u64::from(vm.target_mib).min(room);
        room -= give;
        let to = vm.target_mib - u32::try_from(give).unwrap_or(vm.target_mib);
        changes.push(BalloonTargetChange { vm_id: vm.id.clone(), from_mib: vm.target_mib, to_mib: to });
    }
    changes
}
