//! Durable state: the system database and one database per tenant.
//!
//! Where they live is the engine's business (`engine.rs`): sled under `data_dir` on a single
//! node — `system/` (tenants, their database heads, tombstones) and `tenants/<tenant-id>/`
//! (keys, versions, wrapped KEKs and bulk keys) — or PostgreSQL schemas shared by a cluster
//! (`postgres.rs`). Every record is MAC'd
//! (`record.rs`); every tenant database has a head (sequence + digest of all its records)
//! anchored in the system database, so altering, moving, deleting or rolling back records is
//! detected when the database is opened. Each operation has one commit point, flushed before it
//! returns; orphans of a crash are collected at start.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::{KeyId, KeyVersion, Name, TenantId};

mod anchors;
pub mod backup;
pub mod changes;
mod engine;
pub mod journal;
mod layout;
pub mod lease;
mod postgres;
mod record;
mod system;
mod system_records;
mod tenant;

pub use anchors::TenantHead;
pub use journal::{Journal, JournalEntry};
pub use postgres::PostgresOptions;
pub use record::{MAC_LEN, RecordMac, SCHEMA_VERSION};
pub use system::{KeyStore, PendingDestruction, StoreOptions};
pub use tenant::TenantDb;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tenant or key with that name exists already.
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    /// The storage settings are unusable (which one, never its value).
    #[error("invalid storage setting: {0}")]
    Config(&'static str),
    /// A record could not be encoded or decoded.
    #[error("record encoding failed")]
    Encoding,
    /// A record or database failed its integrity check: altered, moved, deleted or missing.
    #[error("integrity check failed in {database}: {reason}")]
    Integrity {
        /// `system` or the tenant id.
        database: String,
        /// What did not match.
        reason: &'static str,
    },
    /// A filesystem operation failed (a full disk is [`Error::StorageFull`] instead).
    #[error("storage I/O failed: {0}")]
    Io(std::io::Error),
    /// Another process holds the database's lock (a second keyfront on one data directory).
    #[error(
        "{0} is in use by another process (its lock is held): is keyfront already running on this data directory? Stop it first, or use another data directory"
    )]
    Locked(String),
    /// The disk under the store is full: the write was not completed (and taken back where
    /// it reached memory); retry once space is freed.
    #[error("the store's disk is full")]
    StorageFull,
    /// A tenant database is older than the system database says it must be.
    #[error("tenant database {0} is older than its last commit (rolled back?)")]
    Rollback(TenantId),
    /// PostgreSQL refused an operation (its message; never holds record values).
    #[error("PostgreSQL error: {0}")]
    Postgres(String),
    /// sled failed (a full disk is [`Error::StorageFull`] instead).
    #[error("database error: {0}")]
    Sled(sled::Error),
    /// Another node committed to this tenant since this node read it: nothing was written;
    /// the next request reads it again.
    #[error("tenant {0} changed on another node")]
    Stale(TenantId),
    /// The store was written under a different storage key (another HSM token).
    #[error("{0} belongs to another HSM token (storage key mismatch)")]
    StorageKeyMismatch(String),
    /// The store's server cannot be reached now (PostgreSQL down, timed out, out of
    /// connections): nothing was written; retry.
    #[error("key store unavailable: {0}")]
    Unavailable(String),
    /// The tenant was destroyed; its tombstone stays.
    #[error("tenant {0} was destroyed")]
    TenantDestroyed(TenantId),
    /// No tenant with that id.
    #[error("tenant {0} not found")]
    TenantNotFound(TenantId),
    /// The store was written by a newer keyfront, whose key layout this build does not know.
    #[error(
        "the store follows key layout {found}; this keyfront knows layouts up to {known} (a newer keyfront wrote it)"
    )]
    NewerLayout {
        /// The layout the store follows.
        found: u32,
        /// The newest layout this build knows.
        known: u32,
    },
    /// The tenant's destruction is not scheduled.
    #[error("tenant {0} is not scheduled for destruction")]
    NotScheduled(TenantId),
}

