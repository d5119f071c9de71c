//! The API server: its own thread with a small tokio runtime, serving HTTP/1.1 on the
//! Unix socket and, optionally, a loopback TCP port.

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

use crate::channel::VmmChannel;
use crate::socket::{self, SocketFile};
use crate::state::{AppState, Limits};

/// Default request body cap (64 KiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
/// Default wait for a VMM answer.
pub const DEFAULT_VMM_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a client has to send a request's headers, and then its body.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Most connections served at once; further ones are closed at once.
pub const MAX_CONNECTIONS: usize = 1024;
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
}

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ApiServerConfig {
    /// Unix socket path (created with mode 0600).
    pub socket_path: PathBuf,
    /// Optional loopback TCP address (`127.0.0.1:PORT` or `[::1]:PORT`; port 0 picks one).
    pub tcp: Option<SocketAddr>,
    /// Largest request body (413 above).
    pub max_body_bytes: usize,
    /// Longest wait for the VMM's answer (503 after).
    pub vmm_timeout: Duration,
    /// Time a client has to send the request headers, and then the body (408 after).
    pub request_timeout: Duration,
}

impl ApiServerConfig {
    /// Default settings for a socket at `socket_path`, no TCP.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        ApiServerConfig {
            socket_path: socket_path.into(),
            tcp: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            vmm_timeout: DEFAULT_VMM_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
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
    /// over `vmm`. Every setup error (socket in use, non-loopback TCP, ...) is
    /// reported here.
    pub fn start(config: ApiServerConfig, vmm: VmmChannel) -> Result<ApiServer, Error> {
        let std_tcp = config.tcp.map(socket::bind_tcp).transpose()?;
        let tcp_addr = std_tcp.as_ref().map(|l| l.local_addr()).transpose().map_err(Error::Runtime)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name("densevm-api-rt")
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
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
        let app = crate::routes::app(AppState::new(vmm, limits, crate::openapi::openapi_json()));
        let (stop_tx, stop_rx) = oneshot::channel();
        let header_timeout = config.request_timeout;
        let thread = std::thread::Builder::new()
            .name("densevm-api".into())
            .spawn(move || {
                rt.block_on(accept_loop(unix, tcp, app, header_timeout, stop_rx));
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

async fn accept_tcp(l: Option<&TcpListener>) -> io::Result<tokio::net::TcpStream> {
    match l {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Accepts connections until `stop` fires, then shuts the open ones down gracefully.
async fn accept_loop(
    unix: UnixListener,
    tcp: Option<TcpListener>,
    app: Router,
    header_timeout: Duration,
    mut stop: oneshot::Receiver<()>,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            r = unix.accept() => match r {
                Ok((s, _)) => serve(s, &app, &graceful, &slots, header_timeout),
                Err(e) => accept_failed(e).await,
            },
            r = accept_tcp(tcp.as_ref()) => match r {
                Ok(s) => serve(s, &app, &graceful, &slots, header_timeout),
                Err(e) => accept_failed(e).await,
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

/// Serves one connection on its own task.
fn serve<T>(io: T, app: &Router, graceful: &GracefulShutdown, slots: &Arc<Semaphore>, header_timeout: Duration)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(slot) = slots.clone().try_acquire_owned() else {
        tracing::warn!("API: {MAX_CONNECTIONS} connections open; closing a new one");
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
