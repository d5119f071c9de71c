//! What a VM is made from and what it reports: its spec (boot source, RAM,
//! serial, merging), lifecycle state and timeline.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::balloon::BalloonSpec;
use crate::boot::linux::LinuxBootConfig;
use crate::guest_ram::RamPolicy;
use crate::workload::scenario::Scenario;

/// Life-cycle state of a VM.
///
/// Also the wire type of a VM's `state` in the HTTP API (the `api` crate
/// re-exports it; its JSON form is the variant name, see [`VmState::as_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(description = "Life-cycle state of a VM."))]
pub enum VmState {
    /// Configured, not started yet.
    Created,
    /// vCPUs are running.
    Running,
    /// vCPUs are paused.
    Paused,
    /// Stopped by a `Stop` action.
    Stopped,
    /// The guest exited by itself (workload done, guest shutdown or failure).
    Exited,
}

impl VmState {
    /// All states, in declaration order.
    pub const ALL: [VmState; 5] =
        [VmState::Created, VmState::Running, VmState::Paused, VmState::Stopped, VmState::Exited];

    /// The state's name as it appears in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Stopped => "Stopped",
            VmState::Exited => "Exited",
        }
    }
}

/// Where the serial console's output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOut {
    /// The process's stdout.
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// Discarded; the workload guest then does not print at all.
    None,
}

/// What the VM boots.
#[derive(Clone, Debug)]
pub enum BootSource {
    /// The embedded workload guest with a scenario.
    Workload(Scenario),
    /// A Linux kernel (one vCPU, RAM below 3 GiB).
    Linux(LinuxBootConfig),
}

/// Everything needed to create a VM.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// VM id.
    pub id: String,
    /// vCPU count.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Boot source.
    pub boot: BootSource,
    /// Serial output.
    pub serial: SerialOut,
    /// How guest RAM is backed.
    pub ram: RamPolicy,
    /// Pause the VM as soon as the workload guest reports its fill done (so that a
    /// test or benchmark can prepare memory before the write loop starts).
    pub pause_after_fill: bool,
    /// Same-page merging of this VM's memory.
    pub merge: MergeSpec,
    /// A virtio-balloon (see [`crate::balloon`]), if any.
    pub balloon: Option<BalloonSpec>,
}

/// A VM's merge settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MergeSpec {
    /// The merger scans this VM (opt-in).
    pub enabled: bool,
    /// Merge domain, declared first ([`crate::host::Host::declare_domain`]): only
    /// VMs of one domain share frames, if its policy merges across VMs (zero
    /// pages excepted). `None`: the VM's own domain.
    pub domain: Option<String>,
}

/// What happened to a VM so far, for reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VmTimeline {
    /// Seconds from creation to start.
    pub start_s: Option<f64>,
    /// Seconds from start until every vCPU reported its fill done.
    pub fill_done_s: Option<f64>,
    /// Seconds from start until the guest finished.
    pub exited_s: Option<f64>,
    /// Why the VM exited (finished, shut down, error).
    pub exit_reason: Option<String>,
    /// Mismatch doorbells seen.
    pub mismatch_events: u64,
}
