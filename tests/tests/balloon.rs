//! End to end: a workload VM with `--balloon` whose guest drives the
//! virtio-balloon itself (the workload guest's driver, scenario
//! `balloon_hold_ms`). Inflating X MiB must return X MiB of the frame pool's
//! memfd to the host while the balloon is held; after deflating, the guest
//! finds the pages zero, refills them and verifies every page. Statistics
//! arrive at the configured interval while the balloon is held, and pages the
//! guest reports free (free page reporting) are returned too.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::{densevm, densevm_bin, kvm_available};

/// Bytes the frame pool's memfd (`memfd:densevm-pool`) of process `pid` holds.
fn pool_allocated_bytes(pid: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()? {
        let path = entry.ok()?.path();
        let target = std::fs::read_link(&path).ok()?;
        if target.to_string_lossy().starts_with("/memfd:densevm-pool") {
            return std::fs::metadata(&path).ok().map(|m| m.blocks() * 512);
        }
    }
    None
}

#[test]
fn guest_inflates_and_deflates_its_balloon() {
    if !kvm_available("guest_inflates_and_deflates_its_balloon") {
        return;
    }
    const MIB: u64 = 32;
    let dir = std::env::temp_dir().join(format!("densevm-e2e-balloon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let scenario = dir.join("s.json");
    std::fs::write(&scenario, r#"{"fill_mib": 64, "duration_s": 1, "balloon_hold_ms": 3000}"#).unwrap();
    let mut child = Command::new(densevm_bin())
        .args(["run", "--workload", scenario.to_str().unwrap(), "--serial", "stdout"])
        .args([
            "--balloon",
            &format!("amount_mib={MIB},deflate_on_oom=true,stats_polling_interval_s=1,free_page_reporting=true"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn densevm");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut filled, mut inflated) = (None, None);
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let line = line.expect("stdout line");
        if line.contains("workload: filled and verified") {
            filled = pool_allocated_bytes(pid);
        }
        if line.contains("balloon: inflated") {
            inflated = pool_allocated_bytes(pid);
        }
        lines.push(line);
        assert!(Instant::now() < deadline, "densevm did not finish: {lines:?}");
    }
    let status = child.wait().expect("wait");
    let all = lines.join("\n");
    assert!(status.success(), "densevm run failed:\n{all}");
    assert!(all.contains(&format!("balloon: inflated {} pages", MIB * 256)), "{all}");
    assert!(all.contains(&format!("balloon: deflated {} pages, 0 not zero", MIB * 256)), "{all}");
    // Then the scenario frees the next 32 MiB and reports them: they read zero after.
    assert!(all.contains(&format!("balloon: reported {} free pages, 0 not zero", MIB * 256)), "{all}");
    assert!(all.contains("workload: done, mismatches 0"), "{all}");

    let (filled, inflated) = (filled.expect("memfd size after fill"), inflated.expect("memfd size inflated"));
    let fell = filled.saturating_sub(inflated);
    // The pool's memfd fell by the balloon (give or take the driver's few pages).
    let expected = (MIB << 20) - (1 << 20)..=(MIB << 20) + (1 << 20);
    assert!(expected.contains(&fell), "memfd {filled} -> {inflated}");

    let v = e2e::last_json_line(all.as_bytes()).expect("final JSON report");
    let c = &v["balloon"]["counters"];
    assert_eq!(c["inflated_pages"], MIB * 256, "{c}");
    assert_eq!(c["deflated_pages"], MIB * 256, "{c}");
    assert_eq!(c["reported_pages"], MIB * 256, "{c}");
    assert_eq!(c["bytes_returned"], 2 * (MIB << 20), "inflated and reported: {c}");
    assert_eq!(c["bad_pfns"], 0, "{c}");
    assert_eq!(v["balloon"]["info"]["amount_mib"], MIB);
    assert_eq!(v["balloon"]["info"]["deflate_on_oom"], true);
    assert_eq!(v["report"]["mismatches"], 0);
    // Statistics: the buffer the driver left at start-up, then at least one
    // answer to the device's request after the 1 s interval, sent while held.
    assert!(c["stats_updates"].as_u64().unwrap() >= 2, "{c}");
    let s = &v["balloon"]["statistics"];
    assert_eq!(s["total_memory"], 64u64 << 20, "{s}");
    assert_eq!(s["available_memory"], (64 - MIB) << 20, "{s}");
    assert!(s["updated_at_unix_s"].as_f64().is_some(), "{s}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_balloon_options_are_clear_errors() {
    for (arg, says) in [
        ("amount_mib=x", "amount_mib: `x` is not a size in MiB"),
        ("deflate_on_oom=true", "amount_mib=N is required"),
        ("amount_mib=4,colour=blue", "unknown key `colour`"),
        ("amount_mib=4,stats_polling_interval_s=99999", "stats_polling_interval_s"),
        ("amount_mib=4,free_page_reporting=1", "free_page_reporting: `1` is not true or false"),
    ] {
        let out = densevm(&["run", "--workload", "tiny", "--serial", "none", "--balloon", arg]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{arg} accepted");
        assert!(err.contains(says), "{arg}: {err}");
    }
    // Larger than the guest, and a scenario step without a balloon: refused at creation.
    let out = densevm(&["run", "--workload", "tiny", "--serial", "none", "--balloon", "amount_mib=4096"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not fit a guest"), "{out:?}");
    let dir = std::env::temp_dir().join(format!("densevm-e2e-balloon-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let scenario = dir.join("s.json");
    std::fs::write(&scenario, r#"{"fill_mib": 1, "balloon_hold_ms": 10}"#).unwrap();
    let out = densevm(&["run", "--workload", scenario.to_str().unwrap(), "--serial", "none"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a VM with a balloon"), "{out:?}");
    std::fs::remove_dir_all(dir).unwrap();
}
