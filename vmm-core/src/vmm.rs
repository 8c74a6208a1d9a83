//! Building and running one microVM.
//!
//! [`Vmm::build`] goes through the boot recipe in order, each step with its
//! own error:
//!
//! 1. validate the configuration;
//! 2. open KVM and check its capabilities; pick the CPU profile;
//! 3. create guest memory (memfd, shared) and the VM with its irqchip;
//! 4. create the devices (`device_manager`): serial console (if asked), the
//!    i8042 reset line, the virtio-mmio devices (vsock, fs, net, balloon);
//!    wire their interrupts (irqfd) and queue notifications (ioeventfd);
//! 5. load the kernel and initramfs, write the command line, MP table and
//!    PVH start info;
//! 6. create and configure the vCPUs.
//!
//! [`Vmm::run`] starts the vCPU threads and runs the event loop until the
//! guest resets or shuts down, a vCPU fails, or a stop is requested (API or
//! SIGTERM/SIGINT). It then stops every vCPU and returns why the VM ended.

use std::{
    fs::File,
    os::fd::AsRawFd,
    sync::{
        mpsc::{channel, Receiver, Sender},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    api::{ApiServer, Shared, VmState},
    arch::cpuid::CpuProfile,
    boot,
    config::{ConfigError, VmConfig},
    device_manager::{self, Backends, Devices},
    devices::virtio::mmio::MmioTransport,
    memory::{create_guest_memory, GuestMemory},
    persist::{self, Persist, PersistError},
    profile::{session::Session, Profiler},
    seccomp::{self, ThreadKind},
    snapshot::Identity,
    template::{TemplateMaker, TemplateOutcome},
    vstate::{
        control::{install_kick_handler, kick_signal, RunState, VcpuControl, Wanted},
        vcpu::{Vcpu, VcpuExit},
        vm,
    },
};

/// The guest kernel's TCP metrics cache size. The cache is a global hash
/// table (8,192 buckets at husk's memory sizes) that every network
/// namespace's exit scans in full: 0.3 s of emulated kernel work per
/// container exit where guest kernel code is emulated (docs/profiling.md),
/// for a cache of per-peer TCP parameters that a pod, talking to few
/// peers, barely uses.
pub const TCP_METRICS_BUCKETS: &str = "tcpmhash_entries=16";

/// The kernel command line words every husk guest boots with, before the
/// CPU profile's and the devices' words. Part of the template key: a
/// template booted with other words is another template.
pub const BASE_CMDLINE: [&str; 4] = ["reboot=k", "panic=-1", "quiet", TCP_METRICS_BUCKETS];

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset itself (husk's guest powers off this way).
    GuestReset,
    /// The guest shut down (triple fault).
    GuestShutdown,
    /// A stop was requested through the API.
    ApiStop,
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// A vCPU failed.
    VcpuError(String),
    /// A template snapshot was written (`--make-template`).
    TemplateWritten,
    /// A template snapshot could not be made.
    TemplateFailed(String),
}

impl ExitReason {
    /// The VMM's exit status for this reason: 0 for an orderly end.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::GuestReset | Self::ApiStop | Self::Signal(_) | Self::TemplateWritten => 0,
            Self::TemplateFailed(_) => 1,
            Self::GuestShutdown | Self::VcpuError(_) => 1,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::GuestReset => write!(f, "the guest reset the VM"),
            Self::GuestShutdown => write!(f, "the guest shut down (triple fault)"),
            Self::ApiStop => write!(f, "stopped through the API"),
            Self::TemplateWritten => write!(f, "template snapshot written"),
            Self::TemplateFailed(e) => write!(f, "template snapshot failed: {e}"),
            Self::Signal(s) => write!(f, "stopped by signal {s}"),
            Self::VcpuError(e) => write!(f, "{e}"),
        }
    }
}

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is invalid.
    #[error("invalid VM configuration")]
    Config(#[from] ConfigError),
    /// KVM setup failed.
    #[error("setting up KVM")]
    Vm(#[from] vm::VmError),
    /// Guest memory could not be created.
    #[error("creating guest memory")]
    Memory(#[from] crate::memory::MemoryError),
    /// Loading the guest failed.
    #[error("loading the guest")]
    Boot(#[from] boot::BootError),
    /// A vCPU could not be set up.
    #[error("setting up vCPUs")]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    /// A device could not be set up.
    #[error("setting up {0}")]
    Device(
        &'static str,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
    /// The event loop failed.
    #[error("event loop")]
    EventLoop(#[source] event_manager::Error),
    /// A thread could not be started.
    #[error("starting a thread")]
    Thread(#[source] std::io::Error),
    /// The snapshot could not be restored.
    #[error("restoring the snapshot")]
    Restore(#[source] PersistError),
    /// Seccomp filters could not be set up.
    #[error("confining the VMM")]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

pub(crate) fn device_err<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> VmmError {
    move |e| VmmError::Device(what, Box::new(e))
}

/// What the VMM's event loop holds.
pub(crate) type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Watches the eventfds that end the VM: vCPU exits, the i8042 reset line,
/// an API stop, and SIGTERM/SIGINT (through a signalfd).
struct Control {
    exit_evt: EventFd,
    reset_evt: EventFd,
    signals: Option<nix::sys::signalfd::SignalFd>,
    vcpu_events: Receiver<(u8, VcpuExit)>,
    shared: Arc<Mutex<Shared>>,
    outcome: Arc<Mutex<Option<ExitReason>>>,
    template: Arc<Mutex<Option<TemplateOutcome>>>,
}

impl Control {
    fn finish(&self, reason: ExitReason) {
        let mut o = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if o.is_none() {
            tracing::info!("VM ending: {reason}");
            *o = Some(reason);
        }
    }
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.exit_evt.as_raw_fd(), self.reset_evt.as_raw_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("watching a control eventfd: {e:?}");
            }
        }
        if let Some(s) = &self.signals {
            if let Err(e) = ops.add(Events::new_raw(s.as_raw_fd(), EventSet::IN)) {
                tracing::error!("watching the signalfd: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            self.finish(ExitReason::GuestReset);
        } else if fd == self.exit_evt.as_raw_fd() {
            let _ = self.exit_evt.read();
            match self
                .template
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                Some(TemplateOutcome::Written(_)) => self.finish(ExitReason::TemplateWritten),
                Some(TemplateOutcome::Failed(e)) => self.finish(ExitReason::TemplateFailed(e)),
                None => {}
            }
            if self
                .shared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .stop_requested
            {
                self.finish(ExitReason::ApiStop);
            }
            while let Ok((index, exit)) = self.vcpu_events.try_recv() {
                match exit {
                    VcpuExit::Reset => self.finish(ExitReason::GuestReset),
                    VcpuExit::Shutdown => self.finish(ExitReason::GuestShutdown),
                    VcpuExit::Stopped => {}
                    VcpuExit::Error(e) => {
                        tracing::error!(vcpu = index, "{e}");
                        self.finish(ExitReason::VcpuError(e));
                    }
                }
            }
        } else if let Some(s) = &mut self.signals {
            if let Ok(Some(info)) = s.read_signal() {
                self.finish(ExitReason::Signal(info.ssi_signo as i32));
            }
        }
    }
}

/// A built microVM, ready to run.
pub struct Vmm {
    config: VmConfig,
    _kvm: Kvm,
    _vm: Arc<VmFd>,
    _memfd: Arc<File>,
    _mem: GuestMemory,
    vcpus: Vec<Vcpu>,
    controls: Arc<[Arc<VcpuControl>]>,
    event_manager: EventManager<Subscriber>,
    exit_evt: EventFd,
    vcpu_tx: Sender<(u8, VcpuExit)>,
    shared: Arc<Mutex<Shared>>,
    outcome: Arc<Mutex<Option<ExitReason>>>,
    /// The kernel command line the guest got.
    pub cmdline: String,
    /// Samples where the guest spends its time, when asked to.
    profiler: Option<Arc<Profiler>>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("config", &self.config)
            .field("cmdline", &self.cmdline)
            .finish_non_exhaustive()
    }
}

/// Blocks SIGTERM/SIGINT in the calling thread (inherited by every thread it
/// starts) and returns a signalfd that reads them.
pub fn take_termination_signals() -> Option<nix::sys::signalfd::SignalFd> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    if set.thread_block().is_err() {
        return None;
    }
    nix::sys::signalfd::SignalFd::with_flags(
        &set,
        nix::sys::signalfd::SfdFlags::SFD_NONBLOCK | nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
    )
    .ok()
}

impl Vmm {
    /// Builds the VM described by `config` (see the module docs for steps).
    /// `signals`, if given, ends the VM on SIGTERM/SIGINT.
    pub fn build(
        config: VmConfig,
        signals: Option<nix::sys::signalfd::SignalFd>,
    ) -> Result<Self, VmmError> {
        config.validate()?;
        let backends = Backends::connect(&config)?;
        Self::build_with(config, signals, &backends)
    }

    /// Builds the VM described by `config` on already connected `backends`.
    pub fn build_with(
        config: VmConfig,
        signals: Option<nix::sys::signalfd::SignalFd>,
        backends: &Backends,
    ) -> Result<Self, VmmError> {
        // 1. Configuration.
        config.validate()?;

        // 2. KVM.
        let kvm = vm::open_kvm(&config.kvm_device)?;
        let profile = CpuProfile::detect();
        tracing::debug!(?profile, "CPU profile");

        // 3. Memory and the VM.
        let mem_size = config.mem_mib << 20;
        let (mem, memfd) = create_guest_memory(mem_size)?;
        let memfd = Arc::new(memfd);
        let vm = Arc::new(vm::create_vm(&kvm, &mem)?);

        // 4. Devices.
        let mut event_manager = EventManager::<Subscriber>::new().map_err(VmmError::EventLoop)?;
        let mut cmdline: Vec<String> = BASE_CMDLINE.iter().map(|w| w.to_string()).collect();
        let profile_words = profile.cmdline();
        if !profile_words.is_empty() {
            cmdline.push(profile_words.to_string());
        }

        let Devices {
            pio,
            mmio,
            transports,
            cmdline: device_words,
            reset_evt,
            balloon: balloon_control,
        } = device_manager::attach_all(&config, &vm, &mem, backends, &mut event_manager)?;
        cmdline.extend(device_words);

        // 5. Guest: a snapshot to restore, or the kernel to boot.
        let device_types: Vec<u32> = transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).device_type())
            .collect();
        let identity = Identity {
            husk_version: env!("CARGO_PKG_VERSION").to_string(),
            fingerprint: persist::fingerprint(
                config.vcpus,
                mem_size,
                &guest_cpuid(&kvm, profile, config.vcpus)?,
                &device_types,
            ),
            mem_size,
        };
        let (entry, restored, cmdline) = match &config.restore_from {
            Some(path) => {
                let snap =
                    restore_snapshot(path, &identity, &memfd, &vm, &transports, config.vcpus)?;
                (
                    0,
                    Some(snap.vcpus),
                    format!("(restored from {})", path.display()),
                )
            }
            None => {
                let boot_info = boot::load_kernel(&mem, &config.kernel)?;
                let initramfs = match &config.initramfs {
                    Some(p) => Some(boot::load_initramfs(&mem, p, boot_info.kernel_end)?),
                    None => None,
                };
                if !config.extra_cmdline.trim().is_empty() {
                    cmdline.push(config.extra_cmdline.trim().to_string());
                }
                let cmdline = cmdline.join(" ");
                boot::write_boot_data(&mem, &cmdline, config.vcpus, initramfs)?;
                (boot_info.entry, None, cmdline)
            }
        };

        // 6. vCPUs.
        let pio = Arc::new(pio);
        let mmio = Arc::new(mmio);
        let mut vcpus = Vec::new();
        let mut controls = Vec::new();
        for index in 0..config.vcpus {
            let control = Arc::new(VcpuControl::new(kick_signal()));
            let vcpu = Vcpu::new(
                &vm,
                index,
                pio.clone(),
                mmio.clone(),
                mem.clone(),
                control.clone(),
            )?;
            match &restored {
                Some(states) => vcpu.restore_state(&states[usize::from(index)])?,
                None => {
                    vcpu.configure(&kvm, profile, config.vcpus)?;
                    if index == 0 {
                        vcpu.set_pvh_entry(entry)?;
                    }
                }
            }
            vcpus.push(vcpu);
            controls.push(control);
        }
        let controls: Arc<[Arc<VcpuControl>]> = controls.into();
        // Probed now: seccomp keeps vCPU threads from asking KVM later.
        let msrs = match vcpus.first() {
            Some(v) => v.msrs_to_save(&kvm)?,
            None => Vec::new(),
        };
        let persist = Arc::new(Persist {
            vm: vm.clone(),
            memfd: memfd.clone(),
            identity,
            transports,
            vcpus: controls.clone(),
            msrs: Arc::new(msrs),
        });

        let exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(device_err("the exit eventfd"))?;
        let (vcpu_tx, vcpu_rx) = channel();
        let shared = Arc::new(Mutex::new(Shared {
            state: VmState::Running,
            started: Instant::now(),
            stop_requested: false,
            profile: None,
            balloon: balloon_control,
        }));
        let outcome = Arc::new(Mutex::new(None));
        let template_outcome = Arc::new(Mutex::new(None));
        if let Some(out) = &config.make_template {
            let uds = config
                .vsock
                .as_ref()
                .map(|v| v.uds_path.clone())
                .ok_or_else(|| {
                    VmmError::Device(
                        "the template maker",
                        "making a template needs a vsock device".into(),
                    )
                })?;
            let done = exit_evt
                .try_clone()
                .map_err(device_err("the template maker"))?;
            let maker =
                TemplateMaker::new(&uds, out, persist.clone(), template_outcome.clone(), done)
                    .map_err(device_err("the template readiness socket"))?;
            event_manager.add_subscriber(Arc::new(Mutex::new(maker)));
        }
        let control = Control {
            exit_evt: exit_evt
                .try_clone()
                .map_err(device_err("the exit eventfd"))?,
            reset_evt,
            signals,
            vcpu_events: vcpu_rx,
            shared: shared.clone(),
            outcome: outcome.clone(),
            template: template_outcome.clone(),
        };
        event_manager.add_subscriber(Arc::new(Mutex::new(control)));
        if let Some(path) = &config.api_socket {
            let wake = exit_evt.try_clone().map_err(device_err("the API socket"))?;
            let api = ApiServer::new(
                path,
                shared.clone(),
                controls.clone(),
                persist.clone(),
                Box::new(move || {
                    let _ = wake.write(1);
                }),
            )
            .map_err(device_err("the API socket"))?;
            event_manager.add_subscriber(Arc::new(Mutex::new(api)));
        }

        Ok(Self {
            config,
            _kvm: kvm,
            _vm: vm,
            _memfd: memfd,
            _mem: mem,
            vcpus,
            controls,
            event_manager,
            exit_evt,
            vcpu_tx,
            shared,
            outcome,
            cmdline,
            profiler: None,
        })
    }

    /// Profiles the guest while it runs (`profile`): each vCPU sampled `hz`
    /// times a second, kernel stacks walked if `walk_stacks` (the guest
    /// kernel keeps frame pointers). Reports go to `out`, named with
    /// `symbols`: slices when the API marks them, the whole run when the
    /// returned session finishes.
    pub fn enable_profiler(
        &mut self,
        hz: u32,
        walk_stacks: bool,
        out: &std::path::Path,
        symbols: crate::profile::symbols::Symbols,
    ) -> Arc<Session> {
        let vcpus = u8::try_from(self.controls.len()).unwrap_or(u8::MAX);
        let p = Arc::new(Profiler::new(vcpus, hz, walk_stacks));
        self.profiler = Some(p.clone());
        let session = Arc::new(Session::new(p, out, symbols));
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .profile = Some(session.clone());
        session
    }

    /// Runs the VM to its end; returns why it ended.
    pub fn run(mut self) -> Result<ExitReason, VmmError> {
        // The handler does nothing (async-signal-safe); it only exists so the
        // signal interrupts KVM_RUN instead of killing the process.
        install_kick_handler().map_err(VmmError::Thread)?;

        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .started = Instant::now();
        release_startup_heap();
        let filters = if self.config.seccomp {
            seccomp::install_sigsys_handler()?;
            Some((
                seccomp::filter(ThreadKind::Vmm)?,
                Arc::new(seccomp::filter(ThreadKind::Vcpu)?),
            ))
        } else {
            tracing::warn!("seccomp filters are off: the VMM is not confined");
            None
        };
        let mut handles: Vec<JoinHandle<()>> = Vec::new();
        for mut vcpu in std::mem::take(&mut self.vcpus) {
            if let Some(p) = &self.profiler {
                vcpu.set_profiler(p.clone());
            }
            let tx = self.vcpu_tx.clone();
            let wake = self.exit_evt.try_clone().map_err(VmmError::Thread)?;
            let name = format!("vcpu{}", handles.len());
            let vcpu_filter = filters.as_ref().map(|(_, v)| v.clone());
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let confine = move || match vcpu_filter {
                        Some(f) => seccomp::apply(ThreadKind::Vcpu, &f).map_err(|e| format!("{e}")),
                        None => Ok(()),
                    };
                    let wake = move || {
                        let _ = wake.write(1);
                    };
                    vcpu.run(tx, wake, confine)
                })
                .map_err(VmmError::Thread)?;
            handles.push(handle);
        }
        let sampler = match &self.profiler {
            Some(p) => match self.spawn_sampler(p.clone(), filters.is_some()) {
                Ok(h) => Some(h),
                Err(e) => {
                    stop_vcpus(&self.controls, handles);
                    return Err(e);
                }
            },
            None => None,
        };
        if let Some((vmm_filter, _)) = &filters {
            // From here on the main thread only runs the event loop and the
            // teardown; the vCPU threads confine themselves.
            if let Err(e) = seccomp::apply(ThreadKind::Vmm, vmm_filter) {
                stop_vcpus(&self.controls, handles);
                return Err(e.into());
            }
        }

        let result = loop {
            if let Some(reason) = self
                .outcome
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                break Ok(reason);
            }
            if let Err(e) = self.event_manager.run() {
                break Err(VmmError::EventLoop(e));
            }
        };

        self.shared.lock().unwrap_or_else(|e| e.into_inner()).state = VmState::Stopping;
        if let (Some(p), Some(h)) = (&self.profiler, sampler) {
            p.finish();
            let _ = h.join();
        }
        stop_vcpus(&self.controls, handles);
        result
    }

    /// Starts the profiler's sampling thread, confined to sleeping and
    /// kicking vCPU threads when `confine`.
    fn spawn_sampler(&self, p: Arc<Profiler>, confine: bool) -> Result<JoinHandle<()>, VmmError> {
        let filter = if confine {
            Some(seccomp::filter(ThreadKind::Sampler)?)
        } else {
            None
        };
        let controls = self.controls.clone();
        std::thread::Builder::new()
            .name("profiler".into())
            .spawn(move || {
                if let Some(f) = filter {
                    if let Err(e) = seccomp::apply(ThreadKind::Sampler, &f) {
                        tracing::error!("the profiler cannot confine itself: {e}; not sampling");
                        return;
                    }
                }
                p.run(&controls);
            })
            .map_err(VmmError::Thread)
    }
}

