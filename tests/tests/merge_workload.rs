//! End-to-end tests of densevm's same-page merger with real workload-guest
//! microVMs (KVM), carrying over the semantics of the kernel's KSM selftests
//! (tools/testing/selftests/mm/ksm_tests.c and ksm_functional_tests.c):
//!
//! - `-M`: identical pages of VMs in one merge domain end on one frame each;
//!   pages_shared/pages_sharing as ksm_tests computes them, with
//!   `max_page_sharing` chaining;
//! - `-U`: merged pages the guests rewrite get private frames, pages_sharing
//!   drops after one more scan;
//! - `-Z`: zero pages with `merge_zero_pages` (counted as zero_pages, across
//!   domains, host memory dropped) and without (merged inside each domain only);
//! - unmerge-all gives every page a private frame again and the guests keep
//!   verifying (ksm_functional_tests' unmerge tests), also when it races with
//!   the guests' write loop;
//! - discarded pages are not counted;
//! - VMs of different merge domains never share a physical frame (checked with
//!   /proc/self/pagemap PFNs of the guest RAM, not only densevm's tables), also
//!   after a VM moves from one domain to another;
//! - guests verify every page with 0 mismatches while merging runs at full
//!   speed with the write loop active (dirty-log and checksum change
//!   detection), and while a merged VM is destroyed and a new one joins.
//!
//! Every guest pauses after its fill (`pause_after_fill`), so the checks of
//! frame identity see still memory; afterwards the guests are resumed and must
//! finish with 0 mismatches (their final pass re-reads every page).
//!
//! Each test builds its own [`Host`] (own memory manager, own scanner thread,
//! own VMs), so the tests may run in parallel threads; the suite runs them with
//! `--test-threads=1` only to keep the shared cores calm. Nothing here asserts
//! on timing: the long timeouts only turn a hang into a failure.
//! Without /dev/kvm every test prints `SKIPPED <name>: <reason>` and passes.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memory::merge::{ChangeDetection, MergeStats, Tunables};
use memory::{MemoryManager, PageFlags, VmId};
use vmm::domains::DomainPolicy;
use vmm::guest_ram::RamPolicy;
use vmm::host::{Host, HostConfig};
use vmm::vm::{BootSource, MergeSpec, SerialOut, VmSpec, VmState};
use vmm::workload::layout::VERSIONS_GPA;
use vmm::workload::mem_mib as workload_mem_mib;
use vmm::workload::scenario::Scenario;

const PAGE: u64 = 4096;
/// Safety net against hangs (never a timing assertion).
const HANG: Duration = Duration::from_secs(120);

/// One VM of a test: id, scenario, named merge domain (None: its own), and
/// MiB of spare RAM above the workload's needs.
struct VmDef {
    id: &'static str,
    scenario: Scenario,
    domain: Option<&'static str>,
    spare_mib: u64,
}

/// A workload scenario: `fill_mib` MiB of data, fractions of zero and shared
/// pages, the write loop's fraction and rate, and its duration.
fn scenario(fill_mib: u32, zero: f64, shared: f64, write: f64, writes_per_s: u64, secs: u64, seed: u64) -> Scenario {
    Scenario {
        fill_mib,
        zero_fraction: zero,
        shared_fraction: shared,
        shared_seed: 0x5eed,
        seed: Some(seed),
        write_fraction: write,
        writes_per_s,
        duration_s: secs,
        balloon_hold_ms: None,
        balloon_oom_deflate_mib: None,
    }
}

/// Merging at full speed (no sleep, whole memory per batch) with the KVM dirty
/// log as change detection.
fn full_speed(max_page_sharing: u32, merge_zero_pages: bool) -> Tunables {
    Tunables {
        max_page_sharing,
        merge_zero_pages,
        change_detection: ChangeDetection::DirtyLog,
        ..Tunables::full_speed()
    }
}

/// ksm_tests.c `assert_ksm_pages_count`: expected (pages_shared, pages_sharing)
/// for `dupl` identical pages with `max_page_sharing` `mps`.
fn expected_counts(dupl: u64, mps: u64) -> (u64, u64) {
    if dupl % mps <= 1 {
        let shared = dupl / mps;
        (shared, shared * (mps - 1))
    } else {
        let shared = dupl / mps + 1;
        (shared, dupl - shared)
    }
}

/// The microVMs of one test, on their own host; every VM has paused after its fill.
struct Fleet {
    name: &'static str,
    host: Host,
    ids: Vec<&'static str>,
    /// Memory-manager id of each VM (same order as `ids`).
    mem: Vec<VmId>,
    /// Guest page range of the data pages (identical layout in every VM of a test).
    data: std::ops::Range<u32>,
    /// Guest pages of RAM per VM.
    ram_pages: Vec<u32>,
}

impl Fleet {
    /// Creates and starts the VMs and waits until every guest filled its data
    /// pages and paused. `None` (after printing `SKIPPED`) without KVM.
    fn start(name: &'static str, defs: Vec<VmDef>) -> Option<Fleet> {
        if !e2e::kvm_available(name) {
            return None;
        }
        let mut host = match Host::new(HostConfig { pool_bytes: 1 << 30 }) {
            Ok(h) => h,
            Err(e) => {
                e2e::skip(name, &format!("cannot create the host: {e}"));
                return None;
            }
        };
        let ids: Vec<&'static str> = defs.iter().map(|d| d.id).collect();
        for name in defs.iter().filter_map(|d| d.domain) {
            host.declare_domain(name, DomainPolicy::default()).unwrap();
        }
        for d in defs {
            let spec = VmSpec {
                id: d.id.into(),
                vcpus: 1,
                mem_mib: workload_mem_mib(d.scenario.fill_mib) + d.spare_mib,
                boot: BootSource::Workload(d.scenario),
                serial: SerialOut::None,
                ram: RamPolicy::Managed,
                pause_after_fill: true,
                // Opted in from the start (the dirty log is registered at creation);
                // the scanner itself starts stopped.
                merge: MergeSpec { enabled: true, domain: d.domain.map(String::from) },
                balloon: None,
            };
            host.create_vm(spec).unwrap_or_else(|e| panic!("{name}: creating VM {}: {e}", d.id));
        }
        let mem = ids.iter().map(|id| host.vm(id).unwrap().ram().guest_map().unwrap().vm_id()).collect();
        let ram_pages = ids.iter().map(|id| host.vm(id).unwrap().ram().guest_map().unwrap().pages()).collect();
        let layout = host.vm(ids[0]).unwrap().workload().unwrap().layout;
        let first = (layout.data_gpa / PAGE) as u32;
        let data = first..first + layout.data_pages as u32;
        host.start_all().unwrap();
        let mut fleet = Fleet { name, host, ids, mem, data, ram_pages };
        fleet.wait_until(|f| f.ids.iter().all(|id| f.host.vm(id).unwrap().state() == VmState::Paused), "fill");
        for id in &fleet.ids {
            let l = fleet.host.vm(id).unwrap().workload().unwrap().layout;
            assert_eq!((l.data_gpa / PAGE) as u32, fleet.data.start, "{name}: every VM has the same layout");
        }
        Some(fleet)
    }