// A full disk is told apart here, once, whichever layer met it (sled, the key journal).
impl From<sled::Error> for Error {
    fn from(error: sled::Error) -> Self {
        match error {
            sled::Error::Io(io) => io.into(),
            other => Self::Sled(other),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(error: std::io::Error) -> Self {
        if engine::is_disk_full(&error) {
            Self::StorageFull
        } else {
            Self::Io(error)
        }
    }
}

/// Where the authoritative store lives.
#[derive(Clone, Debug, Default)]
pub enum Backend {
    /// sled databases under the data directory: one node.
    #[default]
    Sled,
    /// A PostgreSQL database shared by the nodes of a cluster.
    Postgres(PostgresOptions),
}

/// The engine `options` name, and whether other nodes share it.
fn open_engine(
    data_dir: &Path,
    options: &StoreOptions,
) -> Result<(Arc<dyn engine::Engine>, bool), Error> {
    Ok(match &options.backend {
        Backend::Sled => (
            Arc::new(engine::SledEngine::open(
                data_dir,
                options.tenant_cache_bytes,
            )?),
            false,
        ),
        Backend::Postgres(postgres) => (Arc::new(postgres::PostgresEngine::open(postgres)?), true),
    })
}

/// What a key may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Purpose {
    /// Encrypt, Decrypt, ReEncrypt and data keys.
    Data,
    /// SealSecret, UnsealSecret, HashPassword and VerifyPassword.
    Secrets,
    /// GenerateMac and VerifyMac with this algorithm; each version's key is an HMAC key
    /// wrapped under the MWK (no bulk key).
    Mac(crate::hsm::MacAlgorithm),
    /// Sign and Verify with this algorithm, GetPublicKey; each version's private key was
    /// generated in the HSM and is stored wrapped under the MWK, its public key (SPKI DER) in
    /// the version's `bulk_key` field.
    Sign(crate::hsm::SignAlgorithm),
}

impl Purpose {
    /// The name the API uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Data => "DATA",
            Self::Secrets => "SECRETS",
            Self::Mac(_) => "MAC",
            Self::Sign(_) => "SIGN",
        }
    }
}

impl std::fmt::Display for Purpose {
    /// The purpose and its algorithm as people read them: `DATA`, `MAC HMAC-SHA-256`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::hsm::{MacAlgorithm, SignAlgorithm};
        let algorithm = match self {
            Self::Data | Self::Secrets => None,
            Self::Mac(MacAlgorithm::HmacSha256) => Some("HMAC-SHA-256"),
            Self::Mac(MacAlgorithm::HmacSha512) => Some("HMAC-SHA-512"),
            Self::Sign(SignAlgorithm::EcdsaP256Sha256) => Some("ECDSA P-256"),
            Self::Sign(SignAlgorithm::EcdsaP384Sha384) => Some("ECDSA P-384"),
            Self::Sign(SignAlgorithm::RsaPss3072Sha256) => Some("RSA-PSS 3072"),
        };
        match algorithm {
            Some(algorithm) => write!(f, "{} {algorithm}", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

/// The state of a key version. Only [`VersionState::Enabled`] versions encrypt or decrypt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VersionState {
    /// Usable for encryption (if primary) and decryption.
    Enabled,
    /// Refused for everything until enabled again; nothing is lost.
    Disabled,
    /// Refused like a disabled version; destroyed at `at` (seconds since the Unix epoch)
    /// unless the destruction is cancelled first.
    DestroyScheduled {
        /// When the scheduler destroys it.
        at: u64,
        /// Whether it was disabled before (a cancellation restores that).
        was_disabled: bool,
    },
    /// Its KEK and bulk-key blobs are erased: what it protected cannot be decrypted any more.
    Destroyed {
        /// When it was destroyed.
        at: u64,
    },
}

/// What officers set on a key (UpdateKeyPolicy).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPolicy {
    /// Versions below this refuse to decrypt (0 or 1: every version may).
    pub min_decryption_version: u32,
    /// Rotate when the primary is older than this many seconds (`None`: never by age).
    pub rotation_period_secs: Option<u64>,
    /// Pending window of a scheduled destruction in seconds (`None`: the configured default).
    pub destruction_window_secs: Option<u64>,
    /// Most HSM encryptions per version's KEK (`None`: `kms::DEFAULT_MAX_KEK_USES`).
    pub max_kek_uses: Option<u64>,
    /// Most bulk-key encryptions per version (`None`: `kms::DEFAULT_MAX_BULK_USES`).
    pub max_bulk_uses: Option<u64>,
}

/// A tenant, as the system database holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    /// Immutable random id.
    pub id: TenantId,
    /// The name users type.
    pub name: Name,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    /// Revision of this record, for compare-and-swap across nodes.
    pub generation: u64,
    /// When the tenant is destroyed (seconds since the Unix epoch), if DestroyTenant scheduled
    /// it; until then it is refused but can be restored.
    pub destroy_at: Option<u64>,
}

