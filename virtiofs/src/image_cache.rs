//! The guest's page cache of container images, kept across opens.
//!
//! With close-to-open consistency (virtiofsd's `auto` policy) the guest
//! kernel drops a file's cached pages every time the file is opened, so
//! that a change made on the host shows on the next open. For a
//! container's root file system that is pure cost: only the container
//! changes those files, through this very mount. Each exec of a program
//! re-read it over virtio-fs after unmapping it from every running process
//! that had it mapped (measured: 0.8 s of a 5 s `ctr task exec` on this
//! machine's emulated guest kernel went to that invalidation alone), and
//! every process of a dynamically linked image does the same for each
//! shared library it opens.
//!
//! [`ImageCache`] wraps the passthrough file system and answers an open of
//! a file or directory under `<container id>/rootfs/` of the share with
//! `KEEP_CACHE` (and `CACHE_DIR` for directories): the guest keeps what it
//! has cached. Everything else in the share (the bind-mounted volumes under
//! `<container id>/mounts/`, `config.json`) keeps close-to-open
//! consistency, because the host or other pods may change it.
//!
//! The wrapper learns where an inode is from the lookups that reveal it:
//! the share's root holds container directories, a container directory's
//! `rootfs` is an image root, and whatever an image directory holds is
//! image too. An inode reached by two different kinds of path (a hard link
//! between a volume and an image, say) counts as "other" from then on, and
//! an inode the wrapper does not know is "other": a mistake can only cost
//! speed, never show stale data of a volume. Lookup counts are mirrored
//! from the kernel's (each entry returned adds one, `forget` takes them
//! away), so the table holds only the inodes the guest still knows.

use std::{
    collections::HashMap,
    ffi::CStr,
    fs::File,
    io,
    sync::{atomic::AtomicBool, Arc, Mutex},
    time::Duration,
};

use virtiofsd::{
    filesystem::{
        Context, Entry, Extensions, FileSystem, FsOptions, GetxattrReply, ListxattrReply,
        OpenOptions, SerializableFileSystem, SetattrValid, SetxattrFlags, ZeroCopyReader,
        ZeroCopyWriter,
    },
    fuse,
};

/// The FUSE root inode: the share's directory.
const ROOT: u64 = 1;
/// The directory of a container that holds its image.
const IMAGE_DIR: &[u8] = b"rootfs";

/// What a path in the share is, as far as caching goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `<id>/`: a container's directory.
    Container,
    /// `<id>/rootfs` and everything below it.
    Image,
    /// Anything else: volumes, `config.json`, unknown.
    Other,
}

impl Kind {
    /// The kind of `name` in a directory of kind `parent` (`None`: the
    /// share's root).
    pub fn child(parent: Option<Kind>, name: &[u8]) -> Kind {
        match (parent, name) {
            (None, _) => Kind::Container,
            (Some(Kind::Container), IMAGE_DIR) => Kind::Image,
            (Some(Kind::Image), _) => Kind::Image,
            _ => Kind::Other,
        }
    }
}

#[derive(Debug)]
struct Node {
    kind: Kind,
    lookups: u64,
}

/// Inode → kind, for the inodes the guest holds.
#[derive(Debug, Default)]
pub struct Kinds {
    nodes: Mutex<HashMap<u64, Node>>,
}

impl Kinds {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Node>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The kind of `inode` (`None` for the root); unknown inodes are
    /// [`Kind::Other`].
    pub fn of(&self, inode: u64) -> Option<Kind> {
        if inode == ROOT {
            return None;
        }
        Some(self.lock().get(&inode).map_or(Kind::Other, |n| n.kind))
    }

    /// The guest learnt `inode` as `name` in `parent` (one more lookup).
    pub fn learnt(&self, parent: u64, name: &CStr, inode: u64) {
        let name = name.to_bytes();
        if inode == ROOT || inode == 0 || name == b"." || name == b".." {
            return;
        }
        let kind = Kind::child(self.of(parent), name);
        let mut nodes = self.lock();
        let node = nodes.entry(inode).or_insert(Node { kind, lookups: 0 });
        if node.kind != kind {
            node.kind = Kind::Other;
        }
        node.lookups = node.lookups.saturating_add(1);
    }

    /// The guest forgot `count` lookups of `inode`.
    pub fn forgot(&self, inode: u64, count: u64) {
        let mut nodes = self.lock();
        if let Some(node) = nodes.get_mut(&inode) {
            node.lookups = node.lookups.saturating_sub(count);
            if node.lookups == 0 {
                nodes.remove(&inode);
            }
        }
    }
}

