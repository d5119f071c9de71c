//! End-to-end: boot a real Linux guest (Debian cloud kernel + busybox initramfs, built
//! by `resources/linux/build-guest.sh`) with `densevm run` and wait for its marker line
//! on the serial console.
//!
//! A stock Linux kernel boots under KVM only where ring-0 guest code runs natively
//! (VMX/SVM). Where it does not (a software-assisted KVM such as kvm_pvm), the test
//! prints `SKIPPED linux_guest_boots_to_marker: <reason>` on the real stderr and returns.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MARKER: &str = "DENSEVM-GUEST-READY";
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

use e2e::densevm_bin as densevm_binary;

/// Whether ring-0 guests run natively, and why: from `densevm host-info --json`, or,
/// if the binary has no such subcommand, from the loaded KVM modules.
fn ring0_native(bin: &Path) -> (bool, String) {
    let out = Command::new(bin).args(["host-info", "--json"]).output();
    if let Ok(out) = out {
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(text.trim()) {
                if let Some(native) = v.get("ring0_native").and_then(|n| n.as_bool()) {
                    let reason =
                        v.get("ring0_reason").and_then(|r| r.as_str()).unwrap_or("no reason given").to_string();
                    return (native, format!("densevm host-info: {reason}"));
                }
            }
        }
    }
    if !Path::new("/dev/kvm").exists() {
        return (false, "no /dev/kvm on this host".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return (
            false,
            "KVM here is kvm_pvm (software-assisted; ring-0 guest code is emulated, a stock \
             Linux kernel does not boot) [from /sys/module; densevm host-info unavailable]"
                .into(),
        );
    }
    (true, "no kvm_pvm module; assuming VMX/SVM KVM".into())
}

/// Runs the guest build script (a no-op when its output exists) and returns
/// (bzImage, initramfs).
fn build_guest() -> (PathBuf, PathBuf) {
    let linux = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/linux");
    let out = linux.join("out");
    let status = Command::new("bash")
        .arg(linux.join("build-guest.sh"))
        .arg(&out)
        .status()
        .expect("run resources/linux/build-guest.sh");
    assert!(status.success(), "resources/linux/build-guest.sh failed: {status}");
    let (kernel, initrd) = (out.join("bzImage"), out.join("initramfs.cpio.gz"));
    assert!(kernel.exists() && initrd.exists(), "guest build produced no output in {}", out.display());
    (kernel, initrd)
}

#[test]
fn linux_guest_boots_to_marker() {
    let bin = densevm_binary();
    let (native, reason) = ring0_native(&bin);
    if !native {
        e2e::skip("linux_guest_boots_to_marker", &reason);
        return;
    }
    eprintln!("ring-0 guests run natively: {reason}");
    let (kernel, initrd) = build_guest();

    let mut child = Command::new(&bin)
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", "console=ttyS0", "--mem-mib", "256", "--serial", "stdout"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn densevm run");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<String>();
    // Not joined: a process densevm left behind could hold the pipe open.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let start = Instant::now();
    let mut console = Vec::new();
    let mut found = false;
    while let Some(left) = BOOT_TIMEOUT.checked_sub(start.elapsed()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                found = line.contains(MARKER);
                console.push(line);
                if found {
                    break;
                }
            }
            Err(_) => break, // timeout, or densevm closed its stdout (exited)
        }
    }
    let elapsed = start.elapsed();
    // Let the guest power off by itself for a moment, then make sure densevm is gone.
    let exit_deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < exit_deadline && found => std::thread::sleep(Duration::from_millis(100)),
            _ => {
                let _ = child.kill();
                break child.wait().ok();
            }
        }
    };
    let tail = console[console.len().saturating_sub(40)..].join("\n");
    assert!(
        found,
        "no {MARKER} on densevm's serial console after {elapsed:?} (densevm status \
         {status:?}); last console lines:\n{tail}"
    );
    eprintln!("guest printed {MARKER} after {elapsed:?}");
}
