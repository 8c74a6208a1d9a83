//! A container's files on the host side of the pod's shared directory.
//!
//! `<shared>/<container id>/` holds `rootfs/` (the root file system
//! containerd's snapshotter prepared, mounted here), `mounts/<n>` (each host
//! file or directory the spec bind-mounts, bind-mounted here) and
//! `config.json`: the bundle's spec rewritten for the guest — root path
//! relative to the bundle, bind-mount sources pointing into the share,
//! namespace paths of the host dropped (they mean nothing in the guest).

use std::{
    os::fd::{AsRawFd, FromRawFd},
    path::{Path, PathBuf},
};

use containerd_shim::protos::api::Mount as RootfsMount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::Spec;

use husk_protocols::{GUEST_MEMORY_VOLUMES, GUEST_MIRRORS};

use crate::vm::GUEST_SHARED;

/// Errors preparing a container's files.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The bundle's config.json is missing or invalid.
    #[error("the bundle's config.json: {0}")]
    Spec(String),
    /// A mount failed.
    #[error("mounting {what} on {target}: {why}")]
    Mount {
        /// What was mounted.
        what: String,
        /// Where.
        target: String,
        /// Why it failed.
        why: String,
    },
    /// A file operation failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// The host directory of container `id`.
pub fn container_dir(shared: &Path, id: &str) -> PathBuf {
    shared.join(id)
}

/// Reads and parses `<bundle>/config.json`.
pub fn read_spec(bundle: &Path) -> Result<Spec, RootfsError> {
    let path = bundle.join("config.json");
    let text =
        std::fs::read(&path).map_err(|e| RootfsError::Spec(format!("{}: {e}", path.display())))?;
    serde_json::from_slice(&text).map_err(|e| RootfsError::Spec(format!("{}: {e}", path.display())))
}

fn mount_err(what: &str, target: &Path, why: impl std::fmt::Display) -> RootfsError {
    RootfsError::Mount {
        what: what.to_string(),
        target: target.display().to_string(),
        why: why.to_string(),
    }
}

/// Mounts the root file system and the spec's bind mounts under the
/// container's directory, writes the guest's config.json, and returns the
/// bundle path the guest sees. On failure nothing stays mounted.
pub fn prepare(
    shared: &Path,
    id: &str,
    bundle: &Path,
    rootfs: &[RootfsMount],
    mut spec: Spec,
) -> Result<Prepared, RootfsError> {
    let dir = container_dir(shared, id);
    let io = |what: String| move |e| RootfsError::Io(what, e);
    std::fs::create_dir_all(dir.join("rootfs"))
        .map_err(io(format!("creating {}", dir.display())))?;
    let result = (|| {
        mount_rootfs(&dir.join("rootfs"), bundle, rootfs, &spec)?;
        let volumes = rewrite_spec(&mut spec, &dir, id)?;
        let text = serde_json::to_vec(&spec).map_err(|e| RootfsError::Spec(e.to_string()))?;
        std::fs::write(dir.join("config.json"), text)
            .map_err(io("writing the guest's config.json".into()))?;
        Ok(Prepared {
            bundle: format!("{GUEST_SHARED}/{id}"),
            volumes,
        })
    })();
    if result.is_err() {
        release(shared, id);
    }
    result
}

/// What [`prepare`] made: the bundle the guest sees, and the volumes the
/// guest must hold itself before the container is created.
#[derive(Debug)]
pub struct Prepared {
    /// The guest's path of the bundle.
    pub bundle: String,
    /// Volumes that live in the guest (`agent/src/volumes.rs`).
    pub volumes: Vec<GuestVolume>,
}

/// A volume the guest holds itself instead of reaching it through the
/// share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestVolume {
    /// A memory-backed emptyDir (kubelet's tmpfs under
    /// `kubernetes.io~empty-dir/`): a tmpfs of the same size in the guest,
    /// one per host volume, shared by the pod's containers.
    Memory {
        /// Its guest path.
        target: String,
        /// Its size, bytes.
        size_bytes: u64,
    },
    /// A directory kubelet updates atomically (a `..data` symlink to the
    /// current payload): a guest copy, brought up to date on each switch.
    Mirror {
        /// The copy's guest path.
        target: String,
        /// The host directory (watched for switches).
        host: PathBuf,
        /// The host directory as the guest sees it on the share.
        guest_source: String,
        /// Where the shim writes payload packs: on the host, and as the
        /// guest sees it on the share.
        packs: (PathBuf, String),
    },
}

