//! Torture test of compaction under concurrent writers.
//!
//! The remap torture (`torture.rs`) plus compaction at full rate: writer threads
//! store version patterns into their own guest pages through the guest view
//! (checking before each write that the page still holds their last version),
//! a thread `pread`s file pages into its guest pages, a manager thread merges,
//! shares, unshares, discards, device-writes and protects pages, a churn thread
//! creates, fills, checks and destroys small VMs (scattering live frames over
//! the 2 MiB frames), and a compaction thread runs `compact()` back to back
//! while the proactive compactor runs at its highest rate too. A write that
//! landed in a migrated page's old frame would be lost (the writer's next check
//! or the final check sees the old version); a write into a shared frame would
//! change another mapper's content (the final model check sees it).
//! Afterwards every page must equal the model, through the guest view and the
//! alias, and every still-shared frame must hold what all its mappers expect.
//!
//! Runs ~3 s by default; set DENSEVM_TORTURE_SECS for longer.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use memory::{PageFlags, VmId, PAGE_SIZE};

const WORDS: usize = PAGE_SIZE / 8;
const WRITERS: u32 = 3;
const PAGES_PER_WRITER: u32 = 32;
const PREAD_FIRST: u32 = WRITERS * PAGES_PER_WRITER;
const PREAD_PAGES: u32 = 32;
const IDLE_FIRST: u32 = PREAD_FIRST + PREAD_PAGES;
const IDLE_PAGES_VM1: u32 = 128;
const IDLE_PAGES_VM2: u32 = 128;
const FILE_PATTERNS: u64 = 8;

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

fn page_holds(addr: usize, value: u64) -> bool {
    // SAFETY: `addr` is a page of a live guest map (kept alive by the test).
    (0..WORDS).all(|i| unsafe { read_word(addr, i) } == value)
}

fn first_word(addr: usize) -> u64 {
    // SAFETY: as above.
    unsafe { read_word(addr, 0) }
}

/// Value of every word of page `page` of churn VM `vm`.
fn churn_word(vm: VmId, page: u32) -> u64 {
    0xC4_0000_0000 | (u64::from(vm) << 16) | u64::from(page)
}

