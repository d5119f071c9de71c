//! `densevm host-info`: what this host's KVM can run.

use std::process::ExitCode;

use serde::Serialize;

use super::CommandError;
use crate::cli::HostInfoArgs;
use vmm::boot::ring0_probe;

/// Facts about the host.
#[derive(Debug, Serialize)]
pub struct HostInfo {
    /// densevm version.
    pub version: &'static str,
    /// /dev/kvm opened.
    pub kvm: bool,
    /// KVM API version.
    pub kvm_api_version: i32,
    /// KVM modules loaded.
    pub kvm_modules: Vec<&'static str>,
    /// Whether ring-0 guests run natively (a stock Linux kernel boots).
    pub ring0_native: bool,
    /// Why (the probe's measurement or the reason it could not run).
    pub ring0_reason: String,
    /// The host's shmem transparent-huge-page policy
    /// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled`).
    pub shmem_thp: String,
    /// Whether a pool backed by huge pages is possible here (the policy honours
    /// `MADV_HUGEPAGE` on shmem).
    pub shmem_thp_usable: bool,
}

/// Gathers the host facts (runs the ring-0 probe: a few milliseconds natively).
pub fn gather() -> HostInfo {
    let kvm = kvm_ioctls::Kvm::new();
    let (ring0_native, ring0_reason) = match ring0_probe::probe() {
        Ok(p) => (p.native, p.reason),
        Err(e) => (false, e),
    };
    let thp = memory::ThpStatus::probe(true);
    HostInfo {
        shmem_thp: thp.shmem_enabled,
        shmem_thp_usable: thp.honoured,
        version: env!("CARGO_PKG_VERSION"),
        kvm_api_version: kvm.as_ref().map(|k| k.get_api_version()).unwrap_or(-1),
        kvm: kvm.is_ok(),
        kvm_modules: ring0_probe::kvm_modules(),
        ring0_native,
        ring0_reason,
    }
}

/// Runs `densevm host-info`.
pub fn main(args: HostInfoArgs) -> Result<ExitCode, CommandError> {
    let info = gather();
    if args.json {
        let text = serde_json::to_string(&info).map_err(|e| CommandError::Runtime(e.to_string()))?;
        println!("{text}");
    } else {
        println!("densevm {}", info.version);
        println!("kvm: {} (api {})", info.kvm, info.kvm_api_version);
        println!("kvm modules: {}", info.kvm_modules.join(", "));
        println!("ring-0 guests native: {} ({})", info.ring0_native, info.ring0_reason);
        let thp = if info.shmem_thp_usable {
            "a huge-page-backed pool is possible: whole 2 MiB frames compaction frees are host huge pages again"
        } else {
            "no huge-page-backed pool here: the pool returns host memory 4 KiB at a time, and compaction \
             frees whole 2 MiB frames of the pool without changing host memory"
        };
        println!("shmem THP: {} ({thp})", info.shmem_thp);
    }
    Ok(ExitCode::SUCCESS)
}
