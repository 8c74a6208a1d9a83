//! Template snapshots: boot once, snapshot when the agent is ready.
//!
//! With `make_template` set, husk-vmm listens on the agent's readiness port
//! itself (`<vsock uds>_<READY_PORT>`), and the moment the agent announces
//! readiness — before any host has talked to it, so nothing pod-specific
//! exists in the guest yet — it writes the snapshot and ends the VM. Every
//! later microVM of the same image and shape restores from that file.
//!
//! [`key`] names the template a VM restores from; [`start`] finds it or
//! makes it (one boot of a template VM).

pub mod start;

use std::{
    io::Read,
    os::{
        fd::AsRawFd,
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::persist::Persist;

/// The guest vsock port the agent announces readiness to (husk-protocols'
/// READY_VSOCK_PORT; vmm-core does not depend on the agent API).
pub const READY_PORT: u32 = 1025;
const READY_PREFIX: &[u8] = b"husk-agent ready ";
const MAX_LINE: usize = 128;

/// What became of the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateOutcome {
    /// Written, with this many bytes of guest memory.
    Written(u64),
    /// Not written; why.
    Failed(String),
}

/// Waits for readiness, then snapshots the VM.
pub struct TemplateMaker {
    listener: UnixListener,
    listener_path: PathBuf,
    conn: Option<(UnixStream, Vec<u8>)>,
    out: PathBuf,
    persist: Arc<Persist>,
    outcome: Arc<Mutex<Option<TemplateOutcome>>>,
    done: EventFd,
}

impl std::fmt::Debug for TemplateMaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateMaker")
            .field("out", &self.out)
            .finish_non_exhaustive()
    }
}

impl TemplateMaker {
    /// Listens on the readiness socket of `vsock_uds`; the snapshot goes to
    /// `out`; `done` is signalled once the outcome is known.
    pub fn new(
        vsock_uds: &Path,
        out: &Path,
        persist: Arc<Persist>,
        outcome: Arc<Mutex<Option<TemplateOutcome>>>,
        done: EventFd,
    ) -> std::io::Result<Self> {
        let mut p = vsock_uds.as_os_str().to_os_string();
        p.push(format!("_{READY_PORT}"));
        let listener_path = PathBuf::from(p);
        let _ = std::fs::remove_file(&listener_path);
        let listener = UnixListener::bind(&listener_path)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            listener_path,
            conn: None,
            out: out.to_path_buf(),
            persist,
            outcome,
            done,
        })
    }

    fn finish(&mut self, outcome: TemplateOutcome) {
        match &outcome {
            TemplateOutcome::Written(bytes) => {
                tracing::info!(path = %self.out.display(), memory_bytes = bytes, "template written")
            }
            TemplateOutcome::Failed(why) => tracing::error!("template not written: {why}"),
        }
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        let _ = self.done.write(1);
    }
}

impl Drop for TemplateMaker {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.listener_path);
    }
}

impl MutEventSubscriber for TemplateMaker {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("template: watching the readiness socket: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.listener.as_raw_fd() {
            if let Ok((stream, _)) = self.listener.accept() {
                if self.conn.is_none() && stream.set_nonblocking(true).is_ok() {
                    let _ = ops.add(Events::new(&stream, EventSet::IN));
                    self.conn = Some((stream, Vec::new()));
                }
            }
            return;
        }
        let Some((stream, buf)) = self.conn.as_mut() else {
            return;
        };
        let mut chunk = [0u8; MAX_LINE];
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(_) => 0,
        };
        buf.extend_from_slice(&chunk[..n]);
        let complete = buf.contains(&b'\n') || n == 0 || buf.len() >= MAX_LINE;
        if !complete {
            return;
        }
        let ready = buf.starts_with(READY_PREFIX) && buf.contains(&b'\n');
        let fd = stream.as_raw_fd();
        let _ = ops.remove(Events::empty_raw(fd));
        self.conn = None;
        let outcome = if ready {
            match self.persist.snapshot(&self.out) {
                Ok(stats) => TemplateOutcome::Written(stats.memory_bytes),
                Err(e) => TemplateOutcome::Failed(e.to_string()),
            }
        } else {
            TemplateOutcome::Failed("the agent sent no readiness line".to_string())
        };
        self.finish(outcome);
    }
}

