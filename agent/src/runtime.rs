//! The container runtime helper: `husk-agent runtime <op> ...`.
//!
//! Container operations run youki's `libcontainer` in a short-lived child
//! process of the agent, not in PID 1 itself, for three reasons: creating
//! a container forks and runs Rust code in the children, which is only
//! sound from a single-threaded process (the agent has an async runtime);
//! a panic or abort in that code must not take PID 1, and with it the
//! guest kernel, down; and the helper's own stdin/stdout/stderr become the
//! container's, exactly as with a runtime binary.
//!
//! Every operation writes its outcome as one JSON object to the file named
//! by `--result` (`{"ok":true,...}` or `{"ok":false,"error":"..."}`): the
//! helper's standard streams belong to the container.

use std::{
    collections::HashMap,
    os::fd::{FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use libcgroups::common::{create_cgroup_manager, CgroupConfig, CgroupManager, ControllerOpt};
use libcontainer::workload::{
    default::DefaultExecutor, Executor, ExecutorError, ExecutorValidationError,
};
use libcontainer::{
    container::{builder::ContainerBuilder, Container, ContainerStatus},
    signal::Signal,
    syscall::syscall::SyscallType,
};
use oci_spec::runtime::{LinuxResources, LinuxSeccomp, Spec};
use serde::{Deserialize, Serialize};

/// Where libcontainer keeps container state in the guest.
pub const STATE_ROOT: &str = "/run/husk/containers";

/// The outcome of one helper run.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the operation succeeded.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The pid a create or exec made (guest root pid namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The container's cgroup in the hierarchy (create).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_path: Option<String>,
    /// The container's status after the operation (libcontainer's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// Parsed `--flag value` arguments.
#[derive(Debug)]
struct Args {
    op: String,
    flags: HashMap<String, String>,
    switches: Vec<String>,
}

/// Flags that take no value.
const SWITCHES: &[&str] = &["--all", "--force"];

fn parse(argv: &[String]) -> Result<Args, String> {
    let mut it = argv.iter();
    let op = it.next().ok_or("no operation")?.clone();
    let mut flags = HashMap::new();
    let mut switches = Vec::new();
    while let Some(a) = it.next() {
        if SWITCHES.contains(&a.as_str()) {
            switches.push(a.clone());
        } else if a.starts_with("--") {
            let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
            flags.insert(a.clone(), v.clone());
        } else {
            return Err(format!("unexpected argument {a:?}"));
        }
    }
    Ok(Args {
        op,
        flags,
        switches,
    })
}

impl Args {
    fn get(&self, flag: &str) -> Result<&str, String> {
        self.flags
            .get(flag)
            .map(String::as_str)
            .ok_or_else(|| format!("{} needs {flag}", self.op))
    }

    fn has(&self, switch: &str) -> bool {
        self.switches.iter().any(|s| s == switch)
    }
}

/// Sends libcontainer's log (its processes inherit the file) to `path`.
fn log_to(path: &str) {
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(file))
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .without_time()
        .with_ansi(false)
        .with_target(false)
        .try_init();
}

/// The warnings and errors libcontainer logged, one line each.
fn logged(path: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let tail = &lines[lines.len().saturating_sub(8)..];
    tail.join("; ")
}

/// Entry point of `husk-agent runtime ...`; returns the process exit code.
pub fn main(argv: &[String]) -> i32 {
    let flag = |name: &str| argv.windows(2).find(|w| w[0] == name).map(|w| w[1].clone());
    let result_path = flag("--result").map(PathBuf::from);
    let log = flag("--log");
    if let Some(l) = &log {
        log_to(l);
    }
    let outcome = match parse(argv).and_then(|a| run(&a)) {
        Ok(o) => o,
        Err(mut error) => {
            let details = log.as_deref().map(logged).unwrap_or_default();
            if !details.is_empty() {
                error = format!("{error} ({details})");
            }
            Outcome {
                ok: false,
                error: Some(error),
                ..Outcome::default()
            }
        }
    };
    if let Some(l) = &log {
        let _ = std::fs::remove_file(l);
    }
    let code = i32::from(!outcome.ok);
    match result_path {
        Some(p) => {
            let text = serde_json::to_vec(&outcome).unwrap_or_default();
            if std::fs::write(&p, text).is_err() {
                return 2;
            }
        }
        None => {
            if let Some(e) = &outcome.error {
                eprintln!("husk-agent runtime: {e}");
            }
        }
    }
    code
}

fn builder(id: &str, console_socket: Option<&str>) -> Result<ContainerBuilder, String> {
    let b = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .validate_id()
        .map_err(|e| format!("container id {id:?}: {e}"))?
        .with_root_path(STATE_ROOT)
        .map_err(|e| format!("state directory {STATE_ROOT}: {e}"))?
        .with_console_socket(console_socket);
    Ok(b)
}

fn load(id: &str) -> Result<Container, String> {
    if id.is_empty() || id.contains('/') || id.starts_with('.') {
        return Err(format!("invalid container id {id:?}"));
    }
    let path = Path::new(STATE_ROOT).join(id);
    if !path.exists() {
        return Err(format!("container {id} does not exist"));
    }
    Container::load(path).map_err(|e| format!("loading container {id}: {e}"))
}

fn done(c: Option<&Container>) -> Outcome {
    Outcome {
        ok: true,
        status: c.map(|c| c.status().to_string()),
        ..Outcome::default()
    }
}

fn run(a: &Args) -> Result<Outcome, String> {
    let id = a.get("--id")?;
    match a.op.as_str() {
        "create" => {
            let bundle = a.get("--bundle")?;
            let console = a.flags.get("--console-socket").map(String::as_str);
            let c = builder(id, console)?
                .with_executor(Workload::new(None))
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| format!("creating container {id}: {e}"))?;
            let pid = c.pid().map(|p| p.as_raw()).unwrap_or(0);
            let cgroup_path = c
                .spec()
                .map(|s| s.cgroup_path.display().to_string())
                .map_err(|e| format!("container spec: {e}"))?;
            Ok(Outcome {
                pid: u32::try_from(pid).ok(),
                cgroup_path: Some(cgroup_path),
                ..done(Some(&c))
            })
        }
        "start" => {
            let mut c = load(id)?;
            c.start()
                .map_err(|e| format!("starting container {id}: {e}"))?;
            Ok(done(Some(&c)))
        }
        "exec" => {
            let process = a.get("--process")?;
            let console = a.flags.get("--console-socket").map(String::as_str);
            let workload = Workload::new(container_seccomp(&load(id)?)?);
            let pid = builder(id, console)?
                .with_executor(workload)
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .build()
                .map_err(|e| format!("exec in container {id}: {e}"))?;
            Ok(Outcome {
                pid: u32::try_from(pid.as_raw()).ok(),
                ..done(None)
            })
        }
        "kill" => {
            let signal: i32 = a
                .get("--signal")?
                .parse()
                .map_err(|_| "--signal needs a number".to_string())?;
            let signal = Signal::try_from(signal).map_err(|e| format!("signal {signal}: {e}"))?;
            let mut c = load(id)?;
            c.kill(signal, a.has("--all"))
                .map_err(|e| format!("signalling container {id}: {e}"))?;
            Ok(done(Some(&c)))
        }
        "pause" => {
            let mut c = load(id)?;
            c.pause()
                .map_err(|e| format!("pausing container {id}: {e}"))?;
            Ok(done(Some(&c)))
        }
        "resume" => {
            let mut c = load(id)?;
            c.resume()
                .map_err(|e| format!("resuming container {id}: {e}"))?;
            Ok(done(Some(&c)))
        }
        "delete" => {
            let mut c = load(id)?;
            c.delete(a.has("--force"))
                .map_err(|e| format!("deleting container {id}: {e}"))?;
            Ok(done(None))
        }
        "update" => {
            let path = a.get("--resources")?;
            let text = std::fs::read(path).map_err(|e| format!("reading {path}: {e}"))?;
            let resources: LinuxResources = serde_json::from_slice(&text)
                .map_err(|e| format!("invalid OCI LinuxResources: {e}"))?;
            let c = load(id)?;
            update(&c, &resources)?;
            Ok(done(Some(&c)))
        }
        "state" => {
            let mut c = load(id)?;
            c.refresh_status()
                .map_err(|e| format!("container {id}: {e}"))?;
            let running = c.status() != ContainerStatus::Stopped;
            Ok(Outcome {
                pid: c
                    .pid()
                    .filter(|_| running)
                    .and_then(|p| u32::try_from(p.as_raw()).ok()),
                ..done(Some(&c))
            })
        }
        other => Err(format!("unknown runtime operation {other:?}")),
    }
}

