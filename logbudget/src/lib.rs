//! A byte budget for a host process's log.
//!
//! `husk-vmm` and `husk-virtiofsd` log to files on the host (`vmm.log`,
//! `virtiofsd.log` in the pod directory), and a guest can provoke some of
//! their lines. Rate limits keep the lines per second down, but a pod lives
//! for weeks: without a total bound a tenant that keeps provoking fills
//! the host's `/run`. So each process's log writer draws from a budget;
//! once it is spent, lines are dropped and counted, and the log says so
//! once, then again (with the count) when the process ends.

use std::{
    io::Write,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

/// Bytes held back from the budget for the two notices.
const NOTICE_ROOM: u64 = 256;

/// A log's byte budget, shared by the writers that draw from it.
#[derive(Debug)]
pub struct Budget {
    total: u64,
    left: AtomicU64,
    dropped_lines: AtomicU64,
    dropped_bytes: AtomicU64,
    announced: AtomicBool,
}

impl Budget {
    /// A budget of `bytes` in all (notices included).
    pub fn new(bytes: u64) -> Arc<Self> {
        Arc::new(Self {
            total: bytes,
            left: AtomicU64::new(bytes.saturating_sub(NOTICE_ROOM)),
            dropped_lines: AtomicU64::new(0),
            dropped_bytes: AtomicU64::new(0),
            announced: AtomicBool::new(false),
        })
    }

    /// A writer that sends what fits the budget to `out`.
    pub fn writer<W: Write>(self: &Arc<Self>, out: W) -> BudgetWriter<W> {
        BudgetWriter {
            budget: self.clone(),
            out,
        }
    }

    /// Lines and bytes dropped so far.
    pub fn dropped(&self) -> (u64, u64) {
        (
            self.dropped_lines.load(Ordering::Relaxed),
            self.dropped_bytes.load(Ordering::Relaxed),
        )
    }

    /// Takes `n` bytes from the budget, if they are left.
    fn take(&self, n: u64) -> bool {
        self.left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(n)
            })
            .is_ok()
    }

    /// Writes the closing notice to `out` if anything was dropped (from
    /// the room held back for it).
    pub fn report<W: Write>(&self, mut out: W) {
        let (lines, bytes) = self.dropped();
        if lines > 0 {
            let _ = writeln!(
                out,
                "log budget: {lines} lines ({bytes} bytes) dropped in all"
            );
        }
    }
}

/// A writer drawing from a [`Budget`]: each `write` is one whole line (as
/// a `tracing` formatter writes them) and is written or dropped whole.
#[derive(Debug)]
pub struct BudgetWriter<W> {
    budget: Arc<Budget>,
    out: W,
}

impl<W: Write> Write for BudgetWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        if self.budget.take(n) {
            self.out.write_all(buf)?;
        } else {
            self.budget.dropped_lines.fetch_add(1, Ordering::Relaxed);
            self.budget.dropped_bytes.fetch_add(n, Ordering::Relaxed);
            if !self.budget.announced.swap(true, Ordering::Relaxed) {
                let _ = writeln!(
                    self.out,
                    "log budget of {} bytes used up: further lines are dropped and counted",
                    self.budget.total
                );
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_stays_within_its_budget_and_counts_the_rest() {
        let budget = Budget::new(16 * 1024);
        let mut out = Vec::new();
        let line = [b'x'; 99]
            .iter()
            .copied()
            .chain([b'\n'])
            .collect::<Vec<u8>>();
        for _ in 0..10_000 {
            budget.writer(&mut out).write_all(&line).expect("write");
        }
        budget.report(&mut out);
        assert!(out.len() <= 16 * 1024, "{} bytes", out.len());
        let kept = (16 * 1024 - NOTICE_ROOM) / 100;
        assert_eq!(budget.dropped(), (10_000 - kept, (10_000 - kept) * 100));
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(text.matches("used up").count(), 1, "announced once");
        assert!(text.ends_with(&format!(
            "{} lines ({} bytes) dropped in all\n",
            10_000 - kept,
            (10_000 - kept) * 100
        )));
        // Whole lines only.
        assert!(text
            .lines()
            .all(|l| l.len() == 99 || l.starts_with("log budget")));
    }

    #[test]
    fn nothing_dropped_says_nothing() {
        let budget = Budget::new(1 << 20);
        let mut out = Vec::new();
        budget
            .writer(&mut out)
            .write_all(b"one line\n")
            .expect("write");
        budget.report(&mut out);
        assert_eq!(out, b"one line\n");
    }
}
