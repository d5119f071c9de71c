//! `densevm serve`: the daemon. MicroVMs are created and driven over the HTTP API
//! (Unix socket, optionally loopback TCP) until SIGINT or SIGTERM.
//!
//! Threads: the API server runs on its own threads (the api crate); requests reach
//! this process's event loop through a channel whose eventfd is registered next to the
//! Host's fds, and are answered with non-blocking replies, so a slow or stuck client
//! never holds up a VM.

use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};

use api::{ApiError, ApiServer, ApiServerConfig, VmmEndpoint};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;

use super::{daemon_limits, CommandError};
use crate::api_bridge::ApiBridge;
use crate::cli::ServeArgs;
use crate::seccomp::Kind;
use vmm::boot::boot_file::{self, PathPolicy};
use vmm::driver::{log_event, Milestones};
use vmm::host::{Host, HostConfig};

/// Event data of the API wake-up eventfd (the Host uses small numbers from 0 up).
const API_TOKEN: u32 = u32::MAX;
/// Event data of the wake-up eventfd of the threads that build and free VMs.
const WORKERS_TOKEN: u32 = u32::MAX - 1;
/// Longest sleep of the event loop between checks for termination.
const LOOP_TIMEOUT_MS: i32 = 200;

/// The event-loop subscriber of the daemon: the Host plus the API endpoint.
pub struct Daemon {
    host: Host,
    endpoint: VmmEndpoint,
    bridge: ApiBridge,
}

impl Daemon {
    /// Wraps `host`; API requests arrive on `endpoint`.
    pub fn new(host: Host, endpoint: VmmEndpoint) -> std::io::Result<Self> {
        Ok(Daemon { host, endpoint, bridge: ApiBridge::new()? })
    }

    /// The Host.
    pub fn host(&mut self) -> &mut Host {
        &mut self.host
    }

    fn serve_requests(&mut self, mut ops: Option<&mut EventOps>) {
        for req in self.endpoint.drain() {
            self.bridge.serve(&mut self.host, req, ops.as_deref_mut());
        }
    }

    /// Runs the bridge's periodic work that is due (the balloon budget policy).
    pub fn tick(&mut self) {
        self.bridge.tick(&self.host);
    }

    /// Answers every request still queued with 503 (the daemon is going away).
    pub fn refuse_pending(&mut self) {
        for req in self.endpoint.drain() {
            let _ = req.reply.send(Err(ApiError::unavailable("densevm is shutting down")));
        }
        self.bridge.refuse_finished();
    }
}

