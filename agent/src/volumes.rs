//! Pod volumes that live in the guest: memory-backed emptyDirs and
//! mirrors of the host directories Kubernetes updates atomically.
//!
//! A memory-backed emptyDir is a tmpfs on the host under runc; through the
//! share it would be host memory outside the pod's VM and slow to reach.
//! Here it is a tmpfs in the guest, of the size kubelet gave the host's,
//! counted against the pod's memory like any other guest page, and shared
//! by every container of the pod that mounts it.
//!
//! ConfigMap, Secret, projected and downward-API volumes change on the host
//! while the pod runs: kubelet writes the new payload into a new directory
//! `..<timestamp>`, points a `..data_tmp` symlink at it, renames that over
//! `..data` (the atomic switch), then removes what the old payload had and
//! the new one has not. Programs watch the volume with inotify and reload.
//! virtio-fs carries no inotify events, and the guest's cache of the share
//! may show the old `..data` for a few seconds, so such a volume is a
//! guest copy instead: the shim watches the host directory and, on each
//! switch, asks the agent to [`mirror`] the new payload, which repeats
//! kubelet's steps in the guest. A watch in a container then sees what it
//! would see under runc: the new payload directory created, `..data_tmp`
//! created and moved to `..data`, the old payload directory deleted.
//! The payload crosses as one pack file under a name the guest has never
//! looked up, so no cached entry of the share can stand in for it.

use husk_protocols::GUEST_MIRRORS;
use std::{
    collections::HashSet,
    io,
    os::unix::fs::{symlink, MetadataExt, PermissionsExt},
    path::Path,
};

/// Where `..data` points: the current payload.
const DATA: &str = "..data";
/// The symlink kubelet renames over `..data`.
const DATA_TMP: &str = "..data_tmp";

/// What went wrong preparing a volume.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A request that cannot be right.
    #[error("{0}")]
    Invalid(String),
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> VolumeError {
    let what = what.into();
    move |source| VolumeError::Io { what, source }
}

/// Whether `name` can be a payload directory's name: one component,
/// starting with `..`, not one of the two symlinks.
pub fn valid_data_dir(name: &str) -> bool {
    name.starts_with("..")
        && name.len() > 2
        && !name.contains('/')
        && !name.contains('\0')
        && name != DATA
        && name != DATA_TMP
}

/// Mounts a tmpfs of `size_bytes` (0: the kernel's default) on `target`,
/// unless one is there already (the pod's next container).
pub fn tmpfs(target: &Path, size_bytes: u64) -> Result<(), VolumeError> {
    std::fs::create_dir_all(target).map_err(io_err(format!("creating {}", target.display())))?;
    if is_mount_point(target)? {
        return Ok(());
    }
    // World-writable like kubelet's emptyDir (0777), so containers running
    // as any user can use it; no device nodes, no set-uid programs.
    let mut options = String::from("mode=0777");
    if size_bytes > 0 {
        options.push_str(&format!(",size={size_bytes}"));
    }
    nix::mount::mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOSUID,
        Some(options.as_str()),
    )
    .map_err(|e| VolumeError::Io {
        what: format!("mounting a tmpfs on {}", target.display()),
        source: e.into(),
    })
}

/// Whether `path` is the root of a mount (its device differs from its
/// parent's).
fn is_mount_point(path: &Path) -> Result<bool, VolumeError> {
    let own = std::fs::metadata(path).map_err(io_err(format!("{}", path.display())))?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    let up = std::fs::metadata(parent).map_err(io_err(format!("{}", parent.display())))?;
    Ok(own.dev() != up.dev())
}