/// A file system whose container images keep their guest page cache.
pub struct ImageCache<F> {
    inner: F,
    enabled: bool,
    kinds: Kinds,
}

impl<F> ImageCache<F> {
    /// Wraps `inner`; when not `enabled`, every call is `inner`'s alone.
    pub fn new(inner: F, enabled: bool) -> Self {
        Self {
            inner,
            enabled,
            kinds: Kinds::default(),
        }
    }

    fn is_image(&self, inode: u64) -> bool {
        self.enabled && self.kinds.of(inode) == Some(Kind::Image)
    }
}

impl<F: FileSystem> ImageCache<F> {
    fn learnt(&self, parent: F::Inode, name: &CStr, entry: &io::Result<Entry>) {
        if let (true, Ok(e)) = (self.enabled, entry) {
            self.kinds.learnt(parent.into(), name, e.inode);
        }
    }
}

/// What an open of an image file or directory adds.
fn keep(mut opts: OpenOptions, directory: bool) -> OpenOptions {
    // Direct I/O means the file system asked for no caching at all; that
    // choice stands.
    if !opts.contains(OpenOptions::DIRECT_IO) {
        opts |= OpenOptions::KEEP_CACHE;
        if directory {
            opts |= OpenOptions::CACHE_DIR;
        }
    }
    opts
}

