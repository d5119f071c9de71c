//! Listening endpoints: the Unix socket (mode 0600, never stealing a live socket,
//! replacing a stale one, removed on shutdown) and the optional loopback-only TCP port.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Longest Unix socket path (`sun_path` less its terminating NUL).
const MAX_SUN_PATH: usize = 107;

/// Errors setting up a listening endpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process accepts connections on the socket path.
    #[error("{0} is in use: another process accepts connections on it")]
    InUse(PathBuf),
    /// Something other than a socket exists at the socket path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The existing socket could not be probed or removed.
    #[error("cannot replace existing socket {path}: {source}")]
    Stale {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Binding, securing or moving the new socket failed.
    #[error("cannot create API socket {path}: {source}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The TCP address is not a loopback address.
    #[error(
        "TCP address {0} is not a loopback address: only 127.0.0.0/8 and [::1] are served unless \
         remote access is allowed explicitly (--api-tcp-allow-remote)"
    )]
    NotLoopback(SocketAddr),
    /// The TCP address does not parse.
    #[error("invalid TCP address {0:?}: expected IP:PORT, e.g. 127.0.0.1:8080 or [::1]:8080")]
    BadTcpAddress(String),
    /// Binding the TCP port failed.
    #[error("cannot listen on TCP {addr}: {source}")]
    BindTcp {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Checks that `addr` is a loopback address.
pub fn check_loopback(addr: SocketAddr) -> Result<SocketAddr, Error> {
    if addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(Error::NotLoopback(addr))
    }
}

/// Parses `IP:PORT` (e.g. `127.0.0.1:8080`, `[::1]:8080`, `localhost:8080`) and checks
/// that it is a loopback address.
pub fn parse_tcp_addr(text: &str) -> Result<SocketAddr, Error> {
    check_loopback(parse_any_tcp_addr(text)?)
}

/// Parses `IP:PORT` like [`parse_tcp_addr`], any address (for `--api-tcp-allow-remote`).
pub fn parse_any_tcp_addr(text: &str) -> Result<SocketAddr, Error> {
    match text.strip_prefix("localhost:") {
        Some(port) => format!("127.0.0.1:{port}").parse(),
        None => text.parse::<SocketAddr>(),
    }
    .map_err(|_| Error::BadTcpAddress(text.to_string()))
}

/// Binds a TCP listener (non-blocking): a loopback address unless `allow_remote`.
pub(crate) fn bind_tcp(addr: SocketAddr, allow_remote: bool) -> Result<std::net::TcpListener, Error> {
    if !allow_remote {
        check_loopback(addr)?;
    }
    let l = std::net::TcpListener::bind(addr).map_err(|source| Error::BindTcp { addr, source })?;
    l.set_nonblocking(true).map_err(|source| Error::BindTcp { addr, source })?;
    Ok(l)
}

/// The socket file this server created; removed on drop if it is still ours.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// The socket's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Only remove the file if it is still the socket we bound (not a successor's).
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                if let Err(e) = fs::remove_file(&self.path) {
                    tracing::warn!("cannot remove API socket {}: {e}", self.path.display());
                }
            }
        }
    }
}

/// Deals with whatever exists at `path`: nothing (fine), a live socket (error), a stale
/// socket (removed), anything else (error).
fn clear_stale(path: &Path) -> Result<(), Error> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(Error::Stale { path: path.into(), source }),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::NotASocket(path.into()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(Error::InUse(path.into())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Stale { path: path.into(), source }),
        },
        Err(source) => Err(Error::Stale { path: path.into(), source }),
    }
}

/// A temporary name next to `path` to bind under, so that the socket only appears at
/// `path` once its mode is 0600; `None` if such a name would be too long.
fn temp_name(path: &Path) -> Option<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!(".densevm-{}-{n}.tmp", std::process::id());
    let tmp = match path.parent() {
        Some(dir) => dir.join(name),
        None => PathBuf::from(name),
    };
    (tmp.as_os_str().len() <= MAX_SUN_PATH).then_some(tmp)
}

/// Binds the API's Unix socket at `path` with mode 0600 (non-blocking listener).
pub(crate) fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile), Error> {
    let bind_err = |source| Error::Bind { path: path.into(), source };
    clear_stale(path)?;
    let listener = match temp_name(path) {
        Some(tmp) => {
            let _ = fs::remove_file(&tmp);
            let l = UnixListener::bind(&tmp).map_err(bind_err)?;
            let secured =
                fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).and_then(|()| fs::rename(&tmp, path));
            if let Err(e) = secured {
                let _ = fs::remove_file(&tmp);
                return Err(bind_err(e));
            }
            l
        }
        None => {
            let l = UnixListener::bind(path).map_err(bind_err)?;
            if let Err(e) = fs::set_permissions(path, fs::Permissions::from_mode(0o600)) {
                let _ = fs::remove_file(path);
                return Err(bind_err(e));
            }
            l
        }
    };
    let meta = fs::symlink_metadata(path).map_err(bind_err)?;
    let file = SocketFile { path: path.into(), dev: meta.dev(), ino: meta.ino() };
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok((listener, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only() {
        assert!(parse_tcp_addr("127.0.0.1:8080").is_ok());
        assert!(parse_tcp_addr("127.1.2.3:1").is_ok());
        assert!(parse_tcp_addr("[::1]:8080").is_ok());
        assert_eq!(parse_tcp_addr("localhost:9").unwrap(), "127.0.0.1:9".parse().unwrap());
        let e = parse_tcp_addr("0.0.0.0:8080").unwrap_err();
        assert!(matches!(e, Error::NotLoopback(_)));
        assert!(e.to_string().contains("loopback"), "{e}");
        assert!(matches!(parse_tcp_addr("[::]:80"), Err(Error::NotLoopback(_))));
        assert!(matches!(parse_tcp_addr("127.0.0.1"), Err(Error::BadTcpAddress(_))));
    }

    #[test]
    fn bind_secure_replace_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (l, f) = bind_unix(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Live: refused, and the file is left alone.
        assert!(matches!(bind_unix(&path), Err(Error::InUse(_))));
        assert!(path.exists());
        // Stale (listener closed, file left): replaced.
        drop(l);
        std::mem::forget(f);
        let (_l2, f2) = bind_unix(&path).unwrap();
        drop(f2);
        assert!(!path.exists());
        // Not a socket: refused and kept.
        fs::write(&path, b"x").unwrap();
        assert!(matches!(bind_unix(&path), Err(Error::NotASocket(_))));
        assert_eq!(fs::read(&path).unwrap(), b"x");
        // No temporary files are left behind.
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1);
    }
}
