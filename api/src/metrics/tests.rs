//! Tests of the Prometheus rendering.

use super::*;
use crate::scenario::Scenario;
use crate::types::{BootSource, CompactionFailures, VmConfig};

fn vm(id: &str, state: VmState) -> VmInfo {
    VmInfo {
        vm_id: id.into(),
        state,
        config: VmConfig {
            vcpu_count: 2,
            mem_size_mib: 128,
            boot: BootSource::Workload(Scenario::default()),
            memory_image_path: None,
            merge: None,
            balloon: None,
        },
        workload: None,
        exit_reason: None,
    }
}

#[test]
fn renders_families_and_samples() {
    let host = HostMemoryStats {
        pages_shared: 5,
        general_profit: -4096,
        fragmentation: 0.25,
        cow_copies: 9,
        vma_count: 40,
        process_vma_count: 120,
        vmas_per_shared_page: 1.5,
        punch_calls: 7,
        committed_bytes: 3 << 30,
        cow_no_frame: 2,
        cow_background_reuses: 11,
        pages_discarded: 300,
        pages_discarded_in_place: 200,
        ..Default::default()
    };
    let mem = VmMemoryStats {
        guest_pages: 32768,
        merged_pages: 7,
        vma_count: 3,
        cow_background_reuses: 4,
        ..Default::default()
    };
    let balloon = Balloon {
        info: crate::types::BalloonInfo {
            spec: crate::types::BalloonSpec { amount_mib: 16, ..Default::default() },
            actual_mib: 8,
            target_pages: 4096,
            actual_pages: 2048,
        },
        counters: crate::types::BalloonReport { inflated_pages: 2048, bytes_returned: 1 << 23, ..Default::default() },
    };
    let rows = [
        VmRow { vm: vm("a", VmState::Running), memory: Some(mem), balloon: Some(balloon) },
        VmRow { vm: vm("b", VmState::Created), memory: None, balloon: None },
    ];
    let text = render(&host, &rows);
    for line in [
        "densevm_vms{state=\"Running\"} 1",
        "densevm_vms{state=\"Exited\"} 0",
        "densevm_memory_pages_shared 5",
        "densevm_vm_balloon_target_bytes{vm_id=\"a\"} 16777216",
        "densevm_vm_balloon_actual_bytes{vm_id=\"a\"} 8388608",
        "densevm_vm_balloon_inflated_pages{vm_id=\"a\"} 2048",
        "densevm_vm_balloon_returned_bytes{vm_id=\"a\"} 8388608",
        "densevm_memory_general_profit_bytes -4096",
        "densevm_memory_fragmentation_ratio 0.25",
        "# TYPE densevm_memory_cow_copies_total counter",
        "densevm_memory_cow_copies_total 9",
        "densevm_memory_vma_count 40",
        "densevm_memory_process_vma_count 120",
        "densevm_memory_vmas_per_shared_page 1.5",
        "# TYPE densevm_memory_punch_calls_total counter",
        "densevm_memory_punch_calls_total 7",
        "densevm_memory_committed_bytes 3221225472",
        "densevm_memory_commit_limit_bytes 0",
        "# TYPE densevm_memory_cow_no_frame_total counter",
        "densevm_memory_cow_no_frame_total 2",
        "densevm_vm_state{vm_id=\"a\",state=\"Running\"} 1",
        "densevm_vm_memory_size_bytes{vm_id=\"b\"} 134217728",
        "densevm_vm_guest_pages{vm_id=\"a\"} 32768",
        "densevm_vm_merged_pages{vm_id=\"a\"} 7",
        "densevm_vm_vma_count{vm_id=\"a\"} 3",
        "# TYPE densevm_memory_cow_background_reuses_total counter",
        "densevm_memory_cow_background_reuses_total 11",
        "densevm_vm_cow_background_reuses_total{vm_id=\"a\"} 4",
        "# TYPE densevm_memory_pages_discarded_total counter",
        "densevm_memory_pages_discarded_total 300",
        "# TYPE densevm_memory_pages_discarded_in_place_total counter",
        "densevm_memory_pages_discarded_in_place_total 200",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    assert!(!text.contains("densevm_vm_guest_pages{vm_id=\"b\"}"));
    // Every sample belongs to a family declared just before with HELP and TYPE.
    let mut family = String::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            family = rest.split(' ').next().unwrap().to_string();
        } else if !l.starts_with('#') {
            let name = l.split(['{', ' ']).next().unwrap();
            assert_eq!(name, family, "{l}");
        }
    }
}

#[test]
fn renders_compaction() {
    let host = HostMemoryStats {
        compaction: CompactionStats {
            free_frames: 1000,
            free_frames_in_partial_2m: 600,
            free_frames_2m: 3,
            frames_2m_returned: 4,
            ideal_frames_2m: 2,
            fragmentation: 0.5,
            pages_migrated: 900,
            passes: 2,
            proactive_passes: 1,
            failures: CompactionFailures { vma_budget: 1, remap_failed: 2, no_target: 3, pinned: 0 },
        },
        ..Default::default()
    };
    let text = render(&host, &[]);
    for line in [
        "# HELP densevm_memory_compaction_free_frames Free 4 KiB frames in the frame pool.",
        "# TYPE densevm_memory_compaction_free_frames gauge",
        "densevm_memory_compaction_free_frames 1000",
        "densevm_memory_compaction_free_frames_in_partial_2m 600",
        "densevm_memory_compaction_free_frames_2m 3",
        "densevm_memory_compaction_ideal_frames_2m 2",
        "densevm_memory_compaction_fragmentation_ratio 0.5",
        "# TYPE densevm_memory_compaction_frames_2m_returned_total counter",
        "densevm_memory_compaction_frames_2m_returned_total 4",
        "densevm_memory_compaction_pages_migrated_total 900",
        "densevm_memory_compaction_passes_total 2",
        "densevm_memory_compaction_proactive_passes_total 1",
        "# TYPE densevm_memory_compaction_migration_failures_total counter",
        "densevm_memory_compaction_migration_failures_total{reason=\"vma_budget\"} 1",
        "densevm_memory_compaction_migration_failures_total{reason=\"remap_failed\"} 2",
        "densevm_memory_compaction_migration_failures_total{reason=\"no_target\"} 3",
        "densevm_memory_compaction_migration_failures_total{reason=\"pinned\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    // Each family is declared once, with HELP before TYPE.
    let helps: Vec<_> = text.lines().filter_map(|l| l.strip_prefix("# HELP ")).collect();
    let types: Vec<_> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).collect();
    assert_eq!(helps.len(), types.len());
    let mut names: Vec<_> = types.iter().map(|t| t.split(' ').next().unwrap()).collect();
    let n = names.len();
    names.dedup();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), n, "a family is declared twice");
}

#[test]
fn escapes_labels_and_floats() {
    assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    assert_eq!(float(f64::NAN), "NaN");
    assert_eq!(float(f64::INFINITY), "+Inf");
    assert_eq!(float(1.5), "1.5");
}
