//! The domain API: tenants, keys and versions, and the cryptographic operations on them.
//!
//! It ties the HSM (KEKs, data keys, secrets), the key store (records, commit points) and the
//! bulk-key cache together, and enforces purposes and blob types. It knows nothing of gRPC or
//! identities: callers have already decided which tenant a request may act on.
//!
//! This file holds the [`Kms`] itself (what it owns, opening it, the audit hooks); each concept
//! has a file: `tenants`, `keys`, `data_path` (Encrypt/Decrypt under bulk keys in memory, and
//! the cached forms), `data_keys` (data keys, secrets and re-encryption in the HSM), `cache`
//! (snapshots, primaries, bulk keys and when to trust them), `lifecycle`, `usage`, `macs`,
//! `signing`, `import`, `passwords`, `access`, `approvals`, `master_key`, `scheduler`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::clock::{Clock, SystemClock};
use crate::crypto::{Plaintext, SecretKey};
use crate::hsm::{HmacKey, Hsm};
use crate::ids::{KeyId, KeyVersion, Name, TenantId};
use crate::keystore::{KeyRecord, KeyStore, RecordMac, StoreOptions, VersionRecord};

mod access;
mod approvals;
mod cache;
mod data_keys;
mod data_path;
mod error;
mod import;
mod keys;
mod lifecycle;
mod macs;
mod master_key;
mod passwords;
pub mod scheduler;
mod signing;
mod tenants;
mod usage;

pub use access::{GrantRequest, grant_state};
pub use approvals::{ACCESS_HISTORY, MAX_REQUEST_IDS_PER_TENANT, REQUEST_ID_TTL};
pub use data_path::Opening;
pub use error::Error;
pub use import::{IMPORT_PARAMETERS_TTL, Import};
pub use lifecycle::{KeyDetails, PolicyUpdate, state_name};
pub use macs::{MacCheck, MacOutput};
pub use master_key::{MasterKeyStatus, RETIRED_MWK_MARGIN};
pub use passwords::{
    MAX_PASSWORD_LEN, PEPPER_VERSION, PasswordParams, Verified, password_hash_costs,
};
pub use signing::{PublicKey, Signable, Signature, SignatureCheck};
use usage::Usage;
pub use usage::{DEFAULT_MAX_BULK_USES, DEFAULT_MAX_KEK_USES};

/// A time (seconds since the Unix epoch) as messages show it.
fn rfc3339(secs: u64) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

/// The label HMAC'd inside the HSM with the storage root key to derive the storage MAC key.
pub const STORAGE_KEY_DERIVATION_LABEL: &[u8] = b"keyfront/v1/storage-mac-key";
/// The label for the key that HMACs context values in audit lines.
pub const AUDIT_KEY_DERIVATION_LABEL: &[u8] = b"keyfront/v1/audit-context-key";

/// Tuning of the domain layer.
#[derive(Clone, Debug)]
pub struct KmsOptions {
    /// Key store tuning.
    pub store: StoreOptions,
    /// How many bulk keys stay in memory.
    pub bulk_key_capacity: usize,
    /// How long an unwrapped bulk key stays in memory.
    pub bulk_key_ttl: Duration,
    /// Whether the `*_cached` operations may call the HSM on the caller's thread (an async
    /// worker). Right for an HSM that answers in microseconds (SoftHSM); turn it off for a
    /// network HSM whose calls take milliseconds.
    pub inline_hsm_calls: bool,
    /// Default pending window of a scheduled version destruction.
    pub destruction_window: Duration,
    /// The shortest pending window allowed: the backup retention, so no destruction outruns
    /// the backups that still need the version.
    pub min_destruction_window: Duration,
    /// How often the server's scheduler looks for due destructions.
    pub scheduler_interval: Duration,
    /// Argon2id costs for HashPassword.
    pub password_params: PasswordParams,
    /// Older Argon2id costs whose hashes VerifyPassword still takes (answering
    /// `rehash_needed`); a hash of any other cost is refused before any work.
    pub accepted_password_params: Vec<PasswordParams>,
}

