//! `husk-testprog`: what the end-to-end tests need inside a container that
//! busybox cannot do cheaply. It is built statically (no shared libraries)
//! so it runs in any image.
//!
//! Why not busybox: on a PVM host, guest *kernel* code is emulated, so
//! `head -c 16M /dev/urandom` spends minutes in the kernel's random
//! generator. `rand` makes the same amount of data in user space, which runs
//! at full speed, from a seed the test knows, so the host can check every
//! byte that arrives.
//!
//! Commands:
//! - `rand BYTES SEED`: writes BYTES bytes of `husk_testprog::stream` to
//!   stdout.
//! - `alloc MIB`: touches MIB MiB of memory, then sleeps forever (memory
//!   limits and OOM events).
//! - `hold MIB SEED`: fills MIB MiB with the `rand` stream of SEED, prints
//!   `holding <checksum>`, then on each SIGUSR1 checks the buffer again and
//!   prints `checked <checksum>` (memory the host reclaims around it must
//!   not change it); exits 0 on SIGTERM.
//! - `sum FILE`: prints the checksum (`husk_testprog::checksum`) of FILE
//!   and its length, read in 1 MiB pieces.
//! - `vsock-probe [--report FILE [--then-sleep]]`: tries every way to get a
//!   vsock socket (see `probe`); exits 0 only if all were refused.
//! - `vector-check SECONDS SEED [ROUNDS]`: checks that vector registers
//!   survive context switches (see `vectors`) for SECONDS seconds and at
//!   least ROUNDS rounds; run two at once.
//! - `avx-sum SECONDS SEED`: checksums buffers with AVX-512 (or AVX2)
//!   accumulators held across yields and checks each sum (see `vectors`).
//! - `sink PORT`: accepts TCP connections on PORT, one after another; reads
//!   each to its end and answers the byte count in decimal (the pod
//!   throughput benchmark's receiver).
//! - `syscalls SECONDS`: calls `getppid` in a loop for SECONDS seconds
//!   and prints how many calls it made: guest kernel work and nothing else
//!   (the guest profiler's test).
//! - `watch DIR`: watches DIR with inotify and prints one line per event,
//!   `<event> <name>` (`create`, `delete`, `moved_from`, `moved_to`,
//!   `close_write`), as a program that reloads its configuration would
//!   see them (busybox's `inotifyd` is not in Debian's busybox-static).
//! - `ptrace-probe PID`: tries to attach to, seize and read the memory of
//!   PID, and prints what each attempt got (see `ptrace`).
//! - `pause`: what Kubernetes' pause image runs: sleeps until SIGINT or
//!   SIGTERM (then exits 0), reaping any child that exits. The CRI tests'
//!   sandbox image runs it (no registry here to pull the real one from).

mod probe;
mod ptrace;
mod vectors;

use std::io::Write;

use husk_testprog::stream;

fn rand(bytes: u64, seed: u64) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut left = bytes;
    let mut words = stream(seed);
    while left > 0 {
        buf.clear();
        while buf.len() < 64 * 1024 && (buf.len() as u64) < left {
            buf.extend_from_slice(&words.next().unwrap_or_default());
        }
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()
}

fn alloc(mib: usize) -> ! {
    let mut chunks = Vec::new();
    for _ in 0..mib {
        // Touch every page so it is really resident.
        chunks.push(vec![1u8; 1 << 20]);
    }
    println!("allocated {mib} MiB");
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
        std::hint::black_box(&chunks);
    }
}

fn sum(path: &str) -> std::io::Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut sum = husk_testprog::Checksum::new();
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sum.update(&buf[..n]);
        len += n as u64;
    }
    println!("{:016x} {len}", sum.value());
    Ok(())
}

