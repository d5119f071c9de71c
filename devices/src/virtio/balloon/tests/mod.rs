//! The balloon driven through the transport as a guest driver does, against a
//! recording backend.

mod hostile;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use vm_memory::{Bytes, GuestAddress};

use super::pages::Range;
use super::stats::tag;
use super::*;
use crate::bus::BusDevice;
use crate::virtio::mmio::CONFIG_OFFSET;
use crate::virtio::test_utils::{Driver, DATA, MEM_SIZE, WRITE};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Discard,
    Reclaim,
    Report,
}

/// The backend calls recorded.
type Calls = Vec<(Op, Vec<Range>)>;

/// Records every backend call; fails them while `fail` is set.
#[derive(Clone, Default)]
struct Recorder {
    calls: Arc<Mutex<Calls>>,
    fail: Arc<AtomicBool>,
}

impl Recorder {
    fn record(&self, op: Op, ranges: &[Range]) -> Result<(), BackendError> {
        self.calls.lock().expect("recorder").push((op, ranges.to_vec()));
        if self.fail.load(Ordering::SeqCst) {
            return Err(BackendError("test failure".into()));
        }
        Ok(())
    }
    fn take(&self) -> Calls {
        std::mem::take(&mut *self.calls.lock().expect("recorder"))
    }
}

impl BalloonBackend for Recorder {
    fn discard(&mut self, ranges: &[Range]) -> Result<(), BackendError> {
        self.record(Op::Discard, ranges)
    }
    fn reclaim(&mut self, ranges: &[Range]) -> Result<(), BackendError> {
        self.record(Op::Reclaim, ranges)
    }
    fn report(&mut self, ranges: &[Range]) -> Result<(), BackendError> {
        self.record(Op::Report, ranges)
    }
}

const INFLATE: u32 = 0;
const DEFLATE: u32 = 1;
const STATS: u32 = 2;
const REPORT: u32 = 3;

const ALL: BalloonConfig =
    BalloonConfig { target_pages: 0, deflate_on_oom: true, stats_polling_interval_s: 1, free_page_reporting: true };

fn all_features() -> u64 {
    VIRTIO_F_VERSION_1
        | VIRTIO_BALLOON_F_STATS_VQ
        | VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        | VIRTIO_BALLOON_F_FREE_PAGE_REPORTING
}

/// A balloon with every feature, initialised with every queue.
fn live() -> (Driver<Balloon>, Recorder) {
    let rec = Recorder::default();
    let mut d = Driver::new(Balloon::new(ALL, Box::new(rec.clone())));
    d.init(all_features(), 4, 16);
    (d, rec)
}

/// Writes `pfns` at `addr`; returns the buffer length.
fn put_pfns(d: &Driver<Balloon>, addr: u64, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    d.mem.write_slice(&bytes, GuestAddress(addr)).expect("pfns");
    bytes.len() as u32
}

/// Offers one buffer of `pfns` on `queue` and notifies it.
fn send_pfns(d: &mut Driver<Balloon>, queue: u32, pfns: &[u32]) {
    let len = put_pfns(d, DATA, pfns);
    let mem = d.mem.clone();
    d.rings[queue as usize].add(&mem, &[(DATA, len, 0)]);
    d.kick(queue);
}

fn pages(start: u64, count: u64) -> Range {
    (GuestAddress(start << 12), count << 12)
}

fn used(d: &Driver<Balloon>, queue: u32) -> u16 {
    d.rings[queue as usize].used_idx(&d.mem)
}

fn stats_buffer(entries: &[(u16, u64)]) -> Vec<u8> {
    entries.iter().flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes())).collect()
}

#[test]
fn offers_features_and_queues_per_config() {
    let mut d = Driver::new(Balloon::new(BalloonConfig::default(), Box::new(Recorder::default())));
    assert_eq!(d.t.device().device_type(), 5);
    assert_eq!(d.device_features(), VIRTIO_F_VERSION_1);
    assert_eq!(d.t.queue_count(), 2);
    let (mut d, _) = live();
    assert_eq!(d.device_features(), all_features());
    assert_eq!(d.t.queue_count(), 4);
    assert_eq!(d.t.device().stats_polling_interval(), Some(Duration::from_secs(1)));
}

