//! The bridge from the HTTP API to the [`Host`]: turns each [`ApiAction`] into Host and
//! Vm calls and builds the reply.
//!
//! It runs on the VMM's event-loop thread (see `commands::serve`), so it may touch the
//! Host freely; it never waits for an HTTP client (replies go through the non-blocking
//! [`ReplySender`]); the slow requests are answered from helper threads: `GET /`
//! (host facts gathered once in the background, [`facts`]), `UnmergeAll` (the
//! merger's unmerge-all waits until every page is private, [`memory`]), `Compact`
//! (one compaction pass, one at a time, [`compaction`]), `GET /memory` (the
//! manager's lock may be held long by another thread, [`stats`]), and `PUT /vms/{id}` and
//! `DELETE /vms/{id}` (the VM is built or freed on a worker thread and finished
//! here when the loop is woken through [`ApiBridge::wake_fd`], [`lifecycle`]).
//! The host memory budget policy of the balloons ([`balloon_policy`]) lives here
//! too: the daemon's event loop calls [`ApiBridge::tick`] to step it.
//! The merge domain requests go to the Host's registry ([`domains`]).
//! What the Host does not keep lives here: the API configuration each VM was created
//! with (`GET /vms/{id}` returns it).

mod balloon;
mod balloon_policy;
mod compaction;
mod domains;
mod facts;
mod lifecycle;
mod memory;
mod report;

use std::collections::BTreeMap;
use std::path::PathBuf;

use api::types::{BootSource as ApiBoot, CompactionActionType, MergeActionType, VmActionType, VmConfig, VmInfo};
use api::{ApiAction, ApiError, ApiReply, ApiRequest, ReplySender};
use event_manager::EventOps;

use vmm::boot::linux::LinuxBootConfig;
use vmm::error_kind::ErrorKind;
use vmm::guest_ram::RamPolicy;
use vmm::host::{self, Host};
use vmm::vm::{BootSource, MergeSpec, SerialOut, Vm, VmSpec, VmState};
use vmm_sys_util::eventfd::EventFd;

pub use facts::HostFacts;

/// Answers API requests against a [`Host`].
pub struct ApiBridge {
    facts: HostFacts,
    configs: BTreeMap<String, VmConfig>,
    compaction: compaction::OnDemand,
    policy: vmm::balloon::BalloonPolicy,
    workers: lifecycle::Workers,
}

impl ApiBridge {
    /// A bridge with no VMs; starts gathering the host facts of `GET /` in the background
    /// (the ring-0 probe takes a while on some hosts).
    pub fn new() -> std::io::Result<Self> {
        Ok(ApiBridge {
            facts: HostFacts::gather_in_background(),
            configs: BTreeMap::new(),
            compaction: compaction::OnDemand::default(),
            policy: vmm::balloon::BalloonPolicy::default(),
            workers: lifecycle::Workers::new()?,
        })
    }

    /// Readable when a VM built or freed off the event loop is ready to be
    /// finished ([`ApiBridge::finish_workers`]); register it with the event loop.
    pub fn wake_fd(&self) -> &EventFd {
        self.workers.wake_fd()
    }

    /// Finishes on `host` the VMs the worker threads built or freed, and answers
    /// their requests. New VMs join the event loop at the Host's next
    /// `register_new`.
    pub fn finish_workers(&mut self, host: &mut Host) {
        for done in self.workers.take_done() {
            match done {
                lifecycle::Done::Created { id, config, result, reply, started } => {
                    let result = match host.finish_create(&id, *result) {
                        Ok(()) => {
                            log_created(&id, &config, started);
                            self.configs.insert(id, config);
                            Ok(ApiReply::Empty)
                        }
                        Err(e) => Err(host_error(e)),
                    };
                    send(reply, "PutVm", result);
                }
                lifecycle::Done::Deleted { id, reply, started } => {
                    host.finish_remove(&id);
                    tracing::info!(vm_id = %id, "deleted in {} ms", started.elapsed().as_millis());
                    send(reply, "DeleteVm", Ok(ApiReply::Empty));
                }
            }
        }
    }