/// Installs each handler for its signal. Every handler here only stores an
/// atomic or calls async-signal-safe functions.
fn handle_signals(handlers: &[(libc::c_int, extern "C" fn(libc::c_int))]) {
    for &(sig, handler) in handlers {
        // SAFETY: installs a handler that only calls async-signal-safe
        // functions (or stores an atomic); `sa` lives across the call.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

static CHECK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn ask_check(_: libc::c_int) {
    CHECK.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn hold(mib: usize, seed: u64) -> ! {
    let buf = husk_testprog::bytes(seed, mib << 20);
    handle_signals(&[(libc::SIGUSR1, ask_check), (libc::SIGTERM, exit_now)]);
    println!("holding {:016x}", husk_testprog::checksum(&buf));
    let _ = std::io::stdout().flush();
    loop {
        // SAFETY: pause(2) only waits for a signal.
        unsafe { libc::pause() };
        if CHECK.swap(false, std::sync::atomic::Ordering::SeqCst) {
            println!(
                "checked {:016x}",
                husk_testprog::checksum(std::hint::black_box(&buf))
            );
            let _ = std::io::stdout().flush();
        }
    }
}

extern "C" fn exit_now(_: libc::c_int) {
    // SAFETY: _exit(2) is async-signal-safe and touches no memory.
    unsafe { libc::_exit(0) }
}

extern "C" fn wake(_: libc::c_int) {}

fn pause() -> ! {
    // Real handlers, not SIG_DFL: as PID 1 of a PID namespace the kernel
    // drops signals that have no handler.
    handle_signals(&[
        (libc::SIGINT, exit_now),
        (libc::SIGTERM, exit_now),
        (libc::SIGCHLD, wake),
    ]);
    loop {
        // SAFETY: pause(2) only waits for a signal.
        unsafe { libc::pause() };
        // SAFETY: waitpid(2) with a null status pointer; reaps any exited
        // child without blocking.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
    }
}

fn sink(port: u16) -> std::io::Result<()> {
    use std::io::Read;
    let listener = std::net::TcpListener::bind(("0.0.0.0", port))?;
    let mut buf = vec![0u8; 256 * 1024];
    for conn in listener.incoming() {
        let mut conn = conn?;
        let mut total: u64 = 0;
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let _ = conn.write_all(total.to_string().as_bytes());
    }
    Ok(())
}

fn usage() -> ! {
    eprintln!("usage: husk-testprog rand BYTES SEED | alloc MIB | hold MIB SEED | sum FILE | sink PORT | pause | vsock-probe [--report FILE [--then-sleep]] | vector-check SECONDS SEED [ROUNDS] | avx-sum SECONDS SEED | watch DIR | ptrace-probe PID");
    std::process::exit(2)
}

fn syscalls(seconds: u64) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let mut calls = 0u64;
    while std::time::Instant::now() < end {
        for _ in 0..100 {
            std::hint::black_box(std::os::unix::process::parent_id());
        }
        calls += 100;
    }
    println!("{calls} getppid calls");
}

/// `watch DIR`: prints DIR's inotify events until killed.
fn watch(dir: &str) -> std::io::Result<()> {
    use nix::sys::inotify::{AddWatchFlags as F, InitFlags, Inotify};
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC)?;
    inotify.add_watch(
        dir,
        F::IN_CREATE | F::IN_DELETE | F::IN_MOVED_FROM | F::IN_MOVED_TO | F::IN_CLOSE_WRITE,
    )?;
    println!("watching {dir}");
    let kinds = [
        (F::IN_CREATE, "create"),
        (F::IN_DELETE, "delete"),
        (F::IN_MOVED_FROM, "moved_from"),
        (F::IN_MOVED_TO, "moved_to"),
        (F::IN_CLOSE_WRITE, "close_write"),
    ];
    loop {
        let events = match inotify.read_events() {
            Ok(events) => events,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut out = std::io::stdout().lock();
        for ev in events {
            let kind = kinds
                .iter()
                .find(|(bit, _)| ev.mask.contains(*bit))
                .map_or("other", |(_, k)| k);
            let name = ev
                .name
                .as_deref()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            writeln!(out, "{kind} {name}")?;
        }
        out.flush()?;
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| -> u64 {
        args.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| usage())
    };
    match args.first().map(String::as_str) {
        Some("rand") => {
            if let Err(e) = rand(num(1), num(2)) {
                eprintln!("husk-testprog: {e}");
                std::process::exit(1);
            }
        }
        Some("alloc") => alloc(usize::try_from(num(1)).unwrap_or_else(|_| usage())),
        Some("pause") => pause(),
        Some("sum") => {
            let path = args.get(1).unwrap_or_else(|| usage());
            if let Err(e) = sum(path) {
                eprintln!("husk-testprog: sum {path}: {e}");
                std::process::exit(1);
            }
        }
        Some("hold") => hold(usize::try_from(num(1)).unwrap_or_else(|_| usage()), num(2)),
        Some("syscalls") => syscalls(num(1)),
        Some("sink") => {
            let port = u16::try_from(num(1)).unwrap_or_else(|_| usage());
            if let Err(e) = sink(port) {
                eprintln!("husk-testprog: sink: {e}");
                std::process::exit(1);
            }
        }
        Some("vector-check") => {
            let min_rounds = if args.len() > 3 { num(3) } else { 0 };
            std::process::exit(vectors::main(num(1), num(2), min_rounds))
        }
        Some("avx-sum") => std::process::exit(vectors::sum_main(num(1), num(2))),
        Some("vsock-probe") => std::process::exit(probe::main(&args[1..])),
        Some("ptrace-probe") => {
            let pid = i32::try_from(num(1)).unwrap_or_else(|_| usage());
            std::process::exit(ptrace::main(pid))
        }
        Some("watch") => {
            let dir = args.get(1).unwrap_or_else(|| usage());
            if let Err(e) = watch(dir) {
                eprintln!("husk-testprog: watch {dir}: {e}");
                std::process::exit(1);
            }
        }
        _ => usage(),
    }
}
