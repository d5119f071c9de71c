//! Shared state of the HTTP handlers and the round trip to the VMM.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, Semaphore};

use crate::channel::{ApiAction, ApiError, ApiReply, ApiRequest, ReplySender, VmmChannel};
use crate::error::Error;
use crate::types::HostMemoryStats;

/// Reads the host memory statistics (`GET /memory`, the host part of `/metrics`)
/// directly on the API server's threads, without a round trip through the VMM's
/// event loop. It must be cheap and must not block: the memory manager's
/// lock-free `stats()` is what `densevm serve` gives.
#[derive(Clone)]
pub struct HostStatsReader(pub Arc<dyn Fn() -> HostMemoryStats + Send + Sync>);

impl std::fmt::Debug for HostStatsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostStatsReader")
    }
}

/// Largest number of requests queued for (or being handled by) the VMM at once; more
/// are answered 503 at once, so a stuck VMM cannot make the queue grow without bound.
pub const MAX_PENDING_VMM_REQUESTS: usize = 256;

/// The HTTP side of one request's answer.
pub type PendingReply = oneshot::Receiver<Result<ApiReply, ApiError>>;

/// Limits applied to every request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// Longest time to receive a whole request body (408 after).
    pub body_timeout: Duration,
    /// Longest wait for the VMM's answer (503 after).
    pub vmm_timeout: Duration,
}

/// State shared by all handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    vmm: Arc<VmmChannel>,
    pending: Arc<Semaphore>,
    /// Request limits.
    pub limits: Limits,
    /// The OpenAPI document, serialized once.
    pub openapi_json: Arc<String>,
    /// Reads the host statistics without the VMM (else they are asked of it).
    host_stats: Option<HostStatsReader>,
}

impl AppState {
    /// Creates the state.
    pub fn new(vmm: VmmChannel, limits: Limits, openapi_json: String) -> Self {
        AppState {
            vmm: Arc::new(vmm),
            pending: Arc::new(Semaphore::new(MAX_PENDING_VMM_REQUESTS)),
            limits,
            openapi_json: Arc::new(openapi_json),
            host_stats: None,
        }
    }

    /// Serves the host statistics with `reader` instead of asking the VMM.
    pub fn with_host_stats(mut self, reader: Option<HostStatsReader>) -> Self {
        self.host_stats = reader;
        self
    }

    /// The host memory statistics: read here if a [`HostStatsReader`] was given,
    /// else asked of the VMM.
    pub async fn host_memory(&self) -> Result<HostMemoryStats, Error> {
        if let Some(r) = &self.host_stats {
            return Ok((r.0)());
        }
        match self.call(ApiAction::GetMemory).await? {
            ApiReply::Memory(m) => Ok(*m),
            other => Err(unexpected("GetMemory", &other)),
        }
    }

    /// Sends `action` to the VMM and waits (asynchronously, bounded by
    /// `limits.vmm_timeout`) for its answer.
    pub async fn call(&self, action: ApiAction) -> Result<ApiReply, Error> {
        let name = action.name();
        let rx = self.send(action)?;
        self.wait(name, rx).await
    }

    /// Queues `action` for the VMM at once; [`AppState::wait`] gets the answer.
    pub fn send(&self, action: ApiAction) -> Result<PendingReply, Error> {
        let permit = self.pending.clone().try_acquire_owned().map_err(|_| {
            Error::unavailable(format!("the VMM has {MAX_PENDING_VMM_REQUESTS} requests pending; try again later"))
        })?;
        let (reply, rx) = ReplySender::new();
        self.vmm
            .send(ApiRequest { action, reply: reply.with_permit(permit) })
            .map_err(|e| Error::unavailable(e.to_string()))?;
        Ok(rx)
    }

    /// Waits (bounded by `limits.vmm_timeout`) for the answer to the `name` request.
    pub async fn wait(&self, name: &str, rx: PendingReply) -> Result<ApiReply, Error> {
        match tokio::time::timeout(self.limits.vmm_timeout, rx).await {
            Err(_) => Err(Error::unavailable(format!(
                "the VMM did not answer {name} within {:.1} s",
                self.limits.vmm_timeout.as_secs_f64()
            ))),
            Ok(Err(_)) => Err(Error::internal(format!("the VMM dropped the {name} request without answering"))),
            Ok(Ok(Err(e))) => Err(e.into()),
            Ok(Ok(Ok(reply))) => Ok(reply),
        }
    }
}

/// The error for a VMM answer of the wrong kind.
pub fn unexpected(action: &str, reply: &ApiReply) -> Error {
    Error::internal(format!("the VMM answered {action} with an unexpected reply: {reply:?}"))
}
