//! An in-memory fake of [`Hsm`] for fast unit tests. Not an HSM: keys live in process memory.
//!
//! It keeps the contract's observable behaviour (integrity failures, MWK generations, opaque
//! handles) but uses AES-256-GCM-SIV where the real HSM uses KWP and GCM; its audit signatures
//! are real ECDSA P-256, so the audit log it signs verifies like SoftHSM's. Everything that touches a real HSM is also tested on SoftHSM.

use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{
    Error, GcmSealed, HmacKey, Hsm, IMPORT_KEY_BITS, IMPORT_KEY_ONLY, IMPORT_OAEP_LEN, IV_LEN,
    ImportTarget, ImportWrapping, Imported, Kek, KeyCheckValue, MacAlgorithm, MwkGeneration,
    NOT_AN_IMPORT_KEY, SignAlgorithm, WrappedKek, WrappedKind,
};
use crate::crypto::{self, NONCE_LEN, Plaintext, SecretKey};

/// The fake HSM.
pub struct MemoryHsm {
    generation: MwkGeneration,
    mwk: SecretKey,
    storage_root: SecretKey,
    pepper: SecretKey,
    lookup: SecretKey,
    audit: p256::ecdsa::SigningKey,
}

struct MemoryKek(SecretKey);

/// An unwrapped MAC key: its bytes, zeroized on drop.
struct MemoryMacKey(zeroize::Zeroizing<Vec<u8>>);

/// A signing key unwrapped "in the HSM" (each type zeroizes itself on drop).
enum MemorySigningKey {
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
    Rsa(Box<rsa::pss::SigningKey<Sha256>>),
}

impl MemoryHsm {
    /// A fake token with fresh random keys, MWK generation 1.
    pub fn new() -> Self {
        Self {
            generation: MwkGeneration(1),
            mwk: SecretKey::random(),
            storage_root: SecretKey::random(),
            pepper: SecretKey::random(),
            lookup: SecretKey::random(),
            audit: random_signing_key(),
        }
    }
}

impl Default for MemoryHsm {
    fn default() -> Self {
        Self::new()
    }
}

const WRAP_AAD: &[u8] = b"keyfront/memory-hsm/kek";
const MAC_WRAP_AAD: &[u8] = b"keyfront/memory-hsm/mac-key";
const PRIVATE_WRAP_AAD: &[u8] = b"keyfront/memory-hsm/private-key";
const IMPORT_WRAP_AAD: &[u8] = b"keyfront/memory-hsm/import-key";

impl Hsm for MemoryHsm {
    fn mwk_generation(&self) -> MwkGeneration {
        self.generation
    }

    fn generate_kek(&self) -> Result<WrappedKek, Error> {
        let kek = SecretKey::random();
        let mut wrapped = Vec::new();
        crypto::seal(&self.mwk, WRAP_AAD, kek.expose_secret(), &mut wrapped);
        Ok(WrappedKek::new(self.generation, wrapped))
    }

    fn unwrap_kek(&self, wrapped: &WrappedKek) -> Result<Kek, Error> {
        if wrapped.generation() != self.generation {
            return Err(Error::UnknownMwk(wrapped.generation()));
        }
        if wrapped.kind() == WrappedKind::ImportKey {
            return Err(IMPORT_KEY_ONLY);
        }
        if matches!(
            wrapped.kind(),
            WrappedKind::EcPrivateKey | WrappedKind::RsaPrivateKey
        ) {
            return unwrap_signing_key(&self.mwk, wrapped);
        }
        if wrapped.kind() == WrappedKind::MacKey {
            let key = crypto::open(&self.mwk, MAC_WRAP_AAD, wrapped.wrapped())
                .map_err(|_| Error::Integrity)?;
            let bytes = zeroize::Zeroizing::new(key.expose_secret().to_vec());
            return Ok(Kek::new(Arc::new(MemoryMacKey(bytes))));
        }
        let kek =
            crypto::open(&self.mwk, WRAP_AAD, wrapped.wrapped()).map_err(|_| Error::Integrity)?;
        let kek = SecretKey::from_slice(kek.expose_secret()).ok_or(Error::Integrity)?;
        Ok(Kek::new(Arc::new(MemoryKek(kek))))
    }