    /// Answers with 503 the requests whose VMs the workers finished but the
    /// event loop did not (the daemon is going away; those VMs are dropped).
    pub fn refuse_finished(&mut self) {
        for done in self.workers.take_done() {
            let reply = match done {
                lifecycle::Done::Created { reply, .. } | lifecycle::Done::Deleted { reply, .. } => reply,
            };
            let _ = reply.send(Err(ApiError::unavailable("densevm is shutting down")));
        }
    }

    /// Runs the periodic work the bridge owns when due: a step of the balloon
    /// budget policy.
    pub fn tick(&mut self, host: &Host) {
        balloon_policy::tick(&mut self.policy, host);
    }

    /// Carries out `req` and sends its answer. State-changing requests are carried out
    /// even when the client is gone. `ops` are the event-loop operations of the
    /// subscriber that owns the Host's fds (needed to unregister a deleted VM).
    pub fn serve(&mut self, host: &mut Host, req: ApiRequest, ops: Option<&mut EventOps>) {
        let ApiRequest { action, reply } = req;
        let action = match action {
            ApiAction::PutVm { vm_id, config } => return self.create_vm(host, vm_id, config, reply),
            ApiAction::DeleteVm(id) => return self.delete_vm(host, &id, ops, reply),
            other => other,
        };
        let Some(reply) = self.answer_later(host, &action, reply) else { return };
        let name = action.name();
        let result = self.answer(host, action, ops);
        send(reply, name, result);
    }

    /// Hands the slow requests to the threads that answer them; gives the reply
    /// back for every other request.
    fn answer_later(&self, host: &Host, action: &ApiAction, reply: ReplySender) -> Option<ReplySender> {
        match action {
            // Answered now if the facts are ready, else by the gathering thread.
            ApiAction::GetInfo => self.facts.reply(reply),
            ApiAction::MergeAction(MergeActionType::UnmergeAll) => memory::unmerge_all(host.memory(), reply),
            ApiAction::CompactionAction(CompactionActionType::Compact) => self.compaction.compact(host.memory(), reply),
            _ => return Some(reply),
        }
        None
    }

