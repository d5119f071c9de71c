//! End-to-end: the daemon's own limits. `serve --max-vms` and `--max-vcpus`
//! refuse VMs beyond them (409, or 400 for one VM asking for more vCPUs than the
//! daemon may run); a hard open-files limit that cannot hold the maxima stops the
//! daemon at start with a clear message (it used to fail VM creation later with
//! 500 "Too many open files"); the daemon sets its `oom_score_adj`; and building
//! or freeing a big VM no longer holds up the event loop.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{densevm_binary, kvm_available, request, scratch_dir, Daemon, ResponseExt};
use serde_json::json;

fn workload_vm(vcpus: u32, mem_mib: u32) -> String {
    json!({"vcpu_count": vcpus, "mem_size_mib": mem_mib, "boot": {"workload": {"fill_mib": 4}}}).to_string()
}

#[test]
fn vm_and_vcpu_maxima_refuse_with_clear_errors() {
    if !kvm_available("vm_and_vcpu_maxima_refuse_with_clear_errors") {
        return;
    }
    let mut d = Daemon::start(&["--max-vms", "2", "--max-vcpus", "3"]);
    assert_eq!(d.req("PUT", "/vms/a", Some(&workload_vm(1, 64))).status, 204);
    assert_eq!(d.req("PUT", "/vms/b", Some(&workload_vm(2, 64))).status, 204);

    let r = d.req("PUT", "/vms/c", Some(&workload_vm(1, 64)));
    assert_eq!(r.status, 409, "{}", r.text());
    let fault = r.fault();
    assert!(fault.contains("too many VMs") && fault.contains("--max-vms"), "{fault}");

    assert_eq!(d.req("DELETE", "/vms/a", None).status, 204);
    // b holds 2 of the 3 vCPUs.
    let r = d.req("PUT", "/vms/c", Some(&workload_vm(2, 64)));
    assert_eq!(r.status, 409, "{}", r.text());
    let fault = r.fault();
    assert!(fault.contains("too many vCPUs: 2 in use + 2 requested > 3") && fault.contains("--max-vcpus"), "{fault}");
    // More vCPUs than the daemon may ever run: the request itself is wrong.
    let r = d.req("PUT", "/vms/c", Some(&workload_vm(4, 64)));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.fault().contains("exceeds the daemon's maximum of 3 vCPUs"), "{}", r.fault());
    // Within the maxima again.
    assert_eq!(d.req("PUT", "/vms/c", Some(&workload_vm(1, 64))).status, 204);
    assert_eq!(d.get("/vms")["vms"].as_array().map(Vec::len), Some(2));
    assert!(d.terminate(Duration::from_secs(10)).success());
}

#[test]
fn more_vms_than_the_memory_manager_can_hold_is_refused_at_start() {
    let dir = scratch_dir("maxvms");
    let out = Command::new(densevm_binary())
        .arg("serve")
        .arg("--api-sock")
        .arg(dir.join("api.sock"))
        .args(["--max-vms", "4097"])
        .stdin(Stdio::null())
        .output()
        .expect("run densevm serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("4097") && stderr.contains("1..=4096"), "{stderr}");
    assert!(!dir.join("api.sock").exists(), "no API was served");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_hard_open_files_limit_too_small_for_the_maxima_stops_the_start() {
    let dir = scratch_dir("rlimit");
    let mut cmd = Command::new(densevm_binary());
    cmd.arg("serve").arg("--api-sock").arg(dir.join("api.sock")).args(["--max-vms", "1000"]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // setrlimit, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 1024, rlim_max: 1024 };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run densevm serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the open-files hard limit (RLIMIT_NOFILE) is 1024")
            && stderr.contains("--max-vms 1000")
            && stderr.contains("ulimit -Hn"),
        "{stderr}"
    );
    assert!(!dir.join("api.sock").exists(), "no API was served");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_daemon_sets_its_oom_score_adj_and_raises_its_soft_fd_limit() {
    if !kvm_available("the_daemon_sets_its_oom_score_adj_and_raises_its_soft_fd_limit") {
        return;
    }
    let d = Daemon::start(&["--oom-score-adj", "300"]);
    let proc = format!("/proc/{}", d.pid());
    let adj = std::fs::read_to_string(format!("{proc}/oom_score_adj")).expect("oom_score_adj");
    assert_eq!(adj.trim(), "300");
    let limits = std::fs::read_to_string(format!("{proc}/limits")).expect("limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("open files line");
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words[3], words[4], "soft = hard: {line}");
    assert!(d.log_text().contains("at most "), "the maxima are logged:\n{}", d.log_text());
    // -1000 (unkillable) is refused.
    let out = Command::new(densevm_binary())
        .args(["serve", "--api-sock", "/nonexistent/densevm.sock", "--oom-score-adj", "-1000"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn building_and_freeing_a_big_vm_does_not_hold_up_the_event_loop() {
    if !kvm_available("building_and_freeing_a_big_vm_does_not_hold_up_the_event_loop") {
        return;
    }
    let mut d = Daemon::start(&[]);
    let sock = d.sock.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let polled = Arc::new(AtomicU32::new(0));
    let worst = Arc::new(Mutex::new(Duration::ZERO));
    let poller = {
        let (stop, polled, worst) = (stop.clone(), polled.clone(), worst.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let r = request(&sock, "GET", "/vms", None);
                let dt = t0.elapsed();
                assert_eq!(r.status, 200, "{}", r.text());
                let mut w = worst.lock().unwrap();
                *w = (*w).max(dt);
                polled.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    // At least two build/free cycles, and as many more (up to 20) as it takes
    // for the poller to have asked over 10 times: on a fast host two cycles of
    // a 4 GiB VM take ~0.2 s, too short for 10 polls 10 ms apart.
    for cycle in 0..20 {
        let r = d.req("PUT", "/vms/big", Some(&workload_vm(1, 4096)));
        if r.status == 409 {
            eprintln!("SKIPPED: no room for a 4 GiB VM: {}", r.text());
            stop.store(true, Ordering::Relaxed);
            let _ = poller.join();
            return;
        }
        assert_eq!(r.status, 204, "{}", r.text());
        let r = d.req("PUT", "/vms/big/actions", Some(r#"{"action_type":"InstanceStart"}"#));
        assert_eq!(r.status, 204, "{}", r.text());
        assert_eq!(d.req("DELETE", "/vms/big", None).status, 204);
        if cycle >= 1 && polled.load(Ordering::Relaxed) > 10 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    poller.join().expect("poller");
    let polls = polled.load(Ordering::Relaxed);
    let worst = *worst.lock().unwrap();
    // Freeing a 4 GiB VM takes ~1.5 s here; the loop used to answer nothing meanwhile.
    assert!(worst < Duration::from_secs(1), "GET /vms took {worst:?} while a big VM was built or freed");
    assert!(polls > 10, "only {polls} polls in 20 build/free cycles");
    assert!(d.terminate(Duration::from_secs(10)).success());
}
