//! A client for containerd's CRI streaming server (the URLs that CRI's
//! `Exec`, `Attach` and `PortForward` return), speaking the WebSocket
//! flavour of Kubernetes' stream protocol as the API server does when it
//! proxies `kubectl exec`, `attach` and `port-forward`.
//!
//! The protocol (`v4.channel.k8s.io`): every binary WebSocket message starts
//! with a channel byte. For exec and attach the channels are stdin (0),
//! stdout (1), stderr (2), an error/status channel (3, a JSON
//! `metav1.Status` when the process ends) and resize (4, JSON
//! `{"Width":..,"Height":..}`). For port-forward each requested port gets a
//! data channel and an error channel, and the server first writes the port
//! (two bytes, little endian) on both.
//!
//! The streaming server listens where containerd runs: inside the test's
//! network namespace, so the TCP connection is made from there.

use std::{
    collections::BTreeMap,
    net::TcpStream,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use tungstenite::{client::IntoClientRequest, http::HeaderValue, Message, WebSocket};

/// The subprotocol asked for: binary frames, status on channel 3.
const PROTOCOL: &str = "v4.channel.k8s.io";

/// Standard input.
pub const STDIN: u8 = 0;
/// Standard output.
pub const STDOUT: u8 = 1;
/// Standard error.
pub const STDERR: u8 = 2;
/// The exec status (JSON), written once when the process ends.
pub const STATUS: u8 = 3;
/// Terminal size changes (JSON).
pub const RESIZE: u8 = 4;

/// One open stream session.
pub struct Stream {
    ws: WebSocket<TcpStream>,
    /// Bytes received so far, by channel.
    received: BTreeMap<u8, Vec<u8>>,
    closed: bool,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("received", &self.text_by_channel())
            .field("closed", &self.closed)
            .finish()
    }
}

impl Stream {
    /// Opens `url` (from Exec, Attach or PortForward) from inside the
    /// network namespace at `netns`.
    pub fn connect(netns: &Path, url: &str) -> Result<Self> {
        // containerd hands out http:// URLs; the same address speaks
        // WebSocket after an upgrade. It serves no TLS in this setup.
        let ws_url = match url.strip_prefix("http://") {
            Some(rest) => format!("ws://{rest}"),
            None => bail!("stream URL {url:?} is not plain http://"),
        };
        let mut request = ws_url
            .as_str()
            .into_client_request()
            .with_context(|| format!("stream URL {url:?}"))?;
        let authority = request
            .uri()
            .authority()
            .ok_or_else(|| anyhow!("stream URL {url:?} has no host"))?
            .to_string();
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(PROTOCOL));
        let tcp = crate::netns::run_in(netns, move || TcpStream::connect(&authority))?
            .with_context(|| format!("connecting to the streaming server for {url}"))?;
        // Blocking for the handshake (bounded), short reads afterwards so
        // that read_until can watch its deadline.
        tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
        let (ws, response) = tungstenite::client(request, tcp)
            .map_err(|e| anyhow!("WebSocket handshake with {url}: {e}"))?;
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)))?;
        let chosen = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok());
        if chosen != Some(PROTOCOL) {
            bail!("the streaming server chose protocol {chosen:?}, not {PROTOCOL}");
        }
        Ok(Self {
            ws,
            received: BTreeMap::new(),
            closed: false,
        })
    }

    /// Sends `data` on `channel`.
    pub fn send(&mut self, channel: u8, data: &[u8]) -> Result<()> {
        let mut frame = Vec::with_capacity(data.len() + 1);
        frame.push(channel);
        frame.extend_from_slice(data);
        self.ws
            .send(Message::binary(frame))
            .context("sending on the stream")
    }

    /// Asks for a terminal of `width` columns and `height` rows.
    pub fn resize(&mut self, width: u16, height: u16) -> Result<()> {
        let json = serde_json::json!({ "Width": width, "Height": height }).to_string();
        self.send(RESIZE, json.as_bytes())
    }

    /// Everything received on `channel` so far, as text.
    pub fn text(&self, channel: u8) -> String {
        String::from_utf8_lossy(self.received.get(&channel).map_or(&[][..], |v| v)).into_owned()
    }

    /// Everything received on `channel` so far.
    pub fn bytes(&self, channel: u8) -> &[u8] {
        self.received.get(&channel).map_or(&[][..], |v| v)
    }

    fn text_by_channel(&self) -> BTreeMap<u8, String> {
        self.received.keys().map(|&c| (c, self.text(c))).collect()
    }

    /// Whether the server has closed the session.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Reads until `done` holds for what has been received, or the session
    /// closes, or `within` passes (an error naming what did arrive).
    pub fn read_until(&mut self, within: Duration, done: impl Fn(&Self) -> bool) -> Result<()> {
        let deadline = Instant::now() + within;
        while !done(self) {
            if self.closed {
                bail!("the stream closed first; received {self:?}");
            }
            if Instant::now() > deadline {
                bail!("nothing wanted within {within:?}; received {self:?}");
            }
            self.read_one()?;
        }
        Ok(())
    }

    /// Reads until the server closes the session (within `within`).
    pub fn read_to_close(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        while !self.closed {
            if Instant::now() > deadline {
                bail!("the stream is still open after {within:?}; received {self:?}");
            }
            self.read_one()?;
        }
        Ok(())
    }

    /// One read (or a short timeout): files a message under its channel.
    fn read_one(&mut self) -> Result<()> {
        match self.ws.read() {
            Ok(Message::Binary(b)) => {
                if let Some((&channel, data)) = b.split_first() {
                    self.received
                        .entry(channel)
                        .or_default()
                        .extend_from_slice(data);
                }
                Ok(())
            }
            Ok(Message::Close(_)) => {
                self.closed = true;
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(())
            }
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                self.closed = true;
                Ok(())
            }
            Err(tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            )) => {
                self.closed = true;
                Ok(())
            }
            Err(e) => Err(anyhow!("reading the stream: {e}")),
        }
    }

    /// The exit code the status channel reports: 0 for `Success`, the
    /// `ExitCode` cause of a `NonZeroExitCode` failure; `None` before the
    /// status arrived.
    pub fn exit_code(&self) -> Result<Option<i32>> {
        let raw = self.bytes(STATUS);
        if raw.is_empty() {
            return Ok(None);
        }
        let status: serde_json::Value = serde_json::from_slice(raw)
            .with_context(|| format!("status {:?}", self.text(STATUS)))?;
        if status["status"] == "Success" {
            return Ok(Some(0));
        }
        let code = status["details"]["causes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["reason"] == "ExitCode")
            .and_then(|c| c["message"].as_str())
            .and_then(|m| m.parse().ok())
            .ok_or_else(|| anyhow!("status without an exit code: {status}"))?;
        Ok(Some(code))
    }

    /// Closes the session from this end.
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.read_to_close(Duration::from_secs(5));
    }
}

/// The data a port-forward session carried for the first port: channel 0
/// without the two-byte port header the server writes first.
pub fn forwarded(stream: &Stream, port: u16) -> Result<&[u8]> {
    let data = stream.bytes(0);
    match data.split_first_chunk::<2>() {
        Some((head, rest)) if u16::from_le_bytes(*head) == port => Ok(rest),
        Some((head, _)) => bail!(
            "port-forward data starts with port {}, not {port}",
            u16::from_le_bytes(*head)
        ),
        None => Ok(&[]),
    }
}