impl MutEventSubscriber for Daemon {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() == API_TOKEN {
            self.serve_requests(Some(ops));
            // VMs created by the requests join the loop.
            self.host.register_new(ops);
        } else if events.data() == WORKERS_TOKEN {
            self.bridge.finish_workers(&mut self.host);
            self.host.register_new(ops);
        } else {
            self.host.process(events, ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.host.init(ops);
        if let Err(e) = ops.add(Events::with_data(&self.endpoint.wake, API_TOKEN, EventSet::IN)) {
            tracing::error!("cannot watch the API channel: {e:?}");
        }
        if let Err(e) = ops.add(Events::with_data(self.bridge.wake_fd(), WORKERS_TOKEN, EventSet::IN)) {
            tracing::error!("cannot watch the VM worker threads: {e:?}");
        }
    }
}

/// Locks the daemon, tolerating a poisoned lock (stopping VMs must still work).
fn lock(d: &Mutex<Daemon>) -> MutexGuard<'_, Daemon> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

fn server_error(e: api::server::Error) -> CommandError {
    use api::socket::Error as S;
    match e {
        api::server::Error::Socket(s @ (S::InUse(_) | S::NotASocket(_) | S::NotLoopback(_) | S::BadTcpAddress(_))) => {
            CommandError::Input(s.to_string())
        }
        e @ (api::server::Error::NoToken | api::server::Error::NoConnections(_)) => CommandError::Input(e.to_string()),
        other => CommandError::Runtime(other.to_string()),
    }
}

/// Runs `densevm serve`.
pub fn main(args: ServeArgs) -> Result<ExitCode, CommandError> {
    let parse = if args.api_tcp_allow_remote { api::socket::parse_any_tcp_addr } else { api::socket::parse_tcp_addr };
    let tcp = args.api_tcp.as_deref().map(parse).transpose().map_err(|e| CommandError::Input(e.to_string()))?;
    if tcp.is_some() && args.api_token_file.is_none() {
        return Err(CommandError::Input(api::server::Error::NoToken.to_string()));
    }
    let token = args
        .api_token_file
        .as_deref()
        .map(api::auth::Token::from_file)
        .transpose()
        .map_err(|e| CommandError::Input(e.to_string()))?;
    let filters = crate::seccomp::Filters::build(args.seccomp).map_err(|e| CommandError::Runtime(e.to_string()))?;
    vmm::vcpu::set_thread_start_hook(filters.hook(Kind::Vcpu));
    let policy = PathPolicy::new(&args.allowed_dirs).map_err(|e| CommandError::Input(e.to_string()))?;
    let connections =
        args.api_max_connections_unix as u64 + if tcp.is_some() { args.api_max_connections_tcp as u64 } else { 0 };
    let hard = daemon_limits::raise_nofile().map_err(|e| CommandError::Runtime(e.to_string()))?;
    let limits = daemon_limits::resolve(args.max_vms, args.max_vcpus, connections, hard, daemon_limits::host_cpus())
        .map_err(|e| CommandError::Input(e.to_string()))?;
    match daemon_limits::set_oom_score_adj(args.oom_score_adj) {
        Ok(()) => tracing::info!("oom_score_adj: {}", args.oom_score_adj),
        Err(e) => tracing::warn!("{e}"),
    }
    if !policy.allowed_dirs().is_empty() {
        let dirs: Vec<_> = policy.allowed_dirs().iter().map(|d| d.display().to_string()).collect();
        tracing::info!("files are read only from beneath {}", dirs.join(", "));
    }
    boot_file::set_policy(policy).map_err(|e| CommandError::Runtime(e.to_string()))?;
    let mut host = Host::new_hooked(HostConfig::default(), Some(filters.memory_hook()))?;
    host.set_limits(limits);
    tracing::info!("{}", daemon_limits::describe(&limits, hard));
    let (budget, source) = match args.host_budget_mib {
        Some(mib) => (mib.saturating_mul(1 << 20), "--host-budget-mib"),
        None => (vmm::host::mem_available_bytes()?, "MemAvailable at start"),
    };
    host.set_memory_budget(Some(budget));
    tracing::info!("host memory budget: {} MiB of guest memory ({source})", budget >> 20);
    host.handle_termination_signals()?;
    let (chan, endpoint) = api::channel().map_err(|e| CommandError::Runtime(e.to_string()))?;
    let stats_mgr = host.memory().clone();
    let daemon = Daemon::new(host, endpoint).map_err(|e| CommandError::Runtime(format!("eventfd: {e}")))?;
    let daemon = Arc::new(Mutex::new(daemon));
    let mut em: EventManager<Arc<Mutex<Daemon>>> =
        EventManager::new().map_err(|e| CommandError::Runtime(format!("event manager: {e:?}")))?;
    em.add_subscriber(daemon.clone());

    let mut config = ApiServerConfig::new(&args.api_sock);
    config.tcp = tcp;
    config.tcp_token = token;
    config.tcp_allow_remote = args.api_tcp_allow_remote;
    config.tcp_hosts = args.api_tcp_hosts;
    config.max_connections_unix = args.api_max_connections_unix;
    config.max_connections_tcp = args.api_max_connections_tcp;
    config.thread_start = Some(api::server::ThreadStart(filters.hook(Kind::Api)));
    // GET /memory and /metrics read the lock-free statistics on the API's own
    // threads: no wait behind the event loop's other requests.
    config.host_stats = Some(api::HostStatsReader(Arc::new(move || stats_mgr.stats().host())));
    let server = ApiServer::start(config, chan).map_err(server_error)?;
    tracing::info!(
        pid = std::process::id(),
        "API on {}{}",
        server.socket_path().display(),
        server.tcp_addr().map(|a| format!(" and http://{a}")).unwrap_or_default(),
    );

    // This thread is the event loop from here on (the threads it spawns inherit it).
    filters.install(Kind::Vmm).map_err(|e| CommandError::Runtime(e.to_string()))?;
    tracing::info!("seccomp: {:?}", args.seccomp);
    let result = event_loop(&mut em, &daemon);
    {
        let mut d = lock(&daemon);
        d.host().stop_all();
        d.refuse_pending();
    }
    let stopped = server.shutdown();
    lock(&daemon).refuse_pending();
    // Every VM stopped: the host-wide vm.max_map_count goes back to what it was.
    memory::vma_budget::restore_all();
    result?;
    stopped.map_err(|e| CommandError::Runtime(format!("API server: {e}")))?;
    tracing::info!("every VM stopped; bye");
    Ok(ExitCode::SUCCESS)
}

/// Runs until a termination signal arrived (VMs finishing do not end the daemon).
fn event_loop(em: &mut EventManager<Arc<Mutex<Daemon>>>, daemon: &Mutex<Daemon>) -> Result<(), CommandError> {
    loop {
        em.run_with_timeout(LOOP_TIMEOUT_MS).map_err(|e| CommandError::Runtime(format!("event loop: {e:?}")))?;
        let mut d = lock(daemon);
        for e in d.host().take_log() {
            log_event(&e, Milestones::Info);
        }
        d.tick();
        if d.host().terminating() {
            tracing::info!("termination signal: stopping every VM");
            return Ok(());
        }
    }
}
