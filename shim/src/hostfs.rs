//! What the shim makes on the host for a pod: private directories and
//! hardened mounts.
//!
//! The shim runs as root and the guest of a pod is hostile. Everything the
//! guest can change on the host is below the pod's share, so the share is
//! laid out (`vm.rs`) such that the guest can change nothing the shim
//! names by path: the guest sees the shim's tree only through a
//! read-only view, and writes only inside the mounts the shim attaches
//! (root file systems, writable volumes), which the shim never looks into.
//! These helpers keep the rest of the promise:
//!
//! * every directory the shim makes for a pod is `0700` (no local user can
//!   reach a pod's files, sockets or logs), and every file `0600`;
//! * every mount attached below the share is `nosuid,nodev`, set while the
//!   mount is still detached: the virtio-fs daemon's mount namespace gets
//!   its own copy of each mount as it is attached, and a later change of
//!   flags would not reach that copy. A container's set-uid program or
//!   device node is inert on the host;
//! * mounts are attached onto a descriptor opened without following a
//!   symlink, and taken down with `UMOUNT_NOFOLLOW`.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::{DirBuilderExt, PermissionsExt},
    },
    path::Path,
};

/// Mode of every directory the shim makes for a pod.
pub const DIR_MODE: u32 = 0o700;

/// Makes `dir` and any missing parents with mode 0700, and gives `dir`
/// itself that mode if it existed already (a state directory left by an
/// older version, or made by hand).
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    if meta.permissions().mode() & 0o7777 != DIR_MODE {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a path"))
}

/// The result of a system call: its error (naming `what` and `path`) when
/// it returned a negative value, else the value as a descriptor or 0.
fn check(rc: libc::c_long, what: &str, path: &Path) -> io::Result<libc::c_int> {
    match libc::c_int::try_from(rc) {
        Ok(v) if v >= 0 => Ok(v),
        _ => {
            let e = io::Error::last_os_error();
            Err(io::Error::new(
                e.kind(),
                format!("{what} {}: {e}", path.display()),
            ))
        }
    }
}

/// Opens `path` as an `O_PATH` descriptor without following a symlink in
/// its last component.
fn open_path_nofollow(path: &Path) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    // SAFETY: open(2) reads the NUL-terminated path; the result is a new
    // descriptor (owned below) or -1.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    let fd = check(libc::c_long::from(fd), "opening", path)?;
    // SAFETY: `fd` was just returned by open and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Bind-mounts `src` (and every mount below it) on `target`, `nosuid` and
