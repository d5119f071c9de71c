//! Command-line interface (clap).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::logging::{LogFormat, LogLevel};

/// densevm: a KVM microVM monitor that packs guest memory densely.
#[derive(Debug, Parser)]
#[command(name = "densevm", version, about, long_about = None)]
pub struct Cli {
    /// Logging options (accepted before or after the subcommand).
    #[command(flatten)]
    pub log: LogArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where log lines go and how many: global flags of every subcommand.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Most verbose log level shown on stderr for densevm's own crates (the
    /// DENSEVM_LOG environment variable, an EnvFilter directive string such as
    /// `memory=debug,info`, wins when set).
    #[arg(long, global = true, value_enum, ignore_case = true, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
    /// Format of the log lines on stderr: `human` lines or `json` (one object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one microVM until its guest finishes (or Ctrl-C).
    Run(RunArgs),
    /// Launch several workload microVMs with overlapping memory and show progress.
    Demo(DemoArgs),
    /// Print what this host's KVM can do (JSON with --json).
    HostInfo(HostInfoArgs),
    /// Benchmarks (launch latency).
    Bench(BenchArgs),
    /// Run the API daemon: microVMs are created and driven over HTTP (until SIGTERM).
    Serve(ServeArgs),
}

/// `densevm serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Unix socket of the HTTP API (created with mode 0600, removed on exit; refused if
    /// another process listens on it).
    #[arg(long)]
    pub api_sock: PathBuf,
    /// Also serve the API on this TCP address (e.g. 127.0.0.1:8080): loopback only unless
    /// --api-tcp-allow-remote; needs --api-token-file.
    #[arg(long)]
    pub api_tcp: Option<String>,
    /// File holding the bearer token every TCP request must send
    /// (`Authorization: Bearer TOKEN`): 16..=4096 visible ASCII characters; the file
    /// must not be accessible by other users (e.g. mode 0600).
    #[arg(long, requires = "api_tcp")]
    pub api_token_file: Option<PathBuf>,
    /// Allow --api-tcp to be a non-loopback address (the token is then sent over the
    /// network in clear text: put a TLS proxy in front).
    #[arg(long, requires = "api_tcp")]
    pub api_tcp_allow_remote: bool,
    /// A further name (with or without a port) TCP requests may give as `Host`, besides
    /// the bound address and `localhost`; repeatable.
    #[arg(long = "api-tcp-host", requires = "api_tcp")]
    pub api_tcp_hosts: Vec<String>,
    /// Most connections open at once on the Unix socket.
    #[arg(long, default_value_t = api::server::DEFAULT_MAX_CONNECTIONS_UNIX,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    pub api_max_connections_unix: usize,
    /// Most connections open at once on the TCP port (a limit of its own: TCP clients
    /// cannot lock the Unix socket out).
    #[arg(long, default_value_t = api::server::DEFAULT_MAX_CONNECTIONS_TCP,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    pub api_max_connections_tcp: usize,
    /// Host memory budget in MiB: VM creation is refused (409) when the guest
    /// memory of all VMs would exceed it (default: MemAvailable at start).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub host_budget_mib: Option<u64>,
    /// seccomp filter per thread kind: `enforce` refuses a syscall outside the
    /// thread's allow-list with EPERM, `log` lets it run and the kernel logs it,
    /// `off` installs none (README, "Security: seccomp filters per thread kind").
    #[arg(long, value_enum, default_value_t = crate::seccomp::Mode::Enforce)]
    pub seccomp: crate::seccomp::Mode,
    /// A directory kernels, initrds and other files named in requests may be read
    /// from (beneath it, symlinks resolved); repeatable. Paths elsewhere are refused
    /// (400). Default: anywhere except /proc, /dev and /sys, which are always refused.
    #[arg(long = "allowed-dir")]
    pub allowed_dirs: Vec<PathBuf>,
    /// Most VMs at once (1..=4096, the memory manager's guest-range table); creation
    /// beyond is refused (409). Default: 64 per host CPU, cut down to what the
    /// open-files limit holds.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=vmm::admission::MAX_VMS as u64))]
    pub max_vms: Option<usize>,
    /// Most vCPUs of all VMs at once; creation beyond is refused (409, or 400 for one
    /// VM asking for more). Default: 64 per host CPU, cut down to what the open-files
    /// limit holds.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_vcpus: Option<u64>,
    /// The daemon's oom_score_adj (-999..=1000; -1000, unkillable, is refused): below
    /// 0 the kernel's OOM killer prefers other processes, but may still end the daemon
    /// (and every VM in it) as a last resort.
    #[arg(long, default_value_t = crate::commands::daemon_limits::DEFAULT_OOM_SCORE_ADJ,
          allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-999..=1000))]
    pub oom_score_adj: i32,
}

/// `densevm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub vcpus: u32,
    /// Guest RAM in MiB (default: what the workload needs, or 256 for a kernel).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub mem_mib: Option<u64>,
    /// Workload guest scenario: a JSON/TOML file or a built-in name (tiny, quick, clone, busy).
    #[arg(long, conflicts_with = "kernel")]
    pub workload: Option<String>,
    /// Linux kernel image (bzImage or ELF vmlinux).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for the kernel.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, requires = "kernel")]
    pub cmdline: Option<String>,
    /// The kernel's System.map: an exit densevm cannot handle is reported with the
    /// kernel function at the guest's RIP.
    #[arg(long, requires = "kernel")]
    pub system_map: Option<PathBuf>,
    /// Serial console output: `stdout`, `none`, or a file path.
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// VM id.
    #[arg(long, default_value = "vm0")]
    pub id: String,
    /// Also write the final report (JSON) to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Merge identical pages of this VM (densevm's same-page merging, full speed).
    #[arg(long)]
    pub merge: bool,
    /// A virtio-balloon: `amount_mib=N[,deflate_on_oom=true][,stats_polling_interval_s=S][,free_page_reporting=true]`.
    #[arg(long, value_parser = parse_balloon)]
    pub balloon: Option<vmm::balloon::BalloonSpec>,
    /// seccomp filter per thread kind, as for `serve`.
    #[arg(long, value_enum, default_value_t = crate::seccomp::Mode::Enforce)]
    pub seccomp: crate::seccomp::Mode,
}

