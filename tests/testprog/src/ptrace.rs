//! `ptrace-probe PID`: every way a process with `CAP_SYS_PTRACE` can reach
//! into another: `PTRACE_ATTACH` (then detach), `PTRACE_SEIZE`, reading
//! `/proc/PID/mem` and `/proc/PID/environ`, and `process_vm_readv`. Prints
//! one line per way, `<way> ok` or `<way> <errno name>`, so a test can tell
//! a refusal from a success (a probe of one of the container's own
//! neighbours shows the capability works).

use std::io::Read;

/// The name of the last OS error.
fn errno() -> String {
    nix::errno::Errno::last().to_string()
}

/// A readable address of `pid`'s, from its maps if they can be read, else
/// where a static non-PIE x86-64 program is linked.
fn an_address(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .ok()
        .and_then(|m| {
            m.lines().find(|l| l.contains(" r")).and_then(|l| {
                l.split('-')
                    .next()
                    .and_then(|a| usize::from_str_radix(a, 16).ok())
            })
        })
        .unwrap_or(0x40_0000)
}

/// `ptrace(request, pid, 0, 0)`.
fn ptrace(request: libc::c_uint, pid: i32) -> libc::c_long {
    // SAFETY: ptrace(2) with null address and data; no memory of ours is
    // passed.
    unsafe {
        libc::ptrace(
            request,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    }
}

/// Waits for the tracee `pid` to stop, then detaches from it.
fn wait_and_detach(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid(2) writes the status into a local.
    unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
    ptrace(libc::PTRACE_DETACH, pid);
}

/// Runs the probe; the exit code is 0 (the lines say what happened).
pub fn main(pid: i32) -> i32 {
    if ptrace(libc::PTRACE_ATTACH, pid) == 0 {
        println!("attach ok");
        wait_and_detach(pid);
    } else {
        println!("attach {}", errno());
    }
    if ptrace(libc::PTRACE_SEIZE, pid) == 0 {
        println!("seize ok");
        // Detaching needs a stopped tracee: interrupt it first.
        ptrace(libc::PTRACE_INTERRUPT, pid);
        wait_and_detach(pid);
    } else {
        println!("seize {}", errno());
    }
    let addr = an_address(pid);
    for file in ["mem", "environ"] {
        let path = format!("/proc/{pid}/{file}");
        let read = std::fs::File::open(&path).and_then(|mut f| {
            use std::io::{Seek, SeekFrom};
            if file == "mem" {
                f.seek(SeekFrom::Start(addr as u64))?;
            }
            let mut buf = [0u8; 8];
            f.read(&mut buf)
        });
        match read {
            Ok(n) if n > 0 => println!("{file} ok"),
            Ok(_) => println!("{file} empty"),
            Err(e) => println!(
                "{file} {}",
                e.raw_os_error()
                    .map(|c| nix::errno::Errno::from_raw(c).to_string())
                    .unwrap_or_else(|| e.to_string())
            ),
        }
    }
    let mut buf = [0u8; 8];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: process_vm_readv(2) writes at most 8 bytes into `buf`, which
    // `local` describes and which lives for the call.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n > 0 {
        println!("vm_readv ok");
    } else {
        println!("vm_readv {}", errno());
    }
    0
}
