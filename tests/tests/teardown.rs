//! Clean teardown: creating, running and removing microVMs over and over leaks no
//! file descriptors, no threads and no frames.

use std::time::{Duration, Instant};

use vmm::domains::DomainPolicy;
use vmm::guest_ram::RamPolicy;
use vmm::host::{Host, HostConfig};
use vmm::vm::{BootSource, MergeSpec, SerialOut, VmSpec};
use vmm::workload::mem_mib as workload_mem_mib;
use vmm::workload::scenario::Scenario;

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

fn spec(id: &str) -> VmSpec {
    let scenario =
        Scenario { fill_mib: 2, shared_fraction: 0.5, write_fraction: 0.5, writes_per_s: 2000, ..Default::default() };
    VmSpec {
        id: id.into(),
        vcpus: 2,
        mem_mib: workload_mem_mib(scenario.fill_mib),
        boot: BootSource::Workload(scenario),
        serial: SerialOut::None,
        ram: RamPolicy::Managed,
        pause_after_fill: false,
        merge: MergeSpec { enabled: true, domain: Some("t".into()) },
        balloon: None,
    }
}

#[test]
fn stopping_vms_returns_fds_threads_and_frames() {
    if !e2e::kvm_available("stopping_vms_returns_fds_threads_and_frames") {
        return;
    }
    let mut host = match Host::new(HostConfig { pool_bytes: 1 << 30 }) {
        Ok(h) => h,
        Err(e) => {
            e2e::skip("stopping_vms_returns_fds_threads_and_frames", &format!("cannot create the host: {e}"));
            return;
        }
    };
    host.declare_domain("t", DomainPolicy::default()).unwrap();
    let mut baseline = None;
    for round in 0..6 {
        for i in 0..3 {
            host.create_vm(spec(&format!("vm{i}"))).unwrap();
        }
        host.start_all().unwrap();
        // Let them run their write loop for a moment (pages get written, faulted, merged).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let filled = (0..3).all(|i| {
                let vm = host.vm_mut(&format!("vm{i}")).unwrap();
                vm.handle_events();
                vm.workload_report().is_some_and(|r| r.pages_written > 100)
            });
            if filled {
                break;
            }
            assert!(Instant::now() < deadline, "guests made no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
        if round % 2 == 0 {
            host.vm_mut("vm1").unwrap().pause().unwrap();
        }
        for i in 0..3 {
            let id = format!("vm{i}");
            let r = host.vm(&id).unwrap().workload_report().unwrap();
            assert_eq!(r.mismatches, 0);
            host.remove_vm(&id, None).unwrap();
        }
        assert!(host.vms().next().is_none());
        let stats = host.memory().stats();
        assert_eq!(stats.frames_used, 0, "round {round}: frames not returned");
        assert_eq!(stats.guest_pages, 0);
        let now = (count_dir("/proc/self/fd"), count_dir("/proc/self/task"));
        // The first round may start process-wide threads (e.g. the fault handler's
        // helpers); later rounds must come back to the same counts.
        match baseline {
            None => baseline = Some(now),
            Some(b) => assert_eq!(now, b, "round {round}: (fds, threads) grew from {b:?} to {now:?}"),
        }
    }
}