    fn answer(&mut self, host: &mut Host, action: ApiAction, ops: Option<&mut EventOps>) -> Result<ApiReply, ApiError> {
        if let Some(result) = domains::answer(host, &action) {
            return result;
        }
        match action {
            ApiAction::GetInfo
            | ApiAction::MergeAction(_)
            | ApiAction::CompactionAction(_)
            | ApiAction::PutVm { .. }
            | ApiAction::DeleteVm(_) => Err(ApiError::internal("this request is answered by a helper thread")),
            ApiAction::ListVms => Ok(ApiReply::Vms(host.vms().map(|vm| self.vm_info(vm)).collect())),
            ApiAction::GetVm(id) => Ok(ApiReply::Vm(Box::new(self.vm_info(host.vm(&id).map_err(host_error)?)))),
            ApiAction::VmAction { vm_id, action } => {
                vm_action(host.vm_mut(&vm_id).map_err(host_error)?, action)?;
                tracing::info!(vm_id = %vm_id, "{action:?}");
                Ok(ApiReply::Empty)
            }
            ApiAction::GetVmMemory(id) => {
                let vm = host.vm(&id).map_err(host_error)?;
                memory::vm_stats(host.memory(), vm).map(ApiReply::VmMemory)
            }
            // `serve` reads these on the API's threads (api::HostStatsReader); an API
            // server without a reader asks here: lock-free, so the loop never waits.
            ApiAction::GetMemory => Ok(ApiReply::Memory(Box::new(memory::host_stats(host.memory())))),
            ApiAction::GetMergeConfig => Ok(ApiReply::MergeConfig(memory::merge_config(host.memory()))),
            ApiAction::PatchMergeConfig(patch) => {
                let c = memory::patch_merge_config(host.memory(), &patch)?;
                tracing::info!("merge settings now {c:?}");
                Ok(ApiReply::MergeConfig(c))
            }
            ApiAction::GetCompactionConfig => {
                Ok(ApiReply::CompactionConfig(compaction::compaction_config(host.memory())))
            }
            ApiAction::PatchCompactionConfig(patch) => {
                let c = compaction::patch_compaction_config(host.memory(), &patch)?;
                tracing::info!("compaction settings now {c:?}");
                Ok(ApiReply::CompactionConfig(c))
            }
            ApiAction::PutBalloon { vm_id, spec } => {
                let config = match self.configs.get(&vm_id) {
                    Some(c) => c.clone(),
                    None => config_of(host.vm(&vm_id).map_err(host_error)?.spec()),
                };
                let config = balloon::put(host, ops, &vm_id, &config, spec)?;
                self.configs.insert(vm_id, config);
                Ok(ApiReply::Empty)
            }
            ApiAction::PatchBalloon { vm_id, amount_mib } => {
                balloon::patch(host, &vm_id, amount_mib)?;
                // GET /vms/{id} shows the current target, as GET .../balloon does.
                if let Some(b) = self.configs.get_mut(&vm_id).and_then(|c| c.balloon.as_mut()) {
                    b.amount_mib = amount_mib;
                }
                Ok(ApiReply::Empty)
            }
            ApiAction::GetBalloon(id) => balloon::get(host, &id),
            ApiAction::GetBalloonPolicy => Ok(balloon_policy::get(&self.policy, host)),
            ApiAction::PatchBalloonPolicy(patch) => balloon_policy::patch(&mut self.policy, host, &patch),
            ApiAction::GetBalloonStatistics(id) => balloon::statistics(host, &id),
            ApiAction::PutDomain { .. }
            | ApiAction::ListDomains
            | ApiAction::GetDomain(_)
            | ApiAction::DeleteDomain(_) => Err(ApiError::internal("domain requests are answered by domains::answer")),
            ApiAction::PatchBalloonStatistics { vm_id, stats_polling_interval_s } => {
                balloon::patch_statistics(host, &vm_id, stats_polling_interval_s)?;
                if let Some(b) = self.configs.get_mut(&vm_id).and_then(|c| c.balloon.as_mut()) {
                    b.stats_polling_interval_s = stats_polling_interval_s;
                }
                Ok(ApiReply::Empty)
            }
        }
    }

    /// Admits the VM on the Host and has a worker build it; the answer is sent
    /// when the worker is done ([`ApiBridge::finish_workers`]).
    fn create_vm(&mut self, host: &mut Host, vm_id: String, config: VmConfig, reply: ReplySender) {
        if host.vm(&vm_id).is_ok() {
            let e = ApiError::conflict(format!("a VM with id {vm_id} already exists"));
            return send(reply, "PutVm", Err(e));
        }
        let creation = vm_spec(&vm_id, &config).and_then(|spec| host.begin_create(spec).map_err(host_error));
        match creation {
            Ok(creation) => self.workers.create(creation, config, reply),
            Err(e) => send(reply, "PutVm", Err(e)),
        }
    }

    /// Takes the VM out of the Host (and the event loop) and has a worker stop
    /// and free it; the answer is sent when the worker is done.
    fn delete_vm(&mut self, host: &mut Host, id: &str, ops: Option<&mut EventOps>, reply: ReplySender) {
        match host.begin_remove(id, ops) {
            Ok(removal) => {
                self.configs.remove(id);
                self.workers.delete(removal, reply);
            }
            Err(e) => send(reply, "DeleteVm", Err(host_error(e))),
        }
    }

