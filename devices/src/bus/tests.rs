//! Tests of the port-I/O and MMIO buses.

use super::*;

struct Echo(u8);
impl BusDevice for Echo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(self.0.wrapping_add(offset as u8));
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.0 = data[0];
    }
}

/// Records the offsets it sees; reads return the offset's low byte.
#[derive(Default)]
struct Recorder(Vec<(u64, usize)>);
impl BusDevice for Recorder {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.push((offset, data.len()));
        data.fill(offset as u8);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.push((offset, data.len()));
    }
}

fn echo(v: u8) -> SharedDevice {
    Arc::new(Mutex::new(Echo(v)))
}

#[test]
fn dispatches_by_range_and_rejects_overlap() {
    let mut bus = PioBus::new();
    bus.insert(Arc::new(Mutex::new(Echo(1))), 0x3f8, 8).unwrap();
    assert!(bus.insert(Arc::new(Mutex::new(Echo(2))), 0x3fc, 8).is_err());
    assert!(bus.insert(Arc::new(Mutex::new(Echo(2))), 0x60, 0).is_err());
    bus.insert(Arc::new(Mutex::new(Echo(5))), 0x60, 5).unwrap();
    let mut b = [0u8; 1];
    assert!(bus.read(0x3fa, &mut b));
    assert_eq!(b[0], 3);
    assert!(bus.write(0x64, &[9]));
    assert!(bus.read(0x60, &mut b));
    assert_eq!(b[0], 9);
    assert!(!bus.read(0x80, &mut b));
    assert_eq!(b[0], 0xff);
}

#[test]
fn mmio_overlap_is_refused_with_both_ranges_named() {
    let mut bus = MmioBus::new();
    bus.insert(echo(0), 0xd000_0000, 0x1000).unwrap();
    // Same start, inside, containing, straddling either edge: all refused.
    for (base, len) in
        [(0xd000_0000, 0x1000), (0xd000_0800, 0x10), (0xcfff_f000, 0x3000), (0xcfff_ffff, 2), (0xd000_0fff, 0x1000)]
    {
        let err = bus.insert(echo(1), base, len).unwrap_err();
        assert_eq!(
            err,
            Error::Overlap { space: "MMIO", base, len, other_base: 0xd000_0000, other_len: 0x1000 },
            "{base:#x}+{len:#x}"
        );
        assert_eq!(err.to_string(), format!("MMIO range {base:#x}+{len:#x} overlaps the device at 0xd0000000+0x1000"));
    }
    // Adjacent ranges on either side are fine.
    bus.insert(echo(2), 0xcfff_f000, 0x1000).unwrap();
    bus.insert(echo(3), 0xd000_1000, 0x1000).unwrap();
    assert_eq!(bus.len(), 3);
    assert_eq!(
        bus.ranges().collect::<Vec<_>>(),
        vec![(0xcfff_f000, 0x1000), (0xd000_0000, 0x1000), (0xd000_1000, 0x1000)]
    );
}

#[test]
fn empty_and_out_of_space_ranges_are_refused() {
    let mut mmio = MmioBus::new();
    assert_eq!(mmio.insert(echo(0), 0x1000, 0).unwrap_err(), Error::Empty { space: "MMIO", base: 0x1000 });
    let err = mmio.insert(echo(0), u64::MAX - 1, 3).unwrap_err();
    assert!(matches!(err, Error::OutOfSpace { .. }), "{err}");
    // The very last bytes of the space are usable.
    mmio.insert(echo(7), u64::MAX - 1, 2).unwrap();
    let mut b = [0u8; 1];
    assert!(mmio.read(u64::MAX, &mut b));
    assert_eq!(b[0], 8);
    let mut w = [0u8; 2];
    assert!(!mmio.read(u64::MAX, &mut w), "an access running past the space is unclaimed");

    let mut pio = PioBus::new();
    let err = pio.insert(echo(0), 0xfff0, 0x20).unwrap_err();
    assert_eq!(err.to_string(), "port range 0xfff0+0x20 runs past the end of the address space (0xffff)");
    pio.insert(echo(0), 0xfff0, 0x10).unwrap();
}

#[test]
fn mmio_dispatch_at_range_edges() {
    let mut bus = MmioBus::new();
    let dev = Arc::new(Mutex::new(Recorder::default()));
    bus.insert(dev.clone(), 0x1000, 0x100).unwrap();
    let mut word = [0u8; 4];
    // First and last word of the range.
    assert!(bus.read(0x1000, &mut word));
    assert_eq!(word, [0; 4]);
    assert!(bus.read(0x10fc, &mut word));
    assert_eq!(word, [0xfc; 4]);
    // Last byte.
    assert!(bus.write(0x10ff, &[1]));
    // One byte before, one past the end, and a word crossing the end: unclaimed.
    assert!(!bus.read(0xfff, &mut [0u8; 1]));
    assert!(!bus.write(0x1100, &[1]));
    word = [0; 4];
    assert!(!bus.read(0x10fe, &mut word));
    assert_eq!(word, [0xff; 4], "unclaimed reads return all-ones");
    assert!(!bus.write(0x10fe, &[1, 2, 3, 4]));
    assert_eq!(dev.lock().unwrap().0, vec![(0, 4), (0xfc, 4), (0xff, 1)]);
    assert!(bus.claims(0x1000, 0x100));
    assert!(!bus.claims(0x1000, 0x101));
}

#[test]
fn unclaimed_accesses_on_an_empty_bus() {
    let bus = MmioBus::new();
    assert!(bus.is_empty());
    let mut q = [0u8; 8];
    assert!(!bus.read(0, &mut q));
    assert_eq!(q, [0xff; 8]);
    assert!(!bus.write(u64::MAX, &[0]));
    assert!(!bus.claims(0, 1));
}