    fn encrypt(&self, kek: &Kek, aad: &[u8], plaintext: &[u8]) -> Result<GcmSealed, Error> {
        if aad.is_empty() {
            return Err(Error::InvalidInput(
                "AES-GCM in the HSM needs non-empty AAD",
            ));
        }
        let kek = kek.downcast::<MemoryKek>()?;
        let mut out = Vec::new();
        crypto::seal(&kek.0, aad, plaintext, &mut out);
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&out[..NONCE_LEN]);
        Ok(GcmSealed {
            iv,
            sealed: out[NONCE_LEN..].to_vec(),
        })
    }

    fn decrypt(
        &self,
        kek: &Kek,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Plaintext, Error> {
        if aad.is_empty() {
            return Err(Error::InvalidInput(
                "AES-GCM in the HSM needs non-empty AAD",
            ));
        }
        let kek = kek.downcast::<MemoryKek>()?;
        let mut body = Vec::with_capacity(IV_LEN + sealed.len());
        body.extend_from_slice(iv);
        body.extend_from_slice(sealed);
        crypto::open(&kek.0, aad, &body).map_err(|_| Error::Integrity)
    }

    fn generate_mac_key(&self, algorithm: MacAlgorithm) -> Result<WrappedKek, Error> {
        let key = zeroize::Zeroizing::new({
            let mut key = vec![0u8; algorithm.key_len()];
            rand::fill(key.as_mut_slice());
            key
        });
        let mut wrapped = Vec::new();
        crypto::seal(&self.mwk, MAC_WRAP_AAD, &key, &mut wrapped);
        Ok(WrappedKek::of_kind(
            WrappedKind::MacKey,
            self.generation,
            wrapped,
        ))
    }

    fn mac(&self, key: &Kek, algorithm: MacAlgorithm, data: &[u8]) -> Result<Vec<u8>, Error> {
        let key = key.downcast::<MemoryMacKey>()?;
        if key.0.len() != algorithm.key_len() {
            return Err(Error::InvalidInput("MAC key of another algorithm"));
        }
        Ok(match algorithm {
            MacAlgorithm::HmacSha256 => hmac_of::<Hmac<Sha256>>(&key.0, data),
            MacAlgorithm::HmacSha512 => hmac_of::<Hmac<sha2::Sha512>>(&key.0, data),
        })
    }

    fn generate_signing_key(
        &self,
        algorithm: SignAlgorithm,
    ) -> Result<(WrappedKek, Vec<u8>), Error> {
        use p256::pkcs8::{EncodePrivateKey, EncodePublicKey};
        let internal = Error::Internal {
            rv: None,
            function: "generate_signing_key",
        };
        let mut rng = rsa::rand_core::OsRng;
        let (pkcs8, spki) = match algorithm {
            SignAlgorithm::EcdsaP256Sha256 => {
                let key = p256::SecretKey::random(&mut rng);
                (key.to_pkcs8_der(), key.public_key().to_public_key_der())
            }
            SignAlgorithm::EcdsaP384Sha384 => {
                let key = p384::SecretKey::random(&mut rng);
                (key.to_pkcs8_der(), key.public_key().to_public_key_der())
            }
            SignAlgorithm::RsaPss3072Sha256 => {
                let key = rsa::RsaPrivateKey::new(&mut rng, 3072).map_err(|_| internal.clone())?;
                (key.to_pkcs8_der(), key.to_public_key().to_public_key_der())
            }
        };
        let (pkcs8, spki) = (
            pkcs8.map_err(|_| internal.clone())?,
            spki.map_err(|_| internal)?,
        );
        let mut wrapped = Vec::new();
        crypto::seal(&self.mwk, PRIVATE_WRAP_AAD, pkcs8.as_bytes(), &mut wrapped);
        Ok((
            WrappedKek::of_kind(algorithm.wrapped_kind(), self.generation, wrapped),
            spki.as_bytes().to_vec(),
        ))
    }

    fn sign_digest(
        &self,
        key: &Kek,
        algorithm: SignAlgorithm,
        digest: &[u8],
    ) -> Result<Vec<u8>, Error> {
        use p256::ecdsa::signature::hazmat::{PrehashSigner, RandomizedPrehashSigner};
        if digest.len() != algorithm.digest_len() {
            return Err(Error::InvalidInput("a digest of the wrong length"));
        }
        let other = Error::InvalidInput("a signing key of another algorithm");
        let key = key.downcast::<MemorySigningKey>()?;
        match (algorithm, key) {
            (SignAlgorithm::EcdsaP256Sha256, MemorySigningKey::P256(key)) => {
                let signature: p256::ecdsa::Signature =
                    key.sign_prehash(digest).map_err(|_| other)?;
                Ok(signature.to_der().as_bytes().to_vec())
            }
            (SignAlgorithm::EcdsaP384Sha384, MemorySigningKey::P384(key)) => {
                let signature: p384::ecdsa::Signature =
                    key.sign_prehash(digest).map_err(|_| other)?;
                Ok(signature.to_der().as_bytes().to_vec())
            }
            (SignAlgorithm::RsaPss3072Sha256, MemorySigningKey::Rsa(key)) => {
                let signature = key
                    .sign_prehash_with_rng(&mut rsa::rand_core::OsRng, digest)
                    .map_err(|_| other)?;
                Ok(Box::<[u8]>::from(signature).into_vec())
            }
            _ => Err(other),
        }
    }

    fn generate_import_key(
        &self,
        wrapping: ImportWrapping,
    ) -> Result<(WrappedKek, Vec<u8>), Error> {
        use p256::pkcs8::{EncodePrivateKey, EncodePublicKey};
        // A real HSM may lack OAEP with SHA-256 (SoftHSM 2.6 does); this fake has both.
        let _ = wrapping;
        let internal = Error::Internal {
            rv: None,
            function: "generate_import_key",
        };
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, IMPORT_KEY_BITS)
            .map_err(|_| internal.clone())?;
        let pkcs8 = key.to_pkcs8_der().map_err(|_| internal.clone())?;
        let spki = key
            .to_public_key()
            .to_public_key_der()
            .map_err(|_| internal)?;
        let mut wrapped = Vec::new();
        crypto::seal(&self.mwk, IMPORT_WRAP_AAD, pkcs8.as_bytes(), &mut wrapped);
        Ok((
            WrappedKek::of_kind(WrappedKind::ImportKey, self.generation, wrapped),
            spki.as_bytes().to_vec(),
        ))
    }

    fn import_key(
        &self,
        import_key: &WrappedKek,
        wrapping: ImportWrapping,
        material: &[u8],
        target: ImportTarget,
    ) -> Result<Imported, Error> {
        use p256::pkcs8::DecodePrivateKey;
        if import_key.kind() != WrappedKind::ImportKey {
            return Err(NOT_AN_IMPORT_KEY);
        }
        if import_key.generation() != self.generation {
            return Err(Error::UnknownMwk(import_key.generation()));
        }
        let pkcs8 = crypto::open(&self.mwk, IMPORT_WRAP_AAD, import_key.wrapped())
            .map_err(|_| Error::Integrity)?;
        let private = rsa::RsaPrivateKey::from_pkcs8_der(pkcs8.expose_secret())
            .map_err(|_| Error::Integrity)?;
        let oaep = |block: &[u8]| {
            private
                .decrypt(crypto::import::oaep(wrapping), block)
                .map(zeroize::Zeroizing::new)
                .map_err(|_| Error::Integrity)
        };
        let key =
            if wrapping.aes_key_wrap() {
                let (block, wrapped) = material
                    .split_at_checked(IMPORT_OAEP_LEN)
                    .ok_or(Error::Integrity)?;
                let ephemeral = oaep(block)?;
                let ephemeral: zeroize::Zeroizing<[u8; 32]> =
                    zeroize::Zeroizing::new(ephemeral.as_slice().try_into().map_err(|_| {
                        Error::InvalidInput("the ephemeral AES key is not 256 bits")
                    })?);
                let kek = aes_kw::KekAes256::from(*ephemeral);
                zeroize::Zeroizing::new(
                    kek.unwrap_with_padding_vec(wrapped)
                        .map_err(|_| Error::Integrity)?,
                )
            } else {
                if material.len() != IMPORT_OAEP_LEN {
                    return Err(Error::Integrity);
                }
                oaep(material)?
            };
        if key.len() != target.key_len() {
            return Err(Error::InvalidInput("key material of the wrong length"));
        }
        let aad = match target {
            ImportTarget::Kek => WRAP_AAD,
            ImportTarget::MacKey(_) => MAC_WRAP_AAD,
        };
        let mut wrapped = Vec::new();
        crypto::seal(&self.mwk, aad, &key, &mut wrapped);
        Ok(Imported {
            key: WrappedKek::of_kind(target.kind(), self.generation, wrapped),
            check_value: KeyCheckValue::of(&key),
        })
    }

    fn random(&self, out: &mut [u8]) -> Result<(), Error> {
        rand::fill(out);
        Ok(())
    }

    fn hmac(&self, key: HmacKey, data: &[u8]) -> Result<[u8; 32], Error> {
        let key = match key {
            HmacKey::StorageRoot => &self.storage_root,
            HmacKey::Pepper => &self.pepper,
            HmacKey::Lookup => &self.lookup,
        };
        Ok(hmac_sha256(key, data))
    }

    fn probe(&self) -> Result<(), Error> {
        Ok(())
    }

    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, Error> {
        use p256::ecdsa::signature::Signer;
        let signature: p256::ecdsa::Signature = self.audit.sign(data);
        Ok(signature.to_bytes().to_vec())
    }

    fn audit_public_key(&self) -> Vec<u8> {
        self.audit
            .verifying_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }
}

