//! The control API: a Unix socket that takes one JSON request per line.
//!
//! ```text
//! {"action":"state"}  ->  {"ok":true,"state":"running","uptime_ms":1234}
//! {"action":"stop"}   ->  {"ok":true,"state":"stopping"}
//! {"action":"profile_mark","label":"create"}  ->  {"ok":true,"path":"/x/p.01-create"}
//! {"action":"balloon_target","target_mib":64}  ->  {"ok":true,"state":"running"}
//! {"action":"balloon"}  ->  {"ok":true,"state":"running","balloon":{"target_mib":64,...}}
//! ```
//!
//! The socket is meant for the shim on the same host (mode 0600). Requests
//! are small and answered at once; a client that sends nothing within a
//! short time, or garbage, gets an error line and is disconnected.

use std::{
    io::{BufRead, BufReader, Write},
    os::{
        fd::AsRawFd,
        unix::{fs::PermissionsExt, net::UnixListener},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::{
    devices::virtio::balloon::{BalloonControl, BalloonReport},
    persist::Persist,
    profile::session::Session,
    vstate::control::{RunState, VcpuControl, Wanted},
};

/// How long a pause or resume may take.
const VCPU_WAIT: Duration = Duration::from_secs(5);
use serde::{Deserialize, Serialize};

/// A request on the API socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Report the VM state.
    State,
    /// Stop the VM (vCPUs stop, the VMM exits 0).
    Stop,
    /// Park every vCPU (guest state is kept; devices keep running).
    Pause,
    /// Let paused vCPUs run again.
    Resume,
    /// Write a snapshot of the VM to an absolute path (the VM keeps its
    /// run state).
    Snapshot(PathBuf),
    /// End a slice of the guest profile: the samples since the last mark
    /// are written under this label (`profile::session`).
    ProfileMark(String),
    /// Set the balloon's target size in MiB (0: give the guest all its
    /// memory back).
    BalloonTarget(u64),
    /// Report the balloon: target, actual size, guest statistics, counters.
    Balloon,
}

/// The wire form of a request: exactly one field, `action`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    action: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    target_mib: Option<u64>,
}

impl Request {
    /// Parses one request line.
    pub fn parse(line: &str) -> Result<Self, String> {
        let raw: RawRequest = serde_json::from_str(line.trim()).map_err(|e| e.to_string())?;
        if raw.path.is_some() && raw.action != "snapshot" {
            return Err(format!("action {:?} takes no path", raw.action));
        }
        if raw.label.is_some() && raw.action != "profile_mark" {
            return Err(format!("action {:?} takes no label", raw.action));
        }
        if raw.target_mib.is_some() && raw.action != "balloon_target" {
            return Err(format!("action {:?} takes no target_mib", raw.action));
        }
        match raw.action.as_str() {
            "balloon_target" => raw
                .target_mib
                .map(Self::BalloonTarget)
                .ok_or_else(|| "balloon_target needs target_mib".to_string()),
            "balloon" => Ok(Self::Balloon),
            "snapshot" => match raw.path {
                Some(p) if Path::new(&p).is_absolute() => Ok(Self::Snapshot(PathBuf::from(p))),
                Some(p) => Err(format!("snapshot path {p:?} is not absolute")),
                None => Err("snapshot needs a path".to_string()),
            },
            "profile_mark" => raw
                .label
                .map(Self::ProfileMark)
                .ok_or_else(|| "profile_mark needs a label".to_string()),
            "state" => Ok(Self::State),
            "stop" => Ok(Self::Stop),
            "pause" => Ok(Self::Pause),
            "resume" => Ok(Self::Resume),
            other => Err(format!("unknown action {other:?}")),
        }
    }
}

/// The VM's lifecycle state, as reported by the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// vCPUs are running.
    Running,
    /// vCPUs are parked.
    Paused,
    /// A stop was requested; the VMM is shutting down.
    Stopping,
}

/// A response on the API socket.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Response {
    /// Whether the request was understood and done.
    pub ok: bool,
    /// The state after the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
    /// Milliseconds since the VMM started the vCPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// What went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes of guest memory a snapshot stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// The file a profile mark wrote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The balloon's target, state, guest statistics and counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonReport>,
}

