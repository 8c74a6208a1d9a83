//! Per-step timing of a container's life, on the husk side.
//!
//! Where a `ctr run` spends its seconds is the first question about husk's
//! speed, and the guest profile alone does not answer it: it shows what the
//! guest kernel did, not which step of the container's life waited on it.
//! So the shim logs one line per step with how long the step took, and the
//! benchmark (`husk-bench-run`) and the tests read those lines back from
//! containerd's log (the shim's log goes there) with [`parse`]. The line is
//! the contract between them: `husk step container=ID step=NAME ms=N`.

use std::time::Duration;

/// The message every step line carries.
pub const MESSAGE: &str = "husk step";

/// A step of a container's life, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The pod VM started (template restore or boot) and its agent answered.
    VmStart,
    /// The shared directory (virtio-fs) mounted in the guest.
    SharedMount,
    /// The container created in the guest (root file system bound, the
    /// runtime's create).
    Create,
    /// The container's process started.
    Start,
    /// From the start to the first byte of output on the host.
    FirstOutput,
    /// From the start to the exit known on the host (TaskExit).
    Exit,
    /// An exec's process started (`ctr task exec`, `kubectl exec`).
    ExecStart,
    /// From an exec's start to its exit known on the host.
    ExecExit,
    /// The container deleted in the guest.
    Delete,
    /// The pod VM shut down and its processes gone.
    VmGone,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 10] = [
        Step::VmStart,
        Step::SharedMount,
        Step::Create,
        Step::Start,
        Step::FirstOutput,
        Step::Exit,
        Step::ExecStart,
        Step::ExecExit,
        Step::Delete,
        Step::VmGone,
    ];

    /// The step's name in logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Step::VmStart => "vm_start",
            Step::SharedMount => "shared_mount",
            Step::Create => "create",
            Step::Start => "start",
            Step::FirstOutput => "first_output",
            Step::Exit => "exit",
            Step::ExecStart => "exec_start",
            Step::ExecExit => "exec_exit",
            Step::Delete => "delete",
            Step::VmGone => "vm_gone",
        }
    }
}

/// Logs that `step` of `container` (for VM steps: the pod's sandbox)
/// took `took`.
pub fn record(container: &str, step: Step, took: Duration) {
    tracing::info!(
        container = %container,
        step = step.name(),
        ms = took.as_millis(),
        "{MESSAGE}"
    );
}

/// One step line read back from a log.
#[derive(Debug, Clone, PartialEq)]
pub struct Timed {
    /// The container (or sandbox) the step was for.
    pub container: String,
    /// The step's name ([`Step::name`]).
    pub step: String,
    /// How long it took.
    pub seconds: f64,
}

/// The step lines in `log` (containerd's log, or the shim's own), in order.
/// Lines that are not step lines, or are cut short, are skipped.
pub fn parse(log: &str) -> Vec<Timed> {
    log.lines()
        .filter(|l| l.contains(MESSAGE))
        .filter_map(|l| {
            let field = |key: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                    .map(|v| v.trim_matches('"'))
            };
            Some(Timed {
                container: field("container")?.to_string(),
                step: field("step")?.to_string(),
                seconds: field("ms")?.parse::<u64>().ok()? as f64 / 1000.0,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_lines_parse_back() {
        // What tracing's fmt layer writes, as containerd passes it on.
        let log = "\
2026-12-04T22:00:00.1Z  INFO create_task: husk step container=c1 step=create ms=1234
2026-12-04T22:00:00.2Z  INFO something else container=c1 step=create ms=9
2026-12-04T22:00:00.3Z  INFO husk step container=c1 step=vm_gone ms=20
2026-12-04T22:00:00.4Z  INFO husk step container=c1 step=start
";
        assert_eq!(parse(log), create_then_gone());
    }

    /// What the logs of both tests hold: c1's create and VM-gone steps.
    fn create_then_gone() -> [Timed; 2] {
        let timed = |step: &str, seconds| Timed {
            container: "c1".into(),
            step: step.into(),
            seconds,
        };
        [timed("create", 1.234), timed("vm_gone", 0.02)]
    }

    /// A writer into a shared buffer, for a test subscriber.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn what_record_logs_parses_back() {
        // The shim's own log format (main.rs), not a hand-written line.
        let buf = Buffer::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_target(false)
            .with_writer(move || out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            record("c1", Step::Create, Duration::from_millis(1234));
            record("c1", Step::VmGone, Duration::from_millis(20));
        });
        let log = String::from_utf8(buf.0.lock().expect("buffer").clone()).expect("utf-8");
        assert_eq!(parse(&log), create_then_gone(), "{log}");
    }

    #[test]
    fn names_are_distinct() {
        let mut names: Vec<_> = Step::ALL.iter().map(|s| s.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Step::ALL.len());
    }
}
