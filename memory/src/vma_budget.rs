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
//! The raise is host-wide, so it is undone: the process records the value it
//! found, and when the last budget that relies on the raise is released (its
//! memory manager dropped) or at daemon exit ([`restore_all`]), it writes that
//! value back, unless something else changed the limit meanwhile (then the
//! limit is left as it is, logged). Two densevm processes do not know of each
//! other: one that started while another's raise was in force, and did not
//! need to raise it further, loses it when the other exits.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

const MAX_MAP_COUNT: &str = "/proc/sys/vm/max_map_count";

/// A raise of a `max_map_count` file by this process.
struct Raise {
    path: PathBuf,
    /// The value found before the first raise.
    found: usize,
    /// The value last written.
    set: usize,
    /// Budgets relying on the raise.
    users: usize,
}

/// The raises in force (one per file; tests use files of their own).
static RAISES: Mutex<Vec<Raise>> = Mutex::new(Vec::new());

fn raises() -> MutexGuard<'static, Vec<Raise>> {
    RAISES.lock().unwrap_or_else(|e| e.into_inner())
}

/// A budget's claim on a raise: released once; a clone claims nothing.
#[derive(Debug, Default)]
struct RaiseClaim(Option<PathBuf>);

impl Clone for RaiseClaim {
    fn clone(&self) -> Self {
        RaiseClaim(None)
    }
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
    /// could need more, raises it.
    /// A budget that relies on a raise (its own or an earlier one of this
    /// process) keeps it in force until [`VmaBudget::release`] (or its drop).
    pub fn new(pool_frames: u64, raise: bool) -> Self {
        Self::with_file(Path::new(MAX_MAP_COUNT), pool_frames, raise)
    }

    /// [`VmaBudget::new`] over the limit in the file `path`.
    fn with_file(path: &Path, pool_frames: u64, raise: bool) -> Self {
        let baseline = crate::sys::process_map_count().unwrap_or(MARGIN);
        let mut raises = raises();
        let limit = read_limit(path).unwrap_or(65530);
        let needed = baseline + MARGIN + pool_frames as usize;
        let mut budget =
            VmaBudget { limit, baseline, raised_to: None, raise_error: None, refused: 0, claim: RaiseClaim(None) };
        let held = raises.iter().position(|r| r.path == path);
        if raise && limit < needed {
            match std::fs::write(path, needed.to_string()) {
                Ok(()) => {
                    budget.limit = read_limit(path).unwrap_or(needed);
                    budget.raised_to = Some(budget.limit);
                    tracing::info!("raised vm.max_map_count from {limit} to {}", budget.limit);
                    match held {
                        Some(i) => raises[i].set = budget.limit,
                        None => raises.push(Raise { path: path.into(), found: limit, set: budget.limit, users: 0 }),
                    }
                }
                Err(e) => {
                    tracing::warn!("cannot raise vm.max_map_count to {needed}: {e}");
                    budget.raise_error = Some(e.to_string());
                }
            }
        }
        if raise {
            if let Some(r) = raises.iter_mut().find(|r| r.path == path) {
                r.users += 1;
                budget.claim = RaiseClaim(Some(path.into()));
            }
        }
        budget
    }

    /// Gives up this budget's claim on the raise (once; later calls do
    /// nothing). The last claim's release restores the value found.
    pub fn release(&mut self) {
        let Some(path) = self.claim.0.take() else { return };
        let mut raises = raises();
        let Some(i) = raises.iter().position(|r| r.path == path) else { return };
        raises[i].users = raises[i].users.saturating_sub(1);
        if raises[i].users == 0 {
            restore(&raises.swap_remove(i));
        }
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

/// Restores every limit this process raised, whoever still relies on it (the
/// daemon's exit, after its VMs stopped). Later releases do nothing.
pub fn restore_all() {
    for r in std::mem::take(&mut *raises()) {
        restore(&r);
    }
}

/// Writes back the value `r` found, if the limit is still the value set.
fn restore(r: &Raise) {
    match read_limit(&r.path) {
        Ok(now) if now == r.set => match std::fs::write(&r.path, r.found.to_string()) {
            Ok(()) => tracing::info!("restored vm.max_map_count from {now} to {}", r.found),
            Err(e) => tracing::warn!("cannot restore vm.max_map_count to {}: {e}", r.found),
        },
        Ok(now) => tracing::info!(
            "vm.max_map_count is {now}, not the {} densevm set: left as it is (it was {} before)",
            r.set,
            r.found
        ),
        Err(e) => tracing::warn!("cannot read vm.max_map_count to restore it to {}: {e}", r.found),
    }
}

fn read_limit(path: &Path) -> io::Result<usize> {
    std::fs::read_to_string(path)?.trim().parse().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests run one at a time: [`restore_all`] restores every raise of the process.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A stand-in for `/proc/sys/vm/max_map_count` holding `value`.
    fn limit_file(name: &str, value: usize) -> PathBuf {
        let path = std::env::temp_dir().join(format!("densevm-max-map-count-{name}-{}", std::process::id()));
        std::fs::write(&path, value.to_string()).unwrap();
        path
    }

    fn value(path: &Path) -> usize {
        read_limit(path).unwrap()
    }

    #[test]
    fn the_last_release_restores_the_value_found() {
        let _serial = serial();
        let path = limit_file("last", 1000);
        let mut first = VmaBudget::with_file(&path, 100_000, true);
        assert!(first.raised_to.is_some_and(|v| v > 100_000), "{first:?}");
        let raised = value(&path);
        // A second budget that needs no more relies on the same raise.
        let second = VmaBudget::with_file(&path, 10, true);
        assert!(second.raised_to.is_none() && second.limit == raised);
        let snapshot = first.clone();
        drop(snapshot);
        first.release();
        assert_eq!(value(&path), raised, "restored while a budget still relies on the raise");
        drop(second);
        assert_eq!(value(&path), 1000, "not restored when the last budget went");
        // A budget that did not raise and relies on no raise restores nothing.
        let none = VmaBudget::with_file(&path, 10, false);
        std::fs::write(&path, "5000").unwrap();
        drop(none);
        assert_eq!(value(&path), 5000);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_limit_changed_by_someone_else_is_left_alone() {
        let _serial = serial();
        let path = limit_file("changed", 1000);
        let budget = VmaBudget::with_file(&path, 100_000, true);
        std::fs::write(&path, "999999").unwrap();
        drop(budget);
        assert_eq!(value(&path), 999_999);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn restore_all_restores_at_exit_whoever_holds_the_raise() {
        let _serial = serial();
        let path = limit_file("exit", 1000);
        let budget = VmaBudget::with_file(&path, 100_000, true);
        assert!(value(&path) > 100_000);
        restore_all();
        assert_eq!(value(&path), 1000);
        std::fs::write(&path, "7777").unwrap();
        drop(budget);
        assert_eq!(value(&path), 7777, "a release after restore_all wrote again");
        std::fs::remove_file(&path).unwrap();
    }
}
