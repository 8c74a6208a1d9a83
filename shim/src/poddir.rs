//! Where a pod's files live: `<state_dir>/<namespace>/<name>`, where the
//! name is the sandbox id when it is short and a shortened, still unique
//! form of it otherwise.
//!
//! Why shorten: the pod directory holds Unix sockets (`fs.sock`, `api.sock`,
//! `vsock.sock_<port>`), and a socket's path must fit in 107 bytes. CRI's
//! sandbox ids are 64 hex characters, which with a state directory of
//! any length left no room (a CRI pod under a test's state directory
//! failed to start its virtio-fs daemon).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Longest name used as is.
const MAX_NAME: usize = 32;
/// The longest file name husk puts in a pod directory: the hybrid vsock
/// socket of the highest port.
const LONGEST_FILE: &str = "vsock.sock_4294967295";
/// Room in `sockaddr_un.sun_path`, less its terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// The directory name for `id`: `id` itself if at most 32 bytes, else its
/// first 15 bytes, a dash and 16 hex digits of its SHA-256 (32 bytes).
pub fn dir_name(id: &str) -> String {
    if id.len() <= MAX_NAME {
        return id.to_string();
    }
    let digest = Sha256::digest(id.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    // containerd ids are ASCII; cut at a char boundary all the same.
    let mut cut = 15;
    while !id.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}-{hex}", &id[..cut])
}

/// The directory of containerd namespace `namespace`'s pods.
pub fn namespace_dir(state_dir: &Path, namespace: &str) -> PathBuf {
    state_dir.join(dir_name(namespace))
}

/// The pod directory of sandbox `id` in containerd namespace `namespace`.
pub fn pod_dir(state_dir: &Path, namespace: &str, id: &str) -> PathBuf {
    namespace_dir(state_dir, namespace).join(dir_name(id))
}

/// Fails unless every socket husk makes in `dir` fits in a Unix socket
/// address.
pub fn check_socket_room(dir: &Path) -> Result<(), String> {
    let longest = dir.as_os_str().len() + 1 + LONGEST_FILE.len();
    if longest > MAX_SOCKET_PATH {
        return Err(format!(
            "pod directory {} is too long for its Unix sockets ({longest} bytes, at most \
             {MAX_SOCKET_PATH}): choose a shorter state_dir in husk.toml",
            dir.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_are_kept_and_long_ones_shortened_uniquely() {
        assert_eq!(dir_name("c1"), "c1");
        let cri = "4f3c1a9e0b2d4c6f8a1e3b5d7f9a0c2e4b6d8f0a1c3e5b7d9f1a3c5e7b9d1f3a";
        let a = dir_name(cri);
        assert_eq!(a.len(), 32);
        assert!(a.starts_with("4f3c1a9e0b2d4c6-"), "{a}");
        // Same prefix, different id: different name.
        let other = format!("{}0", &cri[..63]);
        assert_ne!(dir_name(&other), a);
        assert_eq!(dir_name(cri), a, "stable");
        let exactly = "x".repeat(32);
        assert_eq!(dir_name(&exactly), exactly);
        assert_eq!(dir_name(&"x".repeat(33)).len(), 32);
    }

    #[test]
    fn socket_room_is_checked() {
        let cri = "4f3c1a9e0b2d4c6f8a1e3b5d7f9a0c2e4b6d8f0a1c3e5b7d9f1a3c5e7b9d1f3a";
        let dir = pod_dir(Path::new("/run/husk"), "k8s.io", cri);
        assert!(check_socket_room(&dir).is_ok());
        let deep = pod_dir(Path::new(&format!("/{}", "d".repeat(60))), "k8s.io", cri);
        let e = check_socket_room(&deep).expect_err("too long");
        assert!(e.contains("shorter state_dir"), "{e}");
    }
}
