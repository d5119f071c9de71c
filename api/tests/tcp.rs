//! The TCP endpoint locked down: a bearer token, a `Host` check, loopback unless told
//! otherwise, and connection limits of its own that cannot lock the Unix socket out;
//! idle connections are closed.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use api::auth::Token;
use api::server::Error;
use api::{ApiServer, ApiServerConfig};
use common::{parse, Harness, RespExt, TOKEN};

fn tcp_harness(tune: impl FnOnce(&mut ApiServerConfig)) -> (Harness, SocketAddr) {
    let h = Harness::with(|c| {
        c.tcp = Some("127.0.0.1:0".parse().unwrap());
        c.tcp_token = Token::new(TOKEN);
        tune(c);
    });
    let addr = h.server.as_ref().unwrap().tcp_addr().unwrap();
    (h, addr)
}

/// Sends `head` (request line and header fields, without the blank line) over a new TCP
/// connection and reads the answer.
fn raw_tcp(addr: SocketAddr, head: &str) -> common::Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("{head}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse(&out)
}

#[test]
fn tcp_without_a_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut config = ApiServerConfig::new(&sock);
    config.tcp = Some("127.0.0.1:0".parse().unwrap());
    let (chan, _end) = api::channel().unwrap();
    let e = ApiServer::start(config, chan).unwrap_err();
    assert!(matches!(e, Error::NoToken), "{e}");
    assert!(e.to_string().contains("--api-token-file"), "{e}");
    assert!(!sock.exists());
}

#[test]
fn tcp_needs_the_bearer_token() {
    let (h, addr) = tcp_harness(|_| {});
    let port = addr.port();
    // No token, a wrong one, another scheme: 401 with the fault shape and the challenge.
    for auth in ["", "\r\nAuthorization: Bearer wrong-token-0123456789", &format!("\r\nAuthorization: Basic {TOKEN}")] {
        let r = raw_tcp(addr, &format!("GET /vms HTTP/1.1\r\nHost: 127.0.0.1:{port}{auth}"));
        assert_eq!(r.status, 401, "{auth:?}: {r:?}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"densevm\""), "{r:?}");
        assert!(!r.fault().is_empty());
    }
    // Also before the body is looked at, and on unknown routes.
    let r = raw_tcp(addr, &format!("PUT /vms/a HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Length: 0"));
    assert_eq!(r.status, 401, "{r:?}");
    let r = raw_tcp(addr, &format!("GET /nope HTTP/1.1\r\nHost: localhost:{port}"));
    assert_eq!(r.status, 401, "{r:?}");
    // The right token (scheme case-insensitive).
    let r = raw_tcp(addr, &format!("GET /vms HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: bearer {TOKEN}"));
    assert_eq!(r.status, 200, "{r:?}");
    let mut c = api_client::Client::tcp(addr).unwrap().with_token(TOKEN);
    assert_eq!(
        c.request("PUT", "/memory/merge/actions", Some(r#"{"action_type": "UnmergeAll"}"#)).unwrap().status,
        204
    );
    // The Unix socket needs none.
    assert_eq!(h.req("GET", "/vms", None).status, 200);
}

#[test]
fn tcp_checks_the_host_header() {
    let (_h, addr) = tcp_harness(|c| c.tcp_hosts = vec!["densevm.internal".into()]);
    let port = addr.port();
    let auth = format!("Authorization: Bearer {TOKEN}");
    for host in [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_string(),
        format!("localhost:{port}"),
        "localhost".to_string(),
        "densevm.internal".to_string(),
    ] {
        let r = raw_tcp(addr, &format!("GET / HTTP/1.1\r\nHost: {host}\r\n{auth}"));
        assert_eq!(r.status, 200, "{host}: {r:?}");
    }
    // DNS rebinding: the browser sends the attacker's name.
    for host in ["evil.example", &format!("evil.example:{port}"), &format!("127.0.0.1:{}", port.wrapping_add(1))] {
        let r = raw_tcp(addr, &format!("GET / HTTP/1.1\r\nHost: {host}\r\n{auth}"));
        assert_eq!(r.status, 421, "{host}: {r:?}");
        assert!(r.fault().contains("does not name this server"), "{r:?}");
    }
    // An absolute URI naming another host.
    let r = raw_tcp(addr, &format!("GET http://evil.example/ HTTP/1.1\r\nHost: localhost\r\n{auth}"));
    assert_eq!(r.status, 421, "{r:?}");
    // No Host at all.
    let r = raw_tcp(addr, &format!("GET / HTTP/1.1\r\n{auth}"));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.fault().contains("Host"), "{r:?}");
}

