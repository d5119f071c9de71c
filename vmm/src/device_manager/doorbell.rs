//! The workload guest's MMIO doorbell: one 64-bit register through which the guest
//! sleeps, reports progress and prints console lines (see `workload::abi`).
//!
//! Unlike bus devices it is served on the ringing vCPU's thread without a lock: a
//! sleep blocks only that vCPU, and "done" ends that vCPU's loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::serial::COM1_PORT;
use devices::PioBus;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::control::{RunMode, VcpuEvent, VmControl};
use crate::workload::abi;

/// Longest idle wait a guest may request in one doorbell.
pub const MAX_GUEST_SLEEP: Duration = Duration::from_secs(1);
/// Bytes of guest-physical space the doorbell register takes.
pub const DOORBELL_LEN: u64 = 8;

/// What the vCPU loop does after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Run the guest again.
    Resume,
    /// Leave the vCPU loop.
    Stop,
}

/// The doorbell of one workload VM.
pub struct WorkloadDoorbell {
    gpa: u64,
    control: Arc<VmControl>,
    memory: GuestMemoryMmap,
    pause_after_fill: bool,
}

impl WorkloadDoorbell {
    /// A doorbell at `gpa` reporting to `control`, reading console lines from
    /// `memory`; with `pause_after_fill` a fill-done report pauses the whole VM
    /// (benchmarks and tests prepare memory states between fill and write loop).
    pub fn new(gpa: u64, control: Arc<VmControl>, memory: GuestMemoryMmap, pause_after_fill: bool) -> Self {
        WorkloadDoorbell { gpa, control, memory, pause_after_fill }
    }

    /// Guest-physical address of the register.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Serves a write of `data` by vCPU `vcpu`; console lines go to the COM1 port of
    /// `pio`.
    pub(crate) fn ring(&self, vcpu: u32, data: &[u8], pio: &PioBus) -> ExitAction {
        let mut word = [0u8; 8];
        let n = data.len().min(8);
        word[..n].copy_from_slice(&data[..n]);
        let word = u64::from_le_bytes(word);
        let cmd = (word & 0xff) as u8;
        let arg = word >> 8;
        match cmd {
            abi::DB_SLEEP_US => {
                self.control.sleep(Duration::from_micros(arg).min(MAX_GUEST_SLEEP));
            }
            abi::DB_FILL_DONE => {
                if self.pause_after_fill {
                    self.control.set_mode(RunMode::Pause);
                }
                self.control.push_event(VcpuEvent::FillDone { vcpu, at: Instant::now() });
            }
            abi::DB_MISMATCH => self.control.push_event(VcpuEvent::Mismatch { vcpu, page: arg }),
            abi::DB_PUTS => {
                let mut line = [0u8; abi::MAX_LINE];
                if self.memory.read_slice(&mut line, GuestAddress(arg)).is_ok() {
                    let len = line.iter().position(|b| *b == 0).unwrap_or(line.len());
                    for b in &line[..len] {
                        // COM1 is always on the bus; a write to it is always claimed.
                        pio.write(COM1_PORT, &[*b]);
                    }
                }
            }
            abi::DB_DONE => {
                self.control.push_event(VcpuEvent::Done { vcpu });
                return ExitAction::Stop;
            }
            _ => {}
        }
        ExitAction::Resume
    }
}

/// Holds the doorbell's range on the MMIO bus (so no device can be placed over it):
/// the router serves writes to the register itself; any other access here reads
/// all-ones and is ignored, as before the bus existed.
pub(crate) struct DoorbellReservation;

impl devices::BusDevice for DoorbellReservation {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}
