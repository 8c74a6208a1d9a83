//! One process of a container: its init, or an exec. Its exit status
//! comes from the agent's reaper; waiting for it returns once it has
//! exited *and* its output streams are drained, so everything it wrote
//! reaches the host before its exit is reported.

use std::{
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use husk_protocols::agent::Stdio;
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use tokio::{
    io::{unix::AsyncFd, AsyncReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::watch,
    task::JoinHandle,
};
use tokio_vsock::VsockStream;

use super::{
    helper,
    stdio::{
        connect_host, devnull, drain_output, feed_stdin, pipe, pty_read, pty_write_all,
        receive_pty, set_nonblocking, stdio_token, CHUNK, CONSOLE_DIR,
    },
    ContainerError, Result,
};
use crate::{reaper::Reaper, runtime::Outcome};

/// How long output may keep flowing after a process exited (a child it
/// left behind may hold its stdout open).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// One process: a container's init or an exec.
#[derive(Debug)]
pub struct Process {
    pub(super) pid: u32,
    exit: watch::Receiver<Option<i32>>,
    outputs: Mutex<Vec<JoinHandle<()>>>,
    stdin: Mutex<Option<JoinHandle<()>>>,
    pty: Option<Arc<AsyncFd<OwnedFd>>>,
    /// The container's cgroup in the hierarchy (the runtime reports it for
    /// a container's init).
    pub(super) cgroup_path: Option<String>,
}

impl Process {
    /// The exit status, if it has exited.
    pub fn exited(&self) -> Option<i32> {
        *self.exit.borrow()
    }

    /// Waits for the exit, then for its output to drain.
    pub async fn wait(&self) -> i32 {
        let mut rx = self.exit.clone();
        let code = loop {
            if let Some(code) = *rx.borrow_and_update() {
                break code;
            }
            if rx.changed().await.is_err() {
                // The watcher is gone without a status: cannot happen while
                // the agent runs; report a failure rather than hang.
                break 255;
            }
        };
        let outputs: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.outputs.lock().unwrap_or_else(|e| e.into_inner()));
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        for mut h in outputs {
            if tokio::time::timeout_at(deadline, &mut h).await.is_err() {
                tracing::warn!(pid = self.pid, "output still open after exit; cutting it");
                h.abort();
            }
        }
        code
    }

    /// Stops feeding stdin (the process sees EOF unless it has a terminal).
    pub fn close_stdin(&self) {
        if let Some(h) = self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take() {
            h.abort();
        }
    }

    /// Sets the terminal's window size.
    pub fn resize(&self, width: u16, height: u16) -> Result<()> {
        let pty = self
            .pty
            .as_ref()
            .ok_or_else(|| ContainerError::State("the process has no terminal".into()))?;
        let ws = libc::winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize struct that lives across the
        // call; the descriptor is the terminal master we own.
        let rc = unsafe { libc::ioctl(pty.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc != 0 {
            return Err(ContainerError::Failed(format!(
                "resizing the terminal: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    pub(super) fn abort_io(&self) {
        self.close_stdin();
        for h in self
            .outputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            h.abort();
        }
    }
}

/// Connects the stdio streams, runs the helper with `args(extra)` (extra:
/// the console socket flags, if any) and wires the process's I/O.
pub(super) async fn spawn(
    id: &str,
    exec_id: &str,
    stdio: &Stdio,
    args: impl FnOnce(&[String]) -> Vec<String>,
) -> Result<Process> {
    let token = stdio_token(stdio)?;
    let stdin = connect_host(stdio.stdin_port, token).await?;
    let stdout = connect_host(stdio.stdout_port, token).await?;
    let stderr = if stdio.terminal {
        None
    } else {
        connect_host(stdio.stderr_port, token).await?
    };
    let mut outputs = Vec::new();
    let mut stdin_task = None;

    if stdio.terminal {
        std::fs::create_dir_all(CONSOLE_DIR)
            .map_err(|e| ContainerError::Failed(format!("creating {CONSOLE_DIR}: {e}")))?;
        let sock = Path::new(CONSOLE_DIR).join(format!("{}.sock", helper::next_number()));
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock)
            .map_err(|e| ContainerError::Failed(format!("console socket: {e}")))?;
        let extra = vec!["--console-socket".to_string(), sock.display().to_string()];
        let argv = args(&extra);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let result = match helper::run_with(&argv, [devnull()?, devnull()?, devnull()?]).await {
            Ok(v) => match receive_pty(&listener).await {
                Ok(pty) => Ok((v, pty)),
                Err(e) => {
                    // Created, but without its terminal: take it away again.
                    if exec_id.is_empty() {
                        let _ = helper::run(&["delete", "--id", id, "--force"]).await;
                    } else if let Some(pid) = v.0.pid.and_then(|p| i32::try_from(p).ok()) {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&sock);
        let ((outcome, since), pty) = result?;
        set_nonblocking(&pty)?;
        // SAFETY: an OwnedFd keeps its descriptor open and unchanged for
        // as long as the AsyncFd owns it.
        let pty = unsafe { AsyncFd::register(pty) }
            .map_err(|e| ContainerError::Failed(format!("terminal: {e}")))?;
        let pty = Arc::new(pty);
        if let Some(mut out) = stdout {
            let pty = pty.clone();
            outputs.push(tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                while let Ok(n) = pty_read(&pty, &mut buf).await {
                    if n == 0 || out.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = AsyncWriteExt::shutdown(&mut out).await;
            }));
        }
        if let Some(mut input) = stdin {
            let pty = pty.clone();
            stdin_task = Some(tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                while let Ok(n) = input.read(&mut buf).await {
                    if n == 0 || pty_write_all(&pty, &buf[..n]).await.is_err() {
                        break;
                    }
                }
            }));
        }
        return Ok(finish(
            outcome,
            since,
            outputs,
            stdin_task,
            Some(pty),
            id,
            exec_id,
        ));
    }

    // Pipes: the process gets one end, the agent copies the other.
    let child_stdin = match stdin {
        Some(s) => {
            let (r, w) = pipe()?;
            let (read_half, _write_half) = tokio::io::split(s);
            stdin_task = Some(feed_stdin(read_half, w)?);
            r
        }
        None => devnull()?,
    };
    let mut child_out = |stream: Option<VsockStream>| -> Result<OwnedFd> {
        match stream {
            Some(s) => {
                let (r, w) = pipe()?;
                outputs.push(drain_output(r, s)?);
                Ok(w)
            }
            None => devnull(),
        }
    };
    let child_stdout = child_out(stdout)?;
    let child_stderr = child_out(stderr)?;
    let argv = args(&[]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let helper = helper::run_with(&argv, [child_stdin, child_stdout, child_stderr]).await;
    let (outcome, since) = match helper {
        Ok(v) => v,
        Err(e) => {
            if let Some(h) = stdin_task {
                h.abort();
            }
            for h in outputs {
                h.abort();
            }
            return Err(e);
        }
    };
    Ok(finish(
        outcome, since, outputs, stdin_task, None, id, exec_id,
    ))
}

fn finish(
    outcome: Outcome,
    since: Instant,
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<JoinHandle<()>>,
    pty: Option<Arc<AsyncFd<OwnedFd>>>,
    id: &str,
    exec_id: &str,
) -> Process {
    let pid = outcome.pid.unwrap_or(0);
    let (tx, rx) = watch::channel(None);
    let exited = Reaper::global().watch(i32::try_from(pid).unwrap_or(-1), since);
    tokio::spawn(async move {
        let code = exited.await.unwrap_or(255);
        let _ = tx.send(Some(code));
    });
    tracing::info!(container = id, exec = exec_id, pid, "process created");
    Process {
        pid,
        exit: rx,
        outputs: Mutex::new(outputs),
        stdin: Mutex::new(stdin),
        pty,
        cgroup_path: outcome.cgroup_path,
    }
}

#[cfg(test)]
pub mod test {
    //! Processes whose exit a test decides.

    use super::*;

    /// Sets the exit status of a process made by [`Process::for_test`].
    #[derive(Debug, Clone)]
    pub struct Exit(Arc<watch::Sender<Option<i32>>>);

    impl Exit {
        pub fn set(&self, code: i32) {
            let _ = self.0.send(Some(code));
        }
    }

    impl Process {
        /// A process with pid `pid`, no streams, running until its [`Exit`]
        /// is set.
        pub fn for_test(pid: u32) -> (Process, Exit) {
            let (tx, rx) = watch::channel(None);
            let process = Process {
                pid,
                exit: rx,
                outputs: Mutex::new(Vec::new()),
                stdin: Mutex::new(None),
                pty: None,
                cgroup_path: None,
            };
            (process, Exit(Arc::new(tx)))
        }
    }

    #[tokio::test]
    async fn wait_returns_the_exit_status_after_the_output_drained() {
        let (process, exit) = Process::for_test(7);
        let (r, w) = pipe().expect("pipe");
        let (sink_r, sink_w) = pipe().expect("pipe");
        let sink = tokio::net::unix::pipe::Sender::from_owned_fd(sink_w).expect("sender");
        process
            .outputs
            .lock()
            .expect("lock")
            .push(drain_output(r, sink).expect("drain"));
        assert_eq!(process.exited(), None);
        nix::unistd::write(&w, b"last words").expect("write");
        exit.set(3);
        assert_eq!(process.exited(), Some(3));
        // The writer is still open: wait must not return before it closes.
        let waited = tokio::spawn(async move { process.wait().await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waited.is_finished(), "wait returned with output pending");
        drop(w);
        assert_eq!(waited.await.expect("join"), 3);
        let mut got = Vec::new();
        let mut f = std::fs::File::from(sink_r);
        std::io::Read::read_to_end(&mut f, &mut got).expect("read");
        assert_eq!(got, b"last words");
    }

    #[tokio::test]
    async fn a_process_without_a_terminal_cannot_be_resized() {
        let (process, _exit) = Process::for_test(8);
        assert!(matches!(
            process.resize(80, 24),
            Err(ContainerError::State(_))
        ));
    }
}
