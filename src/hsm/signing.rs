//! Signing keys (purpose SIGN): the algorithms, and what is done with their public halves
//! outside the HSM. The private key is generated in the HSM and used only there (see
//! [`super::Hsm::generate_signing_key`] and [`super::Hsm::sign_digest`]); the public key is
//! public, so encoding it (SubjectPublicKeyInfo DER, PEM) and verifying signatures with it
//! happen here, in software, without an HSM call.

use p256::pkcs8::{DecodePublicKey, EncodePublicKey, LineEnding};
use sha2::Digest;

use super::{Error, WrappedKind};

/// The signatures a signing key makes. Ed25519 is missing on purpose: SoftHSM 2.6 signs with
/// it but cannot wrap its private key (`C_WrapKey` answers CKR_KEY_NOT_WRAPPABLE), so it could
/// not be stored wrapped under the MWK as every other key is (docs/DESIGN.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum SignAlgorithm {
    /// ECDSA on P-256 over SHA-256; DER-encoded signatures (ASN.1 ECDSA-Sig-Value).
    EcdsaP256Sha256,
    /// ECDSA on P-384 over SHA-384; DER-encoded signatures.
    EcdsaP384Sha384,
    /// RSASSA-PSS with a 3072-bit key, SHA-256, MGF1-SHA-256 and a 32-byte salt.
    RsaPss3072Sha256,
}

impl SignAlgorithm {
    /// Length of the digest it signs, in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Self::EcdsaP256Sha256 | Self::RsaPss3072Sha256 => 32,
            Self::EcdsaP384Sha384 => 48,
        }
    }

    /// The digest of `message` that it signs.
    pub fn digest(self, message: &[u8]) -> Vec<u8> {
        match self {
            Self::EcdsaP256Sha256 | Self::RsaPss3072Sha256 => {
                sha2::Sha256::digest(message).to_vec()
            }
            Self::EcdsaP384Sha384 => sha2::Sha384::digest(message).to_vec(),
        }
    }

    /// What its private key is stored as.
    pub fn wrapped_kind(self) -> WrappedKind {
        match self {
            Self::EcdsaP256Sha256 | Self::EcdsaP384Sha384 => WrappedKind::EcPrivateKey,
            Self::RsaPss3072Sha256 => WrappedKind::RsaPrivateKey,
        }
    }

    /// Whether `signature` is this algorithm's signature of `digest` under the public key
    /// `spki` (SubjectPublicKeyInfo DER). Anything malformed is simply not valid.
    pub fn verify(self, spki: &[u8], digest: &[u8], signature: &[u8]) -> bool {
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        if digest.len() != self.digest_len() {
            return false;
        }
        match self {
            Self::EcdsaP256Sha256 => {
                let (Ok(key), Ok(signature)) = (
                    p256::ecdsa::VerifyingKey::from_public_key_der(spki),
                    p256::ecdsa::Signature::from_der(signature),
                ) else {
                    return false;
                };
                key.verify_prehash(digest, &signature).is_ok()
            }
            Self::EcdsaP384Sha384 => {
                let (Ok(key), Ok(signature)) = (
                    p384::ecdsa::VerifyingKey::from_public_key_der(spki),
                    p384::ecdsa::Signature::from_der(signature),
                ) else {
                    return false;
                };
                key.verify_prehash(digest, &signature).is_ok()
            }
            Self::RsaPss3072Sha256 => {
                let Ok(key) = rsa::RsaPublicKey::from_public_key_der(spki) else {
                    return false;
                };
                let Ok(signature) = rsa::pss::Signature::try_from(signature) else {
                    return false;
                };
                rsa::pss::VerifyingKey::<sha2::Sha256>::new(key)
                    .verify_prehash(digest, &signature)
                    .is_ok()
            }
        }
    }

    /// Whether `signature` is this algorithm's signature of `message` (hashed here) under the
    /// public key `spki`. Uses ring, whose P-256, P-384 and RSA are several times faster than
    /// the pure-Rust crates [`SignAlgorithm::verify`] needs for prehashed digests.
    pub fn verify_message(self, spki: &[u8], message: &[u8], signature: &[u8]) -> bool {
        use ring::signature as ring;
        // The BIT STRING of the SPKI: the SEC1 point (EC) or RSAPublicKey DER (RSA), which is
        // what ring takes.
        let Ok(info) = spki::SubjectPublicKeyInfoRef::try_from(spki) else {
            return false;
        };
        let Some(public) = info.subject_public_key.as_bytes() else {
            return false;
        };
        let algorithm: &dyn ring::VerificationAlgorithm = match self {
            Self::EcdsaP256Sha256 => &ring::ECDSA_P256_SHA256_ASN1,
            Self::EcdsaP384Sha384 => &ring::ECDSA_P384_SHA384_ASN1,
            // keyfront's keys are 3072-bit (generated so, stored under the record MAC); ring
            // refuses anything outside 2048..8192 bits by itself.
            Self::RsaPss3072Sha256 => &ring::RSA_PSS_2048_8192_SHA256,
        };
        ring::UnparsedPublicKey::new(algorithm, public)
            .verify(message, signature)
            .is_ok()
    }

    /// `spki` (SubjectPublicKeyInfo DER) as PEM (`-----BEGIN PUBLIC KEY-----`), after checking
    /// that it is a public key of this algorithm.
    ///
    /// # Errors
    /// [`Error::Integrity`] for anything else (a stored public key is MAC-protected, so this
    /// means a fault, not bad input).
    pub fn public_key_pem(self, spki: &[u8]) -> Result<String, Error> {
        let pem = match self {
            Self::EcdsaP256Sha256 => p256::PublicKey::from_public_key_der(spki)
                .ok()
                .and_then(|k| k.to_public_key_pem(LineEnding::LF).ok()),
            Self::EcdsaP384Sha384 => p384::PublicKey::from_public_key_der(spki)
                .ok()
                .and_then(|k| k.to_public_key_pem(LineEnding::LF).ok()),
            Self::RsaPss3072Sha256 => rsa::RsaPublicKey::from_public_key_der(spki)
                .ok()
                .filter(|k| rsa::traits::PublicKeyParts::size(k) == 384)
                .and_then(|k| k.to_public_key_pem(LineEnding::LF).ok()),
        };
        pem.ok_or(Error::Integrity)
    }
}