impl<F> FileSystem for ImageCache<F>
where
    F: FileSystem,
    F::Inode: Copy,
{
    type Inode = F::Inode;
    type Handle = F::Handle;
    type DirIter = F::DirIter;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.inner.init(capable)
    }

    fn destroy(&self) {
        self.kinds.lock().clear();
        self.inner.destroy()
    }

    fn lookup(&self, ctx: Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        let entry = self.inner.lookup(ctx, parent, name);
        self.learnt(parent, name, &entry);
        entry
    }

    fn forget(&self, ctx: Context, inode: Self::Inode, count: u64) {
        self.kinds.forgot(inode.into(), count);
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: Context, requests: Vec<(Self::Inode, u64)>) {
        for (inode, count) in &requests {
            self.kinds.forgot((*inode).into(), *count);
        }
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: Context,
        inode: Self::Inode,
        handle: Option<Self::Handle>,
    ) -> io::Result<(fuse::Attr, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: Context,
        inode: Self::Inode,
        attr: fuse::SetattrIn,
        handle: Option<Self::Handle>,
        valid: SetattrValid,
    ) -> io::Result<(fuse::Attr, Duration)> {
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: Context, inode: Self::Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: Context,
        linkname: &CStr,
        parent: Self::Inode,
        name: &CStr,
        extensions: Extensions,
    ) -> io::Result<Entry> {
        let entry = self.inner.symlink(ctx, linkname, parent, name, extensions);
        self.learnt(parent, name, &entry);
        entry
    }

    fn mknod(
        &self,
        ctx: Context,
        inode: Self::Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
        extensions: Extensions,
    ) -> io::Result<Entry> {
        let entry = self
            .inner
            .mknod(ctx, inode, name, mode, rdev, umask, extensions);
        self.learnt(inode, name, &entry);
        entry
    }

    fn mkdir(
        &self,
        ctx: Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
        extensions: Extensions,
    ) -> io::Result<Entry> {
        let entry = self.inner.mkdir(ctx, parent, name, mode, umask, extensions);
        self.learnt(parent, name, &entry);
        entry
    }

    fn unlink(&self, ctx: Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: Context,
        olddir: Self::Inode,
        oldname: &CStr,
        newdir: Self::Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: Context,
        inode: Self::Inode,
        newparent: Self::Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        let entry = self.inner.link(ctx, inode, newparent, newname);
        self.learnt(newparent, newname, &entry);
        entry
    }

    fn open(
        &self,
        ctx: Context,
        inode: Self::Inode,
        kill_priv: bool,
        flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        let (handle, opts) = self.inner.open(ctx, inode, kill_priv, flags)?;
        let directory = flags & libc::O_DIRECTORY as u32 != 0;
        if self.is_image(inode.into()) {
            Ok((handle, keep(opts, directory)))
        } else {
            Ok((handle, opts))
        }
    }

    fn create(
        &self,
        ctx: Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        kill_priv: bool,
        flags: u32,
        umask: u32,
        extensions: Extensions,
    ) -> io::Result<(Entry, Option<Self::Handle>, OpenOptions)> {
        let (entry, handle, opts) = self
            .inner
            .create(ctx, parent, name, mode, kill_priv, flags, umask, extensions)?;
        if self.enabled {
            self.kinds.learnt(parent.into(), name, entry.inode);
        }
        if self.is_image(entry.inode) {
            Ok((entry, handle, keep(opts, false)))
        } else {
            Ok((entry, handle, opts))
        }
    }

    fn read<W: ZeroCopyWriter>(
        &self,
        ctx: Context,
        inode: Self::Inode,
        handle: Self::Handle,
        w: W,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write<R: ZeroCopyReader>(
        &self,
        ctx: Context,
        inode: Self::Inode,
        handle: Self::Handle,
        r: R,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        kill_priv: bool,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            kill_priv,
            flags,
        )
    }

    fn flush(
        &self,
        ctx: Context,
        inode: Self::Inode,
        handle: Self::Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(
        &self,
        ctx: Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: Context,
        inode: Self::Inode,
        handle: Self::Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: Context, inode: Self::Inode) -> io::Result<libc::statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: Context,
        inode: Self::Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
        extra_flags: SetxattrFlags,
    ) -> io::Result<()> {
        self.inner
            .setxattr(ctx, inode, name, value, flags, extra_flags)
    }

    fn getxattr(
        &self,
        ctx: Context,
        inode: Self::Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: Context, inode: Self::Inode, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: Context, inode: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: Context,
        inode: Self::Inode,
        flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        let (handle, opts) = self.inner.opendir(ctx, inode, flags)?;
        if self.is_image(inode.into()) {
            Ok((handle, keep(opts, true)))
        } else {
            Ok((handle, opts))
        }
    }

    fn readdir(
        &self,
        ctx: Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
    ) -> io::Result<Self::DirIter> {
        self.inner.readdir(ctx, inode, handle, size, offset)
    }

    fn fsyncdir(
        &self,
        ctx: Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn access(&self, ctx: Context, inode: Self::Inode, mask: u32) -> io::Result<()> {
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: Context,
        inode: Self::Inode,
        handle: Self::Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn copyfilerange(
        &self,
        ctx: Context,
        inode_in: Self::Inode,
        handle_in: Self::Handle,
        offset_in: u64,
        inode_out: Self::Inode,
        handle_out: Self::Handle,
        offset_out: u64,
        len: u64,
        flags: u64,
    ) -> io::Result<usize> {
        self.inner.copyfilerange(
            ctx, inode_in, handle_in, offset_in, inode_out, handle_out, offset_out, len, flags,
        )
    }

    fn syncfs(&self, ctx: Context, inode: Self::Inode) -> io::Result<()> {
        self.inner.syncfs(ctx, inode)
    }

    fn getlk(&self) -> io::Result<()> {
        self.inner.getlk()
    }

    fn setlk(&self) -> io::Result<()> {
        self.inner.setlk()
    }

    fn setlkw(&self) -> io::Result<()> {
        self.inner.setlkw()
    }

    fn ioctl(&self) -> io::Result<()> {
        self.inner.ioctl()
    }

    fn bmap(&self) -> io::Result<()> {
        self.inner.bmap()
    }

    fn poll(&self) -> io::Result<()> {
        self.inner.poll()
    }

    fn notify_reply(&self) -> io::Result<()> {
        self.inner.notify_reply()
    }

    fn tmpfile(&self) -> io::Result<(Entry, Option<Self::Handle>, OpenOptions)> {
        self.inner.tmpfile()
    }
}

impl<F: SerializableFileSystem> SerializableFileSystem for ImageCache<F> {
    fn prepare_serialization(&self, cancel: Arc<AtomicBool>) {
        self.inner.prepare_serialization(cancel)
    }

    fn serialize(&self, state_pipe: File) -> io::Result<()> {
        self.inner.serialize(state_pipe)
    }

    fn deserialize_and_apply(&self, state_pipe: File) -> io::Result<()> {
        self.inner.deserialize_and_apply(state_pipe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use virtiofsd::passthrough::{self, PassthroughFs};

    fn c(s: &str) -> CString {
        CString::new(s).expect("name")
    }

    #[test]
    fn kinds_follow_the_share_layout() {
        assert_eq!(Kind::child(None, b"ctr1"), Kind::Container);
        assert_eq!(Kind::child(Some(Kind::Container), b"rootfs"), Kind::Image);
        assert_eq!(Kind::child(Some(Kind::Container), b"mounts"), Kind::Other);
        assert_eq!(
            Kind::child(Some(Kind::Container), b"config.json"),
            Kind::Other
        );
        assert_eq!(Kind::child(Some(Kind::Image), b"bin"), Kind::Image);
        assert_eq!(Kind::child(Some(Kind::Other), b"rootfs"), Kind::Other);
    }

    #[test]
    fn lookups_are_counted_and_conflicts_are_other() {
        let k = Kinds::default();
        k.learnt(ROOT, &c("ctr1"), 2);
        k.learnt(2, &c("rootfs"), 3);
        k.learnt(3, &c("bin"), 4);
        k.learnt(3, &c("bin"), 4);
        assert_eq!(k.of(4), Some(Kind::Image));
        // Two forgets of one lookup each: gone after the second.
        k.forgot(4, 1);
        assert_eq!(k.of(4), Some(Kind::Image));
        k.forgot(4, 1);
        assert_eq!(k.of(4), Some(Kind::Other), "forgotten inodes are unknown");
        // The same inode reached through a volume too: other for good.
        k.learnt(3, &c("shared"), 5);
        k.learnt(2, &c("mounts"), 6);
        k.learnt(6, &c("0"), 5);
        assert_eq!(k.of(5), Some(Kind::Other));
        k.learnt(3, &c("shared"), 5);
        assert_eq!(k.of(5), Some(Kind::Other));
        // "." and ".." teach nothing; the root is never recorded.
        k.learnt(3, &c(".."), 2);
        assert_eq!(k.of(2), Some(Kind::Container));
        k.learnt(3, &c("up"), ROOT);
        assert_eq!(k.of(ROOT), None);
        assert_eq!(k.of(999), Some(Kind::Other));
    }

    fn ctx() -> Context {
        Context {
            uid: 0.into(),
            gid: 0.into(),
            pid: 0,
        }
    }

    /// The real passthrough file system over a directory laid out like a
    /// pod's share: image files keep their cache, volume files do not.
    #[test]
    fn image_files_keep_their_cache_and_volume_files_do_not() {
        let dir = std::env::temp_dir().join(format!("husk-imgcache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["c1/rootfs/bin", "c1/mounts/0"] {
            std::fs::create_dir_all(dir.join(d)).expect("mkdir");
        }
        std::fs::write(dir.join("c1/rootfs/bin/sh"), b"image").expect("write");
        std::fs::write(dir.join("c1/mounts/0/conf"), b"volume").expect("write");
        std::fs::write(dir.join("c1/config.json"), b"{}").expect("write");

        let cfg = passthrough::Config {
            root_dir: dir.display().to_string(),
            ..Default::default()
        };
        let fs = ImageCache::new(PassthroughFs::new(cfg).expect("passthrough"), true);
        fs.init(FsOptions::empty()).expect("init");
        let lookup =
            |parent: u64, name: &str| fs.lookup(ctx(), parent, &c(name)).expect("lookup").inode;
        let opened =
            |inode: u64, flags: i32| fs.open(ctx(), inode, false, flags as u32).expect("open").1;
        let c1 = lookup(ROOT, "c1");
        let rootfs = lookup(c1, "rootfs");
        let bin = lookup(rootfs, "bin");
        let sh = lookup(bin, "sh");
        let mounts = lookup(c1, "mounts");
        let vol = lookup(mounts, "0");
        let conf = lookup(vol, "conf");
        let config = lookup(c1, "config.json");

        assert!(opened(sh, libc::O_RDONLY).contains(OpenOptions::KEEP_CACHE));
        let d = fs
            .opendir(ctx(), bin, libc::O_RDONLY as u32)
            .expect("opendir")
            .1;
        assert!(d.contains(OpenOptions::KEEP_CACHE | OpenOptions::CACHE_DIR));
        for other in [conf, config] {
            assert!(!opened(other, libc::O_RDONLY).contains(OpenOptions::KEEP_CACHE));
        }
        let d = fs
            .opendir(ctx(), vol, libc::O_RDONLY as u32)
            .expect("opendir")
            .1;
        assert!(!d.intersects(OpenOptions::KEEP_CACHE | OpenOptions::CACHE_DIR));

        // A file the container creates in its image is image too.
        let (entry, _, opts) = fs
            .create(
                ctx(),
                bin,
                &c("new"),
                0o644,
                false,
                libc::O_RDWR as u32,
                0,
                Extensions::default(),
            )
            .expect("create");
        assert!(opts.contains(OpenOptions::KEEP_CACHE));
        assert!(opened(entry.inode, libc::O_RDONLY).contains(OpenOptions::KEEP_CACHE));

        // Once the guest forgets the file, the table forgets it too, and a
        // new lookup learns it again.
        fs.forget(ctx(), sh, 1);
        assert_eq!(fs.kinds.of(sh), Some(Kind::Other));
        let sh = lookup(bin, "sh");
        assert!(opened(sh, libc::O_RDONLY).contains(OpenOptions::KEEP_CACHE));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
