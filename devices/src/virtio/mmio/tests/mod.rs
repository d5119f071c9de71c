//! The transport driven through its registers as a guest driver does.

mod errors;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::bus::BusDevice;
use crate::virtio::notify::QueueEvent;
use crate::virtio::test_utils::{Driver, Ring, DATA, MEM_SIZE, WRITE};

const ECHO_ID: u32 = 42;
const FEATURE_X: u64 = 1 << 3;

/// A test device with two queues: returns every chain with its total length as
/// the bytes written, counting chains; config space is 4 bytes of `cfg`.
#[derive(Default)]
struct Echo {
    chains: Arc<AtomicUsize>,
    resets: usize,
    activated_with: Option<u64>,
    fail_activate: bool,
    cfg: [u8; 4],
}

impl VirtioDevice for Echo {
    fn device_type(&self) -> u32 {
        ECHO_ID
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | FEATURE_X
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, d) in data.iter().enumerate() {
            if let Some(c) = self.cfg.get_mut(offset as usize + i) {
                *c = *d;
            }
        }
    }
    fn activate(&mut self, acked: u64, _mem: &GuestMemoryMmap) -> Result<(), Error> {
        self.activated_with = Some(acked);
        if self.fail_activate {
            return Err(Error::Activate("refused by test".into()));
        }
        Ok(())
    }
    fn process_queue(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) -> Result<(), Error> {
        let mut used = false;
        while let Some(c) = ctx.pop(queue)? {
            let head = c.head_index();
            let len: u32 = c.map(|d| d.len()).sum();
            ctx.add_used(queue, head, len)?;
            self.chains.fetch_add(1, Ordering::SeqCst);
            used = true;
        }
        if used {
            ctx.signal_used();
        }
        Ok(())
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.activated_with = None;
    }
}

fn driver() -> Driver<Echo> {
    Driver::new(Echo::default())
}

