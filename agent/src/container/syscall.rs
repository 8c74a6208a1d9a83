//! The system calls the container registry makes itself, behind a small
//! trait: the registry's rules (who may be signalled, what a failed create
//! leaves to clean up) are then unit-tested against [`test::Recording`],
//! which records the calls instead of making them (the shape of youki's
//! `syscall/test.rs`). Everything else the registry does in the guest goes
//! through the runtime helper ([`super::helper::Runtime`]).

use std::{future::Future, path::PathBuf, time::Duration};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::cgroups;

/// The registry's direct system calls.
pub trait Syscall: Send + Sync + 'static {
    /// Sends `signal` to process `pid`.
    fn kill(&self, pid: i32, signal: Signal) -> nix::Result<()>;

    /// Removes the cgroup at `dir` once its processes are gone, killing
    /// what is left and waiting for up to `within`.
    fn remove_cgroup(&self, dir: PathBuf, within: Duration) -> impl Future<Output = ()> + Send;
}

/// The real system calls.
#[derive(Debug, Default, Clone, Copy)]
pub struct Linux;

impl Syscall for Linux {
    fn kill(&self, pid: i32, signal: Signal) -> nix::Result<()> {
        kill(Pid::from_raw(pid), signal)
    }

    async fn remove_cgroup(&self, dir: PathBuf, within: Duration) {
        cgroups::remove(&dir, within).await
    }
}

#[cfg(test)]
pub mod test {
    //! A [`Syscall`] that records instead of calling.

    use std::sync::Mutex;

    use super::*;

    /// One recorded call.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        Kill(i32, Signal),
        RemoveCgroup(PathBuf),
    }

    /// Records every call; `kill` fails with `ESRCH` for pids listed in
    /// `gone`.
    #[derive(Debug, Default)]
    pub struct Recording {
        pub calls: Mutex<Vec<Call>>,
        pub gone: Vec<i32>,
    }

    impl Recording {
        pub fn calls(&self) -> Vec<Call> {
            self.calls.lock().expect("lock").clone()
        }
    }

    impl Syscall for Recording {
        fn kill(&self, pid: i32, signal: Signal) -> nix::Result<()> {
            self.calls
                .lock()
                .expect("lock")
                .push(Call::Kill(pid, signal));
            if self.gone.contains(&pid) {
                return Err(nix::errno::Errno::ESRCH);
            }
            Ok(())
        }

        async fn remove_cgroup(&self, dir: PathBuf, _within: Duration) {
            self.calls
                .lock()
                .expect("lock")
                .push(Call::RemoveCgroup(dir));
        }
    }
}
