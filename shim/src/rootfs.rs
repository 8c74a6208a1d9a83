//! A container's files on the host side of the pod's share.
//!
//! `<work>/<container id>/` (`vm.rs`: the shim's tree, which the guest sees
//! read-only at `/run/husk/shared`) holds `rootfs/` (the root file system
//! containerd's snapshotter prepared, mounted here), `mounts/<n>` (each host
//! file or directory the spec bind-mounts, bind-mounted here), `packs/`
//! (payloads of copied volumes, `volwatch.rs`) and `config.json`: the
//! bundle's spec rewritten for the guest — root path relative to the
//! bundle, bind-mount sources pointing into the share or at volumes the
//! guest holds itself, namespace paths of the host dropped (they mean
//! nothing in the guest), and what the guest must not get filtered out
//! (`specpolicy.rs`).
//!
//! Every mount here is `nosuid,nodev` on the host (`hostfs.rs`). The
//! guest cannot change any name in this tree; it writes only inside the
//! mounts, which nothing here looks into.

use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount as RootfsMount;
use oci_spec::runtime::Spec;

use husk_protocols::{GUEST_MEMORY_VOLUMES, GUEST_MIRRORS};

use crate::{hostfs, kubelet, vm::GUEST_SHARED};

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
    /// A kubelet volume cannot be copied into the guest.
    #[error("volume {volume}: {why}")]
    Volume {
        /// The volume's host path.
        volume: String,
        /// Why.
        why: String,
    },
    /// A file operation failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// What the host decides about a container's files, from `husk.toml`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// kubelet's root directory (`kubelet.rs`).
    pub kubelet_root: PathBuf,
}

/// The host directory of container `id` in the pod's tree `work`.
pub fn container_dir(work: &Path, id: &str) -> PathBuf {
    work.join(id)
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

fn io(what: String) -> impl FnOnce(std::io::Error) -> RootfsError {
    move |e| RootfsError::Io(what, e)
}

/// Mounts the root file system and the spec's bind mounts under the
/// container's directory in the pod's tree `work`, writes the guest's
/// config.json, and returns the bundle path the guest sees. On failure
/// nothing stays mounted.
pub fn prepare(
    work: &Path,
    id: &str,
    bundle: &Path,
    rootfs: &[RootfsMount],
    mut spec: Spec,
    settings: &Settings,
) -> Result<Prepared, RootfsError> {
    let plain = Path::new(id).components().count() == 1
        && matches!(
            Path::new(id).components().next(),
            Some(std::path::Component::Normal(_))
        );
    if !plain {
        return Err(RootfsError::Spec(format!(
            "container id {id:?} is not a plain name"
        )));
    }
    let dir = container_dir(work, id);
    // A directory of this name left over (a container that failed
    // half-way and could not be cleaned up) is refused, never reused, and
    // not touched.
    std::fs::create_dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let result = (|| {
        hostfs::private_dir(&dir.join("rootfs"))
            .map_err(io(format!("creating {}", dir.display())))?;
        mount_rootfs(&dir.join("rootfs"), bundle, rootfs, &spec)?;
        for note in crate::specpolicy::apply(&mut spec) {
            tracing::warn!(container = %id, "{note}");
        }
        let volumes = rewrite_spec(&mut spec, &dir, id, settings)?;
        let text = serde_json::to_vec(&spec).map_err(|e| RootfsError::Spec(e.to_string()))?;
        write_new(&dir.join("config.json"), &text)
            .map_err(io("writing the guest's config.json".into()))?;
        Ok(Prepared {
            bundle: format!("{GUEST_SHARED}/{id}"),
            volumes,
        })
    })();
    if result.is_err() {
        release(work, id);
    }
    result
}

/// Writes `bytes` to a new file at `path`, mode 0600 (never through an
/// existing name).
pub fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?
        .write_all(bytes)
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
    /// A volume kubelet updates atomically (a `..data` symlink to the
    /// current payload): a guest copy, brought up to date on each switch.
    /// It is not on the share: its payload crosses as a pack.
    Mirror {
        /// The copy's guest path.
        target: String,
        /// The host volume (watched for switches).
        volume: kubelet::Volume,
        /// The volume directory's permission bits (the copy's top
        /// directory gets them).
        mode: u32,
        /// Where the shim writes payload packs: on the host, and as the
        /// guest sees it on the share.
        packs: (PathBuf, String),
    },
}

