//! The shim's record of its containers and their processes: lookup by
//! (container id, exec id) and the phase rules of containerd's Task API.
//!
//! Every RPC names a process as a container id plus an exec id (empty for
//! the container's init process); `Containers::process` is the one lookup,
//! with the one NOT_FOUND. Which request is allowed in which phase
//! (start once, delete only when not running, exec only into a running
//! container, signal a finished process only with `all`) is decided here,
//! in plain functions the unit tests drive, not inside the RPC handlers.
//!
//! A process's exit is a `watch` value: recorded once (`record_exit`), seen
//! by every Wait, including a Wait that begins after the exit.

use std::collections::HashMap;

use containerd_shim::{api, protos::protobuf::well_known_types::timestamp::Timestamp};
use tokio::sync::watch;

use crate::{error::TaskError, io::ProcessIo};

/// A process's life as containerd sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Created, not started.
    Created,
    /// Started and not known to have exited.
    Running,
    /// Frozen (containers only).
    Paused,
    /// Exited; the exit is recorded.
    Stopped,
}

impl Phase {
    /// containerd's name for the phase.
    pub fn status(self) -> api::Status {
        match self {
            Phase::Created => api::Status::CREATED,
            Phase::Running => api::Status::RUNNING,
            Phase::Paused => api::Status::PAUSED,
            Phase::Stopped => api::Status::STOPPED,
        }
    }
}

/// How and when a process ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Exited {
    /// Exit status (128 + signal when a signal ended it).
    pub code: u32,
    /// When the shim learnt of it.
    pub at: Timestamp,
}

/// A container's init process or one of its execs.
#[derive(Debug)]
pub struct Proc {
    /// Guest pid, once it exists.
    pub pid: u32,
    /// Where it is in its life.
    pub phase: Phase,
    /// containerd's stdin URI.
    pub stdin: String,
    /// containerd's stdout URI.
    pub stdout: String,
    /// containerd's stderr URI.
    pub stderr: String,
    /// Whether it has a terminal.
    pub terminal: bool,
    /// The relays of its stdio, until its output has drained.
    pub io: Option<ProcessIo>,
    exit_tx: watch::Sender<Option<Exited>>,
    /// An exec's OCI Process (JSON), until it starts.
    pub spec: Vec<u8>,
    /// When its start was answered (for the step timings).
    pub started: Option<std::time::Instant>,
}

impl Proc {
    /// A created process with containerd's stdio.
    pub fn new(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> Self {
        Self {
            pid: 0,
            phase: Phase::Created,
            stdin: stdin.into(),
            stdout: stdout.into(),
            stderr: stderr.into(),
            terminal,
            io: None,
            exit_tx: watch::channel(None).0,
            spec: Vec::new(),
            started: None,
        }
    }

    /// Its exit, once recorded.
    pub fn exited(&self) -> Option<Exited> {
        self.exit_tx.borrow().clone()
    }

    /// A receiver that sees the exit, whether it is recorded before or
    /// after this call.
    pub fn subscribe(&self) -> watch::Receiver<Option<Exited>> {
        self.exit_tx.subscribe()
    }

    /// Marks the process exited with `exit`; false if it had already.
    fn stop(&mut self, exit: Exited) -> bool {
        if self.phase == Phase::Stopped {
            return false;
        }
        self.phase = Phase::Stopped;
        // send_replace, not send: send drops the value when no Wait is
        // listening at this moment (a detached task), and every later Wait
        // (containerd's forced delete waits first) then blocked forever.
        self.exit_tx.send_replace(Some(exit));
        true
    }

    /// Whether exec `exec_id` may start.
    pub fn check_start(&self, exec_id: &str) -> Result<(), TaskError> {
        if self.phase == Phase::Created {
            Ok(())
        } else {
            Err(TaskError::process_phase(exec_id, "was started"))
        }
    }

    /// Whether exec `exec_id` may be deleted.
    pub fn check_delete(&self, exec_id: &str) -> Result<(), TaskError> {
        if self.phase == Phase::Running {
            Err(TaskError::process_phase(exec_id, "is running"))
        } else {
            Ok(())
        }
    }

    /// Whether a signal may be sent: a finished process is NOT_FOUND
    /// (containerd's forced delete goes on on exactly that) unless the
    /// signal is for all of the container's processes.
    pub fn check_signal(&self, all: bool) -> Result<(), TaskError> {
        if self.phase == Phase::Stopped && !all {
            Err(TaskError::Finished)
        } else {
            Ok(())
        }
    }
}

/// One container: its init process and its execs.
#[derive(Debug)]
pub struct Container {
    /// The host bundle directory.
    pub bundle: String,
    /// The init process.
    pub init: Proc,
    /// Execs by id.
    pub execs: HashMap<String, Proc>,
    /// CRI's sandbox container: the pod VM, with no process in the guest.
    pub sandbox: bool,
    /// Watches of its volumes that the guest holds a copy of: held, never
    /// read, so that they end with the record.
    #[allow(dead_code)]
    pub watches: Vec<crate::volwatch::Watch>,
}

impl Container {
    /// A created container.
    pub fn new(bundle: &str, init: Proc, sandbox: bool) -> Self {
        Self {
            bundle: bundle.to_string(),
            init,
            execs: HashMap::new(),
            sandbox,
            watches: Vec::new(),
        }
    }

