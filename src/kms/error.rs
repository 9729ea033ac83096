//! The domain's error: what a keyfront operation can fail with, composing the errors of the
//! layers below (HSM, store, formats). The one mapping to gRPC status codes is in
//! `service::status`, the only place that knows gRPC.

use crate::ids::Name;
use crate::keystore::Purpose;
use crate::{crypto, hsm, keystore};

/// Everything a domain operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A ciphertext, data key or sealed secret did not decrypt: wrong tenant, key, context,
    /// type, or altered bytes. One opaque variant by design.
    #[error("decryption failed")]
    Decrypt,
    /// The HSM failed.
    #[error(transparent)]
    Hsm(#[from] hsm::Error),
    /// The caller may not use the key named in a blob's header.
    #[error("permission denied")]
    PermissionDenied,
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
    /// The key has no such version.
    #[error("key {key} has no version {version}")]
    VersionNotFound {
        /// The key.
        key: Name,
        /// The version asked for.
        version: u32,
    },
    /// A version's state or its key's policy refuses the operation (FAILED_PRECONDITION with
    /// this reason in `ErrorInfo`).
    #[error("{message}")]
    KeyState {
        /// Machine-readable: VERSION_DISABLED, BELOW_MIN_DECRYPTION_VERSION, …
        reason: &'static str,
        /// For people: what is refused and what to do.
        message: String,
    },
    /// Something named by the request does not exist (NOT_FOUND), with a message to show.
    #[error("{0}")]
    NotFound(String),
    /// Refused for a reason that is safe to tell (PERMISSION_DENIED).
    #[error("{0}")]
    PermissionDeniedBecause(String),
    /// A request field is invalid (INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(String),
    /// The audit log cannot take a line: nothing is done (UNAVAILABLE).
    #[error("audit log unavailable")]
    AuditUnavailable,
    /// A singleton (master key rotation) asked of a node that does not hold the leader
    /// lease (UNAVAILABLE: another node runs it, or will).
    #[error("this node does not hold the leader lease")]
    NotLeader,
}

impl From<crypto::Error> for Error {
    fn from(error: crypto::Error) -> Self {
        match error {
            crypto::Error::Decrypt => Self::Decrypt,
            crypto::Error::TooLarge => Self::TooLarge,
        }
    }
}
