//! `[server]` and `[metrics]`: where keyfront listens, its certificates, audit log, and the
//! limits every request and connection is held to.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::ConfigProblem;

/// The gRPC server's settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA that client certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// Accept a certificate's CN as identity when it has no URI SAN (weaker; off by default).
    pub allow_cn_identity: bool,
    /// This node's name in audit lines.
    pub node_id: String,
    /// The audit log file (JSON lines).
    pub audit_path: PathBuf,
    /// When audit checkpoints are signed.
    pub audit_checkpoints: crate::audit::CheckpointPolicy,
    /// Request limits.
    pub limits: Limits,
}

/// Request and connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request message, in bytes.
    pub max_message_bytes: usize,
    /// Most items in one batch.
    pub max_batch_items: usize,
    /// Most context pairs on one item.
    pub max_context_pairs: usize,
    /// Most bytes of context names and values on one item.
    pub max_context_bytes: usize,
    /// Most requests in progress at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: usize,
    /// Longest a request may take before DEADLINE_EXCEEDED.
    pub request_timeout: Duration,
    /// Most HashPassword/VerifyPassword computations at once; more are refused with
    /// RESOURCE_EXHAUSTED, so a flood of logins cannot starve the other RPCs.
    pub max_concurrent_password_hashes: usize,
    /// Most TCP connections at once, in their handshake or established; more are closed at
    /// once (and audited), so a flood cannot exhaust file descriptors or memory.
    pub max_connections: usize,
    /// How long a client has from its TCP connect to a finished TLS handshake; a connection
    /// that never sends a ClientHello, or stalls in the middle of one, is closed then.
    pub handshake_timeout: Duration,
    /// An established connection on which nothing arrives for this long is closed (clients
    /// connect again as they need): idle connections hold a slot of `max_connections` and a
    /// certificate checked only at its handshake.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 * 1024 * 1024,
            max_batch_items: 1000,
            max_context_pairs: 64,
            max_context_bytes: 8 * 1024,
            max_concurrent_requests: 1024,
            request_timeout: Duration::from_secs(10),
            max_concurrent_password_hashes: 2,
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: SocketAddr,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    #[serde(default = "default_listen")]
    pub(super) listen: SocketAddr,
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    pub(super) client_ca: PathBuf,
    #[serde(default)]
    pub(super) allow_cn_identity: bool,
    pub(super) node_id: Option<String>,
    #[serde(default = "default_audit_path")]
    pub(super) audit_path: PathBuf,
    #[serde(default = "default_audit_checkpoint_lines")]
    pub(super) audit_checkpoint_lines: u64,
    #[serde(default = "default_audit_checkpoint_interval_secs")]
    pub(super) audit_checkpoint_interval_secs: u64,
    #[serde(default = "default_max_message_bytes")]
    pub(super) max_message_bytes: usize,
    #[serde(default = "default_max_batch_items")]
    pub(super) max_batch_items: usize,
    #[serde(default = "default_max_context_pairs")]
    pub(super) max_context_pairs: usize,
    #[serde(default = "default_max_context_bytes")]
    pub(super) max_context_bytes: usize,
    #[serde(default = "default_max_concurrent_requests")]
    pub(super) max_concurrent_requests: usize,
    #[serde(default = "default_max_concurrent_password_hashes")]
    pub(super) max_concurrent_password_hashes: usize,
    #[serde(default = "default_request_timeout_ms")]
    pub(super) request_timeout_ms: u64,
    #[serde(default = "default_max_connections")]
    pub(super) max_connections: usize,
    #[serde(default = "default_handshake_timeout_ms")]
    pub(super) handshake_timeout_ms: u64,
    #[serde(default = "default_idle_timeout_secs")]
    pub(super) idle_timeout_secs: u64,
}

