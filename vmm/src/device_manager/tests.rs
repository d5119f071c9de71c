//! Tests of the device manager: routing of I/O exits, unclaimed-access accounting,
//! the doorbell, and (where /dev/kvm works) irqfd and ioeventfd registration.

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::serial::{SerialConsole, COM1_PORT};
use devices::BusDevice;
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::control::{VcpuEvent, VmControl};
use crate::workload::abi;

/// A device that remembers what it was written and reads back 0x5a.
#[derive(Default)]
struct Reg(Vec<(u64, Vec<u8>)>);
impl BusDevice for Reg {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.push((offset, data.to_vec()));
    }
}

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

fn skip(what: &str) {
    // Not through the test harness's captured stdout: say it on the real stderr.
    let _ = writeln!(std::io::stderr(), "SKIPPED {what}: /dev/kvm not usable");
}

#[test]
fn router_dispatches_claimed_accesses_and_counts_unclaimed_ones() {
    let mut io = IoRouter::new("t");
    let reg = Arc::new(Mutex::new(Reg::default()));
    io.mmio.insert(reg.clone(), 0xd000_0000, 0x100).unwrap();
    io.pio.insert(reg.clone(), 0x70, 2).unwrap();

    let mut word = [0u8; 4];
    io.mmio_read(0xd000_00fc, &mut word);
    assert_eq!(word, [0x5a; 4]);
    assert_eq!(io.mmio_write(0, 0xd000_0010, &[1, 2, 3, 4]), ExitAction::Resume);
    io.pio_write(0x71, &[7]);
    assert_eq!(io.unclaimed(), UnclaimedIo::default(), "claimed accesses are not counted");

    // Unclaimed: reads are all-ones, writes go nowhere; each is counted.
    io.mmio_read(0xd000_0100, &mut word);
    assert_eq!(word, [0xff; 4]);
    assert_eq!(io.mmio_write(1, 0xfee0_0000, &[1]), ExitAction::Resume);
    assert_eq!(io.mmio_write(1, 0xd000_00fe, &[1, 2, 3, 4]), ExitAction::Resume, "crosses the end");
    let mut b = [0u8; 1];
    io.pio_read(0x80, &mut b);
    assert_eq!(b, [0xff]);
    io.pio_write(0x80, &[0]);
    io.pio_write(0x80, &[0]);
    assert_eq!(io.unclaimed(), UnclaimedIo { pio_reads: 1, pio_writes: 2, mmio_reads: 1, mmio_writes: 2 });
    assert_eq!(io.unclaimed().total(), 6);
    assert_eq!(reg.lock().unwrap().0, vec![(0x10, vec![1, 2, 3, 4]), (1, vec![7])]);

    // Far more than the logged few are still counted.
    for _ in 0..LOGGED_UNCLAIMED * 4 {
        io.mmio_read(0, &mut word);
    }
    assert_eq!(io.unclaimed().mmio_reads, 1 + LOGGED_UNCLAIMED * 4);
}

#[test]
fn doorbell_reports_prints_and_stops_the_vcpu() {
    const GPA: u64 = 1 << 30;
    let control = VmControl::new().unwrap();
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    memory.write_slice(b"hello\0", GuestAddress(0x2000)).unwrap();
    let mut io = IoRouter::new("t");
    let sink = Sink::default();
    let serial = SerialConsole::new(devices::trigger::EventFdTrigger::new().unwrap(), Box::new(sink.clone()));
    io.pio.insert(Arc::new(Mutex::new(serial)), COM1_PORT, COM1_PORTS).unwrap();
    io.mmio.insert(Arc::new(Mutex::new(doorbell::DoorbellReservation)), GPA, DOORBELL_LEN).unwrap();
    io.doorbell = Some(WorkloadDoorbell::new(GPA, control.clone(), memory, false));
    let ring = |cmd: u8, arg: u64| io.mmio_write(3, GPA, &(u64::from(cmd) | (arg << 8)).to_le_bytes());

    assert!(io.is_doorbell(GPA) && !io.is_doorbell(GPA + 4));
    assert_eq!(ring(abi::DB_PUTS, 0x2000), ExitAction::Resume);
    assert_eq!(&*sink.0.lock().unwrap(), b"hello");
    assert_eq!(ring(abi::DB_MISMATCH, 42), ExitAction::Resume);
    assert_eq!(ring(abi::DB_DONE, 0), ExitAction::Stop);
    assert_eq!(control.take_events(), vec![VcpuEvent::Mismatch { vcpu: 3, page: 42 }, VcpuEvent::Done { vcpu: 3 }]);
    // The rest of the doorbell's range is claimed (reads all-ones, as before the bus).
    let mut half = [0u8; 4];
    io.mmio_read(GPA + 4, &mut half);
    assert_eq!(half, [0xff; 4]);
    assert_eq!(io.mmio_write(0, GPA + 4, &[0; 4]), ExitAction::Resume);
    assert_eq!(io.unclaimed(), UnclaimedIo::default());
}

