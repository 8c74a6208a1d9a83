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
//! stdin ends when the client closes its end of the FIFO (ctr, at EOF of its
//! own stdin) or on containerd's `CloseIO` (CRI's stdin-once): the relay
//! forwards what is still buffered and closes the stream, and the process
//! reads EOF. The FIFO is opened read-only with a blocking open on a
//! worker thread — a non-blocking open would report EOF before the client
//! has even opened its end — and a process whose I/O is torn down before
//! the client came unblocks that open by opening the other end itself.

use std::{sync::Arc, time::Duration};

use husk_protocols::{agent::Stdio, hybrid_vsock::port_socket_path};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{unix::pipe, UnixListener, UnixStream},
    sync::Notify,
    task::JoinHandle,
};

use crate::vm::Vm;

/// How long the agent has to connect a stream.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);
const CHUNK: usize = 64 * 1024;

/// Errors setting up stdio.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// A listener could not be bound.
    #[error("listening on {0}: {1}")]
    Listen(String, #[source] std::io::Error),
}

/// The relays of one process.
#[derive(Debug)]
pub struct ProcessIo {
    stdio: Stdio,
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<JoinHandle<()>>,
    close_stdin: Arc<Notify>,
    sockets: Vec<std::path::PathBuf>,
}

async fn accept(listener: UnixListener, path: std::path::PathBuf) -> Option<UnixStream> {
    let r = tokio::time::timeout(ACCEPT_TIMEOUT, listener.accept()).await;
    let _ = std::fs::remove_file(&path);
    match r {
        Ok(Ok((s, _))) => Some(s),
        Ok(Err(e)) => {
            tracing::warn!("stdio stream {}: {e}", path.display());
            None
        }
        Err(_) => None,
    }
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
        let mut stdio = Stdio::new();
        stdio.terminal = terminal;
        let mut io = Self {
            stdio: Stdio::new(),
            outputs: Vec::new(),
            stdin: None,
            close_stdin: Arc::new(Notify::new()),
            sockets: Vec::new(),
        };
        let listen = |io: &mut Self| -> Result<(u32, UnixListener, std::path::PathBuf), IoError> {
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
                relay_stdin(&fifo, l, path, close).await;
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
            io.outputs.push(tokio::spawn(async move {
                relay_output(l, path, &fifo).await;
            }));
        }
        io.stdio = stdio;
        Ok(io)
    }

    /// The ports to hand the agent.
    pub fn stdio(&self) -> Stdio {
        self.stdio.clone()
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

async fn relay_output(listener: UnixListener, path: std::path::PathBuf, fifo: &str) {
    let Some(mut conn) = accept(listener, path).await else {
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
    path: std::path::PathBuf,
    close: Arc<Notify>,
) {
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
            return;
        }
        None => return,
    };
    let Some(mut conn) = accept(listener, path).await else {
        return;
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
