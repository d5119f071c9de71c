//! Logging of the real `densevm` binary: `--log-level`, the `DENSEVM_LOG` filter
//! (which wins over the flag), clear exit-2 errors for bad values, and JSON log lines
//! from `serve --log-format json`.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{kvm_available, Daemon};
use e2e::{densevm_bin, last_json_line};
use serde_json::Value;

/// The debug line `densevm` logs at start-up (target `densevm`); needs no KVM.
const STARTUP: &str = "densevm starting";
/// The debug line of the vmm library's ring-0 probe (run by `host-info`; needs KVM).
const PROBE: &str = "ring-0 probe:";

/// Runs `densevm host-info --json <args>` with `DENSEVM_LOG` set to `env` (or
/// removed), checks it succeeded with its JSON on stdout, and returns its stderr.
fn host_info(args: &[&str], env: Option<&str>) -> String {
    let mut cmd = Command::new(densevm_bin());
    cmd.args(["host-info", "--json"]).args(args);
    match env {
        Some(v) => cmd.env("DENSEVM_LOG", v),
        None => cmd.env_remove("DENSEVM_LOG"),
    };
    let out = cmd.output().expect("spawn densevm");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?} DENSEVM_LOG={env:?}: {}\n{stderr}", out.status);
    let info = last_json_line(&out.stdout).unwrap_or_else(|| panic!("no JSON on stdout: {stderr}"));
    assert!(info["version"].is_string(), "{info}");
    stderr
}

/// Runs `densevm <args>` with `DENSEVM_LOG` set to `env` (or removed).
fn densevm_with_env(args: &[&str], env: Option<&str>) -> Output {
    let mut cmd = Command::new(densevm_bin());
    cmd.args(args);
    match env {
        Some(v) => cmd.env("DENSEVM_LOG", v),
        None => cmd.env_remove("DENSEVM_LOG"),
    };
    cmd.output().expect("spawn densevm")
}

#[test]
fn log_level_debug_shows_what_the_default_hides() {
    let default = host_info(&[], None);
    assert!(!default.contains(STARTUP), "debug line shown by default:\n{default}");
    assert!(!default.contains(" DEBUG "), "debug lines shown by default:\n{default}");

    // The flag is global: accepted after the subcommand and before it.
    let debug = host_info(&["--log-level", "debug"], None);
    assert!(debug.contains(" DEBUG densevm: densevm starting"), "no debug line with --log-level debug:\n{debug}");
    let out = densevm_with_env(&["--log-level", "debug", "host-info", "--json"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains(STARTUP));

    let warn = host_info(&["--log-level", "warn"], None);
    assert!(!warn.contains(STARTUP), "debug line shown at warn:\n{warn}");
}

#[test]
fn library_debug_lines_reach_stderr() {
    if !kvm_available("library_debug_lines_reach_stderr") {
        return;
    }
    let default = host_info(&[], None);
    assert!(!default.contains(PROBE), "probe debug line shown by default:\n{default}");
    let debug = host_info(&["--log-level", "debug"], None);
    assert!(debug.contains("vmm::boot::ring0_probe") && debug.contains(PROBE), "no vmm debug line:\n{debug}");
    // A filter for one library crate only.
    let vmm_only = host_info(&[], Some("vmm=debug"));
    assert!(vmm_only.contains(PROBE), "DENSEVM_LOG=vmm=debug:\n{vmm_only}");
    assert!(!vmm_only.contains(STARTUP), "DENSEVM_LOG=vmm=debug let densevm's debug line through:\n{vmm_only}");
}

#[test]
fn densevm_log_works_and_wins_over_log_level() {
    // DENSEVM_LOG enables what --log-level hides...
    let more = host_info(&["--log-level", "error"], Some("densevm=debug"));
    assert!(more.contains(STARTUP), "DENSEVM_LOG=densevm=debug with --log-level error:\n{more}");
    // ...and hides what --log-level would show.
    let less = host_info(&["--log-level", "debug"], Some("densevm=info,warn"));
    assert!(!less.contains(STARTUP), "DENSEVM_LOG=densevm=info with --log-level debug:\n{less}");
    assert!(!less.contains(" DEBUG "), "{less}");
    // A blank value is the same as unset.
    let blank = host_info(&["--log-level", "debug"], Some(" "));
    assert!(blank.contains(STARTUP), "blank DENSEVM_LOG:\n{blank}");
}

#[test]
fn bad_log_settings_exit_2_with_a_clear_error() {
    let cases: [(&[&str], Option<&str>, &[&str]); 4] = [
        (&["host-info"], Some("memory=loud"), &["DENSEVM_LOG", "memory=loud", "not a valid log filter"]),
        (&["host-info"], Some("vmm=debug,=info="), &["DENSEVM_LOG", "not a valid log filter"]),
        (&["--log-level", "loud", "host-info"], None, &["invalid value 'loud'", "--log-level", "possible values"]),
        (&["host-info", "--log-format", "xml"], None, &["invalid value 'xml'", "--log-format", "possible values"]),
    ];
    for (args, env, expected) in cases {
        let out = densevm_with_env(args, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} DENSEVM_LOG={env:?}: {stderr}");
        for e in expected {
            assert!(stderr.contains(e), "{args:?} DENSEVM_LOG={env:?}: expected {e:?} in {stderr:?}");
        }
        assert!(!stderr.contains("panicked"), "{args:?} DENSEVM_LOG={env:?} panicked: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: the command ran: {}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn serve_writes_json_log_lines() {
    if !kvm_available("serve_writes_json_log_lines") {
        return;
    }
    let mut d = Daemon::start(&["--log-format", "json"]);
    // The daemon serves before it is stopped.
    assert_eq!(d.req("GET", "/vms/nosuchvm", None).status, 404);
    let status = d.terminate(Duration::from_secs(20));
    let log = d.log_text();
    assert_eq!(status.code(), Some(0), "exit status {status}:\n{log}");

    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\n{log}")))
        .collect();
    for l in &lines {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(l[key].is_string(), "{key} missing in {l}");
        }
    }
    let find = |target: &str, text: &str| {
        lines.iter().any(|l| l["target"] == target && l["message"].as_str().is_some_and(|m| m.contains(text)))
    };
    assert!(find("densevm::commands::serve", "API on"), "no start-up line:\n{log}");
    assert!(find("densevm::commands::serve", "termination signal"), "no termination line:\n{log}");
    assert!(find("api::server", "API listening on"), "no line of the api crate:\n{log}");
    assert!(lines.iter().all(|l| l["level"] != "DEBUG"), "debug lines at the default level:\n{log}");
}
