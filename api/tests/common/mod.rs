//! Test helpers: a fake VMM answering API requests from an in-memory table (it waits on
//! the wake eventfd with epoll, as the real VMM does) and the API client (`api_client`)
//! with the assertions the tests make on its responses.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use api::types::{
    Balloon, BalloonInfo, BalloonPolicyConfig, BalloonPolicyStatus, BalloonReport, BalloonStatistics, ChangeDetection,
    CompactionConfig, CompactionReport, CompactionStats, HostMemoryStats, InfoReply, MergeConfig, PolicyBand,
    VmActionType, VmInfo, VmMemoryStats, VmState,
};
use api::{ApiAction, ApiError, ApiReply, ApiRequest, ReplySender, VmmEndpoint};
use api::{ApiServer, ApiServerConfig};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// A fake VMM on its own thread.
pub struct FakeVmm {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    /// Replies held back forever (requests for VMs whose id starts with `stall`).
    pub stalled: Arc<Mutex<Vec<ReplySender>>>,
}

struct Table {
    vms: BTreeMap<String, VmInfo>,
    merge: MergeConfig,
    compaction: CompactionConfig,
    policy: BalloonPolicyConfig,
    domains: vmm::domains::Domains,
}

/// The API error of a domain registry error (the statuses the daemon's bridge gives).
fn domain_error(e: vmm::domains::Error) -> ApiError {
    match e {
        vmm::domains::Error::NotFound(_) => ApiError::not_found(e.to_string()),
        e if e.is_invalid_input() => ApiError::bad_request(e.to_string()),
        e => ApiError::conflict(e.to_string()),
    }
}

fn policy_status(c: BalloonPolicyConfig) -> ApiReply {
    ApiReply::BalloonPolicy(Box::new(BalloonPolicyStatus {
        config: c,
        host_budget_bytes: c.host_budget_mib.map(|m| m << 20),
        host_bytes_used: 64 << 20,
        band: if c.host_budget_mib.is_some() { PolicyBand::Within } else { PolicyBand::Off },
        targets_mib: BTreeMap::from([("b1".to_string(), 8)]),
        actions: 2,
        last_action: None,
    }))
}

