//! End-to-end tests of memory commitment (issue 15, finding 1, scaled down):
//!
//! - the daemon: `serve --host-budget-mib` (default MemAvailable, logged);
//!   two VMs of one merge domain with identical content are merged, and a
//!   third VM of the size merging freed is refused with 409 naming the numbers
//!   (merging frees frames, not commitment); `GET /memory` and `/metrics`
//!   count the committed bytes;
//! - a host with an explicitly overcommitted pool (the daemon never
//!   overcommits): the writing guests' copies-on-write find no frame, and the
//!   VM stops with an out-of-memory exit reason (what `GET /vms/{id}` shows),
//!   `cow_no_frame` counted, the fault handler not spinning; unmerge-all is
//!   refused as a conflict naming the frames missing.
//!
//! Without /dev/kvm every test prints `SKIPPED <name>: <reason>` and passes.

mod common;

use std::time::{Duration, Instant};

use common::{kvm_available, Daemon, ResponseExt};
use memory::manager::CommitPolicy;
use memory::merge::{ChangeDetection, Tunables};
use serde_json::{json, Value};
use vmm::domains::DomainPolicy;
use vmm::error_kind::{memory_error_kind, ErrorKind};
use vmm::guest_ram::RamPolicy;
use vmm::host::{Host, HostConfig};
use vmm::vm::{BootSource, MergeSpec, SerialOut, VmSpec, VmState};
use vmm::workload::mem_mib as workload_mem_mib;
use vmm::workload::scenario::Scenario;

const WAIT: Duration = Duration::from_secs(60);
const MEM_MIB: u64 = 16;
const FILL_MIB: u64 = 8;

