//! Where a write fault's time goes: the stages the Protector's handler thread
//! stamps ([`memory::uffd::trace`]) per fault, plus, for the host-thread cases,
//! the writer's own stamps around its store (same TSC), so that the kernel's
//! part before the handler runs and after it woke the writer is measured too.
//! For the guest cases the vCPU side is not stamped per fault (the workload
//! guest reports only sums): it is the guest-observed median minus the
//! handler's median.

use std::collections::HashMap;

use memory::uffd::trace::Batch;
use serde_json::{json, Map, Value};

use crate::bench::report::{fmt, spread};

/// The stages: key, what, whose time it is.
pub(super) const STAGES: [(&str, &str, &str); 10] = [
    ("entry", "store -> handler's poll returns (fault, uffd msg, handler wakeup)", "host kernel"),
    ("read", "read(2) of the uffd message", "densevm (syscall)"),
    ("resolve", "resolver: lock, bookkeeping, copy, remap, ioctls", "densevm"),
    ("protect_ioctls", "  of which UFFDIO_WRITEPROTECT", "densevm (ioctl)"),
    ("register_ioctls", "  of which UFFDIO_REGISTER", "densevm (ioctl)"),
    ("resolve_rest", "  the rest: lock, copy, mmap+madvise, bookkeeping", "densevm"),
    ("wake", "UFFDIO_WAKE (returns after the woken writer ran, if it preempted)", "densevm (ioctl)"),
    ("handler", "handler total: poll returns -> writer woken", "densevm"),
    ("exit", "UFFDIO_WAKE called -> store done (wakeup, fault retry)", "host kernel"),
    ("total", "store -> store done", "all"),
];

/// Per-fault stage durations (ns) of one case, pooled over repetitions.
#[derive(Clone, Debug, Default)]
pub(super) struct Samples {
    stages: HashMap<&'static str, Vec<f64>>,
}

impl Samples {
    /// The stages of the single-fault batches in `batches` whose page lies in
    /// `pages` (host addresses), with `writer`'s stamps (page -> store start
    /// and end TSC) when a host thread wrote.
    pub(super) fn from_batches(
        batches: &[Batch],
        pages: std::ops::Range<u64>,
        tsc_khz: u64,
        writer: Option<&HashMap<u64, (u64, u64)>>,
    ) -> Self {
        let ns = |c: u64| c as f64 * 1e6 / tsc_khz.max(1) as f64;
        let d = |a: u64, b: u64| ns(b.saturating_sub(a));
        let mut s = Samples::default();
        for b in batches.iter().filter(|b| b.faults == 1 && pages.contains(&b.first_page)) {
            let ioctls = b.protect_cycles + b.register_cycles;
            let mut add = |k: &'static str, v: f64| s.stages.entry(k).or_default().push(v);
            add("read", d(b.poll_return, b.read_done));
            add("resolve", d(b.resolve_start, b.resolve_end));
            add("protect_ioctls", ns(b.protect_cycles));
            add("register_ioctls", ns(b.register_cycles));
            add("resolve_rest", ns((b.resolve_end.saturating_sub(b.resolve_start)).saturating_sub(ioctls)));
            add("wake", d(b.resolve_end, b.wake_end));
            add("handler", d(b.poll_return, b.wake_end));
            if let Some(&(t0, t1)) = writer.and_then(|w| w.get(&b.first_page)) {
                add("entry", d(t0, b.poll_return));
                add("exit", d(b.resolve_end, t1));
                add("total", d(t0, t1));
            }
        }
        s
    }

    /// Adds another repetition's samples.
    pub(super) fn extend(&mut self, o: Samples) {
        for (k, v) in o.stages {
            self.stages.entry(k).or_default().extend(v);
        }
    }

    /// Faults sampled.
    pub(super) fn faults(&self) -> usize {
        self.stages.get("handler").map_or(0, Vec::len)
    }