#[test]
fn inflate_then_deflate_round_trip() {
    let (mut d, rec) = live();
    let irqs = d.irq_count();
    // Unordered, with two runs and a single page.
    send_pfns(&mut d, INFLATE, &[0x203, 0x200, 0x201, 0x202, 0x300, 0x401, 0x400]);
    assert_eq!(rec.take(), vec![(Op::Discard, vec![pages(0x200, 4), pages(0x300, 1), pages(0x400, 2)])]);
    assert_eq!(used(&d, INFLATE), 1);
    assert_eq!(d.irq_count(), irqs + 1);
    assert_eq!(d.ack_irq(), VIRTIO_MMIO_INT_VRING);
    send_pfns(&mut d, DEFLATE, &[0x201, 0x200, 0x400]);
    assert_eq!(rec.take(), vec![(Op::Reclaim, vec![pages(0x200, 2), pages(0x400, 1)])]);
    assert_eq!(used(&d, DEFLATE), 1);
    let c = d.t.device().counters();
    assert_eq!((c.inflated_pages, c.deflated_pages), (7, 3));
    assert!(d.t.is_active());
}

#[test]
fn several_chains_of_one_notification_make_one_backend_call() {
    let (mut d, rec) = live();
    let mem = d.mem.clone();
    let a = put_pfns(&d, DATA, &[10, 11]);
    let b = put_pfns(&d, DATA + 0x1000, &[12, 13]);
    d.rings[0].add(&mem, &[(DATA, a, 0)]);
    d.rings[0].add(&mem, &[(DATA + 0x1000, b, 0)]);
    d.kick(INFLATE);
    assert_eq!(rec.take(), vec![(Op::Discard, vec![pages(10, 4)])]);
    assert_eq!(used(&d, INFLATE), 2);
}

#[test]
fn statistics_round_trip() {
    let (mut d, _) = live();
    let mem = d.mem.clone();
    let buf = stats_buffer(&[(tag::MEMFREE, 100 << 20), (tag::MEMTOT, 512 << 20), (tag::OOM_KILL, 2), (77, 1)]);
    mem.write_slice(&buf, GuestAddress(DATA)).expect("stats");
    d.rings[STATS as usize].add(&mem, &[(DATA, buf.len() as u32, 0)]);
    d.kick(STATS);
    let s = d.t.device().latest_stats().clone();
    assert_eq!(
        (s.free_memory, s.total_memory, s.oom_kills, s.swap_in),
        (Some(100 << 20), Some(512 << 20), Some(2), None)
    );
    assert!(s.updated_at.is_some());
    let c = d.t.device().counters();
    assert_eq!((c.stats_updates, c.unknown_stat_tags), (1, 1));
    assert_eq!(used(&d, STATS), 0, "the device holds the buffer until it wants new statistics");

    // Not yet due; then due.
    let now = Instant::now();
    assert!(!d.t.poll_balloon_stats(now));
    assert!(d.t.poll_balloon_stats(now + Duration::from_secs(2)));
    assert_eq!(used(&d, STATS), 1);
    assert!(!d.t.request_balloon_stats(now), "nothing held any more");

    // The driver refills and returns the buffer.
    let buf = stats_buffer(&[(tag::MEMFREE, 50 << 20)]);
    mem.write_slice(&buf, GuestAddress(DATA)).expect("stats");
    d.rings[STATS as usize].add(&mem, &[(DATA, buf.len() as u32, 0)]);
    d.kick(STATS);
    assert_eq!(d.t.device().latest_stats().free_memory, Some(50 << 20));
    assert_eq!(d.t.device().latest_stats().total_memory, None, "each buffer replaces the last");
}