impl RawServer {
    /// `serving`: the certificate files must exist (only `serve` reads them).
    pub(super) fn validate(
        self,
        base: &Path,
        serving: bool,
        problems: &mut Vec<ConfigProblem>,
    ) -> ServerConfig {
        let mut file = |name: &'static str, path: PathBuf| {
            let path = base.join(path);
            if serving && !path.exists() {
                problems.push(ConfigProblem::FileMissing(name, path.clone()));
            }
            path
        };
        let cert = file("server.cert", self.cert);
        let key = file("server.key", self.key);
        let client_ca = file("server.client_ca", self.client_ca);
        for (value, name) in [
            (self.max_message_bytes, "server.max_message_bytes"),
            (self.max_batch_items, "server.max_batch_items"),
            (
                self.max_concurrent_requests,
                "server.max_concurrent_requests",
            ),
            (
                self.max_concurrent_password_hashes,
                "server.max_concurrent_password_hashes",
            ),
            (self.max_connections, "server.max_connections"),
        ] {
            if value == 0 {
                problems.push(ConfigProblem::Zero(name));
            }
        }
        if self.request_timeout_ms == 0 {
            problems.push(ConfigProblem::Zero("server.request_timeout_ms"));
        }
        if self.idle_timeout_secs == 0 {
            problems.push(ConfigProblem::Zero("server.idle_timeout_secs"));
        }
        if self.handshake_timeout_ms == 0 {
            problems.push(ConfigProblem::Zero("server.handshake_timeout_ms"));
        }
        if self.audit_checkpoint_lines == 0 {
            problems.push(ConfigProblem::Zero("server.audit_checkpoint_lines"));
        }
        if self.audit_checkpoint_interval_secs == 0 {
            problems.push(ConfigProblem::Zero("server.audit_checkpoint_interval_secs"));
        }
        ServerConfig {
            listen: self.listen,
            cert,
            key,
            client_ca,
            allow_cn_identity: self.allow_cn_identity,
            node_id: self.node_id.unwrap_or_else(default_node_id),
            audit_path: base.join(self.audit_path),
            audit_checkpoints: crate::audit::CheckpointPolicy {
                lines: self.audit_checkpoint_lines,
                interval: Duration::from_secs(self.audit_checkpoint_interval_secs),
            },
            limits: Limits {
                max_message_bytes: self.max_message_bytes,
                max_batch_items: self.max_batch_items,
                max_context_pairs: self.max_context_pairs,
                max_context_bytes: self.max_context_bytes,
                max_concurrent_requests: self.max_concurrent_requests,
                request_timeout: Duration::from_millis(self.request_timeout_ms),
                max_concurrent_password_hashes: self.max_concurrent_password_hashes,
                max_connections: self.max_connections,
                handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
                idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            },
        }
    }
}

pub(super) fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7443))
}

pub(super) fn default_audit_checkpoint_lines() -> u64 {
    crate::audit::CheckpointPolicy::default().lines
}

pub(super) fn default_audit_checkpoint_interval_secs() -> u64 {
    crate::audit::CheckpointPolicy::default().interval.as_secs()
}

pub(super) fn default_audit_path() -> PathBuf {
    PathBuf::from("audit/audit.log")
}

pub(super) fn default_max_message_bytes() -> usize {
    Limits::default().max_message_bytes
}

pub(super) fn default_max_batch_items() -> usize {
    Limits::default().max_batch_items
}

pub(super) fn default_max_context_pairs() -> usize {
    Limits::default().max_context_pairs
}

pub(super) fn default_max_context_bytes() -> usize {
    Limits::default().max_context_bytes
}

pub(super) fn default_max_concurrent_password_hashes() -> usize {
    Limits::default().max_concurrent_password_hashes
}

pub(super) fn default_max_concurrent_requests() -> usize {
    Limits::default().max_concurrent_requests
}

pub(super) fn default_request_timeout_ms() -> u64 {
    10_000
}

pub(super) fn default_max_connections() -> usize {
    Limits::default().max_connections
}

pub(super) fn default_idle_timeout_secs() -> u64 {
    Limits::default().idle_timeout.as_secs()
}

pub(super) fn default_handshake_timeout_ms() -> u64 {
    u64::try_from(Limits::default().handshake_timeout.as_millis()).unwrap_or(u64::MAX)
}

pub(super) fn default_node_id() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "keyfront".to_owned())
}
