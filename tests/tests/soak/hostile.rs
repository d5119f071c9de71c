//! The hostile inputs of issue 15, as the soak interleaves them with its
//! ordinary traffic: each with the one status the daemon must answer, fast.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::tally::{Caller, Tally};

/// How long any hostile request may take to be answered (a FIFO used to block forever).
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// One hostile request.
pub struct Hostile {
    method: &'static str,
    path: String,
    /// A JSON-ish body sent as `application/json`, or raw bytes sent as they are.
    body: Body,
    status: u16,
}

enum Body {
    None,
    Json(String),
    Raw(Vec<u8>),
}

fn kernel_vm(kernel: &str, initrd: Option<&str>) -> String {
    let mut boot = json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"});
    if let Some(i) = initrd {
        boot["initrd_path"] = json!(i);
    }
    json!({"vcpu_count": 1, "mem_size_mib": 64, "boot": {"kernel": boot}}).to_string()
}

fn workload_vm() -> serde_json::Value {
    json!({"vcpu_count": 1, "mem_size_mib": 16, "boot": {"workload": {"fill_mib": 4, "zero_fraction": 0.0}}})
}

fn with(mut v: serde_json::Value, pointer: &str, value: serde_json::Value) -> String {
    *v.pointer_mut(pointer).unwrap_or_else(|| panic!("no {pointer}")) = value;
    v.to_string()
}

