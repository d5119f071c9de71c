//! Builds the embedded workload guest (resources/workload) into a flat binary with gcc.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
        .join("../resources/workload");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("workload.bin");
    for f in ["guest.c", "start.S", "abi.h", "guest.ld"] {
        println!("cargo:rerun-if-changed={}", src.join(f).display());
    }
    let cc = env::var("DENSEVM_GUEST_CC").unwrap_or_else(|_| "gcc".to_string());
    let status = Command::new(&cc)
        .current_dir(&src)
        .args([
            "-O2",
            "-ffreestanding",
            "-fno-pic",
            "-fno-pie",
            "-no-pie",
            "-nostdlib",
            "-static",
            "-mgeneral-regs-only",
            "-mno-red-zone",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wl,-T,guest.ld",
            "-Wl,--build-id=none",
            "-Wl,--oformat=binary",
            "-o",
        ])
        .arg(&out)
        .args(["start.S", "guest.c"])
        .status()
        .unwrap_or_else(|e| panic!("cannot run `{cc}` to build the workload guest: {e}"));
    assert!(status.success(), "building the workload guest with {cc} failed");
}
