//! The remap torture machinery shared by `torture.rs` and
//! `compaction_torture.rs`: two VMs whose idle pages start from 4 patterns
//! (so many are identical), writer threads storing version patterns into their
//! own pages of VM 1 (checking before each write that the page still holds
//! their last version), a thread `pread`ing file pages into its pages of VM 1,
//! the manager operation loop (merge, share, unshare, migrate, discard,
//! device-write, protect) and the final checks against the model.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memory::{manager, GuestMap, MemoryManager, MemoryStats, PageFlags, VmId, PAGE_SIZE};

use super::{fill_page, fill_page_from_thread, read_word, Rng};

/// Words per page.
pub const WORDS: usize = PAGE_SIZE / 8;
const WRITERS: u32 = 3;
const PAGES_PER_WRITER: u32 = 32;
const PREAD_FIRST: u32 = WRITERS * PAGES_PER_WRITER;
const PREAD_PAGES: u32 = 32;
const IDLE_FIRST: u32 = PREAD_FIRST + PREAD_PAGES;
const IDLE_PAGES_VM1: u32 = 128;
const IDLE_PAGES_VM2: u32 = 128;
const FILE_PATTERNS: u64 = 8;

/// Value of every word of file pattern `j` (pattern 0 equals idle pattern 1).
fn file_word(j: u64) -> u64 {
    if j == 0 {
        idle_word(1)
    } else {
        0xF11E_0000 + j
    }
}

fn idle_word(k: u64) -> u64 {
    0x1D1E_0000 + k
}

/// Whether every word of the page at `addr` holds `value`.
pub fn page_holds(addr: usize, value: u64) -> bool {
    // SAFETY: `addr` is a page of a live guest map (kept alive by the test).
    (0..WORDS).all(|i| unsafe { read_word(addr, i) } == value)
}

/// The first word of the page at `addr`.
pub fn first_word(addr: usize) -> u64 {
    // SAFETY: as above.
    unsafe { read_word(addr, 0) }
}

