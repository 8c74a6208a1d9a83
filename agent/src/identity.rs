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

/// Checks that `name` is a valid hostname: RFC 1123 labels (letters,
/// digits and inner hyphens, at most 63 bytes each), at most 64 bytes in all
/// (the kernel's limit).
pub fn check_hostname(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if valid {
        Ok(())
    } else {
        Err(format!("invalid hostname {name:?}"))
    }
}

/// Sets the hostname after checking it is a valid one ([`check_hostname`]).
pub fn set_hostname(name: &str) -> Result<(), String> {
    check_hostname(name)?;
    nix::unistd::sethostname(name).map_err(|e| format!("sethostname: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_checked() {
        // The check alone: calling sethostname here would rename the host
        // the tests run on (as root) or fail for want of privilege.
        let long_label = "x".repeat(64);
        let long_name = format!("{}.{}", "x".repeat(32), "y".repeat(32));
        for bad in [
            "",
            "-a",
            "a-",
            "a..b",
            "a b",
            "ä",
            "a_b",
            &long_label,
            &long_name,
        ] {
            assert_eq!(
                check_hostname(bad),
                Err(format!("invalid hostname {bad:?}")),
                "{bad:?}"
            );
        }
        let longest = format!("{}.{}", "x".repeat(32), "y".repeat(31));
        for good in ["pod", "web-0", "a.b.c", "x1", &"x".repeat(63), &longest] {
            assert_eq!(check_hostname(good), Ok(()), "{good:?}");
        }
    }
}
