//! `[storage]` (sled or PostgreSQL) and `[cache]`: where the keys are stored, and how much of
//! them stays in memory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::keystore::{Backend, PostgresOptions, StoreOptions};

use super::{ConfigProblem, Env, SecretFileProblem, read_secret_file};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStorage {
    pub(super) data_dir: PathBuf,
    #[serde(default = "default_max_open_tenants")]
    pub(super) max_open_tenants: usize,
    #[serde(default = "default_tenant_cache_bytes")]
    pub(super) tenant_cache_bytes: u64,
    #[serde(default)]
    pub(super) backend: RawBackend,
    pub(super) postgres: Option<RawPostgres>,
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawBackend {
    #[default]
    Sled,
    Postgres,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPostgres {
    pub(super) url_env: Option<String>,
    pub(super) url_file: Option<PathBuf>,
    pub(super) ca_file: Option<PathBuf>,
    #[serde(default = "default_postgres_namespace")]
    pub(super) namespace: String,
    #[serde(default = "default_postgres_pool_size")]
    pub(super) pool_size: usize,
    #[serde(default = "default_postgres_timeout_secs")]
    pub(super) timeout_secs: u64,
    #[serde(default = "default_postgres_stale_bound_ms")]
    pub(super) stale_bound_ms: u64,
    #[serde(default = "default_postgres_lease_secs")]
    pub(super) lease_secs: u64,
    #[serde(default)]
    pub(super) dangerous_allow_plaintext: bool,
}

pub(super) fn default_postgres_namespace() -> String {
    "keyfront".into()
}

pub(super) fn default_postgres_pool_size() -> usize {
    16
}

pub(super) fn default_postgres_timeout_secs() -> u64 {
    5
}

pub(super) fn default_postgres_stale_bound_ms() -> u64 {
    1000
}

pub(super) fn default_postgres_lease_secs() -> u64 {
    5
}

impl RawStorage {
    /// The backend, with the PostgreSQL connection string read from its environment variable
    /// or file (never from the config file itself: it may hold a password).
    pub(super) fn backend(
        &self,
        base: &Path,
        env: &dyn Env,
        problems: &mut Vec<ConfigProblem>,
    ) -> Backend {
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
pub(super) struct RawCache {
    #[serde(default = "default_bulk_key_capacity")]
    pub(super) bulk_key_capacity: usize,
    #[serde(default = "default_bulk_key_ttl_secs")]
    pub(super) bulk_key_ttl_secs: u64,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            bulk_key_capacity: default_bulk_key_capacity(),
            bulk_key_ttl_secs: default_bulk_key_ttl_secs(),
        }
    }
}

pub(super) fn default_max_open_tenants() -> usize {
    StoreOptions::default().max_open_tenants.get()
}

pub(super) fn default_tenant_cache_bytes() -> u64 {
    StoreOptions::default().tenant_cache_bytes
}

pub(super) fn default_bulk_key_capacity() -> usize {
    100_000
}

pub(super) fn default_bulk_key_ttl_secs() -> u64 {
    300
}