/// The hostile requests; `dir` (the daemon's only `--allowed-dir`) receives a
/// FIFO, a 4 GiB sparse "kernel" and a tiny one; `live_vm` is a VM that runs
/// for the whole soak.
pub fn requests(dir: &Path, live_vm: &str) -> Vec<Hostile> {
    let fifo = dir.join("kernel.fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let sparse = dir.join("sparse-bzImage");
    std::fs::File::create(&sparse).and_then(|f| f.set_len(4 << 30)).expect("sparse file");
    let tiny = dir.join("tiny-kernel");
    std::fs::write(&tiny, [0u8; 4096]).expect("write");
    let (fifo, sparse, tiny) = (fifo.to_str().unwrap(), sparse.to_str().unwrap(), tiny.to_str().unwrap());

    let j = |method, path: &str, body: String, status| Hostile {
        method,
        path: path.into(),
        body: Body::Json(body),
        status,
    };
    let n = |method, path: &str, status| Hostile { method, path: path.into(), body: Body::None, status };
    let wl = workload_vm();
    let mut v = vec![
        // Bad JSON, and arrays where objects are expected.
        j("PUT", "/vms/h-json", "{not json".into(), 400),
        j("PUT", "/vms/h-arr", r#"[1,8,{"vcpu_count":1}]"#.into(), 400),
        j("PUT", "/vms/h-arr2", with(wl.clone(), "/boot", json!([{"workload": {}}])), 400),
        j("PATCH", "/memory/merge", "[null,null]".into(), 400),
        j("PATCH", "/memory/compaction", "[]".into(), 400),
        j("PUT", "/memory/compaction/actions", r#"["Compact"]"#.into(), 400),
        // Boot files no one may use.
        j("PUT", "/vms/h-fifo", kernel_vm(fifo, None), 400),
        j("PUT", "/vms/h-fifo-initrd", kernel_vm(tiny, Some(fifo)), 400),
        j("PUT", "/vms/h-sparse", kernel_vm(sparse, None), 400),
        j("PUT", "/vms/h-procmem", kernel_vm(tiny, Some("/proc/self/mem")), 400),
        j("PUT", "/vms/h-procfd", kernel_vm("/proc/self/fd/3", None), 400),
        j("PUT", "/vms/h-devzero", kernel_vm(tiny, Some("/dev/zero")), 400),
        j("PUT", "/vms/h-shadow", kernel_vm(tiny, Some("/etc/shadow")), 400),
        // Oversized values.
        j("PUT", "/vms/h-mem", with(wl.clone(), "/mem_size_mib", json!(70_000)), 400),
        j("PUT", "/vms/h-mem2", with(wl.clone(), "/mem_size_mib", json!(u64::MAX)), 400),
        j("PUT", "/vms/h-vcpus", with(wl.clone(), "/vcpu_count", json!(4096)), 400),
        j("PUT", "/vms/h-fill", with(wl.clone(), "/boot/workload/fill_mib", json!(1u64 << 40)), 400),
        j("PUT", "/vms/h-frac", with(wl.clone(), "/boot/workload/zero_fraction", json!(1e300)), 400),
        j("PUT", &format!("/vms/{}", "x".repeat(300)), wl.to_string(), 400),
        j("PATCH", "/memory/merge", r#"{"pages_to_scan": 1000000000000}"#.into(), 400),
        j("PATCH", "/memory/merge", r#"{"sleep_ms": -1}"#.into(), 400),
        j("PATCH", "/memory/compaction", r#"{"proactiveness": 101}"#.into(), 400),
        j("PATCH", &format!("/vms/{live_vm}/balloon"), r#"{"amount_mib": 99999999999}"#.into(), 400),
        // Undeclared things: fields, actions, routes, methods, VMs.
        j("PUT", "/vms/h-field", with(wl.clone(), "/vcpu_count", json!(1)).replace('{', r#"{"colour":1,"#), 400),
        j(
            "PUT",
            "/vms/h-image",
            with(wl.clone(), "/boot/workload/fill_mib", json!(4)).replacen(
                '{',
                r#"{"memory_image_path":"/tmp/img","#,
                1,
            ),
            400,
        ),
        j("PATCH", "/memory/merge", r#"{"turbo": true}"#.into(), 400),
        j("PUT", "/memory/merge/actions", r#"{"action_type": "MergeAll"}"#.into(), 400),
        j("PUT", &format!("/vms/{live_vm}/actions"), r#"{"action_type": "Reboot"}"#.into(), 400),
        j("PUT", "/vms/never-made/actions", r#"{"action_type": "Pause"}"#.into(), 404),
        j("PATCH", "/vms/never-made/balloon", r#"{"amount_mib": 1}"#.into(), 404),
        n("GET", "/vms/never-made", 404),
        n("DELETE", "/vms/never-made", 404),
        n("GET", "/no/such/route", 404),
        n("POST", "/vms", 405),
        n("DELETE", "/memory", 405),
        // What the live VM's state does not allow.
        j("PUT", &format!("/vms/{live_vm}"), wl.to_string(), 409),
        j("PUT", &format!("/vms/{live_vm}/actions"), r#"{"action_type": "InstanceStart"}"#.into(), 409),
        j("PUT", &format!("/vms/{live_vm}/actions"), r#"{"action_type": "Resume"}"#.into(), 409),
        n("GET", &format!("/vms/{live_vm}/balloon"), 400),
    ];
    // Raw: a wrong Content-Type, and a body far over the limit.
    let body = r#"{"run": true}"#;
    let head = format!(
        "PATCH /memory/merge HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    v.push(Hostile { method: "PATCH", path: "/memory/merge".into(), body: Body::Raw(head.into_bytes()), status: 415 });
    let mut big = b"PUT /vms/h-big HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n".to_vec();
    big.extend_from_slice(&[b' '; 4096]);
    v.push(Hostile { method: "PUT", path: "/vms/h-big".into(), body: Body::Raw(big), status: 413 });
    v
}

/// Sends `h`, counting its answer; a slow answer is a finding.
pub fn send(h: &Hostile, caller: &mut Caller, sock: &Path, tally: &Tally) {
    let t0 = Instant::now();
    let what = format!("hostile {} {}", h.method, &h.path[..h.path.len().min(60)]);
    match &h.body {
        Body::None => drop(caller.call(h.method, &h.path, None, &[h.status])),
        Body::Json(b) => drop(caller.call(h.method, &h.path, Some(b), &[h.status])),
        Body::Raw(bytes) => {
            let answer = api_client::raw::connect(sock).map_err(|e| e.to_string()).and_then(|mut s| {
                // The server may answer and close before reading all of a body over its limit.
                let _ = s.write_all(bytes);
                api_client::raw::read_response(&mut s).map_err(|e| e.to_string())
            });
            match answer {
                Ok(r) => tally.count(&what, Some(&r), "", &[h.status]),
                Err(e) => tally.count(&what, None, &e, &[h.status]),
            }
        }
    }
    if t0.elapsed() > ANSWER_WITHIN {
        tally.fail(format!("{what}: answered after {:?}", t0.elapsed()));
    }
}
