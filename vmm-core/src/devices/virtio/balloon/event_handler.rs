//! The balloon in the VMM's event loop: the eventfds of the queues in use
//! and, when the driver took the statistics queue, a timer that asks for
//! fresh statistics at the configured interval.

use std::{
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, Mutex},
    time::Duration,
};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::{eventfd::EventFd, timerfd::TimerFd};

use super::device::{lock, roles, Inner, Role};

const TOKEN_ACTIVATE: u32 = 1;
const TOKEN_TIMER: u32 = 2;
/// Queue `i` is token `TOKEN_QUEUE + i`.
const TOKEN_QUEUE: u32 = 16;

/// The event loop side of the balloon.
#[derive(Debug)]
pub struct BalloonHandler {
    inner: Arc<Mutex<Inner>>,
    activate_evt: EventFd,
    timer: TimerFd,
    stats_interval: Option<Duration>,
    /// Queue eventfds currently registered (raw fds), to unregister on reset.
    registered: Vec<RawFd>,
}

impl BalloonHandler {
    pub(super) fn new(
        inner: Arc<Mutex<Inner>>,
        activate_evt: EventFd,
        stats_interval: Option<Duration>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            inner,
            activate_evt,
            timer: TimerFd::new()?,
            stats_interval,
            registered: Vec::new(),
        })
    }

    /// Brings the registered queue eventfds and the timer in line with the
    /// device state (activated, reset, restored).
    fn on_activate(&mut self, ops: &mut EventOps) {
        let _ = self.activate_evt.read();
        for fd in self.registered.drain(..) {
            let _ = ops.remove(Events::empty_raw(fd));
        }
        let (fds, stats) = {
            let inner = lock(&self.inner);
            match inner.active.as_ref() {
                Some(a) => {
                    let fds: Vec<RawFd> = a
                        .evts
                        .iter()
                        .take(roles(inner.acked).count())
                        .map(AsRawFd::as_raw_fd)
                        .collect();
                    (fds, inner.queue_of(Role::Stats).is_some())
                }
                None => (Vec::new(), false),
            }
        };
        for (i, fd) in fds.iter().enumerate() {
            let token = TOKEN_QUEUE + u32::try_from(i).unwrap_or(0);
            match ops.add(Events::with_data_raw(*fd, token, EventSet::IN)) {
                Ok(()) => self.registered.push(*fd),
                Err(e) => crate::logger::guest_error!("balloon: watching queue {i}: {e:?}"),
            }
        }
        let arm = match (stats, self.stats_interval) {
            (true, Some(every)) => self.timer.reset(every, Some(every)),
            _ => self.timer.clear(),
        };
        if let Err(e) = arm {
            crate::logger::guest_error!("balloon: setting the statistics timer: {e}");
        }
        // The driver may have posted buffers before the handler heard of
        // the activation.
        let mut inner = lock(&self.inner);
        for i in 0..fds.len() {
            inner.process_queue(i);
        }
    }
}

impl MutEventSubscriber for BalloonHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            crate::logger::guest_error!("balloon: watching the activation eventfd: {e:?}");
        }
        if let Err(e) = ops.add(Events::with_data(&self.timer, TOKEN_TIMER, EventSet::IN)) {
            crate::logger::guest_error!("balloon: watching the statistics timer: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => self.on_activate(ops),
            TOKEN_TIMER => {
                let _ = self.timer.wait();
                lock(&self.inner).request_stats();
            }
            token if token >= TOKEN_QUEUE => {
                let i = (token - TOKEN_QUEUE) as usize;
                let mut inner = lock(&self.inner);
                if let Some(a) = inner.active.as_ref() {
                    if let Some(evt) = a.evts.get(i) {
                        let _ = evt.read();
                    }
                }
                inner.process_queue(i);
            }
            other => crate::logger::guest_warn!("balloon: unexpected event token {other}"),
        }
    }
}
