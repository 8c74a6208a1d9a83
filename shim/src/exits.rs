//! Exit statuses of the shim's own children (husk-vmm, husk-virtiofsd).
//!
//! The containerd-shim crate reaps every child of the shim (it is a
//! subreaper) and reports statuses on its monitor; this turns them into a
//! watch channel per pid. A child can exit before anyone watches it, so
//! statuses nobody asked for yet are kept (bounded).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use containerd_shim::{
    asynchronous::monitor::monitor_subscribe,
    monitor::{Subject, Topic},
};
use tokio::sync::watch;

const MAX_EARLY: usize = 256;

#[derive(Debug, Default)]
struct State {
    watchers: HashMap<i32, watch::Sender<Option<i32>>>,
    early: HashMap<i32, i32>,
}

/// Routes child exit statuses to watchers.
#[derive(Debug, Default)]
pub struct Exits {
    state: Mutex<State>,
}

impl Exits {
    /// Starts listening to the shim's reaper.
    pub async fn start() -> Arc<Self> {
        let exits = Arc::new(Self::default());
        match monitor_subscribe(Topic::Pid).await {
            Ok(mut sub) => {
                let e = exits.clone();
                tokio::spawn(async move {
                    while let Some(ev) = sub.rx.recv().await {
                        if let Subject::Pid(pid) = ev.subject {
                            e.deliver(pid, ev.exit_code);
                        }
                    }
                });
            }
            Err(e) => tracing::error!("cannot watch child exits: {e}"),
        }
        exits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A channel that becomes `Some(status)` when `pid` exits.
    pub fn watch(&self, pid: i32) -> watch::Receiver<Option<i32>> {
        let mut st = self.lock();
        let early = st.early.remove(&pid);
        let (tx, rx) = watch::channel(early);
        if early.is_none() {
            st.watchers.insert(pid, tx);
        }
        rx
    }

    /// Records that `pid` exited with `code`.
    pub fn deliver(&self, pid: i32, code: i32) {
        let mut st = self.lock();
        match st.watchers.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(Some(code));
            }
            None => {
                if st.early.len() >= MAX_EARLY {
                    st.early.clear();
                }
                st.early.insert(pid, code);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_and_early_watchers_get_the_status() {
        let e = Exits::default();
        let rx = e.watch(10);
        assert_eq!(*rx.borrow(), None);
        e.deliver(10, 137);
        assert_eq!(*rx.borrow(), Some(137));
        e.deliver(11, 0);
        assert_eq!(*e.watch(11).borrow(), Some(0));
    }
}