/// The container's seccomp profile, from its bundle's config.json.
fn container_seccomp(c: &Container) -> Result<Option<LinuxSeccomp>, String> {
    let path = c.bundle().join("config.json");
    let spec = Spec::load(&path).map_err(|e| format!("loading {}: {e}", path.display()))?;
    Ok(spec.linux().as_ref().and_then(|l| l.seccomp().clone()))
}

/// What the agent adds to every container process (init and exec) just
/// before its program runs.
///
/// * `seccomp` (execs only): the container's seccomp profile, as runc
///   does. libcontainer 0.7 builds an exec's spec without the container's
///   `linux.seccomp`, so without this a process started by `ctr task exec`
///   (or `kubectl exec`) would run unconfined next to a confined init. The
///   filter is installed as the last step before the program is executed,
///   after capabilities and the user are set. Unprivileged, the kernel only
///   takes a filter with no_new_privs set: if the process did not ask for
///   it and the first attempt is refused, it is set — a confined exec that
///   cannot gain privileges through set-uid programs is preferred to an
///   unconfined one. Any other failure fails the exec.
///
/// The environment is the process's own: husk adds nothing to it (on KVM
/// PVM hosts it once added a glibc mask against AVX, until the guest
/// kernel could switch the whole vector state; docs/security.md).
#[derive(Clone)]
struct Workload {
    seccomp: Option<LinuxSeccomp>,
}

