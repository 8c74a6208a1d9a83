//! The vsock device in the VMM's event loop: queue notifications, the host
//! listening socket and every host stream of the muxer.

use std::{
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, Mutex},
};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::{
    device::{Inner, EVQ, RXQ, TXQ},
    muxer::{Interest, Poller, Readiness},
};

const TOKEN_ACTIVATE: u32 = 1;
const TOKEN_RXQ: u32 = 2;
const TOKEN_TXQ: u32 = 3;
const TOKEN_EVQ: u32 = 4;
const TOKEN_LISTENER: u32 = 5;
const TOKEN_STREAM: u32 = 6;

/// The event loop side of the vsock device.
#[derive(Debug)]
pub struct VsockHandler {
    inner: Arc<Mutex<Inner>>,
    activate_evt: EventFd,
    /// Queue eventfds currently registered (raw fds), to unregister on reset.
    registered_queues: Vec<RawFd>,
}

struct OpsPoller<'a, 'b> {
    ops: &'a mut EventOps<'b>,
}

fn event_set(i: Interest) -> EventSet {
    let mut s = EventSet::empty();
    if i.read {
        s |= EventSet::IN;
    }
    if i.write {
        s |= EventSet::OUT;
    }
    s
}

impl Poller for OpsPoller<'_, '_> {
    fn add(&mut self, fd: RawFd, interest: Interest) {
        if let Err(e) = self
            .ops
            .add(Events::with_data_raw(fd, TOKEN_STREAM, event_set(interest)))
        {
            crate::logger::guest_error!("vsock: watching fd {fd}: {e:?}");
        }
    }
    fn modify(&mut self, fd: RawFd, interest: Interest) {
        if let Err(e) =
            self.ops
                .modify(Events::with_data_raw(fd, TOKEN_STREAM, event_set(interest)))
        {
            crate::logger::guest_error!("vsock: changing fd {fd}: {e:?}");
        }
    }
    fn remove(&mut self, fd: RawFd) {
        // The interest set is ignored on removal.
        let _ = self
            .ops
            .remove(Events::with_data_raw(fd, TOKEN_STREAM, EventSet::IN));
    }
}

impl VsockHandler {
    pub(super) fn new(inner: Arc<Mutex<Inner>>, activate_evt: EventFd) -> Self {
        Self {
            inner,
            activate_evt,
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
        let inner = self.inner.clone();
        let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.reset_pending {
            inner.reset_pending = false;
            inner.muxer.reset(&mut OpsPoller { ops });
        }
        let fds: Vec<(RawFd, u32)> = match inner.active.as_ref() {
            Some(a) => vec![
                (a.evts[RXQ].as_raw_fd(), TOKEN_RXQ),
                (a.evts[TXQ].as_raw_fd(), TOKEN_TXQ),
                (a.evts[EVQ].as_raw_fd(), TOKEN_EVQ),
            ],
            None => return,
        };
        for (fd, token) in fds {
            match ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                Ok(()) => self.registered_queues.push(fd),
                Err(e) => crate::logger::guest_error!("vsock: watching queue eventfd: {e:?}"),
            }
        }
        // Packets may have queued up (host connections) before the driver came;
        // after a restore the guest must hear that its connections are gone.
        inner.process_events();
        inner.process_tx(&mut OpsPoller { ops });
        inner.process_rx(&mut OpsPoller { ops });
    }
}

impl MutEventSubscriber for VsockHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            crate::logger::guest_error!("vsock: watching the activation eventfd: {e:?}");
        }
        let listener = self.lock().muxer.listener_fd();
        if let Err(e) = ops.add(Events::with_data_raw(
            listener,
            TOKEN_LISTENER,
            EventSet::IN,
        )) {
            crate::logger::guest_error!("vsock: watching the listening socket: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let set = events.event_set();
        match events.data() {
            TOKEN_ACTIVATE => self.on_activate(ops),
            TOKEN_RXQ | TOKEN_TXQ | TOKEN_EVQ => {
                let inner = self.inner.clone();
                let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
                let q = match events.data() {
                    TOKEN_RXQ => RXQ,
                    TOKEN_TXQ => TXQ,
                    _ => EVQ,
                };
                if let Some(a) = inner.active.as_ref() {
                    let _ = a.evts[q].read();
                }
                if q == EVQ {
                    inner.event_queue_notified();
                }
                let mut poller = OpsPoller { ops };
                inner.process_events();
                // TX first: guest packets often produce answers for RX.
                inner.process_tx(&mut poller);
                inner.process_rx(&mut poller);
            }
            TOKEN_LISTENER => {
                let inner = self.inner.clone();
                let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
                inner.muxer.accept(&mut OpsPoller { ops });
            }
            TOKEN_STREAM => {
                let inner = self.inner.clone();
                let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
                let ready = Readiness {
                    read: set.contains(EventSet::IN),
                    write: set.contains(EventSet::OUT),
                    hangup: set.intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP),
                    error: set.contains(EventSet::ERROR),
                };
                let mut poller = OpsPoller { ops };
                inner.muxer.handle_fd(events.fd(), ready, &mut poller);
                inner.process_rx(&mut poller);
            }
            other => crate::logger::guest_warn!("vsock: unexpected event token {other}"),
        }
    }
}