fn handle(t: &mut Table, action: ApiAction) -> Result<ApiReply, ApiError> {
    let missing = |id: &str| ApiError::not_found(format!("no VM with id {id}"));
    match action {
        ApiAction::GetInfo => Ok(ApiReply::Info(InfoReply {
            version: "0.1.0-test".into(),
            kvm: true,
            kvm_api_version: 12,
            userfaultfd_features: vec!["WP_HUGETLBFS_SHMEM".into()],
            ring0_native: false,
            ring0_reason: "test".into(),
        })),
        ApiAction::PutVm { vm_id, config } => {
            if t.vms.contains_key(&vm_id) {
                return Err(ApiError::conflict(format!("VM {vm_id} exists")));
            }
            let info =
                VmInfo { vm_id: vm_id.clone(), state: VmState::Created, config, workload: None, exit_reason: None };
            t.vms.insert(vm_id, info);
            Ok(ApiReply::Empty)
        }
        ApiAction::ListVms => Ok(ApiReply::Vms(t.vms.values().cloned().collect())),
        ApiAction::GetVm(id) => t.vms.get(&id).map(|v| ApiReply::Vm(Box::new(v.clone()))).ok_or_else(|| missing(&id)),
        ApiAction::DeleteVm(id) => t.vms.remove(&id).map(|_| ApiReply::Empty).ok_or_else(|| missing(&id)),
        ApiAction::VmAction { vm_id, action } => {
            let vm = t.vms.get_mut(&vm_id).ok_or_else(|| missing(&vm_id))?;
            use VmActionType::*;
            use VmState::*;
            vm.state = match (action, vm.state) {
                (InstanceStart, Created) => Running,
                (Pause, Running) => Paused,
                (Resume, Paused) => Running,
                (Stop, Running | Paused) => Stopped,
                (a, s) => return Err(ApiError::conflict(format!("cannot {a:?} a {s:?} VM"))),
            };
            Ok(ApiReply::Empty)
        }
        ApiAction::GetVmMemory(id) => {
            let vm = t.vms.get(&id).ok_or_else(|| missing(&id))?;
            Ok(ApiReply::VmMemory(VmMemoryStats {
                guest_pages: u64::from(vm.config.mem_size_mib) * 256,
                resident_pages: 100,
                merged_pages: 40,
                zero_pages: 10,
                vma_count: 5,
                cow_copies: 3,
                cow_reuses: 2,
                cow_background_reuses: 6,
            }))
        }
        ApiAction::GetMemory => Ok(ApiReply::Memory(Box::new(HostMemoryStats {
            pages_shared: 7,
            pages_sharing: 33,
            general_profit: 1 << 20,
            fragmentation: 0.5,
            compaction: CompactionStats { passes: 3, frames_2m_returned: 12, ..Default::default() },
            ..Default::default()
        }))),
        ApiAction::GetMergeConfig => Ok(ApiReply::MergeConfig(t.merge)),
        ApiAction::PatchMergeConfig(p) => {
            p.apply(&mut t.merge);
            Ok(ApiReply::MergeConfig(t.merge))
        }
        ApiAction::MergeAction(_) => Ok(ApiReply::Empty),
        ApiAction::GetCompactionConfig => Ok(ApiReply::CompactionConfig(t.compaction)),
        ApiAction::PatchCompactionConfig(p) => {
            p.apply(&mut t.compaction);
            Ok(ApiReply::CompactionConfig(t.compaction))
        }
        ApiAction::CompactionAction(_) => Ok(ApiReply::CompactionReport(CompactionReport {
            pages_migrated: 700,
            frames_2m_returned: 2,
            frames_2m_in_use_before: 5,
            frames_2m_in_use_after: 3,
            ideal_frames_2m: 3,
            ..Default::default()
        })),
        ApiAction::PutBalloon { vm_id, spec } => {
            let vm = t.vms.get_mut(&vm_id).ok_or_else(|| missing(&vm_id))?;
            if vm.state != VmState::Created {
                return Err(ApiError::conflict(format!("VM {vm_id} has started")));
            }
            vm.config.balloon = Some(spec);
            Ok(ApiReply::Empty)
        }
        ApiAction::PatchBalloon { vm_id, amount_mib } => {
            let vm = t.vms.get_mut(&vm_id).ok_or_else(|| missing(&vm_id))?;
            let b = vm.config.balloon.as_mut().ok_or_else(|| ApiError::bad_request("no balloon"))?;
            b.amount_mib = amount_mib;
            Ok(ApiReply::Empty)
        }
        ApiAction::GetBalloon(id) => {
            let vm = t.vms.get(&id).ok_or_else(|| missing(&id))?;
            let spec = vm.config.balloon.ok_or_else(|| ApiError::bad_request("no balloon"))?;
            let info = BalloonInfo { spec, actual_mib: 0, target_pages: spec.amount_mib * 256, actual_pages: 0 };
            Ok(ApiReply::Balloon(Box::new(Balloon { info, counters: BalloonReport::default() })))
        }
        ApiAction::GetBalloonStatistics(id) => {
            let vm = t.vms.get(&id).ok_or_else(|| missing(&id))?;
            let spec = vm.config.balloon.ok_or_else(|| ApiError::bad_request("no balloon"))?;
            let target_pages = spec.amount_mib * 256;
            Ok(ApiReply::BalloonStatistics(Box::new(BalloonStatistics { target_pages, ..Default::default() })))
        }
        ApiAction::PatchBalloonStatistics { vm_id, stats_polling_interval_s } => {
            let vm = t.vms.get_mut(&vm_id).ok_or_else(|| missing(&vm_id))?;
            let b = vm.config.balloon.as_mut().ok_or_else(|| ApiError::bad_request("no balloon"))?;
            b.stats_polling_interval_s = stats_polling_interval_s;
            Ok(ApiReply::Empty)
        }
        ApiAction::GetBalloonPolicy => Ok(policy_status(t.policy)),
        ApiAction::PatchBalloonPolicy(p) => {
            t.policy = p.apply(&t.policy);
            Ok(policy_status(t.policy))
        }
        ApiAction::PutDomain { domain_name, policy } => {
            t.domains.declare(&domain_name, policy).map(|_| ApiReply::Empty).map_err(domain_error)
        }
        ApiAction::ListDomains => Ok(ApiReply::Domains(t.domains.list())),
        ApiAction::GetDomain(name) => t.domains.get(&name).map(ApiReply::Domain).map_err(domain_error),
        ApiAction::DeleteDomain(name) => t.domains.remove(&name).map(|()| ApiReply::Empty).map_err(domain_error),
    }
}