/// Shared between the API handler and the VMM.
#[derive(Debug)]
pub struct Shared {
    /// Current state.
    pub state: VmState,
    /// When the vCPUs started.
    pub started: Instant,
    /// Set when a stop was requested through the API.
    pub stop_requested: bool,
    /// The guest profile, when the VM is profiled.
    pub profile: Option<Arc<Session>>,
    /// The balloon, when the VM has one.
    pub balloon: Option<BalloonControl>,
}

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Binding the socket failed.
    #[error("binding the API socket {0}")]
    Bind(PathBuf, #[source] std::io::Error),
}

/// The API socket in the event loop.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    shared: Arc<Mutex<Shared>>,
    vcpus: Arc<[Arc<VcpuControl>]>,
    persist: Arc<Persist>,
    /// Signalled when a stop was requested, to wake the VMM.
    on_stop: Box<dyn Fn() + Send>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Asks every vCPU for `wanted`; returns whether all reached `state`.
fn steer(vcpus: &[Arc<VcpuControl>], wanted: Wanted, state: RunState) -> bool {
    for v in vcpus {
        v.request(wanted);
    }
    vcpus.iter().all(|v| v.wait_for(state, VCPU_WAIT))
}

/// Answers one request line.
pub fn answer(
    line: &str,
    shared: &mut Shared,
    vcpus: &[Arc<VcpuControl>],
    persist: Option<&Persist>,
) -> Response {
    let fail = |e: String| Response {
        error: Some(e),
        ..Response::default()
    };
    let done = |state| Response {
        ok: true,
        state: Some(state),
        ..Response::default()
    };
    match Request::parse(line) {
        Ok(Request::Pause | Request::Resume) if shared.state == VmState::Stopping => {
            fail("the VM is stopping".to_string())
        }
        Ok(Request::Snapshot(_)) if shared.state == VmState::Stopping => {
            fail("the VM is stopping".to_string())
        }
        Ok(Request::Snapshot(path)) => match persist.map(|p| p.snapshot(&path)) {
            Some(Ok(stats)) => Response {
                ok: true,
                state: Some(shared.state),
                memory_bytes: Some(stats.memory_bytes),
                ..Response::default()
            },
            Some(Err(e)) => fail(format!("snapshot failed: {}", crate::error_chain(&e))),
            None => fail("this VM cannot be snapshotted".to_string()),
        },
        Ok(Request::ProfileMark(label)) => match shared.profile.as_ref().map(|p| p.mark(&label)) {
            Some(Ok(path)) => Response {
                path: Some(path.display().to_string()),
                ..done(shared.state)
            },
            Some(Err(e)) => fail(crate::error_chain(&e)),
            None => fail("this VM is not profiled (--profile-guest)".to_string()),
        },
        Ok(Request::BalloonTarget(mib)) => {
            match shared.balloon.as_ref().map(|b| b.set_target_mib(mib)) {
                Some(Ok(())) => done(shared.state),
                Some(Err(e)) => fail(e),
                None => fail("this VM has no balloon device".to_string()),
            }
        }
        Ok(Request::Balloon) => match shared.balloon.as_ref() {
            Some(b) => Response {
                balloon: Some(b.report()),
                ..done(shared.state)
            },
            None => fail("this VM has no balloon device".to_string()),
        },
        Ok(Request::Pause) => match steer(vcpus, Wanted::Pause, RunState::Paused) {
            true => {
                shared.state = VmState::Paused;
                done(VmState::Paused)
            }
            false => fail("not every vCPU paused within 5 s".to_string()),
        },
        Ok(Request::Resume) => match steer(vcpus, Wanted::Run, RunState::Running) {
            true => {
                shared.state = VmState::Running;
                done(VmState::Running)
            }
            false => fail("not every vCPU resumed within 5 s".to_string()),
        },
        Ok(Request::State) => Response {
            ok: true,
            state: Some(shared.state),
            uptime_ms: Some(
                u64::try_from(shared.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            ),
            ..Response::default()
        },
        Ok(Request::Stop) => {
            shared.stop_requested = true;
            shared.state = VmState::Stopping;
            Response {
                ok: true,
                state: Some(VmState::Stopping),
                ..Response::default()
            }
        }
        Err(e) => Response {
            error: Some(format!("bad request: {e}")),
            ..Response::default()
        },
    }
}

impl ApiServer {
    /// Binds `path` (replacing a stale socket file).
    pub fn new(
        path: &Path,
        shared: Arc<Mutex<Shared>>,
        vcpus: Arc<[Arc<VcpuControl>]>,
        persist: Arc<Persist>,
        on_stop: Box<dyn Fn() + Send>,
    ) -> Result<Self, ApiError> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).map_err(|e| ApiError::Bind(path.to_path_buf(), e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| ApiError::Bind(path.to_path_buf(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ApiError::Bind(path.to_path_buf(), e))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            shared,
            vcpus,
            persist,
            on_stop,
        })
    }

    fn serve_one(&self) {
        let Ok((stream, _)) = self.listener.accept() else {
            return;
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let _ = stream.set_write_timeout(Some(Duration::from_millis(500)));
        let mut reader = BufReader::new(stream.take_limited());
        let mut line = String::new();
        let response = match reader.read_line(&mut line) {
            Ok(_) => {
                let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
                answer(&line, &mut shared, &self.vcpus, Some(&self.persist))
            }
            Err(e) => Response {
                error: Some(format!("reading the request: {e}")),
                ..Response::default()
            },
        };
        let stop = response.state == Some(VmState::Stopping) && response.ok;
        let mut out =
            serde_json::to_string(&response).unwrap_or_else(|_| "{\"ok\":false}".to_string());
        out.push('\n');
        let mut stream = reader.into_inner().into_inner();
        let _ = stream.write_all(out.as_bytes());
        if stop {
            (self.on_stop)();
        }
    }
}

/// Reads at most 4 KiB of a request.
trait TakeLimited {
    fn take_limited(self) -> std::io::Take<Self>
    where
        Self: Sized;
}

impl<T: std::io::Read> TakeLimited for T {
    fn take_limited(self) -> std::io::Take<Self> {
        std::io::Read::take(self, 4096)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.listener.as_raw_fd(), EventSet::IN)) {
            tracing::error!("api: watching the socket: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.serve_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            state: VmState::Running,
            started: Instant::now(),
            stop_requested: false,
            profile: None,
            balloon: None,
        }
    }

    #[test]
    fn balloon_requests_parse_and_need_a_balloon() {
        assert_eq!(
            Request::parse("{\"action\":\"balloon_target\",\"target_mib\":64}"),
            Ok(Request::BalloonTarget(64))
        );
        assert_eq!(
            Request::parse("{\"action\":\"balloon\"}"),
            Ok(Request::Balloon)
        );
        assert!(Request::parse("{\"action\":\"balloon_target\"}").is_err());
        assert!(Request::parse("{\"action\":\"state\",\"target_mib\":1}").is_err());
        assert!(Request::parse("{\"action\":\"balloon_target\",\"target_mib\":-1}").is_err());
        let mut s = shared();
        let r = answer("{\"action\":\"balloon\"}", &mut s, &[], None);
        assert!(!r.ok);
        assert!(r.error.expect("error").contains("no balloon"));
    }

    #[test]
    fn answers_state_and_stop() {
        let mut s = shared();
        let r = answer("{\"action\":\"state\"}\n", &mut s, &[], None);
        assert!(r.ok);
        assert_eq!(r.state, Some(VmState::Running));
        let r = answer("{\"action\":\"stop\"}", &mut s, &[], None);
        assert_eq!(r.state, Some(VmState::Stopping));
        assert!(s.stop_requested);
        let json = serde_json::to_string(&answer("{\"action\":\"state\"}", &mut s, &[], None))
            .expect("json");
        assert!(json.contains("\"stopping\""), "{json}");
    }

    #[test]
    fn pause_and_resume_without_vcpus_and_not_while_stopping() {
        let mut s = shared();
        assert_eq!(
            answer("{\"action\":\"pause\"}", &mut s, &[], None).state,
            Some(VmState::Paused)
        );
        assert_eq!(
            answer("{\"action\":\"resume\"}", &mut s, &[], None).state,
            Some(VmState::Running)
        );
        answer("{\"action\":\"stop\"}", &mut s, &[], None);
        assert!(!answer("{\"action\":\"pause\"}", &mut s, &[], None).ok);
    }

    #[test]
    fn rejects_garbage() {
        let mut s = shared();
        for bad in [
            "",
            "hello",
            "{\"action\":\"reboot\"}",
            "{\"action\":\"stop\",\"x\":1}",
            "\u{0}\u{1}",
        ] {
            let r = answer(bad, &mut s, &[], None);
            assert!(!r.ok, "{bad:?}");
            assert!(r.error.is_some());
        }
        assert!(!s.stop_requested);
    }
}