#[test]
fn torture_compaction_under_concurrent_writers() {
    let Some(mgr) = manager_or_skip("torture_compaction_under_concurrent_writers", 96) else {
        return;
    };
    mgr.update_compaction(&memory::CompactionTunablesPatch {
        enabled: Some(true),
        proactiveness: Some(0),
        max_pages_per_s: Some(memory::compact::MAX_MAX_PAGES_PER_S),
    })
    .unwrap();
    let secs: u64 = std::env::var("DENSEVM_TORTURE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let _w = Watchdog::new("compaction torture", secs + 180);
    let vm1 = mgr.create_guest(1, 4 << 20).unwrap();
    let vm2 = mgr.create_guest(2, 2 << 20).unwrap();
    // Cross-VM merges need one merge domain (merging itself stays manual here).
    mgr.set_merge(1, false, 100).unwrap();
    mgr.set_merge(2, false, 100).unwrap();
    let base1 = vm1.host_addr();
    let base2 = vm2.host_addr();
    let addr_of = move |vm: VmId, p: u32| (if vm == 1 { base1 } else { base2 }) + p as usize * PAGE_SIZE;

    // Idle pages start from 4 patterns, so many are identical.
    let mut idle_model: Vec<((VmId, u32), u64)> = Vec::new();
    for p in 0..IDLE_PAGES_VM1 {
        idle_model.push(((1, IDLE_FIRST + p), idle_word(u64::from(p % 4))));
    }
    for p in 0..IDLE_PAGES_VM2 {
        idle_model.push(((2, p), idle_word(u64::from(p % 4))));
    }
    for &((vm, p), v) in &idle_model {
        // SAFETY: the page belongs to a live guest map and no thread runs yet.
        unsafe { fill_page(addr_of(vm, p), v) };
    }
    // The pread source file.
    let path = std::env::temp_dir().join(format!("densevm-compaction-torture-{}", std::process::id()));
    let mut content = Vec::with_capacity(FILE_PATTERNS as usize * PAGE_SIZE);
    for j in 0..FILE_PATTERNS {
        for _ in 0..WORDS {
            content.extend_from_slice(&file_word(j).to_ne_bytes());
        }
    }
    std::fs::write(&path, &content).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let writes = Arc::new(AtomicU64::new(0));
    let efaults = Arc::new(AtomicU64::new(0));

    // Writers: page p of writer w holds version v in every word.
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (stop, failures, writes) = (stop.clone(), failures.clone(), writes.clone());
        writers.push(std::thread::spawn(move || {
            let pages: Vec<u32> = (w * PAGES_PER_WRITER..(w + 1) * PAGES_PER_WRITER).collect();
            let mut last = vec![0u64; pages.len()];
            let mut version = 0u64;
            while !stop.load(Ordering::Relaxed) {
                version += 1;
                for (i, &p) in pages.iter().enumerate() {
                    let addr = addr_of(1, p);
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
        }));
    }

    // pread thread.
    let preader = {
        let (stop, failures, writes, efaults) = (stop.clone(), failures.clone(), writes.clone(), efaults.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let mut model = vec![0u64; PREAD_PAGES as usize];
            while !stop.load(Ordering::Relaxed) {
                let i = rng.below(u64::from(PREAD_PAGES)) as usize;
                let addr = addr_of(1, PREAD_FIRST + i as u32);
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
    };

    // Compaction at full rate, back to back.
    let compactor = {
        let (stop, failures, mgr) = (stop.clone(), failures.clone(), mgr.clone());
        std::thread::spawn(move || {
            let (mut passes, mut pages, mut returned) = (0u64, 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                match mgr.compact() {
                    Ok(r) => {
                        passes += 1;
                        pages += r.pages_migrated;
                        returned += r.frames_2m_returned;
                        if r.failures.remap_failed > 0 {
                            failures.lock().unwrap().push(format!("compaction remap failures: {r:?}"));
                        }
                    }
                    Err(e) => failures.lock().unwrap().push(format!("compact: {e}")),
                }
            }
            (passes, pages, returned)
        })
    };

    // Churn: small VMs created, filled, checked and destroyed, scattering frames.
    let churn = {
        let (stop, failures, writes, mgr) = (stop.clone(), failures.clone(), writes.clone(), mgr.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(0x51ed_270b_2792_d3a1);
            let mut live: Vec<memory::GuestMap> = Vec::new();
            let (mut created, mut destroyed, mut next_id) = (0u64, 0u64, 1000u32);
            let check = |g: &memory::GuestMap, failures: &Mutex<Vec<String>>| {
                for p in 0..g.pages() {
                    let addr = g.page_addr(p).unwrap_or(0);
                    if !page_holds(addr, churn_word(g.vm_id(), p)) {
                        failures.lock().unwrap().push(format!(
                            "churn vm {} page {p} holds {:#x}, expected {:#x}",
                            g.vm_id(),
                            first_word(addr),
                            churn_word(g.vm_id(), p)
                        ));
                    }
                }
            };
            while !stop.load(Ordering::Relaxed) {
                if live.len() < 64 || (live.len() < 256 && rng.below(2) == 0) {
                    let pages = 1 + rng.below(64);
                    match mgr.create_guest(next_id, pages * PAGE_SIZE as u64) {
                        Ok(g) => {
                            for p in 0..g.pages() {
                                // SAFETY: a page of a live guest map owned by this thread.
                                unsafe { fill_page(g.page_addr(p).unwrap_or(0), churn_word(g.vm_id(), p)) };
                                writes.fetch_add(1, Ordering::Relaxed);
                            }
                            live.push(g);
                            created += 1;
                        }
                        Err(e) => failures.lock().unwrap().push(format!("create_guest: {e}")),
                    }
                    next_id = if next_id >= 1_000_000 { 1000 } else { next_id + 1 };
                } else {
                    let g = live.swap_remove(rng.below(live.len() as u64) as usize);
                    check(&g, &failures);
                    drop(g);
                    destroyed += 1;
                }
            }
            for g in &live {
                check(g, &failures);
            }
            (created, destroyed)
        })
    };

    // Manager thread (this one): as many operations as possible.
    let all_pages: Vec<(VmId, u32)> =
        (0..IDLE_FIRST).map(|p| (1, p)).chain(idle_model.iter().map(|&(page, _)| page)).collect();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut ops = [0u64; 7];
    let mut raced = 0u64;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        let pick = |rng: &mut Rng| all_pages[rng.below(all_pages.len() as u64) as usize];
        let idle = |rng: &mut Rng| rng.below(idle_model.len() as u64) as usize;
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
            75..=82 => {
                let i = idle(&mut rng);
                let ((vm, p), _) = idle_model[i];
                idle_model[i].1 = 0;
                mgr.discard(vm, p).map(|_| 4)
            }
            83..=94 => {
                let i = idle(&mut rng);
                let ((vm, p), _) = idle_model[i];
                let v = idle_word(rng.below(4));
                idle_model[i].1 = v;
                let guest = if vm == 1 { &vm1 } else { &vm2 };
                let data: Vec<u8> = (0..WORDS).flat_map(|_| v.to_ne_bytes()).collect();
                guest.write_bytes(u64::from(p) * PAGE_SIZE as u64, &data).map(|_| 5)
            }
            _ => {
                let (vm, p) = pick(&mut rng);
                mgr.protect(vm, p).map(|_| 6)
            }
        };
        match result {
            Ok(k) => ops[k] += 1,
            // Share and migrate name a frame read in an earlier lock hold; the
            // compactor may have moved it since (freed: the operation changes
            // nothing; reused by a churn VM of another merge domain: share refuses).
            Err(memory::manager::Error::FrameNotLive(_)) if (40..50).contains(&kind) || (60..75).contains(&kind) => {
                raced += 1
            }
            Err(memory::manager::Error::CrossDomain { .. }) if (40..50).contains(&kind) => raced += 1,
            Err(e) => failures.lock().unwrap().push(format!("operation failed: {e}")),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut expected: Vec<((VmId, u32), u64)> = idle_model.clone();
    for w in writers {
        let (pages, last) = w.join().unwrap();
        expected.extend(pages.into_iter().zip(last).map(|(p, v)| ((1, p), v)));
    }
    let pread_model = preader.join().unwrap();
    let (passes, migrated, returned) = compactor.join().unwrap();
    let (created, destroyed) = churn.join().unwrap();
    // Quiesce: no proactive pass may move frames while the checks below name
    // them (an on-demand pass waits for a proactive one to end).
    mgr.update_compaction(&memory::CompactionTunablesPatch { enabled: Some(false), ..Default::default() }).unwrap();
    let last = mgr.compact().unwrap();
    assert_eq!(last.failures.remap_failed, 0, "{last:?}");
    expected.extend(pread_model.into_iter().enumerate().map(|(i, v)| ((1, PREAD_FIRST + i as u32), v)));

    // Every page equals the model (through the guest view and the alias).
    let mut fails = failures.lock().unwrap().clone();
    for &((vm, p), v) in &expected {
        let addr = addr_of(vm, p);
        if !page_holds(addr, v) {
            fails.push(format!("vm{vm} page {p} holds {:#x}, expected {v:#x}", first_word(addr)));
        }
        let guest = if vm == 1 { &vm1 } else { &vm2 };
        let mut buf = vec![0u8; PAGE_SIZE];
        guest.read_bytes(u64::from(p) * PAGE_SIZE as u64, &mut buf).unwrap();
        if !buf.chunks(8).all(|c| c == v.to_ne_bytes()) {
            fails.push(format!("vm{vm} page {p}: alias disagrees with model"));
        }
    }
    // Every still-shared frame: all mappers expect the same content, it holds
    // it, and all mappers are protected.
    let model: std::collections::HashMap<(VmId, u32), u64> = expected.iter().copied().collect();
    let mut shared_frames = std::collections::BTreeSet::new();
    for &(page, _) in &expected {
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
    let s = mgr.stats();
    let total_ops: u64 = ops.iter().sum();
    eprintln!(
        "torture: {elapsed:.1} s, {total_ops} manager ops ({:.0}/s: merge {} share {} unshare {} migrate {} discard {} device-write {} protect {}), {} guest writes ({:.0}/s), pread EFAULT retries {}",
        total_ops as f64 / elapsed,
        ops[0], ops[1], ops[2], ops[3], ops[4], ops[5], ops[6],
        writes.load(Ordering::Relaxed),
        writes.load(Ordering::Relaxed) as f64 / elapsed,
        efaults.load(Ordering::Relaxed)
    );
    let cs = mgr.compaction_stats();
    eprintln!(
        "compaction torture: {passes} on-demand passes ({:.1}/s), {migrated} pages migrated ({:.0}/s), {returned} 2 MiB frames returned; proactive passes {}, total pages migrated {}, failures {:?}; churn VMs created {created}, destroyed {destroyed}; share/migrate of a frame compaction had moved: {raced}",
        passes as f64 / elapsed,
        migrated as f64 / elapsed,
        cs.proactive_passes,
        cs.pages_migrated,
        cs.failures
    );
    eprintln!(
        "torture: merges {} (differs {}), cow copies {}, reuses {}, zero-page faults {}, protect faults {}, uffd faults {}, still shared frames {}, VMAs {}",
        s.counters.merges, s.counters.merge_differs, s.counters.cow_copies, s.counters.cow_reuses,
        s.counters.zero_page_faults, s.counters.protect_faults, s.uffd_faults, shared_frames.len(), s.vma_count
    );
    assert_eq!(s.counters.fault_errors, 0, "fault resolutions failed");
    assert!(s.counters.merges > 0 && s.counters.cow_copies > 0, "the test did not exercise sharing");
    assert!(passes > 0 && migrated > 0, "the test did not exercise compaction");
    if !fails.is_empty() {
        for f in fails.iter().take(20) {
            eprintln!("FAIL: {f}");
        }
        panic!("{} failures (0 lost writes required)", fails.len());
    }
}
