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
    os::fd::{AsFd, AsRawFd, RawFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use husk_protocols::agent::{MirrorVolume, PrepareVolumeRequest, TmpfsVolume};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::{unix::AsyncFd, Interest};

use crate::{agent::Agent, rootfs::GuestVolume};

/// The symlink whose rename commits a new payload.
const DATA: &str = "..data";

/// The payload directory `..data` names in `host` now.
pub fn data_dir(host: &Path) -> std::io::Result<String> {
    let target = std::fs::read_link(host.join(DATA))?;
    target
        .to_str()
        .filter(|t| t.starts_with("..") && !t.contains('/'))
        .map(str::to_string)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{}/{DATA} points to {}, not a payload directory",
                    host.display(),
                    target.display()
                ),
            )
        })
}

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

/// The agent request that makes or updates `volume` in the guest, and the
/// pack it names (keep it until the agent has answered).
pub fn request(volume: &GuestVolume) -> std::io::Result<(PrepareVolumeRequest, Option<Pack>)> {
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
            host,
            guest_source,
            packs: (host_packs, guest_packs),
        } => {
            let data = data_dir(host)?;
            std::fs::create_dir_all(host_packs)?;
            let name = format!("{}.pack", PACKS.fetch_add(1, Ordering::Relaxed));
            let pack = Pack(host_packs.join(&name));
            let mut out = std::io::BufWriter::new(std::fs::File::create(&pack.0)?);
            husk_protocols::pack::write_pack(&host.join(&data), &mut out)?;
            drop(out);
            r.target = target.clone();
            let mut m = MirrorVolume::new();
            m.source = guest_source.clone();
            m.data_dir = data;
            m.pack = format!("{guest_packs}/{name}");
            r.set_mirror(m);
            Ok((r, Some(pack)))
        }
    }
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

/// Watches the host directory of mirror `volume` (created by container
/// `id`) and updates the guest copy on every payload switch. `None` for a
/// volume that is not a mirror.
pub fn watch(
    agent: Arc<dyn Agent>,
    id: &str,
    volume: &GuestVolume,
) -> std::io::Result<Option<Watch>> {
    let GuestVolume::Mirror { host, .. } = volume else {
        return Ok(None);
    };
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    inotify.add_watch(
        host.as_path(),
        AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF,
    )?;
    // SAFETY: `Fd` owns the inotify descriptor (nix's `Inotify` closes it
    // on drop), so it stays open, and names the same instance, for as long
    // as the `AsyncFd` holds it.
    let fd = unsafe { AsyncFd::register_with_interest(Fd(inotify), Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    let (id, volume, host) = (id.to_string(), volume.clone(), host.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = follow(fd, agent.as_ref(), &id, &volume, &host).await {
            tracing::warn!(container = %id, volume = %host.display(), "volume watch ended: {e}");
        }
    });
    Ok(Some(Watch(task.abort_handle())))
}

async fn follow(
    fd: AsyncFd<Fd>,
    agent: &dyn Agent,
    id: &str,
    volume: &GuestVolume,
    host: &Path,
) -> std::io::Result<()> {
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
        let now = match data_dir(host) {
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
        let (req, _pack) = match request(volume) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(container = %id, volume = %host.display(), "packing the payload: {e}");
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

    fn switch(host: &Path, ts: &str) {
        std::fs::create_dir_all(host.join(ts)).expect("payload");
        let tmp = host.join("..data_tmp");
        std::os::unix::fs::symlink(ts, &tmp).expect("tmp");
        std::fs::rename(&tmp, host.join(DATA)).expect("switch");
    }

    /// Each switch kubelet makes on the host reaches the agent once, with
    /// the new payload; a switch to the same payload does not.
    #[tokio::test]
    async fn each_switch_reaches_the_agent() {
        let dir = std::env::temp_dir().join(format!("husk-volwatch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        switch(&dir, "..ts1");
        let fake = Arc::new(FakeAgent::default());
        let packs = dir.with_extension("packs");
        let volume = GuestVolume::Mirror {
            target: "/run/husk/volumes/mirror/c1/0".into(),
            host: dir.clone(),
            guest_source: "/run/husk/shared/c1/mounts/0".into(),
            packs: (packs.clone(), "/run/husk/shared/c1/packs".into()),
        };
        let (r, pack) = request(&volume).expect("request");
        assert_eq!(r.mirror().data_dir, "..ts1");
        let pack = pack.expect("a pack");
        let name = pack
            .0
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert_eq!(r.mirror().pack, format!("/run/husk/shared/c1/packs/{name}"));
        assert!(pack.0.exists());
        let path = pack.0.clone();
        drop(pack);
        assert!(!path.exists(), "a pack goes once the agent has it");
        let w = watch(fake.clone(), "c1", &volume)
            .expect("watch")
            .expect("a mirror");
        let volumes = |f: &FakeAgent| {
            f.calls()
                .into_iter()
                .filter(|c| c.starts_with("volume"))
                .count()
        };
        for (n, ts) in [(1, "..ts2"), (2, "..ts3")] {
            switch(&dir, ts);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while volumes(&fake) < n && std::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert_eq!(volumes(&fake), n, "switch to {ts}");
        }
        drop(w);
        switch(&dir, "..ts4");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(volumes(&fake), 2, "no updates after the watch is dropped");
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&packs);
    }

    #[test]
    fn data_dir_must_be_a_payload_name() {
        let dir = std::env::temp_dir().join(format!("husk-volwatch-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        std::os::unix::fs::symlink("/etc", dir.join(DATA)).expect("link");
        let e = data_dir(&dir).expect_err("not a payload");
        assert!(e.to_string().contains("not a payload directory"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
