//! The guest's bad input to the balloon: each case refused and counted, the
//! device going on.

use super::*;

#[test]
fn inflating_twice_and_deflating_pages_not_inflated_are_counted() {
    let (mut d, rec) = live();
    send_pfns(&mut d, INFLATE, &[5, 5, 6]);
    send_pfns(&mut d, INFLATE, &[6, 7]);
    send_pfns(&mut d, DEFLATE, &[7, 8, 9]);
    assert_eq!(
        rec.take(),
        vec![(Op::Discard, vec![pages(5, 2)]), (Op::Discard, vec![pages(7, 1)]), (Op::Reclaim, vec![pages(7, 1)])]
    );
    let c = d.t.device().counters();
    assert_eq!((c.inflated_pages, c.repeated_pfns, c.deflated_pages, c.not_inflated_pfns), (3, 2, 1, 2));
    // A chain of nothing but refused PFNs makes no backend call and is still returned.
    send_pfns(&mut d, DEFLATE, &[8]);
    assert!(rec.take().is_empty());
    assert_eq!(used(&d, DEFLATE), 2);
}

#[test]
fn out_of_range_pfns_are_skipped() {
    let (mut d, rec) = live();
    let last = (MEM_SIZE >> 12) as u32 - 1;
    send_pfns(&mut d, INFLATE, &[last + 1, u32::MAX, last, 3]);
    assert_eq!(rec.take(), vec![(Op::Discard, vec![pages(3, 1), pages(u64::from(last), 1)])]);
    assert_eq!(d.t.device().counters().bad_pfns, 2);
    assert_eq!(used(&d, INFLATE), 1);
}

/// Offers a chain to the inflate queue, expects it refused and counted, then
/// checks that the device still serves a good buffer.
fn assert_refused(d: &mut Driver<Balloon>, rec: &Recorder, offer: impl FnOnce(&mut Driver<Balloon>)) {
    let before = d.t.device().counters().bad_descriptors;
    let used_before = used(d, INFLATE);
    offer(d);
    d.kick(INFLATE);
    assert_eq!(d.t.device().counters().bad_descriptors, before + 1);
    assert!(rec.take().is_empty(), "nothing of a refused chain reaches the backend");
    assert_eq!(used(d, INFLATE), used_before + 1, "the refused chain goes back");
    assert!(d.t.is_active(), "a bad buffer does not stop the device");
    put_pfns(d, DATA + 0x8000, &[0x700]);
    let mem = d.mem.clone();
    d.rings[0].add(&mem, &[(DATA + 0x8000, 4, 0)]);
    d.kick(INFLATE);
    assert_eq!(rec.take(), vec![(Op::Discard, vec![pages(0x700, 1)])]);
    send_pfns(d, DEFLATE, &[0x700]);
    rec.take();
}

#[test]
fn bad_descriptors_are_refused_and_counted() {
    let (mut d, rec) = live();
    let mem = d.mem.clone();
    // Outside guest memory, and straddling its end.
    assert_refused(&mut d, &rec, |d| {
        d.rings[0].add(&mem, &[(MEM_SIZE + 0x1000, 8, 0)]);
    });
    assert_refused(&mut d, &rec, |d| {
        d.rings[0].add(&mem, &[(MEM_SIZE - 4, 8, 0)]);
    });
    // Wrong lengths: not whole PFNs, or empty.
    put_pfns(&d, DATA, &[1, 2]);
    assert_refused(&mut d, &rec, |d| {
        d.rings[0].add(&mem, &[(DATA, 6, 0)]);
    });
    assert_refused(&mut d, &rec, |d| {
        d.rings[0].add(&mem, &[(DATA, 0, 0)]);
    });
    // Write-only where the device reads.
    assert_refused(&mut d, &rec, |d| {
        d.rings[0].add(&mem, &[(DATA, 8, WRITE)]);
    });
    // A loop: descriptor 14 -> 15 -> 14.
    assert_refused(&mut d, &rec, |d| {
        let r = &mut d.rings[0];
        r.write_desc(&mem, 14, DATA, 4, 1, 15);
        r.write_desc(&mem, 15, DATA, 4, 1, 14);
        r.publish(&mem, 14);
    });
    // A next index past the table.
    assert_refused(&mut d, &rec, |d| {
        let r = &mut d.rings[0];
        r.write_desc(&mem, 13, DATA, 4, 1, 200);
        r.publish(&mem, 13);
    });
    assert_eq!(d.t.device().counters().bad_descriptors, 7);
    assert!(!d.needs_reset());
}

