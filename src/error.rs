//! The top-level error of keyfront's domain, composing each layer's error, and its single
//! mapping to `tonic::Status`.

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
    /// A backup failed or was refused.
    #[error(transparent)]
    Backup(#[from] crate::backup::Error),
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

impl From<Error> for tonic::Status {
    /// The one mapping from errors to gRPC status codes (ARCHITECTURE.md, "Status codes").
    ///
    /// Policy: the caller's own mistakes get a specific code and a message that names the rule;
    /// every decryption failure is one opaque INVALID_ARGUMENT; an HSM that cannot be reached is
    /// UNAVAILABLE (retry); a store that fails its integrity checks is DATA_LOSS (counted, and
    /// its details logged); everything else is INTERNAL with a generic message, its details
    /// logged once here and never sent.
    fn from(error: Error) -> Self {
        match error {
            Error::Decrypt => Self::invalid_argument("decryption failed"),
            Error::Hsm(e) if e.is_unavailable() => Self::unavailable("HSM unavailable; retry"),
            // What the token cannot do (e.g. RSA-OAEP with SHA-256 on SoftHSM 2.6): asking
            // again will not help, another algorithm may.
            Error::Hsm(hsm::Error::Unsupported(what)) => {
                Self::failed_precondition(format!("the HSM does not support {what}"))
            }
            Error::KeyNotFound(name) => Self::not_found(format!("key {name} not found")),
            Error::PermissionDenied => Self::permission_denied("permission denied"),
            Error::PurposeMismatch { key, purpose } => Self::permission_denied(format!(
                "key {key} has purpose {}, which does not allow this operation",
                purpose.name()
            )),
            Error::Store(keystore::Error::AlreadyExists(what)) => {
                Self::already_exists(format!("{what} already exists"))
            }
            Error::Store(
                keystore::Error::TenantNotFound(_) | keystore::Error::TenantDestroyed(_),
            )
            | Error::TenantNotFound(_) => Self::not_found("tenant not found"),
            Error::Store(keystore::Error::Unavailable(reason)) => {
                // The reason names the server's state (timeout, connection refused), never a
                // connection string or a record; logged, not sent.
                tracing::warn!(%reason, "key store unavailable");
                Self::unavailable("key store unavailable; nothing was written; retry")
            }
            Error::Store(keystore::Error::StorageFull) => {
                tracing::warn!("key store write failed: the disk is full");
                Self::resource_exhausted(
                    "the key store's disk is full; the request was not completed; retry once space is freed",
                )
            }
            Error::Store(keystore::Error::Locked(database)) => {
                tracing::error!(%database, "a key store database is locked by another process");
                Self::unavailable("key store busy; the request was not completed; retry")
            }
            Error::Store(keystore::Error::Io(e)) => {
                // The disk or the files failed under the store, not the request: retryable.
                tracing::error!(error = %e, "key store I/O failed");
                Self::unavailable("key store I/O failed; the request was not completed; retry")
            }
            Error::Store(
                error @ (keystore::Error::Integrity { .. } | keystore::Error::Rollback(_)),
            ) => {
                // Damage, not a bug: a record altered, moved, deleted or rolled back. Clients
                // and load balancers tell DATA_LOSS apart from INTERNAL; the details (which
                // record, which check) are for operators and stay in the log.
                let system = matches!(
                    &error,
                    keystore::Error::Integrity { database, .. } if database == "system"
                );
                let database = if system { "system" } else { "tenant" };
                crate::metrics::global().store_integrity_failure(database);
                tracing::error!(alert = "store_integrity", %error, "a key store failed its integrity check");
                Self::data_loss(if system {
                    "the system key store failed its integrity check (damaged or rolled back); \
                     nothing was done; operators: see the server log"
                } else {
                    "this tenant's key store failed its integrity check (damaged or rolled back); \
                     nothing was done; operators: see the server log"
                })
            }
            Error::Store(keystore::Error::Stale(_)) => Self::aborted(
                "the tenant changed on another node while this request ran; nothing was written; retry",
            ),
            Error::Store(keystore::Error::NotScheduled(_)) => failed_precondition(
                "the tenant is not scheduled for destruction",
                "NOT_SCHEDULED",
            ),
            Error::TooLarge => Self::resource_exhausted("input too large"),
            Error::VersionsExhausted => failed_precondition(
                "no more versions can be created for this key",
                "VERSIONS_EXHAUSTED",
            ),
            Error::VersionNotFound { key, version } => {
                Self::not_found(format!("key {key} has no version {version}"))
            }
            Error::KeyState { reason, message } => failed_precondition(&message, reason),
            Error::InvalidArgument(message) => Self::invalid_argument(message),
            Error::AuditUnavailable => Self::unavailable("audit log unavailable; nothing was done"),
            Error::NotLeader => Self::unavailable(
                "this node does not hold the cluster's leader lease; nothing was done: retry \
                 (another node will take it), or send the call to the leader",
            ),
            Error::Backup(crate::backup::Error::Refused(message)) => {
                failed_precondition(&message, "BACKUP_REFUSED")
            }
            Error::Backup(crate::backup::Error::Hsm(e)) if e.is_unavailable() => {
                Self::unavailable("HSM unavailable; retry")
            }
            Error::NotFound(message) => Self::not_found(message),
            Error::PermissionDeniedBecause(message) => Self::permission_denied(message),
            error => {
                tracing::error!(%error, "internal error");
                Self::internal("internal error")
            }
        }
    }
}

/// FAILED_PRECONDITION with a `google.rpc.ErrorInfo` whose `reason` machines can switch on.
pub fn failed_precondition(message: &str, reason: &str) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt};
    tonic::Status::with_error_details(
        tonic::Code::FailedPrecondition,
        message,
        ErrorDetails::with_error_info(reason, "keyfront", std::collections::HashMap::new()),
    )
}
