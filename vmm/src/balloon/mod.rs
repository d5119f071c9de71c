//! A VM's virtio-balloon as the VMM sees it: the spec a VM is created with
//! ([`BalloonSpec`], also the CLI's `--balloon`), the backend that turns
//! inflated and reported pages into host memory returned ([`MemoryBackend`],
//! over the memory manager's batched discard), and the handle the host drives
//! ([`BalloonDevice`]: target, statistics, counters). The device model and the
//! virtio-mmio transport live in `devices::virtio`; the placement on the MMIO
//! bus, the irqfd and the ioeventfds in [`crate::device_manager`]. The host
//! memory budget policy over every VM's balloon: [`policy`] (the decision) and
//! [`BalloonPolicy`] (its state, stepped by the daemon).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, UNIX_EPOCH};

use devices::virtio::balloon::{Balloon, BalloonConfig, BalloonCounters, BalloonStats};
use devices::virtio::MmioTransport;
use serde::{Deserialize, Serialize};

mod backend;
mod host;
pub mod policy;
mod policy_state;
#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod tests;

pub use backend::{BackendMemory, MemoryBackend};
pub use policy::{BalloonPolicyConfig, BalloonPolicyPatch, BalloonTargetChange, PolicyBand};
pub use policy_state::{BalloonPolicy, BalloonPolicyAction, BalloonPolicyStatus};

/// Balloon pages (4 KiB) in one MiB.
pub const PAGES_PER_MIB: u32 = 256;

/// Errors of balloon settings and requests.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `--balloon` option could not be parsed.
    #[error("--balloon: {0}")]
    Parse(String),
    /// The target is larger than the guest.
    #[error("balloon of {amount_mib} MiB does not fit a guest of {mem_mib} MiB")]
    TooLarge {
        /// Requested size.
        amount_mib: u32,
        /// The guest's RAM.
        mem_mib: u64,
    },
    /// The VM has no balloon.
    #[error("VM {0} has no balloon")]
    NoBalloon(String),
    /// The device refused the request.
    #[error(transparent)]
    Device(#[from] devices::virtio::balloon::Error),
}

/// A VM's balloon settings (shaped like Firecracker's balloon API).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BalloonSpec {
    /// Target size of the balloon in MiB (memory the guest gives back).
    pub amount_mib: u32,
    /// The guest may deflate the balloon when it runs out of memory.
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests; 0 disables statistics.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// The guest reports free pages, which are returned to the host.
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl BalloonSpec {
    /// Parses `amount_mib=N[,deflate_on_oom=BOOL][,stats_polling_interval_s=S][,free_page_reporting=BOOL]`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let mut spec = BalloonSpec::default();
        let mut amount = None;
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (key, value) =
                item.split_once('=').ok_or_else(|| Error::Parse(format!("`{item}` is not key=value")))?;
            let bad = |what: &str| Error::Parse(format!("{key}: `{value}` is not {what}"));
            let boolean = || match value {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(bad("true or false")),
            };
            match key {
                "amount_mib" => amount = Some(value.parse().map_err(|_| bad("a size in MiB (0..=4294967295)"))?),
                "deflate_on_oom" => spec.deflate_on_oom = boolean()?,
                "stats_polling_interval_s" => {
                    spec.stats_polling_interval_s = value.parse().map_err(|_| bad("a number of seconds (0..=65535)"))?
                }
                "free_page_reporting" => spec.free_page_reporting = boolean()?,
                _ => {
                    return Err(Error::Parse(format!(
                    "unknown key `{key}` (amount_mib, deflate_on_oom, stats_polling_interval_s, free_page_reporting)"
                )))
                }
            }
        }
        spec.amount_mib = amount.ok_or_else(|| Error::Parse("amount_mib=N is required".into()))?;
        Ok(spec)
    }

    /// Checks the spec against a guest of `mem_mib` MiB.
    pub fn validate(&self, mem_mib: u64) -> Result<(), Error> {
        if u64::from(self.amount_mib) > mem_mib {
            return Err(Error::TooLarge { amount_mib: self.amount_mib, mem_mib });
        }
        Ok(())
    }

    /// The device model's settings.
    pub fn device_config(&self) -> BalloonConfig {
        BalloonConfig {
            target_pages: mib_to_pages(self.amount_mib),
            deflate_on_oom: self.deflate_on_oom,
            stats_polling_interval_s: self.stats_polling_interval_s,
            free_page_reporting: self.free_page_reporting,
        }
    }
}

