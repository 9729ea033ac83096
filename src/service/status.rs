//! The one mapping from keyfront's errors to gRPC status codes (ARCHITECTURE.md, "Status
//! codes"): the domain's [`crate::kms::Error`] and the backup layer's [`crate::backup::Error`]. Nothing below
//! `service/` knows gRPC.

use tonic::Status;

use crate::kms::Error;
use crate::{backup, hsm, keystore};

impl From<Error> for Status {
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
            Error::NotFound(message) => Self::not_found(message),
            Error::PermissionDeniedBecause(message) => Self::permission_denied(message),
            error => {
                tracing::error!(%error, "internal error");
                Self::internal("internal error")
            }
        }
    }
}

impl From<backup::Error> for Status {
    /// A backup refused for a reason the caller can act on is FAILED_PRECONDITION; an HSM
    /// that cannot be reached is UNAVAILABLE; the store's failures map as the domain's do;
    /// anything else is INTERNAL, logged here.
    fn from(error: backup::Error) -> Self {
        match error {
            backup::Error::Refused(message) => failed_precondition(&message, "BACKUP_REFUSED"),
            backup::Error::Hsm(e) if e.is_unavailable() => {
                Self::unavailable("HSM unavailable; retry")
            }
            backup::Error::Store(e) => Error::Store(e).into(),
            error => {
                tracing::error!(%error, "internal error");
                Self::internal("internal error")
            }
        }
    }
}

/// FAILED_PRECONDITION with a `google.rpc.ErrorInfo` whose `reason` machines can switch on.
pub fn failed_precondition(message: &str, reason: &str) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    Status::with_error_details(
        tonic::Code::FailedPrecondition,
        message,
        ErrorDetails::with_error_info(reason, "keyfront", std::collections::HashMap::new()),
    )
}
