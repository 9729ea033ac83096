//! Configuration: raw TOML into a validated [`Config`], reporting every problem at once.
//!
//! Relative paths are resolved against the config file's directory. The HSM PIN never comes from
//! the file itself: `hsm.pin_env` names an environment variable, or `hsm.pin_file` a file that
//! only its owner may read.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cryptoki::types::AuthPin;
use serde::Deserialize;

mod revocations;
use revocations::RawRevocations;
pub use revocations::{Crl, Revocations, Serial};

use crate::hsm::pkcs11::Pkcs11Config;
use crate::ids::Name;
use crate::keystore::{Backend, PostgresOptions, StoreOptions};
use crate::kms::KmsOptions;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// How to reach the HSM (PIN resolved).
    pub hsm: Pkcs11Config,
    /// How long to wait between attempts to reach an unreachable HSM.
    pub hsm_retry: Duration,
    /// Where the databases live.
    pub data_dir: PathBuf,
    /// Domain tuning.
    pub kms: KmsOptions,
    /// The gRPC server, if configured (`keyfront serve` needs it).
    pub server: Option<ServerConfig>,
    /// Who may call, and what they may do.
    pub principals: Vec<PrincipalConfig>,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Which operations need a second officer's approval.
    pub dual_control: DualControl,
    /// Client certificates refused although they chain to the CA.
    pub revocations: Revocations,
    /// Support access grants.
    pub access: Access,
    /// Nightly snapshots of keyfront's own state.
    pub backup: Backup,
}

/// Nightly snapshots (`[backup]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    /// Where snapshots are written and pruned (`None`: not configured).
    pub dir: Option<PathBuf>,
    /// Whether the server takes one every night.
    pub nightly: bool,
    /// Time of day (UTC, seconds after midnight) of the nightly snapshot.
    pub at_secs: u64,
    /// Snapshots older than this many days are deleted (the newest this many are always kept).
    pub retention_days: u64,
}

impl Default for Backup {
    fn default() -> Self {
        Self {
            dir: None,
            nightly: false,
            at_secs: 2 * 3600,
            retention_days: 30,
        }
    }
}

/// Support access grants (`[access]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// The longest a grant may last once approved.
    pub max_grant: Duration,
    /// How long a request waits for a tenant-admin before it expires.
    pub request_ttl: Duration,
}

impl Default for Access {
    fn default() -> Self {
        Self {
            max_grant: Duration::from_secs(8 * 3600),
            request_ttl: Duration::from_secs(86_400),
        }
    }
}

/// An operation that can be put under dual control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub enum DualOperation {
    /// AdminService/DestroyTenant.
    DestroyTenant,
    /// AdminService/ScheduleKeyVersionDestruction.
    ScheduleKeyVersionDestruction,
    /// AdminService/RotateMasterKey.
    RotateMasterKey,
    /// AdminService/UpdateKeyPolicy when it raises min_decryption_version.
    RaiseMinDecryptionVersion,
    /// AdminService/ImportKeyMaterial: key material an outsider chose becomes a key's primary.
    ImportKeyMaterial,
}

/// Dual control: these operations wait for a second, different officer's approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DualControl {
    /// The operations under dual control (none by default).
    pub operations: BTreeSet<DualOperation>,
    /// How long a request waits for approval before it expires.
    pub approval_ttl: Duration,
}

impl Default for DualControl {
    fn default() -> Self {
        Self {
            operations: BTreeSet::new(),
            approval_ttl: Duration::from_secs(86_400),
        }
    }
}

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

/// A role a principal may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Encrypt, Decrypt, BatchEncrypt, BatchDecrypt.
    App,
    /// GenerateDataKey, DecryptDataKey, for every tenant in its list.
    Backup,
    /// SealSecret, UnsealSecret.
    Secrets,
    /// AdminService; never data.
    Officer,
    /// RequestSupportAccess; KeyService calls only under an approved grant of a tenant-admin.
    Support,
    /// ApproveSupportAccess and DenySupportAccess for its own tenants; never data.
    TenantAdmin,
    /// ReviewAccess and ListGrants; never data.
    Auditor,
}

impl Role {
    /// The name the config uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::App => "app",
            Self::Backup => "backup",
            Self::Secrets => "secrets",
            Self::Officer => "officer",
            Self::Support => "support",
            Self::TenantAdmin => "tenant-admin",
            Self::Auditor => "auditor",
        }
    }

    /// Whether `tenants = ["*"]` is allowed with it: roles that never touch data directly.
    fn may_have_every_tenant(self) -> bool {
        matches!(self, Self::Officer | Self::Support | Self::Auditor)
    }

    fn is_data(self) -> bool {
        matches!(self, Self::App | Self::Backup | Self::Secrets)
    }
}