#[test]
fn identifies_itself() {
    let mut d = driver();
    assert_eq!(d.r(VIRTIO_MMIO_MAGIC_VALUE), MAGIC_VALUE);
    assert_eq!(d.r(VIRTIO_MMIO_VERSION), 2);
    assert_eq!(d.r(VIRTIO_MMIO_DEVICE_ID), ECHO_ID);
    assert_eq!(d.r(VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
    assert_eq!(d.device_features(), VIRTIO_F_VERSION_1 | FEATURE_X);
    d.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
    assert_eq!(d.r(VIRTIO_MMIO_DEVICE_FEATURES), 0);
    assert_eq!(d.t.queue_count(), 2);
    d.w(VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(d.r(VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
    d.w(VIRTIO_MMIO_QUEUE_SEL, 2);
    assert_eq!(d.r(VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "a queue that does not exist reads 0");
}

#[test]
fn full_init_sequence_then_notifications_round_trip() {
    let mut d = driver();
    d.init(VIRTIO_F_VERSION_1 | FEATURE_X, 2, 8);
    assert_eq!(d.t.acked_features(), VIRTIO_F_VERSION_1 | FEATURE_X);
    assert_eq!(d.t.device().activated_with, Some(VIRTIO_F_VERSION_1 | FEATURE_X));
    let s =
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;
    assert_eq!(d.r(VIRTIO_MMIO_STATUS), s);
    d.w(VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(d.r(VIRTIO_MMIO_QUEUE_READY), 1);

    let mem = d.mem.clone();
    let head = d.rings[1].add(&mem, &[(DATA, 100, 0), (DATA + 0x1000, 28, WRITE)]);
    d.kick(1);
    assert_eq!(d.rings[1].used_idx(&mem), 1);
    assert_eq!(d.rings[1].used_elem(&mem, 0), (u32::from(head), 128));
    assert_eq!(d.irq_count(), 1);
    assert_eq!(d.ack_irq(), VIRTIO_MMIO_INT_VRING);
    assert_eq!(d.r(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(d.t.counters().notifications, 1);
}

#[test]
fn ioeventfd_notifications_reach_their_queue() {
    let mut d = driver();
    d.init(VIRTIO_F_VERSION_1, 2, 8);
    let mem = d.mem.clone();
    let events: Vec<QueueEvent> = (0..d.t.queue_count())
        .map(|q| QueueEvent::new(q, Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))))
        .collect();
    d.rings[0].add(&mem, &[(DATA, 8, 0)]);
    // KVM would signal the fd registered for QueueNotify with data match 0.
    events[0].event_fd().write(1).expect("signal");
    assert!(!events[1].deliver(&mut d.t));
    assert!(events[0].deliver(&mut d.t));
    assert_eq!(d.rings[0].used_idx(&mem), 1);
    assert_eq!(NOTIFY_OFFSET, u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
}

#[test]
fn features_ok_refused_without_version_1_or_with_unknown_features() {
    let mut d = driver();
    assert!(!d.negotiate(FEATURE_X), "legacy driver (no VERSION_1) must be refused");
    assert!(!d.negotiate(VIRTIO_F_VERSION_1 | (1 << 40)), "unsupported feature must be refused");
    assert_eq!(d.t.counters().refused_features, 2);
    // A refused FEATURES_OK leaves the driver free to give up; DRIVER_OK cannot follow.
    d.add_status(VIRTIO_CONFIG_S_DRIVER_OK);
    assert!(!d.t.is_active());
    assert!(d.negotiate(VIRTIO_F_VERSION_1));
}

#[test]
fn status_out_of_order_or_clearing_bits_is_ignored() {
    let mut d = driver();
    d.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER);
    assert_eq!(d.r(VIRTIO_MMIO_STATUS), 0, "DRIVER before ACKNOWLEDGE");
    d.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER_OK);
    assert_eq!(d.r(VIRTIO_MMIO_STATUS), VIRTIO_CONFIG_S_ACKNOWLEDGE, "DRIVER_OK skipping FEATURES_OK");
    d.add_status(VIRTIO_CONFIG_S_DRIVER);
    d.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER);
    assert_eq!(d.r(VIRTIO_MMIO_STATUS), VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER, "cleared a bit");
    d.add_status(VIRTIO_CONFIG_S_FAILED);
    assert_ne!(d.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FAILED, 0);
    assert!(d.t.counters().refused_writes >= 3);
}

#[test]
fn writes_outside_their_phase_are_ignored() {
    let mut d = driver();
    d.init(VIRTIO_F_VERSION_1, 2, 8);
    // Features after FEATURES_OK.
    d.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    d.w(VIRTIO_MMIO_DRIVER_FEATURES, FEATURE_X as u32);
    assert_eq!(d.t.acked_features(), VIRTIO_F_VERSION_1);
    // Queue setup after DRIVER_OK, and disabling a live queue.
    d.w(VIRTIO_MMIO_QUEUE_SEL, 0);
    d.w(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x5000);
    d.w(VIRTIO_MMIO_QUEUE_READY, 0);
    assert_eq!(d.r(VIRTIO_MMIO_QUEUE_READY), 1);
    let mem = d.mem.clone();
    d.rings[0].add(&mem, &[(DATA, 8, 0)]);
    d.kick(0);
    assert_eq!(d.rings[0].used_idx(&mem), 1, "the queue still works from its original ring");
    assert!(d.t.counters().refused_writes >= 3);
    assert!(!d.needs_reset());
}

#[test]
fn config_space_takes_any_width_once_the_driver_is_known() {
    let mut d = driver();
    d.t.write(CONFIG_OFFSET, &[9]);
    let mut b = [0u8; 1];
    d.t.read(CONFIG_OFFSET, &mut b);
    assert_eq!(b, [0], "config writes before DRIVER are ignored");
    assert!(d.negotiate(VIRTIO_F_VERSION_1));
    d.t.write(CONFIG_OFFSET + 1, &[1, 2]);
    let mut b = [0u8; 8];
    d.t.read(CONFIG_OFFSET, &mut b);
    assert_eq!(b, [0, 1, 2, 0, 0, 0, 0, 0]);
}

#[test]
fn config_change_bumps_generation_and_interrupts_only_when_live() {
    let mut d = driver();
    let g0 = d.r(VIRTIO_MMIO_CONFIG_GENERATION);
    d.t.config_changed();
    assert_eq!(d.r(VIRTIO_MMIO_CONFIG_GENERATION), g0.wrapping_add(1));
    assert_eq!(d.irq_count(), 0);
    d.init(VIRTIO_F_VERSION_1, 2, 8);
    d.t.config_changed();
    assert_eq!(d.irq_count(), 1);
    assert_eq!(d.ack_irq(), VIRTIO_MMIO_INT_CONFIG);
}

#[test]
fn notifications_of_dead_queues_are_ignored() {
    let mut d = driver();
    d.kick(0);
    d.init(VIRTIO_F_VERSION_1, 1, 8);
    d.kick(1);
    d.kick(77);
    assert_eq!(d.t.counters().notifications, 0);
    assert!(!d.needs_reset());
}

#[test]
fn buffers_offered_before_driver_ok_are_served_at_activation() {
    let mut d = driver();
    assert!(d.negotiate(VIRTIO_F_VERSION_1));
    d.setup_ring(0, Ring::new(0, 8));
    let mem = d.mem.clone();
    d.rings[0].add(&mem, &[(DATA, 4, 0)]);
    d.kick(0);
    assert_eq!(d.rings[0].used_idx(&mem), 0);
    d.add_status(VIRTIO_CONFIG_S_DRIVER_OK);
    assert_eq!(d.rings[0].used_idx(&mem), 1);
}

#[test]
fn reset_returns_to_the_initial_state() {
    let mut d = driver();
    d.init(VIRTIO_F_VERSION_1 | FEATURE_X, 2, 8);
    let mem = d.mem.clone();
    d.rings[0].add(&mem, &[(DATA, 4, 0)]);
    d.kick(0);
    d.w(VIRTIO_MMIO_QUEUE_SEL, 1);
    let resets = d.t.device().resets;
    d.w(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(d.r(VIRTIO_MMIO_STATUS), 0);
    assert_eq!(d.r(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(d.t.acked_features(), 0);
    assert_eq!(d.t.device().resets, resets + 1);
    assert_eq!(d.t.counters().resets as usize, resets + 1);
    assert_eq!(d.t.device().activated_with, None);
    for q in 0..2 {
        d.w(VIRTIO_MMIO_QUEUE_SEL, q);
        assert_eq!(d.r(VIRTIO_MMIO_QUEUE_READY), 0);
        // Linux writes 0 to QueueReady while tearing queues down after the reset.
        d.w(VIRTIO_MMIO_QUEUE_READY, 0);
    }
    assert!(!d.needs_reset());
    // Fresh rings from index 0: the device's ring positions were reset too.
    d.init(VIRTIO_F_VERSION_1, 2, 8);
    d.rings[0].add(&mem, &[(DATA, 4, 0)]);
    d.kick(0);
    assert_eq!(d.rings[0].used_idx(&mem), 1);
    assert_eq!(d.t.device().chains.load(Ordering::SeqCst), 2);
}

#[test]
fn sits_on_the_mmio_bus_as_a_shared_device() {
    use std::sync::Mutex;

    use crate::bus::{MmioBus, SharedDevice};

    let d = driver();
    let transport = Arc::new(Mutex::new(d.t));
    // The VMM keeps the typed handle (for ioeventfds, targets, stats) and gives
    // the bus the same device.
    let shared: SharedDevice = transport.clone();
    let mut bus = MmioBus::new();
    let base = 0xd000_0000;
    bus.insert(shared, base, MMIO_LEN).expect("insert");
    let mut b = [0u8; 4];
    assert!(bus.read(base + u64::from(VIRTIO_MMIO_DEVICE_ID), &mut b));
    assert_eq!(u32::from_le_bytes(b), ECHO_ID);
    assert!(bus.write(base + u64::from(VIRTIO_MMIO_STATUS), &VIRTIO_CONFIG_S_ACKNOWLEDGE.to_le_bytes()));
    assert_eq!(transport.lock().expect("transport").status(), VIRTIO_CONFIG_S_ACKNOWLEDGE);
}

#[test]
fn interrupts_go_through_an_eventfd_trigger() {
    let trigger = crate::trigger::EventFdTrigger::new().expect("eventfd");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("memory");
    let mut t = MmioTransport::new(Echo::default(), mem, Box::new(trigger.clone())).expect("transport");
    t.write(u64::from(VIRTIO_MMIO_STATUS), &0u32.to_le_bytes());
    for bit in [VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER] {
        let s = t.status();
        t.write(u64::from(VIRTIO_MMIO_STATUS), &(s | bit).to_le_bytes());
    }
    t.write(u64::from(VIRTIO_MMIO_DRIVER_FEATURES_SEL), &1u32.to_le_bytes());
    t.write(u64::from(VIRTIO_MMIO_DRIVER_FEATURES), &1u32.to_le_bytes());
    for bit in [VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER_OK] {
        let s = t.status();
        t.write(u64::from(VIRTIO_MMIO_STATUS), &(s | bit).to_le_bytes());
    }
    assert!(t.is_active());
    assert!(trigger.event_fd().read().is_err(), "no interrupt yet");
    t.config_changed();
    assert_eq!(trigger.event_fd().read().expect("interrupt"), 1);
}
