//! Rate-limited logging for what a guest can trigger.
//!
//! A guest controls how often its devices hit an error path (a bad MMIO
//! access, a malformed descriptor chain, vsock garbage). Each such path
//! logging at full rate would let one guest fill the host's log and disk,
//! so device code logs through [`guest_warn!`] and [`guest_error!`]: each
//! call site may log [`BURST`] messages per [`WINDOW_SECS`]-second window,
//! and the first message after a quiet spell says how many were dropped.

use std::{
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        OnceLock,
    },
    time::Instant,
};

/// Messages one call site may log per window.
pub const BURST: u32 = 10;
/// Length of a window, seconds.
pub const WINDOW_SECS: u64 = 5;

/// The budget of one call site (a `static` the macros declare).
#[derive(Debug, Default)]
pub struct RateLimit {
    window: AtomicU64,
    count: AtomicU32,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// A fresh budget.
    pub const fn new() -> Self {
        Self {
            window: AtomicU64::new(0),
            count: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether to log now: `Some(n)` with the number of messages dropped
    /// since the last one logged, or `None` to drop this one.
    pub fn check(&self) -> Option<u64> {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let secs = EPOCH.get_or_init(Instant::now).elapsed().as_secs();
        self.check_at(secs)
    }

    fn check_at(&self, secs: u64) -> Option<u64> {
        // Window numbers start at 1 so that a fresh budget (window 0) is
        // reset on first use.
        let window = secs / WINDOW_SECS + 1;
        if self.window.swap(window, Ordering::Relaxed) != window {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `tracing::warn!`, rate-limited per call site (see the module docs).
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::logger::RateLimit = $crate::logger::RateLimit::new();
        if let Some(dropped) = LIMIT.check() {
            if dropped > 0 {
                tracing::warn!(dropped, "rate limit: earlier messages from here were dropped");
            }
            tracing::warn!($($arg)+);
        }
    }};
}

/// `tracing::error!`, rate-limited per call site (see the module docs).
macro_rules! guest_error {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::logger::RateLimit = $crate::logger::RateLimit::new();
        if let Some(dropped) = LIMIT.check() {
            if dropped > 0 {
                tracing::error!(dropped, "rate limit: earlier messages from here were dropped");
            }
            tracing::error!($($arg)+);
        }
    }};
}

pub(crate) use guest_error;
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_the_count_of_dropped_ones() {
        let l = RateLimit::new();
        for _ in 0..BURST {
            assert_eq!(l.check_at(0), Some(0));
        }
        assert_eq!(l.check_at(1), None);
        assert_eq!(l.check_at(WINDOW_SECS - 1), None);
        // A new window: logging resumes and reports the two dropped.
        assert_eq!(l.check_at(WINDOW_SECS), Some(2));
        assert_eq!(l.check_at(WINDOW_SECS), Some(0));
    }

    #[test]
    fn the_macros_log_within_the_budget() {
        for i in 0..3 * BURST {
            guest_warn!(i, "test warning");
            guest_error!(i, "test error");
        }
    }
}
