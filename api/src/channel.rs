//! The link between the HTTP server and the VMM: requests travel over a
//! `std::sync::mpsc` channel and an eventfd wakes the VMM's event loop; the VMM answers
//! each request through its [`ReplySender`], which never blocks.

use std::io;
use std::sync::mpsc::{self, Receiver, Sender};

use tokio::sync::{oneshot, OwnedSemaphorePermit};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::types::{
    Balloon, BalloonPolicyPatch, BalloonPolicyStatus, BalloonSpec, BalloonStatistics, CompactionActionType,
    CompactionConfig, CompactionConfigPatch, CompactionReport, DomainInfo, DomainPolicy, HostMemoryStats, InfoReply,
    MergeActionType, MergeConfig, MergeConfigPatch, VmActionType, VmConfig, VmInfo, VmMemoryStats,
};

/// What the HTTP API asks the VMM to do. Every id and body is already validated
/// (syntax and ranges); the VMM checks existence and state.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiAction {
    /// `GET /`: reply [`ApiReply::Info`].
    GetInfo,
    /// `PUT /vms/{vm_id}`: create a VM; reply [`ApiReply::Empty`], or
    /// [`ErrorKind::Conflict`] if the id is taken.
    PutVm {
        /// Id of the new VM.
        vm_id: String,
        /// Its configuration.
        config: VmConfig,
    },
    /// `GET /vms`: reply [`ApiReply::Vms`].
    ListVms,
    /// `GET /vms/{vm_id}`: reply [`ApiReply::Vm`] or [`ErrorKind::NotFound`].
    GetVm(String),
    /// `DELETE /vms/{vm_id}`: stop (if needed) and remove a VM; reply [`ApiReply::Empty`].
    DeleteVm(String),
    /// `PUT /vms/{vm_id}/actions`: reply [`ApiReply::Empty`], or
    /// [`ErrorKind::Conflict`] if the VM's state does not allow the action.
    VmAction {
        /// Target VM.
        vm_id: String,
        /// What to do.
        action: VmActionType,
    },
    /// `GET /vms/{vm_id}/memory`: reply [`ApiReply::VmMemory`].
    GetVmMemory(String),
    /// `GET /memory`: reply [`ApiReply::Memory`].
    GetMemory,
    /// `GET /memory/merge`: reply [`ApiReply::MergeConfig`].
    GetMergeConfig,
    /// `PATCH /memory/merge`: apply (see [`MergeConfigPatch::apply`]) and reply
    /// [`ApiReply::MergeConfig`] with the resulting settings.
    PatchMergeConfig(MergeConfigPatch),
    /// `PUT /memory/merge/actions`: reply [`ApiReply::Empty`].
    MergeAction(MergeActionType),
    /// `GET /memory/compaction`: reply [`ApiReply::CompactionConfig`].
    GetCompactionConfig,
    /// `PATCH /memory/compaction`: apply (the patch is validated) and reply
    /// [`ApiReply::CompactionConfig`] with the resulting settings.
    PatchCompactionConfig(CompactionConfigPatch),
    /// `PUT /memory/compaction/actions`: reply [`ApiReply::CompactionReport`], or
    /// [`ErrorKind::Conflict`] while another pass requested over the API runs.
    CompactionAction(CompactionActionType),
    /// `PUT /vms/{vm_id}/balloon`: give a `Created` VM a balloon (or replace its
    /// settings); reply [`ApiReply::Empty`], or [`ErrorKind::Conflict`] once it started.
    PutBalloon {
        /// Target VM.
        vm_id: String,
        /// The balloon's settings.
        spec: BalloonSpec,
    },
    /// `PATCH /vms/{vm_id}/balloon`: new target; reply [`ApiReply::Empty`].
    PatchBalloon {
        /// Target VM.
        vm_id: String,
        /// New target in MiB.
        amount_mib: u32,
    },
    /// `GET /vms/{vm_id}/balloon`: reply [`ApiReply::Balloon`].
    GetBalloon(String),
    /// `GET /vms/{vm_id}/balloon/statistics`: reply [`ApiReply::BalloonStatistics`].
    GetBalloonStatistics(String),
    /// `PATCH /vms/{vm_id}/balloon/statistics`: new polling interval; reply
    /// [`ApiReply::Empty`].
    PatchBalloonStatistics {
        /// Target VM.
        vm_id: String,
        /// Seconds between statistics requests.
        stats_polling_interval_s: u16,
    },
    /// `GET /memory/balloon-policy`: reply [`ApiReply::BalloonPolicy`].
    GetBalloonPolicy,
    /// `PATCH /memory/balloon-policy`: apply (the patch is validated) and reply
    /// [`ApiReply::BalloonPolicy`].
    PatchBalloonPolicy(BalloonPolicyPatch),
    /// `PUT /domains/{domain_name}`: declare a merge domain; reply [`ApiReply::Empty`]
    /// (also when it exists with this policy), or [`ErrorKind::Conflict`] if it exists
    /// with another.
    PutDomain {
        /// The domain's name.
        domain_name: String,
        /// Its policy.
        policy: DomainPolicy,
    },
    /// `GET /domains`: reply [`ApiReply::Domains`].
    ListDomains,
    /// `GET /domains/{domain_name}`: reply [`ApiReply::Domain`] or [`ErrorKind::NotFound`].
    GetDomain(String),
    /// `DELETE /domains/{domain_name}`: reply [`ApiReply::Empty`], or
    /// [`ErrorKind::Conflict`] while VMs are its members.
    DeleteDomain(String),
}