/// The CPUID vCPU 0 gets (part of the snapshot fingerprint).
fn guest_cpuid(
    kvm: &Kvm,
    profile: CpuProfile,
    vcpus: u8,
) -> Result<Vec<kvm_bindings::kvm_cpuid_entry2>, VmmError> {
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmmError::Vm(vm::VmError::Kvm("KVM_GET_SUPPORTED_CPUID", e)))?;
    let mut entries = supported.as_slice().to_vec();
    crate::arch::cpuid::apply_policy(&mut entries, profile, 0, vcpus);
    Ok(entries)
}

/// Reads `path` into guest memory and puts the VM and device state back;
/// returns the vCPU states for the caller to restore.
fn restore_snapshot(
    path: &std::path::Path,
    identity: &Identity,
    memfd: &File,
    vm: &VmFd,
    transports: &[Arc<Mutex<MmioTransport>>],
    vcpus: u8,
) -> Result<persist::VmSnapshot, VmmError> {
    let file = File::open(path)
        .map_err(|e| VmmError::Restore(PersistError::File(path.to_path_buf(), e)))?;
    let state = crate::snapshot::read(std::io::BufReader::new(file), identity, memfd)
        .map_err(|e| VmmError::Restore(e.into()))?;
    let snap = persist::decode(&state).map_err(VmmError::Restore)?;
    if snap.vcpus.len() != usize::from(vcpus) || snap.transports.len() != transports.len() {
        return Err(VmmError::Restore(PersistError::Devices(
            "vCPU or device count differs".into(),
        )));
    }
    vm::restore_vm_state(vm, &snap.vm).map_err(|e| VmmError::Restore(e.into()))?;
    for (t, s) in transports.iter().zip(&snap.transports) {
        t.lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore_state(s)
            .map_err(|e| VmmError::Restore(PersistError::Devices(e.to_string())))?;
    }
    Ok(snap)
}

/// Stops every vCPU thread (running or paused) and joins it.
fn stop_vcpus(controls: &[Arc<VcpuControl>], handles: Vec<JoinHandle<()>>) {
    for c in controls {
        c.request(Wanted::Stop);
    }
    for (c, handle) in controls.iter().zip(handles) {
        if !c.wait_for(RunState::Exited, Duration::from_secs(5)) {
            tracing::error!("a vCPU thread did not stop within 5 s");
            continue;
        }
        let _ = handle.join();
    }
}

/// Gives the heap that building the VM left free back to the host.
///
/// Building a VM reads the template key's inputs and a snapshot's memory
/// through buffers of a mebibyte; freed, they stay in the process's heap
/// (the allocator keeps freed memory for reuse), so every pod's husk-vmm
/// would carry about 1 MiB it never touches again (measured: anonymous
/// memory 1,720 KiB before, 692 KiB after; docs/memory.md).
fn release_startup_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap memory to the kernel; it
    // takes the allocator's own locks and touches no memory we own.
    unsafe {
        libc::malloc_trim(0);
    }
}
