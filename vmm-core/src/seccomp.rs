//! Per-thread seccomp filters for husk-vmm.
//!
//! The VMM is the part of husk a guest attacks first, so each of its threads
//! may only make the system calls its job needs, and a vCPU thread may only
//! issue the four KVM ioctls of its run loop. Filters are installed by the
//! thread itself once set-up is done (opening files, binding sockets and
//! creating KVM objects happen before), and a call outside the list ends the
//! whole VMM with a message naming the system call ([`SECCOMP_EXIT_CODE`]).
//!
//! The lists are written against glibc's x86_64 syscall use by the Rust
//! standard library, `tracing` and the rust-vmm crates in this VMM.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Exit status of a VMM that made a forbidden system call.
pub const SECCOMP_EXIT_CODE: i32 = 159;

/// The kinds of thread in husk-vmm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: device emulation event loop, control API, teardown.
    Vmm,
    /// A vCPU thread: KVM_RUN and MMIO/PIO exits.
    Vcpu,
    /// The guest profiler's sampling thread: it sleeps and kicks vCPU
    /// threads (tgkill), nothing else.
    Sampler,
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be built.
    #[error("building the {0:?} seccomp filter")]
    Build(ThreadKind, #[source] seccompiler::BackendError),
    /// The filter could not be compiled to BPF.
    #[error("compiling the {0:?} seccomp filter")]
    Compile(ThreadKind, #[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("installing the {0:?} seccomp filter")]
    Install(ThreadKind, #[source] seccompiler::Error),
    /// The SIGSYS handler could not be installed.
    #[error("installing the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xae << 8) | nr
}
/// `KVM_RUN`.
pub const KVM_RUN: u64 = ioc(0, 0x80, 0);
/// `KVM_GET_REGS` (struct kvm_regs is 144 bytes).
pub const KVM_GET_REGS: u64 = ioc(2, 0x81, 144);
/// `KVM_SET_REGS`.
pub const KVM_SET_REGS: u64 = ioc(1, 0x82, 144);
/// `KVM_TRANSLATE` (struct kvm_translation is 24 bytes).
pub const KVM_TRANSLATE: u64 = ioc(3, 0x85, 24);
const FIONBIO: u64 = 0x5421;
/// fallocate's mode for returning guest memory (the balloon).
const PUNCH_HOLE_MODE: u64 = (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64;

const fn size<T>() -> u64 {
    std::mem::size_of::<T>() as u64
}

/// vCPU ioctls a snapshot needs (read-only state getters).
const VCPU_SNAPSHOT_IOCTLS: &[u64] = &[
    ioc(3, 0x91, size::<kvm_bindings::kvm_cpuid2>()), // KVM_GET_CPUID2
    ioc(3, 0x88, size::<kvm_bindings::kvm_msrs>()),   // KVM_GET_MSRS
    ioc(2, 0x98, size::<kvm_bindings::kvm_mp_state>()), // KVM_GET_MP_STATE
    ioc(2, 0x83, size::<kvm_bindings::kvm_sregs>()),  // KVM_GET_SREGS
    ioc(2, 0xa4, size::<kvm_bindings::kvm_xsave>()),  // KVM_GET_XSAVE
    ioc(2, 0xa6, size::<kvm_bindings::kvm_xcrs>()),   // KVM_GET_XCRS
    ioc(2, 0xa1, size::<kvm_bindings::kvm_debugregs>()), // KVM_GET_DEBUGREGS
    ioc(2, 0x8e, size::<kvm_bindings::kvm_lapic_state>()), // KVM_GET_LAPIC
    ioc(2, 0x9f, size::<kvm_bindings::kvm_vcpu_events>()), // KVM_GET_VCPU_EVENTS
];

/// vCPU ioctls for executing XSAVE/XRSTOR for the guest on hosts whose
/// emulator lacks them (`arch/xsave.rs`): the new extended state, and
/// raising the fault the instruction takes (CR2 for a page fault).
const VCPU_XSTATE_IOCTLS: &[u64] = &[
    ioc(1, 0xa5, size::<kvm_bindings::kvm_xsave>()), // KVM_SET_XSAVE
    ioc(1, 0x84, size::<kvm_bindings::kvm_sregs>()), // KVM_SET_SREGS
    ioc(1, 0xa0, size::<kvm_bindings::kvm_vcpu_events>()), // KVM_SET_VCPU_EVENTS
];

/// VM ioctls a snapshot needs.
const VM_SNAPSHOT_IOCTLS: &[u64] = &[
    ioc(3, 0x62, size::<kvm_bindings::kvm_irqchip>()), // KVM_GET_IRQCHIP
    ioc(2, 0x9f, size::<kvm_bindings::kvm_pit_state2>()), // KVM_GET_PIT2
    ioc(2, 0x7c, size::<kvm_bindings::kvm_clock_data>()), // KVM_GET_CLOCK
];

/// `openat` flags of `File::create` (writing a snapshot); opening files
/// any other way stays forbidden.
const CREATE_FLAGS: u64 = (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC) as u64;

/// System calls every thread needs: memory, locks, signals, time, exit,
/// writing logs.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The main thread's event loop: eventfds, sockets (vsock muxer, API),
/// removing its socket files at exit.
const VMM_ONLY: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_close,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_fcntl,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_poll,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    // Writing snapshots: sparse reads of the memfd, renaming into place.
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_fsync,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    // The balloon's statistics timer, (re)armed when its driver activates.
    libc::SYS_timerfd_settime,
];

fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> =
        COMMON.iter().map(|&s| (s, Vec::new())).collect();
    // Argument 1 (the request of ioctl, the command of fcntl) equals `v`.
    let ioctl_eq = |v: u64| -> Result<SeccompRule, seccompiler::BackendError> {
        SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            v,
        )?])
    };
    match kind {
        ThreadKind::Vmm => {
            map.extend(VMM_ONLY.iter().map(|&s| (s, Vec::new())));
            let ioctls = std::iter::once(FIONBIO).chain(VM_SNAPSHOT_IOCTLS.iter().copied());
            map.insert(
                libc::SYS_ioctl,
                ioctls.map(ioctl_eq).collect::<Result<_, _>>()?,
            );
            // The balloon returns guest memory by punching holes in the
            // memfd, and may do nothing else with fallocate.
            let punch = SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                PUNCH_HOLE_MODE,
            )?;
            map.insert(libc::SYS_fallocate, vec![SeccompRule::new(vec![punch])?]);
            let create =
                SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, CREATE_FLAGS)?;
            map.insert(libc::SYS_openat, vec![SeccompRule::new(vec![create])?]);
        }
        ThreadKind::Vcpu => {
            let run_loop = [KVM_RUN, KVM_GET_REGS, KVM_SET_REGS, KVM_TRANSLATE];
            map.insert(
                libc::SYS_ioctl,
                run_loop
                    .iter()
                    .chain(VCPU_SNAPSHOT_IOCTLS)
                    .chain(VCPU_XSTATE_IOCTLS)
                    .map(|&v| ioctl_eq(v))
                    .collect::<Result<_, _>>()?,
            );
            // A driver activating or resetting a device does so from a vCPU
            // (an MMIO write): the transport duplicates and closes the
            // queue eventfds it hands over (F_GETFD: the standard library's
            // check that a descriptor is open before closing it).
            let fcntl_cmds = [libc::F_DUPFD_CLOEXEC, libc::F_GETFD];
            map.insert(
                libc::SYS_fcntl,
                fcntl_cmds
                    .iter()
                    .map(|&c| ioctl_eq(c as u64))
                    .collect::<Result<_, _>>()?,
            );
            map.insert(libc::SYS_close, Vec::new());
        }
        ThreadKind::Sampler => {}
    }
    Ok(map)
}

