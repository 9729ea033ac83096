//! Configuration: raw TOML into a validated [`Config`], reporting every problem at once.
//!
//! Relative paths are resolved against the config file's directory. The HSM PIN never comes from
//! the file itself: `hsm.pin_env` names an environment variable, or `hsm.pin_file` a file that
//! only its owner may read.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cryptoki::types::AuthPin;
use serde::Deserialize;

mod hsm;
mod policies;
mod principals;
mod revocations;
mod server;
mod storage;

use hsm::{RawHsm, SecretFileProblem, read_pin_file, read_secret_file};
pub use policies::{Access, Backup, DualControl, DualOperation};
use policies::{
    RawAccess, RawBackup, RawDualControl, RawKeys, RawPasswordCosts, RawPasswords,
    parse_time_of_day,
};
pub use principals::{PrincipalConfig, Role, TenantScope, conflicting_roles};
use principals::{RawPrincipal, validate_principals};
use revocations::RawRevocations;
pub use revocations::{Crl, Revocations, Serial};
pub use server::{Limits, ServerConfig};
use server::{RawMetrics, RawServer};
use storage::{RawCache, RawStorage};

use crate::hsm::pkcs11::Pkcs11Config;
use crate::keystore::{Backend, StoreOptions};
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
