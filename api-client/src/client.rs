//! A blocking HTTP/1.1 client for the densevm API: hyper's client on one keep-alive
//! connection, driven by a private current-thread tokio runtime.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::runtime::Runtime;

use crate::Response;

/// How long connecting or one exchange may take unless [`Client::set_timeout`] says
/// otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The runtime that drives the connection could not be built.
    #[error("cannot build the client runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// Connecting to the server failed.
    #[error("cannot connect to {to}: {source}")]
    Connect {
        /// The socket path or address.
        to: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The method or path cannot make a request.
    #[error("invalid request {method} {path}: {source}")]
    Request {
        /// The method given.
        method: String,
        /// The path given.
        path: String,
        /// Why it was refused.
        #[source]
        source: hyper::http::Error,
    },
    /// The HTTP exchange failed (connection closed or reset, malformed answer, ...).
    #[error("HTTP exchange failed: {0}")]
    Http(#[from] hyper::Error),
    /// The server did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// One keep-alive HTTP/1.1 connection to the API server.
///
/// Requests go one at a time; the connection is closed when the client is dropped.
/// Once the server has closed it (idle timeout, an answer with `Connection: close`),
/// requests fail with [`Error::Http`]: connect again.
pub struct Client {
    runtime: Runtime,
    sender: SendRequest<Full<Bytes>>,
    timeout: Duration,
    token: Option<String>,
}

impl Client {
    /// Connects to the server's Unix socket.
    pub fn unix(path: impl AsRef<Path>) -> Result<Client, Error> {
        let path = path.as_ref().to_path_buf();
        let to = path.display().to_string();
        Self::connect(to, async move { tokio::net::UnixStream::connect(path).await })
    }

    /// Connects to the server's TCP endpoint (add its token with [`Client::with_token`]).
    pub fn tcp(addr: SocketAddr) -> Result<Client, Error> {
        Self::connect(addr.to_string(), async move { tokio::net::TcpStream::connect(addr).await })
    }

    fn connect<S, F>(to: String, connect: F) -> Result<Client, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: Future<Output = std::io::Result<S>>,
    {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().map_err(Error::Runtime)?;
        let timeout = DEFAULT_TIMEOUT;
        let sender = runtime.block_on(async {
            let stream = tokio::time::timeout(timeout, connect)
                .await
                .map_err(|_| Error::Timeout(timeout))?
                .map_err(|source| Error::Connect { to, source })?;
            let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
            // The connection task runs whenever the runtime is driven, i.e. during
            // `request`; its errors also fail the request that was in flight.
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("API client connection ended: {e}");
                }
            });
            Ok::<_, Error>(sender)
        })?;
        Ok(Client { runtime, sender, timeout, token: None })
    }

    /// Sends `Authorization: Bearer <token>` with every request (the TCP endpoint
    /// needs it; the Unix socket ignores it).
    pub fn with_token(mut self, token: impl Into<String>) -> Client {
        self.token = Some(token.into());
        self
    }

    /// Sets how long one exchange may take (default [`DEFAULT_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends `method path` with an optional JSON `body` and waits for the whole answer.
    ///
    /// A body is sent with `Content-Type: application/json` and its `Content-Length`
    /// (also when empty); without one, neither header is sent.
    pub fn request(&mut self, method: &str, path: &str, body: Option<&str>) -> Result<Response, Error> {
        let mut builder = Request::builder().method(method).uri(path).header(HOST, "localhost");
        if let Some(t) = &self.token {
            builder = builder.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(b) = body {
            builder = builder.header(CONTENT_TYPE, "application/json").header(CONTENT_LENGTH, b.len());
        }
        let request = builder
            .body(Full::new(Bytes::copy_from_slice(body.unwrap_or("").as_bytes())))
            .map_err(|source| Error::Request { method: method.into(), path: path.into(), source })?;
        let (timeout, sender) = (self.timeout, &mut self.sender);
        self.runtime.block_on(async move {
            let exchange = async {
                sender.ready().await?;
                let (parts, body) = sender.send_request(request).await?.into_parts();
                let body = body.collect().await?.to_bytes();
                let headers = parts
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).trim().to_owned()))
                    .collect();
                Ok(Response {
                    status: parts.status.as_u16(),
                    headers,
                    body: String::from_utf8_lossy(&body).into_owned(),
                })
            };
            tokio::time::timeout(timeout, exchange).await.map_err(|_| Error::Timeout(timeout))?
        })
    }
}

/// One request over a new connection to the Unix socket `sock`.
pub fn request(sock: impl AsRef<Path>, method: &str, path: &str, body: Option<&str>) -> Result<Response, Error> {
    Client::unix(sock)?.request(method, path, body)
}