impl Workload {
    fn new(seccomp: Option<LinuxSeccomp>) -> Self {
        Self { seccomp }
    }
}

impl Executor for Workload {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        if let Some(seccomp) = &self.seccomp {
            let installed = libcontainer::seccomp::initialize_seccomp(seccomp).or_else(|_| {
                nix::sys::prctl::set_no_new_privs()
                    .map_err(|e| ExecutorError::Other(format!("setting no_new_privs: {e}")))?;
                libcontainer::seccomp::initialize_seccomp(seccomp).map_err(|e| {
                    ExecutorError::Other(format!("installing the container's seccomp profile: {e}"))
                })
            })?;
            if let Some(fd) = installed {
                // A notify action needs a listener; an exec has none here,
                // so the notified calls fail (ENOSYS) rather than run
                // unchecked.
                // SAFETY: libseccomp handed us this descriptor; nothing else
                // owns it.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        DefaultExecutor {}.exec(spec)
    }

    /// runc's rule, not libcontainer's: a command with a `/` is run as
    /// that path; only a bare name needs `PATH` (CRI's pause image and many
    /// others set no `PATH` and run `/pause`).
    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        let invalid = ExecutorValidationError::ArgValidationError;
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| invalid("the spec has no process".into()))?;
        let Some(command) = process.args().as_ref().and_then(|a| a.first()) else {
            return Err(invalid(
                "the process has no command (process.args is empty)".into(),
            ));
        };
        let env = process.env().as_deref().unwrap_or_default();
        let path = env.iter().find_map(|e| e.strip_prefix("PATH="));
        find_executable(command, path).map(|_| ()).map_err(invalid)
    }
}

/// Where `command` is: itself when it holds a `/` (relative to the working
/// directory), else the first executable file of that name in `path`.
fn find_executable(command: &str, path: Option<&str>) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |m: &std::fs::Metadata| m.is_file() && m.permissions().mode() & 0o111 != 0;
    if command.contains('/') {
        return match std::fs::metadata(command) {
            Err(e) => Err(format!("executable '{command}' not found: {e}")),
            Ok(m) if executable(&m) => Ok(PathBuf::from(command)),
            Ok(_) => Err(format!("'{command}' is not an executable file")),
        };
    }
    let Some(path) = path.filter(|p| !p.is_empty()) else {
        return Err(format!(
            "executable '{command}' not found: the process has no PATH (give the command as a path)"
        ));
    };
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(command))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| executable(&m)))
        .ok_or_else(|| format!("executable '{command}' not found in $PATH ({path})"))
}

