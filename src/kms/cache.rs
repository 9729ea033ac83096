//! What a node keeps in memory and when it may trust it: key snapshots (a version's record
//! and KEK handle), primaries, bulk keys, cache epochs, and on a shared store the check that
//! this node's caches are still current before they answer.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::crypto::{self, BlobType, EncryptionContext, SecretKey};
use crate::ids::{KeyId, KeyVersion, Name, TenantId};
use crate::keystore::{self, KeyRecord, Purpose, TenantDb, VersionRecord, VersionState};

use super::error::Error;
use super::import::material_expiry;
use super::{CachedBulkKey, KeySnapshot, Kms};

impl Kms {
    pub(super) fn cached_version(
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

    pub(super) fn remember_version(
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
    pub(super) fn insert_version(&self, tenant: TenantId, snapshot: &Arc<KeySnapshot>, epoch: u64) {
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

    /// The key named by a request and its primary version, from memory or the store.
    pub(super) fn primary(
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
    pub(super) fn primary_snapshot(
        &self,
        tenant: TenantId,
        name: &Name,
    ) -> Result<Arc<KeySnapshot>, Error> {
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
    pub(super) fn remember_primary(
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

    pub(super) fn cached_primary(&self, tenant: TenantId, name: &Name) -> Option<Arc<KeySnapshot>> {
        self.primaries
            .read()
            .expect("primaries lock poisoned")
            .get(&tenant)?
            .get(name)
            .cloned()
    }

    /// A bulk key from memory, if cached and not expired.
    pub(super) fn cached_bulk_key(
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

    /// A version of a key (as a blob's header names them), from memory or the store. A key or
    /// version this tenant does not have is the one opaque [`Error::Decrypt`]: a caller must not
    /// learn whether a key id exists elsewhere.
    pub(super) fn version_snapshot(
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
    pub(super) fn named_version(
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
    pub(super) fn cached_named_version(
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
    pub(super) fn cache_trusted(&self) -> bool {
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
    pub(super) fn trusted_or_loaded<T>(
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
    pub(super) fn writing<T>(
        &self,
        mut write: impl FnMut() -> Result<T, Error>,
    ) -> Result<T, Error> {
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
    pub(super) fn reading<T>(
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
    pub(super) fn forget_snapshots(&self, tenant: Option<TenantId>) {
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
    pub(super) fn check_blob_key(
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

    pub(super) fn version(
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
    pub(super) fn epoch(&self) -> u64 {
        *self.cache_epoch.read().expect("cache epoch lock poisoned")
    }

    /// Drops every in-memory snapshot and bulk key of a key after a lifecycle commit.
    pub(super) fn invalidate_key(&self, tenant: TenantId, record: &KeyRecord) {
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

    /// The version's bulk key: from the cache, or unwrapped once through the HSM.
    pub(super) fn bulk_key(
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
