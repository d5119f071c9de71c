//! The API server: its own thread with a small tokio runtime, serving HTTP/1.1 on the
//! Unix socket and, optionally, a TCP port guarded by a bearer token and a `Host`
//! check (loopback only unless remote access is allowed explicitly).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{oneshot, Semaphore};

use crate::auth::{self, TcpGuard, Token};
use crate::channel::VmmChannel;
use crate::socket::{self, SocketFile};
use crate::state::{AppState, HostStatsReader, Limits};

/// Default request body cap (64 KiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
/// Default wait for a VMM answer.
pub const DEFAULT_VMM_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a client has to send a request's headers, and then its body.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for the most connections served at once on the Unix socket; further ones
/// are closed at once.
pub const DEFAULT_MAX_CONNECTIONS_UNIX: usize = 512;
/// Default for the most connections served at once on the TCP port (a limit of its
/// own, so that TCP clients cannot lock the Unix socket out).
pub const DEFAULT_MAX_CONNECTIONS_TCP: usize = 128;
/// Worker threads of the server's runtime.
const WORKER_THREADS: usize = 2;
/// How long shutdown waits for in-flight requests.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// Errors starting or stopping the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listening endpoint could not be set up.
    #[error(transparent)]
    Socket(#[from] socket::Error),
    /// The tokio runtime could not be built or a listener registered with it.
    #[error("cannot start the API runtime: {0}")]
    Runtime(#[source] io::Error),
    /// The server thread could not be spawned.
    #[error("cannot spawn the API server thread: {0}")]
    Thread(#[source] io::Error),
    /// The server thread panicked.
    #[error("the API server thread panicked")]
    Panicked,
    /// TCP was asked for without a bearer token.
    #[error("the TCP endpoint needs a bearer token: give --api-token-file PATH (a file only its owner can read)")]
    NoToken,
    /// A connection limit of 0.
    #[error("the {0} connection limit must be at least 1")]
    NoConnections(&'static str),
}

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ApiServerConfig {
    /// Unix socket path (created with mode 0600).
    pub socket_path: PathBuf,
    /// Optional TCP address (`127.0.0.1:PORT` or `[::1]:PORT`; port 0 picks one); needs
    /// `tcp_token`, and a loopback address unless `tcp_allow_remote`.
    pub tcp: Option<SocketAddr>,
    /// The bearer token every TCP request must carry (`Authorization: Bearer ...`).
    pub tcp_token: Option<Token>,
    /// Whether `tcp` may be a non-loopback address.
    pub tcp_allow_remote: bool,
    /// Further names TCP requests may give as `Host` (besides the bound address and
    /// `localhost`), with or without a port.
    pub tcp_hosts: Vec<String>,
    /// Most connections open at once on the Unix socket.
    pub max_connections_unix: usize,
    /// Most connections open at once on the TCP port.
    pub max_connections_tcp: usize,
    /// Largest request body (413 above).
    pub max_body_bytes: usize,
    /// Longest wait for the VMM's answer (503 after).
    pub vmm_timeout: Duration,
    /// Time a client has to send the request headers, and then the body (408 after).
    pub request_timeout: Duration,
    /// Run first thing on every thread of the server (the accept thread and the
    /// runtime's threads), e.g. to install the API seccomp filter; none by default.
    pub thread_start: Option<ThreadStart>,
    /// Reads the host statistics on the server's own threads (`GET /memory` and
    /// `/metrics` then never wait for the VMM's event loop); none by default.
    pub host_stats: Option<HostStatsReader>,
}

/// A function run first thing on each API server thread.
#[derive(Clone)]
pub struct ThreadStart(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for ThreadStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ThreadStart")
    }
}

impl ApiServerConfig {
    /// Default settings for a socket at `socket_path`, no TCP.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        ApiServerConfig {
            socket_path: socket_path.into(),
            tcp: None,
            tcp_token: None,
            tcp_allow_remote: false,
            tcp_hosts: Vec::new(),
            max_connections_unix: DEFAULT_MAX_CONNECTIONS_UNIX,
            max_connections_tcp: DEFAULT_MAX_CONNECTIONS_TCP,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            vmm_timeout: DEFAULT_VMM_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            thread_start: None,
            host_stats: None,
        }
    }
}

