//! A process's stdio between containerd's FIFOs and the guest.
//!
//! Each stream the process has gets a host vsock port: the shim listens on
//! `<vsock>_<port>` and the agent connects to it when it creates the
//! process, then the shim copies between the connection and the FIFO
//! containerd gave (`ctr` reads and writes the other ends). Output relays
//! finish when the agent closes its side, which it does after the process
//! exited and its pipes drained; the exit is published only after they
//! finish, so no output is lost.
//!
//! Only the agent's connection is relayed. Each process gets a fresh random
//! token (`Stdio.token`), and the agent writes it first on every stream it
//! opens; a connection that does not present it within
//! [`TOKEN_TIMEOUT`] is closed, and the listener keeps waiting for the
//! right one. Once a stream's connection is taken its socket is removed, so
//! any later connection to that port is refused by husk-vmm (the guest gets
//! a reset). What a confused or hostile guest can cost the shim is bounded:
//! at most [`MAX_CHECKS`] connections waiting to present a token at once and
//! [`MAX_CONNECTIONS`] in all per stream, each for at most
//! [`TOKEN_TIMEOUT`], and nothing at all after [`ACCEPT_TIMEOUT`].
//!
//! stdin ends when the client closes its end of the FIFO (ctr, at EOF of its
//! own stdin) or on containerd's `CloseIO` (CRI's stdin-once): the relay
//! forwards what is still buffered and closes the stream, and the process
//! reads EOF. The FIFO is opened read-only with a blocking open on a
//! worker thread — a non-blocking open would report EOF before the client
//! has even opened its end — and a process whose I/O is torn down before
//! the client came unblocks that open by opening the other end itself.

use std::{path::PathBuf, sync::Arc, time::Duration};

use husk_protocols::{agent::Stdio, hybrid_vsock::port_socket_path, STDIO_TOKEN_LEN};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{unix::pipe, UnixListener, UnixStream},
    sync::Notify,
    task::{JoinHandle, JoinSet},
};

use crate::vm::Vm;

/// How long the agent has to connect a stream.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connection has to present the token once accepted (the agent
/// writes it right after connecting).
const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections of one stream presenting their token at once; more
/// are closed on arrival.
const MAX_CHECKS: usize = 4;
/// Most connections one stream's listener accepts before it gives up.
const MAX_CONNECTIONS: usize = 32;
const CHUNK: usize = 64 * 1024;

/// A process's stdio token.
pub type Token = [u8; STDIO_TOKEN_LEN];

