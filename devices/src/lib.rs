//! densevm devices: the port-I/O and MMIO buses, the 16550 serial console, the
//! i8042 controller (used for guest-initiated reset), the ACPI sleep control
//! register (guest-initiated power-off), and virtio: the virtio-mmio
//! transport and the virtio-balloon device model ([`virtio`]).

pub mod acpi_sleep;
pub mod bus;
pub mod i8042;
pub mod serial;
pub mod trigger;
pub mod virtio;

pub use bus::{BusDevice, MmioBus, PioBus, SharedDevice};
