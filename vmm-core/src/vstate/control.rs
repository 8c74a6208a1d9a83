//! How the VMM steers a vCPU thread: what it wants (run, pause, stop) and
//! what the thread is doing, behind one lock with a condition variable.
//!
//! A vCPU sitting in `KVM_RUN` does not look at this; the VMM knocks it out
//! with a signal ([`VcpuControl::kick`]) and the thread checks on its way
//! back in. Kicks are only sent while the thread is known to be alive, so a
//! signal never reaches a thread id that was reused.

use std::{
    collections::VecDeque,
    sync::{Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use super::vcpu::Vcpu;

/// Work the VMM hands a parked vCPU thread (saving or restoring its state:
/// the vCPU's KVM descriptor belongs to that thread).
pub type VcpuJob = Box<dyn FnOnce(&mut Vcpu) + Send>;

/// Why a parked vCPU thread woke up.
pub enum Wake {
    /// The VMM wants something other than `Pause` now.
    Wanted(Wanted),
    /// A job to run while staying paused.
    Job(VcpuJob),
}

impl std::fmt::Debug for Wake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Wanted(w) => write!(f, "Wanted({w:?})"),
            Self::Job(_) => write!(f, "Job"),
        }
    }
}

/// The signal that knocks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of the kick signal: without it the signal
/// would kill the process instead of interrupting KVM_RUN.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// What the VMM wants the vCPU to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Run the guest.
    Run,
    /// Stop running the guest until told otherwise (state is kept).
    Pause,
    /// Leave the run loop for good.
    Stop,
}

/// What the vCPU thread is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Created, not yet in its run loop.
    Starting,
    /// In or around `KVM_RUN`.
    Running,
    /// Parked; guest state is stable and may be read.
    Paused,
    /// The loop ended; the thread is gone or about to be.
    Exited,
}

struct Ctl {
    wanted: Wanted,
    state: RunState,
    thread: Option<libc::pthread_t>,
    jobs: VecDeque<VcpuJob>,
}

impl std::fmt::Debug for Ctl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctl")
            .field("wanted", &self.wanted)
            .field("state", &self.state)
            .field("jobs", &self.jobs.len())
            .finish()
    }
}

/// Shared between the VMM and one vCPU thread.
#[derive(Debug)]
pub struct VcpuControl {
    ctl: Mutex<Ctl>,
    changed: Condvar,
    kick_signal: i32,
}