/// A private key blob back into a signing key; the curve comes from the PKCS#8 inside.
fn unwrap_signing_key(mwk: &SecretKey, wrapped: &WrappedKek) -> Result<Kek, Error> {
    use p256::pkcs8::DecodePrivateKey;
    let pkcs8 =
        crypto::open(mwk, PRIVATE_WRAP_AAD, wrapped.wrapped()).map_err(|_| Error::Integrity)?;
    let der = pkcs8.expose_secret();
    let key = match wrapped.kind() {
        WrappedKind::RsaPrivateKey => rsa::RsaPrivateKey::from_pkcs8_der(der)
            .map(|k| MemorySigningKey::Rsa(Box::new(rsa::pss::SigningKey::new(k))))
            .map_err(|_| Error::Integrity)?,
        _ => match p256::ecdsa::SigningKey::from_pkcs8_der(der) {
            Ok(key) => MemorySigningKey::P256(key),
            Err(_) => p384::ecdsa::SigningKey::from_pkcs8_der(der)
                .map(MemorySigningKey::P384)
                .map_err(|_| Error::Integrity)?,
        },
    };
    Ok(Kek::new(Arc::new(key)))
}

fn random_signing_key() -> p256::ecdsa::SigningKey {
    // A random 32-byte string is a valid scalar except with negligible probability.
    loop {
        let bytes = zeroize::Zeroizing::new(rand::random::<[u8; 32]>());
        if let Ok(key) = p256::ecdsa::SigningKey::from_slice(bytes.as_slice()) {
            return key;
        }
    }
}

fn hmac_sha256(key: &SecretKey, data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&hmac_of::<Hmac<Sha256>>(key.expose_secret(), data));
    out
}

fn hmac_of<M: Mac + hmac::digest::KeyInit>(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = <M as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}