#[test]
fn remote_tcp_needs_the_explicit_flag() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut config = ApiServerConfig::new(&sock);
    config.tcp = Some("0.0.0.0:0".parse().unwrap());
    config.tcp_token = Token::new(TOKEN);
    let (chan, _end) = api::channel().unwrap();
    let e = ApiServer::start(config.clone(), chan).unwrap_err();
    assert!(e.to_string().contains("--api-tcp-allow-remote"), "{e}");
    config.tcp_allow_remote = true;
    let (chan, _end) = api::channel().unwrap();
    let server = ApiServer::start(config, chan).unwrap();
    assert!(server.tcp_addr().unwrap().ip().is_unspecified());
    server.shutdown().unwrap();
}

/// Raises this process's open-file limit to `want` if the hard limit allows.
fn raise_nofile(want: u64) -> bool {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return false;
    }
    if lim.rlim_cur >= want {
        return true;
    }
    if lim.rlim_max < want {
        return false;
    }
    lim.rlim_cur = want;
    // SAFETY: setrlimit reads the struct we own.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 }
}

/// Finding 4 of issue 15: with one limit for both endpoints, 1,030 idle TCP connections
/// locked the Unix socket out. Now TCP has its own (smaller) limit.
#[test]
fn idle_tcp_connections_cannot_lock_out_the_unix_socket() {
    const IDLE: usize = 1100;
    if !raise_nofile(4096) {
        eprintln!("skipped: cannot raise RLIMIT_NOFILE to 4096");
        return;
    }
    let (h, addr) = tcp_harness(|_| {});
    let idle: Vec<TcpStream> = (0..IDLE).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // Let the server accept them all (those over the TCP limit are closed at once).
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let r = h.req("GET", "/", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // A TCP connection past the limit is closed without an answer.
    let mut extra = TcpStream::connect(addr).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = extra
        .write_all(format!("GET / HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").as_bytes());
    let mut out = Vec::new();
    let _ = extra.read_to_end(&mut out);
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    drop(idle);
}

#[test]
fn connection_limits_are_per_endpoint_and_idle_connections_are_closed() {
    let (h, addr) = tcp_harness(|c| {
        c.max_connections_unix = 4;
        c.max_connections_tcp = 2;
        c.request_timeout = Duration::from_millis(500);
    });
    let tcp: Vec<_> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let unix: Vec<_> = (0..3).map(|_| common::connect(&h.sock)).collect();
    std::thread::sleep(Duration::from_millis(100));
    // The fourth Unix slot is free whatever TCP holds.
    assert_eq!(h.req("GET", "/", None).status, 200);
    // Idle connections that never sent a byte are closed after the header timeout, which
    // frees their slots.
    let t = Instant::now();
    for mut s in tcp {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(out.is_empty() || out.starts_with(b"HTTP/1.1 408"), "{out:?}");
    }
    for mut s in unix {
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let mut c = api_client::Client::tcp(addr).unwrap().with_token(TOKEN);
    assert_eq!(c.request("GET", "/", None).unwrap().status, 200);
    drop(c);
    // A keep-alive connection idle after its answer is closed too.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET / HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").as_bytes())
        .unwrap();
    let t = Instant::now();
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("the server closes the idle keep-alive connection");
    assert!(out.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
}