/// Two roles one principal may not hold together, and why: together they would undo a
/// promise that each keeps alone. Authorization passes if any role of a principal allows a
/// call, so a principal with both has both powers at once.
pub fn conflicting_roles(roles: &[Role]) -> Option<(Role, Role, &'static str)> {
    for &a in roles {
        for &b in roles {
            let why = match (a, b) {
                (data, Role::Officer) if data.is_data() => {
                    "officers administer keys and never see data"
                }
                (data, Role::Auditor) if data.is_data() => "auditors review and never see data",
                (data, Role::TenantAdmin) if data.is_data() => {
                    "a tenant's administrator consents and never sees data"
                }
                (data, Role::Support) if data.is_data() => {
                    "support reaches data only under a grant the customer approved"
                }
                (Role::Support, Role::TenantAdmin) => {
                    "support would approve its own access: consent must be the customer's"
                }
                (Role::Officer, Role::TenantAdmin) => {
                    "an officer would consent to support access for the customer"
                }
                (Role::Officer, Role::Support) => {
                    "an officer would request support access and revoke its traces"
                }
                _ => continue,
            };
            return Some((a, b, why));
        }
    }
    None
}

/// Which tenants a principal may act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantScope {
    /// Every tenant (`tenants = ["*"]`); only for principals whose roles are all officer,
    /// support or auditor (support reaches data only under a grant for one tenant).
    All,
    /// Exactly these (a set: a principal of a multi-tenant service may list many thousands).
    Only(BTreeSet<Name>),
}

/// One entry of `[[principals]]`.
#[derive(Debug, Clone)]
pub struct PrincipalConfig {
    /// The identity: the certificate's URI SAN (or CN with `allow_cn_identity`).
    pub identity: String,
    /// Tenants it may act on.
    pub tenants: TenantScope,
    /// Its roles.
    pub roles: Vec<Role>,
    /// If set, the only keys it may use.
    pub keys: Option<Vec<Name>>,
}

/// Where configuration values from outside the file come from (the environment, or a map in
/// tests).
pub trait Env {
    /// The value of a variable, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("cannot parse config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// One or more values are invalid; all of them are listed.
    #[error("invalid config {path}:{}", Problems(problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<ConfigProblem>,
    },
}