/// A fresh random token from the kernel.
fn new_token() -> std::io::Result<Token> {
    let mut token = [0u8; STDIO_TOKEN_LEN];
    let mut filled = 0;
    while filled < token.len() {
        let rest = &mut token[filled..];
        // SAFETY: getrandom(2) writes at most `rest.len()` bytes into
        // `rest`, which is valid, writable memory of that length.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(token)
}

/// Compares without an early exit, so timing tells nothing about `got`.
fn token_matches(got: &Token, want: &Token) -> bool {
    got.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Errors setting up stdio.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// A listener could not be bound.
    #[error("listening on {0}")]
    Listen(String, #[source] std::io::Error),
    /// No token could be made.
    #[error("making the stdio token")]
    Token(#[source] std::io::Error),
}

/// The relays of one process.
#[derive(Debug)]
pub struct ProcessIo {
    stdio: Stdio,
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<JoinHandle<()>>,
    close_stdin: Arc<Notify>,
    sockets: Vec<PathBuf>,
    first_output: Arc<std::sync::OnceLock<std::time::Instant>>,
}

/// Reads the token from a new connection; the connection if it matches.
async fn present_token(mut conn: UnixStream, token: Token) -> Option<UnixStream> {
    let mut got = [0u8; STDIO_TOKEN_LEN];
    match tokio::time::timeout(TOKEN_TIMEOUT, conn.read_exact(&mut got)).await {
        Ok(Ok(_)) if token_matches(&got, &token) => Some(conn),
        _ => None,
    }
}

/// Waits for the one connection of a stream: the first that presents
/// `token`. Every other connection is closed; the socket at `path` goes
/// when this returns, so nothing can connect afterwards.
async fn accept(listener: UnixListener, path: PathBuf, token: Token) -> Option<UnixStream> {
    let mut accepted = 0usize;
    let mut checks: JoinSet<Option<UnixStream>> = JoinSet::new();
    let wait = async {
        loop {
            tokio::select! {
                r = listener.accept(), if accepted < MAX_CONNECTIONS => match r {
                    Ok((conn, _)) => {
                        accepted += 1;
                        if checks.len() < MAX_CHECKS {
                            checks.spawn(present_token(conn, token));
                        }
                    }
                    Err(e) => {
                        tracing::warn!("stdio stream {}: {e}", path.display());
                        return None;
                    }
                },
                Some(done) = checks.join_next() => {
                    if let Ok(Some(conn)) = done {
                        return Some(conn);
                    }
                }
                else => return None,
            }
        }
    };
    let conn = tokio::time::timeout(ACCEPT_TIMEOUT, wait)
        .await
        .ok()
        .flatten();
    let _ = std::fs::remove_file(&path);
    let strays = accepted - usize::from(conn.is_some());
    if strays > 0 {
        tracing::warn!(
            "stdio stream {}: closed {strays} connection(s) without the stream's token{}",
            path.display(),
            if conn.is_none() {
                "; the stream is lost"
            } else {
                ""
            }
        );
    }
    conn
}

impl ProcessIo {
    /// Listens for the streams of a process whose FIFOs are `stdin`,
    /// `stdout`, `stderr` (empty: none) and starts the relays.
    pub fn setup(
        vm: &Vm,
        stdin: &str,
        stdout: &str,
        stderr: &str,
        terminal: bool,
    ) -> Result<Self, IoError> {
        let token = new_token().map_err(IoError::Token)?;
        let mut stdio = Stdio::new();
        stdio.terminal = terminal;
        stdio.token = token.to_vec();
        let mut io = Self {
            stdio: Stdio::new(),
            outputs: Vec::new(),
            stdin: None,
            close_stdin: Arc::new(Notify::new()),
            sockets: Vec::new(),
            first_output: Arc::default(),
        };
        let listen = |io: &mut Self| -> Result<(u32, UnixListener, PathBuf), IoError> {
            let port = vm.next_port();
            let path = port_socket_path(&vm.vsock, port);
            let _ = std::fs::remove_file(&path);
            let l = UnixListener::bind(&path)
                .map_err(|e| IoError::Listen(path.display().to_string(), e))?;
            io.sockets.push(path.clone());
            Ok((port, l, path))
        };
        if !stdin.is_empty() {
            let (port, l, path) = listen(&mut io)?;
            stdio.stdin_port = port;
            let fifo = stdin.to_string();
            let close = io.close_stdin.clone();
            io.stdin = Some(tokio::spawn(async move {
                relay_stdin(&fifo, l, path, token, close).await;
            }));
        }
        for (fifo, is_err) in [(stdout, false), (stderr, true)] {
            if fifo.is_empty() || (is_err && terminal) {
                continue;
            }
            let (port, l, path) = listen(&mut io)?;
            if is_err {
                stdio.stderr_port = port;
            } else {
                stdio.stdout_port = port;
            }
            let fifo = fifo.to_string();
            let first = io.first_output.clone();
            io.outputs.push(tokio::spawn(async move {
                relay_output(l, path, token, &fifo, &first).await;
            }));
        }
        io.stdio = stdio;
        Ok(io)
    }

    /// The ports to hand the agent.
    pub fn stdio(&self) -> Stdio {
        self.stdio.clone()
    }

    /// When the first byte of output (either stream) was relayed.
    pub fn first_output(&self) -> Option<std::time::Instant> {
        self.first_output.get().copied()
    }

    /// Waits until the output relays are done (at most `within`).
    pub async fn wait_outputs(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        for mut h in std::mem::take(&mut self.outputs) {
            if tokio::time::timeout_at(deadline, &mut h).await.is_err() {
                tracing::warn!("output relay still busy; cutting it");
                h.abort();
            }
        }
    }

    /// containerd's CloseIO: forward what is buffered, then EOF.
    pub fn close_stdin(&self) {
        self.close_stdin.notify_one();
    }

    /// Stops every relay and removes the listeners.
    pub fn abort(&mut self) {
        for h in self.outputs.drain(..).chain(self.stdin.take()) {
            h.abort();
        }
        for p in &self.sockets {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        self.abort();
    }
}

async fn relay_output(
    listener: UnixListener,
    path: PathBuf,
    token: Token,
    fifo: &str,
    first: &std::sync::OnceLock<std::time::Instant>,
) {
    let Some(mut conn) = accept(listener, path, token).await else {
        return;
    };
    // Read-write: opening never blocks or fails for want of a reader.
    let mut out = match pipe::OpenOptions::new().read_write(true).open_sender(fifo) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("opening {fifo}: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let _ = first.set(std::time::Instant::now());
                if out.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Opens a stdin FIFO for reading, blocking until the client opened its
/// end (on a worker thread, so the runtime never blocks).
async fn open_reader(fifo: &str) -> std::io::Result<pipe::Receiver> {
    let path = fifo.to_string();
    let file =
        tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().read(true).open(&path))
            .await
            .map_err(std::io::Error::other)??;
    pipe::Receiver::from_file(file)
}

/// Releases a reader still blocked in [`open_reader`]: a reader blocked in
/// `open` already counts as one, so a non-blocking writer can open, which
/// wakes it; it then reads EOF at once.
fn unblock_reader(fifo: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo);
}

/// Unblocks the stdin FIFO's open when the relay is dropped before the
/// client came.
struct Unblock {
    fifo: String,
    opened: bool,
}

impl Drop for Unblock {
    fn drop(&mut self) {
        if !self.opened {
            unblock_reader(&self.fifo);
        }
    }
}

async fn relay_stdin(
    fifo: &str,
    listener: UnixListener,
    path: PathBuf,
    token: Token,
    close: Arc<Notify>,
) {
    // The agent's connection first, whether or not the client ever opens
    // its end: the stream's port is closed to anything else from then on.
    let Some(mut conn) = accept(listener, path, token).await else {
        return;
    };
    let mut guard = Unblock {
        fifo: fifo.to_string(),
        opened: false,
    };
    let opened = tokio::select! {
        r = open_reader(fifo) => Some(r),
        // CloseIO before the client ever opened: nothing to forward.
        _ = close.notified() => None,
    };
    guard.opened = opened.is_some();
    let mut input = match opened {
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            tracing::warn!("opening {fifo}: {e}");
            let _ = conn.shutdown().await;
            return;
        }
        None => {
            let _ = conn.shutdown().await;
            return;
        }
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        tokio::select! {
            r = input.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if conn.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            _ = close.notified() => {
                // Forward what the client wrote before closing.
                while let Ok(n) = input.try_read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                break;
            }
        }
    }
    let _ = conn.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener on a fresh socket path, as the shim makes one per stream.
    fn listen(name: &str) -> (UnixListener, PathBuf) {
        let dir = std::env::temp_dir().join(format!("husk-io-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("vsock.sock_10001");
        (UnixListener::bind(&path).expect("bind"), path)
    }

    /// What husk-vmm does for a guest connection: connect to the socket;
    /// then the guest's first bytes.
    async fn guest_connects(path: &std::path::Path, first: &[u8]) -> UnixStream {
        let mut s = UnixStream::connect(path).await.expect("connect");
        s.write_all(first).await.expect("write");
        s
    }

    /// Whether the shim closed `s` (EOF or reset, no data).
    async fn closed(s: &mut UnixStream) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[test]
    fn tokens_are_fresh_and_compared_in_full() {
        let a = new_token().expect("token");
        let b = new_token().expect("token");
        assert_ne!(a, b);
        assert!(token_matches(&a, &a));
        let mut c = a;
        c[STDIO_TOKEN_LEN - 1] ^= 1;
        assert!(!token_matches(&c, &a));
    }

    #[tokio::test]
    async fn only_the_connection_with_the_token_is_relayed() {
        let (listener, path) = listen("token");
        let token = new_token().expect("token");
        let mut wrong = token;
        wrong[0] ^= 0xff;
        // A stray with a wrong token and one that never sends arrive first.
        let mut stray = guest_connects(&path, &wrong).await;
        let mut silent = guest_connects(&path, b"").await;
        let mut right = guest_connects(&path, &token).await;
        right.write_all(b"payload").await.expect("write");
        let mut conn = tokio::time::timeout(
            Duration::from_secs(5),
            accept(listener, path.clone(), token),
        )
        .await
        .expect("a silent connection does not hold the right one up")
        .expect("the right connection");
        let mut got = [0u8; 7];
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut got))
            .await
            .expect("the relayed connection carries the payload")
            .expect("read");
        assert_eq!(&got, b"payload", "the token is consumed, the data follows");
        assert!(closed(&mut stray).await, "a wrong token is closed");
        assert!(closed(&mut silent).await, "a silent connection is closed");
        assert!(!path.exists(), "the socket is gone");
        assert!(
            UnixStream::connect(&path).await.is_err(),
            "nothing can connect after the stream's connection"
        );
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[tokio::test]
    async fn a_flood_of_wrong_connections_is_bounded() {
        let (listener, path) = listen("flood");
        let token = new_token().expect("token");
        let flood = async {
            let mut kept = Vec::new();
            for _ in 0..MAX_CONNECTIONS + 8 {
                match UnixStream::connect(&path).await {
                    Ok(mut s) => {
                        let _ = s.write_all(&[0u8; STDIO_TOKEN_LEN]).await;
                        kept.push(s);
                    }
                    Err(_) => break,
                }
            }
            kept
        };
        let (conn, _kept) = tokio::join!(
            tokio::time::timeout(
                Duration::from_secs(20),
                accept(listener, path.clone(), token)
            ),
            flood
        );
        let conn = conn.expect("gives up in bounded time");
        assert!(conn.is_none(), "no wrong connection is relayed");
        assert!(!path.exists(), "the socket is gone");
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }
}
