//! The balloon's queue handlers: page frame numbers (inflate, deflate),
//! statistics and free page reports.

use std::time::{Instant, SystemTime};

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::pages::{coalesce, merge, Range, PAGE_SHIFT, PAGE_SIZE};
use super::stats::{BalloonStats, ENTRY_SIZE};
use super::{Balloon, Role};
use crate::virtio::chain::{self, Error as ChainError};
use crate::virtio::{Error as VirtioError, QueueCtx};

/// Size of a PFN entry in inflate and deflate buffers.
const PFN_SIZE: u32 = 4;
/// PFN buffers are read in pieces of this size.
const READ_CHUNK: usize = 4096;
/// Largest statistics buffer accepted (the spec defines 16 tags: 160 bytes).
const MAX_STATS_LEN: u32 = 4096;

/// Which way pages move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Direction {
    Inflate,
    Deflate,
}

impl Balloon {
    /// Serves the inflate or deflate queue: every chain's PFNs, coalesced into
    /// ranges, go to the backend in one call; every chain goes back to the driver.
    pub(super) fn process_pfns(
        &mut self,
        queue: usize,
        ctx: &mut QueueCtx<'_>,
        dir: Direction,
    ) -> Result<(), VirtioError> {
        let mem = ctx.mem();
        let mut heads = Vec::new();
        let mut pfns = Vec::new();
        while let Some(c) = ctx.pop(queue)? {
            heads.push(c.head_index());
            let descs = match chain::collect(c).and_then(|d| chain::check_readable(&d, PFN_SIZE).map(|()| d)) {
                Ok(d) => d,
                Err(e) => {
                    self.bad_chain(queue, &e);
                    continue;
                }
            };
            for d in &descs {
                if let Err(e) = self.read_pfns(mem, d, dir, &mut pfns) {
                    self.bad_chain(queue, &e);
                }
            }
        }
        if !pfns.is_empty() {
            let n = pfns.len() as u64;
            let ranges = coalesce(&mut pfns);
            let result = match dir {
                Direction::Inflate => {
                    self.counters.inflated_pages += n;
                    self.backend.discard(&ranges)
                }
                Direction::Deflate => {
                    self.counters.deflated_pages += n;
                    let below = u64::from(self.config.target_pages).saturating_sub(self.inflated.len()).min(n);
                    if below > 0 {
                        self.counters.deflated_below_target_pages += below;
                        if self.log.allow() {
                            tracing::info!("virtio-balloon: the driver deflated {below} pages below the target");
                        }
                    }
                    self.backend.reclaim(&ranges)
                }
            };
            self.backend_result(result, &ranges);
        }
        self.return_all(queue, ctx, &heads)
    }

