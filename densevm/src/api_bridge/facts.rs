//! The host facts of `GET /`, gathered once on a background thread (the ring-0 probe
//! takes seconds on emulating hosts) and then served from the cache. Requests that
//! arrive before the facts are ready are answered by the gathering thread.

use std::sync::{Arc, Mutex, MutexGuard};

use api::types::InfoReply;
use api::{ApiReply, ReplySender};
use memory::uffd::Uffd;

use crate::commands::host_info;

/// Names of the userfaultfd feature bits (`linux/userfaultfd.h`), by bit number.
const UFFD_FEATURE_NAMES: [&str; 17] = [
    "PAGEFAULT_FLAG_WP",
    "EVENT_FORK",
    "EVENT_REMAP",
    "EVENT_REMOVE",
    "MISSING_HUGETLBFS",
    "MISSING_SHMEM",
    "EVENT_UNMAP",
    "SIGBUS",
    "THREAD_ID",
    "MINOR_HUGETLBFS",
    "MINOR_SHMEM",
    "EXACT_ADDRESS",
    "WP_HUGETLBFS_SHMEM",
    "WP_UNPOPULATED",
    "POISON",
    "WP_ASYNC",
    "MOVE",
];
const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;

enum State {
    /// Still gathering; these requests wait for the answer.
    Pending(Vec<ReplySender>),
    /// Gathered.
    Ready(InfoReply),
}

/// The cached host facts.
#[derive(Clone)]
pub struct HostFacts {
    state: Arc<Mutex<State>>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl HostFacts {
    /// Starts gathering on a background thread (inline if no thread can be spawned).
    pub fn gather_in_background() -> Self {
        let facts = HostFacts { state: Arc::new(Mutex::new(State::Pending(Vec::new()))) };
        let f = facts.clone();
        let spawned = std::thread::Builder::new().name("densevm-facts".into()).spawn(move || f.set(gather()));
        if spawned.is_err() {
            facts.set(gather());
        }
        facts
    }

    /// Facts known from the start (tests).
    #[cfg(test)]
    pub fn ready(info: InfoReply) -> Self {
        HostFacts { state: Arc::new(Mutex::new(State::Ready(info))) }
    }

    fn set(&self, info: InfoReply) {
        let waiting = match std::mem::replace(&mut *lock(&self.state), State::Ready(info.clone())) {
            State::Pending(w) => w,
            State::Ready(_) => Vec::new(),
        };
        for reply in waiting {
            let _ = reply.send(Ok(ApiReply::Info(info.clone())));
        }
    }

    /// Answers a `GET /` now, or as soon as the facts are gathered. Never blocks.
    pub fn reply(&self, reply: ReplySender) {
        let mut st = lock(&self.state);
        match &mut *st {
            State::Ready(info) => {
                let info = info.clone();
                drop(st);
                let _ = reply.send(Ok(ApiReply::Info(info)));
            }
            State::Pending(waiting) => waiting.push(reply),
        }
    }
}

/// Gathers the facts (blocking: runs the ring-0 probe).
pub fn gather() -> InfoReply {
    let h = host_info::gather();
    InfoReply {
        version: h.version.to_string(),
        kvm: h.kvm,
        kvm_api_version: h.kvm_api_version.max(0),
        userfaultfd_features: userfaultfd_features(),
        ring0_native: h.ring0_native,
        ring0_reason: h.ring0_reason,
    }
}

/// The userfaultfd features the kernel offers (empty when userfaultfd is unavailable).
pub fn userfaultfd_features() -> Vec<String> {
    let all = (1u64 << UFFD_FEATURE_NAMES.len()) - 1;
    // Asking for EVENT_FORK needs CAP_SYS_PTRACE on some kernels: retry without it.
    let uffd = Uffd::new(all, 0).or_else(|_| Uffd::new(all & !UFFD_FEATURE_EVENT_FORK, 0));
    match uffd {
        Ok(u) => feature_names(u.features()),
        Err(_) => Vec::new(),
    }
}

fn feature_names(bits: u64) -> Vec<String> {
    UFFD_FEATURE_NAMES.iter().enumerate().filter(|(i, _)| bits & (1 << i) != 0).map(|(_, n)| n.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> InfoReply {
        InfoReply {
            version: "v".into(),
            kvm: true,
            kvm_api_version: 12,
            userfaultfd_features: vec![],
            ring0_native: false,
            ring0_reason: "r".into(),
        }
    }

    #[test]
    fn early_requests_are_answered_when_ready() {
        let f = HostFacts { state: Arc::new(Mutex::new(State::Pending(Vec::new()))) };
        let (reply, mut rx) = ReplySender::new();
        f.reply(reply);
        assert!(rx.try_recv().is_err());
        f.set(info());
        assert_eq!(rx.try_recv().unwrap(), Ok(ApiReply::Info(info())));
        let (reply, mut rx) = ReplySender::new();
        f.reply(reply);
        assert_eq!(rx.try_recv().unwrap(), Ok(ApiReply::Info(info())));
        let (reply, mut rx) = ReplySender::new();
        HostFacts::ready(info()).reply(reply);
        assert!(rx.try_recv().is_ok());
    }

    #[test]
    fn names_of_bits() {
        assert_eq!(feature_names((1 << 12) | (1 << 13)), vec!["WP_HUGETLBFS_SHMEM", "WP_UNPOPULATED"]);
        assert!(feature_names(0).is_empty());
    }
}
