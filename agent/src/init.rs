//! PID 1 duties: standard descriptors, the mounts a container runtime needs,
//! reaping orphans, and stopping everything before the VM goes away.
//!
//! The guest kernel starts the agent with almost nothing: the initramfs holds
//! empty mount points and `/dev/console`. Mounting is done here, not by the
//! kernel (`DEVTMPFS_MOUNT` is off), so the agent controls flags and order.

use std::{
    fs,
    os::unix::fs::symlink,
    path::Path,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::{open, OFlag},
    mount::{mount, MsFlags},
    sys::{
        reboot::{reboot, RebootMode},
        signal::{kill, Signal},
        stat::Mode,
    },
    unistd::{dup2, sync, Pid},
};

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const fn m(
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
) -> Mount {
    Mount {
        source,
        target,
        fstype,
        flags,
        data,
    }
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Mounts in order; later targets live on earlier ones.
const MOUNTS: &[Mount] = &[
    m("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, None),
    m("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, None),
    m(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    ),
    m(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    ),
    m(
        "shm",
        "/dev/shm",
        "tmpfs",
        NOSUID_NODEV_NOEXEC,
        Some("mode=1777"),
    ),
    m(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        Some("mode=0755"),
    ),
    m(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        Some("mode=1777"),
    ),
    m(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        NOSUID_NODEV_NOEXEC,
        Some("nsdelegate"),
    ),
];

/// Runs before anything else in PID 1: makes sure descriptors 0-2 exist and
/// mounts the guest's file systems. Failures are reported, not fatal: the
/// agent API is more useful to the host than a VM that stopped over a mount.
pub fn early_setup() {
    ensure_std_fds();
    if let Err(e) = leave_initramfs() {
        eprintln!("husk-agent: moving off the initramfs root: {e} (containers cannot pivot_root)");
    }
    for mnt in MOUNTS {
        if let Err(e) = fs::create_dir_all(mnt.target) {
            eprintln!("husk-agent: creating {}: {e}", mnt.target);
        }
        match mount(
            Some(mnt.source),
            mnt.target,
            Some(mnt.fstype),
            mnt.flags,
            mnt.data,
        ) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => eprintln!("husk-agent: mounting {} on {}: {e}", mnt.fstype, mnt.target),
        }
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if !Path::new(link).exists() {
            if let Err(e) = symlink(target, link) {
                eprintln!("husk-agent: linking {link}: {e}");
            }
        }
    }
}

/// Directories of the guest's own root.
const ROOT_DIRS: &[&str] = &["dev", "proc", "sys", "run", "tmp", "etc", "mnt"];

/// Makes a tmpfs the root of the guest instead of the initramfs.
///
/// The kernel unpacks the initramfs into "rootfs", the root of the mount
/// tree, and `pivot_root(2)` refuses to move a root that lives there — so
/// containers could not pivot into their root file systems. Like
/// `switch_root`, the agent mounts a tmpfs, moves it over `/` and chroots
/// into it. The agent's binary stays in the hidden initramfs (exec through
/// /proc/self/exe still reaches it), so nothing is copied.
fn leave_initramfs() -> nix::Result<()> {
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let st = nix::sys::statfs::statfs("/")?;
    #[allow(clippy::useless_conversion)] // f_type's width differs per libc
    let magic = i64::from(st.filesystem_type().0);
    if magic != RAMFS_MAGIC && magic != TMPFS_MAGIC {
        return Ok(());
    }
    let new_root = "/newroot";
    fs::create_dir_all(new_root).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
    mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    for d in ROOT_DIRS {
        let _ = fs::create_dir(Path::new(new_root).join(d));
    }
    nix::unistd::chdir(new_root)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
    nix::unistd::chroot(".")?;
    nix::unistd::chdir("/")?;
    Ok(())
}

/// The kernel opens `/dev/console` as PID 1's descriptors 0-2, but only if a
/// console exists (the VMM's serial console is off by default). Without it
/// the descriptors are closed, and the first file the agent opens would
/// become "stdout". Point missing ones at /dev/null.
fn ensure_std_fds() {
    for fd in 0..=2 {
        if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
            if let Ok(null) = open("/dev/null", OFlag::O_RDWR, Mode::empty()) {
                if null != fd {
                    let _ = dup2(null, fd);
                    let _ = nix::unistd::close(null);
                }
            }
        }
    }
}

/// Reaps every child that exits. As PID 1 the agent inherits all orphans of
/// the guest; without this they would stay zombies forever.
pub fn spawn_reaper() -> std::io::Result<()> {
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
    tokio::spawn(async move {
        while sigchld.recv().await.is_some() {
            crate::reaper::Reaper::global().reap_all();
        }
    });
    Ok(())
}

fn reap_all() {
    crate::reaper::Reaper::global().reap_all();
}

/// Sends SIGTERM to every other process, waits up to a second for them to
/// go, then SIGKILLs what is left and syncs file systems.
pub async fn stop_all_processes() {
    // kill(-1) reaches every process but PID 1 itself.
    if kill(Pid::from_raw(-1), Signal::SIGTERM).is_ok() {
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            reap_all();
            if kill(Pid::from_raw(-1), None) == Err(Errno::ESRCH) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        reap_all();
    }
    sync();
}

/// Ends the VM. The guest has no ACPI, so a power-off would only halt the
/// vCPU; a reset is what the VMM sees (the i8042 reset line, `reboot=k`) and
/// turns into a clean exit.
pub fn power_off() -> ! {
    sync();
    let err = reboot(RebootMode::RB_AUTOBOOT);
    eprintln!("husk-agent: reboot failed: {err:?}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
