//! Torture test of the remap protocol with real vCPUs: two workload-guest microVMs
//! rewrite and verify their memory at full speed while another thread merges pages
//! across the VMs, unshares, migrates frames and discards unused pages as fast as it
//! can. Afterwards both guests must have verified every page with 0 mismatches
//! (their final pass re-reads every page), every shared frame must hold what all its
//! mappers expect, and discarded pages must read zero.
//!
//! Runs for a few seconds in the suite; set `DENSEVM_TORTURE_SECS` for longer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memory::MemoryManager;
use vmm::guest_ram::RamPolicy;
use vmm::host::{Host, HostConfig};
use vmm::vm::{BootSource, MergeSpec, SerialOut, VmSpec, VmState};
use vmm::workload::mem_mib as workload_mem_mib;
use vmm::workload::scenario::Scenario;

const DOMAIN: u32 = 0xbeef;

fn spec(id: &str, seed: u64, secs: u64) -> VmSpec {
    let scenario = Scenario {
        fill_mib: 8,
        zero_fraction: 0.1,
        shared_fraction: 0.7,
        shared_seed: 77,
        seed: Some(seed),
        write_fraction: 0.3,
        writes_per_s: 20_000,
        duration_s: secs,
        balloon_hold_ms: None,
        balloon_oom_deflate_mib: None,
    };
    VmSpec {
        id: id.into(),
        vcpus: 1,
        // Spare RAM above the data pages, for discards the guest never touches.
        mem_mib: workload_mem_mib(scenario.fill_mib) + 4,
        boot: BootSource::Workload(scenario),
        serial: SerialOut::None,
        ram: RamPolicy::Managed,
        pause_after_fill: true,
        merge: MergeSpec::default(),
        balloon: None,
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default)]
struct OpCounts {
    merges: AtomicU64,
    unshares: AtomicU64,
    migrations: AtomicU64,
    discards: AtomicU64,
}