/// The size of the memory-backed emptyDir at `src`, if it is one: a tmpfs
/// that kubelet made for an emptyDir (`medium: Memory`).
fn memory_empty_dir(src: &Path) -> Option<u64> {
    if !src.to_string_lossy().contains("/kubernetes.io~empty-dir/") {
        return None;
    }
    let st = nix::sys::statfs::statfs(src).ok()?;
    (st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .then(|| st.blocks().saturating_mul(st.block_size() as u64))
}

/// Whether `src` is laid out by kubelet's atomic writer (ConfigMap, Secret,
/// projected, downward API): a directory whose `..data` is a symlink.
pub fn atomic_writer_dir(src: &Path) -> bool {
    src.is_dir()
        && std::fs::symlink_metadata(src.join("..data")).is_ok_and(|m| m.file_type().is_symlink())
}

/// The guest path of the memory volume at host path `src`: the same for
/// every container of the pod that mounts it.
fn memory_target(src: &Path) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(src.as_os_str().as_encoded_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{GUEST_MEMORY_VOLUMES}/{hex}")
}

/// The root file system a bundle brings itself (no rootfs mounts, e.g.
/// `ctr run --rootfs`): the spec's root path, relative to the bundle unless
/// absolute. It must be a directory.
fn bundle_root(bundle: &Path, spec: &Spec) -> Result<PathBuf, RootfsError> {
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| PathBuf::from("rootfs"));
    let src = if root.is_absolute() {
        root
    } else {
        bundle.join(root)
    };
    match std::fs::read_dir(&src) {
        Ok(_) => Ok(src),
        Err(e) => Err(RootfsError::Spec(format!(
            "root file system {}: {e}",
            src.display()
        ))),
    }
}

/// Checks what can be checked before a VM is started for the container: a
/// root file system the bundle brings must be a readable directory.
pub fn check(bundle: &Path, rootfs: &[RootfsMount], spec: &Spec) -> Result<(), RootfsError> {
    if rootfs.is_empty() {
        bundle_root(bundle, spec)?;
    }
    Ok(())
}

fn mount_rootfs(
    target: &Path,
    bundle: &Path,
    rootfs: &[RootfsMount],
    spec: &Spec,
) -> Result<(), RootfsError> {
    if rootfs.is_empty() {
        let src = bundle_root(bundle, spec)?;
        return mount(
            Some(&src),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| mount_err(&src.display().to_string(), target, e));
    }
    for m in rootfs {
        let fs_type = (!m.type_.is_empty()).then_some(m.type_.as_str());
        let source = (!m.source.is_empty()).then_some(m.source.as_str());
        containerd_shim::mount::mount_rootfs(fs_type, source, &m.options, target)
            .map_err(|e| mount_err(&format!("{} {}", m.type_, m.source), target, e))?;
    }
    Ok(())
}

fn rewrite_spec(spec: &mut Spec, dir: &Path, id: &str) -> Result<Vec<GuestVolume>, RootfsError> {
    let mut volumes = Vec::new();
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(PathBuf::from("rootfs"));
    spec.set_root(Some(root));

    if let Some(mounts) = spec.mounts().clone() {
        let mut out = Vec::with_capacity(mounts.len());
        for (n, mut m) in mounts.into_iter().enumerate() {
            let is_bind = m.typ().as_deref() == Some("bind")
                || m.options()
                    .as_ref()
                    .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"));
            let source = m.source().clone();
            if let (true, Some(src)) = (is_bind, source) {
                if !src.exists() {
                    return Err(RootfsError::Spec(format!(
                        "bind mount source {} does not exist",
                        src.display()
                    )));
                }
                if let Some(size_bytes) = memory_empty_dir(&src) {
                    let target = memory_target(&src);
                    m.set_source(Some(PathBuf::from(&target)));
                    volumes.push(GuestVolume::Memory { target, size_bytes });
                    out.push(m);
                    continue;
                }
                let host = dir.join("mounts").join(n.to_string());
                if src.is_dir() {
                    std::fs::create_dir_all(&host)
                } else {
                    std::fs::create_dir_all(dir.join("mounts"))
                        .and_then(|()| std::fs::File::create(&host).map(drop))
                }
                .map_err(|e| RootfsError::Io(format!("creating {}", host.display()), e))?;
                let read_only = m
                    .options()
                    .as_ref()
                    .is_some_and(|o| o.iter().any(|x| x == "ro" || x == "rro"));
                if read_only {
                    bind_read_only(&src, &host)?;
                } else {
                    mount(
                        Some(&src),
                        &host,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REC,
                        None::<&str>,
                    )
                    .map_err(|e| mount_err(&src.display().to_string(), &host, e))?;
                }
                let guest_source = format!("{GUEST_SHARED}/{id}/mounts/{n}");
                if atomic_writer_dir(&src) {
                    let target = format!("{GUEST_MIRRORS}/{id}/{n}");
                    m.set_source(Some(PathBuf::from(&target)));
                    volumes.push(GuestVolume::Mirror {
                        target,
                        host: src,
                        guest_source,
                        packs: (dir.join("packs"), format!("{GUEST_SHARED}/{id}/packs")),
                    });
                } else {
                    m.set_source(Some(PathBuf::from(guest_source)));
                }
            }
            out.push(m);
        }
        spec.set_mounts(Some(out));
    }

    if let Some(linux) = spec.linux_mut() {
        if let Some(namespaces) = linux.namespaces().clone() {
            linux.set_namespaces(Some(crate::sandbox::guest_namespaces(namespaces)));
        }
    }
    Ok(volumes)
}