/// A running API server. Stop it with [`ApiServer::shutdown`] (dropping it also stops
/// it); either way the socket file is removed.
#[derive(Debug)]
pub struct ApiServer {
    socket_path: PathBuf,
    socket: Option<SocketFile>,
    tcp_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Binds the endpoints and starts serving on a new thread. Requests go to the VMM
    /// over `vmm`. Every setup error (socket in use, non-loopback TCP, TCP without a
    /// token, ...) is reported here.
    pub fn start(config: ApiServerConfig, vmm: VmmChannel) -> Result<ApiServer, Error> {
        if config.max_connections_unix == 0 {
            return Err(Error::NoConnections("Unix socket"));
        }
        if config.tcp.is_some() && config.max_connections_tcp == 0 {
            return Err(Error::NoConnections("TCP"));
        }
        let token = match (config.tcp, &config.tcp_token) {
            (Some(_), None) => return Err(Error::NoToken),
            (_, t) => t.clone(),
        };
        let std_tcp = config.tcp.map(|a| socket::bind_tcp(a, config.tcp_allow_remote)).transpose()?;
        let tcp_addr = std_tcp.as_ref().map(|l| l.local_addr()).transpose().map_err(Error::Runtime)?;
        let hook = config.thread_start.clone();
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        let start_hook = hook.clone();
        rt.on_thread_start(move || {
            crate::sched::shorten_this_threads_slice();
            if let Some(h) = &start_hook {
                (h.0)();
            }
        });
        let rt = rt.worker_threads(WORKER_THREADS).thread_name("densevm-api-rt").enable_all().build();
        let rt = rt.map_err(Error::Runtime)?;
        let (std_unix, socket) = socket::bind_unix(&config.socket_path)?;
        let (unix, tcp) = {
            let _guard = rt.enter();
            let unix = UnixListener::from_std(std_unix).map_err(Error::Runtime)?;
            let tcp = std_tcp.map(TcpListener::from_std).transpose().map_err(Error::Runtime)?;
            (unix, tcp)
        };
        let limits = Limits {
            max_body_bytes: config.max_body_bytes,
            body_timeout: config.request_timeout,
            vmm_timeout: config.vmm_timeout,
        };
        let state =
            AppState::new(vmm, limits, crate::openapi::openapi_json()).with_host_stats(config.host_stats.clone());
        let app = crate::routes::app(state);
        let tcp = match (tcp, tcp_addr, token) {
            (Some(l), Some(addr), Some(token)) => {
                let guard = TcpGuard::new(token, addr, &config.tcp_hosts);
                tracing::debug!("TCP Host names accepted: {:?}", guard.hosts());
                let app = app.clone().layer(axum::middleware::from_fn_with_state(guard, auth::tcp_guard));
                Some(Endpoint { listener: l, app, slots: Arc::new(Semaphore::new(config.max_connections_tcp)) })
            }
            _ => None,
        };
        let unix = Endpoint { listener: unix, app, slots: Arc::new(Semaphore::new(config.max_connections_unix)) };
        let (stop_tx, stop_rx) = oneshot::channel();
        let header_timeout = config.request_timeout;
        let thread = std::thread::Builder::new()
            .name("densevm-api".into())
            .spawn(move || {
                crate::sched::shorten_this_threads_slice();
                if let Some(h) = hook {
                    (h.0)();
                }
                rt.block_on(accept_loop(unix, tcp, header_timeout, stop_rx));
                rt.shutdown_timeout(SHUTDOWN_GRACE);
            })
            .map_err(Error::Thread)?;
        tracing::info!(
            "API listening on {}{}",
            socket.path().display(),
            tcp_addr.map(|a| format!(" and http://{a}")).unwrap_or_default()
        );
        Ok(ApiServer {
            socket_path: config.socket_path,
            socket: Some(socket),
            tcp_addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The Unix socket's path.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The TCP address actually bound (with the chosen port if 0 was asked for).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// Stops accepting, gives in-flight requests a short grace period, joins the server
    /// thread and removes the socket file.
    pub fn shutdown(mut self) -> Result<(), Error> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let joined = match self.thread.take() {
            Some(t) => t.join().map_err(|_| Error::Panicked),
            None => Ok(()),
        };
        // Removes the socket file (if it is still ours).
        self.socket = None;
        joined
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            tracing::warn!("API server: {e}");
        }
    }
}

/// One listening endpoint: its application (the TCP one behind the guard) and its own
/// connection slots.
struct Endpoint<L> {
    listener: L,
    app: Router,
    slots: Arc<Semaphore>,
}

async fn accept_tcp(l: Option<&Endpoint<TcpListener>>) -> io::Result<tokio::net::TcpStream> {
    match l {
        Some(e) => e.listener.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Accepts connections until `stop` fires, then shuts the open ones down gracefully.
async fn accept_loop(
    unix: Endpoint<UnixListener>,
    tcp: Option<Endpoint<TcpListener>>,
    header_timeout: Duration,
    mut stop: oneshot::Receiver<()>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            r = unix.listener.accept() => match r {
                Ok((s, _)) => serve(s, "Unix socket", &unix.app, &graceful, &unix.slots, header_timeout),
                Err(e) => accept_failed(e).await,
            },
            r = accept_tcp(tcp.as_ref()) => match (r, &tcp) {
                (Ok(s), Some(t)) => serve(s, "TCP", &t.app, &graceful, &t.slots, header_timeout),
                (Ok(_), None) => {}
                (Err(e), _) => accept_failed(e).await,
            },
        }
    }
    drop(unix);
    drop(tcp);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::debug!("API shutdown: dropping connections still open");
    }
}

async fn accept_failed(e: io::Error) {
    // E.g. EMFILE: back off instead of spinning.
    tracing::warn!("API accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Serves one connection on its own task, if its endpoint has a free slot. A client
/// that sends no request head within `header_timeout` (including one idle between
/// requests) is disconnected, so idle connections cannot hold slots for long.
fn serve<T>(
    io: T,
    endpoint: &str,
    app: &Router,
    graceful: &GracefulShutdown,
    slots: &Arc<Semaphore>,
    header_timeout: Duration,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(slot) = slots.clone().try_acquire_owned() else {
        tracing::warn!("API: the {endpoint} has its most connections open; closing a new one");
        return;
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app.clone()));
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(e) = conn.await {
            tracing::debug!("API connection: {e}");
        }
    });
}
