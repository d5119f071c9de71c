//! The 16550A serial console (vm-superio) at COM1.

use std::io::Write;

use vm_superio::Serial;

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// COM1 base port.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;

/// A serial console writing its output to `W`.
pub struct SerialConsole {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    /// Creates a console whose interrupt is `trigger` and whose output goes to `out`.
    pub fn new(trigger: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        SerialConsole { serial: Serial::new(trigger, out) }
    }

    /// Queues guest input bytes (the host's stdin).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.serial.enqueue_raw_bytes(bytes).map(|_| ()).map_err(|e| format!("serial input: {e:?}"))
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            // An output error (closed log file) must not stop the guest.
            let _ = self.serial.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_written_to_thr() {
        let sink = Sink::default();
        let mut s = SerialConsole::new(EventFdTrigger::new().unwrap(), Box::new(sink.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty bit set");
    }
}