/// Bind-mounts `src` (and every mount below it) on `target`, read-only on
/// the host.
///
/// The container's own view is made read-only in the guest as well, but
/// guest root (a privileged container) can remount that view; the guest
/// reaches the files only through the share, so the share's side is what
/// must refuse the writes (`EROFS` through virtio-fs). The mount is made
/// read-only *before* it is attached: the virtio-fs daemon sees the share
/// through a mount namespace of its own, which receives a copy of each new
/// mount as it is attached, and a later change of flags would not reach
/// that copy.
fn bind_read_only(src: &Path, target: &Path) -> Result<(), RootfsError> {
    let fail = |what: &str| {
        let e = std::io::Error::last_os_error();
        mount_err(&format!("{} ({what})", src.display()), target, e)
    };
    let cstr = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| mount_err("read-only", p, "a NUL in the path"))
    };
    let (src_c, target_c) = (cstr(src)?, cstr(target)?);
    let empty = c"";
    // SAFETY: open_tree(2) reads the NUL-terminated path; it returns a new
    // descriptor (owned below) or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src_c.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as libc::c_uint,
        )
    };
    let fd = std::os::fd::RawFd::try_from(fd)
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or_else(|| fail("open_tree"))?;
    // SAFETY: `fd` was just returned by open_tree and is owned by nothing
    // else.
    let tree = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr(2) on the detached tree `tree`; it reads the
    // empty path and `attr` (of the size passed), alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc != 0 {
        return Err(fail("mount_setattr"));
    }
    // SAFETY: move_mount(2) attaches the detached tree at the NUL-terminated
    // `target`; both paths live for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(fail("move_mount"));
    }
    Ok(())
}