fn workload_devices(vm_fd: Arc<VmFd>) -> DeviceManager {
    let control = VmControl::new().unwrap();
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let mut dm = DeviceManager::new(vm_fd, "wl", false);
    dm.add_boot_devices(&SerialOut::None, Some(WorkloadDoorbell::new(1 << 30, control, memory, false))).unwrap();
    dm
}

#[test]
fn boot_devices_route_exits_and_count_unclaimed_mmio() {
    let Ok(kvm) = Kvm::new() else { return skip("boot_devices_route_exits_and_count_unclaimed_mmio") };
    let dm = workload_devices(Arc::new(kvm.create_vm().unwrap()));
    assert_eq!(dm.io().pio.ranges().collect::<Vec<_>>(), vec![(0x60, 5), (0x3f8, 8), (0x600, 1)]);
    assert_eq!(dm.io().mmio.ranges().collect::<Vec<_>>(), vec![(1 << 30, DOORBELL_LEN)]);
    assert_eq!(dm.event_fds().count(), 2, "the i8042's reset request and the ACPI power-off");

    // An MMIO access nobody claims (e.g. a probe of the IOAPIC's address) is counted.
    let mut data = [0u8; 4];
    dm.io().mmio_read(0xfec0_0000, &mut data);
    assert_eq!(data, [0xff; 4]);
    assert_eq!(dm.io().mmio_write(0, 0xfec0_0010, &[1, 0, 0, 0]), ExitAction::Resume);
    assert_eq!(dm.unclaimed(), UnclaimedIo { mmio_reads: 1, mmio_writes: 1, ..Default::default() });
    // The serial's line status register is there.
    let mut lsr = [0u8];
    dm.io().pio_read(0x3fd, &mut lsr);
    assert_ne!(lsr[0] & 0x20, 0);
    assert_eq!(dm.unclaimed().total(), 2);
}

#[test]
fn i8042_reset_request_becomes_a_device_notice() {
    let Ok(kvm) = Kvm::new() else { return skip("i8042_reset_request_becomes_a_device_notice") };
    let mut dm = workload_devices(Arc::new(kvm.create_vm().unwrap()));
    assert_eq!(dm.process_all(), vec![]);
    dm.io().pio_write(0x64, &[0xfe]);
    assert_eq!(dm.process_event(0), Some(DeviceNotice::Reset("guest requested a reset (i8042)".into())));
    assert_eq!(dm.process_event(0), None, "the request was consumed");
    assert_eq!(dm.process_event(7), None, "unknown index");
    assert!(dm.reset_fd().is_some());
}

#[test]
fn acpi_power_off_becomes_a_device_notice() {
    let Ok(kvm) = Kvm::new() else { return skip("acpi_power_off_becomes_a_device_notice") };
    let mut dm = workload_devices(Arc::new(kvm.create_vm().unwrap()));
    // What Linux's acpi_hw_extended_sleep(S5) does: clear WAK_STS, then SLP_TYP 5 | SLP_EN.
    dm.io().pio_write(0x600, &[0x80]);
    assert_eq!(dm.process_all(), vec![]);
    dm.io().pio_write(0x600, &[5 << 2 | 1 << 5]);
    assert_eq!(dm.process_event(1), Some(DeviceNotice::PowerOff("guest powered off (ACPI S5)".into())));
    assert_eq!(dm.process_event(1), None, "the request was consumed");
}

