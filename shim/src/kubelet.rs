//! kubelet's volume directories: which bind sources husk treats as one of
//! kubelet's volumes, and how it reads them without trusting their
//! contents.
//!
//! A bind source is a kubelet volume only by where it is: exactly
//! `<kubelet root>/pods/<pod uid>/volumes/kubernetes.io~<kind>/<name>`,
//! with the kubelet root from `husk.toml`. Nothing inside a directory
//! decides it: a container can write a `..data` symlink into any writable
//! volume, and a shim that took such a directory for a ConfigMap and
//! followed its links on the host would hand the node's files to the pod.
//!
//! The atomically written kinds (ConfigMap, Secret, projected, downward
//! API) become guest copies (`volwatch.rs`). They are read from a
//! descriptor of the volume directory, opened below the kubelet root
//! without following a symlink; inside it, `..data` is read as a link
//! (never followed) and must name a payload directory (`..<name>`), and the
//! payload is packed entry by entry below its descriptor, following no
//! symlink and crossing no mount (`husk_protocols::pack`), within the
//! bounds of `husk.toml`.

use std::{
    ffi::OsStr,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Component, Path, PathBuf},
};

use nix::{
    fcntl::{OFlag, OpenHow, ResolveFlag},
    sys::stat::Mode,
};

/// The symlink whose rename commits a new payload.
pub const DATA: &str = "..data";

/// kubelet's volume kinds that husk recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `emptyDir` (a tmpfs when its medium is memory).
    EmptyDir,
    /// ConfigMap, Secret, projected or downward API: written atomically
    /// (a `..data` symlink to the current payload directory).
    Atomic,
}

impl Kind {
    fn of(plugin: &str) -> Option<Self> {
        match plugin {
            "kubernetes.io~empty-dir" => Some(Kind::EmptyDir),
            "kubernetes.io~configmap"
            | "kubernetes.io~secret"
            | "kubernetes.io~projected"
            | "kubernetes.io~downward-api" => Some(Kind::Atomic),
            _ => None,
        }
    }
}

/// A volume directory of kubelet's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Its kind.
    pub kind: Kind,
    /// The kubelet root it is below.
    pub root: PathBuf,
    /// `pods/<uid>/volumes/<plugin>/<name>`, relative to the root.
    pub rel: PathBuf,
}

impl Volume {
    /// The volume's host path.
    pub fn path(&self) -> PathBuf {
        self.root.join(&self.rel)
    }

    /// Opens the volume directory: the kubelet root as configured (a path
    /// the node's administrator chose), then the rest below it without
    /// following a symlink. The volume directory itself may be a mount
    /// (kubelet mounts a tmpfs for Secrets).
    pub fn open(&self) -> io::Result<OwnedFd> {
        let root = nix::fcntl::open(
            &self.root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        // SAFETY: `open` just returned this descriptor; nothing else owns it.
        let root = unsafe { OwnedFd::from_raw_fd(root) };
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        let fd = nix::fcntl::openat2(root.as_raw_fd(), &self.rel, how).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("{}: {e}", self.path().display()),
            )
        })?;
        // SAFETY: `openat2` just returned this descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// The kubelet volume `src` is, if it is one: `src` must be exactly
/// `<root>/pods/<uid>/volumes/<plugin>/<name>` for a plugin husk knows,
/// with plain components (no `.`, `..` or empty ones).
pub fn volume(root: &Path, src: &Path) -> Option<Volume> {
    let rest = src.strip_prefix(root).ok()?;
    let parts: Vec<&OsStr> = rest
        .components()
        .map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect::<Option<_>>()?;
    // `components` drops `.` and repeated slashes; the path must have had
    // none of them.
    let plain_len = parts.iter().map(|p| p.len() + 1).sum::<usize>();
    if rest.as_os_str().len() + 1 != plain_len {
        return None;
    }
    match parts.as_slice() {
        [pods, _uid, volumes, plugin, _name] if *pods == "pods" && *volumes == "volumes" => {
            Some(Volume {
                kind: Kind::of(plugin.to_str()?)?,
                root: root.to_path_buf(),
                rel: rest.to_path_buf(),
            })
        }
        _ => None,
    }
}

/// The payload directory `..data` names in the open volume `dir` now.
/// The link is read, never followed, and must name one entry of `dir`
/// starting with `..`.
pub fn data_dir(dir: &OwnedFd) -> io::Result<String> {
    let target = nix::fcntl::readlinkat(Some(dir.as_raw_fd()), DATA)
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("{DATA}: {e}")))?;
    target
        .to_str()
        .filter(|t| valid_payload_name(t))
        .map(str::to_string)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{DATA} points to {}, not a payload directory",
                    target.to_string_lossy()
                ),
            )
        })
}

