//! The domain API: tenants, keys and versions, and the cryptographic operations on them.
//!
//! It ties the HSM (KEKs, data keys, secrets), the key store (records, commit points) and the
//! bulk-key cache together, and enforces purposes and blob types. It knows nothing of gRPC or
//! identities: callers have already decided which tenant a request may act on.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use zeroize::Zeroize;

use crate::clock::{Clock, SystemClock};
use crate::crypto::{
    self, BlobType, EncryptionContext, HEADER_LEN, Header, NONCE_LEN, Plaintext, SecretKey, TAG_LEN,
};
use crate::hsm::{HmacKey, Hsm, Kek, WrappedKek};
use crate::ids::{KeyId, KeyVersion, Name, TenantId};
use crate::keystore::{
    self, KeyPolicy, KeyRecord, KeyStore, Purpose, RecordMac, StoreOptions, TenantDb, TenantRecord,
    TenantWrite, VersionRecord, VersionState,
};

mod access;
mod approvals;
mod error;
mod import;
mod lifecycle;
mod macs;
mod master_key;
mod passwords;
pub mod scheduler;
mod signing;
mod usage;

pub use access::{GrantRequest, grant_state};
pub use approvals::{ACCESS_HISTORY, MAX_REQUEST_IDS_PER_TENANT, REQUEST_ID_TTL};
pub use error::Error;
use import::material_expiry;
pub use import::{IMPORT_PARAMETERS_TTL, Import};
pub use lifecycle::{KeyDetails, PolicyUpdate, state_name};
pub use macs::{MacCheck, MacOutput};
pub use master_key::{MasterKeyStatus, RETIRED_MWK_MARGIN};
pub use passwords::{
    MAX_PASSWORD_LEN, PEPPER_VERSION, PasswordParams, Verified, password_hash_costs,
};
pub use signing::{PublicKey, Signable, Signature, SignatureCheck};
pub use usage::{DEFAULT_MAX_BULK_USES, DEFAULT_MAX_KEK_USES};
use usage::{Taken, Usage, UseKind};

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
    /// HSM errors, or [`keystore::Error::StorageKeyMismatch`] if `data_dir` belongs to
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

    /// Creates a tenant with a new random id.
    ///
    /// # Errors
    /// [`keystore::Error::AlreadyExists`] if the name is taken.
    pub fn create_tenant(&self, name: &Name) -> Result<TenantRecord, Error> {
        Ok(self.store.create_tenant(name)?)
    }

    /// The tenant with this name.
    ///
    /// # Errors
    /// [`Error::TenantNotFound`].
    pub fn tenant(&self, name: &Name) -> Result<TenantRecord, Error> {
        self.store
            .tenant_by_name(name)?
            .ok_or_else(|| Error::TenantNotFound(name.clone()))
    }

    /// The id of the tenant with this name, from memory when it was looked up before.
    ///
    /// # Errors
    /// [`Error::TenantNotFound`].
    pub fn tenant_id(&self, name: &Name) -> Result<TenantId, Error> {
        self.trusted_or_loaded(|| self.tenant_ids.get(name), || self.load_tenant_id(name))
    }

    fn load_tenant_id(&self, name: &Name) -> Result<TenantId, Error> {
        let epoch = self.epoch();
        let record = self.tenant(name)?;
        if let Some(at) = record.destroy_at {
            return Err(Error::KeyState {
                reason: "TENANT_DESTROY_SCHEDULED",
                message: format!(
                    "tenant {name} is scheduled for destruction at {at} (seconds since the epoch); an officer can cancel it with CancelTenantDestruction"
                ),
            });
        }
        let current = self.cache_epoch.read().expect("cache epoch lock poisoned");
        if *current == epoch {
            self.tenant_ids.insert(name.clone(), record.id);
        }
        Ok(record.id)
    }

    /// Destroys a tenant at once (crypto-shredding): tombstone, then its database is erased.
    ///
    /// # Errors
    /// [`keystore::Error::TenantNotFound`].
    pub fn destroy_tenant(&self, tenant: TenantId) -> Result<(), Error> {
        self.store.destroy_tenant(tenant)?;
        self.forget_tenant(tenant);
        self.await_propagation();
        Ok(())
    }

    /// Schedules a tenant's destruction after the default pending window (never below the
    /// minimum, the backup retention). The tenant is refused at once; until the window ends,
    /// [`Kms::cancel_tenant_destruction`] restores it. Then the scheduler crypto-shreds it:
    /// tombstone, records removed, database directory deleted.
    ///
    /// # Errors
    /// [`Error::TenantNotFound`].
    pub fn schedule_tenant_destruction(&self, name: &Name) -> Result<TenantRecord, Error> {
        let id = self.tenant(name)?.id;
        let window = self.destruction_window.max(self.min_destruction_window);
        let at = self.clock.now_secs().saturating_add(window.as_secs());
        let record = self.store.schedule_tenant_destruction(id, at)?;
        crate::failpoint::hit("destroy-tenant:scheduled");
        self.forget_tenant(id);
        self.await_propagation();
        Ok(record)
    }

    /// Restores a tenant scheduled for destruction.
    ///
    /// # Errors
    /// [`Error::TenantNotFound`]; NOT_SCHEDULED if it is not scheduled.
    pub fn cancel_tenant_destruction(&self, name: &Name) -> Result<TenantRecord, Error> {
        let id = self.tenant(name)?.id;
        let record = self.store.cancel_tenant_destruction(id)?;
        self.forget_tenant(id);
        Ok(record)
    }

    /// Returns once no node can decide from a view older than the commit just made: on a
    /// shared store, after the change feed's bound (a node whose feed was confirmed since the
    /// commit has applied it; one not confirmed within the bound reads the store). Called by
    /// the changes that must be refused everywhere before they are acknowledged: disable,
    /// destruction, minimum decryption version, tenant destruction. Runs on a blocking thread.
    fn await_propagation(&self) {
        if let Some(changes) = self.store.changes() {
            std::thread::sleep(changes.bound());
        }
    }

    /// Drops everything of a tenant from memory (under the cache epoch, so no reader puts it
    /// back from an older read).
    fn forget_tenant(&self, tenant: TenantId) {
        let mut epoch = self.cache_epoch.write().expect("cache epoch lock poisoned");
        *epoch += 1;
        self.tenant_ids.retain(|_, id| *id != tenant);
        self.primaries
            .write()
            .expect("primaries lock poisoned")
            .remove(&tenant);
        self.versions
            .write()
            .expect("versions lock poisoned")
            .remove(&tenant);
        self.bulk_keys.retain(|(id, _, _), _| *id != tenant);
        self.usage
            .write()
            .expect("usage lock poisoned")
            .retain(|(id, _, _), _| *id != tenant);
    }

    /// Creates a key at version 1.
    ///
    /// # Errors
    /// [`keystore::Error::AlreadyExists`] if the tenant has a key of that name.
    pub fn create_key(
        &self,
        tenant: TenantId,
        name: &Name,
        purpose: Purpose,
    ) -> Result<KeyRecord, Error> {
        self.writing(|| {
            let db = self.store.tenant(tenant)?;
            let _writes = db.lock_writes();
            if db.key_by_name(name)?.is_some() {
                return Err(keystore::Error::AlreadyExists("key").into());
            }
            let id = KeyId::random();
            let version = KeyVersion(1);
            let version_record =
                self.new_version(tenant, id, version, purpose, &KeyPolicy::default(), None)?;
            let record = KeyRecord {
                id,
                name: name.clone(),
                purpose,
                primary: version,
                latest: version,
                created_at: version_record.created_at,
                generation: 1,
                policy: KeyPolicy::default(),
            };
            db.commit(vec![
                TenantWrite::Version(id, version_record.clone()),
                TenantWrite::Key(record.clone()),
            ])?;
            self.register_new_version(tenant, record.id, &version_record);
            let epoch = self.epoch();
            self.remember_primary(tenant, record.clone(), version_record, None, epoch);
            Ok(record)
        })
    }

    /// The key with this name.
    ///
    /// # Errors
    /// [`Error::KeyNotFound`].
    pub fn key(&self, tenant: TenantId, name: &Name) -> Result<KeyRecord, Error> {
        self.reading(tenant, |db, _| {
            db.key_by_name(name)?
                .ok_or_else(|| Error::KeyNotFound(name.clone()))
        })
    }

    /// Every key of the tenant.
    ///
    /// # Errors
    /// Storage errors.
    pub fn keys(&self, tenant: TenantId) -> Result<Vec<KeyRecord>, Error> {
        self.reading(tenant, |db, _| Ok(db.keys()?))
    }

    /// Adds a version (new KEK, new bulk key) and makes it primary; older versions keep
    /// decrypting.
    ///
    /// # Errors
    /// [`Error::KeyNotFound`], HSM or storage errors (nothing changes on error).
    pub fn rotate_key(&self, tenant: TenantId, name: &Name) -> Result<KeyRecord, Error> {
        self.writing(|| {
            let db = self.store.tenant(tenant)?;
            let _writes = db.lock_writes();
            let mut record = db
                .key_by_name(name)?
                .ok_or_else(|| Error::KeyNotFound(name.clone()))?;
            Self::check_generated_rotation(&db, &record)?;
            let next = KeyVersion(
                record
                    .latest
                    .0
                    .checked_add(1)
                    .ok_or(Error::VersionsExhausted)?,
            );
            let version_record = self.new_version(
                tenant,
                record.id,
                next,
                record.purpose,
                &record.policy,
                None,
            )?;
            record.primary = next;
            record.latest = next;
            record.generation += 1;
            crate::failpoint::hit("rotate-key:version-made");
            db.commit(vec![
                TenantWrite::Version(record.id, version_record.clone()),
                TenantWrite::Key(record.clone()),
            ])?;
            crate::failpoint::hit("rotate-key:committed");
            self.register_new_version(tenant, record.id, &version_record);
            let epoch = self.epoch();
            self.remember_primary(tenant, record.clone(), version_record, None, epoch);
            Ok(record)
        })
    }

    /// Encrypts locally with the primary version's bulk key (AES-256-GCM-SIV).
    ///
    /// # Errors
    /// [`Error::KeyNotFound`], [`Error::PurposeMismatch`] for a SECRETS key.
    pub fn encrypt(
        &self,
        tenant: TenantId,
        key: &Name,
        plaintext: &Plaintext,
        context: &EncryptionContext,
    ) -> Result<Encrypted, Error> {
        let snapshot = self.primary(tenant, key, Purpose::Data)?;
        let bulk = self.bulk_key(tenant, &snapshot.record, &snapshot.primary)?;
        self.use_blocking(
            tenant,
            &snapshot.record,
            &snapshot.primary,
            &snapshot.usage,
            UseKind::Bulk,
        )?;
        Ok(Self::seal_locally(
            tenant, &snapshot, &bulk, plaintext, context,
        )?)
    }

    /// Encrypt from memory alone, for callers on an async runtime: `None` when anything it
    /// needs (tenant id, key, bulk key) is not cached yet; then use [`Kms::encrypt`] on a
    /// blocking thread, which fills the caches.
    pub fn encrypt_cached(
        &self,
        tenant: &Name,
        key: &Name,
        plaintext: &Plaintext,
        context: &EncryptionContext,
    ) -> Option<Result<Encrypted, Error>> {
        if !self.cache_trusted() {
            return None;
        }
        let tenant = self.tenant_ids.get(tenant)?;
        let snapshot = self.cached_primary(tenant, key)?;
        if let Err(error) = Self::check_purpose(&snapshot.record, Purpose::Data)
            .and_then(|()| self.check_encrypt(&snapshot))
        {
            return Some(Err(error));
        }
        let bulk = self.cached_bulk_key(tenant, snapshot.record.id, snapshot.primary.version)?;
        match Self::take_use(
            &snapshot.record,
            snapshot.primary.version,
            &snapshot.usage,
            UseKind::Bulk,
        ) {
            Ok(Taken::Ok) => {}
            // A reservation writes to the store: the blocking path does it.
            Ok(Taken::Reserve) => return None,
            Err(error) => return Some(Err(error)),
        }
        Some(Self::seal_locally(tenant, &snapshot, &bulk, plaintext, context).map_err(Error::from))
    }

    /// Decrypt from memory alone: `None` when the tenant id or the version's bulk key is not
    /// cached; then use [`Kms::decrypt_scoped`] on a blocking thread.
    pub fn decrypt_cached(
        &self,
        tenant: &Name,
        ciphertext: &[u8],
        context: &EncryptionContext,
        key: Option<&Name>,
        allowed: Option<&[Name]>,
    ) -> Option<Result<Decrypted, Error>> {
        if !self.cache_trusted() {
            return None;
        }
        let tenant = self.tenant_ids.get(tenant)?;
        let blob = match crypto::parse_blob(ciphertext, BlobType::Ciphertext) {
            Ok(blob) => blob,
            Err(error) => return Some(Err(error.into())),
        };
        let (key_id, version) = (blob.header.key_id, blob.header.version);
        let snapshot = self.cached_version(tenant, blob.header.key_id, blob.header.version)?;
        let bulk = self.cached_bulk_key(tenant, key_id, version)?;
        let result = (|| {
            let record = &snapshot.record;
            Self::check_blob_key(&record.name, record.purpose, Purpose::Data, key, allowed)?;
            self.check_decrypt(&snapshot)?;
            let aad = crypto::aad(BlobType::Ciphertext, &tenant, &key_id, version, context)?;
            let plaintext = crypto::open(&bulk.key, &aad, &ciphertext[HEADER_LEN..])?;
            Ok(Decrypted {
                plaintext,
                key_id,
                version,
            })
        })();
        Some(result)
    }

    /// GenerateDataKey with the HSM called on this thread, when the key is in memory and inline
    /// HSM calls are allowed (`KmsOptions::inline_hsm_calls`); `None` otherwise.
    pub fn generate_data_key_cached(
        &self,
        tenant: &Name,
        key: &Name,
        context: &EncryptionContext,
    ) -> Option<Result<DataKey, Error>> {
        let tenant = self.inline_tenant(tenant)?;
        self.cached_primary(tenant, key)?;
        Some(self.timed_inline(|| self.generate_data_key(tenant, key, context)))
    }

    /// SealSecret with the HSM called on this thread; see [`Kms::generate_data_key_cached`].
    pub fn seal_secret_cached(
        &self,
        tenant: &Name,
        key: &Name,
        secret: &Plaintext,
        context: &EncryptionContext,
    ) -> Option<Result<Sealed, Error>> {
        let tenant = self.inline_tenant(tenant)?;
        self.cached_primary(tenant, key)?;
        Some(self.timed_inline(|| self.seal_secret(tenant, key, secret, context)))
    }

    /// DecryptDataKey with the HSM called on this thread, when the blob's key version is in
    /// memory; see [`Kms::generate_data_key_cached`].
    pub fn decrypt_data_key_cached(
        &self,
        tenant: &Name,
        wrapped: &[u8],
        context: &EncryptionContext,
        allowed: Option<&[Name]>,
    ) -> Option<Result<Decrypted, Error>> {
        self.open_cached(tenant, wrapped, BlobType::DataKey, |tenant| {
            self.decrypt_data_key_scoped(tenant, wrapped, context, allowed)
        })
    }

    /// UnsealSecret with the HSM called on this thread; see [`Kms::decrypt_data_key_cached`].
    pub fn unseal_secret_cached(
        &self,
        tenant: &Name,
        sealed: &[u8],
        context: &EncryptionContext,
        allowed: Option<&[Name]>,
    ) -> Option<Result<Decrypted, Error>> {
        self.open_cached(tenant, sealed, BlobType::Secret, |tenant| {
            self.unseal_secret_scoped(tenant, sealed, context, allowed)
        })
    }

    /// Runs `open` inline when the tenant id and the version the blob names are in memory.
    fn open_cached(
        &self,
        tenant: &Name,
        blob: &[u8],
        blob_type: BlobType,
        open: impl FnOnce(TenantId) -> Result<Decrypted, Error>,
    ) -> Option<Result<Decrypted, Error>> {
        let tenant = self.inline_tenant(tenant)?;
        let parsed = match crypto::parse_blob(blob, blob_type) {
            Ok(parsed) => parsed,
            Err(error) => return Some(Err(error.into())),
        };
        self.cached_version(tenant, parsed.header.key_id, parsed.header.version)?;
        Some(self.timed_inline(|| open(tenant)))
    }

    /// The tenant's id, if inline HSM calls are allowed now and the id is in memory.
    fn inline_tenant(&self, tenant: &Name) -> Option<TenantId> {
        if !self.inline_hsm_calls {
            return None;
        }
        if self.millis_since_open() < self.inline_paused_until_ms.load(Ordering::Relaxed) {
            return None;
        }
        if !self.cache_trusted() {
            return None;
        }
        self.tenant_ids.get(tenant)
    }

    /// Runs an inline HSM operation; if it was slow, inline calls pause for a while, so an HSM
    /// that slows down stalls at most one call per async worker before the blocking path (with
    /// its deadlines) takes over.
    fn timed_inline<T>(&self, operation: impl FnOnce() -> T) -> T {
        // Wall time includes preemption: on a loaded 2-core machine ordinary calls reach ~5 ms
        // at p99.9 (docs/BENCHMARKS.md), so only a call ten times slower counts as a slow HSM.
        const SLOW: Duration = Duration::from_millis(50);
        const PAUSE: Duration = Duration::from_secs(30);
        let started = Instant::now();
        let result = operation();
        if started.elapsed() > SLOW {
            tracing::warn!(took = ?started.elapsed(), "slow HSM call; pausing inline HSM calls");
            let until = self
                .millis_since_open()
                .saturating_add(PAUSE.as_millis() as u64);
            self.inline_paused_until_ms.store(until, Ordering::Relaxed);
        }
        result
    }

    fn millis_since_open(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn cached_version(
        &self,
        tenant: TenantId,
        key_id: KeyId,
        version: KeyVersion,
    ) -> Option<Arc<KeySnapshot>> {
        self.versions
            .read()
            .expect("versions lock poisoned")
            .get(&tenant)?
            .get(&(key_id, version))
            .cloned()
    }

    fn remember_version(
        &self,
        tenant: TenantId,
        record: KeyRecord,
        version: VersionRecord,
        expires_at: Option<u64>,
        epoch: u64,
    ) -> Arc<KeySnapshot> {
        if version.state != VersionState::Enabled {
            // Disabled or destroyed on another node: its bulk key has no use here now.
            self.bulk_keys.remove(&(tenant, record.id, version.version));
        }
        let usage = self.usage(tenant, record.id, &version);
        let snapshot = Arc::new(KeySnapshot {
            record,
            primary: version,
            expires_at,
            usage,
        });
        self.insert_version(tenant, &snapshot, epoch);
        snapshot
    }

    /// Caches a version snapshot, unless a lifecycle change happened since `epoch`.
    fn insert_version(&self, tenant: TenantId, snapshot: &Arc<KeySnapshot>, epoch: u64) {
        let current = self.cache_epoch.read().expect("cache epoch lock poisoned");
        if *current != epoch {
            return;
        }
        let mut versions = self.versions.write().expect("versions lock poisoned");
        if versions.len() >= self.primaries_capacity {
            versions.clear();
        }
        versions.entry(tenant).or_default().insert(
            (snapshot.record.id, snapshot.primary.version),
            Arc::clone(snapshot),
        );
    }

    fn seal_locally(
        tenant: TenantId,
        snapshot: &KeySnapshot,
        bulk: &CachedBulkKey,
        plaintext: &Plaintext,
        context: &EncryptionContext,
    ) -> Result<Encrypted, crypto::Error> {
        let (record, version) = (&snapshot.record, &snapshot.primary);
        let header = Header {
            blob_type: BlobType::Ciphertext,
            key_id: record.id,
            version: version.version,
        };
        let aad = crypto::aad(
            BlobType::Ciphertext,
            &tenant,
            &record.id,
            version.version,
            context,
        )?;
        let mut ciphertext = Vec::with_capacity(HEADER_LEN + NONCE_LEN + plaintext.len() + TAG_LEN);
        crypto::write_header(&header, &mut ciphertext);
        crypto::seal(&bulk.key, &aad, plaintext.expose_secret(), &mut ciphertext);
        Ok(Encrypted {
            ciphertext,
            key_id: record.id,
            version: version.version,
        })
    }

    /// The key named by a request and its primary version, from memory or the store.
    fn primary(
        &self,
        tenant: TenantId,
        name: &Name,
        purpose: Purpose,
    ) -> Result<Arc<KeySnapshot>, Error> {
        let snapshot = self.primary_snapshot(tenant, name)?;
        Self::check_purpose(&snapshot.record, purpose)?;
        self.check_encrypt(&snapshot)?;
        Ok(snapshot)
    }

    /// The key's record and primary version, from memory or the store; nothing checked.
    fn primary_snapshot(&self, tenant: TenantId, name: &Name) -> Result<Arc<KeySnapshot>, Error> {
        self.trusted_or_loaded(
            || self.cached_primary(tenant, name),
            || {
                self.reading(tenant, |db, epoch| {
                    let record = db
                        .key_by_name(name)?
                        .ok_or_else(|| Error::KeyNotFound(name.clone()))?;
                    let primary = self.version(db, &record, record.primary)?;
                    let expires_at = material_expiry(db, &record, record.primary)?;
                    Ok(self.remember_primary(tenant, record, primary, expires_at, epoch))
                })
            },
        )
    }

    /// Caches a key's primary unless a newer revision of it is cached already: a reader that
    /// fetched the record before a rotation's commit cannot put the old primary back.
    /// The primary is also remembered as a version, so Decrypt of what Encrypt just produced
    /// runs from memory too.
    fn remember_primary(
        &self,
        tenant: TenantId,
        record: KeyRecord,
        primary: VersionRecord,
        expires_at: Option<u64>,
        epoch: u64,
    ) -> Arc<KeySnapshot> {
        let usage = self.usage(tenant, record.id, &primary);
        let snapshot = Arc::new(KeySnapshot {
            record,
            primary,
            expires_at,
            usage,
        });
        // One snapshot serves both maps.
        self.insert_version(tenant, &snapshot, epoch);
        let current = self.cache_epoch.read().expect("cache epoch lock poisoned");
        if *current != epoch {
            return snapshot;
        }
        let mut primaries = self.primaries.write().expect("primaries lock poisoned");
        if let Some(existing) = primaries
            .get(&tenant)
            .and_then(|keys| keys.get(&snapshot.record.name))
        {
            if existing.record.generation > snapshot.record.generation {
                return Arc::clone(existing);
            }
        }
        if primaries.len() >= self.primaries_capacity {
            primaries.clear();
        }
        primaries
            .entry(tenant)
            .or_default()
            .insert(snapshot.record.name.clone(), Arc::clone(&snapshot));
        snapshot
    }

    fn cached_primary(&self, tenant: TenantId, name: &Name) -> Option<Arc<KeySnapshot>> {
        self.primaries
            .read()
            .expect("primaries lock poisoned")
            .get(&tenant)?
            .get(name)
            .cloned()
    }

    fn check_purpose(record: &KeyRecord, purpose: Purpose) -> Result<(), Error> {
        if record.purpose == purpose {
            Ok(())
        } else {
            Err(Error::PurposeMismatch {
                key: record.name.clone(),
                purpose: record.purpose,
            })
        }
    }

    /// A bulk key from memory, if cached and not expired.
    fn cached_bulk_key(
        &self,
        tenant: TenantId,
        key_id: KeyId,
        version: KeyVersion,
    ) -> Option<Arc<CachedBulkKey>> {
        let cached = self
            .bulk_keys
            .get(&(tenant, key_id, version))
            .filter(|cached| cached.loaded.elapsed() < self.bulk_key_ttl);
        crate::metrics::global().cache("bulk_key", cached.is_some());
        cached
    }

    /// Decrypts a CIPHERTEXT blob; the key comes from its header (`key`, if given, must match).
    ///
    /// # Errors
    /// [`Error::Decrypt`] (opaque) for anything wrong with the ciphertext or context.
    pub fn decrypt(
        &self,
        tenant: TenantId,
        ciphertext: &[u8],
        context: &EncryptionContext,
        key: Option<&Name>,
    ) -> Result<Decrypted, Error> {
        self.decrypt_scoped(tenant, ciphertext, context, key, None)
    }

    /// [`Kms::decrypt`] for a caller limited to `allowed` keys: a ciphertext under another key
    /// is refused with [`Error::PermissionDenied`] before its bulk key is touched.
    ///
    /// # Errors
    /// As [`Kms::decrypt`], plus [`Error::PermissionDenied`].
    pub fn decrypt_scoped(
        &self,
        tenant: TenantId,
        ciphertext: &[u8],
        context: &EncryptionContext,
        key: Option<&Name>,
        allowed: Option<&[Name]>,
    ) -> Result<Decrypted, Error> {
        let blob = crypto::parse_blob(ciphertext, BlobType::Ciphertext)?;
        let snapshot = self.version_snapshot(tenant, blob.header.key_id, blob.header.version)?;
        let (record, version) = (&snapshot.record, &snapshot.primary);
        Self::check_blob_key(&record.name, record.purpose, Purpose::Data, key, allowed)?;
        self.check_decrypt(&snapshot)?;
        let bulk = self.bulk_key(tenant, record, version)?;
        let aad = crypto::aad(
            BlobType::Ciphertext,
            &tenant,
            &record.id,
            version.version,
            context,
        )?;
        let plaintext = crypto::open(&bulk.key, &aad, &ciphertext[HEADER_LEN..])?;
        Ok(Decrypted {
            plaintext,
            key_id: record.id,
            version: version.version,
        })
    }

    /// Generates a random 256-bit data key and encrypts it under the primary version's KEK in
    /// the HSM.
    ///
    /// # Errors
    /// [`Error::KeyNotFound`], [`Error::PurposeMismatch`], HSM errors.
    pub fn generate_data_key(
        &self,
        tenant: TenantId,
        key: &Name,
        context: &EncryptionContext,
    ) -> Result<DataKey, Error> {
        let mut raw = [0u8; 32];
        self.hsm.random(&mut raw)?;
        let plaintext = Plaintext::copy_from(&raw);
        raw.zeroize();
        let (wrapped, key_id, version) = self.seal_with_kek(
            tenant,
            key,
            Purpose::Data,
            BlobType::DataKey,
            &plaintext,
            context,
        )?;
        Ok(DataKey {
            wrapped,
            plaintext,
            key_id,
            version,
        })
    }

    /// Decrypts a DATA_KEY blob in the HSM. Any other blob type is refused before any HSM call.
    ///
    /// # Errors
    /// [`Error::Decrypt`] (opaque).
    pub fn decrypt_data_key(
        &self,
        tenant: TenantId,
        wrapped: &[u8],
        context: &EncryptionContext,
    ) -> Result<Decrypted, Error> {
        self.decrypt_data_key_scoped(tenant, wrapped, context, None)
    }

    /// [`Kms::decrypt_data_key`] for a caller limited to `allowed` keys.
    ///
    /// # Errors
    /// As [`Kms::decrypt_data_key`], plus [`Error::PermissionDenied`].
    pub fn decrypt_data_key_scoped(
        &self,
        tenant: TenantId,
        wrapped: &[u8],
        context: &EncryptionContext,
        allowed: Option<&[Name]>,
    ) -> Result<Decrypted, Error> {
        let decrypted = self.open_with_kek(
            tenant,
            wrapped,
            Purpose::Data,
            BlobType::DataKey,
            context,
            allowed,
        )?;
        if decrypted.plaintext.len() != 32 {
            return Err(Error::Decrypt);
        }
        Ok(decrypted)
    }

    /// Decrypts a CIPHERTEXT and encrypts its plaintext again under the same key's primary
    /// version; the plaintext stays in (zeroizing) memory here. Returns the new ciphertext and
    /// the version it came from.
    ///
    /// # Errors
    /// As [`Kms::decrypt_scoped`] and [`Kms::encrypt`].
    pub fn re_encrypt(
        &self,
        tenant: TenantId,
        ciphertext: &[u8],
        context: &EncryptionContext,
        key: Option<&Name>,
        allowed: Option<&[Name]>,
    ) -> Result<(Encrypted, KeyVersion), Error> {
        let decrypted = self.decrypt_scoped(tenant, ciphertext, context, key, allowed)?;
        let header = crypto::parse_blob(ciphertext, BlobType::Ciphertext)?.header;
        let name = self
            .version_snapshot(tenant, header.key_id, header.version)?
            .record
            .name
            .clone();
        let encrypted = self.encrypt(tenant, &name, &decrypted.plaintext, context)?;
        Ok((encrypted, decrypted.version))
    }

    /// Decrypts a DATA_KEY blob and wraps the same data key under its key's primary version,
    /// inside the HSM both ways. Returns the new blob and the version it came from.
    ///
    /// # Errors
    /// As [`Kms::decrypt_data_key_scoped`] and [`Kms::generate_data_key`].
    pub fn re_encrypt_data_key(
        &self,
        tenant: TenantId,
        wrapped: &[u8],
        context: &EncryptionContext,
        allowed: Option<&[Name]>,
    ) -> Result<(DataKey, KeyVersion), Error> {
        let decrypted = self.decrypt_data_key_scoped(tenant, wrapped, context, allowed)?;
        let header = crypto::parse_blob(wrapped, BlobType::DataKey)?.header;
        let name = self
            .version_snapshot(tenant, header.key_id, header.version)?
            .record
            .name
            .clone();
        let (wrapped, key_id, version) = self.seal_with_kek(
            tenant,
            &name,
            Purpose::Data,
            BlobType::DataKey,
            &decrypted.plaintext,
            context,
        )?;
        Ok((
            DataKey {
                wrapped,
                plaintext: decrypted.plaintext,
                key_id,
                version,
            },
            decrypted.version,
        ))
    }

    /// Encrypts a secret (password, API token) under the primary version's KEK in the HSM.
    ///
    /// # Errors
    /// [`Error::KeyNotFound`], [`Error::PurposeMismatch`] for a DATA key, HSM errors.
    pub fn seal_secret(
        &self,
        tenant: TenantId,
        key: &Name,
        secret: &Plaintext,
        context: &EncryptionContext,
    ) -> Result<Sealed, Error> {
        let (sealed, key_id, version) = self.seal_with_kek(
            tenant,
            key,
            Purpose::Secrets,
            BlobType::Secret,
            secret,
            context,
        )?;
        Ok(Sealed {
            sealed,
            key_id,
            version,
        })
    }

    /// Decrypts a SECRET blob in the HSM. Any other blob type is refused before any HSM call.
    ///
    /// # Errors
    /// [`Error::Decrypt`] (opaque).
    pub fn unseal_secret(
        &self,
        tenant: TenantId,
        sealed: &[u8],
        context: &EncryptionContext,
    ) -> Result<Decrypted, Error> {
        self.unseal_secret_scoped(tenant, sealed, context, None)
    }

    /// [`Kms::unseal_secret`] for a caller limited to `allowed` keys.
    ///
    /// # Errors
    /// As [`Kms::unseal_secret`], plus [`Error::PermissionDenied`].
    pub fn unseal_secret_scoped(
        &self,
        tenant: TenantId,
        sealed: &[u8],
        context: &EncryptionContext,
        allowed: Option<&[Name]>,
    ) -> Result<Decrypted, Error> {
        self.open_with_kek(
            tenant,
            sealed,
            Purpose::Secrets,
            BlobType::Secret,
            context,
            allowed,
        )
    }

    fn seal_with_kek(
        &self,
        tenant: TenantId,
        key: &Name,
        purpose: Purpose,
        blob_type: BlobType,
        plaintext: &Plaintext,
        context: &EncryptionContext,
    ) -> Result<(Vec<u8>, KeyId, KeyVersion), Error> {
        let snapshot = self.primary(tenant, key, purpose)?;
        let (record, version) = (&snapshot.record, &snapshot.primary);
        self.use_blocking(tenant, record, version, &snapshot.usage, UseKind::Kek)?;
        let kek = self.unwrap_stored_kek(tenant, &version.kek)?;
        let aad = crypto::aad(blob_type, &tenant, &record.id, version.version, context)?;
        let sealed = self.hsm.encrypt(&kek, &aad, plaintext.expose_secret())?;
        let header = Header {
            blob_type,
            key_id: record.id,
            version: version.version,
        };
        Ok((
            crypto::encode_blob(&header, &sealed.iv, &sealed.sealed),
            record.id,
            version.version,
        ))
    }

    fn open_with_kek(
        &self,
        tenant: TenantId,
        blob: &[u8],
        purpose: Purpose,
        blob_type: BlobType,
        context: &EncryptionContext,
        allowed: Option<&[Name]>,
    ) -> Result<Decrypted, Error> {
        // Parsed (type included) before anything else: a blob of another type never reaches
        // the HSM.
        let parsed = crypto::parse_blob(blob, blob_type)?;
        let snapshot =
            self.version_snapshot(tenant, parsed.header.key_id, parsed.header.version)?;
        self.open_with_snapshot(tenant, &parsed, &snapshot, purpose, context, allowed)
    }

    /// The HSM-side decryption of a parsed blob whose key version is known.
    fn open_with_snapshot(
        &self,
        tenant: TenantId,
        parsed: &crypto::ParsedBlob<'_>,
        snapshot: &KeySnapshot,
        purpose: Purpose,
        context: &EncryptionContext,
        allowed: Option<&[Name]>,
    ) -> Result<Decrypted, Error> {
        let (record, version) = (&snapshot.record, &snapshot.primary);
        Self::check_blob_key(&record.name, record.purpose, purpose, None, allowed)?;
        self.check_decrypt(snapshot)?;
        let blob_type = parsed.header.blob_type;
        let kek = self.unwrap_stored_kek(tenant, &version.kek)?;
        let aad = crypto::aad(blob_type, &tenant, &record.id, version.version, context)?;
        let plaintext = match self.hsm.decrypt(&kek, parsed.nonce, &aad, parsed.sealed) {
            Ok(plaintext) => plaintext,
            Err(crate::hsm::Error::Integrity) => return Err(self.blame_input()),
            Err(error) => return Err(error.into()),
        };
        Ok(Decrypted {
            plaintext,
            key_id: record.id,
            version: version.version,
        })
    }

    /// The canary rule: an HSM integrity failure is the caller's bad input only if the HSM
    /// still decrypts a known canary; otherwise the HSM is at fault and the answer is
    /// "unavailable", never "tampered".
    fn blame_input(&self) -> Error {
        match self.hsm.probe() {
            Ok(()) => Error::Decrypt,
            Err(error) => {
                tracing::warn!(%error, "HSM failed its canary after a failed decryption");
                Error::Hsm(error)
            }
        }
    }

    /// A version of a key (as a blob's header names them), from memory or the store. A key or
    /// version this tenant does not have is the one opaque [`Error::Decrypt`]: a caller must not
    /// learn whether a key id exists elsewhere.
    fn version_snapshot(
        &self,
        tenant: TenantId,
        key_id: KeyId,
        version: KeyVersion,
    ) -> Result<Arc<KeySnapshot>, Error> {
        self.trusted_or_loaded(
            || self.cached_version(tenant, key_id, version),
            || {
                self.reading(tenant, |db, epoch| {
                    let record = db.key(&key_id)?.ok_or(Error::Decrypt)?;
                    let version = db.version(&record.id, version)?.ok_or(Error::Decrypt)?;
                    let expires_at = material_expiry(db, &record, version.version)?;
                    Ok(self.remember_version(tenant, record, version, expires_at, epoch))
                })
            },
        )
    }

    /// The snapshot of a version a caller names of the key whose primary is `primary` (`None`,
    /// or the primary's own number: the primary itself): VerifyMac, Verify, GetPublicKey.
    ///
    /// # Errors
    /// [`Error::VersionNotFound`] for a version the key never had.
    fn named_version(
        &self,
        tenant: TenantId,
        key: &Name,
        primary: Arc<KeySnapshot>,
        version: Option<KeyVersion>,
    ) -> Result<Arc<KeySnapshot>, Error> {
        match version {
            None => Ok(primary),
            Some(version) if version == primary.primary.version => Ok(primary),
            Some(version) if version.0 == 0 || version > primary.record.latest => {
                Err(Error::VersionNotFound {
                    key: key.clone(),
                    version: version.0,
                })
            }
            Some(version) => self.version_snapshot(tenant, primary.record.id, version),
        }
    }

    /// Whether the primary of `key` and the version a caller names are both in memory, so that
    /// [`Kms::named_version`] needs no store read (the inline paths).
    fn cached_named_version(
        &self,
        tenant: TenantId,
        key: &Name,
        version: Option<KeyVersion>,
    ) -> Option<()> {
        let primary = self.cached_primary(tenant, key)?;
        if let Some(version) = version.filter(|v| *v != primary.primary.version) {
            self.cached_version(tenant, primary.record.id, version)?;
        }
        Some(())
    }

    /// Whether the in-memory view may decide a request. Always on a single node; on a shared
    /// store, once the commits other nodes announced are applied to it, and only while the
    /// change feed is fresh (see `keystore::changes`).
    fn cache_trusted(&self) -> bool {
        let Some(changes) = self.store.changes() else {
            return true;
        };
        // Freshness first: a confirmation covers the changes recorded before it, which the
        // step below then applies.
        let fresh = changes.is_fresh();
        if changes.seq() != self.changes_applied.load(Ordering::SeqCst) {
            let _applying = self.changes_lock.lock().expect("changes lock poisoned");
            let seq = changes.seq();
            if seq != self.changes_applied.load(Ordering::SeqCst) {
                let pending = self.store.take_changes();
                if pending.everything {
                    self.forget_snapshots(None);
                } else {
                    for tenant in pending.tenants {
                        self.forget_snapshots(Some(tenant));
                    }
                }
                self.changes_applied.store(seq, Ordering::SeqCst);
            }
        }
        fresh
    }

    /// `cached` when the in-memory view may decide, else `load` from the store. When the store
    /// cannot be reached, a cached value still serves if the view was fresh within the bulk
    /// key TTL: a node cut off from PostgreSQL keeps answering for hot keys (docs/DESIGN.md,
    /// "Cluster mode", says what that costs).
    fn trusted_or_loaded<T>(
        &self,
        cached: impl Fn() -> Option<T>,
        load: impl FnOnce() -> Result<T, Error>,
    ) -> Result<T, Error> {
        if self.cache_trusted() {
            return match cached() {
                Some(value) => Ok(value),
                None => load(),
            };
        }
        let offline_ok = self
            .store
            .changes()
            .is_some_and(|changes| changes.confirmed_within(self.bulk_key_ttl));
        let unreachable = self.store.changes().is_some_and(|c| c.unreachable());
        if unreachable && offline_ok {
            if let Some(value) = cached() {
                return Ok(value);
            }
        }
        match load() {
            Err(Error::Store(keystore::Error::Unavailable(reason))) if offline_ok => {
                cached().ok_or(Error::Store(keystore::Error::Unavailable(reason)))
            }
            result => result,
        }
    }

    /// Runs a tenant write (`write` opens the tenant's view, reads, decides and commits) again
    /// when another node committed to the tenant in between. Such a commit is refused as stale
    /// with nothing written, and the next attempt decides on a fresh view; a caller sees
    /// ABORTED only when the tenant keeps changing under every attempt.
    fn writing<T>(&self, mut write: impl FnMut() -> Result<T, Error>) -> Result<T, Error> {
        const ATTEMPTS: u64 = 8;
        let mut attempt = 1;
        loop {
            match write() {
                Err(Error::Store(keystore::Error::Stale(_))) if attempt < ATTEMPTS => {
                    // A short random pause: two nodes retrying in step would collide again.
                    std::thread::sleep(Duration::from_millis(rand::random_range(1..=4) * attempt));
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// Runs `read` on the tenant's database with the cache epoch taken before it. A view that
    /// turns out stale (another node committed since it was opened) is opened again and read
    /// again: a read must not fail because another node wrote.
    fn reading<T>(
        &self,
        tenant: TenantId,
        read: impl Fn(&TenantDb, u64) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let attempt = || {
            let epoch = self.epoch();
            let db = self.store.tenant(tenant)?;
            read(&db, epoch)
        };
        // Each retry needs yet another commit of another node in between (a rotation and a
        // CreateKey of one officer come milliseconds apart), so a few attempts always suffice
        // but under a steady stream of commits to one tenant.
        const ATTEMPTS: usize = 8;
        let mut result = attempt();
        for _ in 1..ATTEMPTS {
            if !matches!(result, Err(Error::Store(keystore::Error::Stale(_)))) {
                break;
            }
            result = attempt();
        }
        if let Err(Error::Store(keystore::Error::TenantDestroyed(_))) = &result {
            // Destroyed on another node: nothing of it may stay here, bulk keys included.
            self.forget_tenant(tenant);
        }
        result
    }

    /// Drops the key snapshots (and tenant ids) of `tenant`, or of every tenant, after other
    /// nodes committed. Bulk keys and usage counters stay: a bulk key only serves through a
    /// snapshot read again, and usage counts are this node's own.
    fn forget_snapshots(&self, tenant: Option<TenantId>) {
        let mut epoch = self.cache_epoch.write().expect("cache epoch lock poisoned");
        *epoch += 1;
        let mut primaries = self.primaries.write().expect("primaries lock poisoned");
        let mut versions = self.versions.write().expect("versions lock poisoned");
        match tenant {
            Some(tenant) => {
                self.tenant_ids.retain(|_, id| *id != tenant);
                primaries.remove(&tenant);
                versions.remove(&tenant);
            }
            None => {
                self.tenant_ids.clear();
                primaries.clear();
                versions.clear();
            }
        }
    }

    /// Whether a blob's key may serve this request: another purpose, or not the key the request
    /// named, is the opaque [`Error::Decrypt`]; a key outside the caller's allow-list is
    /// [`Error::PermissionDenied`].
    fn check_blob_key(
        name: &Name,
        key_purpose: Purpose,
        purpose: Purpose,
        expected: Option<&Name>,
        allowed: Option<&[Name]>,
    ) -> Result<(), Error> {
        if key_purpose != purpose || expected.is_some_and(|expected| name != expected) {
            return Err(Error::Decrypt);
        }
        if allowed.is_some_and(|keys| !keys.contains(name)) {
            return Err(Error::PermissionDenied);
        }
        Ok(())
    }

    fn version(
        &self,
        db: &TenantDb,
        record: &KeyRecord,
        version: KeyVersion,
    ) -> Result<VersionRecord, Error> {
        let found = db
            .version(&record.id, version)?
            .ok_or(keystore::Error::Integrity {
                database: db.id().to_string(),
                reason: "key names a version that does not exist",
            })?;
        Ok(found)
    }

    /// The cache epoch now (see `cache_epoch`).
    fn epoch(&self) -> u64 {
        *self.cache_epoch.read().expect("cache epoch lock poisoned")
    }

    /// Drops every in-memory snapshot and bulk key of a key after a lifecycle commit.
    fn invalidate_key(&self, tenant: TenantId, record: &KeyRecord) {
        let mut epoch = self.cache_epoch.write().expect("cache epoch lock poisoned");
        *epoch += 1;
        if let Some(keys) = self
            .primaries
            .write()
            .expect("primaries lock poisoned")
            .get_mut(&tenant)
        {
            keys.remove(&record.name);
        }
        if let Some(versions) = self
            .versions
            .write()
            .expect("versions lock poisoned")
            .get_mut(&tenant)
        {
            versions.retain(|(key_id, _), _| *key_id != record.id);
        }
        self.bulk_keys
            .retain(|(t, key_id, _), _| !(*t == tenant && *key_id == record.id));
    }

    /// Unwraps a KEK blob read from storage; a blob that fails to unwrap while the HSM passes
    /// its canary is a storage integrity failure.
    fn unwrap_stored_kek(&self, tenant: TenantId, blob: &[u8]) -> Result<Kek, Error> {
        let integrity = |reason| keystore::Error::Integrity {
            database: tenant.to_string(),
            reason,
        };
        let wrapped = WrappedKek::from_bytes(blob).ok_or(integrity("malformed KEK blob"))?;
        match self.hsm.unwrap_kek(&wrapped) {
            Ok(kek) => Ok(kek),
            Err(crate::hsm::Error::Integrity) => Err(match self.blame_input() {
                Error::Decrypt => integrity("KEK blob does not unwrap under its MWK").into(),
                hsm_fault => hsm_fault,
            }),
            Err(error) => Err(error.into()),
        }
    }

    /// A new version: KEK generated in the HSM, bulk key from the HSM's RNG encrypted by it.
    /// A MAC key's version is an HMAC key generated in the HSM, and has no bulk key; a SIGN
    /// key's is a key pair generated in the HSM, with its public key where the bulk key goes.
    ///
    /// `imported`: the version's KEK or MAC key, imported (key import) instead of generated.
    fn new_version(
        &self,
        tenant: TenantId,
        key_id: KeyId,
        version: KeyVersion,
        purpose: Purpose,
        policy: &KeyPolicy,
        imported: Option<WrappedKek>,
    ) -> Result<VersionRecord, Error> {
        let without_bulk_key = match (purpose, &imported) {
            (Purpose::Mac(_), Some(key)) => Some((key.clone(), Vec::new())),
            (Purpose::Mac(algorithm), None) => {
                Some((self.hsm.generate_mac_key(algorithm)?, Vec::new()))
            }
            (Purpose::Sign(algorithm), _) => Some(self.hsm.generate_signing_key(algorithm)?),
            (Purpose::Data | Purpose::Secrets, _) => None,
        };
        if let Some((wrapped, public_key)) = without_bulk_key {
            return Ok(VersionRecord {
                version,
                state: VersionState::Enabled,
                kek: wrapped.to_bytes(),
                bulk_key: public_key,
                created_at: self.clock.now_secs(),
                // MAC and signing keys have no nonces to wear out: their uses are not counted.
                reserved_kek_uses: 0,
                reserved_bulk_uses: 0,
            });
        }
        let wrapped = match imported {
            Some(kek) => kek,
            None => self.hsm.generate_kek()?,
        };
        let kek = self.hsm.unwrap_kek(&wrapped)?;
        let mut raw = [0u8; 32];
        self.hsm.random(&mut raw)?;
        let bulk = SecretKey::from_bytes(&mut raw);
        let aad = crypto::aad(
            BlobType::BulkKey,
            &tenant,
            &key_id,
            version,
            &EncryptionContext::new(),
        )?;
        let sealed = self.hsm.encrypt(&kek, &aad, bulk.expose_secret())?;
        let header = Header {
            blob_type: BlobType::BulkKey,
            key_id,
            version,
        };
        Ok(VersionRecord {
            version,
            state: VersionState::Enabled,
            kek: wrapped.to_bytes(),
            bulk_key: crypto::encode_blob(&header, &sealed.iv, &sealed.sealed),
            created_at: self.clock.now_secs(),
            // The first blocks are reserved in the commit that creates the version, so its
            // first uses need no commit of their own.
            reserved_kek_uses: Self::first_block(policy, UseKind::Kek),
            reserved_bulk_uses: Self::first_block(policy, UseKind::Bulk),
        })
    }

    /// The version's bulk key: from the cache, or unwrapped once through the HSM.
    fn bulk_key(
        &self,
        tenant: TenantId,
        record: &KeyRecord,
        version: &VersionRecord,
    ) -> Result<Arc<CachedBulkKey>, Error> {
        let key_id = record.id;
        let cache_key = (tenant, key_id, version.version);
        let epoch = self.epoch();
        if let Some(cached) = self.bulk_keys.get(&cache_key) {
            if cached.loaded.elapsed() < self.bulk_key_ttl {
                crate::metrics::global().cache("bulk_key", true);
                return Ok(cached);
            }
            // Expired: dropping the cache's reference zeroizes it once in-flight users finish.
            self.bulk_keys.remove(&cache_key);
        }
        crate::metrics::global().cache("bulk_key", false);
        let sweep_due = self
            .last_sweep
            .lock()
            .expect("sweep lock poisoned")
            .elapsed()
            >= self.bulk_key_ttl / 4;
        if sweep_due {
            self.evict_expired_bulk_keys();
        }
        let integrity = |reason| keystore::Error::Integrity {
            database: tenant.to_string(),
            reason,
        };
        let blob = crypto::parse_blob(&version.bulk_key, BlobType::BulkKey)
            .map_err(|_| integrity("malformed bulk key blob"))?;
        if blob.header.key_id != key_id || blob.header.version != version.version {
            return Err(integrity("bulk key blob of another version").into());
        }
        let kek = self.unwrap_stored_kek(tenant, &version.kek)?;
        let aad = crypto::aad(
            BlobType::BulkKey,
            &tenant,
            &key_id,
            version.version,
            &EncryptionContext::new(),
        )?;
        let raw = match self.hsm.decrypt(&kek, blob.nonce, &aad, blob.sealed) {
            Ok(raw) => raw,
            Err(crate::hsm::Error::Integrity) => {
                return Err(match self.blame_input() {
                    Error::Decrypt => integrity("bulk key does not decrypt under its KEK").into(),
                    hsm_fault => hsm_fault,
                });
            }
            Err(error) => return Err(error.into()),
        };
        let key = SecretKey::from_slice(raw.expose_secret())
            .ok_or(integrity("bulk key has the wrong length"))?;
        let cached = Arc::new(CachedBulkKey {
            key,
            loaded: Instant::now(),
        });
        // Not cached if a lifecycle change of this key happened meanwhile: a destroyed
        // version's key must not linger in memory.
        let current = self.cache_epoch.read().expect("cache epoch lock poisoned");
        if *current == epoch {
            self.bulk_keys.insert(cache_key, Arc::clone(&cached));
        }
        Ok(cached)
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
