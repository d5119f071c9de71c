//! The VMA budget: every scattered remapped guest page is its own VMA, and the
//! kernel caps a process at `vm.max_map_count` of them (65530 by default, about
//! 32 K scattered shared pages).
//!
//! At start the budget raises `/proc/sys/vm/max_map_count` (when allowed, i.e.
//! as root) to what the pool can need in the worst case: one VMA per frame plus
//! what the process already uses plus a margin. When it cannot, sharing beyond
//! the limit is refused with a counted reason. Sharing keeps a reserve of two
//! VMAs per shared mapping, which is the most a copy-on-write of that page can
//! add, so a copy-on-write never fails for lack of VMAs.
//!
//! The raise is host-wide, so it is undone. Every densevm process whose
//! budget relies on a raise holds a shared `flock` on a record file
//! (`/run/densevm-max-map-count`) that holds the value found before the first
//! raise and the value set (raising and releasing run under an exclusive lock
//! on `<record>.lock`). When a budget is released (its memory manager
//! dropped) or at daemon exit ([`restore_all`]), it tries to take the record's
//! lock exclusively: only the last densevm process relying on the raise gets it,
//! and it writes the value found back, unless something else changed the limit
//! meanwhile (then it is left as it is, logged). A process that died leaves
//! its record and its lock goes with it, so the next last one restores.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

const MAX_MAP_COUNT: &str = "/proc/sys/vm/max_map_count";
/// The record of the raise, shared by densevm processes (tmpfs: gone at
/// reboot, as the raise is).
const RECORD: &str = "/run/densevm-max-map-count";

/// One budget's claim on a raise: the record, locked shared.
struct Claim {
    id: u64,
    limit: PathBuf,
    record: File,
    record_path: PathBuf,
}

/// The exclusive lock on `<record>.lock` held while a process raises and
/// claims, or releases and restores (the record itself is locked shared by
/// every claim for as long as it lasts, so it cannot serve for this).
struct Guard {
    _locked: File,
}

impl Guard {
    fn take(record_path: &Path) -> io::Result<Guard> {
        let mut name = record_path.as_os_str().to_owned();
        name.push(".lock");
        let f = open(Path::new(&name))?;
        flock(&f, libc::LOCK_EX)?;
        Ok(Guard { _locked: f })
    }
}

fn open(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)
}

/// The claims of this process's budgets.
static CLAIMS: Mutex<Vec<Claim>> = Mutex::new(Vec::new());
static NEXT_CLAIM: AtomicU64 = AtomicU64::new(1);

fn claims() -> MutexGuard<'static, Vec<Claim>> {
    CLAIMS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A budget's claim, by id: released once; a clone claims nothing.
#[derive(Debug, Default)]
struct RaiseClaim(Option<u64>);

impl Clone for RaiseClaim {
    fn clone(&self) -> Self {
        RaiseClaim(None)
    }
}