#[test]
fn devices_cannot_overlap_the_doorbell_or_arrive_after_start() {
    let Ok(kvm) = Kvm::new() else { return skip("devices_cannot_overlap_the_doorbell_or_arrive_after_start") };
    let mut dm = workload_devices(Arc::new(kvm.create_vm().unwrap()));
    let err = dm.register_mmio(Arc::new(Mutex::new(Reg::default())), (1 << 30) - 4, 8).unwrap_err();
    assert!(err.to_string().contains("overlaps the device at 0x40000000+0x8"), "{err}");
    let err = dm.register_pio(Arc::new(Mutex::new(Reg::default())), 0x3f8, 1).unwrap_err();
    assert!(matches!(err, Error::Bus(devices::bus::Error::Overlap { .. })), "{err}");
    dm.register_mmio(Arc::new(Mutex::new(Reg::default())), 0xd000_0000, 0x200).unwrap();
    // Once vCPUs share the router, the buses are fixed.
    let vcpu_side = dm.io().clone();
    let err = dm.register_mmio(Arc::new(Mutex::new(Reg::default())), 0xd000_1000, 0x200).unwrap_err();
    assert!(matches!(err, Error::Started), "{err}");
    drop(vcpu_side);
    dm.register_mmio(Arc::new(Mutex::new(Reg::default())), 0xd000_1000, 0x200).unwrap();
}

#[test]
fn irqfds_need_an_irqchip_a_routed_gsi_and_one_owner() {
    let Ok(kvm) = Kvm::new() else { return skip("irqfds_need_an_irqchip_a_routed_gsi_and_one_owner") };
    let mut plain = workload_devices(Arc::new(kvm.create_vm().unwrap()));
    let err = plain.register_irqfd(5).unwrap_err();
    assert_eq!(err.to_string(), "cannot register an irqfd for GSI 5: the VM has no in-kernel interrupt controller");

    let vm_fd = kvm.create_vm().unwrap();
    vm_fd.create_irq_chip().unwrap();
    let mut dm = DeviceManager::new(Arc::new(vm_fd), "linux", true);
    dm.add_boot_devices(&SerialOut::None, None).unwrap();
    assert_eq!(dm.eventfds.counts(), (1, 0), "the serial's interrupt is an irqfd");
    assert!(matches!(dm.register_irqfd(4), Err(Error::GsiTaken(4))));
    assert!(matches!(dm.register_irqfd(IOAPIC_PINS), Err(Error::GsiNotRouted(24))));
    let irq = dm.register_irqfd(5).unwrap();
    irq.event_fd().write(1).unwrap();
    assert_eq!(dm.eventfds.counts(), (2, 0));
}

#[test]
fn ioeventfds_need_a_device_register_and_must_not_collide() {
    let Ok(kvm) = Kvm::new() else { return skip("ioeventfds_need_a_device_register_and_must_not_collide") };
    let mut dm = workload_devices(Arc::new(kvm.create_vm().unwrap()));
    const BASE: u64 = 0xd000_0000;
    let err = dm.register_mmio_ioeventfd(BASE + 0x50, DataMatch::U32(0)).unwrap_err();
    assert_eq!(err.to_string(), "ioeventfd at MMIO 0xd0000050 (4 bytes) is not inside an MMIO device's range");
    let err = dm.register_mmio_ioeventfd(1 << 30, DataMatch::Any).unwrap_err();
    assert!(matches!(err, Error::IoeventfdUnclaimed { .. }), "the doorbell is not an ioeventfd's: {err}");

    dm.register_mmio(Arc::new(Mutex::new(Reg::default())), BASE, 0x200).unwrap();
    let q0 = dm.register_mmio_ioeventfd(BASE + 0x50, DataMatch::U32(0)).unwrap();
    let _q1 = dm.register_mmio_ioeventfd(BASE + 0x50, DataMatch::U32(1)).unwrap();
    let err = dm.register_mmio_ioeventfd(BASE + 0x50, DataMatch::U32(1)).unwrap_err();
    assert_eq!(err.to_string(), "an ioeventfd at MMIO 0xd0000050 already matches writes like U32(1)");
    assert!(matches!(dm.register_mmio_ioeventfd(BASE + 0x50, DataMatch::Any), Err(Error::IoeventfdTaken { .. })));
    dm.register_mmio_ioeventfd(BASE + 0x50, DataMatch::U16(0)).unwrap();
    let err = dm.register_mmio_ioeventfd(BASE + 0x1fe, DataMatch::U32(0)).unwrap_err();
    assert!(matches!(err, Error::IoeventfdUnclaimed { addr: 0xd000_01fe, size: 4 }), "crosses the end: {err}");
    assert_eq!(dm.eventfds.counts(), (0, 3));
    // The fd is non-blocking and empty until the guest writes.
    assert!(q0.read().is_err());
}
