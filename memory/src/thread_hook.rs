//! The thread-start hook: the memory manager's background threads (merger,
//! compactor, userfaultfd fault handler, mapping counter) call it first thing, with their kind, so
//! that the embedding binary can confine each of them (a seccomp filter per thread
//! kind) without this crate knowing how.

use std::fmt;
use std::sync::Arc;

/// The kinds of thread the memory crate spawns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The same-page merger's scanner thread ([`crate::Merger`]).
    Merger,
    /// The compactor's background thread ([`crate::Compactor`]).
    Compactor,
    /// The userfaultfd fault-handler thread ([`crate::Protector`]).
    FaultHandler,
    /// The thread that recounts the process's mappings for the statistics
    /// (`densevm-vmacount`; reads `/proc/self/maps`).
    VmaCounter,
}

/// A function run first thing on each background thread with its kind (see
/// [`crate::ManagerConfig::thread_start`]).
#[derive(Clone)]
pub struct ThreadStartHook(Arc<dyn Fn(ThreadKind) + Send + Sync>);

impl ThreadStartHook {
    /// Wraps `f`.
    pub fn new(f: impl Fn(ThreadKind) + Send + Sync + 'static) -> Self {
        ThreadStartHook(Arc::new(f))
    }

    /// Runs the hook for a thread of `kind` (on that thread).
    pub fn run(&self, kind: ThreadKind) {
        (self.0)(kind)
    }
}

impl fmt::Debug for ThreadStartHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ThreadStartHook")
    }
}

/// Runs `hook`, if any, for a thread of `kind`: the first line of every thread
/// this crate spawns.
pub(crate) fn started(hook: Option<&ThreadStartHook>, kind: ThreadKind) {
    if let Some(h) = hook {
        h.run(kind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn every_background_thread_runs_the_hook_on_itself() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let hook = ThreadStartHook::new(move |kind| {
            let name = std::thread::current().name().unwrap_or_default().to_string();
            s.lock().unwrap().push((kind, name));
        });
        let mut config = crate::ManagerConfig::with_capacity(16 << 20);
        config.raise_max_map_count = false;
        config.install_write_retry = false;
        config.thread_start = Some(hook);
        let mgr = match crate::MemoryManager::new(config) {
            Ok(m) => m,
            Err(e) => {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "SKIPPED every_background_thread_runs_the_hook_on_itself: {e}");
                return;
            }
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while seen.lock().unwrap().len() < 4 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(mgr);
        let mut seen = seen.lock().unwrap().clone();
        seen.sort_by_key(|(k, _)| *k as u8);
        assert_eq!(
            seen,
            vec![
                (ThreadKind::Merger, "densevm-merger".to_string()),
                (ThreadKind::Compactor, "densevm-compact".to_string()),
                (ThreadKind::FaultHandler, "uffd-handler".to_string()),
                (ThreadKind::VmaCounter, "densevm-vmacount".to_string()),
            ]
        );
    }
}
