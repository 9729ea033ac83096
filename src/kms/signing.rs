//! Signing keys (purpose SIGN): Sign, Verify and GetPublicKey. Each version's key pair was
//! generated in the HSM; its private key is stored only wrapped under the MWK and signs inside
//! the HSM, its public key (SubjectPublicKeyInfo DER) is stored in the version record, which
//! the storage MAC protects, so verification needs no HSM call.

use std::sync::Arc;

use super::{Error, KeySnapshot, Kms};
use crate::hsm::SignAlgorithm;
use crate::ids::{KeyId, KeyVersion, Name, TenantId};
use crate::keystore::Purpose;

/// What is signed: the message, or its digest made by the caller with the algorithm's hash.
#[derive(Clone, Copy)]
pub enum Signable<'a> {
    /// The message; keyfront hashes it.
    Message(&'a [u8]),
    /// Its digest, exactly [`SignAlgorithm::digest_len`] bytes.
    Digest(&'a [u8]),
}

impl std::fmt::Debug for Signable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The message may be private to the caller: its length only.
        match self {
            Self::Message(m) => write!(f, "Message([{} bytes])", m.len()),
            Self::Digest(d) => write!(f, "Digest([{} bytes])", d.len()),
        }
    }
}

/// Sign's result.
#[derive(Debug, Clone)]
pub struct Signature {
    /// The signature (ECDSA in DER).
    pub signature: Vec<u8>,
    /// The key that made it.
    pub key_id: KeyId,
    /// The version that made it: Verify needs it after a rotation.
    pub version: KeyVersion,
    /// Its algorithm.
    pub algorithm: SignAlgorithm,
}

/// Verify's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignatureCheck {
    /// Whether the signature is valid.
    pub valid: bool,
    /// The key that checked it.
    pub key_id: KeyId,
    /// The version that checked it.
    pub version: KeyVersion,
}

/// GetPublicKey's result.
#[derive(Debug, Clone)]
pub struct PublicKey {
    /// SubjectPublicKeyInfo, DER.
    pub der: Vec<u8>,
    /// The same, PEM.
    pub pem: String,
    /// The key.
    pub key_id: KeyId,
    /// The version.
    pub version: KeyVersion,
    /// Its algorithm.
    pub algorithm: SignAlgorithm,
}

impl Kms {
    /// The signature of `signable` under the primary version of a SIGN key, made in the HSM.
    ///
    /// # Errors
    /// [`Error::KeyNotFound`], [`Error::PurposeMismatch`] for a key of another purpose,
    /// [`Error::KeyState`] when the primary is not enabled, [`Error::InvalidArgument`] for a
    /// digest of the wrong length, HSM errors.
    pub fn sign(
        &self,
        tenant: TenantId,
        key: &Name,
        signable: Signable<'_>,
    ) -> Result<Signature, Error> {
        let snapshot = self.primary_snapshot(tenant, key)?;
        let algorithm = sign_algorithm(&snapshot)?;
        let digest = digest_of(algorithm, signable)?;
        self.check_use(&snapshot, "sign")?;
        let private = self.unwrap_stored_kek(tenant, &snapshot.primary.kek)?;
        let signature = self.hsm.sign_digest(&private, algorithm, &digest)?;
        Ok(Signature {
            signature,
            key_id: snapshot.record.id,
            version: snapshot.primary.version,
            algorithm,
        })
    }

    /// Whether `signature` is valid for `signable` under `version` of a SIGN key (`None`: the
    /// primary). The version must be enabled and not below the key's min_decryption_version.
    ///
    /// # Errors
    /// As [`Kms::sign`], plus [`Error::VersionNotFound`].
    pub fn verify(
        &self,
        tenant: TenantId,
        key: &Name,
        version: Option<KeyVersion>,
        signable: Signable<'_>,
        signature: &[u8],
    ) -> Result<SignatureCheck, Error> {
        let (snapshot, algorithm) = self.signing_version(tenant, key, version)?;
        if let Signable::Digest(digest) = signable {
            // A digest of the wrong length is refused, as in Sign.
            check_digest(algorithm, digest)?;
        }
        self.check_open(&snapshot, "verify signatures")?;
        let public = &snapshot.primary.bulk_key;
        let valid = match signable {
            Signable::Message(message) => algorithm.verify_message(public, message, signature),
            Signable::Digest(digest) => algorithm.verify(public, digest, signature),
        };
        Ok(SignatureCheck {
            valid,
            key_id: snapshot.record.id,
            version: snapshot.primary.version,
        })
    }

