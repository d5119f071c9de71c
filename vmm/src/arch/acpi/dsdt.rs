//! The DSDT's AML: the devices of a Linux guest the kernel cannot find by
//! itself, all under `\_SB_`:
//!
//! - `COM1` (`PNP0501`): the 16550 at ports 0x3f8..0x3ff, IRQ 4;
//! - `PS2_` (`PNP0303`): the i8042 (data port 0x60, command port 0x64, IRQ 1),
//!   kept so the kernel's i8042 driver sees the controller it probed before;
//! - `VRnn` (`LNRO0005`, `nn` the device's index in hex): one per virtio-mmio
//!   device, its register window (`Memory32Fixed`) and interrupt; Linux's
//!   virtio-mmio platform driver matches this ID (the only way kernels without
//!   `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, such as Debian's, find them).
//!
//! and, at the root, `\_S5_`: the sleep type of S5 (soft off) that the guest
//! writes to the FADT's sleep control register to power off
//! ([`devices::acpi_sleep`]); with it, Linux's `poweroff` ends the VM.
//!
//! Every interrupt is an extended interrupt descriptor: a GSI, i.e. an IOAPIC
//! pin (the MADT puts the IOAPIC's GSI base at 0), edge-triggered and active
//! high, as densevm's irqfds pulse the line; no interrupt is shared.

use acpi_tables::{aml, Aml};
use devices::acpi_sleep::S5_SLEEP_TYPE;

use super::{Error, VirtioMmioSlot, IOAPIC_PINS};

/// Ports of the 16550 at COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of ports of the 16550.
pub const COM1_PORT_LEN: u8 = 8;
/// COM1's interrupt (ISA IRQ 4, IOAPIC pin 4).
pub const COM1_GSI: u32 = 4;
/// The i8042's data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The i8042's command/status port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The i8042's keyboard interrupt (ISA IRQ 1).
pub const I8042_GSI: u32 = 1;
/// ACPI hardware ID of a virtio-mmio device (Linaro's, matched by Linux's
/// `virtio_mmio` driver).
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// Largest number of virtio-mmio devices the DSDT can name (`VR00`..`VRFF`).
pub const MAX_VIRTIO_DEVICES: usize = 256;

/// An edge-triggered, active-high, exclusive interrupt consumed by the device.
fn interrupt(gsi: u32) -> aml::Interrupt {
    aml::Interrupt::new(true, true, false, false, gsi)
}

/// Checks `slot` can be described: a non-empty window below 4 GiB (the
/// descriptor is 32-bit) on an IOAPIC pin, not the pin of a legacy device.
fn check_slot(slot: &VirtioMmioSlot) -> Result<(u32, u32), Error> {
    let bad = |why: &'static str| Error::BadVirtioDevice { addr: slot.addr, size: slot.size, irq: slot.irq, why };
    if slot.size == 0 {
        return Err(bad("its window is empty"));
    }
    let end = slot.addr.checked_add(slot.size).ok_or_else(|| bad("its window overflows"))?;
    if end > 1 << 32 {
        return Err(bad("its window does not lie below 4 GiB"));
    }
    if slot.irq >= IOAPIC_PINS {
        return Err(bad("its interrupt is not an IOAPIC pin (0..24)"));
    }
    if slot.irq == COM1_GSI || slot.irq == I8042_GSI || slot.irq == 0 || slot.irq == 2 {
        return Err(bad("its interrupt is taken (0 timer, 1 i8042, 2 cascade, 4 COM1)"));
    }
    // Both fit in 32 bits: checked above.
    Ok((slot.addr as u32, slot.size as u32))
}

/// The AML of the DSDT's body (everything after its header) describing COM1,
/// the i8042 and `virtio` (in order, named `VR00`, `VR01`, ...).
pub fn dsdt_body(virtio: &[VirtioMmioSlot]) -> Result<Vec<u8>, Error> {
    if virtio.len() > MAX_VIRTIO_DEVICES {
        return Err(Error::TooManyVirtioDevices(virtio.len()));
    }
    let mut windows = Vec::with_capacity(virtio.len());
    for (i, slot) in virtio.iter().enumerate() {
        windows.push((i, check_slot(slot)?, slot.irq));
    }

    let com1_irq = interrupt(COM1_GSI);
    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, COM1_PORT_LEN);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_uid: u8 = 0;
    let com1_ddn = "COM1";
    let com1_children: [(&str, &dyn Aml); 4] =
        [("_HID", &com1_hid), ("_UID", &com1_uid), ("_DDN", &com1_ddn), ("_CRS", &com1_crs)];
    let com1_names: Vec<aml::Name> = com1_children.iter().map(|(n, v)| aml::Name::new((*n).into(), *v)).collect();
    let com1 = aml::Device::new("COM1".into(), com1_names.iter().map(|n| n as &dyn Aml).collect());

    let kbd_data = aml::IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1);
    let kbd_cmd = aml::IO::new(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1);
    let kbd_irq = interrupt(I8042_GSI);
    let kbd_crs = aml::ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]);
    let kbd_hid = aml::EISAName::new("PNP0303");
    let kbd_names = [aml::Name::new("_HID".into(), &kbd_hid), aml::Name::new("_CRS".into(), &kbd_crs)];
    let ps2 = aml::Device::new("PS2_".into(), kbd_names.iter().map(|n| n as &dyn Aml).collect());

    // Each virtio device's objects, built first so the devices can borrow them.
    let hid = VIRTIO_MMIO_HID;
    let parts: Vec<(String, u8, aml::Memory32Fixed, aml::Interrupt)> = windows
        .iter()
        .map(|&(i, (base, len), irq)| {
            // i < MAX_VIRTIO_DEVICES (256), checked above.
            let uid = i as u8;
            (format!("VR{uid:02X}"), uid, aml::Memory32Fixed::new(true, base, len), interrupt(irq))
        })
        .collect();
    let crs: Vec<aml::ResourceTemplate> =
        parts.iter().map(|(_, _, mem, irq)| aml::ResourceTemplate::new(vec![mem, irq])).collect();
    let names: Vec<[aml::Name; 4]> = parts
        .iter()
        .zip(&crs)
        .map(|((_, uid, _, _), crs)| {
            [
                aml::Name::new("_HID".into(), &hid),
                aml::Name::new("_UID".into(), uid),
                // Cache-coherent DMA (always so on x86; Firecracker says it too).
                aml::Name::new("_CCA".into(), &aml::ONE),
                aml::Name::new("_CRS".into(), crs),
            ]
        })
        .collect();
    let devices: Vec<aml::Device> = parts
        .iter()
        .zip(&names)
        .map(|((name, ..), objs)| aml::Device::new(name.as_str().into(), objs.iter().map(|n| n as &dyn Aml).collect()))
        .collect();

    let mut children: Vec<&dyn Aml> = vec![&com1, &ps2];
    children.extend(devices.iter().map(|d| d as &dyn Aml));
    let sb = aml::Scope::new("\\_SB_".into(), children);
    let mut body = Vec::new();
    sb.to_aml_bytes(&mut body);
    // S5 (soft off) is the one sleep state: its SLP_TYP for the sleep control register.
    let s5_type = S5_SLEEP_TYPE;
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&s5_type])).to_aml_bytes(&mut body);
    Ok(body)
}
