//! A directory tree as one stream: how a volume payload crosses to the
//! guest.
//!
//! The guest's copy of a ConfigMap-style volume (`docs/volumes.md`) was
//! first made file by file over virtio-fs: five FUSE requests per file
//! (lookup, open, read, flush, release), each a round trip through the
//! emulated guest kernel on hosts like this one: 160 s for 1,000 files.
//! The shim now writes the payload as one pack file on the share and the
//! agent unpacks it with a few large reads.
//!
//! The format, after the 8-byte magic `HUSKPK1\n`, is a sequence of
//! records, parents before their children:
//!
//! | field | size |
//! |---|---|
//! | kind (1 directory, 2 file, 3 symlink) | 1 byte |
//! | mode (permission bits), uid, gid | 3 × u32, little endian |
//! | path length, then the path (relative, `/`-separated) | u32 + bytes |
//! | data length, then the data (file contents, symlink target) | u64 + bytes |
//!
//! [`unpack`] refuses anything that could leave the destination: absolute
//! paths, `..` or empty components, a parent that is not a directory it
//! made, oversized names.

use std::{
    collections::HashSet,
    ffi::{OsStr, OsString},
    io::{self, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    rc::Rc,
};

use nix::{
    fcntl::OFlag,
    sys::stat::Mode,
    unistd::{Gid, Uid},
};

/// The first bytes of a pack.
pub const MAGIC: &[u8; 8] = b"HUSKPK1\n";
/// The longest path a record may name (Linux's PATH_MAX).
const MAX_PATH: u32 = 4096;

const DIR: u8 = 1;
const FILE: u8 = 2;
const SYMLINK: u8 = 3;

/// Bounds on what one pack may hold. A volume's payload is written by
/// whoever may change the ConfigMap or Secret, and its pack lands in the
/// host's memory (`/run`) until the guest has read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Records (directories, files and symlinks), at most.
    pub entries: u64,
    /// Bytes of file contents and symlink targets, in all.
    pub bytes: u64,
    /// Bytes of one file.
    pub file_bytes: u64,
}

impl Limits {
    /// No bounds (for trees the caller made itself).
    pub const NONE: Limits = Limits {
        entries: u64::MAX,
        bytes: u64::MAX,
        file_bytes: u64::MAX,
    };
}

/// What a pack holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Records written.
    pub entries: u64,
    /// Bytes of file contents and symlink targets.
    pub bytes: u64,
}

/// Why a tree could not be packed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// Reading the tree failed; a symlink or mount where a directory or
    /// file was expected shows as `ELOOP` or `EXDEV` here.
    #[error("{path}: {source}")]
    Read {
        /// The entry, relative to the tree's root.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The tree exceeds a bound of [`Limits`].
    #[error("{0}")]
    TooLarge(String),
    /// Writing the pack failed.
    #[error("writing the pack: {0}")]
    Write(#[source] io::Error),
}

fn read_err(path: &Path) -> impl FnOnce(nix::Error) -> PackError + '_ {
    move |e| PackError::Read {
        path: if path.as_os_str().is_empty() {
            ".".into()
        } else {
            path.display().to_string()
        },
        source: e.into(),
    }
}

