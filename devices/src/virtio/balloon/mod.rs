//! The virtio-balloon device (device ID 5).
//!
//! Queues, in the order the driver numbers them: inflate (0) and deflate (1),
//! each taking device-readable buffers of little-endian `u32` page frame numbers
//! of 4 KiB pages; then the stats queue if `VIRTIO_BALLOON_F_STATS_VQ` was
//! accepted; then the free page reporting queue if
//! `VIRTIO_BALLOON_F_FREE_PAGE_REPORTING` was (absent queues take no index, as
//! in Linux's virtio-mmio). Configuration space: `num_pages` (the target, set by
//! the VMM) and `actual` (written by the driver).
//!
//! Inflated and reported pages go to the [`BalloonBackend`] coalesced into
//! ranges, one call per notification; deflated pages likewise. The device keeps
//! the set of pages in the balloon, so a page inflated twice or deflated without
//! having been inflated is counted and not passed on. Bad buffers (see
//! [`BalloonCounters`]) are refused: returned to the driver unprocessed, counted
//! and logged at a limited rate.
//!
//! The seams for the VMM: [`Balloon::new`] with its [`BalloonConfig`] and
//! backend, [`MmioTransport::set_balloon_target`] (raises the config-change
//! interrupt), [`MmioTransport::poll_balloon_stats`] on a timer, and
//! [`Balloon::counters`] / [`Balloon::latest_stats`] for the API.

pub mod backend;
pub mod pages;
mod queues;
pub mod stats;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

pub use backend::{BackendError, BalloonBackend};
pub use stats::BalloonStats;

use super::ratelimit::LogLimiter;
use super::{Error as VirtioError, MmioTransport, QueueCtx, VirtioDevice, VIRTIO_F_VERSION_1};
use pages::{PageSet, PAGE_SHIFT};
use queues::Direction;

/// Feature bit: the device has a stats queue.
pub const VIRTIO_BALLOON_F_STATS_VQ: u64 = 1 << 1;
/// Feature bit: the guest deflates the balloon when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// Feature bit: the device has a free page reporting queue.
pub const VIRTIO_BALLOON_F_FREE_PAGE_REPORTING: u64 = 1 << 5;
/// Size of every balloon queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of the configuration space (`num_pages`, `actual`).
pub const CONFIG_SIZE: u64 = 8;

/// The balloon's settings, as the VMM's API gives them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Initial target size in 4 KiB pages.
    pub target_pages: u32,
    /// Offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests; 0 offers no stats queue.
    pub stats_polling_interval_s: u16,
    /// Offer `VIRTIO_BALLOON_F_FREE_PAGE_REPORTING`.
    pub free_page_reporting: bool,
}

/// Errors of the VMM's requests to the balloon.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The balloon was created without statistics (a polling interval of 0).
    #[error("statistics are not enabled on this balloon (it was created with a polling interval of 0)")]
    StatsDisabled,
    /// Statistics cannot be turned off on a balloon created with them.
    #[error("the statistics polling interval of a balloon created with statistics cannot be 0")]
    StatsIntervalZero,
}

/// What the balloon did, and what it refused, since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonCounters {
    /// Pages inflated (given to the backend).
    pub inflated_pages: u64,
    /// Pages deflated (taken back from the backend).
    pub deflated_pages: u64,
    /// Of those, pages the driver deflated below the target (`num_pages`) on its
    /// own, as Linux does on OOM with `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`
    /// (accepted).
    pub deflated_below_target_pages: u64,
    /// Pages reported free (given to the backend).
    pub reported_pages: u64,
    /// Chains refused: broken chains, buffers outside guest memory, write-only
    /// buffers where the device reads, wrong lengths, misaligned reported ranges.
    pub bad_descriptors: u64,
    /// Page frame numbers outside guest memory (skipped).
    pub bad_pfns: u64,
    /// Pages inflated while already in the balloon (skipped).
    pub repeated_pfns: u64,
    /// Pages deflated that were not in the balloon (skipped).
    pub not_inflated_pfns: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
    /// Statistics entries with a tag the spec does not define (ignored).
    pub unknown_stat_tags: u64,
    /// A statistics buffer arrived while the device held one (the held one was
    /// returned).
    pub stats_protocol_errors: u64,
    /// Backend calls that failed.
    pub backend_errors: u64,
    /// Driver writes to read-only configuration fields (ignored).
    pub config_write_refused: u64,
}

/// What each queue index carries once the driver's features are known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// The virtio-balloon device model.
pub struct Balloon {
    config: BalloonConfig,
    avail_features: u64,
    queue_sizes: Vec<u16>,
    roles: Vec<Role>,
    actual_pages: u32,
    backend: Box<dyn BalloonBackend>,
    inflated: PageSet,
    counters: BalloonCounters,
    stats: BalloonStats,
    /// The stats buffer the device holds until the next request.
    stats_head: Option<u16>,
    stats_requested_at: Option<Instant>,
    log: LogLimiter,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("config", &self.config)
            .field("actual_pages", &self.actual_pages)
            .field("counters", &self.counters)
            .finish()
    }
}

