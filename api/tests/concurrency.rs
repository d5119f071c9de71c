//! Many clients at once, some sending their body byte by byte and some idle: fast
//! requests are still answered promptly.

// `MergeConfig` (the merger's `Tunables`) is `Copy`; common/ still clones it.
mod common;

use std::io::Write;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{connect, parse, request, Harness, RespExt};

const SLOW: usize = 20;
const IDLE: usize = 10;
const FAST: usize = 20;
const FAST_REQUESTS: usize = 10;
const BODY: &str = r#"{"vcpu_count": 1, "mem_size_mib": 64, "boot": {"workload": {"fill_mib": 8}}}"#;

#[test]
fn fifty_clients_slow_ones_do_not_delay_fast_ones() {
    let h = Harness::new();
    let sock = h.sock.clone();
    let start = Arc::new(Barrier::new(SLOW + FAST + 1));

    // Idle connections that never send a byte.
    let idle: Vec<_> = (0..IDLE).map(|_| connect(&sock)).collect();

    let slow: Vec<_> = (0..SLOW)
        .map(|i| {
            let sock = sock.clone();
            let start = start.clone();
            thread::spawn(move || {
                let mut s = connect(&sock);
                let head = format!(
                    "PUT /vms/slow-{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                     Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    BODY.len()
                );
                start.wait();
                s.write_all(head.as_bytes()).unwrap();
                for b in BODY.as_bytes() {
                    s.write_all(&[*b]).unwrap();
                    thread::sleep(Duration::from_millis(40));
                }
                let mut out = Vec::new();
                std::io::Read::read_to_end(&mut s, &mut out).unwrap();
                (parse(&out), Instant::now())
            })
        })
        .collect();

    let fast: Vec<_> = (0..FAST)
        .map(|_| {
            let sock = sock.clone();
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                let mut worst = Duration::ZERO;
                for _ in 0..FAST_REQUESTS {
                    let t = Instant::now();
                    let r = request(&sock, "GET", "/memory", None);
                    assert_eq!(r.status, 200);
                    worst = worst.max(t.elapsed());
                }
                (worst, Instant::now())
            })
        })
        .collect();

    start.wait();
    let t0 = Instant::now();
    let fast: Vec<_> = fast.into_iter().map(|t| t.join().unwrap()).collect();
    let slow: Vec<_> = slow.into_iter().map(|t| t.join().unwrap()).collect();

    let worst = fast.iter().map(|(w, _)| *w).max().unwrap();
    let fast_done = fast.iter().map(|(_, t)| *t).max().unwrap();
    let slow_first = slow.iter().map(|(_, t)| *t).min().unwrap();
    eprintln!(
        "worst fast latency {worst:?}; fast done after {:?}; first slow done after {:?}",
        fast_done - t0,
        slow_first - t0
    );
    // Each slow body takes ~3 s to send; all fast requests finished well before.
    assert!(fast_done < slow_first, "fast requests waited for slow clients");
    assert!(worst < Duration::from_secs(1), "a fast request took {worst:?}");
    for (r, _) in &slow {
        assert_eq!(r.status, 204, "{r:?}");
    }
    let vms = h.req("GET", "/vms", None).json()["vms"].as_array().unwrap().len();
    assert_eq!(vms, SLOW);
    drop(idle);
}
