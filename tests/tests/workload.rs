//! End-to-end tests of the workload guest through the real `densevm` binary.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::{densevm, densevm_bin, kvm_available, last_json_line};

#[test]
fn run_reports_pages_written_and_no_mismatch() {
    if !kvm_available("run_reports_pages_written_and_no_mismatch") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("densevm-e2e-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let scenario = dir.join("s.toml");
    std::fs::write(
        &scenario,
        "fill_mib = 16\nzero_fraction = 0.2\nshared_fraction = 0.5\nwrite_fraction = 0.3\n\
         writes_per_s = 4000\nduration_s = 1\n",
    )
    .unwrap();
    let out = densevm(&["run", "--vcpus", "2", "--workload", scenario.to_str().unwrap(), "--serial", "stdout"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "densevm run failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("workload: filled and verified"), "console output missing: {stdout}");
    let v = last_json_line(&out.stdout).expect("final JSON report");
    let r = &v["report"];
    assert_eq!(r["npages"], 4096);
    assert_eq!(r["pages_filled"], 4096);
    assert_eq!(r["mismatches"], 0);
    assert_eq!(r["state"], 3, "guest reached its done state");
    assert!(r["pages_written"].as_u64().unwrap() > 1000, "write loop ran: {r}");
    assert!(r["full_verifies"].as_u64().unwrap() >= 2, "at least fill verify and final verify: {r}");
    assert_eq!(v["state"], "Exited");
    assert_eq!(v["timeline"]["exit_reason"], "workload finished");
    assert!(v["host_memory"]["guest_pages"].as_u64().unwrap() >= 4096);
    std::fs::remove_dir_all(dir).unwrap();
}

fn assert_input_error(args: &[&str], expect: &str) {
    let out = densevm(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(stderr.contains(expect), "{args:?}: expected {expect:?} in {stderr:?}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
}

#[test]
fn bad_flags_and_scenarios_exit_2_with_one_clear_error() {
    let dir = std::env::temp_dir().join(format!("densevm-e2e-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unknown = dir.join("unknown.json");
    std::fs::write(&unknown, r#"{"fill_mib": 4, "fil_mib": 3}"#).unwrap();
    let range = dir.join("range.toml");
    std::fs::write(&range, "zero_fraction = 1.5\n").unwrap();
    let garbage = dir.join("garbage.json");
    std::fs::write(&garbage, "{not json").unwrap();
    assert_input_error(&["run", "--vcpus", "0"], "--vcpus");
    assert_input_error(&["run", "--vcpus", "many"], "--vcpus");
    assert_input_error(&["run", "--bogus"], "--bogus");
    assert_input_error(&["run", "--workload", "no-such-scenario"], "built-ins");
    assert_input_error(&["run", "--workload", unknown.to_str().unwrap()], "unknown field");
    assert_input_error(&["run", "--workload", range.to_str().unwrap()], "zero_fraction");
    assert_input_error(&["run", "--workload", garbage.to_str().unwrap()], "invalid scenario JSON");
    assert_input_error(&["run", "--workload", "quick", "--mem-mib", "8"], "needs");
    assert_input_error(&["run", "--workload", "quick", "--kernel", "/nonexistent"], "cannot be used with");
    assert_input_error(&["demo", "--vms", "0"], "--vms");
    assert_input_error(&["frobnicate"], "frobnicate");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn help_explains_the_commands() {
    let out = densevm(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "demo", "host-info", "bench"] {
        assert!(text.contains(cmd), "--help lacks {cmd}: {text}");
    }
}

#[test]
fn demo_runs_four_vms_and_verifies_every_page() {
    if !kvm_available("demo_runs_four_vms_and_verifies_every_page") {
        return;
    }
    let out = densevm(&["demo", "--vms", "4", "--fill-mib", "8", "--duration-s", "1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("vm") && l.contains("workload finished")).collect();
    assert_eq!(rows.len(), 4, "{stdout}");
    for row in rows {
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[6], "0", "mismatch column of {row}");
    }
    assert!(stdout.contains("0 mismatches"), "{stdout}");
}

#[test]
fn sigterm_stops_a_running_vm_cleanly() {
    if !kvm_available("sigterm_stops_a_running_vm_cleanly") {
        return;
    }
    let mut child = Command::new(densevm_bin())
        .args(["run", "--workload", "clone", "--serial", "none"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // Every stderr line is kept (and the pipe read to its end), so that a failure
    // shows what densevm said.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("first guest report") {
                let _ = tx.send(line.clone());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let reported = rx.recv_timeout(Duration::from_secs(30)).is_ok();
    assert!(reported, "guest never reported");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let errors = reader.join().unwrap_or_default();
    assert!(out.status.success(), "exit status {}; stderr:\n{errors}", out.status);
    let v = last_json_line(&out.stdout).expect("final report");
    assert_eq!(v["state"], "Stopped");
    assert_eq!(v["report"]["mismatches"], 0);
    assert_eq!(v["report"]["state"], 2, "guest was in its write loop");
}
