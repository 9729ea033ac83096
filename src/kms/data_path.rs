//! The data path: Encrypt and Decrypt under bulk keys held in memory, and the cached forms of
//! every data operation that the service calls on its async threads when the key is already
//! in memory (`hsm.inline_calls`), falling back to the blocking pool when it is not.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::crypto::{
    self, BlobType, EncryptionContext, HEADER_LEN, Header, NONCE_LEN, Plaintext, TAG_LEN,
};
use crate::ids::{Name, TenantId};
use crate::keystore::Purpose;

use super::error::Error;
use super::usage::{Taken, UseKind};
use super::{CachedBulkKey, DataKey, Decrypted, Encrypted, KeySnapshot, Kms, Sealed};

impl Kms {
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
    pub(super) fn open_cached(
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
    pub(super) fn inline_tenant(&self, tenant: &Name) -> Option<TenantId> {
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
    pub(super) fn timed_inline<T>(&self, operation: impl FnOnce() -> T) -> T {
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

    pub(super) fn millis_since_open(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(super) fn seal_locally(
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
}

/// What a caller opens: the three kinds of blob that Decrypt, DecryptDataKey and UnsealSecret
/// take, which differ only in their blob type (and a ciphertext's optional expected key).
#[derive(Clone, Debug)]
pub enum Opening {
    /// A ciphertext (Encrypt's), and the key the caller expects it under, if any.
    Ciphertext(Option<Name>),
    /// A wrapped data key (GenerateDataKey's).
    DataKey,
    /// A sealed secret (SealSecret's).
    Secret,
}

impl Kms {
    /// Opens `blob` from memory alone, as [`Kms::decrypt_cached`],
    /// [`Kms::decrypt_data_key_cached`] or [`Kms::unseal_secret_cached`] by its kind.
    pub fn open_blob_cached(
        &self,
        tenant: &Name,
        blob: &[u8],
        what: &Opening,
        context: &EncryptionContext,
        allowed: Option<&[Name]>,
    ) -> Option<Result<Decrypted, Error>> {
        match what {
            Opening::Ciphertext(key) => {
                self.decrypt_cached(tenant, blob, context, key.as_ref(), allowed)
            }
            Opening::DataKey => self.decrypt_data_key_cached(tenant, blob, context, allowed),
            Opening::Secret => self.unseal_secret_cached(tenant, blob, context, allowed),
        }
    }

    /// Opens `blob`, as [`Kms::decrypt_scoped`], [`Kms::decrypt_data_key_scoped`] or
    /// [`Kms::unseal_secret_scoped`] by its kind.
    ///
    /// # Errors
    /// As those.
    pub fn open_blob(
        &self,
        tenant: TenantId,
        blob: &[u8],
        what: &Opening,
        context: &EncryptionContext,
        allowed: Option<&[Name]>,
    ) -> Result<Decrypted, Error> {
        match what {
            Opening::Ciphertext(key) => {
                self.decrypt_scoped(tenant, blob, context, key.as_ref(), allowed)
            }
            Opening::DataKey => self.decrypt_data_key_scoped(tenant, blob, context, allowed),
            Opening::Secret => self.unseal_secret_scoped(tenant, blob, context, allowed),
        }
    }
}
