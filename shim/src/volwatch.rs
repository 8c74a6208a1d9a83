//! Host volumes that kubelet updates atomically, followed into the guest.
//!
//! A ConfigMap, Secret, projected or downward-API volume is a guest copy
//! (`agent/src/volumes.rs` says why). The shim watches the host directory
//! with inotify: kubelet's switch to a new payload is the rename of
//! `..data_tmp` over `..data`, one `IN_MOVED_TO` event named `..data`, and
//! on each one the agent is asked to bring the copy to the new payload.
//! No polling: an update reaches the guest as soon as kubelet commits it,
//! and a volume that never changes costs one inotify watch.
//!
//! A watch lives as long as its container's record in the shim ([`Watch`]
//! aborts its task when dropped) and ends by itself when the host directory
//! goes away.

use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use husk_protocols::{
    agent::{MirrorVolume, PrepareVolumeRequest, TmpfsVolume},
    pack::Limits,
};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::{unix::AsyncFd, Interest};

use crate::{
    agent::Agent,
    kubelet::{self, DATA},
    rootfs::GuestVolume,
};

/// A payload pack on the share, removed once the agent has read it.
#[derive(Debug)]
pub struct Pack(PathBuf);

impl Drop for Pack {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Numbers packs: an update and the first copy may be packed at once.
static PACKS: AtomicU64 = AtomicU64::new(0);

/// Why a volume could not be packed for the guest.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// Reading the volume or writing its pack failed.
    #[error("{volume}: {source}")]
    Io {
        /// The volume's host path.
        volume: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The volume's payload cannot be packed: unreadable, or beyond the
    /// bounds of husk.toml.
    #[error("{volume}: {source}")]
    Pack {
        /// The volume's host path.
        volume: String,
        /// The cause.
        #[source]
        source: husk_protocols::pack::PackError,
    },
}

/// The agent request that makes or updates `volume` in the guest, and the
/// pack it names (keep it until the agent has answered). A copy's payload
/// is read from the volume's descriptor (`kubelet.rs`) within `limits`.
pub fn request(
    volume: &GuestVolume,
    limits: &Limits,
) -> Result<(PrepareVolumeRequest, Option<Pack>), VolumeError> {
    let mut r = PrepareVolumeRequest::new();
    match volume {
        GuestVolume::Memory { target, size_bytes } => {
            r.target = target.clone();
            let mut t = TmpfsVolume::new();
            t.size_bytes = *size_bytes;
            r.set_tmpfs(t);
            Ok((r, None))
        }
        GuestVolume::Mirror {
            target,
            volume,
            mode,
            packs: (host_packs, guest_packs),
        } => {
            let path = volume.path().display().to_string();
            let io = |source| VolumeError::Io {
                volume: path.clone(),
                source,
            };
            let dir = volume.open().map_err(io)?;
            let data = kubelet::data_dir(&dir).map_err(io)?;
            let payload = kubelet::open_payload(&dir, &data).map_err(io)?;
            crate::hostfs::private_dir(host_packs).map_err(io)?;
            let name = format!("{}.pack", PACKS.fetch_add(1, Ordering::Relaxed));
            let pack = Pack(host_packs.join(&name));
            let file = new_file(&pack.0).map_err(io)?;
            let mut out = std::io::BufWriter::new(file);
            let totals = husk_protocols::pack::write_pack_dir(payload, &mut out, limits).map_err(
                |source| VolumeError::Pack {
                    volume: path.clone(),
                    source,
                },
            )?;
            drop(out);
            tracing::debug!(volume = %path, entries = totals.entries, bytes = totals.bytes, "packed");
            r.target = target.clone();
            let mut m = MirrorVolume::new();
            m.mode = *mode;
            m.data_dir = data;
            m.pack = format!("{guest_packs}/{name}");
            r.set_mirror(m);
            Ok((r, Some(pack)))
        }
    }
}

/// A new file at `path`, mode 0600, never through an existing name.
fn new_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// A running watch; dropping it ends it.
#[derive(Debug)]
pub struct Watch(tokio::task::AbortHandle);

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The inotify instance as something tokio can wait on.
struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Watches the host volume of mirror `volume` (created by container
/// `id`) and updates the guest copy on every payload switch, packing
/// within `limits`. `None` for a volume that is not a mirror.
pub fn watch(
    agent: Arc<dyn Agent>,
    id: &str,
    volume: &GuestVolume,
    limits: Limits,
) -> std::io::Result<Option<Watch>> {
    let GuestVolume::Mirror { volume: v, .. } = volume else {
        return Ok(None);
    };
    // The watch is added through the descriptor (its /proc magic link), so
    // it is on the directory opened without following a symlink.
    let dir: OwnedFd = v.open()?;
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    inotify.add_watch(
        format!("/proc/self/fd/{}", dir.as_raw_fd()).as_str(),
        AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF,
    )?;
    // SAFETY: `Fd` owns the inotify descriptor (nix's `Inotify` closes it
    // on drop), so it stays open, and names the same instance, for as long
    // as the `AsyncFd` holds it.
    let fd = unsafe { AsyncFd::register_with_interest(Fd(inotify), Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    let (id, volume, host) = (id.to_string(), volume.clone(), v.path());
    let task = tokio::spawn(async move {
        if let Err(e) = follow(fd, &dir, agent.as_ref(), &id, &volume, &limits).await {
            tracing::warn!(container = %id, volume = %host.display(), "volume watch ended: {e}");
        }
    });
    Ok(Some(Watch(task.abort_handle())))
}

async fn follow(
    fd: AsyncFd<Fd>,
    dir: &OwnedFd,
    agent: &dyn Agent,
    id: &str,
    volume: &GuestVolume,
    limits: &Limits,
) -> std::io::Result<()> {
    let host = match volume {
        GuestVolume::Mirror { volume, .. } => volume.path(),
        GuestVolume::Memory { target, .. } => PathBuf::from(target),
    };
    // Unknown at first: the copy may have been made from a payload older
    // or newer than any event that follows, and a repeated update of the
    // same payload changes nothing in the guest.
    let mut current: Option<String> = None;
    loop {
        let mut guard = fd.readable().await?;
        let events = match guard.try_io(|inner| {
            inner
                .get_ref()
                .0
                .read_events()
                .map_err(std::io::Error::from)
        }) {
            Ok(Ok(events)) => events,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        };
        let gone = events.iter().any(|e| {
            e.mask.intersects(
                AddWatchFlags::IN_IGNORED
                    | AddWatchFlags::IN_DELETE_SELF
                    | AddWatchFlags::IN_MOVE_SELF,
            )
        });
        if gone {
            tracing::debug!(container = %id, volume = %host.display(), "volume gone; watch ends");
            return Ok(());
        }
        let switched = events
            .iter()
            .any(|e| e.name.as_deref().is_some_and(|n| n == DATA));
        if !switched {
            continue;
        }
        let now = match kubelet::data_dir(dir) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(container = %id, volume = %host.display(), "{e}");
                continue;
            }
        };
        if current.as_deref() == Some(now.as_str()) {
            continue;
        }
        let started = std::time::Instant::now();
        // The payload is read again while it is packed: what the guest
        // gets is what the request names, even if kubelet switched again.
        let (req, _pack) = match request(volume, limits) {
            Ok(r) => r,
            Err(e) => {
                // Beyond the bounds, or changed while read: the copy keeps
                // its payload until an update that can be packed.
                tracing::warn!(container = %id, "not updating the guest copy of {e}");
                continue;
            }
        };
        let packed = req.mirror().data_dir.clone();
        match agent.prepare_volume(req).await {
            Ok(()) => {
                tracing::info!(
                    container = %id,
                    volume = %host.display(),
                    payload = %packed,
                    ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "volume updated in the guest"
                );
                current = Some(packed);
            }
            Err(e) => {
                tracing::warn!(container = %id, volume = %host.display(), "updating the guest copy: {e}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::fake::FakeAgent;
    use std::path::Path;

    fn switch(host: &Path, ts: &str) {
        std::fs::create_dir_all(host.join(ts)).expect("payload");
        let tmp = host.join("..data_tmp");
        std::os::unix::fs::symlink(ts, &tmp).expect("tmp");
        std::fs::rename(&tmp, host.join(DATA)).expect("switch");
    }

    /// A ConfigMap volume under a kubelet root in `dir`, and its mirror.
    fn mirror(dir: &Path) -> (PathBuf, GuestVolume) {
        let root = dir.join("kubelet");
        let host = root.join("pods/u/volumes/kubernetes.io~configmap/cfg");
        std::fs::create_dir_all(&host).expect("dir");
        switch(&host, "..ts1");
        let volume = GuestVolume::Mirror {
            target: "/run/husk/volumes/mirror/c1/0".into(),
            volume: kubelet::volume(&root, &host).expect("kubelet's"),
            mode: 0o755,
            packs: (dir.join("packs"), "/run/husk/shared/c1/packs".into()),
        };
        (host, volume)
    }

    /// Each switch kubelet makes on the host reaches the agent once, with
    /// the new payload; a switch to the same payload does not.
    #[tokio::test]
    async fn each_switch_reaches_the_agent() {
        let d = tempfile::tempdir().expect("dir");
        let (host, volume) = mirror(d.path());
        let fake = Arc::new(FakeAgent::default());
        let (r, pack) = request(&volume, &Limits::NONE).expect("request");
        assert_eq!(r.mirror().data_dir, "..ts1");
        assert_eq!(r.mirror().mode, 0o755);
        let pack = pack.expect("a pack");
        let name = pack
            .0
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert_eq!(r.mirror().pack, format!("/run/husk/shared/c1/packs/{name}"));
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(&pack.0).expect("pack").mode() & 0o777,
            0o600
        );
        let path = pack.0.clone();
        drop(pack);
        assert!(!path.exists(), "a pack goes once the agent has it");
        let w = watch(fake.clone(), "c1", &volume, Limits::NONE)
            .expect("watch")
            .expect("a mirror");
        let volumes = |f: &FakeAgent| {
            f.calls()
                .into_iter()
                .filter(|c| c.starts_with("volume"))
                .count()
        };
        for (n, ts) in [(1, "..ts2"), (2, "..ts3")] {
            switch(&host, ts);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while volumes(&fake) < n && std::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert_eq!(volumes(&fake), n, "switch to {ts}");
        }
        drop(w);
        switch(&host, "..ts4");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(volumes(&fake), 2, "no updates after the watch is dropped");
    }

    /// A payload beyond the bounds is refused with an error naming the
    /// volume and the bound, before its big file is read, and leaves no
    /// pack behind; symlinks in the payload are packed as symlinks, never
    /// followed on the host.
    #[test]
    fn payloads_are_bounded_and_never_followed() {
        let d = tempfile::tempdir().expect("dir");
        let (host, volume) = mirror(d.path());
        std::os::unix::fs::symlink("/etc", host.join("..ts1/escape")).expect("link");
        let f = std::fs::File::create(host.join("..ts1/sparse")).expect("file");
        f.set_len(4 << 30).expect("a 4 GiB sparse file");
        let limits = Limits {
            entries: 100,
            bytes: 64 << 20,
            file_bytes: 16 << 20,
        };
        let e = request(&volume, &limits).expect_err("too big");
        let text = e.to_string();
        assert!(
            text.contains("cfg") && text.contains("sparse") && text.contains("more than 16777216"),
            "{text}"
        );
        let packs = d.path().join("packs");
        assert_eq!(
            std::fs::read_dir(&packs).expect("packs").count(),
            0,
            "no pack left"
        );
        std::fs::remove_file(host.join("..ts1/sparse")).expect("rm");
        let (req, pack) = request(&volume, &limits).expect("within the bounds");
        let pack = pack.expect("pack");
        let mut bytes = std::fs::read(&pack.0).expect("pack");
        let out = d.path().join("unpacked");
        husk_protocols::pack::unpack(&mut bytes.as_slice(), &out).expect("unpack");
        assert_eq!(
            std::fs::read_link(out.join("escape")).expect("still a link"),
            Path::new("/etc")
        );
        assert_eq!(req.mirror().data_dir, "..ts1");
        bytes.clear();
        // Too many entries.
        for i in 0..5 {
            std::fs::write(host.join(format!("..ts1/f{i}")), "x").expect("file");
        }
        let few = Limits {
            entries: 3,
            ..limits
        };
        let e = request(&volume, &few).expect_err("too many");
        assert!(e.to_string().contains("more than 3 entries"), "{e}");
    }
}
