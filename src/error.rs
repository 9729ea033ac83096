//! The top-level error of keyfront's domain, composing each layer's error.
//!
//! The single mapping to `tonic::Status` lives here too once the gRPC service exists.

use crate::ids::Name;
use crate::keystore::Purpose;
use crate::{config, crypto, hsm, keystore};

/// Everything a domain operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A ciphertext, data key or sealed secret did not decrypt: wrong tenant, key, context,
    /// type, or altered bytes. One opaque variant by design.
    #[error("decryption failed")]
    Decrypt,
    /// The HSM failed.
    #[error(transparent)]
    Hsm(#[from] hsm::Error),
    /// The tenant has no key of that name.
    #[error("key {0} not found")]
    KeyNotFound(Name),
    /// The key's purpose does not allow the operation.
    #[error("key {key} has purpose {purpose:?}, which does not allow this operation")]
    PurposeMismatch {
        /// The key.
        key: Name,
        /// Its purpose.
        purpose: Purpose,
    },
    /// Storage failed or refused a record.
    #[error(transparent)]
    Store(#[from] keystore::Error),
    /// No tenant of that name.
    #[error("tenant {0} not found")]
    TenantNotFound(Name),
    /// An input is larger than the formats can carry.
    #[error("input too large")]
    TooLarge,
    /// A key reached u32::MAX versions.
    #[error("no more versions can be created for this key")]
    VersionsExhausted,
}

impl From<crypto::Error> for Error {
    fn from(error: crypto::Error) -> Self {
        match error {
            crypto::Error::Decrypt => Self::Decrypt,
            crypto::Error::TooLarge => Self::TooLarge,
        }
    }
}
