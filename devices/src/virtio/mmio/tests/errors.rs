//! Driver errors: each sets DEVICE_NEEDS_RESET (or is refused) and nothing panics.

use super::*;

#[test]
fn queue_ready_on_an_invalid_ring_needs_reset() {
    // The used ring past the end of guest memory.
    let mut d = driver();
    assert!(d.negotiate(VIRTIO_F_VERSION_1));
    let mut ring = Ring::new(0, 8);
    ring.used = MEM_SIZE - 8;
    d.setup_ring(0, ring);
    assert_eq!(d.r(VIRTIO_MMIO_QUEUE_READY), 0);
    assert!(d.needs_reset());

    // A size that is not a power of two, or above the maximum.
    for size in [6u16, 32] {
        let mut d = driver();
        assert!(d.negotiate(VIRTIO_F_VERSION_1));
        d.setup_ring(0, Ring::new(0, 8));
        d.w(VIRTIO_MMIO_QUEUE_SEL, 1);
        d.w(VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
        d.w(VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(d.r(VIRTIO_MMIO_QUEUE_READY), 0, "size {size}");
        assert!(d.needs_reset(), "size {size}");
    }

    // A misaligned descriptor table.
    let mut d = driver();
    assert!(d.negotiate(VIRTIO_F_VERSION_1));
    let mut ring = Ring::new(0, 8);
    ring.desc += 2;
    d.setup_ring(0, ring);
    assert!(d.needs_reset());
    // The device serves nothing once it needs a reset, and is not activated.
    d.add_status(VIRTIO_CONFIG_S_DRIVER_OK);
    assert!(!d.t.is_active());
    assert_eq!(d.t.device().activated_with, None);
}

#[test]
fn wrong_width_register_access_needs_reset() {
    let mut d = driver();
    d.init(VIRTIO_F_VERSION_1, 2, 8);
    let irqs = d.irq_count();
    let mut b = [0xaau8; 2];
    d.t.read(u64::from(VIRTIO_MMIO_STATUS), &mut b);
    assert_eq!(b, [0, 0]);
    assert!(d.needs_reset());
    assert_eq!(d.irq_count(), irqs + 1, "a configuration-change interrupt after DRIVER_OK");
    assert_ne!(d.r(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG, 0);

    let mut d = driver();
    d.t.write(u64::from(VIRTIO_MMIO_STATUS) + 1, &[1, 0, 0, 0]);
    assert!(d.needs_reset());
    let mut d = driver();
    d.t.write(u64::from(VIRTIO_MMIO_STATUS), &[1u8; 8]);
    assert!(d.needs_reset());
    assert_eq!(d.t.counters().bad_accesses, 1);

    // Unknown registers are refused without failing the device.
    let mut d = driver();
    assert_eq!(d.r(0xf0), 0);
    d.w(0xf0, 1);
    assert!(!d.needs_reset());
    assert_eq!(d.t.counters().bad_accesses, 2);
}

#[test]
fn a_runaway_available_index_or_head_needs_reset() {
    let mut d = driver();
    d.init(VIRTIO_F_VERSION_1, 1, 8);
    let mem = d.mem.clone();
    d.rings[0].set_avail_idx(&mem, 100);
    d.kick(0);
    assert!(d.needs_reset());

    let mut d = driver();
    d.init(VIRTIO_F_VERSION_1, 1, 8);
    let mem = d.mem.clone();
    let mut ring = d.rings[0];
    ring.publish(&mem, 9);
    d.kick(0);
    assert!(d.needs_reset());
    assert_eq!(d.rings[0].used_idx(&mem), 0);
    // The device serves nothing until reset, then works again.
    assert!(!d.t.is_active());
    d.init(VIRTIO_F_VERSION_1, 1, 8);
    d.rings[0].add(&mem, &[(DATA, 4, 0)]);
    d.kick(0);
    assert_eq!(d.rings[0].used_idx(&mem), 1);
}

#[test]
fn activation_failure_needs_reset() {
    let mut d = Driver::new(Echo { fail_activate: true, ..Default::default() });
    assert!(d.negotiate(VIRTIO_F_VERSION_1));
    d.add_status(VIRTIO_CONFIG_S_DRIVER_OK);
    assert!(d.needs_reset());
    assert!(!d.t.is_active());
}

#[test]
fn invalid_device_queue_sizes_are_refused() {
    struct Bad;
    impl VirtioDevice for Bad {
        fn device_type(&self) -> u32 {
            1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[3]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, _: u64, _: &GuestMemoryMmap) -> Result<(), Error> {
            Ok(())
        }
        fn process_queue(&mut self, _: usize, _: &mut QueueCtx<'_>) -> Result<(), Error> {
            Ok(())
        }
        fn reset(&mut self) {}
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory");
    let trigger = crate::virtio::test_utils::CountingTrigger::default();
    assert!(MmioTransport::new(Bad, mem, Box::new(trigger)).is_err());
}
