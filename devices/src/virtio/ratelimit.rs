//! Rate limiting of the logs a guest can provoke: a guest that floods a queue with
//! bad descriptors must not flood the host's log too. Every refusal is counted
//! regardless; only its log line is limited.

use std::time::{Duration, Instant};

/// Log lines allowed per window.
const BURST: u32 = 10;
/// Length of a window.
const WINDOW: Duration = Duration::from_secs(5);

/// Allows 10 log lines per 5 s window and counts the lines it suppressed.
#[derive(Debug)]
pub struct LogLimiter {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimiter {
    /// A limiter whose first window opens at its first line.
    pub const fn new() -> Self {
        LogLimiter { window_start: None, in_window: 0, suppressed: 0 }
    }

    /// True when a line may be logged now; false (and counted) when suppressed.
    pub fn allow(&mut self) -> bool {
        self.allow_at(Instant::now())
    }

    fn allow_at(&mut self, now: Instant) -> bool {
        let fresh = self.window_start.is_none_or(|s| now.saturating_duration_since(s) >= WINDOW);
        if fresh {
            if self.suppressed > 0 {
                tracing::warn!(suppressed = self.suppressed, "virtio: log lines suppressed by the rate limit");
                self.suppressed = 0;
            }
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < BURST {
            self.in_window += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_per_window() {
        let mut l = LogLimiter::new();
        let t0 = Instant::now();
        let allowed = (0..100).filter(|_| l.allow_at(t0)).count();
        assert_eq!(allowed, BURST as usize);
        assert_eq!(l.suppressed, 100 - u64::from(BURST));
        assert!(l.allow_at(t0 + WINDOW));
        assert_eq!(l.suppressed, 0);
    }
}
