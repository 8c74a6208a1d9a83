//! The runtime helper, seen from the agent: each container operation is
//! one run of `husk-agent runtime <op> ... --result FILE` ([`crate::runtime`]),
//! a child of the helper server ([`crate::helper`]) or, without one, a
//! fresh process of the agent binary; its outcome comes back as JSON in the
//! result file. [`Runtime`] is what the registry asks of it, so the
//! registry's rules can be unit-tested with [`test::Recording`].

use std::{
    future::Future,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use husk_protocols::agent::Stdio;
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use super::{process::Process, stdio::devnull, ContainerError, Result};
use crate::{reaper::Reaper, runtime::Outcome};

/// Scratch files of the runtime helper (results, exec process specs).
const RT_DIR: &str = "/run/husk/rt";
/// How long a runtime helper run may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);

/// An operation of the runtime helper that starts no process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    /// Runs a created container's init program.
    Start(&'a str),
    /// Signals every process of the container.
    KillAll { id: &'a str, signal: i32 },
    /// Freezes the container.
    Pause(&'a str),
    /// Thaws it.
    Resume(&'a str),
    /// Applies OCI LinuxResources (JSON) to it.
    Update {
        id: &'a str,
        resources_json: &'a [u8],
    },
    /// Removes it; `force` kills what still runs first.
    Delete { id: &'a str, force: bool },
}

/// What the container registry asks of the container runtime.
pub trait Runtime: Send + Sync + 'static {
    /// Creates container `id` from the bundle at `bundle` (a guest path),
    /// its init's stdio wired to `stdio`: the init process, not yet started.
    fn create(
        &self,
        id: &str,
        bundle: &Path,
        stdio: &Stdio,
    ) -> impl Future<Output = Result<Process>> + Send;

    /// Starts process `exec_id`, described by `process_json` (an OCI
    /// Process), in container `id`.
    fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: &Stdio,
    ) -> impl Future<Output = Result<Process>> + Send;

    /// Runs `op`.
    fn run(&self, op: Op<'_>) -> impl Future<Output = Result<()>> + Send;
}

/// The runtime helper.
#[derive(Debug, Default, Clone, Copy)]
pub struct Helper;

impl Runtime for Helper {
    async fn create(&self, id: &str, bundle: &Path, stdio: &Stdio) -> Result<Process> {
        let bundle_arg = bundle.display().to_string();
        super::process::spawn(id, "", stdio, |extra| {
            let mut args = vec!["create", "--id", id, "--bundle", bundle_arg.as_str()];
            args.extend(extra.iter().map(String::as_str));
            args.into_iter().map(String::from).collect()
        })
        .await
    }

    async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: &Stdio,
    ) -> Result<Process> {
        let spec = Scratch::write(
            &format!("{id}.{exec_id}.process.json"),
            process_json,
            "the process spec",
        )?;
        let spec_arg = spec.arg();
        super::process::spawn(id, exec_id, stdio, |extra| {
            let mut args = vec!["exec", "--id", id, "--process", spec_arg.as_str()];
            args.extend(extra.iter().map(String::as_str));
            args.into_iter().map(String::from).collect()
        })
        .await
    }

    async fn run(&self, op: Op<'_>) -> Result<()> {
        // Kept until the helper has read it.
        let mut resources = None;
        let args: Vec<String> = match op {
            Op::Start(id) => words(&["start", "--id", id]),
            Op::KillAll { id, signal } => {
                words(&["kill", "--id", id, "--signal", &signal.to_string(), "--all"])
            }
            Op::Pause(id) => words(&["pause", "--id", id]),
            Op::Resume(id) => words(&["resume", "--id", id]),
            Op::Update { id, resources_json } => {
                let file = Scratch::write(
                    &format!("resources-{}.json", next_number()),
                    resources_json,
                    "the resources",
                )?;
                let args = words(&["update", "--id", id, "--resources", &file.arg()]);
                resources = Some(file);
                args
            }
            Op::Delete { id, force } => {
                let mut args = words(&["delete", "--id", id]);
                if force {
                    args.push("--force".into());
                }
                args
            }
        };
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let result = run(&argv).await.map(drop);
        drop(resources);
        result
    }
}

fn words(w: &[&str]) -> Vec<String> {
    w.iter().map(|s| s.to_string()).collect()
}

/// The helper's scratch directory, made on first use.
fn rt_dir() -> Result<&'static Path> {
    static MADE: AtomicBool = AtomicBool::new(false);
    if !MADE.load(Ordering::Relaxed) {
        std::fs::create_dir_all(RT_DIR)
            .map_err(|e| ContainerError::Failed(format!("creating {RT_DIR}: {e}")))?;
        MADE.store(true, Ordering::Relaxed);
    }
    Ok(Path::new(RT_DIR))
}

/// A file the helper reads (an exec's process spec, an update's
/// resources), removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    /// Writes `contents` (`what`, for errors) to `name` in the scratch
    /// directory.
    fn write(name: &str, contents: &[u8], what: &str) -> Result<Self> {
        let path = rt_dir()?.join(name);
        std::fs::write(&path, contents)
            .map_err(|e| ContainerError::Failed(format!("writing {what}: {e}")))?;
        Ok(Self(path))
    }

    /// The path, as the helper's argument.
    fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

static NEXT: AtomicU64 = AtomicU64::new(1);

/// A number no other scratch file of this agent has used.
pub fn next_number() -> u64 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Starts `husk-agent runtime <args>` with `stdio` as its standard streams:
/// a child of the helper server ([`crate::helper`]), or, without one, a
/// fresh process of the agent binary. Its pid.
async fn start_helper(args: Vec<String>, stdio: [OwnedFd; 3]) -> Result<i32> {
    let (mut args, mut stdio) = (args, stdio);
    if let Some(server) = crate::helper::server() {
        // The arguments and descriptors come back for the fallback.
        let (answer, back) = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let answer = server.run(&refs, [&stdio[0], &stdio[1], &stdio[2]]);
            (answer, (args, stdio))
        })
        .await
        .map_err(|e| ContainerError::Failed(format!("runtime helper server: {e}")))?;
        match answer {
            Ok(pid) => return Ok(pid),
            Err(e) => tracing::warn!("{e}; starting the runtime helper binary instead"),
        }
        (args, stdio) = back;
    }
    let [stdin, stdout, stderr] = stdio;
    let child = std::process::Command::new("/proc/self/exe")
        .arg("runtime")
        .args(&args)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .map_err(|e| ContainerError::Failed(format!("starting the runtime helper: {e}")))?;
    i32::try_from(child.id()).map_err(|_| ContainerError::Failed("helper pid out of range".into()))
}

