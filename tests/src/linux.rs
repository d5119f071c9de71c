//! What the Linux-guest tests share: the guest's initramfs (and the Debian
//! kernel) from `resources/linux/build-guest.sh`, and the small microVM kernel from
//! `resources/linux/build-microvm-kernel.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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

/// The line the test initramfs's `/init` prints once userspace runs.
pub const MARKER: &str = "DENSEVM-GUEST-READY";

/// One `densevm run` of a Linux guest with a virtio-balloon.
pub struct BalloonBoot<'a> {
    /// The kernel (`vmlinux` or `bzImage`).
    pub kernel: &'a Path,
    /// The test initramfs.
    pub initrd: &'a Path,
    /// The kernel's `System.map`, if there is one (symbols in emulation reports).
    pub system_map: Option<&'a Path>,
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// Balloon target, MiB.
    pub balloon_mib: u64,
    /// The kernel command line given to `densevm run`.
    pub cmdline: &'a str,
    /// How long to wait for densevm to end (boot, `/init`'s hold, power-off).
    pub timeout: Duration,
}

/// What a [`BalloonBoot`] saw.
pub struct BootRun {
    /// The guest's serial console (densevm's stdout), line by line.
    pub console: Vec<String>,
    /// densevm's stderr.
    pub errors: String,
    /// When [`MARKER`] appeared, from `densevm run`'s start.
    pub marker_at: Option<Duration>,
    /// When densevm closed its stdout (or the timeout ended the wait).
    pub elapsed: Duration,
    /// densevm's exit status, if it ended by itself within the timeout.
    pub status: Option<std::process::ExitStatus>,
}

impl BootRun {
    /// The last lines of the console and densevm's stderr, for failure messages.
    pub fn tail(&self) -> String {
        let tail = self.console[self.console.len().saturating_sub(60)..].join("\n");
        format!("last console lines:\n{tail}\ndensevm stderr:\n{}", self.errors)
    }

    /// densevm's final JSON report (its last JSON line on stdout).
    pub fn report(&self) -> Option<serde_json::Value> {
        crate::last_json_line(self.console.join("\n").as_bytes())
    }
}

/// Boots `b` with `densevm run --serial stdout --balloon amount_mib=..` and collects
/// the console until densevm ends or `b.timeout` passes (then densevm is killed).
pub fn boot_with_balloon(b: &BalloonBoot<'_>) -> BootRun {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::sync::mpsc;

    let mut cmd = Command::new(crate::densevm_bin());
    cmd.arg("run").arg("--kernel").arg(b.kernel).arg("--initrd").arg(b.initrd);
    cmd.args(["--cmdline", b.cmdline, "--mem-mib", &b.mem_mib.to_string(), "--serial", "stdout"]);
    cmd.args(["--balloon", &format!("amount_mib={},stats_polling_interval_s=1", b.balloon_mib)]);
    if let Some(map) = b.system_map {
        cmd.arg("--system-map").arg(map);
    }
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn densevm run");
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel::<String>();
    // Not joined: a process densevm left behind could hold the pipe open.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let err_thread = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let start = Instant::now();
    let (mut console, mut marker_at) = (Vec::new(), None);
    while let Some(left) = b.timeout.checked_sub(start.elapsed()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                if marker_at.is_none() && line.contains(MARKER) {
                    marker_at = Some(start.elapsed());
                }
                console.push(line);
            }
            Err(_) => break, // the timeout, or densevm closed its stdout (it ended)
        }
    }
    let elapsed = start.elapsed();
    let status = match child.try_wait() {
        Ok(Some(s)) => Some(s),
        _ => {
            // Give a densevm that closed its stdout a moment to exit by itself.
            std::thread::sleep(Duration::from_millis(500));
            match child.try_wait() {
                Ok(Some(s)) => Some(s),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    None
                }
            }
        }
    };
    let errors = err_thread.join().unwrap_or_default();
    BootRun { console, errors, marker_at, elapsed, status }
}

/// Checks what every balloon boot must show: the marker, the virtio-balloon the
/// guest's `/init` listed (virtio device ID 5), the inflate the host counted in
/// densevm's final report (at least `balloon_mib`, all returned, no bad PFN) and
/// the statistics the guest's driver sent.
pub fn assert_marker_and_balloon(name: &str, run: &BootRun, balloon_mib: u64) {
    let tail = run.tail();
    let Some(marker_at) = run.marker_at else {
        panic!("{name}: no {MARKER} after {:?} (densevm status {:?}); {tail}", run.elapsed, run.status);
    };
    eprintln!("{name}: {MARKER} after {marker_at:?}, densevm done after {:?}", run.elapsed);
    assert!(
        run.console.iter().any(|l| l.trim_start().starts_with("virtio") && l.contains("device=0x0005")),
        "{name}: the guest found no virtio-balloon (device=0x0005); {tail}"
    );
    let v = run.report().unwrap_or_else(|| panic!("{name}: no final JSON report (status {:?}); {tail}", run.status));
    let c = &v["balloon"]["counters"];
    let inflated = c["inflated_pages"].as_u64().unwrap_or(0);
    assert!(
        inflated >= balloon_mib * 256,
        "{name}: the host saw {inflated} pages inflated, not {}: {v}",
        balloon_mib * 256
    );
    assert!(c["bytes_returned"].as_u64().unwrap_or(0) >= balloon_mib << 20, "{name}: memory not returned: {c}");
    assert_eq!(c["bad_pfns"], 0, "{name}: {c}");
    // The driver answers the statistics queue (polled every second during the hold).
    assert!(c["stats_updates"].as_u64().unwrap_or(0) > 0, "{name}: no balloon statistics from the guest: {c}");
}
