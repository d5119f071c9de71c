//! End-to-end: `densevm serve` with a locked-down API (issue 15, findings 4, 5 and 7):
//! TCP refused without a private token file, the token and the `Host` checked on TCP,
//! request bodies that are not JSON objects or not sent as JSON refused.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

use common::{densevm_binary, kvm_available, Daemon, ResponseExt};
use serde_json::json;

const TOKEN: &str = "lockdown-token-0123456789";

fn token_file(mode: u32) -> PathBuf {
    let path = common::scratch_dir("token").join("api.token");
    std::fs::write(&path, format!("{TOKEN}\n")).expect("write token");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod token");
    path
}

/// `densevm serve` with `args` must refuse to start (exit 2) saying `expect`.
fn refused(args: &[&str], expect: &str) {
    let dir = common::scratch_dir("refused");
    let sock = dir.join("api.sock");
    let out =
        Command::new(densevm_binary()).arg("serve").arg("--api-sock").arg(&sock).args(args).output().expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(stderr.contains(expect), "{args:?}: {stderr}");
    assert!(!sock.exists(), "{args:?}: socket left behind");
}

#[test]
fn tcp_needs_a_private_token_file_and_loopback() {
    if !kvm_available("tcp_needs_a_private_token_file_and_loopback") {
        return;
    }
    refused(&["--api-tcp", "127.0.0.1:0"], "--api-token-file");
    let open = token_file(0o644);
    refused(&["--api-tcp", "127.0.0.1:0", "--api-token-file", open.to_str().unwrap()], "chmod 600");
    let private = token_file(0o600);
    let private = private.to_str().unwrap();
    refused(&["--api-tcp", "0.0.0.0:0", "--api-token-file", private], "--api-tcp-allow-remote");
    let missing = "/nonexistent/densevm.token";
    refused(&["--api-tcp", "127.0.0.1:0", "--api-token-file", missing], "cannot read the API token file");
}

#[test]
fn tcp_checks_token_and_host_and_bodies_must_be_json_objects() {
    if !kvm_available("tcp_checks_token_and_host_and_bodies_must_be_json_objects") {
        return;
    }
    let token = token_file(0o600);
    let d = Daemon::start(&["--api-tcp", "127.0.0.1:0", "--api-token-file", token.to_str().unwrap()]);
    let log = d.log_text();
    let addr: std::net::SocketAddr = log
        .lines()
        .find_map(|l| l.split("http://").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no TCP address in the log:\n{log}"))
        .parse()
        .expect("TCP address");

    // No token: 401 with the challenge; the right token: 200.
    let r = api_client::Client::tcp(addr).unwrap().request("GET", "/vms", None).unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.header("www-authenticate").is_some_and(|v| v.starts_with("Bearer")), "{r:?}");
    r.fault();
    let mut tcp = api_client::Client::tcp(addr).unwrap().with_token(TOKEN);
    assert_eq!(tcp.request("GET", "/vms", None).unwrap().status, 200);

    // A rebound name in Host: 421.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let raw = format!(
        "GET /vms HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    std::io::Write::write_all(&mut s, raw.as_bytes()).unwrap();
    let r = common::read_response(&mut s).unwrap();
    assert_eq!(r.status, 421, "{r:?}");

    // Arrays for objects (accepted with 204 and 200 before).
    let vm = r#"[1, 8, {"workload": {"fill_mib": 8}}]"#;
    let r = d.req("PUT", "/vms/x", Some(vm));
    assert_eq!(r.status, 400, "{}", r.text());
    let r = d.req("PATCH", "/memory/merge", Some("[null, null]"));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(d.get("/vms"), json!({"vms": []}));
    // Not sent as JSON: 415.
    let body = r#"{"run": false}"#;
    let raw = format!(
        "PATCH /memory/merge HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = common::connect(&d.sock).unwrap();
    std::io::Write::write_all(&mut s, raw.as_bytes()).unwrap();
    let r = common::read_response(&mut s).unwrap();
    assert_eq!(r.status, 415, "{r:?}");
    // An integral float for an integer is accepted.
    let vm = r#"{"vcpu_count": 1, "mem_size_mib": 16.0, "boot": {"workload": {"fill_mib": 8.0}}}"#;
    let r = d.req("PUT", "/vms/f", Some(vm));
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(d.req("DELETE", "/vms/f", None).status, 204);
}