/// Runs `husk-agent runtime <args> --result F` with `stdio` as its standard
/// streams and returns its outcome.
pub async fn run_with(args: &[&str], stdio: [OwnedFd; 3]) -> Result<(Outcome, Instant)> {
    let result = rt_dir()?.join(format!("result-{}.json", next_number()));
    let log = result.with_extension("log");
    let mut full: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    full.extend([
        "--result".to_string(),
        result.display().to_string(),
        "--log".to_string(),
        log.display().to_string(),
    ]);
    // Before the helper exists: its exit counts from here.
    let since = Instant::now();
    let pid = start_helper(full, stdio).await?;
    let exited = Reaper::global().watch(pid, since);
    let code = match tokio::time::timeout(HELPER_TIMEOUT, exited).await {
        Ok(Ok(code)) => code,
        Ok(Err(_)) => 255,
        Err(_) => {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = std::fs::remove_file(&result);
            return Err(ContainerError::Failed(format!(
                "the runtime helper ({}) did not finish within {HELPER_TIMEOUT:?}",
                args.first().unwrap_or(&"?")
            )));
        }
    };
    tracing::info!(
        op = args.first().unwrap_or(&"?"),
        code,
        ms = since.elapsed().as_millis(),
        "runtime helper done"
    );
    let text = std::fs::read(&result);
    let _ = std::fs::remove_file(&result);
    let _ = std::fs::remove_file(&log);
    let outcome: Outcome = match text.ok().and_then(|t| serde_json::from_slice(&t).ok()) {
        Some(o) => o,
        None => {
            return Err(ContainerError::Failed(format!(
                "the runtime helper ({}) died with status {code} without an answer",
                args.first().unwrap_or(&"?")
            )))
        }
    };
    if !outcome.ok {
        let why = outcome.error.unwrap_or_else(|| "unknown error".into());
        return Err(ContainerError::Failed(why));
    }
    Ok((outcome, since))
}

pub async fn run(args: &[&str]) -> Result<Outcome> {
    run_with(args, [devnull()?, devnull()?, devnull()?])
        .await
        .map(|(o, _)| o)
}

#[cfg(test)]
pub mod test {
    //! A [`Runtime`] that records what it was asked and answers as told.

    use std::{collections::HashSet, sync::Mutex};

    use super::*;
    use crate::container::process::test::Exit;

    /// Records each request as a line (`create c1`, `exec c1 e1`, or the
    /// [`Op`]'s debug form); creates and execs make processes whose exit
    /// the test sets through the [`Exit`] handles kept in `exits`.
    #[derive(Debug, Default)]
    pub struct Recording {
        pub calls: Mutex<Vec<String>>,
        /// Ids whose create or exec fails.
        pub failing: HashSet<String>,
        pub exits: Mutex<Vec<Exit>>,
        next_pid: Mutex<u32>,
    }

    impl Recording {
        pub fn calls(&self) -> Vec<String> {
            self.calls.lock().expect("lock").clone()
        }

        /// The exit handle of the `n`th process made (0: the first).
        pub fn exit(&self, n: usize) -> Exit {
            self.exits.lock().expect("lock")[n].clone()
        }

        fn process(&self, key: &str) -> Result<Process> {
            if self.failing.contains(key) {
                return Err(ContainerError::Failed(format!("{key} failed, as told")));
            }
            let mut pid = self.next_pid.lock().expect("lock");
            *pid += 1;
            let (process, exit) = Process::for_test(100 + *pid);
            self.exits.lock().expect("lock").push(exit);
            Ok(process)
        }
    }

    impl Runtime for Recording {
        async fn create(&self, id: &str, _bundle: &Path, _stdio: &Stdio) -> Result<Process> {
            self.calls
                .lock()
                .expect("lock")
                .push(format!("create {id}"));
            self.process(id)
        }

        async fn exec(
            &self,
            id: &str,
            exec_id: &str,
            _process_json: &[u8],
            _stdio: &Stdio,
        ) -> Result<Process> {
            self.calls
                .lock()
                .expect("lock")
                .push(format!("exec {id} {exec_id}"));
            self.process(exec_id)
        }

        async fn run(&self, op: Op<'_>) -> Result<()> {
            self.calls.lock().expect("lock").push(format!("{op:?}"));
            Ok(())
        }
    }
}