/// Builds the BPF program of `kind`.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let rules = rules(kind).map_err(|e| SeccompError::Build(kind, e))?;
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(kind, e))?;
    f.try_into().map_err(|e| SeccompError::Compile(kind, e))
}

/// Installs `program` on the calling thread.
pub fn apply(kind: ThreadKind, program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(kind, e))
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; `si_syscall` is
    // the i32 at byte offset 24 of the x86_64 layout (after signo, errno,
    // code, padding and the faulting call address).
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let mut msg = *b"husk-vmm: blocked a forbidden system call: 0000\n";
    let digits = &mut msg[43..47];
    let mut n = nr.clamp(0, 9999);
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is live.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(SECCOMP_EXIT_CODE);
    }
}

/// Makes a forbidden system call end the process with a message.
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(|e| SeccompError::Handler(std::io::Error::from_raw_os_error(e.errno())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_kvm() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_SET_REGS, 0x4090_ae82);
        assert_eq!(KVM_TRANSLATE, 0xc018_ae85);
    }

    #[test]
    fn filters_build() {
        assert!(!filter(ThreadKind::Vmm).expect("vmm").is_empty());
        assert!(!filter(ThreadKind::Vcpu).expect("vcpu").is_empty());
        assert!(!filter(ThreadKind::Sampler).expect("sampler").is_empty());
    }

    /// Forks; the child installs the vCPU filter and runs `forbidden`. The
    /// child must end through the SIGSYS handler.
    fn assert_vcpu_filter_stops(forbidden: fn()) {
        let prog = filter(ThreadKind::Vcpu).expect("filter");
        install_sigsys_handler().expect("handler");
        // SAFETY: the child only makes async-signal-safe calls before _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let code = if apply(ThreadKind::Vcpu, &prog).is_ok() {
                forbidden();
                0
            } else {
                1
            };
            // SAFETY: async-signal-safe exit in the child.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), SECCOMP_EXIT_CODE);
    }

    #[test]
    fn forbidden_call_ends_the_process() {
        // getppid is not on the vCPU list.
        // SAFETY: plain syscall; the filter stops it.
        assert_vcpu_filter_stops(|| unsafe {
            libc::getppid();
        });
    }

    /// An allowed ioctl with a disallowed request is stopped too.
    #[test]
    fn vcpu_ioctls_are_limited_to_the_run_loop() {
        // FIONBIO on stdin: an allowed syscall with a forbidden request.
        assert_vcpu_filter_stops(|| {
            let mut one: libc::c_int = 1;
            // SAFETY: valid pointer to an int.
            unsafe { libc::ioctl(0, 0x5421, &mut one) };
        });
    }
}
