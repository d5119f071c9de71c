//! Guarding the TCP endpoint: a bearer token read from a file that only its owner may
//! read, compared in constant time, and a `Host` check against DNS rebinding. The Unix
//! socket needs neither: access to it is the socket file's permissions (0600).

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::Error as HttpError;

/// Fewest characters a token may have.
pub const MIN_TOKEN_LEN: usize = 16;
/// Most characters a token may have.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Permission bits of a token file that other users must not have.
const OTHERS_BITS: u32 = 0o007;

/// Errors loading a token.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The token file cannot be opened or read.
    #[error("cannot read the API token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The token file is not a regular file.
    #[error("API token file {0} is not a regular file")]
    NotAFile(PathBuf),
    /// Other users may read or write the token file.
    #[error(
        "API token file {path} has mode {mode:04o}: other users may access it; make it readable by \
         its owner only (chmod 600 {path})"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The token is too short, too long or holds characters other than visible ASCII.
    #[error(
        "API token in {0} is invalid: it must be {MIN_TOKEN_LEN}..={MAX_TOKEN_LEN} visible ASCII \
         characters (no spaces) on one line"
    )]
    BadToken(PathBuf),
}

/// A bearer token. Its `Debug` form does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<[u8]>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<{} bytes>)", self.0.len())
    }
}

impl Token {
    /// Checks and wraps `text` (surrounding whitespace, e.g. a final newline, is dropped).
    pub fn new(text: &str) -> Option<Token> {
        let t = text.trim();
        let ok = (MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| Token(t.as_bytes().into()))
    }

    /// Reads the token from `path`: a regular file that other users cannot access.
    pub fn from_file(path: &Path) -> Result<Token, Error> {
        let read_err = |source| Error::Read { path: path.into(), source };
        // O_NONBLOCK: a FIFO planted at the path must not block the start.
        let mut file = fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(Error::NotAFile(path.into()));
        }
        let mode = meta.mode() & 0o7777;
        if mode & OTHERS_BITS != 0 {
            return Err(Error::Permissions { path: path.into(), mode });
        }
        let mut text = String::new();
        (&mut file).take(MAX_TOKEN_LEN as u64 + 2).read_to_string(&mut text).map_err(read_err)?;
        Token::new(&text).ok_or_else(|| Error::BadToken(path.into()))
    }

    /// Whether `candidate` is this token, in time independent of where they differ.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let expected: &[u8] = &self.0;
        let mut diff = u8::from(expected.len() != candidate.len());
        for (i, e) in expected.iter().enumerate() {
            diff |= e ^ candidate.get(i).copied().unwrap_or(0);
        }
        std::hint::black_box(diff) == 0
    }
}

/// What the TCP endpoint accepts: the token and the `Host` values naming this server.
#[derive(Debug, Clone)]
pub struct TcpGuard {
    token: Token,
    hosts: Arc<[String]>,
}

