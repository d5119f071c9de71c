//! Prometheus text exposition (format 0.0.4) of the VMM's statistics, for `GET /metrics`.

use std::fmt::Write;

use crate::types::{Balloon, BalloonPolicyStatus, CompactionStats, HostMemoryStats, VmInfo, VmMemoryStats, VmState};

/// `Content-Type` of the rendered text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One VM's row of the exposition: its info, and its memory and balloon where known.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRow {
    /// The VM.
    pub vm: VmInfo,
    /// Its memory statistics (None when it vanished while the metrics were gathered).
    pub memory: Option<VmMemoryStats>,
    /// Its balloon (None without one).
    pub balloon: Option<Balloon>,
}

/// Kind of a metric family.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

/// Writes metric families into a string.
struct Writer {
    out: String,
}

/// Escapes a label value (`\`, `"` and newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Writer {
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        // Writing to a String cannot fail.
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// Formats an `f64` the way Prometheus expects (`NaN`, `+Inf`, `-Inf`).
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// The compactor's fragmentation gauges and totals (`densevm_memory_compaction_*`).
fn compaction(w: &mut Writer, c: &CompactionStats) {
    use Kind::{Counter, Gauge};
    let gauges = [
        ("free_frames", "Free 4 KiB frames in the frame pool.", c.free_frames),
        (
            "free_frames_in_partial_2m",
            "Free 4 KiB frames inside 2 MiB frames that hold live frames (the holes compaction fills).",
            c.free_frames_in_partial_2m,
        ),
        ("free_frames_2m", "Whole free 2 MiB frames.", c.free_frames_2m),
        ("ideal_frames_2m", "Fewest 2 MiB frames the live frames fit in.", c.ideal_frames_2m),
    ];
    for (name, help, v) in gauges {
        w.single(&format!("densevm_memory_compaction_{name}"), Gauge, help, v);
    }
    w.single(
        "densevm_memory_compaction_fragmentation_ratio",
        Gauge,
        "Free share of the 2 MiB frames holding live frames (0 packed, near 1 mostly holes).",
        float(c.fragmentation),
    );
    let counters = [
        (
            "frames_2m_returned_total",
            "2 MiB frames emptied by compaction and given back to the host.",
            c.frames_2m_returned,
        ),
        ("pages_migrated_total", "4 KiB frames migrated by compaction.", c.pages_migrated),
        ("passes_total", "Compaction passes (on demand and proactive).", c.passes),
        ("proactive_passes_total", "Proactive (background) compaction passes.", c.proactive_passes),
    ];
    for (name, help, v) in counters {
        w.single(&format!("densevm_memory_compaction_{name}"), Counter, help, v);
    }
    let name = "densevm_memory_compaction_migration_failures_total";
    w.family(name, Counter, "Frames compaction could not move, by reason.");
    let f = &c.failures;
    for (reason, v) in [
        ("vma_budget", f.vma_budget),
        ("remap_failed", f.remap_failed),
        ("no_target", f.no_target),
        ("pinned", f.pinned),
    ] {
        w.sample(name, &[("reason", reason)], v);
    }
}

/// Memory commitment (`densevm_memory_committed_bytes`, `..._commit_limit_bytes`,
/// `..._cow_no_frame_total`).
fn commitment(w: &mut Writer, h: &HostMemoryStats) {
    use Kind::{Counter, Gauge};
    w.single(
        "densevm_memory_committed_bytes",
        Gauge,
        "Guest memory committed in the frame pool (whole VM sizes, merged or not).",
        h.committed_bytes,
    );
    w.single(
        "densevm_memory_commit_limit_bytes",
        Gauge,
        "Most guest memory the frame pool admits (capacity x overcommit ratio).",
        h.commit_limit_bytes,
    );
    w.single(
        "densevm_memory_cow_no_frame_total",
        Counter,
        "Copy-on-write faults that found no free frame (overcommit only; each stops its VM).",
        h.cow_no_frame,
    );
}