/// Brings `target` to the payload `data_dir` of a host volume, which the
/// host packed into `pack` (`husk_protocols::pack`: one file read instead
/// of a few requests per file over virtio-fs), the way kubelet's atomic
/// writer changes a volume (see the module documentation). A new copy's
/// top directory gets the host volume's permission bits `mode`. Repeating
/// it with the same payload changes nothing.
pub fn mirror(mode: u32, target: &Path, data_dir: &str, pack: &Path) -> Result<(), VolumeError> {
    if !valid_data_dir(data_dir) {
        return Err(VolumeError::Invalid(format!(
            "{data_dir:?} is not a payload directory name"
        )));
    }
    if !target.exists() {
        std::fs::create_dir_all(target)
            .map_err(io_err(format!("creating {}", target.display())))?;
        std::fs::set_permissions(target, std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(io_err(format!("{}", target.display())))?;
    }
    let current = std::fs::read_link(target.join(DATA)).ok();
    if current.as_deref() == Some(Path::new(data_dir)) {
        return Ok(());
    }

    // 1. The new payload, under its own name (a new directory).
    let copy = target.join(data_dir);
    if !copy.exists() {
        let file = std::fs::File::open(pack).map_err(io_err(format!("{}", pack.display())))?;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        if let Err(e) = husk_protocols::pack::unpack(&mut reader, &copy) {
            let _ = std::fs::remove_dir_all(&copy);
            return Err(match e {
                husk_protocols::pack::UnpackError::Malformed(m) => {
                    VolumeError::Invalid(format!("{}: {m}", pack.display()))
                }
                husk_protocols::pack::UnpackError::Io(e) => VolumeError::Io {
                    what: format!("unpacking {} into {}", pack.display(), copy.display()),
                    source: e,
                },
            });
        }
    }
    // 2. The user-visible names of the new payload: `name -> ..data/name`.
    let names = top_level_names(&copy)?;
    for name in &names {
        let link = target.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(Path::new(DATA).join(name), &link)
                .map_err(io_err(format!("linking {}", link.display())))?;
        }
    }
    // 3. The switch: `..data_tmp -> <payload>`, renamed over `..data`.
    let tmp = target.join(DATA_TMP);
    let _ = std::fs::remove_file(&tmp);
    symlink(data_dir, &tmp).map_err(io_err(format!("linking {}", tmp.display())))?;
    std::fs::rename(&tmp, target.join(DATA))
        .map_err(io_err(format!("switching {}", target.join(DATA).display())))?;
    // 4. What the old payload had and the new one has not, and the old
    //    payload itself.
    for entry in std::fs::read_dir(target).map_err(io_err(format!("{}", target.display())))? {
        let entry = entry.map_err(io_err(format!("{}", target.display())))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        if name.starts_with("..") {
            if name != DATA && name != data_dir {
                remove(&path)?;
            }
        } else if !names.contains(name) {
            remove(&path)?;
        }
    }
    Ok(())
}

/// The first path components of a payload's files (kubelet makes one
/// user-visible symlink for each).
fn top_level_names(payload: &Path) -> Result<HashSet<String>, VolumeError> {
    let mut names = HashSet::new();
    for entry in std::fs::read_dir(payload).map_err(io_err(format!("{}", payload.display())))? {
        let entry = entry.map_err(io_err(format!("{}", payload.display())))?;
        if let Some(n) = entry.file_name().to_str() {
            if !n.starts_with("..") {
                names.insert(n.to_string());
            }
        }
    }
    Ok(names)
}

/// Removes the guest copies of container `id`'s volumes (after its
/// delete; `id` is a container id the agent has checked).
pub fn remove_mirrors(id: &str) {
    remove_mirrors_in(Path::new(GUEST_MIRRORS), id);
}

fn remove_mirrors_in(base: &Path, id: &str) {
    let mirrors = base.join(id);
    if let Err(e) = std::fs::remove_dir_all(&mirrors) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(dir = %mirrors.display(), "removing volume copies: {e}");
        }
    }
}

