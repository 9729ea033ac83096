//! Keys and their versions: creation, lookup, rotation, purposes, and a new version's KEK
//! and bulk key made in the HSM and stored wrapped.

use crate::crypto::{self, BlobType, EncryptionContext, Header, SecretKey};
use crate::hsm::{Kek, WrappedKek};
use crate::ids::{KeyId, KeyVersion, Name, TenantId};
use crate::keystore::{
    self, KeyPolicy, KeyRecord, Purpose, TenantWrite, VersionRecord, VersionState,
};

use super::Kms;
use super::error::Error;
use super::usage::UseKind;

impl Kms {
    /// Creates a key at version 1.
    ///
    /// # Errors
    /// [`crate::keystore::Error::AlreadyExists`] if the tenant has a key of that name.
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

    pub(super) fn check_purpose(record: &KeyRecord, purpose: Purpose) -> Result<(), Error> {
        if record.purpose == purpose {
            Ok(())
        } else {
            Err(Error::PurposeMismatch {
                key: record.name.clone(),
                purpose: record.purpose,
            })
        }
    }

    /// A new version: KEK generated in the HSM, bulk key from the HSM's RNG encrypted by it.
    /// A MAC key's version is an HMAC key generated in the HSM, and has no bulk key; a SIGN
    /// key's is a key pair generated in the HSM, with its public key where the bulk key goes.
    ///
    /// `imported`: the version's KEK or MAC key, imported (key import) instead of generated.
    pub(super) fn new_version(
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

    /// Unwraps a KEK blob read from storage; a blob that fails to unwrap while the HSM passes
    /// its canary is a storage integrity failure.
    pub(super) fn unwrap_stored_kek(&self, tenant: TenantId, blob: &[u8]) -> Result<Kek, Error> {
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
}
