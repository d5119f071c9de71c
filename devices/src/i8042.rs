//! The i8042 controller: only what a guest needs to request a reset (0xfe to port
//! 0x64), as in Firecracker.

use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// Base port (0x60..=0x64, data at +0, command/status at +4).
pub const I8042_PORT: u64 = 0x60;
/// Number of ports.
pub const I8042_PORTS: u64 = 5;

/// The i8042 device; its reset trigger fires when the guest asks for a reset.
pub struct I8042 {
    dev: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// Creates the device with `reset` as the reset-request trigger.
    pub fn new(reset: EventFdTrigger) -> Self {
        I8042 { dev: I8042Device::new(reset) }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.dev.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            let _ = self.dev.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_fires_the_trigger() {
        let reset = EventFdTrigger::new().unwrap();
        let mut dev = I8042::new(reset.clone());
        dev.write(4, &[0xfe]);
        assert_eq!(reset.event_fd().read().unwrap(), 1);
    }
}
