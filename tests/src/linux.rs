//! What the Linux-guest tests share: the guest's initramfs (and the Debian
//! kernel) from `resources/linux/build-guest.sh`, and the small microVM kernel from
//! `resources/linux/build-microvm-kernel.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Runs the guest build script (a no-op when its output exists) and returns
/// (bzImage, initramfs).
pub fn build_guest() -> (PathBuf, PathBuf) {
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

/// Directory holding the small kernel's `vmlinux` (and `System.map`), as written by
/// `resources/linux/build-microvm-kernel.sh`.
pub const MICROVM_DIR_ENV: &str = "DENSEVM_MICROVM_KERNEL";
/// Set to 1: the slow tier, which builds the small kernel first when it is missing.
pub const SLOW_ENV: &str = "DENSEVM_LINUX_SLOW";
/// Why the test skips when the small kernel is not built, with what was measured on
/// the development host (2 shared cores, kvm_pvm).
const MEASURED: &str = "`.ci/run` builds it first (resources/linux/build-microvm-kernel.sh; 376 s at \
     load ~4 on the 2-core kvm_pvm development host, 3574 s at load ~16); with densevm completing the user \
     syscalls kvm_pvm leaves half done, its /init printed the marker 141-183 s after `densevm run` (load \
     ~15); set DENSEVM_LINUX_SLOW=1 to build and boot it here, or DENSEVM_MICROVM_KERNEL=DIR for a built one";

/// Where the small kernel is (building it in the slow tier), or why the test skips.
pub fn microvm_kernel_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os(MICROVM_DIR_ENV) {
        let dir = PathBuf::from(dir);
        assert!(dir.join("vmlinux").exists(), "{MICROVM_DIR_ENV}={} has no vmlinux", dir.display());
        return Ok(dir);
    }
    let linux = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/linux");
    let out = linux.join("out-microvm");
    let slow = std::env::var(SLOW_ENV).is_ok_and(|v| v == "1");
    if slow {
        let start = Instant::now();
        let status = Command::new("bash")
            .arg(linux.join("build-microvm-kernel.sh"))
            .arg(&out)
            .status()
            .expect("run resources/linux/build-microvm-kernel.sh");
        assert!(status.success(), "resources/linux/build-microvm-kernel.sh failed: {status}");
        eprintln!("small kernel ready after {:?}", start.elapsed());
    }
    if out.join("vmlinux").exists() {
        Ok(out)
    } else {
        Err(format!("the small kernel is not built ({} has no vmlinux): {MEASURED}", out.display()))
    }
}
