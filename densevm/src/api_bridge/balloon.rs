//! The balloon requests of the API (`/vms/{vm_id}/balloon[/statistics]`) as Host
//! calls.
//!
//! A VM's devices are built when it is created (`PUT /vms/{vm_id}`), so the
//! balloon is normally part of that body. `PUT /vms/{vm_id}/balloon` on a VM that
//! is created but not started rebuilds the VM with the balloon (nothing ran in it
//! yet, so nothing is lost); once the VM started it answers 409, as Firecracker
//! refuses to configure a balloon after boot.

use api::types::{Balloon, BalloonSpec, BalloonStatistics, VmConfig};
use api::{ApiError, ApiReply};
use event_manager::EventOps;
use vmm::balloon::Error as BalloonError;
use vmm::host::{self, Host};
use vmm::vm::VmState;

use super::{host_error, vm_spec};

/// Maps a Host error of a balloon request: the balloon's own refusals (no
/// balloon, a target larger than the VM, statistics off) are the request's fault
/// (400, as in Firecracker); the rest as usual.
fn balloon_error(e: host::Error) -> ApiError {
    match e {
        host::Error::Balloon(b @ (BalloonError::NoBalloon(_) | BalloonError::TooLarge { .. })) => {
            ApiError::bad_request(b.to_string())
        }
        host::Error::Balloon(BalloonError::Device(d)) => ApiError::bad_request(d.to_string()),
        other => host_error(other),
    }
}

/// `PUT /vms/{vm_id}/balloon`: gives the `Created` VM `vm_id` (whose API
/// configuration is `config`) the balloon `spec` by rebuilding it; returns the new
/// configuration. On failure the VM is rebuilt as it was.
pub fn put(
    host: &mut Host,
    ops: Option<&mut EventOps>,
    vm_id: &str,
    config: &VmConfig,
    spec: BalloonSpec,
) -> Result<VmConfig, ApiError> {
    let vm = host.vm(vm_id).map_err(host_error)?;
    if vm.state() != VmState::Created {
        return Err(ApiError::conflict(format!(
            "VM {vm_id} is {:?}: a balloon is configured before the VM starts (PUT /vms/{{vm_id}} with a \
             `balloon` object, or PUT /vms/{{vm_id}}/balloon before InstanceStart); PATCH changes its target",
            vm.state()
        )));
    }
    spec.validate(u64::from(config.mem_size_mib)).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut new_config = config.clone();
    new_config.balloon = Some(spec);
    let new_spec = vm_spec(vm_id, &new_config)?;
    let old_spec = vm_spec(vm_id, config)?;
    host.remove_vm(vm_id, ops).map_err(host_error)?;
    if let Err(e) = host.create_vm(new_spec) {
        let e = host_error(e);
        if let Err(restore) = host.create_vm(old_spec) {
            tracing::error!(vm_id, "cannot rebuild the VM without its new balloon: {restore}");
        }
        return Err(e);
    }
    tracing::info!(vm_id, "balloon configured: {spec:?}");
    Ok(new_config)
}

/// `PATCH /vms/{vm_id}/balloon`.
pub fn patch(host: &Host, vm_id: &str, amount_mib: u32) -> Result<ApiReply, ApiError> {
    host.set_balloon_target(vm_id, amount_mib).map_err(balloon_error)?;
    tracing::info!(vm_id, "balloon target {amount_mib} MiB");
    Ok(ApiReply::Empty)
}

/// `GET /vms/{vm_id}/balloon`.
pub fn get(host: &Host, vm_id: &str) -> Result<ApiReply, ApiError> {
    let info = host.balloon_info(vm_id).map_err(balloon_error)?;
    let counters = host.balloon_report(vm_id).map_err(balloon_error)?;
    Ok(ApiReply::Balloon(Box::new(Balloon { info, counters })))
}

/// `GET /vms/{vm_id}/balloon/statistics`: 400 when the balloon has no statistics.
pub fn statistics(host: &Host, vm_id: &str) -> Result<ApiReply, ApiError> {
    let info = host.balloon_info(vm_id).map_err(balloon_error)?;
    if info.spec.stats_polling_interval_s == 0 {
        return Err(ApiError::bad_request(format!(
            "VM {vm_id}: statistics are not enabled on its balloon (it was created with \
             stats_polling_interval_s 0)"
        )));
    }
    let stats: BalloonStatistics = host.balloon_statistics(vm_id).map_err(balloon_error)?;
    Ok(ApiReply::BalloonStatistics(Box::new(stats)))
}

/// `PATCH /vms/{vm_id}/balloon/statistics`.
pub fn patch_statistics(host: &Host, vm_id: &str, seconds: u16) -> Result<ApiReply, ApiError> {
    host.set_balloon_stats_interval(vm_id, seconds).map_err(balloon_error)?;
    tracing::info!(vm_id, "balloon statistics every {seconds} s");
    Ok(ApiReply::Empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_classes() {
        let none = host::Error::Balloon(BalloonError::NoBalloon("a".into()));
        assert_eq!(balloon_error(none).kind, api::ErrorKind::BadRequest);
        let big = host::Error::Balloon(BalloonError::TooLarge { amount_mib: 9, mem_mib: 8 });
        assert_eq!(balloon_error(big).kind, api::ErrorKind::BadRequest);
        assert_eq!(balloon_error(host::Error::NoSuchVm("a".into())).kind, api::ErrorKind::NotFound);
    }
}
