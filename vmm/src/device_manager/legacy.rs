//! The legacy devices every VM has: the COM1 serial console, the i8042 (for
//! guest-initiated reset) and the ACPI sleep control register (for
//! guest-initiated power-off).

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::acpi_sleep::{AcpiSleepControl, SLEEP_CONTROL_PORT, SLEEP_CONTROL_PORTS};
use devices::i8042::{I8042, I8042_PORT, I8042_PORTS};
use devices::serial::{SerialConsole, COM1_IRQ, COM1_PORT};
use devices::trigger::EventFdTrigger;

use super::events::{PowerOffRequest, ResetRequest};
use super::{DeviceManager, Error};
use crate::vm::SerialOut;

/// Ports of the 16550 at COM1.
pub const COM1_PORTS: u64 = 8;

fn serial_writer(out: &SerialOut) -> Result<Box<dyn Write + Send>, Error> {
    Ok(match out {
        SerialOut::Stdout => Box::new(std::io::stdout()),
        SerialOut::File(p) => {
            Box::new(File::create(p).map_err(|e| Error::Io(format!("serial log {}", p.display()), e))?)
        }
        SerialOut::None => Box::new(std::io::sink()),
    })
}

impl DeviceManager {
    /// Adds the COM1 console writing to `out`; its interrupt is an irqfd on IRQ 4
    /// when the VM has an interrupt controller.
    pub(crate) fn add_serial(&mut self, out: &SerialOut) -> Result<(), Error> {
        let writer = serial_writer(out)?;
        let irq = if self.eventfds.irqchip() {
            self.eventfds.register_irqfd(COM1_IRQ)?
        } else {
            EventFdTrigger::new().map_err(|e| Error::EventFd("serial interrupt".into(), e))?
        };
        let serial = SerialConsole::new(irq, writer);
        self.register_pio(Arc::new(Mutex::new(serial)), COM1_PORT, COM1_PORTS)
    }

    /// Adds the i8042; the VM exits when the guest asks it for a reset.
    pub(crate) fn add_i8042(&mut self) -> Result<(), Error> {
        let reset = EventFdTrigger::new().map_err(|e| Error::EventFd("i8042 reset".into(), e))?;
        self.register_pio(Arc::new(Mutex::new(I8042::new(reset.clone()))), I8042_PORT, I8042_PORTS)?;
        self.subscribe("i8042", Box::new(ResetRequest(reset.clone())))?;
        self.reset = Some(reset);
        Ok(())
    }

    /// Adds the ACPI sleep control register (the FADT points the guest there);
    /// the VM exits when the guest powers off (S5).
    pub(crate) fn add_acpi_sleep_control(&mut self) -> Result<(), Error> {
        let power_off = EventFdTrigger::new().map_err(|e| Error::EventFd("ACPI power-off".into(), e))?;
        let dev = AcpiSleepControl::new(power_off.clone());
        self.register_pio(Arc::new(Mutex::new(dev)), SLEEP_CONTROL_PORT, SLEEP_CONTROL_PORTS)?;
        self.subscribe("acpi-sleep", Box::new(PowerOffRequest(power_off)))?;
        Ok(())
    }
}
