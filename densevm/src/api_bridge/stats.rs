//! `GET /memory` off the event loop.
//!
//! The host statistics take the memory manager's lock, which other threads hold
//! for long stretches (freeing a deleted 4 GiB VM's frames holds it ~1.5 s), so
//! they are read on a helper thread (`densevm-stats`, started at the first
//! request) that answers the client itself: a slow read no longer holds up the
//! requests the event loop serves.

use std::cell::OnceCell;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;

use api::{ApiReply, ReplySender};
use memory::MemoryManager;

/// The stats thread's queue.
#[derive(Debug, Default)]
pub struct StatsThread {
    queue: OnceCell<Option<Sender<ReplySender>>>,
}

impl StatsThread {
    /// Answers `GET /memory` with `mgr`'s host statistics from the stats thread.
    pub fn host(&self, mgr: &Arc<MemoryManager>, reply: ReplySender) {
        let queue = self.queue.get_or_init(|| start(mgr.clone()));
        let reply = match queue {
            Some(tx) => match tx.send(reply) {
                Ok(()) => return,
                Err(mpsc::SendError(reply)) => reply,
            },
            None => reply,
        };
        // No stats thread: read them here, as before.
        let _ = reply.send(Ok(ApiReply::Memory(Box::new(super::memory::host_stats(mgr)))));
    }
}

fn start(mgr: Arc<MemoryManager>) -> Option<Sender<ReplySender>> {
    let (tx, rx) = mpsc::channel::<ReplySender>();
    let spawned = std::thread::Builder::new().name("densevm-stats".into()).spawn(move || {
        for reply in rx {
            if reply.is_closed() {
                continue;
            }
            let _ = reply.send(Ok(ApiReply::Memory(Box::new(super::memory::host_stats(&mgr)))));
        }
    });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::warn!("cannot start the stats thread ({e}); GET /memory is answered on the event loop");
            None
        }
    }
}
