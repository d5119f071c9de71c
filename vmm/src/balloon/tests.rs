//! The balloon of a real VM driven from the VMM side: a test driver speaks to
//! the transport through the VM's own MMIO bus (the router its vCPUs use),
//! lays its rings in the VM's guest RAM, and notifies queues both through
//! QueueNotify and through the queue's ioeventfd handled by the host's event
//! loop, whose statistics timer asks for statistics. Needs /dev/kvm and
//! userfaultfd (skipped otherwise).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::device_manager::{IoRouter, BALLOON_MMIO_BASE};
use crate::driver::lock;
use crate::guest_ram::RamPolicy;
use crate::host::{Host, HostConfig};
use crate::vm::{BootSource, MergeSpec, SerialOut, VmSpec};
use crate::workload::scenario::Scenario;

// virtio-mmio registers (virtio 1.x, section 4.2.2).
const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const STATUS: u64 = 0x070;
const QUEUE_DESC: u64 = 0x080;
const QUEUE_AVAIL: u64 = 0x090;
const QUEUE_USED: u64 = 0x0a0;
const CONFIG: u64 = 0x100;
const S_ACK: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const F_VERSION_1: u64 = 1 << 32;
const F_STATS_VQ: u64 = 1 << 1;
const QSIZE: u16 = 64;

/// The driver side of one split ring in guest memory.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    next: u16,
    avail_idx: u16,
}

impl Ring {
    fn new(base: u64) -> Self {
        Ring { desc: base, avail: base + 0x1000, used: base + 0x2000, next: 0, avail_idx: 0 }
    }

    /// Makes the one-buffer chain `(addr, len, flags)` available.
    fn add(&mut self, mem: &GuestMemoryMmap, addr: u64, len: u32, flags: u16) {
        let head = self.next;
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&d, GuestAddress(self.desc + 16 * u64::from(head))).unwrap();
        self.next = (self.next + 1) % QSIZE;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2)).unwrap();
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }
}

/// A driver talking to the balloon through the VM's MMIO bus.
struct Driver<'a> {
    io: &'a IoRouter,
    mem: &'a GuestMemoryMmap,
}

impl Driver<'_> {
    fn r(&self, reg: u64) -> u32 {
        let mut b = [0u8; 4];
        self.io.mmio_read(BALLOON_MMIO_BASE + reg, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(&self, reg: u64, v: u32) {
        self.io.mmio_write(0, BALLOON_MMIO_BASE + reg, &v.to_le_bytes());
    }

    fn w64(&self, reg: u64, v: u64) {
        self.w(reg, v as u32);
        self.w(reg + 4, (v >> 32) as u32);
    }

    fn add_status(&self, bit: u32) {
        let s = self.r(STATUS);
        self.w(STATUS, s | bit);
    }

    /// Discovery, negotiation of `features`, one ring per queue at `rings`.
    fn init(&self, features: u64, rings: &[u64]) -> Vec<Ring> {
        assert_eq!(self.r(MAGIC), 0x7472_6976);
        assert_eq!(self.r(VERSION), 2);
        assert_eq!(self.r(DEVICE_ID), 5);
        self.w(STATUS, 0);
        self.add_status(S_ACK);
        self.add_status(S_DRIVER);
        self.w(DEVICE_FEATURES_SEL, 1);
        assert_ne!(self.r(DEVICE_FEATURES) & 1, 0, "VERSION_1 offered");
        self.w(DRIVER_FEATURES_SEL, 0);
        self.w(DRIVER_FEATURES, features as u32);
        self.w(DRIVER_FEATURES_SEL, 1);
        self.w(DRIVER_FEATURES, (features >> 32) as u32);
        self.add_status(S_FEATURES_OK);
        assert_ne!(self.r(STATUS) & S_FEATURES_OK, 0, "FEATURES_OK kept");
        let mut out = Vec::new();
        for (i, &base) in rings.iter().enumerate() {
            self.mem.write_slice(&[0u8; 0x3000], GuestAddress(base)).unwrap();
            let ring = Ring::new(base);
            self.w(QUEUE_SEL, i as u32);
            self.w(QUEUE_NUM, u32::from(QSIZE));
            self.w64(QUEUE_DESC, ring.desc);
            self.w64(QUEUE_AVAIL, ring.avail);
            self.w64(QUEUE_USED, ring.used);
            self.w(QUEUE_READY, 1);
            out.push(ring);
        }
        self.add_status(S_DRIVER_OK);
        out
    }
}

fn fill(page: u64, round: u64) -> [u8; 4096] {
    let mut b = [0u8; 4096];
    for (i, w) in b.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(page << 32 | round << 16 | i as u64).to_le_bytes());
    }
    b
}

