//! End-to-end tests of densevm: they drive the real `densevm` binary. This library
//! holds what the test files share.

pub mod linux;

use std::path::PathBuf;
use std::process::{Command, Output};

/// Path of the `densevm` binary built by the same cargo invocation as the tests
/// (`target/<profile>/densevm`). Panics with a clear message when it is missing:
/// `cargo test --workspace` builds it, `cargo test -p e2e` alone does not.
pub fn densevm_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/densevm
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("test binary in target/<profile>/deps");
    let bin = profile_dir.join("densevm");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo test --workspace` does, or `cargo build -p densevm`)",
        bin.display()
    );
    bin
}

/// Runs `densevm` with `args` and returns its output.
pub fn densevm(args: &[&str]) -> Output {
    Command::new(densevm_bin()).args(args).output().expect("spawn densevm")
}

/// The last line of `stdout` that parses as a JSON object.
pub fn last_json_line(stdout: &[u8]) -> Option<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .rev()
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str(l).ok())
}

/// Prints `SKIPPED <test>: <why>` on the real stderr: not through `eprintln!`,
/// which the test harness captures (and hides) for passing tests.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "SKIPPED {test}: {why}");
    let _ = err.flush();
}

/// True when /dev/kvm can be opened; otherwise prints why the caller skips.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            skip(test, &format!("/dev/kvm cannot be opened: {e}"));
            false
        }
    }
}