#[test]
fn free_page_reports_round_trip() {
    let (mut d, rec) = live();
    let mem = d.mem.clone();
    // Linux reports device-writable buffers, several per chain.
    d.rings[REPORT as usize].add(&mem, &[(0x40_0000, 0x20_0000, WRITE), (0x20_0000, 0x20_0000, WRITE)]);
    d.rings[REPORT as usize].add(&mem, &[(0x80_0000, 0x1000, 0)]);
    d.kick(REPORT);
    assert_eq!(
        rec.take(),
        vec![(Op::Report, vec![(GuestAddress(0x20_0000), 0x40_0000), (GuestAddress(0x80_0000), 0x1000)])]
    );
    assert_eq!(d.t.device().counters().reported_pages, 0x401);
    assert_eq!(used(&d, REPORT), 2);
    // Misaligned or outside memory: refused, still returned.
    d.rings[REPORT as usize].add(&mem, &[(0x40_0800, 0x1000, WRITE)]);
    d.rings[REPORT as usize].add(&mem, &[(0x40_0000, 0x1800, WRITE)]);
    d.rings[REPORT as usize].add(&mem, &[(MEM_SIZE, 0x1000, WRITE)]);
    d.kick(REPORT);
    assert!(rec.take().is_empty());
    assert_eq!(d.t.device().counters().bad_descriptors, 3);
    assert_eq!(used(&d, REPORT), 5);
}

#[test]
fn queues_are_numbered_by_the_accepted_features() {
    let rec = Recorder::default();
    let mut d = Driver::new(Balloon::new(ALL, Box::new(rec.clone())));
    // The driver declines statistics: the reporting queue is queue 2.
    d.init(VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_FREE_PAGE_REPORTING, 3, 16);
    let mem = d.mem.clone();
    d.rings[2].add(&mem, &[(0x20_0000, 0x1000, WRITE)]);
    d.kick(2);
    assert_eq!(rec.take(), vec![(Op::Report, vec![(GuestAddress(0x20_0000), 0x1000)])]);
    // Queue 3 has no meaning now.
    d.kick(3);
    assert!(d.t.is_active());
}

