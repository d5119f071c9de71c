//! End to end: the real Linux `virtio_balloon` driver behind `densevm serve`'s
//! balloon API. The small microVM kernel (`resources/linux/build-microvm-kernel.sh`,
//! built by `.ci/run`) boots from `PUT /vms/{id}` with a balloon whose virtio-mmio
//! device the command line announces; its driver inflates to the target, answers
//! the statistics queue at the polling interval, deflates when `PATCH
//! /vms/{id}/balloon` lowers the target (a config-change interrupt) and inflates
//! again when it rises. Without the kernel built the test prints `SKIPPED` with the
//! measured reason.

mod common;

use std::time::Duration;

use common::{kvm_available, wait_for, Daemon};
use serde_json::{json, Value};

const TEST: &str = "linux_balloon_driver_over_the_api";
/// Guest RAM and the balloon's first target, MiB.
const MEM_MIB: u64 = 128;
const MIB: u64 = 16;
/// Seconds the guest's /init stays up after its marker (the test deletes the VM
/// once done).
const HOLD_S: u64 = 900;
/// Boot to the driver's first inflate (141-183 s measured here at load ~15).
const BOOT: Duration = Duration::from_secs(30 * 60);
/// A running driver's answer to a new target or a statistics request.
const ANSWER: Duration = Duration::from_secs(180);

/// `GET /vms/lx/balloon` once `done` holds, failing at once if the VM stopped.
fn balloon_when(d: &Daemon, what: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, timeout, || {
        let vm = d.get("/vms/lx");
        assert_eq!(vm["state"], "Running", "the Linux guest stopped while waiting for {what}: {vm}");
        let b = d.get("/vms/lx/balloon");
        done(&b).then_some(b)
    })
}

fn status(d: &Daemon, method: &str, path: &str, body: Option<&str>, want: u16) {
    let r = d.req(method, path, body);
    assert_eq!(r.status, want, "{method} {path} {body:?}: {}", r.text());
}

#[test]
fn linux_balloon_driver_over_the_api() {
    if !kvm_available(TEST) {
        return;
    }
    let dir = match e2e::linux::microvm_kernel_dir() {
        Ok(dir) => dir,
        Err(why) => {
            e2e::skip(TEST, &why);
            return;
        }
    };
    let (_, initrd) = e2e::linux::build_guest();
    let d = Daemon::start(&[]);
    let vm = json!({
        "vcpu_count": 1,
        "mem_size_mib": MEM_MIB,
        "boot": {"kernel": {
            "kernel_image_path": dir.join("vmlinux"),
            "initrd_path": initrd,
            "boot_args": format!("console=ttyS0 lpj=4000000 tsc=reliable densevm.hold={HOLD_S}"),
        }},
        "balloon": {"amount_mib": MIB, "deflate_on_oom": false, "stats_polling_interval_s": 1,
                    "free_page_reporting": false},
    });
    status(&d, "PUT", "/vms/lx", Some(&vm.to_string()), 204);
    status(&d, "PUT", "/vms/lx/actions", Some(r#"{"action_type": "InstanceStart"}"#), 204);

    // The driver binds (through the command line) and inflates to the target.
    let b = balloon_when(&d, "the Linux driver to inflate", BOOT, |b| b["actual_pages"] == MIB * 256);
    let c = &b["counters"];
    assert!(c["inflated_pages"].as_u64().unwrap_or(0) >= MIB * 256, "{b}");
    assert!(c["bytes_returned"].as_u64().unwrap_or(0) >= MIB << 20, "{b}");

    // Its statistics arrive: the kernel's own view of its memory.
    let s = wait_for("statistics from the Linux driver", ANSWER, || {
        let s = d.get("/vms/lx/balloon/statistics");
        let total = s["total_memory"].as_u64().unwrap_or(0);
        (total > 0 && s["updated_at_unix_s"].as_f64().is_some()).then_some(s)
    });
    let (total, free) = (s["total_memory"].as_u64().unwrap_or(0), s["free_memory"].as_u64().unwrap_or(0));
    assert!(total > (MEM_MIB / 2) << 20 && total <= MEM_MIB << 20, "total memory {total}: {s}");
    assert!(free > 0 && free < total, "free memory {free} of {total}: {s}");

    // A lower target: the driver deflates (the host counts the pages given back).
    status(&d, "PATCH", "/vms/lx/balloon", Some(r#"{"amount_mib": 4}"#), 204);
    let b = balloon_when(&d, "the Linux driver to deflate to 4 MiB", ANSWER, |b| b["actual_pages"] == 4 * 256);
    assert!(b["counters"]["deflated_pages"].as_u64().unwrap_or(0) >= (MIB - 4) * 256, "{b}");

    // A higher one: it inflates again.
    status(&d, "PATCH", "/vms/lx/balloon", Some(r#"{"amount_mib": 24}"#), 204);
    let b = balloon_when(&d, "the Linux driver to inflate to 24 MiB", ANSWER, |b| b["actual_pages"] == 24 * 256);
    assert_eq!(b["counters"]["bad_pfns"], 0, "{b}");
    eprintln!(
        "{TEST}: inflate 16 MiB, statistics (total {total} B, free {free} B), deflate to 4 MiB, inflate to 24 MiB"
    );
    status(&d, "DELETE", "/vms/lx", None, 204);
}