/// The name of the template for a VM described by `config`: a hash of
/// everything the template's contents depend on (guest kernel and
/// initramfs bytes, kernel command line: husk-vmm's own words and the
/// extra ones, VM shape, devices, CPU profile, husk version). A change to any of them names a new template.
pub fn key(
    config: &crate::VmConfig,
    profile: crate::arch::cpuid::CpuProfile,
) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"husk template v1\0");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update([0]);
    for file in std::iter::once(&config.kernel).chain(config.initramfs.as_ref()) {
        let mut f = std::fs::File::open(file)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        h.update([0xff]);
    }
    h.update(crate::vmm::BASE_CMDLINE.join(" ").as_bytes());
    h.update([0]);
    h.update(config.extra_cmdline.trim().as_bytes());
    h.update([0]);
    h.update(profile.cmdline().as_bytes());
    h.update([0, config.vcpus]);
    h.update(config.mem_mib.to_le_bytes());
    h.update([
        u8::from(config.vsock.is_some()),
        u8::from(config.serial_log.is_some()),
    ]);
    // The guest keeps the virtio-fs tag it probed.
    match &config.fs {
        Some(fs) => {
            h.update(b"fs\0");
            h.update(fs.tag.as_bytes());
            h.update([0]);
        }
        None => h.update(b"no fs\0"),
    }
    // A network device (its MAC, MTU and tap are set per VM after restore).
    h.update([u8::from(config.net.is_some())]);
    // The balloon's features are negotiated at boot and kept in the
    // template, so each setting that changes them names its own template.
    match &config.balloon {
        Some(b) => {
            h.update(b"balloon\0");
            h.update(b.to_arg().as_bytes());
            h.update([0]);
        }
        None => h.update(b"no balloon\0"),
    }
    let digest = h.finalize();
    Ok(digest.iter().take(12).map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{arch::cpuid::CpuProfile, VmConfig};

    #[test]
    fn key_follows_image_cmdline_and_shape() {
        let dir = std::env::temp_dir().join(format!("husk-tkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"kernel one").expect("write");
        let base = VmConfig {
            kernel: kernel.clone(),
            initramfs: None,
            ..VmConfig::with_defaults()
        };
        let k = |c: &VmConfig| key(c, CpuProfile::Host).expect("key");
        let k0 = k(&base);
        assert_eq!(k0, k(&base));
        assert_eq!(k0.len(), 24);
        assert_ne!(
            k0,
            k(&VmConfig {
                extra_cmdline: "husk.log=debug".into(),
                ..base.clone()
            })
        );
        assert_ne!(
            k0,
            k(&VmConfig {
                mem_mib: 256,
                ..base.clone()
            })
        );
        assert_ne!(
            k0,
            k(&VmConfig {
                vcpus: 2,
                ..base.clone()
            })
        );
        assert_ne!(k0, key(&base, CpuProfile::Emulated).expect("key"));
        let with_fs = |tag: &str| VmConfig {
            fs: Some(crate::config::FsConfig {
                socket: "/run/one.sock".into(),
                tag: tag.into(),
            }),
            ..base.clone()
        };
        let with_balloon = |reporting: bool| VmConfig {
            balloon: Some(crate::BalloonConfig {
                free_page_reporting: reporting,
                ..crate::BalloonConfig::default()
            }),
            ..base.clone()
        };
        assert_ne!(k0, k(&with_balloon(true)), "a balloon names its template");
        assert_ne!(k(&with_balloon(true)), k(&with_balloon(false)));
        assert_ne!(k0, k(&with_fs("husk")), "the device set names the template");
        assert_ne!(k(&with_fs("husk")), k(&with_fs("other")));
        let mut elsewhere = with_fs("husk");
        if let Some(fs) = elsewhere.fs.as_mut() {
            fs.socket = "/run/two.sock".into();
        }
        assert_eq!(
            k(&with_fs("husk")),
            k(&elsewhere),
            "each VM has its own daemon socket; the template is the same"
        );
        std::fs::write(&kernel, b"kernel two").expect("write");
        assert_ne!(k0, k(&base), "a new kernel names a new template");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
