//! `densevm run`: one microVM until its guest finishes.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::CommandError;
use crate::cli::RunArgs;
use crate::seccomp::Kind;
use vmm::boot::linux::LinuxBootConfig;
use vmm::device_manager::{GUEST_POWER_OFF, GUEST_RESET};
use vmm::driver::{drive, lock};
use vmm::guest_ram::RamPolicy;
use vmm::host::{Host, HostConfig};
use vmm::scenarios;
use vmm::vm::{BootSource, MergeSpec, SerialOut, Vm, VmSpec, VmState, VmTimeline, WORKLOAD_FINISHED};
use vmm::workload::abi::WorkloadReport;

/// The final report of one VM (printed as one JSON line).
#[derive(Debug, Serialize)]
pub struct VmSummary {
    /// VM id.
    pub vm_id: String,
    /// Final state.
    pub state: VmState,
    /// Timeline.
    pub timeline: VmTimeline,
    /// Workload report, when the VM ran the workload guest.
    pub report: Option<WorkloadReport>,
}

impl VmSummary {
    /// Summarizes `vm`.
    pub fn of(vm: &Vm) -> Self {
        VmSummary {
            vm_id: vm.id().to_string(),
            state: vm.state(),
            timeline: vm.timeline().clone(),
            report: vm.workload_report(),
        }
    }

    /// True when the guest ended without error and verified every page: the
    /// workload finished, or a Linux guest powered off or asked for a reset
    /// (densevm does not reboot guests).
    pub fn ok(&self) -> bool {
        let clean_exit = match &self.timeline.exit_reason {
            Some(r) => [WORKLOAD_FINISHED, GUEST_POWER_OFF, GUEST_RESET].contains(&r.as_str()),
            None => self.state == VmState::Stopped,
        };
        clean_exit && self.report.is_none_or(|r| r.mismatches == 0) && self.timeline.mismatch_events == 0
    }
}

/// Parses `--serial`.
pub fn serial_out(arg: &str) -> SerialOut {
    match arg {
        "stdout" => SerialOut::Stdout,
        "none" => SerialOut::None,
        path => SerialOut::File(path.into()),
    }
}

fn spec_from_args(args: &RunArgs) -> Result<VmSpec, CommandError> {
    let boot = match (&args.workload, &args.kernel) {
        (Some(w), None) => BootSource::Workload(scenarios::load(w).map_err(|e| CommandError::Input(e.to_string()))?),
        (None, Some(kernel)) => BootSource::Linux(LinuxBootConfig {
            kernel: kernel.clone(),
            initrd: args.initrd.clone(),
            cmdline: args.cmdline.clone().unwrap_or_default(),
            virtio_mmio: Vec::new(),
            system_map: args.system_map.clone(),
        }),
        (None, None) => BootSource::Workload(scenarios::builtin("quick").unwrap_or_default()),
        (Some(_), Some(_)) => return Err(CommandError::Input("--workload and --kernel exclude each other".into())),
    };
    let mem_mib = match (&boot, args.mem_mib) {
        (_, Some(m)) => m,
        (BootSource::Workload(s), None) => vmm::workload::mem_mib(s.fill_mib),
        (BootSource::Linux(_), None) => 256,
    };
    Ok(VmSpec {
        id: args.id.clone(),
        vcpus: args.vcpus,
        mem_mib,
        boot,
        serial: serial_out(&args.serial),
        ram: RamPolicy::Managed,
        pause_after_fill: false,
        merge: MergeSpec { enabled: args.merge, domain: None },
        balloon: args.balloon,
    })
}

/// Runs `densevm run`.
pub fn main(args: RunArgs, process_start: Instant) -> Result<ExitCode, CommandError> {
    let spec = spec_from_args(&args)?;
    let id = spec.id.clone();
    let filters = crate::seccomp::Filters::build(args.seccomp).map_err(|e| CommandError::Runtime(e.to_string()))?;
    vmm::vcpu::set_thread_start_hook(filters.hook(Kind::Vcpu));
    let mut host = Host::new_hooked(HostConfig::default(), Some(filters.memory_hook()))?;
    host.handle_termination_signals()?;
    if spec.merge.enabled {
        host.memory()
            .merger()
            .set_tunables(memory::Tunables { merge_zero_pages: true, ..memory::Tunables::full_speed() })
            .map_err(|e| CommandError::Runtime(format!("merger: {e}")))?;
    }
    host.create_vm(spec)?;
    // This thread drives the VM from here on (the vCPU threads inherit its filter).
    filters.install(Kind::Vmm).map_err(|e| CommandError::Runtime(e.to_string()))?;
    host.start_all()?;
    let host = Arc::new(Mutex::new(host));
    let mut reported = false;
    drive(host.clone(), Duration::from_millis(20), None, |h| {
        if reported {
            return;
        }
        if let Some(at) = h.vm(&id).ok().and_then(Vm::first_report_at) {
            reported = true;
            // Deliberate user output, not a log line: `densevm bench launch` (bench/mod.rs)
            // and the e2e tests wait for this exact line on stderr and parse the time
            // from it, so it must appear whatever the log level, filter or format.
            // A closed stderr must not panic the run (eprintln! would).
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "densevm: first guest report {:.2} ms after process start",
                at.duration_since(process_start).as_secs_f64() * 1e3
            );
        }
    })?;
    let h = lock(&host);
    let vm = h.vm(&id)?;
    let summary = VmSummary::of(vm);
    let mut value = serde_json::to_value(&summary).map_err(|e| CommandError::Runtime(e.to_string()))?;
    if let (Some(at), Some(obj)) = (vm.first_report_at(), value.as_object_mut()) {
        obj.insert("first_report_ms".into(), serde_json::json!(at.duration_since(process_start).as_secs_f64() * 1e3));
    }
    if let Some(obj) = value.as_object_mut() {
        let stats = serde_json::to_value(h.memory().stats()).map_err(|e| CommandError::Runtime(e.to_string()))?;
        obj.insert("host_memory".into(), stats);
    }
    if let (Some(b), Some(obj)) = (vm.balloon(), value.as_object_mut()) {
        let balloon = serde_json::json!({ "info": b.info(), "statistics": b.statistics(), "counters": b.report() });
        obj.insert("balloon".into(), balloon);
    }
    let line = value.to_string();
    println!("{line}");
    if let Some(path) = &args.report {
        std::fs::write(path, format!("{line}\n"))
            .map_err(|e| CommandError::Runtime(format!("writing {}: {e}", path.display())))?;
    }
    Ok(if summary.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
