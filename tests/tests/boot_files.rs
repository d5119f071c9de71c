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
