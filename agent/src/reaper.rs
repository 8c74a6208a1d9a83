//! Exit statuses of the guest's processes.
//!
//! As PID 1 the agent is the parent of every orphan in the guest, including
//! each container's init and exec processes (the runtime helper that
//! creates them exits right away, so they are reparented to the agent). One
//! SIGCHLD handler reaps everything with `waitpid(-1)` and hands each status
//! to whoever watches that pid. A process can exit before anyone watches
//! it (a container that fails at once), so recent unclaimed statuses are
//! kept for a while; a watcher only takes one reaped after the moment it
//! names, so a status of an older process with a reused pid is never
//! mistaken for the new one's.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, OnceLock},
    time::Instant,
};

use nix::{
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use tokio::sync::oneshot;

/// How many unclaimed statuses are kept (orphans nobody asks about).
const MAX_UNCLAIMED: usize = 512;

#[derive(Debug, Default)]
struct State {
    waiters: HashMap<i32, oneshot::Sender<i32>>,
    unclaimed: VecDeque<(i32, i32, Instant)>,
}

/// Routes exit statuses to watchers.
#[derive(Debug, Default)]
pub struct Reaper {
    state: Mutex<State>,
}

/// The shell convention: the exit code, or 128 + the signal that ended it.
pub fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

impl Reaper {
    /// The agent's reaper.
    pub fn global() -> &'static Reaper {
        static REAPER: OnceLock<Reaper> = OnceLock::new();
        REAPER.get_or_init(Reaper::default)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The exit status of `pid`, once it exits. Only a status reaped after
    /// `since` counts (the process was known to exist then).
    pub fn watch(&self, pid: i32, since: Instant) -> oneshot::Receiver<i32> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.lock();
        if let Some(i) = st
            .unclaimed
            .iter()
            .position(|(p, _, at)| *p == pid && *at >= since)
        {
            if let Some((_, code, _)) = st.unclaimed.remove(i) {
                let _ = tx.send(code);
            }
            return rx;
        }
        st.waiters.insert(pid, tx);
        rx
    }

    /// Records that `pid` exited with `code`.
    pub fn deliver(&self, pid: i32, code: i32) {
        let mut st = self.lock();
        match st.waiters.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(code);
            }
            None => {
                if st.unclaimed.len() >= MAX_UNCLAIMED {
                    st.unclaimed.pop_front();
                }
                st.unclaimed.push_back((pid, code, Instant::now()));
            }
        }
    }

    /// Reaps every child that has exited.
    pub fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    if let (Some(pid), Some(code)) = (status.pid(), exit_code(status)) {
                        tracing::debug!(pid = pid.as_raw(), code, "reaped");
                        self.deliver(pid.as_raw(), code);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watcher_gets_the_status_delivered_later() {
        let r = Reaper::default();
        let mut rx = r.watch(42, Instant::now());
        assert!(rx.try_recv().is_err());
        r.deliver(42, 7);
        assert_eq!(rx.try_recv().ok(), Some(7));
    }

    #[test]
    fn an_early_exit_is_kept_for_a_late_watcher() {
        let r = Reaper::default();
        let before = Instant::now();
        r.deliver(43, 137);
        let mut rx = r.watch(43, before);
        assert_eq!(rx.try_recv().ok(), Some(137));
    }

    #[test]
    fn a_stale_status_of_a_reused_pid_is_not_taken() {
        let r = Reaper::default();
        r.deliver(44, 1);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut rx = r.watch(44, Instant::now());
        assert!(rx.try_recv().is_err(), "the old process's status");
        r.deliver(44, 0);
        assert_eq!(rx.try_recv().ok(), Some(0));
    }

    #[test]
    fn unclaimed_statuses_are_bounded() {
        let r = Reaper::default();
        for pid in 0..(i32::try_from(MAX_UNCLAIMED).expect("small") + 100) {
            r.deliver(pid, 0);
        }
        assert_eq!(r.lock().unclaimed.len(), MAX_UNCLAIMED);
    }

    #[test]
    #[allow(clippy::zombie_processes)] // reap_all is what waits for it
    fn real_children_are_reaped_with_their_codes() {
        let r = Reaper::default();
        let since = Instant::now();
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 3"])
            .spawn()
            .expect("spawn");
        let pid = i32::try_from(child.id()).expect("pid");
        let mut rx = r.watch(pid, since);
        for _ in 0..500 {
            r.reap_all();
            if let Ok(code) = rx.try_recv() {
                assert_eq!(code, 3);
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("child not reaped");
    }
}