    /// The public key of `version` of a SIGN key (`None`: the primary), under the same rules
    /// as [`Kms::verify`].
    ///
    /// # Errors
    /// As [`Kms::verify`].
    pub fn public_key(
        &self,
        tenant: TenantId,
        key: &Name,
        version: Option<KeyVersion>,
    ) -> Result<PublicKey, Error> {
        let (snapshot, algorithm) = self.signing_version(tenant, key, version)?;
        self.check_open(&snapshot, "give out its public key")?;
        let der = snapshot.primary.bulk_key.clone();
        let pem = algorithm.public_key_pem(&der)?;
        Ok(PublicKey {
            der,
            pem,
            key_id: snapshot.record.id,
            version: snapshot.primary.version,
            algorithm,
        })
    }

    /// Sign with the HSM called on this thread, when the key is in memory and inline HSM calls
    /// are allowed; `None` otherwise (then [`Kms::sign`] on a blocking thread).
    pub fn sign_cached(
        &self,
        tenant: &Name,
        key: &Name,
        signable: Signable<'_>,
    ) -> Option<Result<Signature, Error>> {
        let tenant = self.inline_tenant(tenant)?;
        self.cached_primary(tenant, key)?;
        Some(self.timed_inline(|| self.sign(tenant, key, signable)))
    }

    /// Verify on this thread (no HSM call), when the key's primary and the named version are
    /// in memory; see [`Kms::sign_cached`].
    pub fn verify_cached(
        &self,
        tenant: &Name,
        key: &Name,
        version: Option<KeyVersion>,
        signable: Signable<'_>,
        signature: &[u8],
    ) -> Option<Result<SignatureCheck, Error>> {
        let tenant = self.inline_tenant(tenant)?;
        self.cached_named_version(tenant, key, version)?;
        Some(self.verify(tenant, key, version, signable, signature))
    }

    /// GetPublicKey on this thread, when the version is in memory; see [`Kms::sign_cached`].
    pub fn public_key_cached(
        &self,
        tenant: &Name,
        key: &Name,
        version: Option<KeyVersion>,
    ) -> Option<Result<PublicKey, Error>> {
        let tenant = self.inline_tenant(tenant)?;
        self.cached_named_version(tenant, key, version)?;
        Some(self.public_key(tenant, key, version))
    }

    /// The snapshot of `version` of a SIGN key (`None`: the primary), and its algorithm.
    fn signing_version(
        &self,
        tenant: TenantId,
        key: &Name,
        version: Option<KeyVersion>,
    ) -> Result<(Arc<KeySnapshot>, SignAlgorithm), Error> {
        let primary = self.primary_snapshot(tenant, key)?;
        let algorithm = sign_algorithm(&primary)?;
        Ok((
            self.named_version(tenant, key, primary, version)?,
            algorithm,
        ))
    }
}

fn sign_algorithm(snapshot: &KeySnapshot) -> Result<SignAlgorithm, Error> {
    match snapshot.record.purpose {
        Purpose::Sign(algorithm) => Ok(algorithm),
        purpose => Err(Error::PurposeMismatch {
            key: snapshot.record.name.clone(),
            purpose,
        }),
    }
}

fn digest_of(algorithm: SignAlgorithm, signable: Signable<'_>) -> Result<Vec<u8>, Error> {
    match signable {
        Signable::Message(message) => Ok(algorithm.digest(message)),
        Signable::Digest(digest) => {
            check_digest(algorithm, digest)?;
            Ok(digest.to_vec())
        }
    }
}

fn check_digest(algorithm: SignAlgorithm, digest: &[u8]) -> Result<(), Error> {
    if digest.len() == algorithm.digest_len() {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "message: a digest for this key is {} bytes, not {}",
        algorithm.digest_len(),
        digest.len()
    )))
}
