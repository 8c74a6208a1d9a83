//! Rate-limited logging for what a guest can trigger.
//!
//! A guest controls how often its devices hit an error path (a bad MMIO
//! access, a malformed descriptor chain, vsock garbage). Each such path
//! logging at full rate would let one guest fill the host's log and disk,
//! so device code logs through [`guest_debug!`], [`guest_warn!`] and
//! [`guest_error!`] (a test below reads the sources under `devices/` and
//! refuses the plain `tracing` macros there): each
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

/// A `tracing` event at `$level`, rate-limited per call site: each
/// expansion declares its own budget.
macro_rules! guest_event {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::logger::RateLimit = $crate::logger::RateLimit::new();
        if let Some(dropped) = LIMIT.check() {
            if dropped > 0 {
                tracing::event!($level, dropped, "rate limit: earlier messages from here were dropped");
            }
            tracing::event!($level, $($arg)+);
        }
    }};
}

/// `tracing::warn!`, rate-limited per call site (see the module docs).
macro_rules! guest_warn {
    ($($arg:tt)+) => {
        $crate::logger::guest_event!(tracing::Level::WARN, $($arg)+)
    };
}

/// `tracing::debug!`, rate-limited per call site (see the module docs):
/// a guest must not flood a log kept at debug level either.
macro_rules! guest_debug {
    ($($arg:tt)+) => {
        $crate::logger::guest_event!(tracing::Level::DEBUG, $($arg)+)
    };
}

/// `tracing::error!`, rate-limited per call site (see the module docs).
macro_rules! guest_error {
    ($($arg:tt)+) => {
        $crate::logger::guest_event!(tracing::Level::ERROR, $($arg)+)
    };
}

pub(crate) use guest_debug;
pub(crate) use guest_error;
pub(crate) use guest_event;
pub(crate) use guest_warn;

/// A tracing subscriber that counts the events it sees: tests show that
/// what a guest provokes leaves a bounded number of log lines.
#[cfg(test)]
pub(crate) struct EventCounter(pub std::sync::Arc<AtomicU64>);

#[cfg(test)]
impl tracing::Subscriber for EventCounter {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Device code may name `tracing` only for levels and test
    /// subscribers: every log line it writes goes through the macros above.
    #[test]
    fn device_code_logs_only_rate_limited() {
        fn walk(dir: &std::path::Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).expect("read");
                    for (n, line) in text.lines().enumerate() {
                        let mut rest = line;
                        while let Some(i) = rest.find("tracing::") {
                            rest = &rest[i + "tracing::".len()..];
                            if !(rest.starts_with("Level") || rest.starts_with("subscriber")) {
                                out.push(format!("{}:{}: {}", p.display(), n + 1, line.trim()));
                            }
                        }
                    }
                }
            }
        }
        let mut found = Vec::new();
        walk(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/devices"),
            &mut found,
        );
        assert!(
            found.is_empty(),
            "plain tracing in device code:\n{}",
            found.join("\n")
        );
    }

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
        let seen = std::sync::Arc::new(AtomicU64::new(0));
        let calls = 3 * u64::from(BURST);
        tracing::subscriber::with_default(EventCounter(seen.clone()), || {
            for i in 0..calls {
                guest_warn!(i, "test warning");
                guest_error!(i, "test error");
            }
        });
        // Two call sites, each at most BURST messages per window; the loop
        // may straddle one window boundary (a second burst plus the
        // "dropped" line), never more.
        let seen = seen.load(Ordering::Relaxed);
        let most = 2 * (2 * u64::from(BURST) + 1);
        assert!(
            (2 * u64::from(BURST)..=most).contains(&seen),
            "{seen} events for {} calls",
            2 * calls
        );
    }
}