/// Whether `name` can be a payload directory of kubelet's atomic writer.
fn valid_payload_name(name: &str) -> bool {
    name.starts_with("..")
        && name.len() > 2
        && !name.contains('/')
        && !name.contains('\0')
        && name != DATA
        && name != "..data_tmp"
}

/// Opens the payload directory `name` of the open volume `dir`, below it,
/// following no symlink and crossing no mount.
pub fn open_payload(dir: &OwnedFd, name: &str) -> io::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    let fd = nix::fcntl::openat2(dir.as_raw_fd(), name, how)
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("{name}: {e}")))?;
    // SAFETY: `openat2` just returned this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The permission bits of the open directory `dir`.
pub fn mode(dir: &OwnedFd) -> io::Result<u32> {
    let st = nix::sys::stat::fstat(dir.as_raw_fd())?;
    Ok(st.st_mode & 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kubelets_own_paths_are_its_volumes() {
        let root = Path::new("/var/lib/kubelet");
        let atomic = |p: &str| volume(root, Path::new(p)).map(|v| v.kind);
        for (p, want) in [
            (
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~configmap/cfg",
                Some(Kind::Atomic),
            ),
            (
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~secret/s",
                Some(Kind::Atomic),
            ),
            (
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~projected/p",
                Some(Kind::Atomic),
            ),
            (
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~downward-api/d",
                Some(Kind::Atomic),
            ),
            (
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/e",
                Some(Kind::EmptyDir),
            ),
            // Not kubelet's: a hostPath, a subPath bind, other plugins,
            // paths deeper or shallower, elsewhere, with dot components.
            ("/data/pods/u1/volumes/kubernetes.io~configmap/cfg", None),
            ("/var/lib/kubelet/pods/u1/volume-subpaths/cfg/app/0", None),
            ("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/x", None),
            (
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~configmap/cfg/sub",
                None,
            ),
            (
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~configmap",
                None,
            ),
            (
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/e/../../../../../etc",
                None,
            ),
            (
                "/var/lib/kubelet/pods/u1/./volumes/kubernetes.io~configmap/cfg",
                None,
            ),
            (
                "/var/lib/kubelet/pods//u1/volumes/kubernetes.io~configmap/cfg",
                None,
            ),
            (
                "/var/lib/kubeletx/pods/u1/volumes/kubernetes.io~configmap/c",
                None,
            ),
            ("relative/pods/u1/volumes/kubernetes.io~configmap/c", None),
        ] {
            assert_eq!(atomic(p), want, "{p}");
        }
    }

    #[test]
    fn data_must_name_a_payload_and_nothing_is_followed() {
        let d = tempfile::tempdir().expect("dir");
        let root = d.path().join("kubelet");
        let vol = root.join("pods/u/volumes/kubernetes.io~configmap/cfg");
        std::fs::create_dir_all(vol.join("..2026_12_07")).expect("payload");
        std::os::unix::fs::symlink("..2026_12_07", vol.join(DATA)).expect("link");
        let v = volume(&root, &vol).expect("a kubelet volume");
        let fd = v.open().expect("open");
        assert_eq!(data_dir(&fd).expect("payload"), "..2026_12_07");
        open_payload(&fd, "..2026_12_07").expect("payload opens");

        for bad in ["/etc", "../..x", "..", "..data", "..a/b", "plain"] {
            std::fs::remove_file(vol.join(DATA)).expect("rm");
            std::os::unix::fs::symlink(bad, vol.join(DATA)).expect("link");
            let e = data_dir(&fd).expect_err(bad);
            assert!(
                e.to_string().contains("not a payload directory"),
                "{bad}: {e}"
            );
        }
        // A payload name that is itself a symlink (to the host's /etc) is
        // not followed.
        std::os::unix::fs::symlink("/etc", vol.join("..x")).expect("link");
        let e = open_payload(&fd, "..x").expect_err("a symlinked payload");
        assert!(e.to_string().starts_with("..x: "), "{e}");

        // A volume directory replaced by a symlink is not opened.
        let other = d.path().join("other");
        std::fs::create_dir_all(&other).expect("dir");
        std::fs::remove_dir_all(&vol).expect("rm");
        std::os::unix::fs::symlink(&other, &vol).expect("link");
        let e = v.open().expect_err("a symlinked volume");
        assert!(e.to_string().contains("cfg: "), "{e}");
        // And so is one whose parent is a symlink.
        let pods = root.join("pods");
        std::fs::rename(&pods, root.join("pods.real")).expect("mv");
        std::os::unix::fs::symlink(root.join("pods.real"), &pods).expect("link");
        assert!(v.open().is_err());
    }
}