impl Default for KmsOptions {
    fn default() -> Self {
        Self {
            store: StoreOptions::default(),
            bulk_key_capacity: 100_000,
            bulk_key_ttl: Duration::from_secs(300),
            inline_hsm_calls: true,
            destruction_window: Duration::from_secs(30 * 86_400),
            min_destruction_window: Duration::from_secs(30 * 86_400),
            scheduler_interval: Duration::from_secs(60),
            password_params: PasswordParams::default(),
            accepted_password_params: Vec::new(),
        }
    }
}

/// Encrypt's result.
#[derive(Debug)]
pub struct Encrypted {
    /// The CIPHERTEXT blob.
    pub ciphertext: Vec<u8>,
    /// The key's id.
    pub key_id: KeyId,
    /// The version that encrypted it.
    pub version: KeyVersion,
}

/// A decryption's result.
#[derive(Debug)]
pub struct Decrypted {
    /// The plaintext.
    pub plaintext: Plaintext,
    /// The key's id.
    pub key_id: KeyId,
    /// The version that had encrypted it.
    pub version: KeyVersion,
}

/// GenerateDataKey's result.
#[derive(Debug)]
pub struct DataKey {
    /// The DATA_KEY blob, safe to store beside the data it protects.
    pub wrapped: Vec<u8>,
    /// The 256-bit data key in clear.
    pub plaintext: Plaintext,
    /// The key's id.
    pub key_id: KeyId,
    /// The version that wrapped it.
    pub version: KeyVersion,
}

/// SealSecret's result.
#[derive(Debug)]
pub struct Sealed {
    /// The SECRET blob.
    pub sealed: Vec<u8>,
    /// The key's id.
    pub key_id: KeyId,
    /// The version that sealed it.
    pub version: KeyVersion,
}

/// The key management domain over one HSM and one data directory.
pub struct Kms {
    hsm: Arc<dyn Hsm>,
    store: KeyStore,
    bulk_keys: quick_cache::sync::Cache<(TenantId, KeyId, KeyVersion), Arc<CachedBulkKey>>,
    bulk_key_ttl: Duration,
    // When expired bulk keys were last swept out of memory.
    last_sweep: Mutex<Instant>,
    // The hot path's view of the store, so Encrypt and Decrypt run from memory. Replaced at
    // every commit that changes them (see `remember_primary`); never older than the store.
    tenant_ids: quick_cache::sync::Cache<Name, TenantId>,
    primaries: RwLock<PerTenant<Name>>,
    primaries_capacity: usize,
    // Versions named by blobs (DecryptDataKey, UnsealSecret): immutable records, so kept until
    // the tenant goes (the key lifecycle invalidates them on state changes).
    versions: RwLock<PerTenant<(KeyId, KeyVersion)>>,
    inline_hsm_calls: bool,
    // Inline HSM calls are off until this many milliseconds after `opened` because one was
    // slow (see `timed_inline`); an atomic, as every inline call reads it.
    inline_paused_until_ms: AtomicU64,
    opened: Instant,
    audit_key: SecretKey,
    // Raised by every lifecycle change while it drops the key's snapshots. A reader that
    // loaded a snapshot from the store caches it only if the epoch has not moved since it
    // began, so a state change can never be overwritten by a stale snapshot.
    cache_epoch: RwLock<u64>,
    // The change feed's `seq` whose changes are applied to the caches (shared store only);
    // the lock makes taking and applying them one step, so no reader slips in between.
    changes_applied: AtomicU64,
    changes_lock: Mutex<()>,
    // One master key rotation at a time on this node: the RPC and the scheduler's resumption
    // must not both create the next MWK.
    mwk_rotation: Mutex<()>,
    destruction_window: Duration,
    min_destruction_window: Duration,
    clock: Arc<dyn Clock>,
    usage: RwLock<HashMap<(TenantId, KeyId, KeyVersion), Arc<Usage>>>,
    password_params: PasswordParams,
    accepted_password_params: Vec<PasswordParams>,
    // Where the scheduler's actions are logged (`system:*`); unset in offline commands.
    audit: std::sync::OnceLock<Arc<crate::audit::AuditLog>>,
}

struct CachedBulkKey {
    key: SecretKey,
    loaded: Instant,
}