#[test]
fn inflate_and_deflate_through_the_vms_mmio_bus() {
    let Ok(host) = Host::new(HostConfig { pool_bytes: 1 << 30 }) else {
        let _ = writeln!(std::io::stderr(), "SKIPPED inflate_and_deflate_through_the_vms_mmio_bus: no KVM");
        return;
    };
    let host = Arc::new(Mutex::new(host));
    let scenario = Scenario { fill_mib: 16, ..Default::default() };
    let spec = VmSpec {
        id: "b".into(),
        vcpus: 1,
        mem_mib: crate::workload::mem_mib(scenario.fill_mib),
        boot: BootSource::Workload(scenario),
        serial: SerialOut::None,
        ram: RamPolicy::Managed,
        pause_after_fill: false,
        merge: MergeSpec::default(),
        balloon: Some(BalloonSpec { amount_mib: 4, stats_polling_interval_s: 1, ..BalloonSpec::default() }),
    };
    lock(&host).create_vm(spec).unwrap();
    let mut em: EventManager<Arc<Mutex<Host>>> = EventManager::new().unwrap();
    em.add_subscriber(host.clone());

    // 4 MiB of the workload's data area to inflate, rings and buffers above it.
    let (data, mem) = {
        let h = lock(&host);
        let vm = h.vm("b").unwrap();
        (vm.workload().unwrap().layout.data_gpa, vm.ram().memory().clone())
    };
    let pages: Vec<u64> = (0..1024).map(|i| data / 4096 + i).collect();
    for &p in &pages {
        mem.write_slice(&fill(p, 1), GuestAddress(p * 4096)).unwrap();
    }
    let scratch = data + (8 << 20);
    let (pfn_buf, stats_buf) = (scratch + 0x10_0000, scratch + 0x20_0000);

    let mut rings = {
        let h = lock(&host);
        let vm = h.vm("b").unwrap();
        let d = Driver { io: vm.devices().io(), mem: &mem };
        let rings = d.init(F_VERSION_1 | F_STATS_VQ, &[scratch, scratch + 0x4000, scratch + 0x8000]);
        let mut num = [0u8; 4];
        vm.devices().io().mmio_read(BALLOON_MMIO_BASE + CONFIG, &mut num);
        assert_eq!(u32::from_le_bytes(num), 4 * PAGES_PER_MIB, "num_pages");
        rings
    };

    // Inflate: 4 buffers of 256 PFNs on queue 0, one QueueNotify write.
    for (k, chunk) in pages.chunks(256).enumerate() {
        let bytes: Vec<u8> = chunk.iter().flat_map(|&p| (p as u32).to_le_bytes()).collect();
        let at = pfn_buf + k as u64 * 1024;
        mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        rings[0].add(&mem, at, 1024, 0);
    }
    // The statistics buffer: free memory = 12345 bytes.
    let mut entry = [0u8; 10];
    entry[..2].copy_from_slice(&4u16.to_le_bytes());
    entry[2..].copy_from_slice(&12345u64.to_le_bytes());
    mem.write_slice(&entry, GuestAddress(stats_buf)).unwrap();
    rings[2].add(&mem, stats_buf, 10, 0);
    let before = lock(&host).memory().stats().host_bytes;
    {
        let h = lock(&host);
        let vm = h.vm("b").unwrap();
        let d = Driver { io: vm.devices().io(), mem: &mem };
        d.w(QUEUE_NOTIFY, 0);
        d.w(QUEUE_NOTIFY, 2);
        // The driver reports the balloon's size.
        d.w(CONFIG + 4, 1024);
    }
    assert_eq!(rings[0].used_idx(&mem), 4, "every inflate buffer used");
    let (report, stats_after, flags_zero) = {
        let h = lock(&host);
        let vm = h.vm("b").unwrap();
        let map = vm.ram().guest_map().unwrap();
        let zero = pages.iter().all(|&p| map.page_flags(p as u32).unwrap().contains(memory::PageFlags::ZERO));
        (h.balloon_report("b").unwrap(), h.memory().stats().host_bytes, zero)
    };
    assert_eq!(report.inflated_pages, 1024);
    assert_eq!(report.bytes_returned, 4 << 20);
    assert_eq!(before - stats_after, 4 << 20, "host bytes {before} -> {stats_after}");
    assert!(flags_zero, "inflated pages are discarded");
    let info = lock(&host).balloon_info("b").unwrap();
    assert_eq!((info.spec.amount_mib, info.actual_mib), (4, 4));
    let s = lock(&host).balloon_statistics("b").unwrap();
    assert_eq!(s.guest.free_memory, Some(12345));
    assert!(s.updated_at_unix_s.is_some());

    // The stats timer (a timerfd in the event loop) returns the buffer once
    // the 1 s interval elapsed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while rings[2].used_idx(&mem) == 0 && Instant::now() < deadline {
        em.run_with_timeout(50).unwrap();
    }
    assert_eq!(rings[2].used_idx(&mem), 1, "statistics requested by the timer");

    // Deflate through the deflate queue's ioeventfd, handled by the event loop.
    for (k, chunk) in pages.chunks(256).enumerate() {
        let bytes: Vec<u8> = chunk.iter().flat_map(|&p| (p as u32).to_le_bytes()).collect();
        let at = pfn_buf + 0x8000 + k as u64 * 1024;
        mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        rings[1].add(&mem, at, 1024, 0);
    }
    {
        let h = lock(&host);
        let vm = h.vm("b").unwrap();
        // Queue 1's fd: the i8042 and the ACPI power-off subscribed first, then
        // queues 0, 1, 2.
        let (_, fd) = vm.device_event_fds().nth(3).unwrap();
        fd.write(1).unwrap();
    }
    em.run_with_timeout(1000).unwrap();
    assert_eq!(rings[1].used_idx(&mem), 4, "every deflate buffer used");
    assert_eq!(lock(&host).balloon_report("b").unwrap().deflated_pages, 1024);

    // The guest touches its pages again: zero first, then what it writes.
    let mut mismatches = 0;
    for &p in &pages {
        let mut b = [0u8; 4096];
        mem.read_slice(&mut b, GuestAddress(p * 4096)).unwrap();
        mismatches += usize::from(b.iter().any(|&x| x != 0));
        mem.write_slice(&fill(p, 2), GuestAddress(p * 4096)).unwrap();
    }
    for &p in &pages {
        let mut b = [0u8; 4096];
        mem.read_slice(&mut b, GuestAddress(p * 4096)).unwrap();
        mismatches += usize::from(b != fill(p, 2));
    }
    assert_eq!(mismatches, 0);

    // Host requests: a new target, a bad one, the polling interval.
    let h = lock(&host);
    h.set_balloon_target("b", 8).unwrap();
    assert_eq!(h.balloon_info("b").unwrap().spec.amount_mib, 8);
    assert!(h.set_balloon_target("b", 4096).is_err());
    h.set_balloon_stats_interval("b", 5).unwrap();
    assert_eq!(h.balloon_info("b").unwrap().spec.stats_polling_interval_s, 5);
    assert!(h.balloon("nope").is_err());
}