impl ApiAction {
    /// Short name of the action, for messages and logs.
    pub fn name(&self) -> &'static str {
        match self {
            ApiAction::GetInfo => "GetInfo",
            ApiAction::PutVm { .. } => "PutVm",
            ApiAction::ListVms => "ListVms",
            ApiAction::GetVm(_) => "GetVm",
            ApiAction::DeleteVm(_) => "DeleteVm",
            ApiAction::VmAction { .. } => "VmAction",
            ApiAction::GetVmMemory(_) => "GetVmMemory",
            ApiAction::GetMemory => "GetMemory",
            ApiAction::GetMergeConfig => "GetMergeConfig",
            ApiAction::PatchMergeConfig(_) => "PatchMergeConfig",
            ApiAction::MergeAction(_) => "MergeAction",
            ApiAction::GetCompactionConfig => "GetCompactionConfig",
            ApiAction::PatchCompactionConfig(_) => "PatchCompactionConfig",
            ApiAction::CompactionAction(_) => "CompactionAction",
            ApiAction::PutBalloon { .. } => "PutBalloon",
            ApiAction::PatchBalloon { .. } => "PatchBalloon",
            ApiAction::GetBalloon(_) => "GetBalloon",
            ApiAction::GetBalloonStatistics(_) => "GetBalloonStatistics",
            ApiAction::PatchBalloonStatistics { .. } => "PatchBalloonStatistics",
            ApiAction::GetBalloonPolicy => "GetBalloonPolicy",
            ApiAction::PatchBalloonPolicy(_) => "PatchBalloonPolicy",
            ApiAction::PutDomain { .. } => "PutDomain",
            ApiAction::ListDomains => "ListDomains",
            ApiAction::GetDomain(_) => "GetDomain",
            ApiAction::DeleteDomain(_) => "DeleteDomain",
        }
    }
}

/// The VMM's successful answer to an [`ApiAction`].
#[derive(Debug, Clone, PartialEq)]
pub enum ApiReply {
    /// Done, nothing to return (HTTP 204).
    Empty,
    /// Answer to [`ApiAction::GetInfo`].
    Info(InfoReply),
    /// Answer to [`ApiAction::ListVms`].
    Vms(Vec<VmInfo>),
    /// Answer to [`ApiAction::GetVm`].
    Vm(Box<VmInfo>),
    /// Answer to [`ApiAction::GetVmMemory`].
    VmMemory(VmMemoryStats),
    /// Answer to [`ApiAction::GetMemory`].
    Memory(Box<HostMemoryStats>),
    /// Answer to [`ApiAction::GetMergeConfig`] and [`ApiAction::PatchMergeConfig`].
    MergeConfig(MergeConfig),
    /// Answer to [`ApiAction::GetCompactionConfig`] and [`ApiAction::PatchCompactionConfig`].
    CompactionConfig(CompactionConfig),
    /// Answer to [`ApiAction::CompactionAction`]: what the pass did.
    CompactionReport(CompactionReport),
    /// Answer to [`ApiAction::GetBalloon`].
    Balloon(Box<Balloon>),
    /// Answer to [`ApiAction::GetBalloonStatistics`].
    BalloonStatistics(Box<BalloonStatistics>),
    /// Answer to [`ApiAction::GetBalloonPolicy`] and [`ApiAction::PatchBalloonPolicy`].
    BalloonPolicy(Box<BalloonPolicyStatus>),
    /// Answer to [`ApiAction::ListDomains`].
    Domains(Vec<DomainInfo>),
    /// Answer to [`ApiAction::GetDomain`].
    Domain(DomainInfo),
}

/// Class of a VMM-side failure; decides the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is invalid in a way only the VMM can tell (e.g. a missing file): 400.
    BadRequest,
    /// No such VM (or merge domain): 404.
    NotFound,
    /// The VM's state (or an existing VM with that id) forbids the request: 409.
    Conflict,
    /// The VMM cannot serve the request now: 503.
    Unavailable,
    /// A real internal failure: 500.
    Internal,
}

impl ErrorKind {
    /// The HTTP status code of this class.
    pub fn status_code(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        }
    }
}

/// The VMM's failure answer; becomes `{"fault_message": ...}` with the kind's status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{fault_message}")]
pub struct ApiError {
    /// Class of the failure.
    pub kind: ErrorKind,
    /// Message for the user.
    pub fault_message: String,
}

impl ApiError {
    /// Builds an error of `kind`.
    pub fn new(kind: ErrorKind, fault_message: impl Into<String>) -> Self {
        ApiError { kind, fault_message: fault_message.into() }
    }
    /// 400.
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, msg)
    }
    /// 404.
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, msg)
    }
    /// 409.
    pub fn conflict(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, msg)
    }
    /// 503.
    pub fn unavailable(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, msg)
    }
    /// 500.
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, msg)
    }
}