struct Problems<'a>(&'a [ConfigProblem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for problem in self.0 {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

/// One invalid value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigProblem {
    /// The PKCS#11 module file does not exist.
    #[error("hsm.module: {0} does not exist (install SoftHSM: softhsm/install.sh)")]
    ModuleMissing(PathBuf),
    /// The PIN environment variable is unset or empty.
    #[error("hsm.pin_env: environment variable {0} is not set")]
    PinEnvUnset(String),
    /// The PIN file is readable by group or others.
    #[error("hsm.pin_file: {0} is readable by others; chmod 600 it")]
    PinFileTooOpen(PathBuf),
    /// The PIN file could not be read or is empty.
    #[error("hsm.pin_file: cannot read a PIN from {0}")]
    PinFileUnreadable(PathBuf),
    /// Both or neither of `pin_env` and `pin_file` are set.
    #[error("hsm: set exactly one of pin_env and pin_file")]
    PinSource,
    /// `backend = "postgres"` without a `[storage.postgres]` table.
    #[error("storage.backend = \"postgres\" needs a [storage.postgres] table")]
    PostgresMissing,
    /// A namespace that is not a plain schema prefix.
    #[error(
        "storage.postgres.namespace: {0:?} must be 1 to 24 of a-z, 0-9 and '_', starting with a letter"
    )]
    PostgresNamespace(String),
    /// The connection string's environment variable is unset or empty.
    #[error("storage.postgres.url_env: environment variable {0} is not set")]
    PostgresUrlEnvUnset(String),
    /// The connection string's file is readable by group or others.
    #[error("storage.postgres.url_file: {0} is readable by others; chmod 600 it")]
    PostgresUrlFileTooOpen(PathBuf),
    /// The connection string's file could not be read or is empty.
    #[error("storage.postgres.url_file: cannot read a connection string from {0}")]
    PostgresUrlFileUnreadable(PathBuf),
    /// Both or neither of `url_env` and `url_file` are set.
    #[error("storage.postgres: set exactly one of url_env and url_file")]
    PostgresUrlSource,
    /// A PKCS#11 token label is 1 to 32 bytes.
    #[error("hsm.token_label: must be 1 to 32 bytes")]
    TokenLabel,
    /// `backup.time` is not `HH:MM`.
    #[error("backup.time: {0:?} is not a time of day HH:MM (UTC)")]
    BackupTime(String),
    /// A count that must be at least 1 is 0.
    #[error("{0}: must be at least 1")]
    Zero(&'static str),
    /// A setting outside the range it allows.
    #[error("{0}: must be in {1}")]
    Range(&'static str, &'static str),
    /// A file the server needs does not exist.
    #[error("{0}: {1} does not exist")]
    FileMissing(&'static str, PathBuf),
    /// Two principals have the same identity.
    #[error("principals: identity {0:?} is listed twice")]
    PrincipalDuplicate(String),
    /// A principal has an empty identity, no roles or no tenants.
    #[error("principals: {0:?} needs an identity, at least one role and at least one tenant")]
    PrincipalIncomplete(String),
    /// A tenant or key name in a principal is not a valid name.
    #[error("principals: {0:?} names an invalid tenant or key {1:?}")]
    PrincipalName(String, String),
    /// A revocation entry that is not a serial or fingerprint.
    #[error("{0}: {1:?} is not {2}")]
    Revocation(&'static str, String, &'static str),
    /// A revocation file (CRL, issuer certificate) that cannot be used.
    #[error("{0}: {1}: {2}")]
    RevocationFile(&'static str, PathBuf, String),
    /// Serials without an issuer while several CAs are trusted.
    #[error(
        "revocations.serials: the client CA file holds {0} CAs, so a serial alone is ambiguous; list each under [[revocations.by_issuer]] with the CA certificate that issued it"
    )]
    AmbiguousSerials(usize),
    /// Argon2id costs outside what VerifyPassword accepts.
    #[error(
        "passwords: memory_kib must be 8 to 1048576, iterations and parallelism 1 to 16 (the accepted costs too)"
    )]
    PasswordParams,
    /// A destruction window shorter than the backup retention.
    #[error(
        "keys.destruction_window_days ({0}) must be at least backup.retention_days ({1}): a destroyed version must outlive the backups that need it"
    )]
    WindowBelowRetention(u64, u64),
    /// A principal holding two roles that exclude each other.
    #[error(
        "principals: {0:?} has roles {1} and {2}, which one principal may not hold together: {3}. Give each role its own principal (and certificate); if you must, set dangerous_allow_role_combination = true on it (logged and audited)"
    )]
    RoleCombination(String, &'static str, &'static str, &'static str),
    /// `tenants = ["*"]` on a principal that can touch data.
    #[error(
        "principals: {0:?} may use tenants = [\"*\"] only if all its roles are officer, support or auditor"
    )]
    PrincipalWildcard(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hsm: RawHsm,
    storage: RawStorage,
    #[serde(default)]
    cache: RawCache,
    server: Option<RawServer>,
    #[serde(default)]
    principals: Vec<RawPrincipal>,
    metrics: Option<RawMetrics>,
    #[serde(default)]
    keys: RawKeys,
    #[serde(default)]
    backup: RawBackup,
    #[serde(default)]
    dual_control: RawDualControl,
    #[serde(default)]
    passwords: RawPasswords,
    #[serde(default)]
    revocations: RawRevocations,
    #[serde(default)]
    access: RawAccess,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    #[serde(default = "default_max_grant_secs")]
    max_grant_secs: u64,
    #[serde(default = "default_request_ttl_secs")]
    request_ttl_secs: u64,
}

impl Default for RawAccess {
    fn default() -> Self {
        Self {
            max_grant_secs: default_max_grant_secs(),
            request_ttl_secs: default_request_ttl_secs(),
        }
    }
}

fn default_max_grant_secs() -> u64 {
    Access::default().max_grant.as_secs()
}

