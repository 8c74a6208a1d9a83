//! A guest's own identity: kernel randomness and hostname.
//!
//! Every microVM started from one template snapshot resumes with the same
//! kernel random state; left alone, siblings would produce the same "random"
//! numbers (keys, UUIDs, TCP sequence numbers). The host hands each guest
//! fresh entropy right after the restore; the agent credits it to the kernel
//! pool and forces a reseed of the kernel's generator.

use std::{
    fs::OpenOptions,
    io::{self, Read},
    os::fd::AsRawFd,
};

// From <linux/random.h>.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `entropy` into the kernel pool (credited as full entropy: it comes
/// from the host's own generator) and reseeds the kernel's generator.
pub fn reseed(entropy: &[u8]) -> io::Result<()> {
    let random = OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    let bits = i32::try_from(entropy.len() * 8)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len =
        i32::try_from(entropy.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(entropy);
    // SAFETY: `info` is a complete rand_pool_info of the size it declares;
    // the kernel only reads from it.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// 16 bytes from /dev/urandom.
pub fn random_sample() -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// Sets the hostname after checking it is a valid one (RFC 1123 label
/// rules, at most 64 bytes).
pub fn set_hostname(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !valid {
        return Err(format!("invalid hostname {name:?}"));
    }
    nix::unistd::sethostname(name).map_err(|e| format!("sethostname: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_checked() {
        for bad in ["", "-a", "a-", "a..b", "a b", "ä", &"x".repeat(65)] {
            assert!(set_hostname(bad).is_err(), "{bad:?}");
        }
    }
}
