//! Giving a VM its balloon: the device on the MMIO bus over the VM's RAM, and
//! the `virtio_mmio.device=` slot of a Linux guest's command line, and the
//! workload guest's balloon step.

use crate::balloon::{BackendMemory, BalloonDevice, BalloonSpec};
use crate::boot::linux::{LinuxBootConfig, VirtioMmioSlot};
use crate::device_manager::{DeviceManager, BALLOON_GSI, BALLOON_MMIO_BASE};
use crate::guest_ram::GuestRam;
use crate::workload::WorkloadGuest;
use vm_memory::GuestMemoryMmap;

use super::{Error, VmSpec};

/// `cfg` with the balloon's slot announced on the command line when `balloon`.
pub(super) fn balloon_slot(cfg: &LinuxBootConfig, balloon: bool) -> LinuxBootConfig {
    let mut cfg = cfg.clone();
    if balloon {
        let size = devices::virtio::mmio::MMIO_LEN;
        cfg.virtio_mmio.push(VirtioMmioSlot { addr: BALLOON_MMIO_BASE, size, irq: BALLOON_GSI });
    }
    cfg
}

/// Adds the balloon of `spec` to `devices`, over `ram`.
pub(super) fn add_balloon(
    devices: &mut DeviceManager,
    balloon: &BalloonSpec,
    spec: &VmSpec,
    ram: &GuestRam,
) -> Result<BalloonDevice, Error> {
    balloon.validate(spec.mem_mib).map_err(|e| Error::Config(e.to_string()))?;
    if ram.size() > BALLOON_MMIO_BASE {
        return Err(Error::Config(format!(
            "a VM with a balloon may have at most {} MiB of RAM (the balloon's registers sit at {BALLOON_MMIO_BASE:#x})",
            BALLOON_MMIO_BASE >> 20
        )));
    }
    let backend = match ram.guest_map() {
        Some(map) => BackendMemory::Managed(map.manager().clone(), map.vm_id()),
        None => BackendMemory::Anonymous { host_addr: ram.host_addr() as usize, size: ram.size() },
    };
    Ok(devices.add_balloon(balloon, ram.memory().clone(), backend)?)
}

/// Has the workload guest drive its balloon (`hold_ms` inflated); the VM must have one.
pub(super) fn workload_balloon(
    guest: &mut WorkloadGuest,
    spec: &VmSpec,
    mem: &GuestMemoryMmap,
    hold_ms: u64,
) -> Result<(), Error> {
    if spec.balloon.is_none() {
        return Err(Error::Config("the scenario's balloon_hold_ms needs a VM with a balloon (--balloon)".into()));
    }
    Ok(guest.enable_balloon(mem, BALLOON_MMIO_BASE, hold_ms)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::linux::cmdline::build_cmdline;

    #[test]
    fn a_linux_guest_with_a_balloon_finds_it_on_its_command_line() {
        let cfg = LinuxBootConfig { cmdline: "quiet".into(), ..LinuxBootConfig::default() };
        assert_eq!(balloon_slot(&cfg, false), cfg);
        let with = balloon_slot(&cfg, true);
        let line = build_cmdline(&with.cmdline, &with.virtio_mmio, 2047).unwrap();
        assert!(line.contains("virtio_mmio.device=4K@0xd0000000:5"), "{line}");
    }
}
