//! Configuration: raw TOML into a validated [`Config`], reporting every problem at once.
//!
//! Relative paths are resolved against the config file's directory. The HSM PIN never comes from
//! the file itself: `hsm.pin_env` names an environment variable, or `hsm.pin_file` a file that
//! only its owner may read.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cryptoki::types::AuthPin;
use serde::Deserialize;

use crate::hsm::pkcs11::Pkcs11Config;
use crate::keystore::StoreOptions;
use crate::kms::KmsOptions;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// How to reach the HSM (PIN resolved).
    pub hsm: Pkcs11Config,
    /// Where the databases live.
    pub data_dir: PathBuf,
    /// Domain tuning.
    pub kms: KmsOptions,
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
    /// A PKCS#11 token label is 1 to 32 bytes.
    #[error("hsm.token_label: must be 1 to 32 bytes")]
    TokenLabel,
    /// A count that must be at least 1 is 0.
    #[error("{0}: must be at least 1")]
    Zero(&'static str),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hsm: RawHsm,
    storage: RawStorage,
    #[serde(default)]
    cache: RawCache,
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    data_dir: PathBuf,
    #[serde(default = "default_max_open_tenants")]
    max_open_tenants: usize,
    #[serde(default = "default_tenant_cache_bytes")]
    tenant_cache_bytes: u64,
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
    1024
}
fn default_tenant_cache_bytes() -> u64 {
    256 * 1024
}
fn default_bulk_key_capacity() -> usize {
    100_000
}
fn default_bulk_key_ttl_secs() -> u64 {
    300
}

impl Config {
    /// Reads, parses and validates a config file, resolving the PIN from `env` or its file.
    ///
    /// # Errors
    /// [`ConfigError`], listing every invalid value at once.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_owned(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        raw.validate(base, env)
            .map_err(|problems| ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
    }
}

impl RawConfig {
    fn validate(self, base: &Path, env: &dyn Env) -> Result<Config, Vec<ConfigProblem>> {
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
        if self.cache.bulk_key_ttl_secs == 0 {
            problems.push(ConfigProblem::Zero("cache.bulk_key_ttl_secs"));
        }
        match pin {
            Some(pin) if problems.is_empty() => Ok(Config {
                hsm: Pkcs11Config {
                    module,
                    token_label: self.hsm.token_label,
                    pin,
                    sessions,
                    kek_cache_capacity,
                },
                data_dir: base.join(self.storage.data_dir),
                kms: KmsOptions {
                    store: StoreOptions {
                        max_open_tenants,
                        tenant_cache_bytes: self.storage.tenant_cache_bytes,
                    },
                    bulk_key_capacity: bulk_key_capacity.get(),
                    bulk_key_ttl: Duration::from_secs(self.cache.bulk_key_ttl_secs),
                },
            }),
            _ => Err(problems),
        }
    }
}

fn read_pin_file(path: &Path) -> Result<AuthPin, ConfigProblem> {
    use std::os::unix::fs::PermissionsExt;

    let metadata =
        std::fs::metadata(path).map_err(|_| ConfigProblem::PinFileUnreadable(path.into()))?;
    if metadata.permissions().mode() & 0o077 != 0 {
        return Err(ConfigProblem::PinFileTooOpen(path.into()));
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).map_err(|_| ConfigProblem::PinFileUnreadable(path.into()))?,
    );
    let pin = text.trim_end_matches(['\r', '\n']);
    if pin.is_empty() {
        return Err(ConfigProblem::PinFileUnreadable(path.into()));
    }
    Ok(AuthPin::from(pin.to_owned()))
}