/// A key, as its tenant database holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Immutable random id.
    pub id: KeyId,
    /// The name users type.
    pub name: Name,
    /// What it may be used for.
    pub purpose: Purpose,
    /// The version new encryptions use; only rotation moves it.
    pub primary: KeyVersion,
    /// The highest version that exists.
    pub latest: KeyVersion,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    /// Revision of this record, for compare-and-swap across nodes.
    pub generation: u64,
    /// Its policy.
    pub policy: KeyPolicy,
}

/// One version of a key: its KEK (wrapped under an MWK) and bulk key (encrypted by the KEK).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// The version number.
    pub version: KeyVersion,
    /// Its state.
    pub state: VersionState,
    /// `WrappedKek::to_bytes`.
    pub kek: Vec<u8>,
    /// A BULK_KEY blob (`crypto::BlobType::BulkKey`); empty for a MAC key; the public key
    /// (SubjectPublicKeyInfo DER) for a signing key. (One field for the three keeps the
    /// stored layout of existing records: postcard encodes fields by position.)
    pub bulk_key: Vec<u8>,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    /// HSM encryptions under its KEK reserved so far (never fewer than were made).
    pub reserved_kek_uses: u64,
    /// Bulk-key encryptions reserved so far (never fewer than were made).
    pub reserved_bulk_uses: u64,
}

/// The journal of a master key rotation: the generation every KEK blob moves to, and the last
/// tenant whose blobs were re-wrapped (tenants go in id order), so a crash resumes after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MwkRotation {
    /// The new MWK generation.
    pub to: u32,
    /// The last tenant done.
    pub cursor: Option<TenantId>,
    /// When it started, seconds since the Unix epoch.
    pub started_at: u64,
}

/// A support principal's request for access to one tenant, and what became of it, as the
/// system database holds it. Times are seconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    /// Random id (hex), what the support principal passes as `grant_id`.
    pub id: String,
    /// The tenant's name, as asked.
    pub tenant: Name,
    /// The tenant's id: a tenant re-created under the name is not covered.
    pub tenant_id: TenantId,
    /// The support principal that asked; the only one that may act under it.
    pub requested_by: String,
    /// Why, in the requester's words.
    pub reason: String,
    /// KeyService RPC names it allows.
    pub operations: Vec<String>,
    /// Key names it allows.
    pub keys: Vec<Name>,
    /// How long it lasts once approved.
    pub duration_secs: u64,
    /// When it was asked for.
    pub requested_at: u64,
    /// After this a pending request can no longer be approved.
    pub request_expires_at: u64,
    /// Where it stands.
    pub state: GrantState,
    /// The tenant-admin that approved or denied it.
    pub decided_by: Option<String>,
    /// When.
    pub decided_at: Option<u64>,
    /// Set on approval: the grant ends then.
    pub expires_at: Option<u64>,
    /// Who revoked it.
    pub revoked_by: Option<String>,
    /// When.
    pub revoked_at: Option<u64>,
}

/// Where a support grant stands (expiry is judged against the clock, not stored).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GrantState {
    /// Waits for a tenant-admin.
    Pending,
    /// Approved: active until `expires_at`.
    Approved,
    /// Denied by a tenant-admin.
    Denied,
    /// Ended before its time.
    Revoked,
}

/// When a principal was last authorized, and the expiry of the certificate it used then.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastUse {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// The certificate's notAfter, seconds since the Unix epoch (0: unknown).
    pub certificate_not_after: u64,
}

/// A mutation's response kept under its caller's request_id, so a retry, also after a
/// restart or on another node, gets the first call's answer instead of a second change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoneRequest {
    /// The RPC it answered (a request_id reused for another RPC is refused).
    pub rpc: String,
    /// The encoded response message.
    pub response: Vec<u8>,
    /// When, seconds since the Unix epoch.
    pub at: u64,
}

/// An operation waiting for a second officer (dual control), as the system database holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    /// Random id (hex), what the approver names.
    pub id: String,
    /// What will be done once approved.
    pub operation: PendingOperation,
    /// The officer who asked.
    pub requested_by: String,
    /// When, seconds since the Unix epoch.
    pub requested_at: u64,
    /// After this, it can no longer be approved.
    pub expires_at: u64,
    /// Whether it was carried out.
    pub state: ApprovalState,
}