/// `DENSEVM_TORTURE_SECS`, 3 by default.
pub fn torture_secs() -> u64 {
    std::env::var("DENSEVM_TORTURE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3)
}

/// Host addresses of the two VMs' guest RAM.
#[derive(Clone, Copy)]
struct Bases(usize, usize);

impl Bases {
    fn addr_of(self, vm: VmId, p: u32) -> usize {
        (if vm == 1 { self.0 } else { self.1 }) + p as usize * PAGE_SIZE
    }
}

/// What the manager loop did.
pub struct OpsRun {
    /// Successful operations per kind: merge, share, unshare, migrate,
    /// discard, device-write, protect.
    pub ops: [u64; 7],
    /// Failed operations the caller's `tolerated` accepted.
    pub raced: u64,
    /// Seconds the loop ran.
    pub elapsed: f64,
}

/// The pages' final model: every checked page and the value of its words.
pub type Expected = Vec<((VmId, u32), u64)>;

/// A running torture: the two VMs, the writer and pread threads, their shared
/// flags and counters.
pub struct Torture {
    /// The manager under test.
    pub mgr: Arc<MemoryManager>,
    vms: [GuestMap; 2],
    bases: Bases,
    idle_model: Expected,
    /// Set to stop every thread of the test.
    pub stop: Arc<AtomicBool>,
    /// Failures seen by the threads.
    pub failures: Arc<Mutex<Vec<String>>>,
    /// Guest writes done (writers, pread, and the caller's own threads).
    pub writes: Arc<AtomicU64>,
    efaults: Arc<AtomicU64>,
    writers: Vec<JoinHandle<(Vec<u32>, Vec<u64>)>>,
    preader: Option<JoinHandle<Vec<u64>>>,
}

impl Torture {
    /// Creates VM 1 (4 MiB) and VM 2 (2 MiB) in one merge domain, fills the
    /// idle pages, and starts the writers and the pread thread (reading a file
    /// named `densevm-<file_tag>-<pid>` in the temporary directory).
    pub fn start(mgr: Arc<MemoryManager>, file_tag: &str) -> Torture {
        let vm1 = mgr.create_guest(1, 4 << 20).unwrap();
        let vm2 = mgr.create_guest(2, 2 << 20).unwrap();
        // Cross-VM merges need one merge domain (merging itself stays manual here).
        mgr.set_merge(1, false, 100).unwrap();
        mgr.set_merge(2, false, 100).unwrap();
        let bases = Bases(vm1.host_addr(), vm2.host_addr());

        // Idle pages start from 4 patterns, so many are identical.
        let mut idle_model: Expected = Vec::new();
        for p in 0..IDLE_PAGES_VM1 {
            idle_model.push(((1, IDLE_FIRST + p), idle_word(u64::from(p % 4))));
        }
        for p in 0..IDLE_PAGES_VM2 {
            idle_model.push(((2, p), idle_word(u64::from(p % 4))));
        }
        for &((vm, p), v) in &idle_model {
            // SAFETY: the page belongs to a live guest map and no thread runs yet.
            unsafe { fill_page(bases.addr_of(vm, p), v) };
        }
        // The pread source file.
        let path = std::env::temp_dir().join(format!("densevm-{file_tag}-{}", std::process::id()));
        let mut content = Vec::with_capacity(FILE_PATTERNS as usize * PAGE_SIZE);
        for j in 0..FILE_PATTERNS {
            for _ in 0..WORDS {
                content.extend_from_slice(&file_word(j).to_ne_bytes());
            }
        }
        std::fs::write(&path, &content).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();

        let mut t = Torture {
            mgr,
            vms: [vm1, vm2],
            bases,
            idle_model,
            stop: Arc::new(AtomicBool::new(false)),
            failures: Arc::new(Mutex::new(Vec::new())),
            writes: Arc::new(AtomicU64::new(0)),
            efaults: Arc::new(AtomicU64::new(0)),
            writers: Vec::new(),
            preader: None,
        };
        for w in 0..WRITERS {
            t.writers.push(t.spawn_writer(w));
        }
        t.preader = Some(t.spawn_preader(file));
        t
    }

    /// Writer `w`: page p of writer w holds version v in every word.
    fn spawn_writer(&self, w: u32) -> JoinHandle<(Vec<u32>, Vec<u64>)> {
        let (stop, failures, writes, bases) =
            (self.stop.clone(), self.failures.clone(), self.writes.clone(), self.bases);
        std::thread::spawn(move || {
            let pages: Vec<u32> = (w * PAGES_PER_WRITER..(w + 1) * PAGES_PER_WRITER).collect();
            let mut last = vec![0u64; pages.len()];
            let mut version = 0u64;
            while !stop.load(Ordering::Relaxed) {
                version += 1;
                for (i, &p) in pages.iter().enumerate() {
                    let addr = bases.addr_of(1, p);
                    if !page_holds(addr, last[i]) {
                        failures.lock().unwrap().push(format!(
                            "lost write: vm1 page {p} holds {:#x}, expected {:#x}",
                            first_word(addr),
                            last[i]
                        ));
                    }
                    // SAFETY: this thread owns the page; the map outlives the join.
                    unsafe { fill_page(addr, version) };
                    last[i] = version;
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            }
            (pages, last)
        })
    }

    /// The pread thread: a syscall writing guest memory.
    fn spawn_preader(&self, file: std::fs::File) -> JoinHandle<Vec<u64>> {
        let (stop, failures, writes, efaults) =
            (self.stop.clone(), self.failures.clone(), self.writes.clone(), self.efaults.clone());
        let bases = self.bases;
        std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let mut model = vec![0u64; PREAD_PAGES as usize];
            while !stop.load(Ordering::Relaxed) {
                let i = rng.below(u64::from(PREAD_PAGES)) as usize;
                let addr = bases.addr_of(1, PREAD_FIRST + i as u32);
                if !page_holds(addr, model[i]) {
                    failures.lock().unwrap().push(format!(
                        "pread page {i} holds {:#x}, expected {:#x}",
                        first_word(addr),
                        model[i]
                    ));
                }
                let j = rng.below(FILE_PATTERNS);
                loop {
                    // SAFETY: the page belongs to this thread; the kernel writes it.
                    let buf = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, PAGE_SIZE) };
                    match file.read_at(buf, j * PAGE_SIZE as u64) {
                        Ok(n) if n == PAGE_SIZE => break,
                        // The remap protocol's read-only instant: retry (documented).
                        Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                            efaults.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            failures.lock().unwrap().push(format!("pread: {other:?}"));
                            break;
                        }
                    }
                }
                model[i] = file_word(j);
                writes.fetch_add(1, Ordering::Relaxed);
            }
            model
        })
    }

    fn guest(&self, vm: VmId) -> &GuestMap {
        &self.vms[usize::from(vm != 1)]
    }

    /// The manager thread (the caller's): as many operations as possible for
    /// `secs` seconds. A failed operation of kind `kind` (0..100, see the
    /// match) for which `tolerated(kind, &error)` is true counts as raced; any
    /// other failure is recorded.
    pub fn run_ops(&mut self, secs: u64, tolerated: impl Fn(u64, &manager::Error) -> bool) -> OpsRun {
        let mgr = self.mgr.clone();
        let all_pages: Vec<(VmId, u32)> =
            (0..IDLE_FIRST).map(|p| (1, p)).chain(self.idle_model.iter().map(|&(page, _)| page)).collect();
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut ops = [0u64; 7];
        let mut raced = 0u64;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(secs) {
            let pick = |rng: &mut Rng| all_pages[rng.below(all_pages.len() as u64) as usize];
            let idle = |rng: &mut Rng| rng.below(self.idle_model.len() as u64) as usize;
            let kind = rng.below(100);
            let result = match kind {
                0..=39 => mgr.merge_pages(pick(&mut rng), pick(&mut rng)).map(|_| 0),
                40..=49 => {
                    let (a, b) = (pick(&mut rng), pick(&mut rng));
                    mgr.frame_of(a.0, a.1).and_then(|f| mgr.share(b.0, b.1, f)).map(|_| 1)
                }
                50..=59 => {
                    let (vm, p) = pick(&mut rng);
                    mgr.unshare(vm, p).map(|_| 2)
                }
                60..=74 => {
                    let (vm, p) = pick(&mut rng);
                    mgr.frame_of(vm, p).and_then(|f| mgr.migrate(f)).map(|_| 3)
                }
                75..=78 => {
                    let i = idle(&mut rng);
                    let ((vm, p), _) = self.idle_model[i];
                    self.idle_model[i].1 = 0;
                    mgr.discard(vm, p).map(|_| 4)
                }
                79..=82 => {
                    // A balloon's batched discard of a run of consecutive idle pages
                    // (the model holds each VM's idle pages in order, VM 1's first).
                    let i = idle(&mut rng);
                    let block_end =
                        if i < IDLE_PAGES_VM1 as usize { IDLE_PAGES_VM1 as usize } else { self.idle_model.len() };
                    let n = (1 + rng.below(8) as usize).min(block_end - i);
                    let ((vm, p), _) = self.idle_model[i];
                    for entry in &mut self.idle_model[i..i + n] {
                        entry.1 = 0;
                    }
                    mgr.discard_range(vm, p, n as u32).map(|_| 4)
                }
                83..=94 => {
                    let i = idle(&mut rng);
                    let ((vm, p), _) = self.idle_model[i];
                    let v = idle_word(rng.below(4));
                    self.idle_model[i].1 = v;
                    let data: Vec<u8> = (0..WORDS).flat_map(|_| v.to_ne_bytes()).collect();
                    self.guest(vm).write_bytes(u64::from(p) * PAGE_SIZE as u64, &data).map(|_| 5)
                }
                _ => {
                    let (vm, p) = pick(&mut rng);
                    mgr.protect(vm, p).map(|_| 6)
                }
            };
            match result {
                Ok(k) => ops[k] += 1,
                Err(e) if tolerated(kind, &e) => raced += 1,
                Err(e) => self.failures.lock().unwrap().push(format!("operation failed: {e}")),
            }
        }
        OpsRun { ops, raced, elapsed: start.elapsed().as_secs_f64() }
    }

    /// Sets the stop flag, joins the writers and the pread thread, and returns
    /// the model of every page they and the manager loop wrote.
    pub fn stop_and_join(&mut self) -> Expected {
        self.stop.store(true, Ordering::Relaxed);
        let mut expected = self.idle_model.clone();
        for w in self.writers.drain(..) {
            let (pages, last) = w.join().unwrap();
            expected.extend(pages.into_iter().zip(last).map(|(p, v)| ((1, p), v)));
        }
        if let Some(preader) = self.preader.take() {
            let pread_model = preader.join().unwrap();
            expected.extend(pread_model.into_iter().enumerate().map(|(i, v)| ((1, PREAD_FIRST + i as u32), v)));
        }
        expected
    }

    /// The final checks: every page equals the model (through the guest view
    /// and the alias), every still-shared frame's mappers expect the same
    /// content and are protected, and a write to one mapper of a shared frame
    /// leaves the others alone. Returns the failures (the threads' first) and
    /// the number of still-shared frames.
    pub fn check(&self, expected: &Expected) -> (Vec<String>, usize) {
        let mgr = &self.mgr;
        let addr_of = |vm, p| self.bases.addr_of(vm, p);
        // Every page equals the model (through the guest view and the alias).
        let mut fails = self.failures.lock().unwrap().clone();
        for &((vm, p), v) in expected {
            let addr = addr_of(vm, p);
            if !page_holds(addr, v) {
                fails.push(format!("vm{vm} page {p} holds {:#x}, expected {v:#x}", first_word(addr)));
            }
            let mut buf = vec![0u8; PAGE_SIZE];
            self.guest(vm).read_bytes(u64::from(p) * PAGE_SIZE as u64, &mut buf).unwrap();
            if !buf.chunks(8).all(|c| c == v.to_ne_bytes()) {
                fails.push(format!("vm{vm} page {p}: alias disagrees with model"));
            }
        }
        // Every still-shared frame: all mappers expect the same content, it holds
        // it, and all mappers are protected.
        let model: std::collections::HashMap<(VmId, u32), u64> = expected.iter().copied().collect();
        let mut shared_frames = std::collections::BTreeSet::new();
        for &(page, _) in expected {
            let frame = mgr.frame_of(page.0, page.1).unwrap();
            if mgr.frame_refs(frame) > 1 {
                shared_frames.insert(frame);
            }
        }
        for &frame in &shared_frames {
            let mappers = mgr.frame_mappers(frame);
            let values: std::collections::BTreeSet<u64> =
                mappers.iter().map(|m| model.get(m).copied().unwrap_or(0)).collect();
            if values.len() != 1 {
                fails.push(format!("shared frame {frame} mappers expect {values:?}"));
            }
            for &(vm, p) in &mappers {
                let flags = mgr.page_flags(vm, p).unwrap();
                if !flags.contains(PageFlags::PROTECTED) || !flags.contains(PageFlags::SHARED) {
                    fails.push(format!("vm{vm} page {p} maps shared frame {frame} unprotected"));
                }
            }
        }
        // A final write to one mapper of each shared frame leaves the others alone.
        for &frame in shared_frames.iter().take(16) {
            let mappers = mgr.frame_mappers(frame);
            let (vm, p) = mappers[0];
            fill_page_from_thread(addr_of(vm, p), 0xDEAD);
            for &(ovm, op) in &mappers[1..] {
                let v = model.get(&(ovm, op)).copied().unwrap_or(0);
                if !page_holds(addr_of(ovm, op), v) {
                    fails.push(format!("write to vm{vm} page {p} reached vm{ovm} page {op}"));
                }
            }
        }
        (fails, shared_frames.len())
    }

    /// Prints the first summary line: the manager operations and guest writes.
    pub fn print_ops(&self, run: &OpsRun) {
        let OpsRun { ops, elapsed, .. } = run;
        let total_ops: u64 = ops.iter().sum();
        let writes = self.writes.load(Ordering::Relaxed);
        eprintln!(
            "torture: {elapsed:.1} s, {total_ops} manager ops ({:.0}/s: merge {} share {} unshare {} migrate {} discard {} device-write {} protect {}), {} guest writes ({:.0}/s), pread EFAULT retries {}",
            total_ops as f64 / elapsed,
            ops[0], ops[1], ops[2], ops[3], ops[4], ops[5], ops[6],
            writes,
            writes as f64 / elapsed,
            self.efaults.load(Ordering::Relaxed)
        );
    }
}

/// Prints the second summary line (the manager's counters) of statistics `s`
/// taken after the checks, and asserts that no fault resolution failed and
/// that sharing was exercised.
pub fn print_counters_and_assert(s: &MemoryStats, shared_frames: usize) {
    eprintln!(
        "torture: merges {} (differs {}), cow copies {}, reuses {}, background reuses {}, zero-page faults {}, protect faults {}, uffd faults {}, still shared frames {}, VMAs {}",
        s.counters.merges, s.counters.merge_differs, s.counters.cow_copies, s.counters.cow_reuses, s.counters.cow_background_reuses,
        s.counters.zero_page_faults, s.counters.protect_faults, s.uffd_faults, shared_frames, s.vma_count
    );
    assert_eq!(s.counters.fault_errors, 0, "fault resolutions failed");
    assert!(s.counters.merges > 0 && s.counters.cow_copies > 0, "the test did not exercise sharing");
}

/// Panics with the first 20 failures printed, if any.
pub fn assert_no_failures(fails: &[String]) {
    if !fails.is_empty() {
        for f in fails.iter().take(20) {
            eprintln!("FAIL: {f}");
        }
        panic!("{} failures (0 lost writes required)", fails.len());
    }
}
