//! The net device in the VMM's event loop: its two queue eventfds and the
//! tap.
//!
//! The tap is watched edge-triggered: each time it becomes readable the
//! handler reads frames until the tap is empty or the guest has no RX
//! buffer left; in the latter case the guest's next RX notification (it
//! posted buffers) resumes the reading. So a guest that stops taking
//! frames never makes the loop spin, and the frames wait in the tap's own
//! queue (the kernel drops beyond it, as a full NIC ring would).

use std::{
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, Mutex},
};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::device::{Inner, RXQ, TXQ};

const TOKEN_ACTIVATE: u32 = 1;
const TOKEN_RXQ: u32 = 2;
const TOKEN_TXQ: u32 = 3;
const TOKEN_TAP: u32 = 4;

/// The event loop side of the net device.
#[derive(Debug)]
pub struct NetHandler {
    inner: Arc<Mutex<Inner>>,
    activate_evt: EventFd,
    backend_fd: Option<RawFd>,
    /// Queue eventfds currently registered (raw fds), to unregister on reset.
    registered_queues: Vec<RawFd>,
}

impl NetHandler {
    pub(super) fn new(
        inner: Arc<Mutex<Inner>>,
        activate_evt: EventFd,
        backend_fd: Option<RawFd>,
    ) -> Self {
        Self {
            inner,
            activate_evt,
            backend_fd,
            registered_queues: Vec::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the registered queue eventfds in line with the device state.
    fn on_activate(&mut self, ops: &mut EventOps) {
        let _ = self.activate_evt.read();
        for fd in self.registered_queues.drain(..) {
            let _ = ops.remove(Events::empty_raw(fd));
        }
        let fds: Vec<(RawFd, u32)> = match self.lock().active.as_ref() {
            Some(a) => vec![
                (a.evts[RXQ].as_raw_fd(), TOKEN_RXQ),
                (a.evts[TXQ].as_raw_fd(), TOKEN_TXQ),
            ],
            None => return,
        };
        for (fd, token) in fds {
            match ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                Ok(()) => self.registered_queues.push(fd),
                Err(e) => crate::logger::guest_error!("net: watching queue eventfd: {e:?}"),
            }
        }
        // Frames may have waited in the tap (edge already passed), and the
        // guest may have queued frames before the handler saw activation.
        let mut inner = self.lock();
        inner.process_tx();
        inner.process_rx();
    }
}

impl MutEventSubscriber for NetHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            crate::logger::guest_error!("net: watching the activation eventfd: {e:?}");
        }
        if let Some(fd) = self.backend_fd {
            if let Err(e) = ops.add(Events::with_data_raw(
                fd,
                TOKEN_TAP,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            )) {
                crate::logger::guest_error!("net: watching the tap: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => self.on_activate(ops),
            TOKEN_RXQ | TOKEN_TXQ => {
                let mut inner = self.lock();
                let q = if events.data() == TOKEN_RXQ { RXQ } else { TXQ };
                if let Some(a) = inner.active.as_ref() {
                    let _ = a.evts[q].read();
                }
                inner.process_tx();
                inner.process_rx();
            }
            TOKEN_TAP => {
                if events
                    .event_set()
                    .intersects(EventSet::ERROR | EventSet::HANG_UP)
                {
                    crate::logger::guest_error!("net: the tap reports an error or hang-up");
                    if let Some(fd) = self.backend_fd.take() {
                        let _ = ops.remove(Events::empty_raw(fd));
                    }
                    return;
                }
                self.lock().process_rx();
            }
            other => crate::logger::guest_warn!("net: unexpected event token {other}"),
        }
    }
}
