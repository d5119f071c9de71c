//! The sleep control and status registers of a HW-reduced ACPI guest (ACPI 6.5,
//! §4.8.3.7–§4.8.3.8): how a guest's OSPM powers the machine off. Linux writes
//! `SLP_TYP << 2 | SLP_EN` to the sleep control register, with `SLP_TYP` read
//! from the DSDT's `\_S5_` package; densevm then stops the VM (as Cloud
//! Hypervisor's ACPI shutdown device does). Without this register a guest's
//! `poweroff` only halts its CPUs and the VM never ends.
//!
//! One byte-wide I/O port serves as both registers (the FADT points both
//! there). Reads return 0: no wake status ever (the VM is gone after S5).
//! Other sleep states are not offered (the DSDT has only `\_S5_`); a write of
//! one is ignored and logged once.

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// The I/O port of the sleep control and status registers.
pub const SLEEP_CONTROL_PORT: u64 = 0x600;
/// Ports it takes.
pub const SLEEP_CONTROL_PORTS: u64 = 1;
/// The `SLP_TYP` value of S5 (soft off): the DSDT's `\_S5_` package gives it.
pub const S5_SLEEP_TYPE: u8 = 5;
/// `SLP_EN`: the write enters the sleep state in `SLP_TYP`.
const SLP_EN: u8 = 1 << 5;
/// `SLP_TYP` field (bits 2..=4).
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The sleep control register; its trigger fires when the guest enters S5.
pub struct AcpiSleepControl {
    power_off: EventFdTrigger,
    warned: bool,
}

impl AcpiSleepControl {
    /// Creates the register with `power_off` as the S5 trigger.
    pub fn new(power_off: EventFdTrigger) -> Self {
        AcpiSleepControl { power_off, warned: false }
    }
}

impl BusDevice for AcpiSleepControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let [value] = data else { return };
        if value & SLP_EN == 0 {
            return; // clearing WAK_STS, or a write without effect
        }
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if sleep_type == S5_SLEEP_TYPE {
            if let Err(e) = vm_superio::Trigger::trigger(&self.power_off) {
                tracing::error!("ACPI power-off request lost: {e}");
            }
        } else if !self.warned {
            self.warned = true;
            tracing::warn!("guest asked for ACPI sleep type {sleep_type}; only S5 (power off) is supported");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fired(t: &EventFdTrigger) -> bool {
        t.event_fd().read().is_ok()
    }

    #[test]
    fn s5_with_slp_en_fires_the_trigger() {
        let t = EventFdTrigger::new().unwrap();
        let mut dev = AcpiSleepControl::new(t.clone());
        dev.write(0, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT | SLP_EN]);
        assert!(fired(&t));
    }

    #[test]
    fn other_writes_do_not_power_off() {
        let t = EventFdTrigger::new().unwrap();
        let mut dev = AcpiSleepControl::new(t.clone());
        // Clearing WAK_STS (Linux writes it first), S5 without SLP_EN, S3 with SLP_EN,
        // a two-byte write.
        for data in [&[0x80u8][..], &[S5_SLEEP_TYPE << SLP_TYP_SHIFT], &[3 << SLP_TYP_SHIFT | SLP_EN], &[0x34, 0]] {
            dev.write(0, data);
        }
        assert!(!fired(&t));
        let mut buf = [0xffu8; 2];
        dev.read(0, &mut buf);
        assert_eq!(buf, [0, 0], "no wake status");
    }
}