/// SubjectPublicKeyInfo DER of an EC public key given as a SEC1 point.
pub(crate) fn ec_spki(algorithm: SignAlgorithm, point: &[u8]) -> Option<Vec<u8>> {
    let der = match algorithm {
        SignAlgorithm::EcdsaP256Sha256 => p256::PublicKey::from_sec1_bytes(point)
            .ok()?
            .to_public_key_der()
            .ok()?,
        SignAlgorithm::EcdsaP384Sha384 => p384::PublicKey::from_sec1_bytes(point)
            .ok()?
            .to_public_key_der()
            .ok()?,
        SignAlgorithm::RsaPss3072Sha256 => return None,
    };
    Some(der.as_bytes().to_vec())
}

/// SubjectPublicKeyInfo DER of an RSA public key given as big-endian modulus and exponent.
pub(crate) fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> Option<Vec<u8>> {
    let key = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(modulus),
        rsa::BigUint::from_bytes_be(exponent),
    )
    .ok()?;
    Some(key.to_public_key_der().ok()?.as_bytes().to_vec())
}

/// An ECDSA signature as PKCS#11 returns it (r ‖ s) in DER, as verifiers expect it.
pub(crate) fn ecdsa_der(algorithm: SignAlgorithm, raw: &[u8]) -> Option<Vec<u8>> {
    match algorithm {
        SignAlgorithm::EcdsaP256Sha256 => Some(
            p256::ecdsa::Signature::from_slice(raw)
                .ok()?
                .to_der()
                .as_bytes()
                .to_vec(),
        ),
        SignAlgorithm::EcdsaP384Sha384 => Some(
            p384::ecdsa::Signature::from_slice(raw)
                .ok()?
                .to_der()
                .as_bytes()
                .to_vec(),
        ),
        SignAlgorithm::RsaPss3072Sha256 => None,
    }
}