/// Where the VMM sends its answer to one request. Sending never blocks and may be done
/// from any thread; if the HTTP side gave up (timeout, client gone) the answer is dropped.
#[derive(Debug)]
pub struct ReplySender {
    tx: oneshot::Sender<Result<ApiReply, ApiError>>,
    // Bounds the number of requests queued for the VMM; released with the sender.
    _permit: Option<OwnedSemaphorePermit>,
}

impl ReplySender {
    /// Creates a sender and the receiver the HTTP side awaits.
    pub fn new() -> (Self, oneshot::Receiver<Result<ApiReply, ApiError>>) {
        let (tx, rx) = oneshot::channel();
        (ReplySender { tx, _permit: None }, rx)
    }

    pub(crate) fn with_permit(mut self, permit: OwnedSemaphorePermit) -> Self {
        self._permit = Some(permit);
        self
    }

    /// Sends the answer. Returns false if nobody waits for it any more.
    pub fn send(self, result: Result<ApiReply, ApiError>) -> bool {
        self.tx.send(result).is_ok()
    }

    /// True if nobody waits for the answer any more (the HTTP request timed out or its
    /// client went away). The VMM should still carry out state-changing requests.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// One request to the VMM.
#[derive(Debug)]
pub struct ApiRequest {
    /// What to do.
    pub action: ApiAction,
    /// Where to send the answer.
    pub reply: ReplySender,
}

/// The server's end of the link: queue a request, then wake the VMM.
#[derive(Debug)]
pub struct VmmChannel {
    /// Request queue to the VMM.
    pub sender: Sender<ApiRequest>,
    /// Written (+1) after each request so the VMM's event loop wakes up.
    pub wake: EventFd,
}

/// Errors of the channel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The VMM dropped its receiver.
    #[error("the VMM is not running")]
    Disconnected,
    /// The eventfd could not be created, cloned or written.
    #[error("API wake-up eventfd: {0}")]
    EventFd(#[source] io::Error),
}

impl VmmChannel {
    /// Queues `request` and wakes the VMM. Never blocks.
    pub fn send(&self, request: ApiRequest) -> Result<(), Error> {
        self.sender.send(request).map_err(|_| Error::Disconnected)?;
        // The counter cannot realistically overflow (2^64 - 2); a failed wake-up would
        // leave the request queued until the next one, so report it.
        self.wake.write(1).map_err(Error::EventFd)
    }
}

/// The VMM's end of the link: register `wake` in the event loop (readable when requests
/// are pending) and call [`VmmEndpoint::drain`] when it fires.
#[derive(Debug)]
pub struct VmmEndpoint {
    /// Request queue from the server.
    pub receiver: Receiver<ApiRequest>,
    /// Non-blocking eventfd, readable while requests may be pending.
    pub wake: EventFd,
}

impl VmmEndpoint {
    /// Clears the eventfd and returns every queued request. Never blocks.
    pub fn drain(&self) -> Vec<ApiRequest> {
        // EAGAIN (nothing written since the last read) is fine: requests may still be
        // queued from before, so always look at the queue.
        let _ = self.wake.read();
        self.receiver.try_iter().collect()
    }
}

/// Creates a linked pair: give the [`VmmChannel`] to [`crate::ApiServer::start`] and
/// keep the [`VmmEndpoint`] in the VMM. The eventfd is non-blocking.
pub fn channel() -> Result<(VmmChannel, VmmEndpoint), Error> {
    let (sender, receiver) = mpsc::channel();
    let wake = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::EventFd)?;
    let wake2 = wake.try_clone().map_err(Error::EventFd)?;
    Ok((VmmChannel { sender, wake }, VmmEndpoint { receiver, wake: wake2 }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_wakes_and_drain_collects() {
        let (chan, end) = channel().unwrap();
        assert!(end.drain().is_empty());
        let mut rxs = Vec::new();
        for _ in 0..3 {
            let (reply, rx) = ReplySender::new();
            rxs.push(rx);
            chan.send(ApiRequest { action: ApiAction::GetInfo, reply }).unwrap();
        }
        assert_eq!(end.wake.read().unwrap(), 3);
        let reqs = end.drain();
        assert_eq!(reqs.len(), 3);
        for r in reqs {
            assert!(!r.reply.is_closed());
            assert!(r.reply.send(Ok(ApiReply::Empty)));
        }
        for mut rx in rxs {
            assert_eq!(rx.try_recv().unwrap(), Ok(ApiReply::Empty));
        }
    }

    #[test]
    fn reply_to_gone_receiver_is_false() {
        let (reply, rx) = ReplySender::new();
        drop(rx);
        assert!(reply.is_closed());
        assert!(!reply.send(Err(ApiError::internal("x"))));
    }

    #[test]
    fn disconnected_vmm() {
        let (chan, end) = channel().unwrap();
        drop(end);
        let (reply, _rx) = ReplySender::new();
        let r = chan.send(ApiRequest { action: ApiAction::ListVms, reply });
        assert!(matches!(r, Err(Error::Disconnected)));
    }
}