/// An operation under dual control, with its parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PendingOperation {
    /// DestroyTenant.
    DestroyTenant {
        /// The tenant.
        tenant: Name,
    },
    /// ScheduleKeyVersionDestruction.
    ScheduleKeyVersionDestruction {
        /// The tenant.
        tenant: Name,
        /// The key.
        key: Name,
        /// The version.
        version: u32,
    },
    /// RotateMasterKey.
    RotateMasterKey,
    /// UpdateKeyPolicy that raises min_decryption_version (the whole update waits).
    UpdateKeyPolicy {
        /// The tenant.
        tenant: Name,
        /// The key.
        key: Name,
        /// The update's fields, as in `kms::PolicyUpdate`.
        min_decryption_version: Option<u32>,
        /// Rotation period, seconds.
        rotation_period_secs: Option<u64>,
        /// Destruction window, seconds.
        destruction_window_secs: Option<u64>,
        /// KEK use limit.
        max_kek_uses: Option<u64>,
        /// Bulk-key use limit.
        max_bulk_uses: Option<u64>,
    },
    /// ImportKeyMaterial (appended last: stored approvals are positional).
    ImportKeyMaterial {
        /// The tenant.
        tenant: Name,
        /// The key.
        key: Name,
        /// The import token of the parameters the material was wrapped for.
        token: String,
        /// The material as the caller wrapped it to the HSM's import key (never in clear).
        material: Vec<u8>,
        /// The purpose for a new key.
        purpose: Option<Purpose>,
        /// When the material expires.
        expires_at: Option<u64>,
        /// Whether generated rotation may follow.
        allow_generated_rotation: bool,
        /// The material's check value when it was asked for: what the second officer
        /// compares with the key owner's, and what the import must find again.
        key_check_value: crate::hsm::KeyCheckValue,
    },
}

/// Where an approval stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApprovalState {
    /// Waiting for a second officer.
    Pending,
    /// Approved and carried out.
    Executed {
        /// The approving officer.
        approved_by: String,
        /// When, seconds since the Unix epoch.
        at: u64,
    },
}

/// What makes a key imported (BYOK), as its tenant database holds it beside the key record
/// (a record of its own: key and version records are postcard, whose fields are positional).
/// A key without one holds generated material only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRecord {
    /// Whether RotateKey and the scheduler may add versions of generated material.
    pub allow_generated_rotation: bool,
    /// The versions made from imported material, in version order.
    pub versions: Vec<ImportedVersion>,
}

impl ImportRecord {
    /// The import of `version`, if its material was imported.
    pub fn version(&self, version: KeyVersion) -> Option<&ImportedVersion> {
        self.versions.iter().find(|v| v.version == version)
    }
}

/// One version made from imported material.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedVersion {
    /// The version.
    pub version: KeyVersion,
    /// When it was imported, seconds since the Unix epoch.
    pub imported_at: u64,
    /// After this (seconds since the Unix epoch) the material refuses every use (`None`:
    /// never).
    pub expires_at: Option<u64>,
}

/// Import parameters of a key name (GetImportParameters): the wrapping key pair, generated in
/// the HSM, its private key wrapped under the MWK. One per key name; newer ones replace it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportParametersRecord {
    /// Random id (hex) the caller passes back as the import token.
    pub token: String,
    /// The key name they are for (the key may not exist yet).
    pub key: Name,
    /// How the material must be wrapped.
    pub wrapping: crate::hsm::ImportWrapping,
    /// The private key: `WrappedKek::to_bytes` of an import key blob.
    pub private_key: Vec<u8>,
    /// The public key, SubjectPublicKeyInfo DER.
    pub public_key: Vec<u8>,
    /// When they were made, seconds since the Unix epoch.
    pub created_at: u64,
    /// After this they are refused.
    pub expires_at: u64,
}

/// A record to write in a tenant commit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum TenantWrite {
    /// Insert or replace a key record (and its name index).
    Key(KeyRecord),
    /// Insert or replace a version record.
    Version(KeyId, VersionRecord),
    /// Insert or replace a key's import record.
    Import(KeyId, ImportRecord),
    /// Insert or replace the import parameters of a key name.
    ImportParameters(ImportParametersRecord),
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    postcard::to_allocvec(value).map_err(|_| Error::Encoding)
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, Error> {
    postcard::from_bytes(bytes).map_err(|_| Error::Encoding)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A record key: prefix ‖ rest.
fn prefixed(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + rest.len());
    key.extend_from_slice(prefix);
    key.extend_from_slice(rest);
    key
}