/// Key snapshots per tenant, by `K` (a key name, or a key id and version).
type PerTenant<K> = HashMap<TenantId, HashMap<K, Arc<KeySnapshot>>>;

/// A key's record and one of its versions (the primary, for Encrypt).
struct KeySnapshot {
    record: KeyRecord,
    primary: VersionRecord,
    // When the version's imported material expires (key import); `None` for generated
    // material or material imported without an expiry.
    expires_at: Option<u64>,
    // The version's usage counters (shared by every snapshot of it).
    usage: Arc<Usage>,
}

impl Kms {
    /// Derives the storage MAC key inside the HSM and opens the key store.
    ///
    /// # Errors
    /// HSM errors, or [`crate::keystore::Error::StorageKeyMismatch`] if `data_dir` belongs to
    /// another token.
    pub fn open(hsm: Arc<dyn Hsm>, data_dir: &Path, options: KmsOptions) -> Result<Self, Error> {
        Self::open_with_clock(hsm, data_dir, options, Arc::new(SystemClock::new()))
    }

    /// [`Kms::open`] with time from `clock` (tests move a test clock).
    ///
    /// # Errors
    /// As [`Kms::open`].
    pub fn open_with_clock(
        hsm: Arc<dyn Hsm>,
        data_dir: &Path,
        options: KmsOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Error> {
        let store = KeyStore::open(data_dir, Self::storage_mac(hsm.as_ref())?, options.store)?;
        let mut audit_key = hsm.hmac(HmacKey::StorageRoot, AUDIT_KEY_DERIVATION_LABEL)?;
        let audit_key = SecretKey::from_bytes(&mut audit_key);
        Ok(Self {
            audit_key,
            hsm,
            store,
            bulk_keys: quick_cache::sync::Cache::new(options.bulk_key_capacity.max(1)),
            bulk_key_ttl: options.bulk_key_ttl,
            last_sweep: Mutex::new(Instant::now()),
            tenant_ids: quick_cache::sync::Cache::new(options.bulk_key_capacity.max(1)),
            primaries: RwLock::new(HashMap::new()),
            primaries_capacity: options.bulk_key_capacity.max(1),
            versions: RwLock::new(HashMap::new()),
            inline_hsm_calls: options.inline_hsm_calls,
            inline_paused_until_ms: AtomicU64::new(0),
            opened: Instant::now(),
            cache_epoch: RwLock::new(0),
            changes_applied: AtomicU64::new(0),
            changes_lock: Mutex::new(()),
            mwk_rotation: Mutex::new(()),
            destruction_window: options.destruction_window,
            min_destruction_window: options.min_destruction_window,
            clock,
            usage: RwLock::new(HashMap::new()),
            password_params: options.password_params,
            accepted_password_params: options.accepted_password_params,
            audit: std::sync::OnceLock::new(),
        })
    }

    /// The record MAC key, derived inside the HSM (the same token always derives the same).
    ///
    /// # Errors
    /// HSM errors.
    pub fn storage_mac(hsm: &dyn Hsm) -> Result<RecordMac, crate::hsm::Error> {
        let mut derived = hsm.hmac(HmacKey::StorageRoot, STORAGE_KEY_DERIVATION_LABEL)?;
        Ok(RecordMac::new(SecretKey::from_bytes(&mut derived)))
    }

    /// HMAC-SHA256 of a value under the audit key (hex): lets an auditor match a context value
    /// they know without the log ever holding it.
    pub fn audit_digest(&self, value: &[u8]) -> String {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(self.audit_key.expose_secret())
            .expect("HMAC accepts any key length");
        mac.update(value);
        hex::encode(mac.finalize().into_bytes())
    }

    /// The node whose audit log is attached (`""` when none is: offline commands).
    pub fn audit_node(&self) -> &str {
        self.audit.get().map_or("", |audit| audit.node())
    }

    /// Logs this domain's own actions (the scheduler's) to `audit`, and lets it sign the
    /// audit log's checkpoints and keep its chain head.
    pub fn attach_audit(self: &Arc<Self>, audit: &Arc<crate::audit::AuditLog>) {
        let _ = self.audit.set(Arc::clone(audit));
        let anchor: std::sync::Weak<dyn crate::audit::Anchor> = Arc::downgrade(self) as _;
        audit.attach(anchor);
    }

    /// Logs an action of keyfront's own. An intent that cannot be logged is not carried out.
    ///
    /// # Errors
    /// [`Error::AuditUnavailable`] when the line cannot be written.
    pub(crate) fn system_event(
        &self,
        action: &'static str,
        outcome: &str,
        tenant: Option<String>,
        key: Option<&Name>,
        version: Option<KeyVersion>,
    ) -> Result<(), Error> {
        self.system_line(crate::audit::SystemRecord {
            actor: "system:scheduler",
            action,
            outcome: outcome.to_owned(),
            tenant,
            key: key.map(ToString::to_string),
            version: version.map(|v| v.0),
            detail: None,
        })
    }

    /// Logs a backup action (`system:backup`). An intent that cannot be logged is not
    /// carried out.
    ///
    /// # Errors
    /// [`Error::AuditUnavailable`] when the line cannot be written.
    pub fn backup_event(
        &self,
        action: &'static str,
        outcome: &str,
        detail: Option<String>,
    ) -> Result<(), Error> {
        self.system_line(crate::audit::SystemRecord {
            actor: "system:backup",
            action,
            outcome: outcome.to_owned(),
            tenant: None,
            key: None,
            version: None,
            detail,
        })
    }

    fn system_line(&self, record: crate::audit::SystemRecord) -> Result<(), Error> {
        let Some(audit) = self.audit.get() else {
            return Ok(());
        };
        let action = record.action;
        audit.system(&record).map_err(|error| {
            tracing::error!(%error, action, "audit write failed; the scheduled action waits");
            Error::AuditUnavailable
        })
    }

    /// Runs one scheduled action between an intent line and an outcome line; nothing is done
    /// when the intent cannot be logged.
    ///
    /// # Errors
    /// [`Error::AuditUnavailable`], or the action's own.
    pub(crate) fn scheduled<T>(
        &self,
        action: &'static str,
        tenant: Option<String>,
        key: Option<&Name>,
        version: Option<KeyVersion>,
        run: impl FnOnce() -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.system_event(action, "intent", tenant.clone(), key, version)?;
        let result = run();
        let outcome = match &result {
            Ok(_) => "OK".to_owned(),
            // Error texts name rules and ids, never key material.
            Err(error) => format!("FAILED: {error}"),
        };
        // The action is done (or failed); a lost outcome line is logged, not undone.
        let _ = self.system_event(action, &outcome, tenant, key, version);
        result
    }

    /// The clock this domain reads time from.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The key store (for listing and for tests).
    pub fn store(&self) -> &KeyStore {
        &self.store
    }

    /// The HSM.
    pub fn hsm(&self) -> &Arc<dyn Hsm> {
        &self.hsm
    }

    /// Drops (and so zeroizes, once in-flight users finish) every bulk key past its TTL;
    /// returns how many remain. Also runs on cache misses, at most every quarter TTL.
    pub fn evict_expired_bulk_keys(&self) -> usize {
        let ttl = self.bulk_key_ttl;
        self.bulk_keys
            .retain(|_, cached| cached.loaded.elapsed() < ttl);
        *self.last_sweep.lock().expect("sweep lock poisoned") = Instant::now();
        self.bulk_keys.len()
    }

    /// How many bulk keys are in memory now.
    pub fn cached_bulk_keys(&self) -> usize {
        self.bulk_keys.len()
    }
}

impl crate::audit::Anchor for Kms {
    fn sign_checkpoint(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        self.hsm.sign(message).map_err(|e| e.to_string())
    }

    fn audit_public_key(&self) -> Vec<u8> {
        self.hsm.audit_public_key()
    }

    fn stored_head(&self, node: &str) -> Result<Option<crate::audit::ChainHead>, String> {
        self.store.audit_head(node).map_err(|e| e.to_string())
    }

    fn store_head(&self, node: &str, head: &crate::audit::ChainHead) -> Result<(), String> {
        self.store
            .set_audit_head(node, head)
            .map_err(|e| e.to_string())
    }
}