fn flock(f: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: flock on a descriptor we own; it changes only its lock.
    if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The record's (value found, value set), if a raise is recorded.
fn read_record(f: &mut File) -> Option<(usize, usize)> {
    let mut text = String::new();
    f.rewind().and_then(|()| f.read_to_string(&mut text)).ok()?;
    let mut values = text.split_whitespace().map(str::parse::<usize>);
    match (values.next(), values.next()) {
        (Some(Ok(found)), Some(Ok(set))) => Some((found, set)),
        _ => None,
    }
}

fn write_record(f: &mut File, record: Option<(usize, usize)>) -> io::Result<()> {
    f.set_len(0)?;
    f.rewind()?;
    if let Some((found, set)) = record {
        writeln!(f, "{found} {set}")?;
    }
    Ok(())
}

/// Mappings kept free for the rest of the process (threads, libraries, KVM).
const MARGIN: usize = 4096;

/// State of the VMA budget.
#[derive(Debug, Clone, Serialize)]
pub struct VmaBudget {
    /// `vm.max_map_count` in force.
    pub limit: usize,
    /// Mappings the process had before any guest was created.
    pub baseline: usize,
    /// Value `max_map_count` was raised to by this process, if it did.
    pub raised_to: Option<usize>,
    /// Why the limit could not be raised, if it could not.
    pub raise_error: Option<String>,
    /// Share/merge/migrate requests refused because of the budget.
    pub refused: u64,
    #[serde(skip)]
    claim: RaiseClaim,
}

impl VmaBudget {
    /// Reads the limit and, if `raise` is set and the pool of `pool_frames` frames
    /// could need more, raises it. With `raise` the budget relies on the raise
    /// (its own or another's) until [`VmaBudget::release`] (or its drop).
    pub fn new(pool_frames: u64, raise: bool) -> Self {
        Self::with_files(Path::new(MAX_MAP_COUNT), Path::new(RECORD), pool_frames, raise)
    }

    /// [`VmaBudget::new`] over the limit in the file `limit_path`, recording
    /// the raise in `record_path`.
    fn with_files(limit_path: &Path, record_path: &Path, pool_frames: u64, raise: bool) -> Self {
        let baseline = crate::sys::process_map_count().unwrap_or(MARGIN);
        let needed = baseline + MARGIN + pool_frames as usize;
        let limit = read_limit(limit_path).unwrap_or(65530);
        let mut budget =
            VmaBudget { limit, baseline, raised_to: None, raise_error: None, refused: 0, claim: RaiseClaim(None) };
        if !raise {
            return budget;
        }
        // Under the guard: no other densevm raises or restores meanwhile.
        let (guard, mut record) = match Guard::take(record_path).and_then(|g| Ok((g, open(record_path)?))) {
            Ok((g, f)) => (Some(g), Some(f)),
            Err(e) => {
                let path = record_path.display();
                tracing::warn!("cannot lock {path}: a raise of vm.max_map_count will not be undone: {e}");
                (None, None)
            }
        };
        let limit = read_limit(limit_path).unwrap_or(65530);
        budget.limit = limit;
        if limit < needed {
            match std::fs::write(limit_path, needed.to_string()) {
                Ok(()) => {
                    budget.limit = read_limit(limit_path).unwrap_or(needed);
                    budget.raised_to = Some(budget.limit);
                    tracing::info!("raised vm.max_map_count from {limit} to {}", budget.limit);
                    if let Some(f) = record.as_mut() {
                        let found = read_record(f).map_or(limit, |(found, _)| found);
                        if let Err(e) = write_record(f, Some((found, budget.limit))) {
                            tracing::warn!("cannot record the raise of vm.max_map_count: {e}");
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("cannot raise vm.max_map_count to {needed}: {e}");
                    budget.raise_error = Some(e.to_string());
                }
            }
        }
        if let Some(f) = record {
            match flock(&f, libc::LOCK_SH) {
                Ok(()) => {
                    let id = NEXT_CLAIM.fetch_add(1, Ordering::Relaxed);
                    claims().push(Claim { id, limit: limit_path.into(), record: f, record_path: record_path.into() });
                    budget.claim = RaiseClaim(Some(id));
                }
                Err(e) => tracing::warn!("cannot share the lock of {}: {e}", record_path.display()),
            }
        }
        drop(guard);
        budget
    }

    /// Gives up this budget's claim on the raise (once; later calls do
    /// nothing). The last claim of every densevm process restores the value found.
    pub fn release(&mut self) {
        let Some(id) = self.claim.0.take() else { return };
        let claim = {
            let mut claims = claims();
            let Some(i) = claims.iter().position(|c| c.id == id) else { return };
            claims.swap_remove(i)
        };
        release(claim);
    }

    /// Whether an operation that may add up to `new_vmas` VMAs (and will then
    /// have `shared_mappings` mappings of shared frames) fits, given the guest
    /// maps use `guest_vmas` now. Counts a refusal when it does not.
    pub fn admit(&mut self, guest_vmas: usize, shared_mappings: u64, new_vmas: usize) -> bool {
        let needed = self.baseline
            + MARGIN
            + guest_vmas
            + new_vmas
            + 2 * usize::try_from(shared_mappings).unwrap_or(usize::MAX / 4);
        if needed <= self.limit {
            return true;
        }
        self.refused += 1;
        false
    }
}

impl Drop for VmaBudget {
    fn drop(&mut self) {
        self.release();
    }
}

/// Releases every claim of this process (the daemon's exit, after its VMs
/// stopped): the limit is restored unless another densevm process relies on
/// it. Later releases do nothing.
pub fn restore_all() {
    restore_claims_on(|_| true);
}

/// Releases this process's claims whose record is accepted by `record`
/// ([`restore_all`] takes them all; tests take only their stand-in files', so as
/// not to release a raise another test of the process relies on).
fn restore_claims_on(record: impl Fn(&Path) -> bool) {
    let taken: Vec<Claim> = {
        let mut all = claims();
        let (taken, kept) = std::mem::take(&mut *all).into_iter().partition(|c| record(&c.record_path));
        *all = kept;
        taken
    };
    for claim in taken {
        release(claim);
    }
}

/// Drops `claim`; if no other claim (of any process) holds the record, writes
/// back the value found, if the limit is still the value set.
fn release(mut claim: Claim) {
    let _guard = Guard::take(&claim.record_path);
    if flock(&claim.record, libc::LOCK_EX | libc::LOCK_NB).is_err() {
        tracing::debug!("vm.max_map_count: another densevm relies on the raise; left");
        return; // Closing the record drops this claim's lock.
    }
    let Some((found, set)) = read_record(&mut claim.record) else { return };
    match read_limit(&claim.limit) {
        Ok(now) if now == set => match std::fs::write(&claim.limit, found.to_string()) {
            Ok(()) => tracing::info!("restored vm.max_map_count from {now} to {found}"),
            Err(e) => tracing::warn!("cannot restore vm.max_map_count to {found}: {e}"),
        },
        Ok(now) => tracing::info!("vm.max_map_count is {now}, not the {set} densevm set: left as it is (was {found})"),
        Err(e) => tracing::warn!("cannot read vm.max_map_count to restore it to {found}: {e}"),
    }
    if let Err(e) = write_record(&mut claim.record, None) {
        tracing::warn!("cannot clear the record of the vm.max_map_count raise: {e}");
    }
}

fn read_limit(path: &Path) -> io::Result<usize> {
    std::fs::read_to_string(path)?.trim().parse().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests run one at a time: [`restore_all`] releases every claim of the process.
    static SERIAL: Mutex<()> = Mutex::new(());

    /// Stand-ins for `/proc/sys/vm/max_map_count` (holding `value`) and the record.
    struct Files {
        limit: PathBuf,
        record: PathBuf,
        _serial: MutexGuard<'static, ()>,
    }

    impl Files {
        fn new(name: &str, value: usize) -> Files {
            let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
            let dir = std::env::temp_dir();
            let limit = dir.join(format!("densevm-max-map-count-{name}-{}", std::process::id()));
            let record = dir.join(format!("densevm-max-map-count-record-{name}-{}", std::process::id()));
            std::fs::write(&limit, value.to_string()).unwrap();
            let _ = std::fs::remove_file(&record);
            Files { limit, record, _serial: serial }
        }

        fn budget(&self, pool_frames: u64, raise: bool) -> VmaBudget {
            VmaBudget::with_files(&self.limit, &self.record, pool_frames, raise)
        }

        fn value(&self) -> usize {
            read_limit(&self.limit).unwrap()
        }

        fn set(&self, value: usize) {
            std::fs::write(&self.limit, value.to_string()).unwrap();
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.limit);
            let _ = std::fs::remove_file(&self.record);
            let mut lock = self.record.as_os_str().to_owned();
            lock.push(".lock");
            let _ = std::fs::remove_file(PathBuf::from(lock));
        }
    }

    #[test]
    fn the_last_release_restores_the_value_found() {
        let f = Files::new("last", 1000);
        let mut first = f.budget(100_000, true);
        assert!(first.raised_to.is_some_and(|v| v > 100_000), "{first:?}");
        let raised = f.value();
        // A second budget that needs no more relies on the same raise.
        let second = f.budget(10, true);
        assert!(second.raised_to.is_none() && second.limit == raised);
        drop(first.clone());
        first.release();
        assert_eq!(f.value(), raised, "restored while a budget still relies on the raise");
        drop(second);
        assert_eq!(f.value(), 1000, "not restored when the last budget went");
        // A budget that relies on no raise restores nothing.
        let none = f.budget(10, false);
        f.set(5000);
        drop(none);
        assert_eq!(f.value(), 5000);
    }

    #[test]
    fn a_limit_changed_by_someone_else_is_left_alone() {
        let f = Files::new("changed", 1000);
        let budget = f.budget(100_000, true);
        f.set(999_999);
        drop(budget);
        assert_eq!(f.value(), 999_999);
    }

    #[test]
    fn restore_all_restores_at_exit_whoever_holds_the_raise() {
        let f = Files::new("exit", 1000);
        let budget = f.budget(100_000, true);
        assert!(f.value() > 100_000);
        // restore_all() itself would also release the real raise of any other
        // test of this process: the same release, scoped to this test's files.
        restore_claims_on(|r| r == f.record);
        assert_eq!(f.value(), 1000);
        f.set(7777);
        drop(budget);
        assert_eq!(f.value(), 7777, "a release after restore_all wrote again");
    }

    #[test]
    fn another_process_relying_on_the_raise_keeps_it() {
        let f = Files::new("other", 1000);
        let budget = f.budget(100_000, true);
        let raised = f.value();
        // Another densevm process's claim (a lock on its own open file description).
        let other = File::open(&f.record).unwrap();
        flock(&other, libc::LOCK_SH).unwrap();
        drop(budget);
        assert_eq!(f.value(), raised, "restored under another process relying on the raise");
        // That process dies (its lock goes, its record stays); the next
        // densevm relies on the raise without raising and restores when it goes.
        drop(other);
        let next = f.budget(10, true);
        assert_eq!(next.raised_to, None);
        drop(next);
        assert_eq!(f.value(), 1000);
    }
}