/// Memory operations against two running guests until `stop`.
fn torture(
    mgr: Arc<MemoryManager>,
    vms: [u32; 2],
    data: (u32, u32),
    spare: (u32, u32),
    stop: Arc<AtomicBool>,
    counts: Arc<OpCounts>,
) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (first, end) = data;
    while !stop.load(Ordering::Relaxed) {
        let p = first + rng.below(u64::from(end - first)) as u32;
        let vm = vms[rng.below(2) as usize];
        match rng.below(8) {
            0..=3 => {
                if let Ok(memory::manager::MergeOutcome::Merged { .. }) = mgr.merge_pages((vms[0], p), (vms[1], p)) {
                    counts.merges.fetch_add(1, Ordering::Relaxed);
                }
            }
            4 => {
                if mgr.unshare(vm, p).unwrap_or(false) {
                    counts.unshares.fetch_add(1, Ordering::Relaxed);
                }
            }
            5 | 6 => {
                if let Ok(frame) = mgr.frame_of(vm, p) {
                    if mgr.migrate(frame).is_ok() {
                        counts.migrations.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ => {
                let q = spare.0 + rng.below(u64::from(spare.1 - spare.0)) as u32;
                if rng.below(2) == 0 {
                    mgr.discard(vm, q).expect("discard a spare page");
                    counts.discards.fetch_add(1, Ordering::Relaxed);
                } else {
                    // The balloon's batched discard of a short run (1..=3 pages: discarded in place).
                    let n = (1 + rng.below(3) as u32).min(spare.1 - q);
                    mgr.discard_range(vm, q, n).expect("discard spare pages");
                    counts.discards.fetch_add(u64::from(n), Ordering::Relaxed);
                }
            }
        }
    }
}

#[test]
fn guests_verify_every_page_while_pages_are_merged_migrated_and_discarded() {
    if !e2e::kvm_available("vcpu_torture") {
        return;
    }
    let secs: u64 = std::env::var("DENSEVM_TORTURE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let mut host = match Host::new(HostConfig { pool_bytes: 1 << 30 }) {
        Ok(h) => h,
        Err(e) => {
            e2e::skip("vcpu_torture", &format!("cannot create the host: {e}"));
            return;
        }
    };
    host.create_vm(spec("a", 1, secs)).unwrap();
    host.create_vm(spec("b", 2, secs)).unwrap();
    let ids = ["a", "b"].map(|id| host.vm(id).unwrap().ram().guest_map().unwrap().vm_id());
    let mgr = host.memory().clone();
    for id in ids {
        mgr.set_merge(id, false, DOMAIN).unwrap();
    }
    host.start_all().unwrap();

    // Wait until both guests filled their memory (they pause themselves then).
    let deadline = Instant::now() + Duration::from_secs(60);
    while ["a", "b"].iter().any(|id| host.vm(id).unwrap().state() != VmState::Paused) {
        for id in ["a", "b"] {
            host.vm_mut(id).unwrap().handle_events();
        }
        assert!(Instant::now() < deadline, "guests did not fill in time");
        std::thread::sleep(Duration::from_millis(5));
    }
    let layout = host.vm("a").unwrap().workload().unwrap().layout;
    let first = (layout.data_gpa / 4096) as u32;
    let end = first + layout.data_pages as u32;
    let spare_end = (layout.ram_size / 4096) as u32;
    assert!(spare_end > end + 256, "spare pages above the data");

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(OpCounts::default());
    let t = {
        let (mgr, stop, counts) = (mgr.clone(), stop.clone(), counts.clone());
        std::thread::spawn(move || torture(mgr, ids, (first, end), (end, spare_end), stop, counts))
    };
    for id in ["a", "b"] {
        host.vm_mut(id).unwrap().resume().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(secs + 60);
    while !host.all_finished() {
        for id in ["a", "b"] {
            host.vm_mut(id).unwrap().handle_events();
        }
        assert!(Instant::now() < deadline, "guests did not finish");
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();

    for id in ["a", "b"] {
        let vm = host.vm(id).unwrap();
        let r = vm.workload_report().unwrap();
        assert_eq!(vm.timeline().exit_reason.as_deref(), Some("workload finished"), "{id}: {:?}", vm.timeline());
        assert_eq!(r.mismatches, 0, "{id}: guest saw {} mismatching pages ({r:?})", r.mismatches);
        assert_eq!(vm.timeline().mismatch_events, 0);
        assert!(r.pages_written > 1000, "{id}: the write loop ran ({r:?})");
    }
    // Every shared frame holds identical content for all its mappers; spare pages
    // the guests never touched read zero.
    let maps = ["a", "b"].map(|id| host.vm(id).unwrap().ram().guest_map().unwrap());
    let mut shared = 0;
    for p in first..end {
        let (fa, fb) = (mgr.frame_of(ids[0], p).unwrap(), mgr.frame_of(ids[1], p).unwrap());
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        maps[0].read_bytes(u64::from(p) * 4096, &mut a).unwrap();
        maps[1].read_bytes(u64::from(p) * 4096, &mut b).unwrap();
        if fa == fb {
            shared += 1;
            assert_eq!(a, b, "page {p} shares frame {fa} but reads differently");
        }
    }
    for p in end..spare_end {
        let mut buf = vec![0u8; 4096];
        maps[0].read_bytes(u64::from(p) * 4096, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0), "spare page {p} of a is not zero");
    }
    let c = &counts;
    eprintln!(
        "vcpu_torture: {secs} s, merges {}, unshares {}, migrations {}, discards {}, pages still shared {shared}, \
         cow copies {}, fault-time reuses {}, background reuses {}",
        c.merges.load(Ordering::Relaxed),
        c.unshares.load(Ordering::Relaxed),
        c.migrations.load(Ordering::Relaxed),
        c.discards.load(Ordering::Relaxed),
        mgr.stats().counters.cow_copies,
        mgr.stats().counters.cow_reuses,
        mgr.stats().counters.cow_background_reuses,
    );
    assert!(c.merges.load(Ordering::Relaxed) > 100, "the torture thread merged pages");
}

/// Page-table pages are identical across clones and get merged; the guests' page
/// walks must not need to write them (Accessed/Dirty bits are preset), or a walk
/// over a write-protected page-table page fails under shadow paging and the guest
/// takes a fault it cannot handle.
#[test]
fn guests_run_on_merged_page_tables() {
    if !e2e::kvm_available("guests_run_on_merged_page_tables") {
        return;
    }
    let mut host = match Host::new(HostConfig { pool_bytes: 1 << 30 }) {
        Ok(h) => h,
        Err(e) => {
            e2e::skip("guests_run_on_merged_page_tables", &format!("cannot create the host: {e}"));
            return;
        }
    };
    for (id, seed) in [("a", 1), ("b", 2)] {
        let mut s = spec(id, seed, 1);
        s.pause_after_fill = false;
        host.create_vm(s).unwrap();
    }
    let ids = ["a", "b"].map(|id| host.vm(id).unwrap().ram().guest_map().unwrap().vm_id());
    let mgr = host.memory().clone();
    for id in ids {
        mgr.set_merge(id, false, DOMAIN).unwrap();
    }
    // PML4, PDPT and the first page directory, plus the GDT and the code page.
    let pages = [
        vmm::workload::layout::PML4_GPA,
        vmm::workload::layout::PDPT_GPA,
        vmm::workload::layout::PD_GPA,
        vmm::workload::layout::GDT_GPA,
        vmm::workload::layout::CODE_GPA,
    ];
    for gpa in pages {
        let p = (gpa / 4096) as u32;
        let outcome = mgr.merge_pages((ids[0], p), (ids[1], p)).unwrap();
        assert!(matches!(outcome, memory::manager::MergeOutcome::Merged { .. }), "page {gpa:#x}: {outcome:?}");
    }
    host.start_all().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !host.all_finished() {
        for id in ["a", "b"] {
            host.vm_mut(id).unwrap().handle_events();
        }
        assert!(Instant::now() < deadline, "guests did not finish");
        std::thread::sleep(Duration::from_millis(5));
    }
    for id in ["a", "b"] {
        let vm = host.vm(id).unwrap();
        assert_eq!(vm.timeline().exit_reason.as_deref(), Some("workload finished"), "{id}: {:?}", vm.timeline());
        assert_eq!(vm.workload_report().unwrap().mismatches, 0);
    }
    // The page-table pages stayed shared: no write ever reached them.
    for gpa in &pages[..3] {
        let p = (gpa / 4096) as u32;
        assert_eq!(mgr.frame_of(ids[0], p).unwrap(), mgr.frame_of(ids[1], p).unwrap(), "page {gpa:#x}");
    }
}