/// Renders host statistics and every VM (with its memory statistics when known).
pub fn render(host: &HostMemoryStats, rows: &[VmRow]) -> String {
    use Kind::{Counter, Gauge};
    let mut w = Writer { out: String::new() };
    let vms: Vec<(&VmInfo, Option<&VmMemoryStats>)> = rows.iter().map(|r| (&r.vm, r.memory.as_ref())).collect();

    w.family("densevm_vms", Gauge, "Number of VMs by state.");
    for state in VmState::ALL {
        let n = vms.iter().filter(|(v, _)| v.state == state).count();
        w.sample("densevm_vms", &[("state", state.as_str())], n);
    }

    let h = host;
    let host_gauges: [(&str, &str, u64); 11] = [
        ("pages_shared", "Shared frames in use.", h.pages_shared),
        ("pages_sharing", "Guest pages mapping a shared frame beyond the first.", h.pages_sharing),
        ("pages_unshared", "Scanned pages that are unique so far.", h.pages_unshared),
        ("pages_volatile", "Pages changing too fast to merge.", h.pages_volatile),
        ("zero_pages", "Guest pages mapping the zero page.", h.zero_pages),
        ("frames_2m_total", "2 MiB host frames in the frame pool.", h.frames_2m_total),
        ("frames_2m_in_use", "2 MiB host frames with a live 4 KiB frame.", h.frames_2m_in_use),
        ("frames_2m_returned", "2 MiB host frames given back to the host.", h.frames_2m_returned),
        ("host_used_bytes", "Host memory used for guest memory.", h.host_bytes_used),
        ("vma_count", "Host mappings (VMAs) of guest memory.", h.vma_count),
        ("process_vma_count", "Host mappings (VMAs) of the whole densevm process.", h.process_vma_count),
    ];
    for (name, help, v) in host_gauges {
        w.single(&format!("densevm_memory_{name}"), Gauge, help, v);
    }
    w.single(
        "densevm_memory_general_profit_bytes",
        Gauge,
        "Bytes saved by merging minus merger metadata.",
        h.general_profit,
    );
    w.single(
        "densevm_memory_fragmentation_ratio",
        Gauge,
        "Fragmentation of in-use 2 MiB frames (0 packed, 1 scattered).",
        float(h.fragmentation),
    );
    w.single(
        "densevm_memory_vmas_per_shared_page",
        Gauge,
        "Guest memory mappings beyond one per VM, per page saved by sharing (pages_sharing).",
        float(h.vmas_per_shared_page),
    );
    let host_counters = [
        ("pages_scanned_total", "Pages scanned by the merger.", h.pages_scanned),
        ("full_scans_total", "Completed full scans.", h.full_scans),
        ("cow_copies_total", "Copy-on-write copies.", h.cow_copies),
        ("cow_reuses_total", "Copy-on-write reuses in place at a write fault.", h.cow_reuses),
        (
            "cow_background_reuses_total",
            "Merged frames made writable in place in the background once their other mappers left.",
            h.cow_background_reuses,
        ),
        ("vcpu_holds_total", "Merge chunks that held the merging VMs' vCPUs out of guest mode.", h.vcpu_holds),
        ("punch_calls_total", "Holes punched in the frame pool (fallocate calls).", h.punch_calls),
        ("pages_discarded_total", "Guest pages discarded (balloon, free page reporting).", h.pages_discarded),
        (
            "pages_discarded_in_place_total",
            "Discarded guest pages that kept their own (punched) frame instead of mapping the zero region.",
            h.pages_discarded_in_place,
        ),
    ];
    for (name, help, v) in host_counters {
        w.single(&format!("densevm_memory_{name}"), Counter, help, v);
    }
    compaction(&mut w, &h.compaction);
    commitment(&mut w, h);

    w.family("densevm_vm_state", Gauge, "1 for the VM's current state.");
    for (vm, _) in &vms {
        w.sample("densevm_vm_state", &[("vm_id", &vm.vm_id), ("state", vm.state.as_str())], 1);
    }
    w.family("densevm_vm_vcpus", Gauge, "vCPUs of the VM.");
    for (vm, _) in &vms {
        w.sample("densevm_vm_vcpus", &[("vm_id", &vm.vm_id)], vm.config.vcpu_count);
    }
    w.family("densevm_vm_memory_size_bytes", Gauge, "Guest memory size.");
    for (vm, _) in &vms {
        let bytes = u64::from(vm.config.mem_size_mib) << 20;
        w.sample("densevm_vm_memory_size_bytes", &[("vm_id", &vm.vm_id)], bytes);
    }
    type Field = fn(&VmMemoryStats) -> u64;
    let per_vm: [(&str, Kind, &str, Field); 8] = [
        ("guest_pages", Gauge, "Guest memory size in pages.", |m| m.guest_pages),
        ("resident_pages", Gauge, "Guest pages backed by a frame.", |m| m.resident_pages),
        ("merged_pages", Gauge, "Guest pages mapping a merged frame.", |m| m.merged_pages),
        ("zero_pages", Gauge, "Guest pages mapping the zero page.", |m| m.zero_pages),
        ("vma_count", Gauge, "Host mappings (VMAs) of the guest memory.", |m| m.vma_count),
        ("cow_copies_total", Counter, "Copy-on-write copies.", |m| m.cow_copies),
        ("cow_reuses_total", Counter, "Copy-on-write reuses in place at a write fault.", |m| m.cow_reuses),
        (
            "cow_background_reuses_total",
            Counter,
            "Merged frames made writable in place in the background once their other mappers left.",
            |m| m.cow_background_reuses,
        ),
    ];
    for (name, kind, help, get) in per_vm {
        let name = format!("densevm_vm_{name}");
        w.family(&name, kind, help);
        for (vm, mem) in &vms {
            if let Some(m) = mem {
                w.sample(&name, &[("vm_id", &vm.vm_id)], get(m));
            }
        }
    }
    balloons(&mut w, rows);
    w.out
}

