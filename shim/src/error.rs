//! The Task service's one error type, and its one mapping to ttrpc codes.
//!
//! containerd acts on the code of a Task error, not on its text: NOT_FOUND
//! from Kill of a finished process lets a forced delete go on, NOT_FOUND
//! from Delete makes a cleanup idempotent, FAILED_PRECONDITION tells
//! `ctr`'s user the task is in the wrong state. So each handler says *what*
//! went wrong with a variant, and `code()` alone decides the code; nothing
//! else builds a status. The message is the error with its causes, printed
//! by `chain` (the one place a cause chain is printed).

use containerd_shim::protos::ttrpc::{self as shim_ttrpc, Code};

use crate::{
    config::ConfigError, io::IoError, network::NetError, rootfs::RootfsError, vm::VmError,
    volwatch::VolumeError,
};

/// Why a Task request failed.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// No container of that id in this shim.
    #[error("container {0}")]
    NoContainer(String),
    /// No process (exec) of that id in the container.
    #[error("process {0}")]
    NoProcess(String),
    /// A signal for a process that has already exited.
    #[error("process already finished")]
    Finished,
    /// Create of an id that exists.
    #[error("container {0} exists")]
    ContainerExists(String),
    /// Exec of an exec id that exists.
    #[error("process {0} exists")]
    ProcessExists(String),
    /// The container or process is in the wrong phase for the request.
    #[error("{what} {id} {state}")]
    Phase {
        /// "container" or "process".
        what: &'static str,
        /// Its id.
        id: String,
        /// What is wrong, e.g. "is running".
        state: String,
    },
    /// A request that needs the pod VM before it runs (or after it went).
    #[error("the pod VM is not running")]
    NoVm,
    /// Exec into the sandbox container, which has no processes in husk.
    #[error("{0} is the pod's sandbox, which runs no processes in husk")]
    SandboxRunsNothing(String),
    /// The shim's settings are unusable.
    #[error("husk.toml")]
    Config(#[source] ConfigError),
    /// The bundle (spec, root file system, mounts) is unusable.
    #[error("the bundle")]
    Bundle(#[source] RootfsError),
    /// A volume cannot be copied into the guest (beyond husk.toml's
    /// bounds, or not laid out by kubelet).
    #[error("copying a volume into the guest")]
    Volume(#[source] VolumeError),
    /// A request field is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The sandbox's network namespace is unusable.
    #[error("the pod network")]
    PodNetwork(#[source] NetError),
    /// Wiring the pod network to the VM failed.
    #[error("connecting the pod network")]
    Network(#[source] NetError),
    /// The pod VM could not be started.
    #[error("starting the pod VM")]
    VmStart(#[source] VmError),
    /// A process's stdio could not be set up.
    #[error("setting up the process's stdio")]
    Stdio(#[source] IoError),
    /// A fault in the shim itself.
    #[error("{0}")]
    Internal(String),
    /// The agent failed a call: `code` is the agent's own (or UNAVAILABLE
    /// when the call did not get through).
    #[error("{what}: {message}")]
    Agent {
        /// What the shim asked for.
        what: &'static str,
        /// The code to pass on.
        code: Code,
        /// The agent's message.
        message: String,
    },
    /// The process's record went away while someone waited for it.
    #[error("the process went away")]
    Gone,
}

impl TaskError {
    /// An agent call for `what` failed with `e`: the agent's status code
    /// and message are kept.
    pub fn agent(what: &'static str, e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(s) => TaskError::Agent {
                what,
                code: <Code as protobuf::Enum>::from_i32(s.code.value()).unwrap_or(Code::UNKNOWN),
                message: s.message,
            },
            other => TaskError::Agent {
                what,
                code: Code::UNAVAILABLE,
                message: other.to_string(),
            },
        }
    }

    /// A phase error for container `id`.
    pub fn container_phase(id: &str, state: impl Into<String>) -> Self {
        TaskError::Phase {
            what: "container",
            id: id.to_string(),
            state: state.into(),
        }
    }

    /// A phase error for process `exec_id`.
    pub fn process_phase(exec_id: &str, state: impl Into<String>) -> Self {
        TaskError::Phase {
            what: "process",
            id: exec_id.to_string(),
            state: state.into(),
        }
    }

    /// The ttrpc code containerd gets.
    pub fn code(&self) -> Code {
        match self {
            TaskError::NoContainer(_) | TaskError::NoProcess(_) | TaskError::Finished => {
                Code::NOT_FOUND
            }
            TaskError::ContainerExists(_) | TaskError::ProcessExists(_) => Code::ALREADY_EXISTS,
            TaskError::Phase { .. } | TaskError::NoVm | TaskError::SandboxRunsNothing(_) => {
                Code::FAILED_PRECONDITION
            }
            TaskError::Config(_)
            | TaskError::Bundle(_)
            | TaskError::Volume(_)
            | TaskError::Invalid(_)
            | TaskError::PodNetwork(_) => Code::INVALID_ARGUMENT,
            TaskError::Network(_) | TaskError::VmStart(_) | TaskError::Gone => Code::UNAVAILABLE,
            TaskError::Stdio(_) | TaskError::Internal(_) => Code::INTERNAL,
            TaskError::Agent { code, .. } => *code,
        }
    }
}

impl From<TaskError> for shim_ttrpc::Error {
    fn from(e: TaskError) -> Self {
        shim_ttrpc::Error::RpcStatus(shim_ttrpc::get_status(e.code(), chain(&e)))
    }
}

/// `e` and its causes, "outer: inner: innermost". A cause whose text the
/// error above it already shows (many wrap with "{0}: {1}") is not repeated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(e: TaskError) -> (Code, String) {
        match shim_ttrpc::Error::from(e) {
            shim_ttrpc::Error::RpcStatus(s) => (
                <Code as protobuf::Enum>::from_i32(s.code.value()).expect("a known code"),
                s.message,
            ),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn containerd_gets_the_codes_it_acts_on() {
        // A forced delete kills first and goes on only on NOT_FOUND.
        assert_eq!(status(TaskError::Finished).0, Code::NOT_FOUND);
        assert_eq!(
            status(TaskError::NoContainer("c1".into())),
            (Code::NOT_FOUND, "container c1".into())
        );
        assert_eq!(
            status(TaskError::container_phase("c1", "is running")),
            (Code::FAILED_PRECONDITION, "container c1 is running".into())
        );
        assert_eq!(
            status(TaskError::ProcessExists("e1".into())).0,
            Code::ALREADY_EXISTS
        );
        assert_eq!(status(TaskError::NoVm).0, Code::FAILED_PRECONDITION);
    }

    #[test]
    fn agent_errors_keep_the_agents_code_and_message() {
        let refused = ttrpc::Error::RpcStatus(ttrpc::get_status(
            ttrpc::Code::INVALID_ARGUMENT,
            "exec \"/no/such/binary\": not found",
        ));
        assert_eq!(
            status(TaskError::agent("starting the container", refused)),
            (
                Code::INVALID_ARGUMENT,
                "starting the container: exec \"/no/such/binary\": not found".into()
            )
        );
        let (code, msg) = status(TaskError::agent(
            "signalling",
            ttrpc::Error::Others("the connection is closed".into()),
        ));
        assert_eq!(code, Code::UNAVAILABLE);
        assert!(
            msg.starts_with("signalling: ") && msg.contains("closed"),
            "{msg}"
        );
    }

    #[test]
    fn causes_are_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let (code, msg) = status(TaskError::Config(ConfigError::Read(
            "/etc/husk/husk.toml".into(),
            io,
        )));
        assert_eq!(code, Code::INVALID_ARGUMENT);
        assert_eq!(msg, "husk.toml: reading /etc/husk/husk.toml: no such file");
        // VmError::Setup prints its cause itself: not twice.
        let io = std::io::Error::other("disk full");
        let (code, msg) = status(TaskError::VmStart(VmError::Setup(
            "the pod directory".into(),
            io,
        )));
        assert_eq!(code, Code::UNAVAILABLE);
        assert_eq!(msg, "starting the pod VM: the pod directory: disk full");
    }
}
