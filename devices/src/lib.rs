//! densevm devices: the port-I/O and MMIO buses, the 16550 serial console and the
//! i8042 controller (used for guest-initiated reset). virtio devices come later.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod trigger;

pub use bus::{BusDevice, MmioBus, PioBus, SharedDevice};