fn mib_to_pages(mib: u32) -> u32 {
    mib.saturating_mul(PAGES_PER_MIB)
}

/// Target and actual size of a balloon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BalloonInfo {
    /// The settings, with the current target.
    #[serde(flatten)]
    pub spec: BalloonSpec,
    /// The size the guest reports (`actual`), in MiB (rounded down).
    pub actual_mib: u32,
    /// The target in 4 KiB pages.
    pub target_pages: u32,
    /// The size the guest reports, in 4 KiB pages.
    pub actual_pages: u32,
}

/// The guest's latest memory statistics (the virtio spec's tags), with the
/// balloon's target and actual size.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BalloonStatistics {
    /// The target in pages.
    pub target_pages: u32,
    /// The guest's size in pages.
    pub actual_pages: u32,
    /// The target in MiB.
    pub target_mib: u32,
    /// The guest's size in MiB.
    pub actual_mib: u32,
    /// The guest's statistics (the spec's tags; absent when not sent).
    #[serde(flatten)]
    pub guest: BalloonStats,
    /// When the guest sent them, in seconds since the Unix epoch (None before
    /// the first statistics).
    pub updated_at_unix_s: Option<f64>,
}

impl BalloonStatistics {
    fn new(s: &BalloonStats, target_pages: u32, actual_pages: u32) -> Self {
        BalloonStatistics {
            target_pages,
            actual_pages,
            target_mib: target_pages / PAGES_PER_MIB,
            actual_mib: actual_pages / PAGES_PER_MIB,
            guest: s.clone(),
            updated_at_unix_s: s.updated_at.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs_f64()),
        }
    }
}

/// What a balloon did: the device's counters and the bytes returned to the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BalloonReport {
    /// Pages inflated.
    pub inflated_pages: u64,
    /// Pages deflated.
    pub deflated_pages: u64,
    /// Of those, pages the guest deflated below the target on its own (deflate
    /// on OOM; accepted).
    pub deflated_below_target_pages: u64,
    /// Pages reported free.
    pub reported_pages: u64,
    /// Bytes of host memory the discards returned (pages that had host memory).
    pub bytes_returned: u64,
    /// Chains refused.
    pub bad_descriptors: u64,
    /// PFNs outside guest memory.
    pub bad_pfns: u64,
    /// Pages inflated twice.
    pub repeated_pfns: u64,
    /// Pages deflated that were not inflated.
    pub not_inflated_pfns: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
    /// Backend calls that failed.
    pub backend_errors: u64,
}

impl BalloonReport {
    fn new(c: &BalloonCounters, bytes_returned: u64) -> Self {
        BalloonReport {
            inflated_pages: c.inflated_pages,
            deflated_pages: c.deflated_pages,
            deflated_below_target_pages: c.deflated_below_target_pages,
            reported_pages: c.reported_pages,
            bytes_returned,
            bad_descriptors: c.bad_descriptors,
            bad_pfns: c.bad_pfns,
            repeated_pfns: c.repeated_pfns,
            not_inflated_pfns: c.not_inflated_pfns,
            stats_updates: c.stats_updates,
            backend_errors: c.backend_errors,
        }
    }
}

/// The transport of a VM's balloon, shared by the MMIO bus, the ioeventfd
/// handlers and the host.
pub type SharedBalloon = Arc<Mutex<MmioTransport<Balloon>>>;

/// The host's handle on a VM's balloon.
#[derive(Clone)]
pub struct BalloonDevice {
    transport: SharedBalloon,
    returned: Arc<AtomicU64>,
    /// Guest-physical base of its MMIO window.
    pub mmio_base: u64,
    /// Its interrupt line (IOAPIC pin / GSI).
    pub gsi: u32,
}

impl std::fmt::Debug for BalloonDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalloonDevice").field("mmio_base", &self.mmio_base).field("gsi", &self.gsi).finish()
    }
}