#[test]
fn config_space_target_and_actual() {
    let (mut d, _) = live();
    let read = |d: &mut Driver<Balloon>, off: u64| {
        let mut b = [0u8; 4];
        d.t.read(CONFIG_OFFSET + off, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(read(&mut d, 0), 0);
    let gen = d.r(VIRTIO_MMIO_CONFIG_GENERATION);
    let irqs = d.irq_count();
    d.t.set_balloon_target(1000);
    assert_eq!(read(&mut d, 0), 1000);
    assert_eq!(d.r(VIRTIO_MMIO_CONFIG_GENERATION), gen + 1);
    assert_eq!(d.irq_count(), irqs + 1);
    assert_eq!(d.ack_irq(), VIRTIO_MMIO_INT_CONFIG);
    d.t.set_balloon_target(1000);
    assert_eq!(d.irq_count(), irqs + 1, "an unchanged target is not announced");

    d.t.write(CONFIG_OFFSET + 4, &600u32.to_le_bytes());
    assert_eq!(d.t.device().actual_pages(), 600);
    assert_eq!(read(&mut d, 4), 600);
    // The target is the VMM's, not the driver's.
    d.t.write(CONFIG_OFFSET, &5u32.to_le_bytes());
    d.t.write(CONFIG_OFFSET + 6, &[0; 4]);
    assert_eq!(d.t.device().target_pages(), 1000);
    assert_eq!(d.t.device().actual_pages(), 600);
    assert_eq!(d.t.device().counters().config_write_refused, 2);
    // Reads past the fields read 0.
    let mut b = [0xffu8; 16];
    d.t.read(CONFIG_OFFSET + 2, &mut b);
    assert_eq!(&b[..6], &[0, 0, 0x58, 0x02, 0, 0]);
    assert!(b[6..].iter().all(|&x| x == 0));
}

#[test]
fn reset_empties_the_balloon_but_keeps_the_target() {
    let (mut d, rec) = live();
    d.t.set_balloon_target(64);
    d.t.write(CONFIG_OFFSET + 4, &64u32.to_le_bytes());
    send_pfns(&mut d, INFLATE, &[40, 41]);
    rec.take();
    d.init(all_features(), 4, 16);
    assert_eq!(d.t.device().actual_pages(), 0);
    assert_eq!(d.t.device().target_pages(), 64);
    // The pages were forgotten with the old driver: inflating them again is new.
    send_pfns(&mut d, INFLATE, &[40, 41]);
    assert_eq!(rec.take(), vec![(Op::Discard, vec![pages(40, 2)])]);
    assert_eq!(d.t.device().counters().repeated_pfns, 0);
}

#[test]
fn backend_failures_are_counted_and_the_device_goes_on() {
    let (mut d, rec) = live();
    rec.fail.store(true, Ordering::SeqCst);
    send_pfns(&mut d, INFLATE, &[1]);
    rec.fail.store(false, Ordering::SeqCst);
    send_pfns(&mut d, INFLATE, &[2]);
    assert_eq!(rec.take().len(), 2);
    assert_eq!(d.t.device().counters().backend_errors, 1);
    assert_eq!(used(&d, INFLATE), 2);
}

#[test]
fn stats_polling_interval_changes() {
    let mut b = Balloon::new(BalloonConfig::default(), Box::new(Recorder::default()));
    assert_eq!(b.set_stats_polling_interval(5), Err(Error::StatsDisabled));
    let mut b = Balloon::new(ALL, Box::new(Recorder::default()));
    assert_eq!(b.set_stats_polling_interval(0), Err(Error::StatsIntervalZero));
    assert_eq!(b.set_stats_polling_interval(5), Ok(()));
    assert_eq!(b.stats_polling_interval(), Some(Duration::from_secs(5)));
}

#[test]
fn a_stats_buffer_offered_before_driver_ok_is_held_at_activation() {
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;

    // Linux's driver primes the stats queue and kicks it before DRIVER_OK.
    let mut d = Driver::new(Balloon::new(ALL, Box::new(Recorder::default())));
    assert!(d.negotiate(all_features()));
    for q in 0..4 {
        d.setup_ring(q, crate::virtio::test_utils::Ring::new(q, 16));
    }
    let mem = d.mem.clone();
    let buf = stats_buffer(&[(tag::AVAIL, 7 << 20)]);
    mem.write_slice(&buf, GuestAddress(DATA)).expect("stats");
    d.rings[STATS as usize].add(&mem, &[(DATA, buf.len() as u32, 0)]);
    d.kick(STATS);
    assert_eq!(d.t.device().counters().stats_updates, 0);
    d.add_status(VIRTIO_CONFIG_S_DRIVER_OK);
    assert_eq!(d.t.device().latest_stats().available_memory, Some(7 << 20));
    assert_eq!(used(&d, STATS), 0);
    assert!(d.t.request_balloon_stats(Instant::now()));
    assert_eq!(used(&d, STATS), 1);
}

#[test]
fn deflating_below_the_target_is_accepted_and_counted() {
    let (mut d, rec) = live();
    d.t.set_balloon_target(4);
    send_pfns(&mut d, INFLATE, &[0x200, 0x201, 0x202, 0x203, 0x204]);
    // Down to the target: nothing below it; then 3 pages on its own (OOM).
    send_pfns(&mut d, DEFLATE, &[0x204]);
    send_pfns(&mut d, DEFLATE, &[0x200, 0x201, 0x202]);
    assert_eq!(rec.take().last(), Some(&(Op::Reclaim, vec![pages(0x200, 3)])));
    let c = d.t.device().counters();
    assert_eq!((c.deflated_pages, c.deflated_below_target_pages), (4, 3));
    assert!(d.t.is_active());
}