/// `nodev`, and read-only too if `read_only`. The attributes are set on
/// the detached copy before it is attached (see the module
/// documentation); `target` must exist and is not followed if it is a
/// symlink.
pub fn bind(src: &Path, target: &Path, read_only: bool) -> io::Result<()> {
    let src_c = cstring(src)?;
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
    let fd = check(fd, "cloning the mount of", src)?;
    // SAFETY: `fd` was just returned by open_tree and is owned by nothing
    // else.
    let tree = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    if read_only {
        set |= libc::MOUNT_ATTR_RDONLY;
    }
    let attr = libc::mount_attr {
        attr_set: set,
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
    check(rc, "setting nosuid,nodev on the copy of", src)?;
    let to = open_path_nofollow(target)?;
    // SAFETY: move_mount(2) attaches the detached tree onto the object
    // `to` names; both descriptors and the empty path live for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            to.as_raw_fd(),
            empty.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    check(rc, "attaching a mount on", target)?;
    Ok(())
}

/// Detaches the mount at `path` without following a symlink there.
/// `Ok(false)` when nothing is mounted there (or `path` is gone).
pub fn unmount(path: &Path) -> io::Result<bool> {
    match nix::mount::umount2(
        path,
        nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW,
    ) {
        Ok(()) => Ok(true),
        Err(nix::Error::EINVAL | nix::Error::ENOENT) => Ok(false),
        Err(e) => Err(io::Error::new(
            io::Error::from(e).kind(),
            format!("unmounting {}: {e}", path.display()),
        )),
    }
}

/// Detaches every mount at or below `dir`, deepest first, without
/// following symlinks. Returns what could not be unmounted.
pub fn unmount_below(dir: &Path) -> Vec<String> {
    let mut points = mounts_below(dir);
    // Deepest first: a mount's children go before it.
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in &points {
        if let Err(e) = unmount(Path::new(p)) {
            tracing::warn!("{e}");
        }
    }
    mounts_below(dir)
}

/// Mount points at or below `dir` (from /proc/self/mountinfo, with its
/// octal escapes undone).
pub fn mounts_below(dir: &Path) -> Vec<String> {
    let Some(prefix) = dir.to_str() else {
        return Vec::new();
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|m| m == prefix || m.starts_with(&format!("{prefix}/")))
        .collect()
}

/// Undoes mountinfo's `\ooo` escapes (space, tab, newline, backslash).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn private_dirs_are_0700_even_when_they_existed() {
        let d = tempfile::tempdir().expect("dir");
        let deep = d.path().join("a/b/c");
        private_dir(&deep).expect("made");
        for p in [d.path().join("a"), d.path().join("a/b"), deep.clone()] {
            assert_eq!(
                std::fs::metadata(&p).expect("meta").mode() & 0o7777,
                0o700,
                "{}",
                p.display()
            );
        }
        std::fs::set_permissions(&deep, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        private_dir(&deep).expect("again");
        assert_eq!(
            std::fs::metadata(&deep).expect("meta").mode() & 0o7777,
            0o700
        );
        // A symlink in its place is refused, not followed.
        let link = d.path().join("link");
        std::os::unix::fs::symlink(d.path().join("a"), &link).expect("symlink");
        assert!(private_dir(&link).is_err());
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/run/a\040b\011c\134d"), "/run/a b\tc\\d");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/bad\09"), r"/bad\09");
    }

    /// A bind through [`bind`] is nosuid and nodev (and read-only when
    /// asked) where it is attached, a set-uid file there runs without its
    /// owner's rights, and a symlink in the target's place is refused.
    #[test]
    fn binds_are_nosuid_nodev_and_never_land_on_a_symlink() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: it mounts"
        );
        let d = tempfile::tempdir().expect("dir");
        let src = d.path().join("src");
        let target = d.path().join("target");
        std::fs::create_dir_all(&src).expect("src");
        std::fs::create_dir_all(&target).expect("target");
        bind(&src, &target, false).expect("bind");
        let opts = mount_options(&target);
        let _ = unmount(&target);
        assert!(opts.contains(&"nosuid".to_string()), "{opts:?}");
        assert!(opts.contains(&"nodev".to_string()), "{opts:?}");
        assert!(opts.contains(&"rw".to_string()), "{opts:?}");

        bind(&src, &target, true).expect("bind read-only");
        let opts = mount_options(&target);
        let refused = std::fs::write(target.join("x"), "x").expect_err("read-only");
        assert!(unmount(&target).expect("unmount"));
        assert!(opts.contains(&"ro".to_string()), "{opts:?}");
        assert_eq!(refused.raw_os_error(), Some(libc::EROFS));
        assert!(!unmount(&target).expect("nothing left"), "unmounted once");

        // A symlink planted where the mount should go: nothing is mounted
        // where it points.
        let elsewhere = d.path().join("elsewhere");
        std::fs::create_dir_all(&elsewhere).expect("dir");
        let planted = d.path().join("planted");
        std::os::unix::fs::symlink(&elsewhere, &planted).expect("symlink");
        assert!(bind(&src, &planted, false).is_err(), "mounted on a symlink");
        assert!(mounts_below(&elsewhere).is_empty());
        // And unmount does not follow one either.
        bind(&src, &elsewhere, false).expect("bind");
        assert!(!unmount(&planted).expect("not followed"));
        assert_eq!(mounts_below(&elsewhere).len(), 1);
        assert!(unmount_below(d.path()).is_empty());
    }

    /// The options of the mount at `path`, from mountinfo.
    fn mount_options(path: &Path) -> Vec<String> {
        let p = path.to_str().expect("utf-8");
        std::fs::read_to_string("/proc/self/mountinfo")
            .expect("mountinfo")
            .lines()
            .rfind(|l| l.split(' ').nth(4) == Some(p))
            .and_then(|l| l.split(' ').nth(5))
            .map(|o| o.split(',').map(String::from).collect())
            .unwrap_or_default()
    }
}