impl TcpGuard {
    /// A guard for a server bound at `bound`: `Host` may be the bound address or
    /// `localhost`, with or without the port, or one of `extra_hosts` (names under
    /// which the host is reached, with or without a port).
    pub fn new(token: Token, bound: SocketAddr, extra_hosts: &[String]) -> TcpGuard {
        let port = bound.port();
        let ip = match bound {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        let mut hosts = Vec::new();
        let names = [ip, "localhost".to_string()].into_iter().chain(extra_hosts.iter().map(|h| h.to_ascii_lowercase()));
        for name in names {
            // A name that carries its own port (`name:port`, `[v6]:port`) is taken as is.
            let has_port = if name.starts_with('[') { name.contains("]:") } else { name.contains(':') };
            if !has_port {
                hosts.push(format!("{name}:{port}"));
            }
            hosts.push(name);
        }
        TcpGuard { token, hosts: hosts.into() }
    }

    /// The accepted `Host` values.
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    fn host_ok(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    /// Checks a request's `Host` (and an absolute URI's authority) and its token.
    fn check(&self, req: &Request) -> Result<(), HttpError> {
        let host = match req.headers().get(header::HOST).map(|v| v.to_str()) {
            None => return Err(HttpError::bad_request("the Host header is missing")),
            Some(Err(_)) => return Err(misdirected("the Host header is not valid text".into())),
            Some(Ok(h)) => h,
        };
        if !self.host_ok(host) {
            return Err(misdirected(format!("Host {host:?} does not name this server")));
        }
        if let Some(authority) = req.uri().authority() {
            if !self.host_ok(authority.as_str()) {
                return Err(misdirected(format!("{authority} does not name this server")));
            }
        }
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        match presented {
            Some(t) if self.token.matches(t.as_bytes()) => Ok(()),
            Some(_) => Err(unauthorized("the bearer token is not valid")),
            None => Err(unauthorized("this endpoint needs 'Authorization: Bearer <token>'")),
        }
    }
}

fn misdirected(message: String) -> HttpError {
    HttpError::new(StatusCode::MISDIRECTED_REQUEST, message)
}

fn unauthorized(message: &str) -> HttpError {
    HttpError::new(StatusCode::UNAUTHORIZED, message)
}

/// Middleware of the TCP endpoint: 400 without `Host`, 421 for a `Host` that does not
/// name this server, 401 (with `WWW-Authenticate: Bearer`) without the right token.
pub async fn tcp_guard(State(guard): State<TcpGuard>, req: Request, next: Next) -> Response {
    match guard.check(&req) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            let challenge = e.status == StatusCode::UNAUTHORIZED;
            let mut r = e.into_response();
            if challenge {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"densevm\""));
            }
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn token_rules_and_comparison() {
        assert!(Token::new("short").is_none());
        assert!(Token::new("sixteen chars ok").is_none(), "spaces");
        let t = Token::new("0123456789abcdef\n").unwrap();
        assert!(t.matches(b"0123456789abcdef"));
        assert!(!t.matches(b"0123456789abcdeF"));
        assert!(!t.matches(b"0123456789abcdef0"));
        assert!(!t.matches(b"0123456789abcde"));
        assert!(!t.matches(b""));
        assert!(!format!("{t:?}").contains("0123"));
    }

    #[test]
    fn token_file_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        fs::write(&path, "0123456789abcdef\n").unwrap();
        for (mode, ok) in [(0o600, true), (0o400, true), (0o640, true), (0o644, false), (0o602, false)] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let r = Token::from_file(&path);
            assert_eq!(r.is_ok(), ok, "{mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(matches!(e, Error::Permissions { .. }) && e.to_string().contains("chmod 600"), "{e}");
            }
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "x").unwrap();
        assert!(matches!(Token::from_file(&path), Err(Error::BadToken(_))));
        assert!(matches!(Token::from_file(dir.path()), Err(Error::NotAFile(_))));
        assert!(matches!(Token::from_file(&dir.path().join("nope")), Err(Error::Read { .. })));
    }

    #[test]
    fn hosts_accepted() {
        let t = Token::new("0123456789abcdef").unwrap();
        let g = TcpGuard::new(t.clone(), "127.0.0.1:8080".parse().unwrap(), &["api.example".into()]);
        for ok in ["127.0.0.1:8080", "127.0.0.1", "localhost", "LOCALHOST:8080", "api.example", "api.example:8080"] {
            assert!(g.host_ok(ok), "{ok}");
        }
        for bad in ["127.0.0.1:8081", "evil.example", "localhost:80", "", "127.0.0.2:8080"] {
            assert!(!g.host_ok(bad), "{bad}");
        }
        let g = TcpGuard::new(t, "[::1]:9".parse().unwrap(), &[]);
        assert!(g.host_ok("[::1]:9") && g.host_ok("[::1]") && !g.host_ok("[::1]:10"));
    }
}
