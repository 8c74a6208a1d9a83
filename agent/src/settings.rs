//! Agent settings, read from the guest kernel command line.
//!
//! The kernel command line is the one channel the VMM controls before any
//! guest code runs, so the few knobs the agent has live there as
//! `husk.<name>=<value>` words. Unknown `husk.*` words are logged and ignored
//! rather than fatal: an older agent must still boot under a newer VMM.

use husk_protocols::{AGENT_VSOCK_PORT, READY_VSOCK_PORT};

/// Settings of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// A `tracing` filter (`husk.log=debug`).
    pub log_level: String,
    /// The vsock port of the ttrpc server (`husk.agent_port=`).
    pub agent_port: u32,
    /// The host vsock port readiness is announced to (`husk.ready_port=`).
    pub ready_port: u32,
    /// Try the agent API from inside the guest once it listens and print
    /// the outcome on the console (`husk.selfcheck=local-api`; tests).
    pub selfcheck_local_api: bool,
    /// Words that looked like settings but were not understood.
    pub ignored: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            log_level: "info".to_string(),
            agent_port: AGENT_VSOCK_PORT,
            ready_port: READY_VSOCK_PORT,
            selfcheck_local_api: false,
            ignored: Vec::new(),
        }
    }
}

impl Settings {
    /// Reads `/proc/cmdline`; falls back to defaults if it cannot be read.
    pub fn from_kernel_cmdline() -> Self {
        let settings = std::fs::read_to_string("/proc/cmdline")
            .map(|c| Self::parse(&c))
            .unwrap_or_default();
        for word in &settings.ignored {
            eprintln!("husk-agent: ignoring kernel command line setting {word:?}");
        }
        settings
    }

    /// Parses a kernel command line.
    pub fn parse(cmdline: &str) -> Self {
        let mut s = Self::default();
        for word in cmdline.split_ascii_whitespace() {
            let Some(rest) = word.strip_prefix("husk.") else {
                continue;
            };
            let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
            let ok = match key {
                "log" if !value.is_empty() => {
                    s.log_level = value.to_string();
                    true
                }
                "agent_port" => value.parse().map(|v| s.agent_port = v).is_ok(),
                "ready_port" => value.parse().map(|v| s.ready_port = v).is_ok(),
                "selfcheck" if value == "local-api" => {
                    s.selfcheck_local_api = true;
                    true
                }
                _ => false,
            };
            if !ok {
                s.ignored.push(word.to_string());
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_husk_words() {
        assert_eq!(Settings::parse("console=ttyS0 quiet"), Settings::default());
    }

    #[test]
    fn reads_known_words_and_keeps_unknown_ones() {
        let s = Settings::parse(
            "quiet husk.log=debug husk.agent_port=2000 husk.ready_port=x husk.nope=1 \
             husk.selfcheck=local-api",
        );
        assert!(s.selfcheck_local_api);
        assert_eq!(s.log_level, "debug");
        assert_eq!(s.agent_port, 2000);
        assert_eq!(s.ready_port, READY_VSOCK_PORT);
        assert_eq!(
            s.ignored,
            vec!["husk.ready_port=x".to_string(), "husk.nope=1".to_string()]
        );
    }
}