impl Balloon {
    /// A balloon with `config`, its pages going to `backend`.
    pub fn new(config: BalloonConfig, backend: Box<dyn BalloonBackend>) -> Self {
        let mut avail_features = VIRTIO_F_VERSION_1;
        let mut roles = vec![Role::Inflate, Role::Deflate];
        if config.deflate_on_oom {
            avail_features |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if config.stats_polling_interval_s > 0 {
            avail_features |= VIRTIO_BALLOON_F_STATS_VQ;
            roles.push(Role::Stats);
        }
        if config.free_page_reporting {
            avail_features |= VIRTIO_BALLOON_F_FREE_PAGE_REPORTING;
            roles.push(Role::Reporting);
        }
        Balloon {
            config,
            avail_features,
            queue_sizes: vec![QUEUE_SIZE; roles.len()],
            roles,
            actual_pages: 0,
            backend,
            inflated: PageSet::default(),
            counters: BalloonCounters::default(),
            stats: BalloonStats::default(),
            stats_head: None,
            stats_requested_at: None,
            log: LogLimiter::new(),
        }
    }

    /// The settings (with the current target).
    pub fn config(&self) -> BalloonConfig {
        self.config
    }

    /// The target size in pages (`num_pages`).
    pub fn target_pages(&self) -> u32 {
        self.config.target_pages
    }

    /// The size the driver reports (`actual`), in pages.
    pub fn actual_pages(&self) -> u32 {
        self.actual_pages
    }

    /// The counters.
    pub fn counters(&self) -> BalloonCounters {
        self.counters
    }

    /// The latest statistics (all `None` before the first buffer).
    pub fn latest_stats(&self) -> &BalloonStats {
        &self.stats
    }

    /// The statistics polling interval, if statistics are enabled.
    pub fn stats_polling_interval(&self) -> Option<Duration> {
        let s = self.config.stats_polling_interval_s;
        (s > 0).then(|| Duration::from_secs(u64::from(s)))
    }

    /// Changes the polling interval of a balloon created with statistics.
    pub fn set_stats_polling_interval(&mut self, seconds: u16) -> Result<(), Error> {
        match (self.config.stats_polling_interval_s, seconds) {
            (0, _) => Err(Error::StatsDisabled),
            (_, 0) => Err(Error::StatsIntervalZero),
            _ => {
                self.config.stats_polling_interval_s = seconds;
                Ok(())
            }
        }
    }

    /// Sets the target (`num_pages`); true when it changed. Use
    /// [`MmioTransport::set_balloon_target`] to also tell the driver.
    pub fn set_target_pages(&mut self, pages: u32) -> bool {
        let changed = self.config.target_pages != pages;
        self.config.target_pages = pages;
        changed
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE as usize] {
        let mut b = [0u8; CONFIG_SIZE as usize];
        b[..4].copy_from_slice(&self.config.target_pages.to_le_bytes());
        b[4..].copy_from_slice(&self.actual_pages.to_le_bytes());
        b
    }

    fn refuse(&mut self, what: std::fmt::Arguments<'_>) {
        if self.log.allow() {
            tracing::warn!("virtio-balloon: refused: {what}");
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.config_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = offset.checked_add(i as u64).and_then(|o| bytes.get(usize::try_from(o).ok()?)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        let end = offset.checked_add(data.len() as u64);
        if offset < 4 || end.is_none_or(|e| e > CONFIG_SIZE) {
            self.counters.config_write_refused += 1;
            return self.refuse(format_args!("config write of {} bytes at {offset:#x}", data.len()));
        }
        let mut actual = self.actual_pages.to_le_bytes();
        let start = (offset - 4) as usize;
        actual[start..start + data.len()].copy_from_slice(data);
        self.actual_pages = u32::from_le_bytes(actual);
    }

    fn activate(&mut self, acked_features: u64, mem: &GuestMemoryMmap) -> Result<(), VirtioError> {
        let mut roles = vec![Role::Inflate, Role::Deflate];
        if acked_features & VIRTIO_BALLOON_F_STATS_VQ != 0 {
            roles.push(Role::Stats);
        }
        if acked_features & VIRTIO_BALLOON_F_FREE_PAGE_REPORTING != 0 {
            roles.push(Role::Reporting);
        }
        self.roles = roles;
        self.inflated = PageSet::new((mem.last_addr().0 >> PAGE_SHIFT) + 1);
        self.stats_head = None;
        self.stats_requested_at = Some(Instant::now());
        Ok(())
    }

    fn process_queue(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) -> Result<(), VirtioError> {
        match self.roles.get(queue) {
            Some(Role::Inflate) => self.process_pfns(queue, ctx, Direction::Inflate),
            Some(Role::Deflate) => self.process_pfns(queue, ctx, Direction::Deflate),
            Some(Role::Stats) => self.process_stats(queue, ctx),
            Some(Role::Reporting) => self.process_reports(queue, ctx),
            // A queue the driver's features did not enable: it has no meaning.
            None => Ok(()),
        }
    }

    fn reset(&mut self) {
        self.actual_pages = 0;
        self.inflated.clear();
        self.stats_head = None;
        self.stats_requested_at = None;
    }
}

impl MmioTransport<Balloon> {
    /// Sets the balloon's target and, when it changed, tells the driver (config
    /// generation and configuration-change interrupt).
    pub fn set_balloon_target(&mut self, pages: u32) {
        if self.device_mut().set_target_pages(pages) {
            self.config_changed();
        }
    }

    /// Asks the driver for fresh statistics now by returning the buffer it left
    /// with the device; false when no buffer is held (or the device is not live).
    pub fn request_balloon_stats(&mut self, now: Instant) -> bool {
        self.with_queues(|dev, ctx| dev.release_stats(ctx, now)).unwrap_or(false)
    }

    /// Calls [`MmioTransport::request_balloon_stats`] when the polling interval
    /// has elapsed since the last request; the VMM calls it from a timer.
    pub fn poll_balloon_stats(&mut self, now: Instant) -> bool {
        let dev = self.device();
        let due = match (dev.stats_polling_interval(), dev.stats_requested_at) {
            (Some(every), Some(last)) => now.saturating_duration_since(last) >= every,
            _ => false,
        };
        due && self.request_balloon_stats(now)
    }
}