/// A workload VM whose filled pages are all identical across VMs (shared
/// seed only), idle after its fill, merging on in domain `d1`.
fn identical_vm() -> String {
    json!({
        "vcpu_count": 1,
        "mem_size_mib": MEM_MIB,
        "boot": {"workload": {"fill_mib": FILL_MIB, "shared_fraction": 1.0, "shared_seed": 7}},
        "merge": {"enabled": true, "domain": "d1"}
    })
    .to_string()
}

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[test]
fn daemon_refuses_a_vm_of_the_frames_merging_freed() {
    let name = "daemon_refuses_a_vm_of_the_frames_merging_freed";
    if !kvm_available(name) {
        return;
    }
    let d = Daemon::start(&["--host-budget-mib", "40"]);
    assert!(d.log_text().contains("host memory budget: 40 MiB"), "budget not logged:\n{}", d.log_text());
    d.declare_domain("d1");
    for id in ["vm-a", "vm-b"] {
        let r = d.req("PUT", &format!("/vms/{id}"), Some(&identical_vm()));
        assert_eq!(r.status, 204, "create {id}: {}", r.text());
        let r = d.req("PUT", &format!("/vms/{id}/actions"), Some(r#"{"action_type": "InstanceStart"}"#));
        assert_eq!(r.status, 204, "start {id}: {}", r.text());
    }
    let patch = json!({"run": true, "pages_to_scan": 8192, "sleep_ms": 1, "change_detection": "checksum"});
    let r = d.req("PATCH", "/memory/merge", Some(&patch.to_string()));
    assert_eq!(r.status, 200, "{}", r.text());
    let data_pages = FILL_MIB << 8;
    let deadline = Instant::now() + WAIT;
    let merged = loop {
        let h = d.get("/memory");
        if u(&h, "pages_sharing") >= data_pages * 9 / 10 {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for the identical pages to merge\n/memory: {h}\n/vms/vm-a: {}\n/vms/vm-b: {}\nlog:\n{}",
            d.get("/vms/vm-a"),
            d.get("/vms/vm-b"),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(u(&merged, "committed_bytes"), (2 * MEM_MIB) << 20, "{merged}");
    assert!(u(&merged, "commit_limit_bytes") >= (2 * MEM_MIB) << 20, "{merged}");
    assert_eq!(u(&merged, "cow_no_frame"), 0, "{merged}");
    let metrics = d.req("GET", "/metrics", None).text().to_string();
    let line = format!("densevm_memory_committed_bytes {}", (2 * MEM_MIB) << 20);
    assert!(metrics.lines().any(|l| l == line), "missing {line:?} in\n{metrics}");

    // Merging freed most of a VM's worth of frames: not of commitment.
    let r = d.req("PUT", "/vms/vm-c", Some(&identical_vm()));
    assert_eq!(r.status, 409, "a VM beyond the budget was accepted: {}", r.text());
    let fault = r.fault();
    assert!(
        fault.contains("32 MiB of guest memory committed + 16 MiB requested > 40 MiB budget"),
        "the refusal does not name the numbers: {fault}"
    );
    assert_eq!(d.get("/vms")["vms"].as_array().map(Vec::len), Some(2), "a refused VM was kept");
    // Deleting a VM gives its commitment back.
    assert_eq!(d.req("DELETE", "/vms/vm-b", None).status, 204);
    let r = d.req("PUT", "/vms/vm-c", Some(&identical_vm()));
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(u(&d.get("/memory"), "committed_bytes"), (2 * MEM_MIB) << 20);
}

#[test]
fn daemon_budget_defaults_to_mem_available() {
    let name = "daemon_budget_defaults_to_mem_available";
    if !kvm_available(name) {
        return;
    }
    let d = Daemon::start(&[]);
    let log = d.log_text();
    let line = log.lines().find(|l| l.contains("host memory budget:")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("(MemAvailable at start)"), "{line}");
    let mib: u64 = line
        .split("host memory budget: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no budget figure in {line}"));
    assert!(mib > 0);
    let big = json!({
        "vcpu_count": 1,
        "mem_size_mib": mib + 1,
        "boot": {"workload": {"fill_mib": FILL_MIB}},
    });
    let r = d.req("PUT", "/vms/too-big", Some(&big.to_string()));
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.fault().contains(&format!("> {mib} MiB budget")), "{}", r.fault());
}

/// A host with a 64 MiB pool, its VMs driven by handling their events here.
struct Fleet {
    host: Host,
    ids: Vec<&'static str>,
}

impl Fleet {
    fn wait_until(&mut self, what: &str, done: impl Fn(&Host) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(&self.host) {
            for id in self.ids.clone() {
                self.host.vm_mut(id).unwrap().handle_events();
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn writer_spec(id: &str, fill_mib: u32) -> VmSpec {
    VmSpec {
        id: id.into(),
        vcpus: 1,
        mem_mib: workload_mem_mib(fill_mib),
        boot: BootSource::Workload(Scenario {
            fill_mib,
            shared_fraction: 1.0,
            shared_seed: 0x5eed,
            seed: Some(1),
            write_fraction: 1.0,
            writes_per_s: 20_000,
            duration_s: 0,
            ..Scenario::default()
        }),
        serial: SerialOut::None,
        ram: RamPolicy::Managed,
        pause_after_fill: true,
        merge: MergeSpec { enabled: true, domain: Some("d".into()) },
        balloon: None,
    }
}

fn hog_spec(mem_mib: u64) -> VmSpec {
    VmSpec {
        id: "hog".into(),
        vcpus: 1,
        mem_mib,
        boot: BootSource::Workload(Scenario { fill_mib: 1, ..Scenario::default() }),
        serial: SerialOut::None,
        ram: RamPolicy::Managed,
        pause_after_fill: false,
        merge: MergeSpec::default(),
        balloon: None,
    }
}

#[test]
fn overcommitted_cow_without_a_frame_stops_the_vm_with_an_exit_reason() {
    let name = "overcommitted_cow_without_a_frame_stops_the_vm_with_an_exit_reason";
    if !kvm_available(name) {
        return;
    }
    let host = match Host::new(HostConfig { pool_bytes: 64 << 20 }) {
        Ok(h) => h,
        Err(e) => {
            e2e::skip(name, &format!("cannot create the host: {e}"));
            return;
        }
    };
    let mut f = Fleet { host, ids: vec!["a", "b"] };
    f.host.declare_domain("d", DomainPolicy::default()).unwrap();
    for id in ["a", "b"] {
        f.host.create_vm(writer_spec(id, 16)).unwrap();
    }
    f.host.start_all().unwrap();
    f.wait_until("the fills", |h| ["a", "b"].iter().all(|id| h.vm(id).unwrap().state() == VmState::Paused));
    let mgr = f.host.memory().clone();
    let tunables = Tunables { change_detection: ChangeDetection::Checksum, ..Tunables::full_speed() };
    mgr.merger().set_tunables(tunables).unwrap();
    let data_pages = 16 << 8;
    f.wait_until("merging", |_| mgr.stats().merge.pages_sharing >= data_pages);
    mgr.merger().set_run(false);

    // Without overcommit, the frames merging freed are not for another VM.
    let free_mib = mgr.stats().frames_free / 256;
    assert!(free_mib >= 16, "merging freed too little: {:?}", mgr.stats());
    let e = f.host.create_vm(hog_spec(free_mib)).expect_err("a VM of the freed frames was admitted");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(e.to_string().contains("memory commitment exceeded"), "{e}");

    // Explicitly overcommitted, it is admitted and takes (nearly) every free frame.
    mgr.set_commit_policy(CommitPolicy { overcommit_ratio: 2.0, cow_reserve_frames: 0 }).unwrap();
    f.host.create_vm(hog_spec(free_mib)).unwrap();
    assert!(mgr.stats().frames_free < 256);
    // The writers resume: their copies-on-write soon find no frame.
    for id in ["a", "b"] {
        f.host.vm_mut(id).unwrap().resume().unwrap();
    }
    f.wait_until("a writer to stop out of memory", |h| {
        ["a", "b"].iter().any(|id| h.vm(id).unwrap().state() == VmState::Exited)
    });
    let stats = mgr.stats();
    assert!(stats.counters.cow_no_frame >= 1, "{stats:?}");
    assert_eq!(stats.counters.fault_errors, 0);
    for id in ["a", "b"] {
        let vm = f.host.vm(id).unwrap();
        let mem_id = vm.ram().guest_map().unwrap().vm_id();
        if vm.state() == VmState::Exited {
            let reason = vm.timeline().exit_reason.clone().unwrap_or_default();
            assert!(reason.starts_with("out of memory: a copy-on-write found no free frame"), "{id}: {reason}");
            assert!(mgr.is_out_of_memory(mem_id));
        }
    }
    // The stopped writer's fault handler does not spin.
    std::thread::sleep(Duration::from_millis(300));
    f.wait_until("both writers to stop", |h| ["a", "b"].iter().all(|id| h.vm(id).unwrap().state() == VmState::Exited));
    let before = mgr.stats();
    std::thread::sleep(Duration::from_millis(500));
    let after = mgr.stats();
    assert_eq!(after.uffd_faults, before.uffd_faults, "faults kept coming after the VMs stopped");
    assert!(after.uffd_faults < 100_000, "fault storm: {after:?}");
    assert_eq!(after.host().cow_no_frame, after.counters.cow_no_frame);
    let (faults, no_frame, held) = (after.uffd_faults, after.counters.cow_no_frame, after.uffd_held_writers);
    eprintln!("{name}: {faults} write faults, {no_frame} copies-on-write without a frame, {held} writers held");

    // Unmerging would need a frame per merged page: a conflict naming what is missing.
    match mgr.unmerge_all() {
        Err(e) => {
            assert_eq!(memory_error_kind(&e), ErrorKind::Conflict, "{e}");
            assert!(e.to_string().contains("missing"), "{e}");
        }
        Ok(n) => panic!("unmerge-all without room succeeded ({n} pages)"),
    }
    for id in ["a", "b", "hog"] {
        f.host.remove_vm(id, None).unwrap();
    }
    assert_eq!(mgr.stats().committed_bytes, 0);
}
