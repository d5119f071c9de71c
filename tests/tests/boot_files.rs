//! End-to-end: kernel and initrd paths handed to `densevm serve` are checked before
//! they are read. A FIFO used to freeze the daemon's event loop in a blocking
//! `open` (every request then got 503 and SIGTERM was ignored); `/proc/self/mem`,
//! device nodes and the pool's memfd behind `/proc/self/fd/N` were accepted as an
//! initrd.

mod common;

use std::time::{Duration, Instant};

use common::{kvm_available, scratch_dir, Daemon, ResponseExt};
use serde_json::json;

fn kernel_vm(kernel: &str, initrd: Option<&str>) -> String {
    let mut boot = json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"});
    if let Some(i) = initrd {
        boot["initrd_path"] = json!(i);
    }
    json!({"vcpu_count": 1, "mem_size_mib": 64, "boot": {"kernel": boot}}).to_string()
}

#[test]
fn hostile_boot_paths_get_clear_errors_and_the_daemon_stays_responsive() {
    if !kvm_available("hostile_boot_paths_get_clear_errors_and_the_daemon_stays_responsive") {
        return;
    }
    let dir = scratch_dir("bootfiles");
    let fifo = dir.join("kernel.fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let sparse = dir.join("sparse-bzImage");
    std::fs::File::create(&sparse).and_then(|f| f.set_len(4 << 30)).expect("sparse file");
    let kernel = dir.join("tiny-kernel");
    std::fs::write(&kernel, [0u8; 4096]).expect("write");
    let kernel = kernel.to_str().expect("utf-8 path");

    let mut d = Daemon::start(&[]);
    let cases: [(&str, String, &str); 5] = [
        ("fifo kernel", kernel_vm(fifo.to_str().expect("utf-8"), None), "FIFO"),
        ("4 GiB sparse kernel", kernel_vm(sparse.to_str().expect("utf-8"), None), "more than the"),
        ("/proc/self/mem initrd", kernel_vm(kernel, Some("/proc/self/mem")), "/proc, /dev or /sys"),
        ("/dev/zero initrd", kernel_vm(kernel, Some("/dev/zero")), "/proc, /dev or /sys"),
        ("fifo initrd", kernel_vm(kernel, Some(fifo.to_str().expect("utf-8"))), "FIFO"),
    ];
    for (i, (what, body, expect)) in cases.iter().enumerate() {
        let t0 = Instant::now();
        let r = d.req("PUT", &format!("/vms/bad{i}"), Some(body));
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        let fault = r.fault();
        assert!(fault.contains(expect), "{what}: expected {expect:?} in {fault:?}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{what}: answered after {:?}", t0.elapsed());
        // The event loop still serves requests.
        assert_eq!(d.get("/vms")["vms"].as_array().map(Vec::len), Some(0), "{what}: no VM was created");
    }
    assert!(d.terminate(Duration::from_secs(10)).success(), "SIGTERM still stops the daemon");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn allowed_dirs_confine_boot_paths_and_oversized_initrds_are_refused() {
    if !kvm_available("allowed_dirs_confine_boot_paths_and_oversized_initrds_are_refused") {
        return;
    }
    let dir = scratch_dir("allowed");
    let (inside, outside) = (dir.join("images"), dir.join("elsewhere"));
    std::fs::create_dir_all(&inside).expect("mkdir");
    std::fs::create_dir_all(&outside).expect("mkdir");
    let kernel = inside.join("tiny-kernel");
    std::fs::write(&kernel, [0u8; 4096]).expect("write");
    std::fs::write(outside.join("kernel"), [0u8; 4096]).expect("write");
    std::os::unix::fs::symlink(outside.join("kernel"), inside.join("escape")).expect("symlink");
    let big_initrd = inside.join("big-initrd");
    std::fs::File::create(&big_initrd).and_then(|f| f.set_len(2 << 30)).expect("sparse file");
    let path = |p: &std::path::Path| p.to_str().expect("utf-8 path").to_string();

    let mut d = Daemon::start(&["--allowed-dir", &path(&inside)]);
    let outside_msg = "outside the allowed directories";
    let cases: [(&str, String, &str); 6] = [
        ("kernel outside", kernel_vm(&path(&outside.join("kernel")), None), outside_msg),
        ("symlink out of the allowed dir", kernel_vm(&path(&inside.join("escape")), None), outside_msg),
        ("dot-dot out of the allowed dir", kernel_vm(&path(&inside.join("../elsewhere/kernel")), None), outside_msg),
        ("initrd outside", kernel_vm(&path(&kernel), Some(&path(&outside.join("kernel")))), outside_msg),
        ("/proc initrd", kernel_vm(&path(&kernel), Some("/proc/self/status")), "/proc, /dev or /sys"),
        ("2 GiB initrd", kernel_vm(&path(&kernel), Some(&path(&big_initrd))), "more than the 1073741824 allowed"),
    ];
    for (i, (what, body, expect)) in cases.iter().enumerate() {
        let t0 = Instant::now();
        let r = d.req("PUT", &format!("/vms/bad{i}"), Some(body));
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        let fault = r.fault();
        assert!(fault.contains(expect), "{what}: expected {expect:?} in {fault:?}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{what}: answered after {:?}", t0.elapsed());
        assert_eq!(d.get("/vms")["vms"].as_array().map(Vec::len), Some(0), "{what}: no VM was created");
    }
    // A file inside passes the policy (and is then judged as a kernel).
    let r = d.req("PUT", "/vms/inside", Some(&kernel_vm(&path(&kernel), None)));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(!r.fault().contains(outside_msg), "{}", r.fault());
    assert!(d.terminate(Duration::from_secs(10)).success());

    // A directory that cannot be allowed stops the start with a clear message.
    for bad in ["/proc", "/nonexistent/densevm"] {
        let out = std::process::Command::new(common::densevm_binary())
            .args(["serve", "--api-sock"])
            .arg(dir.join("never.sock"))
            .args(["--allowed-dir", bad])
            .output()
            .expect("run densevm serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains(&format!("allowed directory {bad}")), "{bad}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