fn default_request_ttl_secs() -> u64 {
    Access::default().request_ttl.as_secs()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPasswords {
    #[serde(default = "default_password_memory_kib")]
    memory_kib: u32,
    #[serde(default = "default_password_iterations")]
    iterations: u32,
    #[serde(default = "default_password_parallelism")]
    parallelism: u32,
    // Older costs whose hashes VerifyPassword still takes (and answers rehash_needed).
    #[serde(default)]
    accepted: Vec<RawPasswordCosts>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPasswordCosts {
    memory_kib: u32,
    iterations: u32,
    parallelism: u32,
}

impl RawPasswordCosts {
    fn params(&self) -> crate::kms::PasswordParams {
        crate::kms::PasswordParams {
            memory_kib: self.memory_kib,
            iterations: self.iterations,
            parallelism: self.parallelism,
        }
    }
}

impl Default for RawPasswords {
    fn default() -> Self {
        Self {
            memory_kib: default_password_memory_kib(),
            iterations: default_password_iterations(),
            parallelism: default_password_parallelism(),
            accepted: Vec::new(),
        }
    }
}

fn default_password_memory_kib() -> u32 {
    crate::kms::PasswordParams::default().memory_kib
}
fn default_password_iterations() -> u32 {
    crate::kms::PasswordParams::default().iterations
}
fn default_password_parallelism() -> u32 {
    crate::kms::PasswordParams::default().parallelism
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDualControl {
    #[serde(default)]
    operations: Vec<DualOperation>,
    #[serde(default = "default_approval_ttl_secs")]
    approval_ttl_secs: u64,
}

impl Default for RawDualControl {
    fn default() -> Self {
        Self {
            operations: Vec::new(),
            approval_ttl_secs: default_approval_ttl_secs(),
        }
    }
}

fn default_approval_ttl_secs() -> u64 {
    DualControl::default().approval_ttl.as_secs()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    #[serde(default = "default_destruction_window_days")]
    destruction_window_days: u64,
    #[serde(default = "default_scheduler_interval_secs")]
    scheduler_interval_secs: u64,
    // Finer than a second, for tests that run weeks of simulated time (wins when set).
    #[serde(default)]
    scheduler_interval_ms: Option<u64>,
}

impl Default for RawKeys {
    fn default() -> Self {
        Self {
            destruction_window_days: default_destruction_window_days(),
            scheduler_interval_secs: default_scheduler_interval_secs(),
            scheduler_interval_ms: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackup {
    #[serde(default = "default_retention_days")]
    retention_days: u64,
    #[serde(default = "default_backup_dir")]
    dir: PathBuf,
    #[serde(default = "default_journal_dir")]
    journal_dir: PathBuf,
    #[serde(default = "default_backup_time")]
    time: String,
    #[serde(default = "default_true")]
    nightly: bool,
}

impl Default for RawBackup {
    fn default() -> Self {
        Self {
            retention_days: default_retention_days(),
            dir: default_backup_dir(),
            journal_dir: default_journal_dir(),
            time: default_backup_time(),
            nightly: true,
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_backup_dir() -> PathBuf {
    PathBuf::from("backups")
}
fn default_journal_dir() -> PathBuf {
    PathBuf::from("journal")
}
fn default_backup_time() -> String {
    "02:00".into()
}

/// `HH:MM` to seconds after midnight.
fn parse_time_of_day(text: &str) -> Option<u64> {
    let (h, m) = text.split_once(':')?;
    let (h, m): (u64, u64) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 3600 + m * 60)
}

fn default_destruction_window_days() -> u64 {
    KmsOptions::default().destruction_window.as_secs() / 86_400
}
fn default_scheduler_interval_secs() -> u64 {
    KmsOptions::default().scheduler_interval.as_secs()
}
fn default_retention_days() -> u64 {
    KmsOptions::default().min_destruction_window.as_secs() / 86_400
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: SocketAddr,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    #[serde(default)]
    allow_cn_identity: bool,
    node_id: Option<String>,
    #[serde(default = "default_audit_path")]
    audit_path: PathBuf,
    #[serde(default = "default_audit_checkpoint_lines")]
    audit_checkpoint_lines: u64,
    #[serde(default = "default_audit_checkpoint_interval_secs")]
    audit_checkpoint_interval_secs: u64,
    #[serde(default = "default_max_message_bytes")]
    max_message_bytes: usize,
    #[serde(default = "default_max_batch_items")]
    max_batch_items: usize,
    #[serde(default = "default_max_context_pairs")]
    max_context_pairs: usize,
    #[serde(default = "default_max_context_bytes")]
    max_context_bytes: usize,
    #[serde(default = "default_max_concurrent_requests")]
    max_concurrent_requests: usize,
    #[serde(default = "default_max_concurrent_password_hashes")]
    max_concurrent_password_hashes: usize,
    #[serde(default = "default_request_timeout_ms")]
    request_timeout_ms: u64,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_handshake_timeout_ms")]
    handshake_timeout_ms: u64,
    #[serde(default = "default_idle_timeout_secs")]
    idle_timeout_secs: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrincipal {
    identity: String,
    tenants: Vec<String>,
    roles: Vec<Role>,
    keys: Option<Vec<String>>,
    // Roles that exclude each other, allowed anyway (logged and audited at every load).
    #[serde(default)]
    dangerous_allow_role_combination: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHsm {
    #[serde(default = "default_module")]
    module: PathBuf,
    token_label: String,
    pin_env: Option<String>,
    pin_file: Option<PathBuf>,
    #[serde(default = "default_sessions")]
    sessions: usize,
    #[serde(default = "default_kek_cache")]
    kek_cache_capacity: usize,
    #[serde(default = "default_retry_secs")]
    retry_secs: u64,
    #[serde(default = "default_inline_calls")]
    inline_calls: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    data_dir: PathBuf,
    #[serde(default = "default_max_open_tenants")]
    max_open_tenants: usize,
    #[serde(default = "default_tenant_cache_bytes")]
    tenant_cache_bytes: u64,
    #[serde(default)]
    backend: RawBackend,
    postgres: Option<RawPostgres>,
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawBackend {
    #[default]
    Sled,
    Postgres,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    url_env: Option<String>,
    url_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    #[serde(default = "default_postgres_namespace")]
    namespace: String,
    #[serde(default = "default_postgres_pool_size")]
    pool_size: usize,
    #[serde(default = "default_postgres_timeout_secs")]
    timeout_secs: u64,
    #[serde(default = "default_postgres_stale_bound_ms")]
    stale_bound_ms: u64,
    #[serde(default = "default_postgres_lease_secs")]
    lease_secs: u64,
    #[serde(default)]
    dangerous_allow_plaintext: bool,
}

fn default_postgres_namespace() -> String {
    "keyfront".into()
}
fn default_postgres_pool_size() -> usize {
    16
}
fn default_postgres_timeout_secs() -> u64 {
    5
}
fn default_postgres_stale_bound_ms() -> u64 {
    1000
}
fn default_postgres_lease_secs() -> u64 {
    5
}

impl RawStorage {
    /// The backend, with the PostgreSQL connection string read from its environment variable
    /// or file (never from the config file itself: it may hold a password).
    fn backend(&self, base: &Path, env: &dyn Env, problems: &mut Vec<ConfigProblem>) -> Backend {
        let postgres = match (&self.backend, &self.postgres) {
            (RawBackend::Sled, _) => return Backend::Sled,
            (RawBackend::Postgres, None) => {
                problems.push(ConfigProblem::PostgresMissing);
                return Backend::Sled;
            }
            (RawBackend::Postgres, Some(postgres)) => postgres,
        };
        let url = match (&postgres.url_env, &postgres.url_file) {
            (Some(var), None) => match env.var(var).filter(|v| !v.is_empty()) {
                Some(url) => Some(url),
                None => {
                    problems.push(ConfigProblem::PostgresUrlEnvUnset(var.clone()));
                    None
                }
            },
            (None, Some(file)) => match read_secret_file(&base.join(file)) {
                Ok(url) => Some(url.to_string()),
                Err(SecretFileProblem::TooOpen(path)) => {
                    problems.push(ConfigProblem::PostgresUrlFileTooOpen(path));
                    None
                }
                Err(SecretFileProblem::Unreadable(path)) => {
                    problems.push(ConfigProblem::PostgresUrlFileUnreadable(path));
                    None
                }
            },
            _ => {
                problems.push(ConfigProblem::PostgresUrlSource);
                None
            }
        };
        if !PostgresOptions::valid_namespace(&postgres.namespace) {
            problems.push(ConfigProblem::PostgresNamespace(postgres.namespace.clone()));
        }
        if postgres.pool_size == 0 {
            problems.push(ConfigProblem::Zero("storage.postgres.pool_size"));
        }
        if postgres.timeout_secs == 0 {
            problems.push(ConfigProblem::Zero("storage.postgres.timeout_secs"));
        }
        // Heartbeats go every quarter of the bound: below 100 ms they would load the server.
        if !(100..=60_000).contains(&postgres.stale_bound_ms) {
            problems.push(ConfigProblem::Range(
                "storage.postgres.stale_bound_ms",
                "100..=60000",
            ));
        }
        if !(2..=600).contains(&postgres.lease_secs) {
            problems.push(ConfigProblem::Range(
                "storage.postgres.lease_secs",
                "2..=600",
            ));
        }
        let ca_file = postgres.ca_file.as_ref().map(|file| base.join(file));
        if let Some(ca_file) = &ca_file {
            if !ca_file.exists() {
                problems.push(ConfigProblem::FileMissing(
                    "storage.postgres.ca_file",
                    ca_file.clone(),
                ));
            }
        }
        match url {
            Some(url) => Backend::Postgres(PostgresOptions {
                url: url.into(),
                ca_file,
                namespace: postgres.namespace.clone(),
                pool_size: postgres.pool_size,
                timeout: Duration::from_secs(postgres.timeout_secs),
                stale_bound: Duration::from_millis(postgres.stale_bound_ms),
                lease_term: Duration::from_secs(postgres.lease_secs),
                dangerous_allow_plaintext: postgres.dangerous_allow_plaintext,
            }),
            None => Backend::Sled,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    #[serde(default = "default_bulk_key_capacity")]
    bulk_key_capacity: usize,
    #[serde(default = "default_bulk_key_ttl_secs")]
    bulk_key_ttl_secs: u64,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            bulk_key_capacity: default_bulk_key_capacity(),
            bulk_key_ttl_secs: default_bulk_key_ttl_secs(),
        }
    }
}

fn default_module() -> PathBuf {
    PathBuf::from("/usr/lib/softhsm/libsofthsm2.so")
}
fn default_sessions() -> usize {
    2
}
fn default_kek_cache() -> usize {
    4096
}
fn default_max_open_tenants() -> usize {
    StoreOptions::default().max_open_tenants.get()
}
fn default_tenant_cache_bytes() -> u64 {
    StoreOptions::default().tenant_cache_bytes
}
fn default_bulk_key_capacity() -> usize {
    100_000
}
fn default_bulk_key_ttl_secs() -> u64 {
    300
}
fn default_retry_secs() -> u64 {
    2
}
fn default_inline_calls() -> bool {
    true
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7443))
}
fn default_audit_checkpoint_lines() -> u64 {
    crate::audit::CheckpointPolicy::default().lines
}
fn default_audit_checkpoint_interval_secs() -> u64 {
    crate::audit::CheckpointPolicy::default().interval.as_secs()
}
fn default_audit_path() -> PathBuf {
    PathBuf::from("audit/audit.log")
}
fn default_max_message_bytes() -> usize {
    Limits::default().max_message_bytes
}
fn default_max_batch_items() -> usize {
    Limits::default().max_batch_items
}
fn default_max_context_pairs() -> usize {
    Limits::default().max_context_pairs
}
fn default_max_context_bytes() -> usize {
    Limits::default().max_context_bytes
}
fn default_max_concurrent_password_hashes() -> usize {
    Limits::default().max_concurrent_password_hashes
}
fn default_max_concurrent_requests() -> usize {
    Limits::default().max_concurrent_requests
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_max_connections() -> usize {
    Limits::default().max_connections
}
fn default_idle_timeout_secs() -> u64 {
    Limits::default().idle_timeout.as_secs()
}

fn default_handshake_timeout_ms() -> u64 {
    u64::try_from(Limits::default().handshake_timeout.as_millis()).unwrap_or(u64::MAX)
}

impl Config {
    /// Reads, parses and validates a config file, resolving the PIN from `env` or its file.
    ///
    /// # Errors
    /// [`ConfigError`], listing every invalid value at once.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Self, ConfigError> {
        Self::load_checking(path, env, true)
    }

    /// [`Config::load`] for the commands that do not serve (`init`, `selfcheck`, `backup`):
    /// the `[server]` section's certificate files need not exist yet (an operator runs the
    /// ceremony before the certificates are issued); everything else is checked the same.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn load_offline(path: &Path, env: &dyn Env) -> Result<Self, ConfigError> {
        Self::load_checking(path, env, false)
    }

    fn load_checking(path: &Path, env: &dyn Env, serving: bool) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_owned(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        raw.validate(base, env, serving)
            .map_err(|problems| ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
    }
}

impl RawConfig {
    fn validate(
        self,
        base: &Path,
        env: &dyn Env,
        serving: bool,
    ) -> Result<Config, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        let module = base.join(&self.hsm.module);
        if !module.exists() {
            problems.push(ConfigProblem::ModuleMissing(module.clone()));
        }
        let label = self.hsm.token_label.as_bytes();
        if label.is_empty() || label.len() > 32 {
            problems.push(ConfigProblem::TokenLabel);
        }
        let pin = match (&self.hsm.pin_env, &self.hsm.pin_file) {
            (Some(var), None) => match env.var(var).filter(|v| !v.is_empty()) {
                Some(pin) => Some(AuthPin::from(pin)),
                None => {
                    problems.push(ConfigProblem::PinEnvUnset(var.clone()));
                    None
                }
            },
            (None, Some(file)) => match read_pin_file(&base.join(file)) {
                Ok(pin) => Some(pin),
                Err(problem) => {
                    problems.push(problem);
                    None
                }
            },
            _ => {
                problems.push(ConfigProblem::PinSource);
                None
            }
        };
        let mut nonzero = |value: usize, name: &'static str| {
            NonZeroUsize::new(value).unwrap_or_else(|| {
                problems.push(ConfigProblem::Zero(name));
                NonZeroUsize::MIN
            })
        };
        let sessions = nonzero(self.hsm.sessions, "hsm.sessions");
        let kek_cache_capacity = nonzero(self.hsm.kek_cache_capacity, "hsm.kek_cache_capacity");
        let max_open_tenants = nonzero(self.storage.max_open_tenants, "storage.max_open_tenants");
        let bulk_key_capacity = nonzero(self.cache.bulk_key_capacity, "cache.bulk_key_capacity");
        let backend = self.storage.backend(base, env, &mut problems);
        if self.cache.bulk_key_ttl_secs == 0 {
            problems.push(ConfigProblem::Zero("cache.bulk_key_ttl_secs"));
        }
        if self.hsm.retry_secs == 0 {
            problems.push(ConfigProblem::Zero("hsm.retry_secs"));
        }
        let client_ca = self
            .server
            .as_ref()
            .map(|server| base.join(&server.client_ca));
        let revocations = self
            .revocations
            .validate(base, client_ca.as_deref(), &mut problems);
        let p = &self.passwords;
        let in_bounds = |memory_kib: u32, iterations: u32, parallelism: u32| {
            (8..=1 << 20).contains(&memory_kib)
                && (1..=16).contains(&iterations)
                && (1..=16).contains(&parallelism)
        };
        if !in_bounds(p.memory_kib, p.iterations, p.parallelism)
            || p.accepted
                .iter()
                .any(|a| !in_bounds(a.memory_kib, a.iterations, a.parallelism))
        {
            problems.push(ConfigProblem::PasswordParams);
        }
        if self.access.max_grant_secs == 0 {
            problems.push(ConfigProblem::Zero("access.max_grant_secs"));
        }
        if self.access.request_ttl_secs == 0 {
            problems.push(ConfigProblem::Zero("access.request_ttl_secs"));
        }
        if self.dual_control.approval_ttl_secs == 0 {
            problems.push(ConfigProblem::Zero("dual_control.approval_ttl_secs"));
        }
        if self.keys.scheduler_interval_secs == 0 {
            problems.push(ConfigProblem::Zero("keys.scheduler_interval_secs"));
        }
        if self.keys.scheduler_interval_ms.is_some_and(|ms| ms < 10) {
            problems.push(ConfigProblem::Range(
                "keys.scheduler_interval_ms",
                "at least 10",
            ));
        }
        let backup_at = parse_time_of_day(&self.backup.time);
        if backup_at.is_none() {
            problems.push(ConfigProblem::BackupTime(self.backup.time.clone()));
        }
        if self.keys.destruction_window_days < self.backup.retention_days {
            problems.push(ConfigProblem::WindowBelowRetention(
                self.keys.destruction_window_days,
                self.backup.retention_days,
            ));
        }
        let server = self
            .server
            .map(|raw| raw.validate(base, serving, &mut problems));
        let principals = validate_principals(self.principals, &mut problems);
        match pin {
            Some(pin) if problems.is_empty() => Ok(Config {
                hsm: Pkcs11Config {
                    module,
                    token_label: self.hsm.token_label,
                    pin,
                    sessions,
                    kek_cache_capacity,
                },
                hsm_retry: Duration::from_secs(self.hsm.retry_secs),
                server,
                principals,
                metrics_listen: self.metrics.map(|m| m.listen),
                revocations,
                access: Access {
                    max_grant: Duration::from_secs(self.access.max_grant_secs),
                    request_ttl: Duration::from_secs(self.access.request_ttl_secs),
                },
                dual_control: DualControl {
                    operations: self.dual_control.operations.into_iter().collect(),
                    approval_ttl: Duration::from_secs(self.dual_control.approval_ttl_secs),
                },
                data_dir: base.join(self.storage.data_dir),
                backup: Backup {
                    dir: Some(base.join(&self.backup.dir)),
                    nightly: self.backup.nightly,
                    at_secs: backup_at.unwrap_or(7200),
                    retention_days: self.backup.retention_days,
                },
                kms: KmsOptions {
                    store: StoreOptions {
                        max_open_tenants,
                        tenant_cache_bytes: self.storage.tenant_cache_bytes,
                        // On PostgreSQL the database's own log is the journal (see
                        // docs/DESIGN.md, "Storage engines"); node-local journals would each
                        // hold only that node's commits.
                        journal_dir: matches!(backend, Backend::Sled)
                            .then(|| base.join(&self.backup.journal_dir)),
                        backend,
                    },
                    bulk_key_capacity: bulk_key_capacity.get(),
                    bulk_key_ttl: Duration::from_secs(self.cache.bulk_key_ttl_secs),
                    inline_hsm_calls: self.hsm.inline_calls,
                    destruction_window: Duration::from_secs(
                        self.keys.destruction_window_days.saturating_mul(86_400),
                    ),
                    min_destruction_window: Duration::from_secs(
                        self.backup.retention_days.saturating_mul(86_400),
                    ),
                    scheduler_interval: match self.keys.scheduler_interval_ms {
                        Some(ms) => Duration::from_millis(ms),
                        None => Duration::from_secs(self.keys.scheduler_interval_secs),
                    },
                    password_params: crate::kms::PasswordParams {
                        memory_kib: self.passwords.memory_kib,
                        iterations: self.passwords.iterations,
                        parallelism: self.passwords.parallelism,
                    },
                    accepted_password_params: self
                        .passwords
                        .accepted
                        .iter()
                        .map(RawPasswordCosts::params)
                        .collect(),
                },
            }),
            _ => Err(problems),
        }
    }
}

impl RawServer {
    /// `serving`: the certificate files must exist (only `serve` reads them).
    fn validate(
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

fn default_node_id() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "keyfront".to_owned())
}

fn validate_principals(
    raw: Vec<RawPrincipal>,
    problems: &mut Vec<ConfigProblem>,
) -> Vec<PrincipalConfig> {
    let mut seen = std::collections::HashSet::new();
    let mut principals = Vec::with_capacity(raw.len());
    for principal in raw {
        let identity = principal.identity;
        if !seen.insert(identity.clone()) {
            problems.push(ConfigProblem::PrincipalDuplicate(identity.clone()));
        }
        if identity.is_empty() || principal.roles.is_empty() || principal.tenants.is_empty() {
            problems.push(ConfigProblem::PrincipalIncomplete(identity.clone()));
            continue;
        }
        let tenants = if principal.tenants == ["*"] {
            if !principal.roles.iter().all(|r| r.may_have_every_tenant()) {
                problems.push(ConfigProblem::PrincipalWildcard(identity.clone()));
            }
            TenantScope::All
        } else {
            TenantScope::Only(parse_names(&identity, principal.tenants, problems))
        };
        let keys = principal
            .keys
            .map(|keys| parse_names(&identity, keys, problems));
        let mut roles = principal.roles;
        roles.sort();
        roles.dedup();
        if let Some((a, b, why)) = conflicting_roles(&roles) {
            if !principal.dangerous_allow_role_combination {
                problems.push(ConfigProblem::RoleCombination(
                    identity.clone(),
                    a.as_str(),
                    b.as_str(),
                    why,
                ));
            }
        }
        principals.push(PrincipalConfig {
            identity,
            tenants,
            roles,
            keys,
        });
    }
    principals
}

fn parse_names<C: FromIterator<Name>>(
    identity: &str,
    names: Vec<String>,
    problems: &mut Vec<ConfigProblem>,
) -> C {
    names
        .into_iter()
        .filter_map(|name| match name.parse() {
            Ok(parsed) => Some(parsed),
            Err(_) => {
                problems.push(ConfigProblem::PrincipalName(identity.to_owned(), name));
                None
            }
        })
        .collect()
}

fn read_pin_file(path: &Path) -> Result<AuthPin, ConfigProblem> {
    match read_secret_file(path) {
        Ok(pin) => Ok(AuthPin::from(pin.to_string())),
        Err(SecretFileProblem::TooOpen(path)) => Err(ConfigProblem::PinFileTooOpen(path)),
        Err(SecretFileProblem::Unreadable(path)) => Err(ConfigProblem::PinFileUnreadable(path)),
    }
}

/// Why a file holding a secret was refused.
enum SecretFileProblem {
    TooOpen(PathBuf),
    Unreadable(PathBuf),
}

/// The first line of a file that only its owner may read (a PIN, a connection string).
fn read_secret_file(path: &Path) -> Result<zeroize::Zeroizing<String>, SecretFileProblem> {
    use std::os::unix::fs::PermissionsExt;

    let metadata =
        std::fs::metadata(path).map_err(|_| SecretFileProblem::Unreadable(path.into()))?;
    if metadata.permissions().mode() & 0o077 != 0 {
        return Err(SecretFileProblem::TooOpen(path.into()));
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).map_err(|_| SecretFileProblem::Unreadable(path.into()))?,
    );
    let secret = text.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err(SecretFileProblem::Unreadable(path.into()));
    }
    Ok(zeroize::Zeroizing::new(secret.to_owned()))
}
