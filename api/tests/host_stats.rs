//! `GET /memory` read on the API server's own threads (a [`HostStatsReader`]):
//! answered at once while the VMM's event loop does not answer at all, where the
//! round trip through the VMM waits for it (503 after the VMM timeout).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::types::HostMemoryStats;
use api::{ApiServer, ApiServerConfig, HostStatsReader};

const VMM_TIMEOUT: Duration = Duration::from_millis(700);

/// A server whose VMM end is kept open but never served (a busy event loop).
fn server(reader: Option<HostStatsReader>) -> (tempfile::TempDir, std::path::PathBuf, ApiServer, api::VmmEndpoint) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut config = ApiServerConfig::new(&sock);
    config.vmm_timeout = VMM_TIMEOUT;
    config.host_stats = reader;
    let (chan, end) = api::channel().unwrap();
    let server = ApiServer::start(config, chan).unwrap();
    (dir, sock, server, end)
}

#[test]
fn get_memory_does_not_wait_for_a_busy_vmm() {
    let reads = Arc::new(AtomicU64::new(0));
    let r = reads.clone();
    let reader = HostStatsReader(Arc::new(move || HostMemoryStats {
        pages_sharing: 1000 + r.fetch_add(1, Ordering::Relaxed),
        ..HostMemoryStats::default()
    }));
    let (_dir, sock, server, _end) = server(Some(reader));
    for i in 0..3 {
        let t = Instant::now();
        let resp = api_client::request(&sock, "GET", "/memory", None).unwrap();
        assert_eq!(resp.status, 200, "{}", resp.body);
        assert!(t.elapsed() < VMM_TIMEOUT, "answered without the VMM");
        let v: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
        assert_eq!(v["pages_sharing"], 1000 + i, "read fresh on every request");
    }
    // A request the VMM must answer still waits for it.
    let resp = api_client::request(&sock, "GET", "/vms", None).unwrap();
    assert_eq!(resp.status, 503, "{}", resp.body);
    server.shutdown().unwrap();
}

#[test]
fn without_a_reader_get_memory_asks_the_vmm() {
    let (_dir, sock, server, _end) = server(None);
    let t = Instant::now();
    let resp = api_client::request(&sock, "GET", "/memory", None).unwrap();
    assert_eq!(resp.status, 503, "{}", resp.body);
    assert!(t.elapsed() >= VMM_TIMEOUT, "it waited for the VMM");
    server.shutdown().unwrap();
}