/// The budget policy's families: budget (when set), the use it compares, the
/// targets it set, its actions.
pub fn balloon_policy(p: &BalloonPolicyStatus) -> String {
    let mut w = Writer { out: String::new() };
    if let Some(budget) = p.host_budget_bytes {
        w.single(
            "densevm_balloon_policy_budget_bytes",
            Kind::Gauge,
            "Host memory budget of the balloon policy.",
            budget,
        );
    }
    w.single(
        "densevm_balloon_policy_host_used_bytes",
        Kind::Gauge,
        "Host memory in use the balloon policy compares with its budget.",
        p.host_bytes_used,
    );
    w.single(
        "densevm_balloon_policy_actions_total",
        Kind::Counter,
        "Balloon policy steps that changed targets.",
        p.actions,
    );
    let name = "densevm_balloon_policy_target_bytes";
    w.family(name, Kind::Gauge, "Balloon target set by the policy.");
    for (vm_id, mib) in &p.targets_mib {
        w.sample(name, &[("vm_id", vm_id)], u64::from(*mib) << 20);
    }
    w.out
}

/// The per-VM balloon families (VMs with a balloon only).
fn balloons(w: &mut Writer, rows: &[VmRow]) {
    type Field = fn(&Balloon) -> u64;
    let families: [(&str, Kind, &str, Field); 6] = [
        ("target_bytes", Kind::Gauge, "Balloon target size.", |b| u64::from(b.info.target_pages) << 12),
        ("actual_bytes", Kind::Gauge, "Balloon size the guest reports.", |b| u64::from(b.info.actual_pages) << 12),
        ("inflated_pages", Kind::Gauge, "Pages inflated since the VM was created.", |b| b.counters.inflated_pages),
        ("deflated_pages", Kind::Gauge, "Pages deflated since the VM was created.", |b| b.counters.deflated_pages),
        ("reported_pages", Kind::Gauge, "Pages reported free since the VM was created.", |b| b.counters.reported_pages),
        ("returned_bytes", Kind::Gauge, "Host memory the balloon returned to the host.", |b| b.counters.bytes_returned),
    ];
    for (name, kind, help, get) in families {
        let name = format!("densevm_vm_balloon_{name}");
        w.family(&name, kind, help);
        for r in rows {
            if let Some(b) = &r.balloon {
                w.sample(&name, &[("vm_id", &r.vm.vm_id)], get(b));
            }
        }
    }
}

#[cfg(test)]
mod tests;