/// Unmounts everything of container `id` and removes its directory. Safe
/// to repeat.
pub fn release(shared: &Path, id: &str) {
    let dir = container_dir(shared, id);
    if let Some(s) = dir.to_str() {
        if let Err(e) = containerd_shim::mount::umount_recursive(Some(s), libc::MNT_DETACH) {
            tracing::warn!("unmounting below {s}: {e}");
        }
    }
    let _ = umount2(&dir.join("rootfs"), MntFlags::MNT_DETACH);
    let left = crate::vm::mounts_below(&dir);
    if !left.is_empty() {
        tracing::error!("not removing {}: still mounted: {left:?}", dir.display());
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unmounts the test's bind mount whatever happens.
    struct Unmount<'a>(&'a Path);

    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = umount2(self.0, MntFlags::MNT_DETACH);
        }
    }

    fn bind(src: &Path, target: &Path, flags: MsFlags) {
        mount(Some(src), target, None::<&str>, flags, None::<&str>).expect("mount");
    }

    #[test]
    fn a_read_only_volume_refuses_writes_where_the_daemon_sees_it() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: it bind-mounts"
        );
        let dir = tempfile::tempdir().expect("dir");
        let src = dir.path().join("volume");
        let inner = src.join("inner");
        std::fs::create_dir_all(&inner).expect("mkdir");
        std::fs::write(src.join("old"), "kept").expect("write");
        // A mount below the volume: read-only as well (recursive).
        let inner_src = dir.path().join("inner-src");
        std::fs::create_dir(&inner_src).expect("mkdir");
        bind(&inner_src, &inner, MsFlags::MS_BIND);
        let _inner = Unmount(&inner);
        // The share, and a peer of it: the daemon's copy of the share in
        // its own mount namespace receives new mounts the same way.
        let share = dir.path().join("share");
        let daemon = dir.path().join("daemon-view");
        std::fs::create_dir(&share).expect("mkdir");
        std::fs::create_dir(&daemon).expect("mkdir");
        bind(&share, &share, MsFlags::MS_BIND);
        let _share = Unmount(&share);
        mount(
            None::<&str>,
            &share,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .expect("shared");
        bind(&share, &daemon, MsFlags::MS_BIND);
        let _daemon = Unmount(&daemon);
        let target = share.join("vol");
        std::fs::create_dir(&target).expect("mkdir");

        bind_read_only(&src, &target).expect("read-only bind");
        let _target = Unmount(&target);
        let _copy = Unmount(&daemon.join("vol"));
        for view in [&share, &daemon] {
            for path in [view.join("vol/new"), view.join("vol/inner/new")] {
                let e = std::fs::write(&path, "x").expect_err("the share refuses writes");
                assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{}", path.display());
            }
            assert_eq!(
                std::fs::read_to_string(view.join("vol/old")).expect("read"),
                "kept"
            );
        }
        // The volume itself stays writable for the host.
        std::fs::write(src.join("new"), "host").expect("the source stays writable");
    }

    /// kubelet's kinds of volume, as bind mounts of a spec: a memory
    /// emptyDir (a tmpfs under `kubernetes.io~empty-dir/`) becomes a guest
    /// tmpfs of its size, off the share; an atomically written directory
    /// becomes a guest copy of its share path; anything else stays a path
    /// on the share.
    #[test]
    fn kubelet_volumes_are_recognised() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: it mounts"
        );
        let dir = tempfile::tempdir().expect("dir");
        let empty = dir
            .path()
            .join("pods/uid/volumes/kubernetes.io~empty-dir/cache");
        let disk_empty = dir
            .path()
            .join("pods/uid/volumes/kubernetes.io~empty-dir/scratch");
        let cm = dir
            .path()
            .join("pods/uid/volumes/kubernetes.io~configmap/cfg");
        for d in [&empty, &disk_empty, &cm.join("..2026_12_05")] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        std::os::unix::fs::symlink("..2026_12_05", cm.join("..data")).expect("link");
        mount(
            Some("tmpfs"),
            &empty,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=16m"),
        )
        .expect("tmpfs");
        let _empty = Unmount(&empty);
        let share = dir.path().join("shared/c1");
        std::fs::create_dir_all(&share).expect("share");

        let bind_of = |src: &Path, dst: &str| {
            oci_spec::runtime::MountBuilder::default()
                .destination(dst)
                .typ("bind")
                .source(src)
                .options(vec!["rbind".to_string(), "rw".to_string()])
                .build()
                .expect("mount")
        };
        let mut spec = Spec::default();
        spec.set_mounts(Some(vec![
            bind_of(&empty, "/cache"),
            bind_of(&disk_empty, "/scratch"),
            bind_of(&cm, "/etc/cfg"),
        ]));
        let volumes = rewrite_spec(&mut spec, &share, "c1").expect("rewrite");
        let binds = [share.join("mounts/1"), share.join("mounts/2")];
        let _mounts: Vec<Unmount> = binds.iter().map(|p| Unmount(p)).collect();
        let memory = memory_target(&empty);
        assert_eq!(
            volumes,
            [
                GuestVolume::Memory {
                    target: memory.clone(),
                    size_bytes: 16 << 20,
                },
                GuestVolume::Mirror {
                    target: format!("{GUEST_MIRRORS}/c1/2"),
                    host: cm.clone(),
                    guest_source: format!("{GUEST_SHARED}/c1/mounts/2"),
                    packs: (share.join("packs"), format!("{GUEST_SHARED}/c1/packs")),
                },
            ]
        );
        let sources: Vec<String> = spec
            .mounts()
            .as_ref()
            .expect("mounts")
            .iter()
            .map(|m| m.source().as_ref().expect("source").display().to_string())
            .collect();
        assert_eq!(
            sources,
            [
                memory,
                format!("{GUEST_SHARED}/c1/mounts/1"),
                format!("{GUEST_MIRRORS}/c1/2"),
            ]
        );
        assert!(
            !share.join("mounts/0").exists(),
            "a memory emptyDir is not on the share"
        );
    }
}