impl VcpuControl {
    /// A control for a vCPU that will be knocked out of KVM_RUN with
    /// `kick_signal`.
    pub fn new(kick_signal: i32) -> Self {
        Self {
            ctl: Mutex::new(Ctl {
                wanted: Wanted::Run,
                state: RunState::Starting,
                thread: None,
                jobs: VecDeque::new(),
            }),
            changed: Condvar::new(),
            kick_signal,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The VMM asks for `wanted` and kicks the thread.
    pub fn request(&self, wanted: Wanted) {
        let mut c = self.lock();
        if c.wanted == Wanted::Stop {
            return; // stopping is final
        }
        c.wanted = wanted;
        Self::kick_locked(&c, self.kick_signal);
        self.changed.notify_all();
    }

    /// What the VMM wants now (the vCPU thread asks before each KVM_RUN).
    pub fn wanted(&self) -> Wanted {
        self.lock().wanted
    }

    /// What the thread is doing now.
    pub fn state(&self) -> RunState {
        self.lock().state
    }

    fn kick_locked(c: &Ctl, signal: i32) {
        if let (Some(t), RunState::Running) = (c.thread, c.state) {
            // SAFETY: `t` is the id of the live vCPU thread: it is recorded by
            // that thread and the state leaves `Running` (under this lock)
            // before the thread ends, so the id cannot have been reused.
            unsafe { libc::pthread_kill(t, signal) };
        }
    }

    /// Kicks the thread out of KVM_RUN (if it is running).
    pub fn kick(&self) {
        Self::kick_locked(&self.lock(), self.kick_signal);
    }

    /// Waits until the thread is in `state` (or has exited), kicking it
    /// every few milliseconds: a kick that lands just before the thread
    /// re-enters KVM_RUN is lost otherwise. Returns whether it got there.
    pub fn wait_for(&self, state: RunState, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut c = self.lock();
        loop {
            if c.state == state || c.state == RunState::Exited {
                return c.state == state;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            Self::kick_locked(&c, self.kick_signal);
            let wait = (deadline - now).min(Duration::from_millis(5));
            c = self
                .changed
                .wait_timeout(c, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    // ---- the vCPU thread's side ----

    /// The thread records itself and starts running.
    pub fn thread_started(&self) {
        let mut c = self.lock();
        // SAFETY: pthread_self has no preconditions.
        c.thread = Some(unsafe { libc::pthread_self() });
        c.state = RunState::Running;
        self.changed.notify_all();
    }

    /// Queues `job` for the vCPU thread; it runs once the thread is parked
    /// (the VMM pauses the vCPU first). Returns false if the thread exited.
    pub fn post(&self, job: VcpuJob) -> bool {
        let mut c = self.lock();
        if c.state == RunState::Exited {
            return false;
        }
        c.jobs.push_back(job);
        self.changed.notify_all();
        true
    }

    /// The thread parks while the VMM wants it paused. It wakes for a job
    /// (and stays `Paused` while running it) or when the VMM wants
    /// something else.
    pub fn park(&self) -> Wake {
        let mut c = self.lock();
        c.state = RunState::Paused;
        self.changed.notify_all();
        loop {
            if let Some(job) = c.jobs.pop_front() {
                return Wake::Job(job);
            }
            if c.wanted != Wanted::Pause {
                break;
            }
            c = self.changed.wait(c).unwrap_or_else(|e| e.into_inner());
        }
        c.state = RunState::Running;
        self.changed.notify_all();
        Wake::Wanted(c.wanted)
    }

    /// The thread leaves its loop; no kick may reach it after this.
    pub fn thread_exiting(&self) {
        let mut c = self.lock();
        c.state = RunState::Exited;
        c.thread = None;
        c.jobs.clear();
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pause_resume_stop_with_a_thread() {
        install_kick_handler().expect("handler");
        let ctl = Arc::new(VcpuControl::new(kick_signal()));
        // The "vCPU": spins until told to stop, parking when paused.
        let c = ctl.clone();
        let spun = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = spun.clone();
        let t = std::thread::spawn(move || {
            c.thread_started();
            let mut spins = 0u64;
            loop {
                match c.wanted() {
                    Wanted::Stop => break,
                    Wanted::Pause => {
                        if matches!(c.park(), Wake::Wanted(Wanted::Stop)) {
                            break;
                        }
                    }
                    Wanted::Run => {
                        spins += 1;
                        s.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                std::thread::yield_now();
            }
            c.thread_exiting();
            spins
        });
        assert!(ctl.wait_for(RunState::Running, Duration::from_secs(5)));
        // Let it run its loop at least once before the first pause.
        while !spun.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::yield_now();
        }
        ctl.request(Wanted::Pause);
        assert!(ctl.wait_for(RunState::Paused, Duration::from_secs(5)));
        assert_eq!(ctl.state(), RunState::Paused);
        ctl.request(Wanted::Run);
        assert!(ctl.wait_for(RunState::Running, Duration::from_secs(5)));
        ctl.request(Wanted::Pause);
        assert!(ctl.wait_for(RunState::Paused, Duration::from_secs(5)));
        ctl.request(Wanted::Stop);
        assert!(t.join().expect("join") > 0);
        assert_eq!(ctl.state(), RunState::Exited);
        // Stop is final.
        ctl.request(Wanted::Run);
        assert_eq!(ctl.wanted(), Wanted::Stop);
    }

    #[test]
    fn waiting_times_out_without_a_thread() {
        let ctl = VcpuControl::new(kick_signal());
        assert!(!ctl.wait_for(RunState::Paused, Duration::from_millis(20)));
    }
}