/// Parses `--balloon` (the message without the option's name, which clap adds).
fn parse_balloon(s: &str) -> Result<vmm::balloon::BalloonSpec, String> {
    vmm::balloon::BalloonSpec::parse(s).map_err(|e| match e {
        vmm::balloon::Error::Parse(m) => m,
        e => e.to_string(),
    })
}

/// `densevm demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of microVMs.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vms: u32,
    /// MiB each guest fills.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub fill_mib: u32,
    /// Seconds of the write loop.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration_s: u64,
    /// Page rewrites per second per VM.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub writes_per_s: u64,
    /// Run without same-page merging (to compare host memory).
    #[arg(long)]
    pub no_merge: bool,
}

/// `densevm host-info`.
#[derive(Debug, Args)]
pub struct HostInfoArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `densevm bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark.
    #[command(subcommand)]
    pub which: BenchKind,
}

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchKind {
    /// Launch latency: process start to first guest report, median of N launches.
    Launch {
        /// Number of launches.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
        launches: u32,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Merging real Linux guests (the small microVM kernel held at its /init marker):
    /// densevm's merger against the kernel's KSM, both at full speed, alternating.
    LinuxMerge {
        /// Directory with the small kernel's vmlinux (resources/linux/out-microvm).
        #[arg(long)]
        kernel_dir: PathBuf,
        /// The test initramfs (resources/linux/out/initramfs.cpio.gz).
        #[arg(long)]
        initrd: PathBuf,
        /// Guests per run.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(2..=16))]
        vms: u32,
        /// Guest RAM, MiB.
        #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(64..=2048))]
        mem_mib: u32,
        /// Repetitions (contenders alternate).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
        repeat: u32,
    },
    /// Latency of GET /memory on a real daemon while VMs run and merging scans.
    Api {
        /// Timed GET /memory requests per run.
        #[arg(long, default_value_t = 20000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        requests: u32,
        /// Concurrent clients loading /metrics and /vms in the loaded case (0: the
        /// idle case only).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=64))]
        load_clients: u32,
        /// Repetitions of every case, interleaved.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
        repeat: u32,
        /// Another densevm binary (e.g. an older build) whose daemon is measured the
        /// same way in the same run, interleaved, for ratios.
        #[arg(long)]
        baseline_exe: Option<PathBuf>,
        /// The scheduler slice the timed client asks for, in microseconds (Linux
        /// 6.12+, 100..=100000; default: the kernel's own slice).
        #[arg(long, value_parser = clap::value_parser!(u64).range(100..=100_000))]
        client_slice_us: Option<u64>,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Guest-observed write latency: private page, copy of a shared frame, reuse of
    /// a sole-mapped merged frame, and the kernel's KSM in the same run,
    /// interleaved, min / median / max.
    Cow {
        /// Smaller and shorter (for tests).
        #[arg(long)]
        quick: bool,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Repetitions of densevm's cases and the kernel's, interleaved (default 5; 1 with --quick).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
        repeat: Option<u32>,
    },
    /// Same-page merging: the same clone microVMs under densevm's merger, the
    /// kernel's KSM on anonymous RAM and no merging, in one run (time to merge,
    /// CPU, idle CPU, host memory).
    Merge {
        /// Fewer, smaller VMs and shorter windows (for tests).
        #[arg(long)]
        quick: bool,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Run only these policies (repeatable; default: all): none,
        /// densevm-full, densevm-full-nohold, densevm-default, ksm-full, ksm-default.
        #[arg(
            long = "policy",
            value_parser = ["none", "densevm-full", "densevm-full-nohold", "densevm-default", "ksm-full", "ksm-default"]
        )]
        policies: Vec<String>,
        /// Repetitions of every pair of contenders, interleaved (default 5; 1 with --quick).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
        repeat: Option<u32>,
        /// Two VMs holding these two guest RAM images (memory only, no vCPU;
        /// resources/images/build-ram-images.sh builds them): densevm-full vs ksm-full.
        #[arg(long, num_args = 2, value_names = ["A", "B"], conflicts_with = "image_clones")]
        image_pair: Option<Vec<PathBuf>>,
        /// --clones VMs holding this guest RAM image (memory only, no vCPU).
        #[arg(long, value_name = "A")]
        image_clones: Option<PathBuf>,
        /// Number of VMs of --image-clones.
        #[arg(long, default_value_t = 8, requires = "image_clones", value_parser = clap::value_parser!(u32).range(2..=64))]
        clones: u32,
    },
    /// Compaction: densevm's compactor (one full-rate pass and proactive
    /// compaction, guests running) against the kernel's compact_memory on the
    /// same amount of fragmented memory, interleaved, min / median / max.
    Compact {
        /// One repetition of smaller VMs (for tests).
        #[arg(long)]
        quick: bool,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Repetitions (default 5; 1 with --quick).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
        repeat: Option<u32>,
    },
}