    fn vm_info(&self, vm: &Vm) -> VmInfo {
        let config = self.configs.get(vm.id()).cloned().unwrap_or_else(|| config_of(vm.spec()));
        VmInfo {
            vm_id: vm.id().to_string(),
            state: vm.state(),
            config,
            workload: report::workload_report(vm),
            exit_reason: vm.timeline().exit_reason.clone(),
        }
    }
}

/// Sends `result` as the answer to the `name` request, logging internal errors.
fn send(reply: ReplySender, name: &str, result: Result<ApiReply, ApiError>) {
    if let Err(e) = &result {
        if e.kind == api::ErrorKind::Internal {
            tracing::error!("{name} failed: {}", e.fault_message);
        }
    }
    // False when the client gave up; the action was carried out anyway.
    let _ = reply.send(result);
}

/// Logs a VM created over the API.
fn log_created(vm_id: &str, config: &VmConfig, started: std::time::Instant) {
    tracing::info!(
        vm_id = %vm_id,
        "created in {} ms: {} vCPU(s), {} MiB, {}",
        started.elapsed().as_millis(),
        config.vcpu_count,
        config.mem_size_mib,
        match &config.boot {
            ApiBoot::Workload(s) => format!("workload guest filling {} MiB", s.fill_mib),
            ApiBoot::Kernel(k) => format!("kernel {}", k.kernel_image_path),
        }
    );
}

/// Builds the VMM's spec of a VM from its API configuration.
pub fn vm_spec(vm_id: &str, config: &VmConfig) -> Result<VmSpec, ApiError> {
    if config.memory_image_path.is_some() {
        return Err(ApiError::bad_request("memory_image_path is not supported yet"));
    }
    let (boot, serial) = match &config.boot {
        // The workload guest reports through its report page; its console stays quiet.
        ApiBoot::Workload(s) => (BootSource::Workload(s.clone()), SerialOut::None),
        // A kernel's console goes to the daemon's stdout.
        ApiBoot::Kernel(k) => (
            BootSource::Linux(LinuxBootConfig {
                kernel: PathBuf::from(&k.kernel_image_path),
                initrd: k.initrd_path.as_ref().map(PathBuf::from),
                cmdline: k.boot_args.clone().unwrap_or_default(),
                virtio_mmio: Vec::new(),
                system_map: None,
            }),
            SerialOut::Stdout,
        ),
    };
    Ok(VmSpec {
        id: vm_id.to_string(),
        vcpus: config.vcpu_count,
        mem_mib: u64::from(config.mem_size_mib),
        boot,
        serial,
        ram: RamPolicy::Managed,
        pause_after_fill: false,
        merge: config
            .merge
            .as_ref()
            .map(|m| MergeSpec { enabled: m.enabled, domain: m.domain.clone() })
            .unwrap_or_default(),
        balloon: config.balloon,
    })
}

/// The API configuration equivalent to `spec` (for VMs not created over the API).
fn config_of(spec: &VmSpec) -> VmConfig {
    let boot = match &spec.boot {
        BootSource::Workload(s) => ApiBoot::Workload(s.clone()),
        BootSource::Linux(l) => ApiBoot::Kernel(api::types::KernelBoot {
            kernel_image_path: l.kernel.display().to_string(),
            initrd_path: l.initrd.as_ref().map(|p| p.display().to_string()),
            boot_args: Some(l.cmdline.clone()),
        }),
    };
    VmConfig {
        vcpu_count: spec.vcpus,
        mem_size_mib: u32::try_from(spec.mem_mib).unwrap_or(u32::MAX),
        boot,
        memory_image_path: None,
        merge: Some(api::types::MergeSettings { enabled: spec.merge.enabled, domain: spec.merge.domain.clone() }),
        balloon: spec.balloon,
    }
}

