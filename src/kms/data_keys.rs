//! Data keys and sealed secrets, encrypted under the KEK inside the HSM (AES-GCM), and
//! re-encryption of ciphertexts and data keys under a key's primary version. A blob that does
//! not open is blamed on the input only while the HSM's canary still decrypts.

use zeroize::Zeroize;

use crate::crypto::{self, BlobType, EncryptionContext, Header, Plaintext};
use crate::ids::{KeyId, KeyVersion, Name, TenantId};
use crate::keystore::Purpose;

use super::error::Error;
use super::usage::UseKind;
use super::{DataKey, Decrypted, Encrypted, KeySnapshot, Kms, Sealed};

impl Kms {
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

    pub(super) fn seal_with_kek(
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

    pub(super) fn open_with_kek(
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
    pub(super) fn open_with_snapshot(
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
    pub(super) fn blame_input(&self) -> Error {
        match self.hsm.probe() {
            Ok(()) => Error::Decrypt,
            Err(error) => {
                tracing::warn!(%error, "HSM failed its canary after a failed decryption");
                Error::Hsm(error)
            }
        }
    }
}