fn remove(path: &Path) -> Result<(), VolumeError> {
    let meta = std::fs::symlink_metadata(path).map_err(io_err(format!("{}", path.display())))?;
    if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
    .map_err(io_err(format!("removing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A directory removed when the test ends.
    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().expect("temporary directory")
    }

    /// Writes a payload the way kubelet's atomic writer does, and switches
    /// the host directory to it.
    fn kubelet_write(host: &Path, ts: &str, files: &[(&str, &str)]) {
        let dir = host.join(ts);
        for (name, text) in files {
            let p = dir.join(name);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("dir");
            std::fs::write(&p, text).expect("write");
        }
        for (name, _) in files {
            let top = name.split('/').next().expect("top");
            let link = host.join(top);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(Path::new(DATA).join(top), &link).expect("link");
            }
        }
        let tmp = host.join(DATA_TMP);
        symlink(ts, &tmp).expect("tmp");
        std::fs::rename(&tmp, host.join(DATA)).expect("switch");
    }

    /// Packs the payload `ts` of `host` as the shim does; the pack's path.
    fn pack(host: &Path, ts: &str) -> PathBuf {
        let p = host.with_extension(format!("{}.pack", ts.trim_start_matches('.')));
        let mut f = std::fs::File::create(&p).expect("pack file");
        husk_protocols::pack::write_pack(&host.join(ts), &mut f).expect("pack");
        p
    }

    /// Mirrors the payload `ts` of `host` into `guest`, packed as the shim
    /// packs it.
    fn mirror_payload(host: &Path, guest: &Path, ts: &str) -> Result<(), VolumeError> {
        let mode = std::fs::metadata(host).expect("host").permissions().mode();
        mirror(mode & 0o7777, guest, ts, &pack(host, ts))
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_else(|e| format!("<{e}>"))
    }

    fn names(p: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_payload_and_its_update_are_mirrored_as_kubelet_writes_them() {
        let d = tempdir();
        let (host, guest) = (d.path().join("host"), d.path().join("guest"));
        std::fs::create_dir_all(&host).expect("host");
        kubelet_write(
            &host,
            "..2026_12_05_01",
            &[("app.conf", "v1\n"), ("nested/deep.txt", "deep\n")],
        );
        mirror_payload(&host, &guest, "..2026_12_05_01").expect("first");
        assert_eq!(read(&guest.join("app.conf")), "v1\n");
        assert_eq!(read(&guest.join("nested/deep.txt")), "deep\n");
        assert_eq!(
            std::fs::read_link(guest.join("app.conf")).expect("link"),
            Path::new("..data/app.conf")
        );
        // Again with the same payload: nothing changes.
        mirror_payload(&host, &guest, "..2026_12_05_01").expect("again");
        assert_eq!(
            names(&guest),
            ["..2026_12_05_01", "..data", "app.conf", "nested"]
        );

        // The update: app.conf changes, nested goes, new.conf comes.
        kubelet_write(
            &host,
            "..2026_12_05_02",
            &[("app.conf", "v2\n"), ("new.conf", "new\n")],
        );
        mirror_payload(&host, &guest, "..2026_12_05_02").expect("update");
        assert_eq!(read(&guest.join("app.conf")), "v2\n");
        assert_eq!(read(&guest.join("new.conf")), "new\n");
        assert_eq!(
            names(&guest),
            ["..2026_12_05_02", "..data", "app.conf", "new.conf"],
            "the old payload and the name only it had are gone"
        );
    }

    #[test]
    fn modes_symlinks_and_many_files_survive_the_copy() {
        let d = tempdir();
        let (host, guest) = (d.path().join("host"), d.path().join("guest"));
        std::fs::create_dir_all(&host).expect("host");
        let files: Vec<(String, String)> = (0..1000)
            .map(|i| (format!("f{i:04}"), format!("content {i}\n")))
            .collect();
        let refs: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        kubelet_write(&host, "..ts1", &refs);
        let secret = host.join("..ts1/f0000");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o400)).expect("chmod");
        symlink("f0001", host.join("..ts1/alias")).expect("alias");
        mirror_payload(&host, &guest, "..ts1").expect("mirror");
        assert_eq!(read(&guest.join("f0999")), "content 999\n");
        let mode = std::fs::metadata(guest.join("..ts1/f0000"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400);
        assert_eq!(
            std::fs::read_link(guest.join("..ts1/alias")).expect("alias"),
            Path::new("f0001")
        );
        assert_eq!(read(&guest.join("alias")), "content 1\n");
    }

    #[test]
    fn a_deleted_containers_copies_go_and_only_its() {
        let d = tempdir();
        let (host, base) = (d.path().join("host"), d.path().join("mirrors"));
        std::fs::create_dir_all(&host).expect("host");
        kubelet_write(&host, "..ts1", &[("app.conf", "v1\n")]);
        for id in ["c1", "c2"] {
            mirror_payload(&host, &base.join(id).join("0"), "..ts1").expect("mirror");
        }
        remove_mirrors_in(&base, "c1");
        assert_eq!(names(&base), ["c2"]);
        // A container without copies: nothing to do, nothing fails.
        remove_mirrors_in(&base, "c3");
        assert_eq!(read(&base.join("c2/0/app.conf")), "v1\n");
    }

    #[test]
    fn bad_payload_names_are_refused() {
        for bad in ["..data", "..data_tmp", "..", "plain", "../x", "..a/b", ""] {
            assert!(!valid_data_dir(bad), "{bad:?}");
        }
        assert!(valid_data_dir("..2026_12_05_08_00_00.123456789"));
        let d = tempdir();
        let none = d.path().join("none.pack");
        let e = mirror(0o755, &d.path().join("g"), "..data", &none).expect_err("refused");
        assert!(e.to_string().contains("not a payload"), "{e}");
        let e = mirror(0o755, &d.path().join("g"), "..missing", &none).expect_err("missing");
        assert!(e.to_string().contains("none.pack"), "{e}");
        std::fs::write(&none, b"garbage").expect("garbage");
        let e = mirror(0o755, &d.path().join("g"), "..missing", &none).expect_err("garbage");
        assert!(matches!(e, VolumeError::Invalid(_)), "{e}");
        assert!(
            !d.path().join("g/..missing").exists(),
            "a failed unpack leaves nothing"
        );
    }
}
