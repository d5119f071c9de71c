//! Socket life cycle and TCP: mode 0600, refusing a live socket, replacing a stale
//! one, removal on shutdown, loopback-only TCP, slow-client timeouts.

// `MergeConfig` (the merger's `Tunables`) is `Copy`; common/ still clones it.
mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use api::server::Error;
use api::{socket, ApiServer, ApiServerConfig};
use common::{exchange, raw_request, FakeVmm, Harness};

#[test]
fn socket_is_0600_and_removed_on_shutdown() {
    let mut h = Harness::new();
    let meta = std::fs::metadata(&h.sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(h.server.as_ref().unwrap().socket_path(), h.sock.as_path());
    h.server.take().unwrap().shutdown().unwrap();
    assert!(!h.sock.exists());
    // Nothing but the (removed) socket was ever left in the directory.
    assert_eq!(std::fs::read_dir(h.dir.path()).unwrap().count(), 0);
}

#[test]
fn drop_also_removes_the_socket() {
    let mut h = Harness::new();
    drop(h.server.take());
    assert!(!h.sock.exists());
}

#[test]
fn live_socket_is_refused_and_left_alone() {
    let h = Harness::new();
    let (chan, _end) = api::channel().unwrap();
    let e = ApiServer::start(ApiServerConfig::new(&h.sock), chan).unwrap_err();
    assert!(matches!(e, Error::Socket(socket::Error::InUse(_))), "{e}");
    assert!(e.to_string().contains("in use"), "{e}");
    // The first server still works.
    assert_eq!(h.req("GET", "/", None).status, 200);
}

#[test]
fn stale_socket_is_replaced_and_other_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    // A socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let (chan, end) = api::channel().unwrap();
    let _vmm = FakeVmm::start(end);
    let server = ApiServer::start(ApiServerConfig::new(&sock), chan).unwrap();
    assert_eq!(common::request(&sock, "GET", "/", None).status, 200);
    server.shutdown().unwrap();

    std::fs::write(&sock, "not a socket").unwrap();
    let (chan, _end) = api::channel().unwrap();
    let e = ApiServer::start(ApiServerConfig::new(&sock), chan).unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&sock).unwrap(), "not a socket");
}

#[test]
fn loopback_tcp_works_and_other_addresses_are_refused() {
    let h = Harness::with(|c| {
        c.tcp = Some("127.0.0.1:0".parse().unwrap());
        c.tcp_token = api::auth::Token::new(common::TOKEN);
    });
    let addr = h.server.as_ref().unwrap().tcp_addr().unwrap();
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    let mut client = api_client::Client::tcp(addr).unwrap().with_token(common::TOKEN);
    let r = client.request("GET", "/memory/merge", None).unwrap();
    assert_eq!(r.status, 200);

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    for bad in ["0.0.0.0:0", "[::]:0", "192.0.2.1:8080"] {
        let mut config = ApiServerConfig::new(&sock);
        config.tcp = Some(bad.parse().unwrap());
        config.tcp_token = api::auth::Token::new(common::TOKEN);
        let (chan, _end) = api::channel().unwrap();
        let e = ApiServer::start(config, chan).unwrap_err();
        assert!(e.to_string().contains("not a loopback address"), "{bad}: {e}");
        assert!(!sock.exists(), "{bad}: socket left behind");
    }
}

#[test]
fn stalled_body_gets_408_and_keep_alive_works() {
    let h = Harness::with(|c| c.request_timeout = Duration::from_millis(400));
    let mut s = common::connect(&h.sock);
    s.write_all(
        b"PATCH /memory/merge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 20\r\n\r\n{\"run\":",
    )
    .unwrap();
    let t = Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let r = common::parse(&buf[..n]);
    assert_eq!(r.status, 408, "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(5));

    // Two requests on one keep-alive connection.
    let mut s = common::connect(&h.sock);
    let one = b"GET /memory/merge HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(one).unwrap();
    let n = s.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let r = exchange(s, &raw_request("GET", "/", None));
    assert_eq!(r.status, 200);
}

#[test]
fn stalled_headers_close_the_connection() {
    let h = Harness::with(|c| c.request_timeout = Duration::from_millis(400));
    let mut s = common::connect(&h.sock);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let t = Instant::now();
    let mut out = Vec::new();
    // Either a bare close or a 408, but promptly.
    let _ = s.read_to_end(&mut out);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(out.is_empty() || out.starts_with(b"HTTP/1.1 408"), "{out:?}");
}

#[test]
fn shutdown_is_prompt_with_a_request_waiting_on_the_vmm() {
    let mut h = Harness::new();
    let sock = h.sock.clone();
    let client = std::thread::spawn(move || {
        let mut s = common::connect(&sock);
        s.write_all(&raw_request("GET", "/vms/stall-1", None)).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    });
    // Wait until the request reached the VMM.
    let t = Instant::now();
    while h.vmm.as_ref().unwrap().stalled.lock().unwrap().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    h.server.take().unwrap().shutdown().unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(!h.sock.exists());
    // The client sees the connection closed (no answer was ever produced).
    assert!(client.join().unwrap().is_empty());
}