/// How every entry of a tree being packed is opened: below the directory
/// it is named in, following no symlink, crossing no mount.
fn open_beneath(dir: &OwnedFd, name: &OsStr, flags: OFlag) -> nix::Result<OwnedFd> {
    use nix::fcntl::{OpenHow, ResolveFlag};
    let how = OpenHow::new()
        .flags(flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    let fd = nix::fcntl::openat2(dir.as_raw_fd(), name, how)?;
    // SAFETY: `openat2` just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The names in the directory `dir`, sorted (`.` and `..` left out).
fn names_in(dir: &OwnedFd) -> nix::Result<Vec<OsString>> {
    let own = open_beneath(dir, OsStr::new("."), OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
    let mut listing = nix::dir::Dir::from_fd(own.into_raw_fd())?;
    let mut names = Vec::new();
    for entry in listing.iter() {
        let name = OsStr::from_bytes(entry?.file_name().to_bytes()).to_os_string();
        if name != "." && name != ".." {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Writes the tree below the open directory `root` (its contents, not
/// `root` itself) as a pack: directories, regular files and symlinks;
/// anything else is left out. Every entry is opened below its directory's
/// descriptor without following a symlink or crossing a mount (`openat2`
/// with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV`): a
/// symlink is recorded as one, never followed, so the pack holds only
/// what is below `root`. A tree beyond `limits` fails before the entry
/// that exceeds them is written.
pub fn write_pack_dir(
    root: OwnedFd,
    out: &mut impl Write,
    limits: &Limits,
) -> Result<Totals, PackError> {
    let w = PackError::Write;
    out.write_all(MAGIC).map_err(w)?;
    let mut totals = Totals::default();
    // Directories still to list: their path, their parent's descriptor
    // and their name in it. Each is opened only when listed, so at most
    // one descriptor per level of the tree is open at a time.
    let mut stack: Vec<(PathBuf, Rc<OwnedFd>, OsString)> = Vec::new();
    let mut next = Some((PathBuf::new(), Rc::new(root)));
    while let Some((rel, dir)) = next.take() {
        let names = names_in(&dir).map_err(read_err(&rel))?;
        let mut subdirs = Vec::new();
        for name in names {
            let path = rel.join(&name);
            let meta = nix::sys::stat::fstatat(
                Some(dir.as_raw_fd()),
                name.as_os_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(read_err(&path))?;
            let (tag, data) = match meta.st_mode & libc::S_IFMT {
                libc::S_IFDIR => {
                    subdirs.push((path.clone(), dir.clone(), name.clone()));
                    (DIR, Vec::new())
                }
                libc::S_IFREG => (FILE, read_file(&dir, &name, &path, &meta, &totals, limits)?),
                libc::S_IFLNK => {
                    let target = nix::fcntl::readlinkat(Some(dir.as_raw_fd()), name.as_os_str())
                        .map_err(read_err(&path))?;
                    (SYMLINK, target.into_encoded_bytes())
                }
                _ => continue,
            };
            totals.entries += 1;
            if totals.entries > limits.entries {
                return Err(PackError::TooLarge(format!(
                    "more than {} entries (at {})",
                    limits.entries,
                    path.display()
                )));
            }
            totals.bytes += data.len() as u64;
            if totals.bytes > limits.bytes {
                return Err(PackError::TooLarge(format!(
                    "more than {} bytes in all (at {})",
                    limits.bytes,
                    path.display()
                )));
            }
            let name = path.as_os_str().as_encoded_bytes();
            let name_len = u32::try_from(name.len())
                .ok()
                .filter(|&n| n <= MAX_PATH)
                .ok_or_else(|| PackError::TooLarge(format!("{}: path too long", path.display())))?;
            out.write_all(&[tag]).map_err(w)?;
            for v in [meta.st_mode & 0o7777, meta.st_uid, meta.st_gid, name_len] {
                out.write_all(&v.to_le_bytes()).map_err(w)?;
            }
            out.write_all(name).map_err(w)?;
            out.write_all(&(data.len() as u64).to_le_bytes())
                .map_err(w)?;
            out.write_all(&data).map_err(w)?;
        }
        // Parents before children, as the reader needs: a directory's
        // record is written when its parent is listed, its entries later.
        stack.extend(subdirs.into_iter().rev());
        if let Some((path, parent, name)) = stack.pop() {
            let fd = open_beneath(&parent, &name, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                .map_err(read_err(&path))?;
            next = Some((path, Rc::new(fd)));
        }
    }
    out.flush().map_err(w)?;
    Ok(totals)
}

/// The contents of the regular file `name` in `dir` (at `path` in the
/// tree, `meta` from listing it), read within `limits`.
fn read_file(
    dir: &OwnedFd,
    name: &OsStr,
    path: &Path,
    meta: &libc::stat,
    totals: &Totals,
    limits: &Limits,
) -> Result<Vec<u8>, PackError> {
    // Refused on its listed size before it is opened: a 4 GiB sparse file
    // costs nothing.
    check_size(
        path,
        u64::try_from(meta.st_size).unwrap_or(0),
        totals,
        limits,
    )?;
    // O_NONBLOCK: a FIFO swapped in for the file must not block the
    // reader; it is refused below.
    let fd =
        open_beneath(dir, name, OFlag::O_RDONLY | OFlag::O_NONBLOCK).map_err(read_err(path))?;
    let now = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(read_err(path))?;
    if now.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(PackError::Read {
            path: path.display().to_string(),
            source: io::Error::other("no longer a regular file"),
        });
    }
    let size = u64::try_from(now.st_size).unwrap_or(0);
    check_size(path, size, totals, limits)?;
    // Read no more than the bounds allow: a file that grows meanwhile is
    // refused, not followed.
    let mut data = Vec::new();
    std::fs::File::from(fd)
        .take(limits.file_bytes.min(size).saturating_add(1))
        .read_to_end(&mut data)
        .map_err(|e| PackError::Read {
            path: path.display().to_string(),
            source: e,
        })?;
    if data.len() as u64 > size {
        return Err(PackError::Read {
            path: path.display().to_string(),
            source: io::Error::other("grew while being read"),
        });
    }
    Ok(data)
}

/// Fails if a file of `size` bytes would break `limits`.
fn check_size(path: &Path, size: u64, totals: &Totals, limits: &Limits) -> Result<(), PackError> {
    if size > limits.file_bytes {
        return Err(PackError::TooLarge(format!(
            "{} holds {size} bytes, more than {} for one file",
            path.display(),
            limits.file_bytes
        )));
    }
    if totals.bytes.saturating_add(size) > limits.bytes {
        return Err(PackError::TooLarge(format!(
            "more than {} bytes in all (at {})",
            limits.bytes,
            path.display()
        )));
    }
    Ok(())
}

/// [`write_pack_dir`] of the directory at `root` (not followed if it is a
/// symlink), without bounds: for trees the caller made itself.
pub fn write_pack(root: &Path, out: &mut impl Write) -> Result<Totals, PackError> {
    let fd = nix::fcntl::open(
        root,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(read_err(Path::new("")))?;
    // SAFETY: `open` just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    write_pack_dir(fd, out, &Limits::NONE)
}

/// What went wrong unpacking.
#[derive(Debug)]
pub enum UnpackError {
    /// The stream is not a well-formed pack.
    Malformed(String),
    /// Writing the tree failed.
    Io(io::Error),
}

impl std::fmt::Display for UnpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnpackError::Malformed(m) => write!(f, "malformed pack: {m}"),
            UnpackError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for UnpackError {}

impl From<io::Error> for UnpackError {
    fn from(e: io::Error) -> Self {
        UnpackError::Io(e)
    }
}

impl From<nix::Error> for UnpackError {
    fn from(e: nix::Error) -> Self {
        UnpackError::Io(e.into())
    }
}

fn malformed(m: impl Into<String>) -> UnpackError {
    UnpackError::Malformed(m.into())
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` at a clean end of stream
/// before the first byte.
fn read_or_end(r: &mut impl Read, buf: &mut [u8]) -> Result<bool, UnpackError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(malformed("truncated record")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), UnpackError> {
    if read_or_end(r, buf)? {
        Ok(())
    } else {
        Err(malformed("truncated record"))
    }
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[i..i + 4]);
    u32::from_le_bytes(a)
}

/// A record's path, checked: relative, every component a plain name (a
/// leading `/` is an empty first component).
fn checked_path(bytes: &[u8]) -> Result<PathBuf, UnpackError> {
    let s = std::str::from_utf8(bytes).map_err(|_| malformed("a path that is not UTF-8"))?;
    let plain = !s.contains('\0') && !s.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    if plain {
        Ok(PathBuf::from(s))
    } else {
        Err(malformed(format!("path {s:?}")))
    }
}

/// The directory a record goes into, opened once for all the records of
/// that directory (the writer emits a directory's entries together):
/// every file is then created by one name relative to it, not by a walk
/// of its whole path, which costs milliseconds per component where guest
/// kernel code is emulated.
struct Parent {
    rel: PathBuf,
    fd: OwnedFd,
}

fn open_dir(at: &Path) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::open(
        at,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: `open` just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Unpacks a pack read from `r` into `dest`, which must not exist yet.
/// Owners are set when the process may (as root); modes always.
pub fn unpack(r: &mut impl Read, dest: &Path) -> Result<(), UnpackError> {
    let mut magic = [0u8; 8];
    read_exact(r, &mut magic)?;
    if &magic != MAGIC {
        return Err(malformed("no pack magic"));
    }
    std::fs::create_dir(dest)?;
    // Directories this unpack made: the only parents a record may have.
    let mut dirs: HashSet<PathBuf> = HashSet::new();
    let mut parent = Parent {
        rel: PathBuf::new(),
        fd: open_dir(dest)?,
    };
    let mut header = [0u8; 17];
    loop {
        if !read_or_end(r, &mut header)? {
            return Ok(());
        }
        let tag = header[0];
        let (mode, uid, gid, name_len) = (
            u32_at(&header, 1),
            u32_at(&header, 5),
            u32_at(&header, 9),
            u32_at(&header, 13),
        );
        if name_len == 0 || name_len > MAX_PATH {
            return Err(malformed(format!("path length {name_len}")));
        }
        let mut name = vec![0u8; name_len as usize];
        read_exact(r, &mut name)?;
        let rel = checked_path(&name)?;
        let up = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if !up.as_os_str().is_empty() && !dirs.contains(&up) {
            return Err(malformed(format!(
                "{} comes before its directory",
                rel.display()
            )));
        }
        if parent.rel != up {
            parent = Parent {
                fd: open_dir(&dest.join(&up))?,
                rel: up,
            };
        }
        let base = rel
            .file_name()
            .ok_or_else(|| malformed(format!("path {}", rel.display())))?
            .to_owned();
        let mut len = [0u8; 8];
        read_exact(r, &mut len)?;
        let len = u64::from_le_bytes(len);
        let owner = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
        let perms = Mode::from_bits_truncate(mode & 0o7777);
        let dirfd = parent.fd.as_raw_fd();
        match tag {
            DIR => {
                if len != 0 {
                    return Err(malformed("a directory with data"));
                }
                nix::sys::stat::mkdirat(Some(dirfd), base.as_os_str(), Mode::S_IRWXU)?;
                let fd = nix::fcntl::openat(
                    Some(dirfd),
                    base.as_os_str(),
                    OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )?;
                // SAFETY: `openat` just returned this descriptor.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                // Ownership needs privilege; the agent has it, tests may not.
                let _ = nix::unistd::fchown(fd.as_raw_fd(), owner.0, owner.1);
                nix::sys::stat::fchmod(fd.as_raw_fd(), perms)?;
                dirs.insert(rel);
            }
            FILE => {
                let fd = nix::fcntl::openat(
                    Some(dirfd),
                    base.as_os_str(),
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::S_IRUSR | Mode::S_IWUSR,
                )?;
                // SAFETY: `openat` just returned this descriptor.
                let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                let copied = io::copy(&mut (&mut *r).take(len), &mut file)?;
                if copied != len {
                    return Err(malformed("truncated file data"));
                }
                let _ = nix::unistd::fchown(file.as_raw_fd(), owner.0, owner.1);
                nix::sys::stat::fchmod(file.as_raw_fd(), perms)?;
            }
            SYMLINK => {
                let n = u32::try_from(len)
                    .ok()
                    .filter(|&n| n > 0 && n <= MAX_PATH)
                    .ok_or_else(|| malformed(format!("symlink target length {len}")))?;
                let mut target = vec![0u8; n as usize];
                read_exact(r, &mut target)?;
                let target = std::str::from_utf8(&target)
                    .map_err(|_| malformed("a symlink target that is not UTF-8"))?;
                if target.contains('\0') {
                    return Err(malformed("a symlink target with NUL"));
                }
                nix::unistd::symlinkat(target, Some(dirfd), base.as_os_str())?;
                let _ = nix::unistd::fchownat(
                    Some(dirfd),
                    base.as_os_str(),
                    owner.0,
                    owner.1,
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                );
            }
            other => return Err(malformed(format!("record kind {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    /// A directory removed when the test ends.
    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().expect("temporary directory")
    }

    #[test]
    fn a_tree_survives_the_round_trip() {
        let d = tempdir();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("sub/deeper")).expect("dirs");
        std::fs::write(src.join("a.conf"), "alpha\n").expect("write");
        std::fs::write(src.join("sub/deeper/b"), vec![7u8; 100_000]).expect("write");
        std::fs::write(src.join("empty"), "").expect("write");
        std::fs::set_permissions(src.join("a.conf"), std::fs::Permissions::from_mode(0o440))
            .expect("chmod");
        symlink("sub/deeper/b", src.join("link")).expect("link");
        let mut bytes = Vec::new();
        write_pack(&src, &mut bytes).expect("pack");
        let dst = d.path().join("dst");
        unpack(&mut bytes.as_slice(), &dst).expect("unpack");
        assert_eq!(std::fs::read(dst.join("a.conf")).expect("a"), b"alpha\n");
        assert_eq!(
            std::fs::read(dst.join("sub/deeper/b")).expect("b"),
            vec![7u8; 100_000]
        );
        assert_eq!(std::fs::read(dst.join("empty")).expect("empty"), b"");
        let mode = std::fs::metadata(dst.join("a.conf")).expect("meta").mode();
        assert_eq!(mode & 0o777, 0o440);
        assert_eq!(
            std::fs::read_link(dst.join("link")).expect("link"),
            Path::new("sub/deeper/b")
        );
    }

    fn record(tag: u8, path: &str, data: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        for x in [0o644u32, 0, 0, u32::try_from(path.len()).expect("len")] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.extend_from_slice(path.as_bytes());
        v.extend_from_slice(&(data.len() as u64).to_le_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn nothing_can_leave_the_destination() {
        let d = tempdir();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("no magic", b"nope".to_vec()),
            ("absolute", record(FILE, "/etc/passwd", b"x")),
            ("dot dot", record(FILE, "../escape", b"x")),
            ("inner dot dot", record(FILE, "a/../../x", b"x")),
            ("no parent", record(FILE, "missing/x", b"x")),
            ("empty component", record(FILE, "a//b", b"x")),
            ("kind", record(9, "x", b"")),
            ("truncated", record(FILE, "x", b"abc")[..20].to_vec()),
        ];
        for (i, (what, body)) in cases.into_iter().enumerate() {
            let mut bytes = if what == "no magic" {
                Vec::new()
            } else {
                MAGIC.to_vec()
            };
            bytes.extend(body);
            let dst = d.path().join(format!("dst{i}"));
            let e = unpack(&mut bytes.as_slice(), &dst).expect_err(what);
            assert!(matches!(e, UnpackError::Malformed(_)), "{what}: {e}");
        }
        assert!(!d.path().join("escape").exists());
        // The path check on its own (the parent check stands behind it).
        for bad in ["..", "a/../b", "/etc", "a//b", "./a", "a/", ""] {
            assert!(checked_path(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(checked_path(b"a/b.conf").is_ok());
        // A symlink may point anywhere (it is resolved in the container),
        // but nothing is written through it.
        let mut bytes = MAGIC.to_vec();
        bytes.extend(record(SYMLINK, "l", b"/etc"));
        bytes.extend(record(FILE, "l/passwd", b"x"));
        let e = unpack(&mut bytes.as_slice(), &d.path().join("dsts")).expect_err("through a link");
        assert!(matches!(e, UnpackError::Malformed(_)), "{e}");
    }
}