    fn spread(&self, key: &str) -> Option<crate::bench::report::Spread> {
        spread(self.stages.get(key).into_iter().flatten().map(|&v| Some(v)))
    }
}

/// Prints, per case, every stage's min / median / max over its faults (µs);
/// for guest cases (`guest_median_ns`: the guest-observed median over the
/// repetitions) the vCPU side as the guest median minus the handler's. Returns
/// the table as JSON.
pub(super) fn report(cases: &[(&str, &Samples, Option<f64>)]) -> Value {
    println!("where a write fault's time goes (per fault, microseconds, pooled over the repetitions):");
    println!("{:<11} {:<68} {:<18} {:>8} {:>8} {:>8} {:>6}", "case", "stage", "whose", "min", "median", "max", "n");
    let mut out = Map::new();
    for &(name, s, guest_median_ns) in cases {
        let mut cj = Map::new();
        for (key, what, whose) in STAGES {
            let Some(sp) = s.spread(key) else { continue };
            let us = |v: f64| fmt(Some(v / 1e3), 2);
            println!(
                "{name:<11} {what:<68} {whose:<18} {:>8} {:>8} {:>8} {:>6}",
                us(sp.min),
                us(sp.median),
                us(sp.max),
                sp.n
            );
            cj.insert(
                key.into(),
                json!({ "what": what, "whose": whose, "us": json!({
                "min": sp.min / 1e3, "median": sp.median / 1e3, "max": sp.max / 1e3, "n": sp.n }) }),
            );
        }
        if let (Some(g), Some(h)) = (guest_median_ns, s.spread("handler")) {
            let vcpu = g - h.median;
            println!(
                "{name:<11} {:<68} {:<18} {:>8} {:>8} {:>8}",
                "guest-observed median (over the repetitions)",
                "all",
                "",
                fmt(Some(g / 1e3), 2),
                ""
            );
            println!(
                "{name:<11} {:<68} {:<18} {:>8} {:>8} {:>8}",
                "  vCPU side = guest median - handler median (exit, fault-in, wakeups)",
                "host kernel + KVM",
                "",
                fmt(Some(vcpu / 1e3), 2),
                ""
            );
            cj.insert("guest_median_us".into(), json!(g / 1e3));
            cj.insert("vcpu_side_median_us".into(), json!(vcpu / 1e3));
        }
        out.insert(name.into(), Value::Object(cj));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_of_one_fault() {
        // 1 GHz TSC: 1 cycle = 1 ns.
        let b = Batch {
            poll_return: 1_000,
            read_done: 1_100,
            faults: 1,
            first_page: 0x5000,
            resolve_start: 1_150,
            resolve_end: 2_150,
            wake_end: 2_450,
            protect_ioctls: 1,
            protect_cycles: 600,
            register_ioctls: 0,
            register_cycles: 0,
            wake_ioctls: 1,
        };
        let other = Batch { first_page: 0x9000, ..b };
        let two = Batch { faults: 2, ..b };
        let writer: HashMap<u64, (u64, u64)> = [(0x5000, (400, 3_000))].into();
        let s = Samples::from_batches(&[b, other, two], 0x4000..0x8000, 1_000_000, Some(&writer));
        let at = |k: &str| s.stages[k].clone();
        assert_eq!(s.faults(), 1);
        assert_eq!(at("read"), [100.0]);
        assert_eq!(at("resolve"), [1000.0]);
        assert_eq!(at("protect_ioctls"), [600.0]);
        assert_eq!(at("resolve_rest"), [400.0]);
        assert_eq!(at("wake"), [300.0]);
        assert_eq!(at("handler"), [1450.0]);
        assert_eq!((at("entry"), at("exit"), at("total")), (vec![600.0], vec![850.0], vec![2600.0]));
        let v = report(&[("wp-host", &s, None), ("wp-only", &s, Some(5_000.0))]);
        assert_eq!(v["wp-only"]["vcpu_side_median_us"], json!(3.55));
        assert_eq!(v["wp-host"]["total"]["us"]["median"], json!(2.6));
    }
}