/// Applies `resources` to the container's cgroup, as `runc update` does.
fn update(c: &Container, resources: &LinuxResources) -> Result<(), String> {
    if !c.can_pause() && !c.can_resume() {
        return Err(format!("container {} is not running", c.id()));
    }
    let spec = c.spec().map_err(|e| format!("container spec: {e}"))?;
    let manager = create_cgroup_manager(CgroupConfig {
        cgroup_path: spec.cgroup_path.clone(),
        systemd_cgroup: false,
        container_name: c.id().to_string(),
    })
    .map_err(|e| format!("cgroup of container {}: {e}", c.id()))?;
    manager
        .apply(&ControllerOpt {
            resources,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        })
        .map_err(|e| format!("updating the resources of container {}: {e}", c.id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_found_as_runc_finds_them() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("husk-findexe-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("bin")).expect("dir");
        let tool = dir.join("bin/tool");
        std::fs::write(&tool, b"#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let data = dir.join("bin/data");
        std::fs::write(&data, b"x").expect("write");
        let bin = dir.join("bin").display().to_string();
        let tool_path = tool.display().to_string();

        // A path needs no PATH (the pause image sets none).
        assert_eq!(find_executable(&tool_path, None), Ok(tool.clone()));
        // A bare name is looked up in PATH, skipping non-executables.
        let path = format!("/nonexistent-dir::{bin}");
        assert_eq!(find_executable("tool", Some(&path)), Ok(tool.clone()));
        let e = find_executable("data", Some(&path)).expect_err("not executable");
        assert!(e.contains("'data' not found in $PATH"), "{e}");
        // Without PATH a bare name cannot be found, and the error says why.
        for no_path in [None, Some("")] {
            let e = find_executable("tool", no_path).expect_err("no PATH");
            assert!(e.contains("no PATH"), "{e}");
        }
        // A missing or non-executable path names itself.
        let e = find_executable("/nonexistent", None).expect_err("missing");
        assert!(e.contains("'/nonexistent' not found"), "{e}");
        let e = find_executable(&data.display().to_string(), None).expect_err("data");
        assert!(e.contains("is not an executable file"), "{e}");
        let e = find_executable(&bin, None).expect_err("a directory");
        assert!(e.contains("is not an executable file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_flags_and_switches() {
        let a = parse(&argv("kill --id c1 --signal 9 --all --result /tmp/r")).expect("parse");
        assert_eq!(a.op, "kill");
        assert_eq!(a.get("--id").ok(), Some("c1"));
        assert_eq!(a.get("--signal").ok(), Some("9"));
        assert!(a.has("--all"));
        assert!(!a.has("--force"));
    }

    #[test]
    fn refuses_bad_arguments() {
        assert!(parse(&[]).is_err());
        assert!(parse(&argv("kill --id")).is_err());
        assert!(parse(&argv("kill stray")).is_err());
        let a = parse(&argv("kill --id c1")).expect("parse");
        assert!(run(&a).is_err(), "no --signal");
        let a = parse(&argv("fly --id c1")).expect("parse");
        assert!(run(&a)
            .expect_err("unknown op")
            .contains("unknown runtime operation"));
        assert!(load("../etc").is_err());
        assert!(load("").is_err());
    }

    #[test]
    fn outcome_is_written_to_the_result_file() {
        let path = std::env::temp_dir().join(format!("husk-rt-{}.json", std::process::id()));
        let code = main(&argv(&format!("fly --id c1 --result {}", path.display())));
        assert_eq!(code, 1);
        let o: Outcome =
            serde_json::from_slice(&std::fs::read(&path).expect("result")).expect("json");
        assert!(!o.ok);
        assert!(o.error.expect("error").contains("fly"));
        let _ = std::fs::remove_file(&path);
    }
}
