//! The agent API service: each RPC validates its input, does its work and
//! maps failures to ttrpc status codes the shim can act on.

use async_trait::async_trait;
use husk_protocols::{
    agent::{HealthRequest, HealthResponse, ShutdownRequest, ShutdownResponse, VersionRequest, VersionResponse},
    agent_ttrpc, API_VERSION,
};
use tokio::sync::mpsc;
use ttrpc::r#async::TtrpcContext;

use crate::AGENT_VERSION;

/// Serves the agent API.
#[derive(Debug)]
pub struct AgentService {
    shutdown: mpsc::Sender<()>,
}

impl AgentService {
    /// `shutdown` receives one message when the host asks for a shutdown.
    pub fn new(shutdown: mpsc::Sender<()>) -> Self {
        Self { shutdown }
    }
}

fn internal(msg: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::INTERNAL, msg))
}

/// Seconds since boot, from `/proc/uptime` ("12.34 5.67").
fn uptime_seconds() -> Result<f64, String> {
    let text = std::fs::read_to_string("/proc/uptime").map_err(|e| format!("reading /proc/uptime: {e}"))?;
    text.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("unexpected /proc/uptime contents {text:?}"))
}

#[async_trait]
impl agent_ttrpc::Agent for AgentService {
    async fn health(&self, _ctx: &TtrpcContext, _req: HealthRequest) -> ttrpc::Result<HealthResponse> {
        let mut resp = HealthResponse::new();
        resp.status = husk_protocols::agent::health_response::Status::SERVING.into();
        Ok(resp)
    }

    async fn version(&self, _ctx: &TtrpcContext, _req: VersionRequest) -> ttrpc::Result<VersionResponse> {
        let uts = nix::sys::utsname::uname().map_err(|e| internal(format!("uname: {e}")))?;
        let mut resp = VersionResponse::new();
        resp.agent_version = AGENT_VERSION.to_string();
        resp.api_version = API_VERSION;
        resp.kernel_release = uts.release().to_string_lossy().into_owned();
        resp.kernel_version = uts.version().to_string_lossy().into_owned();
        resp.uptime_seconds = uptime_seconds().map_err(internal)?;
        Ok(resp)
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<ShutdownResponse> {
        tracing::info!("Shutdown called");
        // A second Shutdown while one is in progress finds the channel full,
        // which is fine: one is enough.
        let _ = self.shutdown.try_send(());
        Ok(ShutdownResponse::new())
    }
}
