//! The host side of virtio-net: a tap device, one Ethernet frame per read
//! or write.
//!
//! husk-vmm does not create taps (that needs `CAP_NET_ADMIN` in the pod's
//! network namespace, which the VMM should not hold): the shim creates the
//! tap in the pod's namespace and passes its open file descriptor. A tap
//! opened by name is for running husk-vmm by hand. The tap is opened
//! without `IFF_VNET_HDR`, so it carries plain frames: no offload metadata
//! crosses between the guest and the host kernel, and nothing the guest
//! writes is interpreted beyond the frame itself.

use std::{
    fs::File,
    io::{Read, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// A frame source and sink: a tap in the VMM, a double in tests.
pub trait FrameBackend: Send + std::fmt::Debug {
    /// Reads one frame into `buf`; `WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Writes one frame.
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()>;
    /// The descriptor to poll for readability, if any.
    fn poll_fd(&self) -> Option<RawFd>;
}

/// An open tap device (non-blocking).
#[derive(Debug)]
pub struct Tap {
    file: File,
}

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
// _IOW('T', 202, int)
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
// _IOR('T', 210, unsigned int)
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Takes over `fd`, an open tap (inherited from the process that made
    /// it); checks that it is one and makes it non-blocking.
    pub fn from_fd(fd: OwnedFd) -> std::io::Result<Self> {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes an ifreq into `req`, which is large
        // enough and lives across the call; a non-tun fd fails with EBADFD or
        // ENOTTY and writes nothing.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF, &mut req) } < 0 {
            return Err(std::io::Error::other(format!(
                "fd {} is not a tap device: {}",
                fd.as_raw_fd(),
                std::io::Error::last_os_error()
            )));
        }
        if req.flags & IFF_TAP == 0 || req.flags & IFF_NO_PI == 0 {
            return Err(std::io::Error::other(format!(
                "fd {} is a tun device without IFF_TAP|IFF_NO_PI (flags {:#x})",
                fd.as_raw_fd(),
                req.flags
            )));
        }
        set_nonblocking(fd.as_raw_fd())?;
        Ok(Self { file: fd.into() })
    }

    /// Opens (creating if needed) tap `name` in the calling thread's
    /// network namespace.
    pub fn open(name: &str) -> std::io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(std::io::Error::other(format!(
                "tap name {name:?} must have 1 to {} bytes",
                libc::IFNAMSIZ - 1
            )));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and may update) the ifreq, which lives
        // across the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(std::io::Error::other(format!(
                "attaching tap {name}: {}",
                std::io::Error::last_os_error()
            )));
        }
        Self::from_fd(file.into())
    }

    /// A second handle on the same tap (a dup of its descriptor).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
        })
    }

    /// Takes over raw descriptor `fd` (a command-line `--net fd=N`).
    ///
    /// # Safety
    /// `fd` must be an open descriptor that nothing else owns.
    pub unsafe fn from_raw_fd(fd: RawFd) -> std::io::Result<Self> {
        // SAFETY: the caller hands over ownership of an open fd.
        Self::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl(2) on an open fd, no memory involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl FrameBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        // A tap takes a whole frame per write (or none).
        let n = self.file.write(frame)?;
        if n != frame.len() {
            return Err(std::io::Error::other(format!(
                "tap took {n} of {} bytes",
                frame.len()
            )));
        }
        Ok(())
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_tap_is_refused() {
        let f = File::open("/dev/null").expect("open");
        let e = Tap::from_fd(f.into()).expect_err("not a tap");
        assert!(e.to_string().contains("not a tap device"), "{e}");
    }

    #[test]
    fn tap_names_are_checked() {
        assert!(Tap::open("").is_err());
        assert!(Tap::open(&"t".repeat(16)).is_err());
    }
}