    fn read_pfns(
        &mut self,
        mem: &GuestMemoryMmap,
        d: &Descriptor,
        dir: Direction,
        out: &mut Vec<u64>,
    ) -> Result<(), ChainError> {
        let mut buf = [0u8; READ_CHUNK];
        let len = d.len() as usize;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(READ_CHUNK);
            let addr = d.addr().checked_add(done as u64);
            let read = addr.and_then(|a| mem.read_slice(&mut buf[..n], a).ok());
            if read.is_none() {
                return Err(ChainError::OutsideMemory { addr: d.addr().0, len: d.len() });
            }
            for e in buf[..n].chunks_exact(PFN_SIZE as usize) {
                let pfn = u64::from(u32::from_le_bytes([e[0], e[1], e[2], e[3]]));
                self.take_pfn(mem, pfn, dir, out);
            }
            done += n;
        }
        Ok(())
    }

    fn take_pfn(&mut self, mem: &GuestMemoryMmap, pfn: u64, dir: Direction, out: &mut Vec<u64>) {
        if !GuestMemoryBackend::check_range(mem, GuestAddress(pfn << PAGE_SHIFT), PAGE_SIZE as usize) {
            self.counters.bad_pfns += 1;
            return self.refuse(format_args!("PFN {pfn:#x} lies outside guest memory"));
        }
        let taken = match dir {
            Direction::Inflate => self.inflated.insert(pfn),
            Direction::Deflate => self.inflated.remove(pfn),
        };
        if taken {
            out.push(pfn);
        } else if dir == Direction::Inflate {
            self.counters.repeated_pfns += 1;
            self.refuse(format_args!("PFN {pfn:#x} inflated while already in the balloon"));
        } else {
            self.counters.not_inflated_pfns += 1;
            self.refuse(format_args!("PFN {pfn:#x} deflated while not in the balloon"));
        }
    }

    /// Serves the stats queue: records the statistics of each buffer and keeps
    /// the buffer until the next request ([`Balloon::release_stats`]).
    pub(super) fn process_stats(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) -> Result<(), VirtioError> {
        let mem = ctx.mem();
        while let Some(c) = ctx.pop(queue)? {
            let head = c.head_index();
            let buf = chain::collect(c).and_then(|descs| read_stats(mem, &descs));
            let buf = match buf {
                Ok(b) => b,
                Err(e) => {
                    self.bad_chain(queue, &e);
                    self.return_all(queue, ctx, &[head])?;
                    continue;
                }
            };
            let (stats, unknown) = BalloonStats::parse(&buf, SystemTime::now());
            self.stats = stats;
            self.counters.stats_updates += 1;
            self.counters.unknown_stat_tags += unknown;
            if unknown > 0 {
                self.refuse(format_args!("{unknown} statistics with unknown tags"));
            }
            if let Some(old) = self.stats_head.replace(head) {
                self.counters.stats_protocol_errors += 1;
                self.refuse(format_args!("a second statistics buffer while one is held"));
                self.return_all(queue, ctx, &[old])?;
            }
        }
        Ok(())
    }

    /// Returns the held statistics buffer, asking the driver for new statistics.
    pub(super) fn release_stats(&mut self, ctx: &mut QueueCtx<'_>, now: Instant) -> Result<bool, VirtioError> {
        let queue = self.roles.iter().position(|r| *r == Role::Stats);
        let (Some(queue), Some(head)) = (queue, self.stats_head) else {
            return Ok(false);
        };
        self.stats_head = None;
        self.stats_requested_at = Some(now);
        self.return_all(queue, ctx, &[head])?;
        Ok(true)
    }

    /// Serves the free page reporting queue: every buffer is a free range; the
    /// ranges go to the backend in one call, then the buffers back to the driver.
    pub(super) fn process_reports(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) -> Result<(), VirtioError> {
        let mut heads = Vec::new();
        let mut ranges: Vec<Range> = Vec::new();
        while let Some(c) = ctx.pop(queue)? {
            heads.push(c.head_index());
            let descs = match chain::collect(c).and_then(|d| check_reported(&d).map(|()| d)) {
                Ok(d) => d,
                Err(e) => {
                    self.bad_chain(queue, &e);
                    continue;
                }
            };
            ranges.extend(descs.iter().map(|d| (d.addr(), u64::from(d.len()))));
        }
        if !ranges.is_empty() {
            merge(&mut ranges);
            self.counters.reported_pages += ranges.iter().map(|r| r.1 / PAGE_SIZE).sum::<u64>();
            let result = self.backend.report(&ranges);
            self.backend_result(result, &ranges);
        }
        self.return_all(queue, ctx, &heads)
    }

    fn return_all(&mut self, queue: usize, ctx: &mut QueueCtx<'_>, heads: &[u16]) -> Result<(), VirtioError> {
        for &h in heads {
            ctx.add_used(queue, h, 0)?;
        }
        if !heads.is_empty() {
            ctx.signal_used();
        }
        Ok(())
    }

    fn bad_chain(&mut self, queue: usize, e: &ChainError) {
        self.counters.bad_descriptors += 1;
        self.refuse(format_args!("queue {queue}: {e}"));
    }

    fn backend_result(&mut self, result: Result<(), super::BackendError>, ranges: &[Range]) {
        if let Err(e) = result {
            self.counters.backend_errors += 1;
            if self.log.allow() {
                tracing::warn!(ranges = ranges.len(), "virtio-balloon: {e}");
            }
        }
    }
}

/// The bytes of a statistics chain: device-readable, whole entries, not too long.
fn read_stats(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Result<Vec<u8>, ChainError> {
    chain::check_readable(descs, ENTRY_SIZE as u32)?;
    let mut buf = Vec::new();
    for d in descs {
        if buf.len() + d.len() as usize > MAX_STATS_LEN as usize {
            return Err(ChainError::BadLength { addr: d.addr().0, len: d.len() });
        }
        let start = buf.len();
        buf.resize(start + d.len() as usize, 0);
        mem.read_slice(&mut buf[start..], d.addr())
            .map_err(|_| ChainError::OutsideMemory { addr: d.addr().0, len: d.len() })?;
    }
    Ok(buf)
}

/// Reported ranges must be whole, non-empty 4 KiB pages.
fn check_reported(descs: &[Descriptor]) -> Result<(), ChainError> {
    for d in descs {
        let len = u64::from(d.len());
        if len == 0 || len % PAGE_SIZE != 0 || d.addr().0 % PAGE_SIZE != 0 {
            return Err(ChainError::BadLength { addr: d.addr().0, len: d.len() });
        }
    }
    Ok(())
}