/// The size of the memory-backed emptyDir `v`, if it is one: a tmpfs that
/// kubelet made for an emptyDir (`medium: Memory`).
fn memory_empty_dir(v: &kubelet::Volume) -> Option<u64> {
    if v.kind != kubelet::Kind::EmptyDir {
        return None;
    }
    let fd = v.open().ok()?;
    let st = nix::sys::statfs::fstatfs(&fd).ok()?;
    (st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .then(|| st.blocks().saturating_mul(st.block_size() as u64))
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

/// Whether a mount's options or type make it a bind mount.
fn is_bind(typ: Option<&str>, options: &[String]) -> bool {
    typ == Some("bind") || options.iter().any(|o| o == "bind" || o == "rbind")
}

/// Whether a mount's options make it read-only.
fn is_read_only(options: &[String]) -> bool {
    options.iter().any(|o| o == "ro" || o == "rro")
}

fn mount_rootfs(
    target: &Path,
    bundle: &Path,
    rootfs: &[RootfsMount],
    spec: &Spec,
) -> Result<(), RootfsError> {
    if rootfs.is_empty() {
        let src = bundle_root(bundle, spec)?;
        return hostfs::bind(&src, target, false)
            .map_err(|e| mount_err(&src.display().to_string(), target, e));
    }
    for m in rootfs {
        let what = || format!("{} {}", m.type_, m.source);
        if is_bind(Some(m.type_.as_str()), &m.options) {
            // A bind takes no flags at mount time: attach a hardened copy.
            hostfs::bind(Path::new(&m.source), target, is_read_only(&m.options))
                .map_err(|e| mount_err(&what(), target, e))?;
            continue;
        }
        let fs_type = (!m.type_.is_empty()).then_some(m.type_.as_str());
        let source = (!m.source.is_empty()).then_some(m.source.as_str());
        let mut options = m.options.clone();
        options.extend(["nosuid".to_string(), "nodev".to_string()]);
        containerd_shim::mount::mount_rootfs(fs_type, source, &options, target)
            .map_err(|e| mount_err(&what(), target, e))?;
    }
    Ok(())
}

fn rewrite_spec(
    spec: &mut Spec,
    dir: &Path,
    id: &str,
    settings: &Settings,
) -> Result<Vec<GuestVolume>, RootfsError> {
    let mut volumes = Vec::new();
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(PathBuf::from("rootfs"));
    spec.set_root(Some(root));

    if let Some(mounts) = spec.mounts().clone() {
        let mut out = Vec::with_capacity(mounts.len());
        for (n, mut m) in mounts.into_iter().enumerate() {
            let options = m.options().clone().unwrap_or_default();
            let source = m.source().clone();
            let (true, Some(src)) = (is_bind(m.typ().as_deref(), &options), source) else {
                out.push(m);
                continue;
            };
            if !src.exists() {
                return Err(RootfsError::Spec(format!(
                    "bind mount source {} does not exist",
                    src.display()
                )));
            }
            let volume = kubelet::volume(&settings.kubelet_root, &src);
            if let Some(size_bytes) = volume.as_ref().and_then(memory_empty_dir) {
                let target = memory_target(&src);
                m.set_source(Some(PathBuf::from(&target)));
                volumes.push(GuestVolume::Memory { target, size_bytes });
                out.push(m);
                continue;
            }
            if let Some(v) = volume.filter(|v| v.kind == kubelet::Kind::Atomic) {
                let bad = |why: String| RootfsError::Volume {
                    volume: src.display().to_string(),
                    why,
                };
                let fd = v.open().map_err(|e| bad(e.to_string()))?;
                kubelet::data_dir(&fd)
                    .map_err(|e| bad(format!("not written by kubelet's atomic writer: {e}")))?;
                let mode = kubelet::mode(&fd).map_err(|e| bad(e.to_string()))?;
                let target = format!("{GUEST_MIRRORS}/{id}/{n}");
                m.set_source(Some(PathBuf::from(&target)));
                volumes.push(GuestVolume::Mirror {
                    target,
                    volume: v,
                    mode,
                    packs: (dir.join("packs"), format!("{GUEST_SHARED}/{id}/packs")),
                });
                out.push(m);
                continue;
            }
            let mounts = dir.join("mounts");
            hostfs::private_dir(&mounts).map_err(io(format!("creating {}", mounts.display())))?;
            let host = mounts.join(n.to_string());
            if src.is_dir() {
                std::fs::create_dir(&host).map(drop)
            } else {
                write_new(&host, b"")
            }
            .map_err(io(format!("creating {}", host.display())))?;
            // Read-only on the host side of the share too: guest root can
            // remount its own view, but its writes end in EROFS here.
            hostfs::bind(&src, &host, is_read_only(&options))
                .map_err(|e| mount_err(&src.display().to_string(), &host, e))?;
            m.set_source(Some(PathBuf::from(format!(
                "{GUEST_SHARED}/{id}/mounts/{n}"
            ))));
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

/// Unmounts everything of container `id` in the pod's tree `work` and
/// removes its directory. Safe to repeat.
pub fn release(work: &Path, id: &str) {
    let dir = container_dir(work, id);
    let left = hostfs::unmount_below(&dir);
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
    use nix::mount::{mount, umount2, MntFlags, MsFlags};

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

    /// A read-only volume is read-only where the virtio-fs daemon sees it
    /// too: the attributes are set before the mount is attached, so the
    /// daemon's copy (a peer of the share) gets them.
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

        hostfs::bind(&src, &target, true).expect("read-only bind");
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
            let st = nix::sys::statvfs::statvfs(&view.join("vol")).expect("statvfs");
            let f = st.flags();
            use nix::sys::statvfs::FsFlags;
            assert!(
                f.contains(FsFlags::ST_NOSUID) && f.contains(FsFlags::ST_NODEV),
                "{}: {f:?}",
                view.display()
            );
        }
        // The volume itself stays writable for the host.
        std::fs::write(src.join("new"), "host").expect("the source stays writable");
    }

    /// kubelet's kinds of volume, as bind mounts of a spec: a memory
    /// emptyDir (a tmpfs under `kubernetes.io~empty-dir/`) becomes a guest
    /// tmpfs of its size, off the share; an atomically written volume
    /// becomes a guest copy, off the share too; anything else stays a path
    /// on the share. What a container wrote into a volume (a `..data`
    /// symlink chain to a host directory) changes none of it.
    #[test]
    fn kubelet_volumes_are_recognised_by_where_they_are() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: it mounts"
        );
        let dir = tempfile::tempdir().expect("dir");
        let root = dir.path().join("kubelet");
        let vols = root.join("pods/uid/volumes");
        let empty = vols.join("kubernetes.io~empty-dir/cache");
        let disk_empty = vols.join("kubernetes.io~empty-dir/scratch");
        let cm = vols.join("kubernetes.io~configmap/cfg");
        let host_path = dir.path().join("hostpath");
        for d in [&empty, &disk_empty, &cm.join("..2026_12_05"), &host_path] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        std::os::unix::fs::symlink("..2026_12_05", cm.join("..data")).expect("link");
        // The attack: `..data -> ..x -> <a host directory>`, planted by a
        // container in a writable emptyDir and in a hostPath.
        for planted in [&disk_empty, &host_path] {
            std::os::unix::fs::symlink("..x", planted.join("..data")).expect("link");
            std::os::unix::fs::symlink("/etc", planted.join("..x")).expect("link");
        }
        mount(
            Some("tmpfs"),
            &empty,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=16m"),
        )
        .expect("tmpfs");
        let _empty = Unmount(&empty);
        let ctr = dir.path().join("work/c1");
        std::fs::create_dir_all(&ctr).expect("container dir");

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
            bind_of(&host_path, "/host"),
        ]));
        let settings = Settings {
            kubelet_root: root.clone(),
        };
        let volumes = rewrite_spec(&mut spec, &ctr, "c1", &settings).expect("rewrite");
        let binds = [ctr.join("mounts/1"), ctr.join("mounts/3")];
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
                    volume: kubelet::volume(&root, &cm).expect("a kubelet volume"),
                    mode: 0o755,
                    packs: (ctr.join("packs"), format!("{GUEST_SHARED}/c1/packs")),
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
                format!("{GUEST_SHARED}/c1/mounts/3"),
            ]
        );
        for gone in ["mounts/0", "mounts/2"] {
            assert!(
                !ctr.join(gone).exists(),
                "{gone}: a guest volume is not on the share"
            );
        }
        // The planted links are on the share as links, for the guest to
        // resolve inside the container.
        assert_eq!(
            std::fs::read_link(ctr.join("mounts/1/..x")).expect("link"),
            Path::new("/etc")
        );
        // A ConfigMap-kind path without kubelet's layout is refused.
        std::fs::remove_file(cm.join("..data")).expect("rm");
        std::os::unix::fs::symlink("/etc", cm.join("..data")).expect("link");
        let mut spec = Spec::default();
        spec.set_mounts(Some(vec![bind_of(&cm, "/etc/cfg")]));
        let other = dir.path().join("work/c2");
        std::fs::create_dir_all(&other).expect("container dir");
        let e = rewrite_spec(&mut spec, &other, "c2", &settings).expect_err("not kubelet's");
        assert!(
            e.to_string()
                .contains("not written by kubelet's atomic writer"),
            "{e}"
        );
    }
}