/// Carries out a VM action; a state that does not allow it is a conflict (409).
fn vm_action(vm: &mut Vm, action: VmActionType) -> Result<(), ApiError> {
    let r = match action {
        VmActionType::InstanceStart => vm.start(),
        VmActionType::Pause => vm.pause(),
        VmActionType::Resume => vm.resume(),
        VmActionType::Stop => {
            if matches!(vm.state(), VmState::Stopped | VmState::Exited) {
                return Err(ApiError::conflict(format!("VM {} is {:?}; cannot stop", vm.id(), vm.state())));
            }
            vm.stop();
            Ok(())
        }
    };
    r.map_err(|e| host_error(host::Error::Vm(e)))
}

/// Maps a Host error onto the API's error classes (by its [`ErrorKind`]).
pub fn host_error(e: host::Error) -> ApiError {
    let msg = e.to_string();
    match e.kind() {
        ErrorKind::InvalidInput | ErrorKind::UnbootableKernel => ApiError::bad_request(msg),
        ErrorKind::NotFound => ApiError::not_found(msg),
        ErrorKind::Conflict => ApiError::conflict(msg),
        ErrorKind::Internal => ApiError::internal(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::types::KernelBoot;
    use vmm::vm;
    use vmm::workload::scenario::Scenario;

    fn workload(mem: u32) -> VmConfig {
        VmConfig {
            vcpu_count: 2,
            mem_size_mib: mem,
            boot: ApiBoot::Workload(Scenario { fill_mib: 4, ..Scenario::default() }),
            memory_image_path: None,
            merge: None,
            balloon: None,
        }
    }

    #[test]
    fn specs_from_configs() {
        let s = vm_spec("a", &workload(16)).unwrap();
        assert_eq!((s.vcpus, s.mem_mib, s.serial.clone()), (2, 16, SerialOut::None));
        assert!(matches!(s.boot, BootSource::Workload(ref w) if w.fill_mib == 4));
        let mut k = workload(64);
        k.boot = ApiBoot::Kernel(KernelBoot {
            kernel_image_path: "/k".into(),
            initrd_path: Some("/i".into()),
            boot_args: Some("console=ttyS0".into()),
        });
        let s = vm_spec("b", &k).unwrap();
        match &s.boot {
            BootSource::Linux(l) => {
                assert_eq!(l.kernel, PathBuf::from("/k"));
                assert_eq!(l.initrd, Some(PathBuf::from("/i")));
                assert_eq!(l.cmdline, "console=ttyS0");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(config_of(&s).boot, k.boot);
        let mut img = workload(16);
        img.memory_image_path = Some("/img".into());
        let e = vm_spec("c", &img).unwrap_err();
        assert_eq!(e.kind, api::ErrorKind::BadRequest);
        assert_eq!(e.fault_message, "memory_image_path is not supported yet");
    }

    #[test]
    fn error_classes() {
        let st = host::Error::Vm(vm::Error::State { id: "a".into(), state: VmState::Running, what: "start" });
        assert_eq!(host_error(st).kind, api::ErrorKind::Conflict);
        assert_eq!(host_error(host::Error::NoSuchVm("a".into())).kind, api::ErrorKind::NotFound);
        assert_eq!(host_error(host::Error::Exists("a".into())).kind, api::ErrorKind::Conflict);
        assert_eq!(host_error(host::Error::Vm(vm::Error::Config("x".into()))).kind, api::ErrorKind::BadRequest);
        assert_eq!(host_error(host::Error::Io("x".into())).kind, api::ErrorKind::Internal);
        let kernel = vmm::boot::linux::Error::UnknownKernelFormat(PathBuf::from("/k"));
        assert_eq!(host_error(host::Error::Vm(vm::Error::Linux(kernel))).kind, api::ErrorKind::BadRequest);
        // The API's VM state is the VMM's: its JSON name is the variant's name.
        for s in [VmState::Created, VmState::Running, VmState::Paused, VmState::Stopped, VmState::Exited] {
            assert_eq!(serde_json::to_value(s).unwrap(), format!("{s:?}"));
            assert_eq!(s.as_str(), format!("{s:?}"));
        }
    }
}