impl BalloonDevice {
    /// A handle on `transport` at `mmio_base`, interrupt `gsi`, whose backend adds
    /// the bytes it returns to `returned`.
    pub fn new(transport: SharedBalloon, returned: Arc<AtomicU64>, mmio_base: u64, gsi: u32) -> Self {
        BalloonDevice { transport, returned, mmio_base, gsi }
    }

    /// The transport (locked).
    pub fn lock(&self) -> MutexGuard<'_, MmioTransport<Balloon>> {
        self.transport.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shared transport.
    pub fn transport(&self) -> &SharedBalloon {
        &self.transport
    }

    /// Sets the target to `amount_mib` and tells the driver.
    pub fn set_target_mib(&self, amount_mib: u32) {
        self.lock().set_balloon_target(mib_to_pages(amount_mib));
    }

    /// Settings, target and actual size.
    pub fn info(&self) -> BalloonInfo {
        let t = self.lock();
        let b = t.device();
        let cfg = b.config();
        let spec = BalloonSpec {
            amount_mib: cfg.target_pages / PAGES_PER_MIB,
            deflate_on_oom: cfg.deflate_on_oom,
            stats_polling_interval_s: cfg.stats_polling_interval_s,
            free_page_reporting: cfg.free_page_reporting,
        };
        let actual_pages = b.actual_pages();
        BalloonInfo { spec, actual_mib: actual_pages / PAGES_PER_MIB, target_pages: cfg.target_pages, actual_pages }
    }

    /// The guest's latest statistics.
    pub fn statistics(&self) -> BalloonStatistics {
        let t = self.lock();
        let b = t.device();
        BalloonStatistics::new(b.latest_stats(), b.target_pages(), b.actual_pages())
    }

    /// Changes the statistics polling interval (statistics must be enabled).
    pub fn set_stats_polling_interval(&self, seconds: u16) -> Result<(), Error> {
        Ok(self.lock().device_mut().set_stats_polling_interval(seconds)?)
    }

    /// The counters.
    pub fn report(&self) -> BalloonReport {
        let c = self.lock().device().counters();
        BalloonReport::new(&c, self.returned.load(Ordering::Relaxed))
    }

    /// Asks the driver for statistics if the polling interval elapsed.
    pub fn poll_stats(&self, now: Instant) -> bool {
        self.lock().poll_balloon_stats(now)
    }

    /// How often [`BalloonDevice::poll_stats`] should run (None: no statistics).
    pub fn poll_period(&self) -> Option<Duration> {
        self.lock().device().stats_polling_interval()
    }
}

#[cfg(test)]
mod spec_tests {
    use super::*;

    #[test]
    fn parses_the_cli_form() {
        let s = BalloonSpec::parse("amount_mib=64,deflate_on_oom=true,stats_polling_interval_s=2").unwrap();
        assert_eq!(
            s,
            BalloonSpec {
                amount_mib: 64,
                deflate_on_oom: true,
                stats_polling_interval_s: 2,
                free_page_reporting: false
            }
        );
        assert!(BalloonSpec::parse("amount_mib=0,free_page_reporting=true").unwrap().free_page_reporting);
        for bad in [
            "",
            "deflate_on_oom=true",
            "amount_mib=-1",
            "amount_mib=x",
            "amount_mib=1,deflate_on_oom=yes",
            "amount_mib=1,stats_polling_interval_s=70000",
            "amount_mib=1,colour=blue",
            "amount_mib",
        ] {
            let e = BalloonSpec::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("--balloon: "), "{bad}: {e}");
        }
        assert!(s.validate(64).is_ok());
        assert!(matches!(s.validate(63), Err(Error::TooLarge { .. })));
        assert_eq!(s.device_config().target_pages, 64 * 256);
    }

    #[test]
    fn spec_json_is_firecrackers() {
        let s: BalloonSpec = serde_json::from_str(r#"{"amount_mib": 8, "stats_polling_interval_s": 1}"#).unwrap();
        assert_eq!(s.amount_mib, 8);
        assert!(serde_json::from_str::<BalloonSpec>(r#"{"amount_mib": 8, "x": 1}"#).is_err());
    }
}