#[test]
fn bad_statistics_buffers_are_returned_and_counted() {
    let (mut d, _) = live();
    let mem = d.mem.clone();
    d.rings[STATS as usize].add(&mem, &[(DATA, 15, 0)]);
    d.kick(STATS);
    d.rings[STATS as usize].add(&mem, &[(DATA, 20, WRITE)]);
    d.kick(STATS);
    d.rings[STATS as usize].add(&mem, &[(DATA, 8000, 0)]);
    d.kick(STATS);
    assert_eq!(d.t.device().counters().bad_descriptors, 3);
    assert_eq!(d.t.device().counters().stats_updates, 0);
    assert_eq!(used(&d, STATS), 3);
    // A second good buffer while one is held: the held one goes back.
    d.rings[STATS as usize].add(&mem, &[(DATA, 10, 0)]);
    d.rings[STATS as usize].add(&mem, &[(DATA, 10, 0)]);
    d.kick(STATS);
    assert_eq!(d.t.device().counters().stats_protocol_errors, 1);
    assert_eq!(used(&d, STATS), 4);
    assert!(d.t.is_active());
}

/// One step of a hostile driver.
#[derive(Clone, Debug)]
enum Step {
    /// A register or config access of any width at any offset below 0x120.
    Write(u64, usize, u64),
    Read(u64, usize),
    Kick(u32),
    /// Garbage into the rings or the data buffers.
    Scribble(u64, u64),
    Target(u32),
    PollStats,
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    let width = prop_oneof![Just(1usize), Just(2), Just(4), Just(8)];
    prop_oneof![
        (0u64..0x120, width.clone(), any::<u64>()).prop_map(|(o, w, v)| Step::Write(o, w, v)),
        (0u64..0x120, width).prop_map(|(o, w)| Step::Read(o, w)),
        (0u32..6).prop_map(Step::Kick),
        (0x10000u64..0x60000, any::<u64>()).prop_map(|(a, v)| Step::Scribble(a, v)),
        (DATA..DATA + 0x2000, any::<u64>()).prop_map(|(a, v)| Step::Scribble(a, v)),
        any::<u32>().prop_map(Step::Target),
        Just(Step::PollStats),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Whatever a driver writes, the device never panics, never runs without
    /// FEATURES_OK, and never hands the backend a range outside guest memory.
    #[test]
    fn a_hostile_driver_never_panics_the_device(from_live: bool, steps in proptest::collection::vec(step(), 1..300)) {
        use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK};

        let (mut d, rec) = if from_live {
            live()
        } else {
            let rec = Recorder::default();
            (Driver::new(Balloon::new(ALL, Box::new(rec.clone()))), rec)
        };
        let mem = d.mem.clone();
        if from_live {
            // Something real to chew on.
            send_pfns(&mut d, INFLATE, &[1, 2, 3]);
        }
        for s in steps {
            match s {
                Step::Write(o, w, v) => d.t.write(o, &v.to_le_bytes()[..w]),
                Step::Read(o, w) => d.t.read(o, &mut [0u8; 8][..w]),
                Step::Kick(q) => d.kick(q),
                Step::Scribble(a, v) => mem.write_obj(v, GuestAddress(a)).expect("scribble"),
                Step::Target(p) => d.t.set_balloon_target(p),
                Step::PollStats => {
                    d.t.poll_balloon_stats(Instant::now() + Duration::from_secs(5));
                }
            }
            let st = d.t.status();
            proptest::prop_assert!(st & VIRTIO_CONFIG_S_DRIVER_OK == 0 || st & VIRTIO_CONFIG_S_FEATURES_OK != 0);
        }
        for (_, ranges) in rec.take() {
            for (start, len) in ranges {
                proptest::prop_assert!(start.0 + len <= MEM_SIZE && len > 0);
            }
        }
    }
}