    /// Whether container `id` may start.
    pub fn check_start(&self, id: &str) -> Result<(), TaskError> {
        if self.init.phase == Phase::Created {
            Ok(())
        } else {
            Err(TaskError::container_phase(id, "was started"))
        }
    }

    /// Whether container `id` may be deleted: not while it runs.
    pub fn check_delete(&self, id: &str) -> Result<(), TaskError> {
        if matches!(self.init.phase, Phase::Running | Phase::Paused) {
            Err(TaskError::container_phase(id, "is running"))
        } else {
            Ok(())
        }
    }

    /// Whether exec `exec_id` may be added to container `id`.
    pub fn check_exec(&self, id: &str, exec_id: &str) -> Result<(), TaskError> {
        if self.sandbox {
            return Err(TaskError::SandboxRunsNothing(id.to_string()));
        }
        if self.execs.contains_key(exec_id) {
            return Err(TaskError::ProcessExists(exec_id.to_string()));
        }
        if self.init.phase != Phase::Running {
            return Err(TaskError::container_phase(id, "is not running"));
        }
        Ok(())
    }

    /// Whether container `id` may be paused (`true`) or resumed.
    pub fn check_pause(&self, id: &str, paused: bool) -> Result<(), TaskError> {
        let from = if paused {
            Phase::Running
        } else {
            Phase::Paused
        };
        if self.init.phase == from {
            Ok(())
        } else {
            Err(TaskError::container_phase(
                id,
                format!("is {:?}", self.init.phase),
            ))
        }
    }
}

/// The containers of one shim (one pod), by id.
#[derive(Debug, Default)]
pub struct Containers(HashMap<String, Container>);

impl Containers {
    /// Container `id`.
    pub fn get(&self, id: &str) -> Result<&Container, TaskError> {
        self.0
            .get(id)
            .ok_or_else(|| TaskError::NoContainer(id.to_string()))
    }

    /// Container `id`, to change.
    pub fn get_mut(&mut self, id: &str) -> Result<&mut Container, TaskError> {
        self.0
            .get_mut(id)
            .ok_or_else(|| TaskError::NoContainer(id.to_string()))
    }

    /// Process `exec_id` of container `id` (the init process for "").
    pub fn process(&self, id: &str, exec_id: &str) -> Result<&Proc, TaskError> {
        let c = self.get(id)?;
        if exec_id.is_empty() {
            Ok(&c.init)
        } else {
            c.execs
                .get(exec_id)
                .ok_or_else(|| TaskError::NoProcess(exec_id.to_string()))
        }
    }

    /// Process `exec_id` of container `id`, to change.
    pub fn process_mut(&mut self, id: &str, exec_id: &str) -> Result<&mut Proc, TaskError> {
        let c = self.get_mut(id)?;
        if exec_id.is_empty() {
            Ok(&mut c.init)
        } else {
            c.execs
                .get_mut(exec_id)
                .ok_or_else(|| TaskError::NoProcess(exec_id.to_string()))
        }
    }

    /// Fails with ALREADY_EXISTS if container `id` exists.
    pub fn check_new(&self, id: &str) -> Result<(), TaskError> {
        if self.0.contains_key(id) {
            Err(TaskError::ContainerExists(id.to_string()))
        } else {
            Ok(())
        }
    }

    /// Adds container `id`.
    pub fn insert(&mut self, id: &str, c: Container) -> Result<(), TaskError> {
        self.check_new(id)?;
        self.0.insert(id.to_string(), c);
        Ok(())
    }

    /// Forgets container `id`.
    pub fn remove(&mut self, id: &str) -> Option<Container> {
        self.0.remove(id)
    }

    /// Whether container `id` exists.
    pub fn contains(&self, id: &str) -> bool {
        self.0.contains_key(id)
    }

    /// Whether the shim has no containers left.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `id` is the pod's sandbox container.
    pub fn is_sandbox(&self, id: &str) -> bool {
        self.0.get(id).is_some_and(|c| c.sandbox)
    }

