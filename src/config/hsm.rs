//! `[hsm]`: the PKCS#11 module, the token, the PIN (from the environment or a private file,
//! never from the config), sessions and the KEK handle cache.

use std::path::{Path, PathBuf};

use cryptoki::types::AuthPin;
use serde::Deserialize;

use super::ConfigProblem;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHsm {
    #[serde(default = "default_module")]
    pub(super) module: PathBuf,
    pub(super) token_label: String,
    pub(super) pin_env: Option<String>,
    pub(super) pin_file: Option<PathBuf>,
    #[serde(default = "default_sessions")]
    pub(super) sessions: usize,
    #[serde(default = "default_kek_cache")]
    pub(super) kek_cache_capacity: usize,
    #[serde(default = "default_retry_secs")]
    pub(super) retry_secs: u64,
    #[serde(default = "default_inline_calls")]
    pub(super) inline_calls: bool,
}

pub(super) fn default_module() -> PathBuf {
    PathBuf::from("/usr/lib/softhsm/libsofthsm2.so")
}

pub(super) fn default_sessions() -> usize {
    2
}

pub(super) fn default_kek_cache() -> usize {
    4096
}

pub(super) fn default_retry_secs() -> u64 {
    2
}

pub(super) fn default_inline_calls() -> bool {
    true
}

pub(super) fn read_pin_file(path: &Path) -> Result<AuthPin, ConfigProblem> {
    match read_secret_file(path) {
        Ok(pin) => Ok(AuthPin::from(pin.to_string())),
        Err(SecretFileProblem::TooOpen(path)) => Err(ConfigProblem::PinFileTooOpen(path)),
        Err(SecretFileProblem::Unreadable(path)) => Err(ConfigProblem::PinFileUnreadable(path)),
    }
}

/// Why a file holding a secret was refused.
pub(super) enum SecretFileProblem {
    TooOpen(PathBuf),
    Unreadable(PathBuf),
}

/// The first line of a file that only its owner may read (a PIN, a connection string).
pub(super) fn read_secret_file(
    path: &Path,
) -> Result<zeroize::Zeroizing<String>, SecretFileProblem> {
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