    /// Handles VM events until `done` holds.
    fn wait_until(&mut self, done: impl Fn(&Fleet) -> bool, what: &str) {
        let deadline = Instant::now() + HANG;
        while !done(self) {
            for id in self.ids.clone() {
                self.host.vm_mut(id).unwrap().handle_events();
            }
            assert!(Instant::now() < deadline, "{}: the guests did not reach {what}", self.name);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn mgr(&self) -> &Arc<MemoryManager> {
        self.host.memory()
    }

    fn guest(&self, i: usize) -> &memory::GuestMap {
        self.host.vm(self.ids[i]).unwrap().ram().guest_map().unwrap()
    }

    /// Resumes every paused guest.
    fn resume_all(&mut self) {
        for id in self.ids.clone() {
            self.host.vm_mut(id).unwrap().resume().unwrap();
        }
    }

    /// Waits until every guest finished its write loop and final verify pass.
    fn wait_finished(&mut self) {
        self.wait_until(|f| f.host.all_finished(), "the end of their run");
    }

    /// Checks that every guest finished with 0 mismatches; returns (pages
    /// written, pages verified) summed over the guests.
    fn check_reports(&self) -> (u64, u64) {
        let (mut written, mut verified) = (0, 0);
        for id in &self.ids {
            let vm = self.host.vm(id).unwrap();
            let r = vm.workload_report().unwrap();
            assert_eq!(
                vm.timeline().exit_reason.as_deref(),
                Some("workload finished"),
                "{}: VM {id}: {:?}",
                self.name,
                vm.timeline()
            );
            assert_eq!(r.mismatches, 0, "{}: VM {id}: guest saw {} mismatching pages ({r:?})", self.name, r.mismatches);
            assert_eq!(vm.timeline().mismatch_events, 0, "{}: VM {id}", self.name);
            written += r.pages_written;
            verified += r.pages_verified;
        }
        (written, verified)
    }

    /// Resumes every guest, waits for the end of their run and checks 0
    /// mismatches; returns (pages written, pages verified).
    fn run_to_end(&mut self) -> (u64, u64) {
        self.resume_all();
        self.wait_finished();
        self.check_reports()
    }

    /// Runs the merger with `tun` until its counts stop changing (at least 3
    /// full scans, then until two consecutive scans agree), stops it and
    /// returns its statistics.
    fn merge(&self, tun: Tunables) -> MergeStats {
        let merger = self.mgr().merger();
        let base = merger.stats().full_scans;
        merger.set_tunables(tun).unwrap();
        assert!(merger.wait_full_scans(base + 3, HANG), "{}: no progress in full scans", self.name);
        let key = |s: &MergeStats| (s.pages_shared, s.pages_sharing, s.zero_pages, s.merges);
        let mut last = key(&merger.stats());
        for _ in 0..20 {
            let n = merger.stats().full_scans;
            assert!(merger.wait_full_scans(n + 1, HANG), "{}: no progress in full scans", self.name);
            let now = key(&merger.stats());
            if now == last {
                break;
            }
            last = now;
        }
        merger.set_run(false);
        merger.stats()
    }

    /// Runs the merger with `tun` for `n` more full scans, then stops it.
    fn scans(&self, tun: Tunables, n: u64) -> MergeStats {
        let merger = self.mgr().merger();
        let base = merger.stats().full_scans;
        merger.set_tunables(tun).unwrap();
        assert!(merger.wait_full_scans(base + n, HANG), "{}: no progress in full scans", self.name);
        merger.set_run(false);
        merger.stats()
    }

    /// Pages outside the data range that hold host memory, summed over the VMs
    /// (page tables, code, config, stacks, version table): the most that
    /// non-data pages can add to the global counters.
    fn other_resident(&self) -> u64 {
        (0..self.ids.len())
            .map(|i| {
                let g = self.guest(i);
                resident(g.host_addr(), g.pages())
                    .iter()
                    .enumerate()
                    .filter(|&(p, &r)| r && !self.data.contains(&(p as u32)))
                    .count() as u64
            })
            .sum()
    }

    /// The version (rewrite count) of every data page of VM `i` (0: as filled).
    fn versions(&self, i: usize) -> Vec<u32> {
        let n = self.data.len();
        let mut buf = vec![0u8; n * 4];
        self.guest(i).read_bytes(VERSIONS_GPA, &mut buf).unwrap();
        buf.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// The 4 KiB of guest page `p` of VM `i`, read through densevm's alias.
    fn page(&self, i: usize, p: u32) -> Vec<u8> {
        let mut buf = vec![0u8; PAGE as usize];
        self.guest(i).read_bytes(u64::from(p) * PAGE, &mut buf).unwrap();
        buf
    }

    fn frame(&self, i: usize, p: u32) -> u32 {
        self.mgr().frame_of(self.mem[i], p).unwrap()
    }

    fn flags(&self, i: usize, p: u32) -> PageFlags {
        self.mgr().page_flags(self.mem[i], p).unwrap()
    }

    /// Every frame mapped by more than one guest page holds identical content
    /// for all its mappers; returns the number of such frames seen.
    fn check_shared_frames_consistent(&self) -> usize {
        let mut seen: HashMap<u32, Vec<u8>> = HashMap::new();
        for i in 0..self.ids.len() {
            for p in 0..self.ram_pages[i] {
                let f = self.frame(i, p);
                if self.mgr().frame_refs(f) < 2 {
                    continue;
                }
                let content = self.page(i, p);
                match seen.get(&f) {
                    Some(c) => assert!(*c == content, "{}: frame {f} reads differently for its mappers", self.name),
                    None => {
                        seen.insert(f, content);
                    }
                }
            }
        }
        seen.len()
    }
}

/// Host-memory residency of `pages` pages at `addr` (mincore).
fn resident(addr: usize, pages: u32) -> Vec<bool> {
    let mut vec = vec![0u8; pages as usize];
    // SAFETY: `addr..addr + pages * 4096` is the mapped guest RAM of a live VM;
    // `vec` has one byte per page.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, pages as usize * PAGE as usize, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().map(|v| v & 1 == 1).collect()
}

/// The physical frame number behind host address `addr`, read from
/// /proc/self/pagemap after touching the page (a read: it maps the frame the
/// memfd holds without writing). `None` when PFNs are hidden (not root).
fn pfn(pagemap: &std::fs::File, addr: usize) -> Option<u64> {
    // SAFETY: `addr` is a readable page of a live guest's RAM holding host memory.
    let _ = unsafe { std::ptr::read_volatile(addr as *const u8) };
    let mut b = [0u8; 8];
    pagemap.read_exact_at(&mut b, (addr as u64 / PAGE) * 8).unwrap();
    let e = u64::from_ne_bytes(b);
    assert_eq!(e >> 63, 1, "page at {addr:#x} not present after touching it");
    let pfn = e & ((1 << 55) - 1);
    (pfn != 0).then_some(pfn)
}

/// Guest page -> PFN for every page of VM `i` that holds host memory; `None`
/// when PFNs are hidden.
fn pfn_map(f: &Fleet, i: usize, pagemap: &std::fs::File) -> Option<HashMap<u32, u64>> {
    let g = f.guest(i);
    let mut map = HashMap::new();
    for (p, r) in resident(g.host_addr(), g.pages()).into_iter().enumerate() {
        if r {
            map.insert(p as u32, pfn(pagemap, g.host_addr() + p * PAGE as usize)?);
        }
    }
    Some(map)
}

/// PFNs present in both maps.
fn common_pfns(a: &HashMap<u32, u64>, b: &HashMap<u32, u64>) -> usize {
    let set: HashSet<u64> = a.values().copied().collect();
    b.values().filter(|x| set.contains(x)).count()
}

fn merge_report(name: &str, s: &MergeStats) {
    eprintln!(
        "{name}: pages_shared {} pages_sharing {} pages_unshared {} pages_volatile {} zero_pages {} \
         full_scans {} merges {} merge_runs {} stable_node_chains {} general_profit {}",
        s.pages_shared,
        s.pages_sharing,
        s.pages_unshared,
        s.pages_volatile,
        s.zero_pages,
        s.full_scans,
        s.merges,
        s.merge_runs,
        s.stable_node_chains,
        s.general_profit
    );
}

/// `-M` with `n` VMs in one domain holding identical data pages (idle guests)
/// and `max_page_sharing` `mps`.
fn ksm_m(name: &'static str, n: usize, mps: u32) {
    const IDS: [&str; 4] = ["m1", "m2", "m3", "m4"];
    let defs = (0..n)
        .map(|i| VmDef {
            id: IDS[i],
            scenario: scenario(2, 0.0, 1.0, 0.0, 0, 1, 100 + i as u64),
            domain: Some("m"),
            spare_mib: 0,
        })
        .collect();
    let Some(mut f) = Fleet::start(name, defs) else { return };
    let s = f.merge(full_speed(mps, true));
    merge_report(name, &s);
    assert_eq!(s.cross_domain_refusals, 0);
    let data_pages = f.data.len() as u64;
    let (shared_e, sharing_e) = expected_counts(n as u64, u64::from(mps));
    let mut frames_with_dups = 0;
    for p in f.data.clone() {
        let frames: Vec<u32> = (0..n).map(|i| f.frame(i, p)).collect();
        let content = f.page(0, p);
        for i in 1..n {
            assert!(f.page(i, p) == content, "{name}: page {p} differs between VMs (guest content)");
        }
        let distinct: HashSet<u32> = frames.iter().copied().collect();
        for &fr in &distinct {
            let refs = f.mgr().frame_refs(fr);
            assert!(refs <= mps, "{name}: page {p}: frame {fr} has {refs} mappers > max_page_sharing {mps}");
        }
        let shared_frames = distinct.iter().filter(|&&fr| f.mgr().frame_refs(fr) > 1).count() as u64;
        let sharing: u64 =
            distinct.iter().map(|&fr| u64::from(f.mgr().frame_refs(fr))).filter(|&r| r > 1).map(|r| r - 1).sum();
        assert_eq!((shared_frames, sharing), (shared_e, sharing_e), "{name}: page {p}: frames {frames:?}");
        if n as u32 <= mps {
            assert_eq!(distinct.len(), 1, "{name}: page {p} maps one frame in every VM: {frames:?}");
            assert_eq!(f.mgr().frame_refs(frames[0]), n as u32);
        }
        if shared_frames > 1 {
            frames_with_dups += 1;
        }
    }
    // Global counters: at least the data pages' expectation; the other RAM of
    // the VMs (page tables, code, config) may add at most its resident pages.
    let other = f.other_resident();
    assert!(
        s.pages_shared >= shared_e * data_pages && s.pages_sharing >= sharing_e * data_pages,
        "{name}: counters below the data-page expectation ({} x ({shared_e}, {sharing_e})): {s:#?}",
        data_pages
    );
    assert!(
        s.pages_shared <= shared_e * data_pages + other && s.pages_sharing <= sharing_e * data_pages + other,
        "{name}: counters above data pages + {other} other resident pages: {s:#?}"
    );
    if shared_e > 1 {
        assert_eq!(frames_with_dups, data_pages, "{name}: every content is chained over {shared_e} frames");
        assert!(s.stable_node_chains >= data_pages, "{name}: stable node chains: {s:#?}");
    }
    for &vm in &f.mem {
        let vs = f.mgr().vm_merge_stats(vm).unwrap();
        assert!(vs.dirty_log, "{name}: VM {vm} scanned with its dirty log");
    }
    // Idle guests read their merged pages (the scanner is stopped): nothing
    // changes, 0 mismatches, every shared frame still reads the same for all.
    let before: Vec<Vec<u32>> = f.data.clone().map(|p| (0..n).map(|i| f.frame(i, p)).collect()).collect();
    let (_, verified) = f.run_to_end();
    assert!(verified >= 2 * data_pages * n as u64, "{name}: the guests verified their pages");
    let after: Vec<Vec<u32>> = f.data.clone().map(|p| (0..n).map(|i| f.frame(i, p)).collect()).collect();
    assert!(before == after, "{name}: idle guests kept their merged frames");
    assert!(f.check_shared_frames_consistent() as u64 >= shared_e * data_pages);
}

#[test]
fn ksm_m_two_vms_merge_every_data_page_to_one_frame() {
    ksm_m("ksm_m_two_vms", 2, 256);
}

#[test]
fn ksm_m_three_vms_merge_every_data_page_to_one_frame() {
    ksm_m("ksm_m_three_vms", 3, 256);
}

#[test]
fn ksm_m_max_page_sharing_two_with_three_vms() {
    // 3 copies, 2 per frame: one shared frame of 2 mappers, the third copy stays
    // unshared (ksm_tests: dupl % mps == 1).
    ksm_m("ksm_m_mps2_three_vms", 3, 2);
}

#[test]
fn ksm_m_max_page_sharing_two_with_four_vms_chains() {
    // 4 copies, 2 per frame: two frames per content in one stable chain.
    ksm_m("ksm_m_mps2_four_vms", 4, 2);
}

/// `-U`: merged pages rewritten by the guests get private frames (copy for
/// the first writer, reuse for the last mapper); pages_sharing drops after one
/// more scan; the guests verify with 0 mismatches.
#[test]
fn ksm_u_rewritten_merged_pages_get_private_frames() {
    let name = "ksm_u_rewritten_merged_pages_get_private_frames";
    let defs = [("u1", 201), ("u2", 202)]
        .map(|(id, seed)| VmDef {
            id,
            scenario: scenario(2, 0.0, 1.0, 0.25, 4000, 1, seed),
            domain: Some("u"),
            spare_mib: 0,
        })
        .into();
    let Some(mut f) = Fleet::start(name, defs) else { return };
    let tun = full_speed(256, true);
    let s0 = f.merge(tun);
    merge_report(name, &s0);
    for p in f.data.clone() {
        let fa = f.frame(0, p);
        assert_eq!(fa, f.frame(1, p), "{name}: page {p} merged before the writes");
        assert_eq!(f.mgr().frame_refs(fa), 2);
    }
    let cow = |f: &Fleet| -> (u64, u64) {
        f.mem
            .iter()
            .map(|&vm| f.mgr().vm_merge_stats(vm).unwrap())
            .fold((0, 0), |a, v| (a.0 + v.cow_copies, a.1 + v.cow_reuses + v.cow_background_reuses))
    };
    let cow0 = cow(&f);
    // The guests rewrite a quarter of their pages (each VM its own set) while
    // the scanner is stopped.
    let (written, _) = f.run_to_end();
    assert!(written > 0, "{name}: the write loop ran");
    let versions = [f.versions(0), f.versions(1)];
    let (mut untouched, mut any, mut both) = (0u64, 0u64, 0u64);
    for (k, p) in f.data.clone().enumerate() {
        let (wa, wb) = (versions[0][k] > 0, versions[1][k] > 0);
        let (fa, fb) = (f.frame(0, p), f.frame(1, p));
        if !wa && !wb {
            untouched += 1;
            assert_eq!(fa, fb, "{name}: page {p} (not rewritten) stays merged");
            assert_eq!(f.mgr().frame_refs(fa), 2);
            continue;
        }
        any += 1;
        both += u64::from(wa && wb);
        assert_ne!(fa, fb, "{name}: page {p} (rewritten: {wa} {wb}) still maps one frame");
        assert_eq!((f.mgr().frame_refs(fa), f.mgr().frame_refs(fb)), (1, 1), "{name}: page {p}: private frames");
        assert!(f.page(0, p) != f.page(1, p), "{name}: page {p} rewritten with unique content");
    }
    assert!(any > 0 && untouched > 0, "{name}: rewritten {any}, untouched {untouched}");
    let cow1 = cow(&f);
    let (copies, reuses) = (cow1.0 - cow0.0, cow1.1 - cow0.1);
    eprintln!("{name}: {written} rewrites; pages rewritten in some VM {any}, in both {both}; cow copies {copies}, reuses {reuses}");
    // The first write to a page of a 2-mapper frame copies; the old frame is
    // then taken over by the other VM's page, in the background or at its
    // write fault if that write comes first (reuses count both).
    assert!(copies >= any && reuses >= both, "{name}: copies {copies} reuses {reuses}");
    // One more scan: the counters reflect the unmerged pages.
    let s1 = f.scans(tun, 1);
    merge_report(name, &s1);
    let other = f.other_resident();
    assert!(
        s1.pages_sharing < s0.pages_sharing,
        "{name}: pages_sharing dropped: {} -> {}",
        s0.pages_sharing,
        s1.pages_sharing
    );
    assert!(
        s1.pages_sharing >= untouched && s1.pages_sharing <= untouched + other,
        "{name}: pages_sharing {} for {untouched} merged data pages (+ at most {other} other)",
        s1.pages_sharing
    );
    f.check_shared_frames_consistent();
}

/// `-Z` with and without `merge_zero_pages`, for two VMs of all-zero data
/// pages in different merge domains.
fn ksm_z(name: &'static str, merge_zero: bool) {
    let defs = [("z1", 301), ("z2", 302)]
        .map(|(id, seed)| VmDef {
            id,
            scenario: scenario(2, 1.0, 0.0, 0.2, 2000, 1, seed),
            domain: None, // each VM its own domain
            spare_mib: 0,
        })
        .into();
    let Some(mut f) = Fleet::start(name, defs) else { return };
    let data_pages = f.data.len() as u64;
    let host_before = f.mgr().stats().host_bytes;
    let s = f.merge(full_speed(256, merge_zero));
    let host_after = f.mgr().stats().host_bytes;
    merge_report(name, &s);
    eprintln!("{name}: host bytes {host_before} -> {host_after}");
    let other = f.other_resident();
    assert_eq!(s.cross_domain_refusals, 0);
    let domains: Vec<u32> = f.mem.iter().map(|&vm| f.mgr().merge_config(vm).unwrap().domain).collect();
    assert_ne!(domains[0], domains[1], "{name}: the VMs are in different domains");
    if merge_zero {
        // Counted as zero pages in both domains; nothing shared; memory dropped.
        for i in 0..2 {
            for p in f.data.clone() {
                let fl = f.flags(i, p);
                assert!(
                    fl.contains(PageFlags::ZERO) && fl.contains(PageFlags::MERGED_ZERO),
                    "{name}: VM {i} page {p}: {fl:?}"
                );
                // A dropped page maps the never-written zero region (or, where the
                // VMA budget refused that, a punched frame of its own): no domain's data.
                let fr = f.frame(i, p);
                assert!(
                    f.mgr().is_zero_region_frame(fr) || f.mgr().frame_refs(fr) == 1,
                    "{name}: zero page {p} maps frame {fr} with {} refs",
                    f.mgr().frame_refs(fr)
                );
            }
            let vs = f.mgr().vm_merge_stats(f.mem[i]).unwrap();
            assert!(vs.zero_pages >= data_pages, "{name}: VM {i}: {vs:#?}");
        }
        assert!(
            s.zero_pages >= 2 * data_pages && s.zero_pages <= 2 * data_pages + other,
            "{name}: zero_pages {} for 2 x {data_pages} data pages (+ at most {other} other)",
            s.zero_pages
        );
        assert!(
            host_before - host_after >= 2 * data_pages * PAGE,
            "{name}: host memory dropped by the zero pages: {host_before} -> {host_after}"
        );
        assert!(s.general_profit > 0, "{name}: {s:#?}");
    } else {
        // Like any content, inside each domain only (ksm_tests -Z with
        // use_zero_pages 0: the zero pages merge as duplicates).
        assert_eq!(s.zero_pages, 0, "{name}: {s:#?}");
        let (shared_e, sharing_e) = expected_counts(data_pages, 256);
        assert!(
            s.pages_shared >= 2 * shared_e && s.pages_sharing >= 2 * sharing_e,
            "{name}: below 2 x ({shared_e}, {sharing_e}) for {data_pages} zero pages per VM: {s:#?}"
        );
        let mut frames = [HashSet::new(), HashSet::new()];
        for (i, set) in frames.iter_mut().enumerate() {
            for p in f.data.clone() {
                let fr = f.frame(i, p);
                assert!(f.mgr().frame_refs(fr) >= 2, "{name}: VM {i} zero page {p} merged");
                let mappers = f.mgr().frame_mappers(fr);
                assert!(
                    mappers.iter().all(|&(vm, _)| vm == f.mem[i]),
                    "{name}: frame {fr} mapped across domains: {mappers:?}"
                );
                set.insert(fr);
            }
            // Frames needed: one per max_page_sharing copies (and maybe one more
            // for the other zero pages of the VM's RAM).
            assert!(set.len() as u64 <= shared_e + 1 + other / 256, "{name}: VM {i}: {} zero frames", set.len());
        }
        let all = |i: usize| (0..f.ram_pages[i]).map(|p| f.frame(i, p)).collect::<HashSet<u32>>();
        assert_eq!(all(0).intersection(&all(1)).count(), 0, "{name}: the two domains share a frame");
    }
    // The guests rewrite a fifth of their zero pages and verify all of them.
    let (written, _) = f.run_to_end();
    assert!(written > 0);
    for i in 0..2 {
        let v = f.versions(i);
        for (k, p) in f.data.clone().enumerate() {
            let fl = f.flags(i, p);
            if v[k] > 0 {
                assert!(!fl.contains(PageFlags::ZERO), "{name}: VM {i} page {p} rewritten: {fl:?}");
                assert_eq!(f.mgr().frame_refs(f.frame(i, p)), 1);
            } else if merge_zero {
                assert!(fl.contains(PageFlags::MERGED_ZERO), "{name}: VM {i} page {p} untouched: {fl:?}");
            }
        }
    }
    let rewritten: u64 = (0..2).map(|i| f.versions(i).iter().filter(|&&v| v > 0).count() as u64).sum();
    let after = f.mgr().merger().stats();
    if merge_zero {
        assert!(
            after.zero_pages <= s.zero_pages - rewritten,
            "{name}: {} -> {} after {rewritten} rewrites",
            s.zero_pages,
            after.zero_pages
        );
    }
    f.check_shared_frames_consistent();
}

#[test]
fn ksm_z_zero_pages_with_merge_zero_pages() {
    ksm_z("ksm_z_zero_pages_with_merge_zero_pages", true);
}

#[test]
fn ksm_z_zero_pages_without_merge_zero_pages() {
    ksm_z("ksm_z_zero_pages_without_merge_zero_pages", false);
}

/// Unmerge-all (KSM's run = 2, ksm_functional_tests' unmerge tests): every
/// page gets a private frame again, the counters drop to 0, and the guests
/// then run their write loop (no write faults left) and verify with 0 mismatches.
#[test]
fn unmerge_all_restores_private_frames_and_guests_verify() {
    let name = "unmerge_all_restores_private_frames_and_guests_verify";
    let defs = [("a", 401), ("b", 402)]
        .map(|(id, seed)| VmDef {
            id,
            scenario: scenario(4, 0.1, 0.8, 0.3, 5000, 2, seed),
            domain: Some("um"),
            spare_mib: 0,
        })
        .into();
    let Some(mut f) = Fleet::start(name, defs) else { return };
    let s = f.merge(full_speed(256, true));
    merge_report(name, &s);
    let (mut merged, mut zeroed) = (0u64, 0u64);
    for i in 0..2 {
        for p in f.data.clone() {
            merged += u64::from(f.mgr().frame_refs(f.frame(i, p)) > 1);
            zeroed += u64::from(f.flags(i, p).contains(PageFlags::MERGED_ZERO));
        }
    }
    assert!(merged > 0 && zeroed > 0, "{name}: merged {merged}, zeroed {zeroed}");
    let contents: Vec<Vec<Vec<u8>>> = (0..2).map(|i| f.data.clone().map(|p| f.page(i, p)).collect()).collect();
    let changed = f.mgr().merger().unmerge_all().unwrap();
    eprintln!("{name}: {merged} merged and {zeroed} zeroed data pages; unmerge_all changed {changed}");
    assert!(changed >= merged + zeroed, "{name}: changed {changed}");
    assert!(!f.mgr().merger().tunables().run, "{name}: unmerge-all leaves the scanner stopped");
    let st = f.mgr().stats();
    assert_eq!(
        (st.merge.pages_shared, st.merge.pages_sharing, st.merge.zero_pages),
        (0, 0, 0),
        "{name}: {:#?}",
        st.merge
    );
    for (i, before) in contents.iter().enumerate() {
        for p in 0..f.ram_pages[i] {
            assert_eq!(f.mgr().frame_refs(f.frame(i, p)), 1, "{name}: VM {i} page {p} private");
            let fl = f.flags(i, p);
            assert!(
                !fl.contains(PageFlags::SHARED) && !fl.contains(PageFlags::MERGED_ZERO),
                "{name}: VM {i} page {p}: {fl:?}"
            );
        }
        for (k, p) in f.data.clone().enumerate() {
            let fl = f.flags(i, p);
            assert!(
                !fl.contains(PageFlags::PROTECTED) && !fl.contains(PageFlags::ZERO),
                "{name}: VM {i} page {p}: {fl:?}"
            );
            assert!(f.page(i, p) == before[k], "{name}: VM {i} page {p} content kept");
        }
    }
    let cow = |f: &Fleet| -> u64 {
        f.mem.iter().map(|&vm| f.mgr().vm_merge_stats(vm).unwrap()).map(|v| v.cow_copies + v.cow_reuses).sum()
    };
    let cow0 = cow(&f);
    let faults0 = f.mgr().stats().uffd_faults;
    let (written, _) = f.run_to_end();
    let faults = f.mgr().stats().uffd_faults - faults0;
    eprintln!("{name}: {written} rewrites after unmerge-all, {faults} write faults");
    assert!(written > 1000, "{name}: the write loop ran");
    assert_eq!(cow(&f), cow0, "{name}: no copy-on-write after unmerge-all");
    let st = f.mgr().stats();
    assert_eq!((st.merge.pages_shared, st.merge.pages_sharing, st.merge.zero_pages), (0, 0, 0));
}

/// Pages discarded (balloon) are not counted in pages_shared, pages_sharing or
/// zero_pages, neither when discarded before merging nor after, and the
/// scanner does not bring them back.
#[test]
fn discarded_pages_are_not_counted() {
    let name = "discarded_pages_are_not_counted";
    let defs = [("a", 501), ("b", 502)]
        .map(|(id, seed)| VmDef {
            id,
            scenario: scenario(2, 0.0, 1.0, 0.0, 0, 1, seed),
            domain: Some("dc"),
            spare_mib: 2,
        })
        .into();
    let Some(mut f) = Fleet::start(name, defs) else { return };
    // Spare RAM above the data: 128 pages of content identical in both VMs
    // (distinct per page), then 128 explicit zero pages.
    const HALF: u32 = 128;
    let first = f.data.end;
    assert!(f.ram_pages.iter().all(|&n| n >= first + 2 * HALF), "{name}: spare RAM above the data");
    let pattern =
        |q: u32| -> Vec<u8> { (0..PAGE as usize).map(|b| ((q as usize * 31 + b * 7) % 251 + 1) as u8).collect() };
    let spare = first..first + 2 * HALF;
    for i in 0..2 {
        for q in spare.clone() {
            let bytes = if q < first + HALF { pattern(q) } else { vec![0u8; PAGE as usize] };
            f.guest(i).write_bytes(u64::from(q) * PAGE, &bytes).unwrap();
        }
    }
    // Discarded before merging: every even spare page, in both VMs.
    let early: Vec<u32> = spare.clone().filter(|q| q % 2 == 0).collect();
    for i in 0..2 {
        for &q in &early {
            f.mgr().discard(f.mem[i], q).unwrap();
        }
    }
    let tun = full_speed(256, true);
    let s1 = f.merge(tun);
    merge_report(name, &s1);
    let is_pattern = |q: u32| q < first + HALF;
    for i in 0..2 {
        for q in spare.clone() {
            let fl = f.flags(i, q);
            let fr = f.frame(i, q);
            if q % 2 == 0 {
                assert!(
                    fl.contains(PageFlags::ZERO)
                        && !fl.contains(PageFlags::MERGED_ZERO)
                        && !fl.contains(PageFlags::SHARED),
                    "{name}: VM {i} discarded page {q}: {fl:?}"
                );
                assert!(
                    f.mgr().is_zero_region_frame(fr) || f.mgr().frame_refs(fr) == 1,
                    "{name}: VM {i} discarded page {q} maps frame {fr} with {} refs",
                    f.mgr().frame_refs(fr)
                );
                assert!(f.page(i, q).iter().all(|&b| b == 0), "{name}: discarded page {q} reads zero");
            } else if is_pattern(q) {
                assert_eq!(fr, f.frame(1 - i, q), "{name}: kept spare page {q} merged across the VMs");
                assert_eq!(f.mgr().frame_refs(fr), 2);
            } else {
                assert!(fl.contains(PageFlags::MERGED_ZERO), "{name}: VM {i} kept zero page {q}: {fl:?}");
            }
        }
        for p in f.data.clone() {
            assert_eq!(f.frame(i, p), f.frame(1 - i, p), "{name}: data page {p} merged");
        }
    }
    let data_pages = f.data.len() as u64;
    let other = f.other_resident();
    // Data pages and kept pattern pages merged; discarded ones not counted.
    let kept_pattern = u64::from(HALF / 2);
    let kept_zero = u64::from(HALF / 2);
    assert!(s1.pages_sharing >= data_pages + kept_pattern && s1.zero_pages >= 2 * kept_zero, "{name}: {s1:#?}");
    // `other` includes the kept spare pages (they hold memory or are zeroed).
    assert!(s1.pages_sharing + s1.zero_pages <= 2 * data_pages + other, "{name}: {s1:#?}");
    // Discard after merging: VM b's odd pattern pages (merged with VM a's) and
    // both VMs' odd zero pages (zeroed by the merger).
    let late_pattern: Vec<u32> = spare.clone().filter(|&q| q % 2 == 1 && is_pattern(q)).collect();
    let late_zero: Vec<u32> = spare.clone().filter(|&q| q % 2 == 1 && !is_pattern(q)).collect();
    for &q in &late_pattern {
        f.mgr().discard(f.mem[1], q).unwrap();
    }
    for i in 0..2 {
        for &q in &late_zero {
            f.mgr().discard(f.mem[i], q).unwrap();
        }
    }
    let s2 = f.mgr().merger().stats();
    let n_pat = late_pattern.len() as u64;
    let n_zero = 2 * late_zero.len() as u64;
    assert_eq!(
        (s2.pages_shared, s2.pages_sharing, s2.zero_pages),
        (s1.pages_shared - n_pat, s1.pages_sharing - n_pat, s1.zero_pages - n_zero),
        "{name}: after discarding {n_pat} merged and {n_zero} zeroed pages"
    );
    // More scans find nothing to count or merge among the discarded pages.
    let s3 = f.scans(tun, 3);
    merge_report(name, &s3);
    assert_eq!(
        (s3.pages_shared, s3.pages_sharing, s3.zero_pages, s3.merges),
        (s2.pages_shared, s2.pages_sharing, s2.zero_pages, s2.merges),
        "{name}: discarded pages came back into the counts"
    );
    for i in 0..2 {
        for q in spare.clone() {
            let discarded = q % 2 == 0 || (i == 1 && is_pattern(q)) || !is_pattern(q);
            if discarded {
                assert!(f.page(i, q).iter().all(|&b| b == 0), "{name}: VM {i} discarded page {q} reads zero");
                assert!(!f.flags(i, q).contains(PageFlags::MERGED_ZERO));
            }
        }
    }
    f.run_to_end();
}

/// Merge domains: two VMs with identical data in different domains never share
/// a physical frame (PFNs from /proc/self/pagemap over all their resident
/// RAM); a third VM in the first VM's domain does (positive control).
#[test]
fn domains_never_share_physical_frames() {
    let name = "domains_never_share_physical_frames";
    let defs = [("a", 601, "d1"), ("b", 602, "d2"), ("c", 603, "d1")]
        .map(|(id, seed, domain)| VmDef {
            id,
            scenario: scenario(2, 0.0, 1.0, 0.0, 0, 1, seed),
            domain: Some(domain),
            spare_mib: 0,
        })
        .into();
    let Some(mut f) = Fleet::start(name, defs) else { return };
    // Zero pages merge like any content here, so they too must stay inside a domain.
    let s = f.merge(full_speed(256, false));
    merge_report(name, &s);
    assert_eq!(s.cross_domain_refusals, 0);
    let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
    // Per VM: guest page -> PFN, for every page holding host memory.
    let mut pfns: Vec<HashMap<u32, u64>> = Vec::new();
    for i in 0..3 {
        let Some(map) = pfn_map(&f, i, &pagemap) else {
            e2e::skip(name, "/proc/self/pagemap hides PFNs (needs CAP_SYS_ADMIN)");
            return;
        };
        pfns.push(map);
    }
    for p in f.data.clone() {
        for (i, m) in pfns.iter().enumerate() {
            assert!(m.contains_key(&p), "{name}: VM {i} data page {p} resident");
        }
        // Positive control: a and c (domain d1) share the physical frame.
        assert_eq!(pfns[0][&p], pfns[2][&p], "{name}: data page {p}: a and c (one domain) do not share a PFN");
        assert_ne!(pfns[0][&p], pfns[1][&p], "{name}: data page {p}: a and b (two domains) share a PFN");
        assert_eq!(f.frame(0, p), f.frame(2, p));
        assert_ne!(f.frame(0, p), f.frame(1, p));
    }
    // No physical frame of b anywhere in a's or c's RAM.
    let ac: HashSet<u64> = pfns[0].values().chain(pfns[2].values()).copied().collect();
    let common: Vec<(u32, u64)> = pfns[1].iter().filter(|(_, x)| ac.contains(x)).map(|(&p, &x)| (p, x)).collect();
    assert!(
        common.is_empty(),
        "{name}: VM b (domain d2) shares physical frames with domain d1: {:?}",
        &common[..common.len().min(8)]
    );
    // densevm's tables agree with the PFNs: same frame <=> same PFN.
    let mut by_frame: HashMap<u32, u64> = HashMap::new();
    let mut by_pfn: HashMap<u64, u32> = HashMap::new();
    for (i, m) in pfns.iter().enumerate() {
        for (&p, &x) in m {
            let fr = f.frame(i, p);
            assert_eq!(*by_frame.entry(fr).or_insert(x), x, "{name}: frame {fr} seen at two PFNs");
            assert_eq!(*by_pfn.entry(x).or_insert(fr), fr, "{name}: PFN {x:#x} behind two frames");
        }
    }
    eprintln!(
        "{name}: {} resident pages checked, {} PFNs shared a<->c, 0 shared with b",
        pfns.iter().map(HashMap::len).sum::<usize>(),
        common_pfns(&pfns[0], &pfns[2])
    );
    // Moving c into b's domain unmerges it from a first (no PFN in common any
    // more); merging again then shares c's data with b, never with a.
    let d2 = f.mgr().merge_config(f.mem[1]).unwrap().domain;
    f.mgr().set_merge(f.mem[2], true, d2).unwrap();
    let (a, c) = (pfn_map(&f, 0, &pagemap).unwrap(), pfn_map(&f, 2, &pagemap).unwrap());
    assert_eq!(common_pfns(&a, &c), 0, "{name}: c still shares physical frames with a after leaving its domain");
    let s = f.merge(full_speed(256, false));
    merge_report(name, &s);
    assert_eq!(s.cross_domain_refusals, 0);
    let pfns: Vec<HashMap<u32, u64>> = (0..3).map(|i| pfn_map(&f, i, &pagemap).unwrap()).collect();
    assert_eq!(common_pfns(&pfns[0], &pfns[2]), 0, "{name}: a and c (now two domains) share a PFN");
    assert_eq!(common_pfns(&pfns[0], &pfns[1]), 0, "{name}: a and b (two domains) share a PFN");
    for p in f.data.clone() {
        assert_eq!(pfns[1][&p], pfns[2][&p], "{name}: data page {p}: b and c (now one domain) do not share a PFN");
    }
    f.run_to_end();
}

/// Guests rewrite and verify their pages while the merger runs at full speed
/// (no sleep, whole memory per batch) with `mode` as change detection.
fn verify_under_full_speed(name: &'static str, mode: ChangeDetection, hold_vcpus: bool) {
    let defs = [("a", 701), ("b", 702)]
        .map(|(id, seed)| VmDef {
            id,
            scenario: scenario(8, 0.1, 0.7, 0.3, 20_000, 3, seed),
            domain: Some("fs"),
            spare_mib: 0,
        })
        .into();
    let Some(mut f) = Fleet::start(name, defs) else { return };
    let merger = f.mgr().merger();
    merger.set_tunables(Tunables { change_detection: mode, hold_vcpus, ..full_speed(256, true) }).unwrap();
    let s0 = merger.stats();
    let holds0 = f.mgr().stats().counters.vcpu_holds;
    f.resume_all();
    f.wait_finished();
    let s1 = f.mgr().merger().stats();
    f.mgr().merger().set_run(false);
    let holds = f.mgr().stats().counters.vcpu_holds - holds0;
    let (written, verified) = f.check_reports();
    let vms: Vec<_> = f.mem.iter().map(|&vm| f.mgr().vm_merge_stats(vm).unwrap()).collect();
    let (copies, reuses) = vms.iter().fold((0, 0), |a, v| (a.0 + v.cow_copies, a.1 + v.cow_reuses));
    let scans = s1.full_scans - s0.full_scans;
    let merges = s1.merges - s0.merges;
    eprintln!(
        "{name}: guests wrote {written} and verified {verified} pages with 0 mismatches while the merger ran \
         {scans} full scans: merges {merges} (in {} remaps), cow copies {copies}, cow reuses {reuses}, \
         zero_pages {}, pages_sharing {}, pages_volatile {}; full scan {:.2} ms wall, {:.2} ms busy on average; \
         vCPU holds {holds}",
        s1.merge_runs - s0.merge_runs,
        s1.zero_pages,
        s1.pages_sharing,
        s1.pages_volatile,
        s1.full_scan_ms_avg,
        s1.merge_time_ms_avg,
    );
    assert!(written > 1000, "{name}: the write loop ran");
    if mode == ChangeDetection::DirtyLog {
        assert_eq!(s1.vms_dirty_log, 2, "{name}: both VMs scanned with their dirty log: {s1:#?}");
    }
    // Half of the pages are shared and never rewritten: after a scan that
    // learned them (the first one sees the fill as dirty) they merge.
    if scans >= 3 {
        assert!(merges > 0, "{name}: {scans} full scans during the run but no merge");
    } else {
        eprintln!("{name}: only {scans} full scans ran during the guests' run (loaded machine)");
    }
    // Chunks that merge hold the running vCPUs (kicked out of KVM_RUN while they
    // write) when asked to, and never otherwise.
    if hold_vcpus {
        assert!(merges == 0 || holds > 0, "{name}: {merges} merges but no vCPU hold");
    } else {
        assert_eq!(holds, 0, "{name}: vCPUs held with hold_vcpus off");
    }
    assert_eq!(s1.cross_domain_refusals, 0);
    f.check_shared_frames_consistent();
}

#[test]
fn guests_verify_while_merging_at_full_speed_dirty_log() {
    verify_under_full_speed("guests_verify_while_merging_at_full_speed_dirty_log", ChangeDetection::DirtyLog, true);
}

#[test]
fn guests_verify_while_merging_at_full_speed_checksum() {
    verify_under_full_speed("guests_verify_while_merging_at_full_speed_checksum", ChangeDetection::Checksum, true);
}

/// The same with the vCPUs never held: guest writes race the batched remaps'
/// read-only instant (KVM_RUN returns EFAULT and the vCPU re-enters).
#[test]
fn guests_verify_while_merging_at_full_speed_without_holds() {
    verify_under_full_speed(
        "guests_verify_while_merging_at_full_speed_without_holds",
        ChangeDetection::DirtyLog,
        false,
    );
}

/// Unmerge-all while the guests run their write loop and the merger has
/// merged their pages: the copies race with the guests' copy-on-write faults;
/// afterwards every page is private and the guests verify with 0 mismatches.
#[test]
fn unmerge_all_while_guests_write() {
    let name = "unmerge_all_while_guests_write";
    let defs = [("a", 801), ("b", 802)]
        .map(|(id, seed)| VmDef {
            id,
            scenario: scenario(8, 0.1, 0.7, 0.3, 20_000, 2, seed),
            domain: Some("uw"),
            spare_mib: 0,
        })
        .into();
    let Some(mut f) = Fleet::start(name, defs) else { return };
    // Merge the still guests first, so that there is much to unmerge.
    let s = f.merge(full_speed(256, true));
    merge_report(name, &s);
    assert!(s.pages_sharing > 0 && s.zero_pages > 0);
    f.mgr().merger().set_tunables(full_speed(256, true)).unwrap();
    f.resume_all();
    // Let the write loop and the merger run together for a moment (no timing
    // is asserted: wherever this lands, the outcome must be the same).
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(300) {
        for id in f.ids.clone() {
            f.host.vm_mut(id).unwrap().handle_events();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let changed = f.mgr().merger().unmerge_all().unwrap();
    let st = f.mgr().stats();
    eprintln!(
        "{name}: unmerge_all changed {changed} pages while the guests wrote; left: shared {} sharing {} zero {}",
        st.merge.pages_shared, st.merge.pages_sharing, st.merge.zero_pages
    );
    assert_eq!((st.merge.pages_shared, st.merge.pages_sharing, st.merge.zero_pages), (0, 0, 0), "{name}");
    f.wait_finished();
    let (written, _) = f.check_reports();
    assert!(written > 1000, "{name}: the write loop ran");
    for i in 0..2 {
        for p in 0..f.ram_pages[i] {
            assert_eq!(f.mgr().frame_refs(f.frame(i, p)), 1, "{name}: VM {i} page {p} private");
            assert!(!f.flags(i, p).contains(PageFlags::MERGED_ZERO));
        }
    }
}

/// A VM leaves (is destroyed) while its pages are merged with others' and the
/// merger runs at full speed, and a new VM of the same content joins the
/// domain, reusing the freed frames: the survivors and the newcomer verify with
/// 0 mismatches and every shared frame reads the same for all its mappers.
#[test]
fn vm_destroyed_and_created_while_merged() {
    let name = "vm_destroyed_and_created_while_merged";
    let def = |id: &'static str, seed: u64| VmDef {
        id,
        scenario: scenario(4, 0.1, 0.7, 0.3, 10_000, 2, seed),
        domain: Some("life"),
        spare_mib: 0,
    };
    let Some(mut f) = Fleet::start(name, vec![def("a", 901), def("b", 902), def("c", 903)]) else { return };
    let s = f.merge(full_speed(256, true));
    merge_report(name, &s);
    let data = f.data.len() as u64;
    assert!(s.pages_sharing >= data, "{name}: {s:#?}");
    f.mgr().merger().set_tunables(full_speed(256, true)).unwrap();
    f.resume_all();
    // Destroy a while b and c write and the merger runs.
    f.host.remove_vm("a", None).unwrap();
    f.ids.remove(0);
    f.mem.remove(0);
    f.ram_pages.remove(0);
    // A newcomer with the same shared content joins the domain.
    let VmDef { id, scenario, domain, spare_mib } = def("d", 904);
    let spec = VmSpec {
        id: id.into(),
        vcpus: 1,
        mem_mib: workload_mem_mib(scenario.fill_mib) + spare_mib,
        boot: BootSource::Workload(scenario),
        serial: SerialOut::None,
        ram: RamPolicy::Managed,
        pause_after_fill: false,
        merge: MergeSpec { enabled: true, domain: domain.map(String::from) },
        balloon: None,
    };
    f.host.create_vm(spec).unwrap();
    f.host.vm_mut("d").unwrap().start().unwrap();
    let g = f.host.vm("d").unwrap().ram().guest_map().unwrap();
    f.mem.push(g.vm_id());
    f.ram_pages.push(g.pages());
    f.ids.push("d");
    f.wait_finished();
    let s = f.mgr().merger().stats();
    f.mgr().merger().set_run(false);
    merge_report(name, &s);
    let (written, _) = f.check_reports();
    assert!(written > 1000, "{name}: the write loop ran");
    let shared = f.check_shared_frames_consistent();
    // d's pages merged with b's and c's (same domain, same shared seed).
    let d_merged = f.mgr().vm_merge_stats(f.mem[2]).unwrap().merged_pages;
    eprintln!("{name}: {shared} shared frames after the churn; d has {d_merged} merged pages");
    assert_eq!(s.cross_domain_refusals, 0);
}