    /// Records that process `exec_id` of `id` exited as `exit`. True if
    /// this recorded it; false if the process is unknown or had already
    /// exited (its first exit stands).
    pub fn record_exit(&mut self, id: &str, exec_id: &str, exit: Exited) -> bool {
        self.process_mut(id, exec_id)
            .map(|p| p.stop(exit))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use containerd_shim::protos::ttrpc::Code;

    use super::*;

    fn exit(code: u32) -> Exited {
        let mut at = Timestamp::new();
        at.seconds = 1_700_000_000 + i64::from(code);
        Exited { code, at }
    }

    fn pod() -> Containers {
        let mut cs = Containers::default();
        let init = || Proc::new("", "", "", false);
        cs.insert("pod", Container::new("/b/pod", init(), true))
            .expect("sandbox");
        cs.insert("app", Container::new("/b/app", init(), false))
            .expect("app");
        cs
    }

    #[test]
    fn lookups_fail_with_not_found_naming_what_is_missing() {
        let mut cs = pod();
        let e = cs.process("nope", "").expect_err("no container");
        assert_eq!(
            (e.code(), e.to_string()),
            (Code::NOT_FOUND, "container nope".into())
        );
        let e = cs.process("app", "e1").expect_err("no exec");
        assert_eq!(
            (e.code(), e.to_string()),
            (Code::NOT_FOUND, "process e1".into())
        );
        assert!(cs.process_mut("app", "").is_ok());
        let e = cs
            .insert(
                "app",
                Container::new("/b", Proc::new("", "", "", false), false),
            )
            .expect_err("twice");
        assert_eq!(e.code(), Code::ALREADY_EXISTS);
        assert!(cs.is_sandbox("pod") && !cs.is_sandbox("app") && !cs.is_sandbox("nope"));
    }

    #[test]
    fn a_container_starts_once_and_is_deleted_only_when_not_running() {
        let mut cs = pod();
        let c = cs.get_mut("app").expect("app");
        c.check_start("app").expect("created");
        c.check_delete("app").expect("a created container may go");
        c.init.phase = Phase::Running;
        assert_eq!(
            c.check_start("app").expect_err("again").to_string(),
            "container app was started"
        );
        let e = c.check_delete("app").expect_err("running");
        assert_eq!(e.code(), Code::FAILED_PRECONDITION);
        c.check_pause("app", true).expect("pause a running one");
        c.check_pause("app", false)
            .expect_err("resume a running one");
        c.init.phase = Phase::Paused;
        c.check_delete("app").expect_err("paused is running");
        c.check_pause("app", false).expect("resume a paused one");
        assert!(cs.record_exit("app", "", exit(0)));
        cs.get("app")
            .expect("app")
            .check_delete("app")
            .expect("exited");
    }

    #[test]
    fn execs_need_a_running_container_that_is_not_the_sandbox() {
        let mut cs = pod();
        let e = cs.get("pod").expect("pod").check_exec("pod", "e1");
        assert_eq!(e.expect_err("sandbox").code(), Code::FAILED_PRECONDITION);
        let e = cs.get("app").expect("app").check_exec("app", "e1");
        assert_eq!(
            e.expect_err("created").to_string(),
            "container app is not running"
        );
        let c = cs.get_mut("app").expect("app");
        c.init.phase = Phase::Running;
        c.check_exec("app", "e1").expect("running");
        c.execs.insert("e1".into(), Proc::new("", "", "", true));
        let e = c.check_exec("app", "e1").expect_err("duplicate");
        assert_eq!(e.code(), Code::ALREADY_EXISTS);
        let p = cs.process_mut("app", "e1").expect("e1");
        p.check_start("e1").expect("created");
        p.phase = Phase::Running;
        p.check_start("e1").expect_err("twice");
        p.check_delete("e1").expect_err("running");
    }

    #[test]
    fn the_first_exit_stands_and_later_waits_see_it() {
        let mut cs = pod();
        // A Wait that began before the exit sees it...
        let early = cs.process("pod", "").expect("pod").subscribe();
        assert!(cs.record_exit("pod", "", exit(0)));
        assert_eq!(early.borrow().as_ref().map(|e| e.code), Some(0));
        // ...and so does one that begins after an exit nobody waited for
        // (a detached task; containerd's forced delete waits late).
        assert_eq!(cs.process("app", "").expect("app").exited(), None);
        cs.process("app", "")
            .expect("app")
            .check_signal(false)
            .expect("alive");
        assert!(cs.record_exit("app", "", exit(137)));
        assert!(!cs.record_exit("app", "", exit(255)), "recorded twice");
        assert!(!cs.record_exit("gone", "", exit(1)), "unknown container");
        let p = cs.process("app", "").expect("app");
        assert_eq!(p.phase, Phase::Stopped);
        assert_eq!(p.subscribe().borrow().as_ref().map(|e| e.code), Some(137));
        // Killing a finished process: NOT_FOUND, unless for all processes.
        assert_eq!(
            p.check_signal(false).expect_err("finished").code(),
            Code::NOT_FOUND
        );
        p.check_signal(true).expect("all");
    }
}