fn stalls(action: &ApiAction) -> bool {
    matches!(action, ApiAction::GetVm(id) if id.starts_with("stall"))
}

impl FakeVmm {
    /// Starts serving `end`.
    pub fn start(end: VmmEndpoint) -> FakeVmm {
        let stop = EventFd::new(0).unwrap();
        let stop2 = stop.try_clone().unwrap();
        let stalled = Arc::new(Mutex::new(Vec::new()));
        let stalled2 = stalled.clone();
        let thread = std::thread::spawn(move || {
            let mut table = Table {
                vms: BTreeMap::new(),
                merge: MergeConfig {
                    run: false,
                    pages_to_scan: 100,
                    sleep_ms: 20,
                    max_page_sharing: 256,
                    merge_zero_pages: false,
                    change_detection: ChangeDetection::DirtyLog,
                    hold_vcpus: true,
                },
                compaction: CompactionConfig::default(),
                policy: BalloonPolicyConfig::default(),
                domains: vmm::domains::Domains::default(),
            };
            let epoll = Epoll::new().unwrap();
            epoll.ctl(ControlOperation::Add, end.wake.as_raw_fd(), EpollEvent::new(EventSet::IN, 1)).unwrap();
            epoll.ctl(ControlOperation::Add, stop2.as_raw_fd(), EpollEvent::new(EventSet::IN, 2)).unwrap();
            let mut events = vec![EpollEvent::default(); 4];
            loop {
                let n = epoll.wait(-1, &mut events).unwrap();
                for ev in &events[..n] {
                    if ev.data() == 2 {
                        return;
                    }
                    for ApiRequest { action, reply } in end.drain() {
                        if stalls(&action) {
                            stalled2.lock().unwrap().push(reply);
                        } else {
                            reply.send(handle(&mut table, action));
                        }
                    }
                }
            }
        });
        FakeVmm { stop, thread: Some(thread), stalled }
    }
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The bearer token of the tests' TCP endpoints.
pub const TOKEN: &str = "test-token-0123456789";

/// A response, as the shared API client parses it.
pub use api_client::Response as Resp;

/// What the tests assert on a response, beyond what the client offers.
pub trait RespExt {
    /// The body as JSON (panics with the body if it is not JSON).
    fn json(&self) -> serde_json::Value;
    /// The `fault_message` of an error body; checks the JSON content type.
    fn fault(&self) -> String;
}

impl RespExt for Resp {
    fn json(&self) -> serde_json::Value {
        self.json_body().unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
    fn fault(&self) -> String {
        assert_eq!(self.header("content-type"), Some("application/json"), "{self:?}");
        let v = self.json();
        assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
        v["fault_message"].as_str().unwrap().to_string()
    }
}

/// Parses a complete response (raw mode).
pub fn parse(raw: &[u8]) -> Resp {
    api_client::raw::parse_response(raw).unwrap()
}

/// Builds a request with `Connection: close` (raw mode).
pub fn raw_request(method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    api_client::raw::request_bytes(method, path, body)
}

/// Writes `raw` and reads the whole response (raw mode).
pub fn exchange<S: Read + Write>(mut s: S, raw: &[u8]) -> Resp {
    s.write_all(raw).unwrap();
    api_client::raw::read_response(&mut s).unwrap()
}

/// Connects to the Unix socket with a read timeout (raw mode).
pub fn connect(sock: &Path) -> UnixStream {
    api_client::raw::connect(sock).unwrap()
}

/// One request over a new connection to the Unix socket.
pub fn request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Resp {
    api_client::request(sock, method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// A server on a fresh socket with a fake VMM behind it.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub server: Option<ApiServer>,
    pub vmm: Option<FakeVmm>,
}

impl Harness {
    /// Starts with a tuned config.
    pub fn with(tune: impl FnOnce(&mut ApiServerConfig)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let mut config = ApiServerConfig::new(&sock);
        tune(&mut config);
        let (chan, end) = api::channel().unwrap();
        let vmm = FakeVmm::start(end);
        let server = ApiServer::start(config, chan).unwrap();
        Harness { dir, sock, server: Some(server), vmm: Some(vmm) }
    }

    /// Starts with the default config.
    pub fn new() -> Harness {
        Self::with(|_| {})
    }

    /// One request over the socket.
    pub fn req(&self, method: &str, path: &str, body: Option<&str>) -> Resp {
        request(&self.sock, method, path, body)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().unwrap();
        }
        self.vmm.take();
    }
}
