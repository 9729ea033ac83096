//! The narrow `Hsm` trait that keyfront needs from an HSM, and its implementations.
//!
//! - [`pkcs11::Pkcs11Hsm`]: the real one, over cryptoki (SoftHSM in dev and tests).
//! - [`memory::MemoryHsm`]: an in-memory fake for fast unit tests; not for production.
//! - [`faulty::FaultyHsm`]: wraps any `Hsm`, counts calls and injects failures, for tests.
//! - [`reconnect::ReconnectingHsm`]: swaps in a fresh instance when the HSM comes back.
//! - [`metered::MeteredHsm`]: records each operation in the metrics.
//!
//! The trait is synchronous: PKCS#11 calls block. Callers on an async runtime cross into it
//! through one helper in the service layer.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use cryptoki::context::Function;
use cryptoki::error::RvError;

use crate::crypto::Plaintext;
pub use crate::crypto::import::{IMPORT_KEY_BITS, ImportWrapping};

pub mod decorate;
pub mod faulty;
pub mod memory;
pub mod metered;
pub mod pkcs11;
pub mod reconnect;
pub mod signing;

pub use signing::SignAlgorithm;

/// GCM IV length used by the HSM's AES-GCM (96 bits).
pub const IV_LEN: usize = 12;

/// An HSM that holds the MWK and performs the operations keyfront needs; an implementor promises
/// that KEKs and the MWK never leave it in clear and that failures map to [`Error`] as documented.
pub trait Hsm: Send + Sync {
    /// The MWK generation under which [`Hsm::generate_kek`] wraps new KEKs.
    fn mwk_generation(&self) -> MwkGeneration;

    /// Generates an AES-256 KEK inside the HSM and returns it only wrapped under the current MWK.
    ///
    /// # Errors
    /// [`Error::Unavailable`] if the HSM cannot be reached; nothing is left behind on the token.
    fn generate_kek(&self) -> Result<WrappedKek, Error>;

    /// Unwraps a KEK blob into a sensitive, non-extractable object inside the HSM: an AES key
    /// for AES-GCM, a MAC key for [`Hsm::mac`] or a private key for [`Hsm::sign_digest`], as
    /// the blob's kind says.
    ///
    /// Implementations cache handles (bounded); the object is destroyed only after the last
    /// [`Kek`] referring to it is dropped.
    ///
    /// # Errors
    /// [`Error::UnknownMwk`] if the blob's MWK generation is not on this token;
    /// [`Error::Integrity`] if the blob does not authenticate under that MWK.
    fn unwrap_kek(&self, wrapped: &WrappedKek) -> Result<Kek, Error>;

    /// AES-256-GCM encryption inside the HSM with a fresh random IV; `aad` must not be empty.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for empty AAD, [`Error::Unavailable`] if the HSM is gone.
    fn encrypt(&self, kek: &Kek, aad: &[u8], plaintext: &[u8]) -> Result<GcmSealed, Error>;

    /// AES-256-GCM decryption inside the HSM; `sealed` is ciphertext ‖ tag.
    ///
    /// # Errors
    /// [`Error::Integrity`] when the tag does not verify (wrong key, AAD or data).
    fn decrypt(
        &self,
        kek: &Kek,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Plaintext, Error>;

    /// Generates an HMAC key for `algorithm` inside the HSM and returns it only wrapped under
    /// the current MWK (a [`WrappedKind::MacKey`] blob). [`Hsm::unwrap_kek`] brings it back as
    /// a sensitive object that can only compute that MAC.
    ///
    /// # Errors
    /// [`Error::Unavailable`] if the HSM cannot be reached; nothing is left behind on the token.
    fn generate_mac_key(&self, algorithm: MacAlgorithm) -> Result<WrappedKek, Error>;

    /// The MAC of `data` inside the HSM, under an unwrapped MAC key.
    ///
    /// # Errors
    /// [`Error::InvalidHandle`] for a handle that is not a MAC key of this HSM,
    /// [`Error::Unavailable`] if the HSM is gone.
    fn mac(&self, key: &Kek, algorithm: MacAlgorithm, data: &[u8]) -> Result<Vec<u8>, Error>;

    /// Generates a key pair for `algorithm` inside the HSM. The private key comes back only
    /// wrapped under the current MWK (of kind [`SignAlgorithm::wrapped_kind`]);
    /// [`Hsm::unwrap_kek`] brings it back as a sensitive object that can only sign with that
    /// algorithm. The public key comes back as SubjectPublicKeyInfo DER.
    ///
    /// # Errors
    /// [`Error::Unavailable`] if the HSM cannot be reached; nothing is left behind on the token.
    fn generate_signing_key(
        &self,
        algorithm: SignAlgorithm,
    ) -> Result<(WrappedKek, Vec<u8>), Error>;

    /// The signature of a digest (of [`SignAlgorithm::digest_len`] bytes) inside the HSM, under
    /// an unwrapped signing key; ECDSA signatures in DER.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a digest of the wrong length, [`Error::InvalidHandle`] for a
    /// handle that is not a signing key of this HSM, [`Error::Unavailable`] if the HSM is gone.
    fn sign_digest(
        &self,
        key: &Kek,
        algorithm: SignAlgorithm,
        digest: &[u8],
    ) -> Result<Vec<u8>, Error>;

    /// Generates an RSA-3072 key pair that key material for import is wrapped to (BYOK). The
    /// private key comes back only wrapped under the current MWK (a [`WrappedKind::ImportKey`]
    /// blob) and can only ever unwrap, with RSA-OAEP; the public key comes back as
    /// SubjectPublicKeyInfo DER.
    ///
    /// # Errors
    /// [`Error::Unsupported`] if the HSM cannot unwrap with `wrapping`'s OAEP hash (it is
    /// asked, not assumed); [`Error::Unavailable`] if the HSM cannot be reached.
    fn generate_import_key(&self, wrapping: ImportWrapping)
    -> Result<(WrappedKek, Vec<u8>), Error>;

    /// Unwraps key material a caller wrapped to an import key's public key with `wrapping`,
    /// inside the HSM, into a key of `target`, and returns it only wrapped under the current
    /// MWK (as [`Hsm::generate_kek`] or [`Hsm::generate_mac_key`] would have). The material is
    /// never in clear outside the HSM: RSA-AES key wrap is done as two unwraps, RSA-OAEP of the
    /// ephemeral AES key into a session object and AES-KWP of the material under it.
    ///
    /// # Errors
    /// [`Error::Integrity`] if the material does not unwrap under this import key (tampered, or
    /// wrapped to another key); [`Error::InvalidInput`] for material of the wrong length or an
    /// `import_key` blob that is not an import key; [`Error::Unsupported`] as
    /// [`Hsm::generate_import_key`].
    fn import_key(
        &self,
        import_key: &WrappedKek,
        wrapping: ImportWrapping,
        material: &[u8],
        target: ImportTarget,
    ) -> Result<Imported, Error>;

    /// Fills `out` with random bytes from the HSM's RNG.
    ///
    /// # Errors
    /// [`Error::Unavailable`] if the HSM is gone.
    fn random(&self, out: &mut [u8]) -> Result<(), Error>;

    /// HMAC-SHA256 inside the HSM under one of its long-lived secret keys.
    ///
    /// # Errors
    /// [`Error::Unavailable`] if the HSM is gone.
    fn hmac(&self, key: HmacKey, data: &[u8]) -> Result<[u8; 32], Error>;

    /// ECDSA P-256 signature (r ‖ s, 64 bytes) over SHA-256 of `data`, with the audit key.
    ///
    /// # Errors
    /// [`Error::Unavailable`] if the HSM is gone.
    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, Error>;

    /// The audit signing key's public half: a SEC1 uncompressed P-256 point (65 bytes), read
    /// once when the HSM is opened. Empty when the HSM cannot be reached at all.
    fn audit_public_key(&self) -> Vec<u8>;

    /// Creates the next MWK generation on the token (same template as the ceremony's) and makes
    /// it current: new KEKs are wrapped under it. Older generations stay for unwrapping.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if this HSM cannot rotate its master key.
    fn create_mwk(&self) -> Result<MwkGeneration, Error> {
        Err(Error::InvalidInput("this HSM cannot rotate its master key"))
    }

    /// Re-wraps a KEK blob under the current MWK inside the HSM: unwrapped under its own
    /// generation into a sensitive session object, wrapped under the current one, destroyed.
    /// The KEK is never in clear outside the HSM. A blob already current comes back as is.
    ///
    /// # Errors
    /// [`Error::UnknownMwk`], [`Error::Integrity`] as [`Hsm::unwrap_kek`].
    fn rewrap_kek(&self, wrapped: &WrappedKek) -> Result<WrappedKek, Error> {
        if wrapped.generation() == self.mwk_generation() {
            return Ok(wrapped.clone());
        }
        Err(Error::InvalidInput("this HSM cannot rotate its master key"))
    }

    /// Destroys a retired (not current) MWK generation on the token.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for the current generation or an HSM that cannot do it.
    fn destroy_mwk(&self, generation: MwkGeneration) -> Result<(), Error> {
        let _ = generation;
        Err(Error::InvalidInput("this HSM cannot destroy a master key"))
    }

    /// The MWK generations on the token, oldest first.
    fn mwk_generations(&self) -> Vec<MwkGeneration> {
        vec![self.mwk_generation()]
    }

    /// Checks that the HSM works end to end with a known canary: an MWK unwrap that bypasses
    /// every cache, then an AES-GCM decryption of a known value. Used before calling a failed
    /// decryption "tampered" (a sick HSM fails the same way) and by health checks.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the canary does not come back as it went in.
    fn probe(&self) -> Result<(), Error>;
}

/// The long-lived HMAC keys the init ceremony puts on the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HmacKey {
    /// Root of the storage MAC key, which is derived from it into memory at start.
    StorageRoot,
    /// Password pepper; password HMACs are computed inside the HSM with it.
    Pepper,
    /// Lookup digests of API tokens (SealSecret, LookupDigest).
    Lookup,
}

/// The MACs a MAC key computes (purpose MAC); its key is as long as the hash's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum MacAlgorithm {
    /// HMAC-SHA-256, 256-bit key, 32-byte MAC.
    HmacSha256,
    /// HMAC-SHA-512, 512-bit key, 64-byte MAC.
    HmacSha512,
}

impl MacAlgorithm {
    /// Key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            Self::HmacSha256 => 32,
            Self::HmacSha512 => 64,
        }
    }

    /// MAC length in bytes.
    pub fn mac_len(self) -> usize {
        self.key_len()
    }
}

/// What [`Hsm::import_key`] made: the material wrapped under the current MWK, and its check
/// value, computed inside the HSM while the material was unwrapped there.
#[derive(Debug)]
pub struct Imported {
    /// The material as a KEK or MAC key blob.
    pub key: WrappedKek,
    /// Its key check value.
    pub check_value: KeyCheckValue,
}

/// The input of a key check value.
pub const KCV_MESSAGE: &[u8] = b"keyfront/v1/kcv";

/// A key check value: the first 8 bytes of HMAC-SHA-256(material, `keyfront/v1/kcv`). It
/// identifies imported material in the audit log and to the officer who approves an import,
/// without revealing it: the key's owner computes the same from the material they hold
/// (`openssl dgst -sha256 -mac HMAC -macopt hexkey:MATERIAL` of the message), and nobody can
/// find the material from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyCheckValue(pub [u8; 8]);

impl KeyCheckValue {
    /// The check value of material held in clear (the key's owner; the in-memory fake).
    pub fn of(material: &[u8]) -> Self {
        use hmac::{Hmac, Mac};
        // Invariant: HMAC takes a key of any length.
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(material).expect("HMAC takes any key");
        mac.update(KCV_MESSAGE);
        Self::from_mac(&mac.finalize().into_bytes())
    }

    /// The check value from a full HMAC-SHA-256 of [`KCV_MESSAGE`].
    pub fn from_mac(mac: &[u8]) -> Self {
        let mut value = [0; 8];
        let n = mac.len().min(8);
        value[..n].copy_from_slice(&mac[..n]);
        Self(value)
    }
}

impl fmt::Display for KeyCheckValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// [`Hsm::unwrap_kek`] (and master key rotation) given an import key blob.
pub const IMPORT_KEY_ONLY: Error =
    Error::InvalidInput("an import key unwraps only key material for import");
/// [`Hsm::import_key`] given a blob that is not an import key.
pub const NOT_AN_IMPORT_KEY: Error = Error::InvalidInput("not an import key");

/// The length of one RSA-OAEP block under an import key.
pub const IMPORT_OAEP_LEN: usize = IMPORT_KEY_BITS / 8;

/// What imported key material becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImportTarget {
    /// An AES-256 KEK (purposes DATA and SECRETS): 32 bytes.
    Kek,
    /// An HMAC key for this algorithm: as long as [`MacAlgorithm::key_len`].
    MacKey(MacAlgorithm),
}

impl ImportTarget {
    /// The material's length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            Self::Kek => 32,
            Self::MacKey(algorithm) => algorithm.key_len(),
        }
    }

    /// The kind of blob it is stored as.
    pub fn kind(self) -> WrappedKind {
        match self {
            Self::Kek => WrappedKind::Kek,
            Self::MacKey(_) => WrappedKind::MacKey,
        }
    }
}

/// What a wrapped blob holds: it decides the template the key is unwrapped into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WrappedKind {
    /// An AES-256 KEK (AES-GCM only). Blob type [`KEK_BLOB_TYPE`].
    Kek,
    /// An HMAC key (sign and verify with its MAC only). Blob type [`MAC_KEY_BLOB_TYPE`].
    MacKey,
    /// An EC private key (ECDSA signing only). Blob type [`EC_PRIVATE_KEY_BLOB_TYPE`].
    EcPrivateKey,
    /// An RSA private key (RSA-PSS signing only). Blob type [`RSA_PRIVATE_KEY_BLOB_TYPE`].
    RsaPrivateKey,
    /// The RSA private key of import parameters (RSA-OAEP unwrapping only, by
    /// [`Hsm::import_key`]; [`Hsm::unwrap_kek`] refuses it). Blob type
    /// [`IMPORT_KEY_BLOB_TYPE`].
    ImportKey,
}

/// A generation of the master wrapping key; also its CKA_ID (u32 big-endian) on the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MwkGeneration(pub u32);

impl fmt::Display for MwkGeneration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A KEK (or MAC key) wrapped under an MWK with AES-KWP (RFC 5649): safe to store, useless
/// without the HSM.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKek {
    kind: WrappedKind,
    generation: MwkGeneration,
    wrapped: Vec<u8>,
}

/// Type byte of a serialized KEK blob (after the four types in `crypto::BlobType`).
pub const KEK_BLOB_TYPE: u8 = 0x05;
/// Type byte of a serialized MAC key blob; the same layout as a KEK blob.
pub const MAC_KEY_BLOB_TYPE: u8 = 0x06;
/// Type byte of a serialized EC private key blob (PKCS#8 wrapped with KWP); same layout.
pub const EC_PRIVATE_KEY_BLOB_TYPE: u8 = 0x07;
/// Type byte of a serialized RSA private key blob (PKCS#8 wrapped with KWP); same layout.
pub const RSA_PRIVATE_KEY_BLOB_TYPE: u8 = 0x08;
/// Type byte of a serialized import key blob (PKCS#8 wrapped with KWP); same layout.
pub const IMPORT_KEY_BLOB_TYPE: u8 = 0x09;
/// Format version of a serialized KEK, MAC key or private key blob.
pub const KEK_BLOB_VERSION: u8 = 1;

impl WrappedKek {
    /// A wrapped KEK as the HSM returned it.
    pub fn new(generation: MwkGeneration, wrapped: Vec<u8>) -> Self {
        Self::of_kind(WrappedKind::Kek, generation, wrapped)
    }

    /// A wrapped key of `kind` as the HSM returned it.
    pub fn of_kind(kind: WrappedKind, generation: MwkGeneration, wrapped: Vec<u8>) -> Self {
        Self {
            kind,
            generation,
            wrapped,
        }
    }

    /// What it holds.
    pub fn kind(&self) -> WrappedKind {
        self.kind
    }

    /// The MWK generation that wrapped it.
    pub fn generation(&self) -> MwkGeneration {
        self.generation
    }

    /// The KWP output.
    pub fn wrapped(&self) -> &[u8] {
        &self.wrapped
    }

    /// `0x05 (KEK), 0x06 (MAC key), 0x07 (EC private key), 0x08 (RSA private key) or 0x09
    /// (import key) ‖ format version ‖ MWK generation (u32 BE) ‖ KWP output`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + self.wrapped.len());
        out.push(match self.kind {
            WrappedKind::Kek => KEK_BLOB_TYPE,
            WrappedKind::MacKey => MAC_KEY_BLOB_TYPE,
            WrappedKind::EcPrivateKey => EC_PRIVATE_KEY_BLOB_TYPE,
            WrappedKind::RsaPrivateKey => RSA_PRIVATE_KEY_BLOB_TYPE,
            WrappedKind::ImportKey => IMPORT_KEY_BLOB_TYPE,
        });
        out.push(KEK_BLOB_VERSION);
        out.extend_from_slice(&self.generation.0.to_be_bytes());
        out.extend_from_slice(&self.wrapped);
        out
    }

    /// Parses [`WrappedKek::to_bytes`]; `None` for anything else. Never panics.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let (head, wrapped) = bytes.split_at_checked(6)?;
        let kind = match head[0] {
            KEK_BLOB_TYPE => WrappedKind::Kek,
            MAC_KEY_BLOB_TYPE => WrappedKind::MacKey,
            EC_PRIVATE_KEY_BLOB_TYPE => WrappedKind::EcPrivateKey,
            RSA_PRIVATE_KEY_BLOB_TYPE => WrappedKind::RsaPrivateKey,
            IMPORT_KEY_BLOB_TYPE => WrappedKind::ImportKey,
            _ => return None,
        };
        if head[1] != KEK_BLOB_VERSION || wrapped.is_empty() {
            return None;
        }
        let generation = u32::from_be_bytes(head[2..6].try_into().ok()?);
        Some(Self::of_kind(
            kind,
            MwkGeneration(generation),
            wrapped.to_vec(),
        ))
    }
}

impl fmt::Debug for WrappedKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedKek")
            .field("kind", &self.kind)
            .field("generation", &self.generation)
            .field("len", &self.wrapped.len())
            .finish()
    }
}

/// A handle to a KEK unwrapped inside the HSM. Cloning shares the handle; the HSM object is
/// destroyed after the last clone (and the implementation's cache entry) is dropped.
#[derive(Clone)]
pub struct Kek(Arc<dyn Any + Send + Sync>);

impl Kek {
    pub(crate) fn new<T: Any + Send + Sync>(inner: Arc<T>) -> Self {
        Self(inner)
    }

    pub(crate) fn downcast<T: Any + Send + Sync>(&self) -> Result<&T, Error> {
        self.0.downcast_ref::<T>().ok_or(Error::InvalidHandle)
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(..)")
    }
}

/// Output of [`Hsm::encrypt`]: the IV the HSM used and ciphertext ‖ tag.
#[derive(Debug, Clone)]
pub struct GcmSealed {
    /// The random 96-bit IV.
    pub iv: [u8; IV_LEN],
    /// Ciphertext followed by the 128-bit tag.
    pub sealed: Vec<u8>,
}

/// Errors of the HSM layer. Payloads are small and never carry key material or PINs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// `keyfront init` found keyfront keys already on the token.
    #[error("the token already holds keyfront keys; init runs once per token")]
    AlreadyInitialized,
    /// A decryption or unwrap inside the HSM failed authentication.
    #[error("HSM integrity check failed")]
    Integrity,
    /// A [`Kek`] from another HSM implementation was passed in.
    #[error("KEK handle does not belong to this HSM")]
    InvalidHandle,
    /// A caller broke a documented precondition (e.g. empty AAD).
    #[error("invalid HSM input: {0}")]
    InvalidInput(&'static str),
    /// The PKCS#11 module could not be loaded or initialized.
    #[error("cannot load PKCS#11 module: {0}")]
    Module(String),
    /// The token lacks a key keyfront needs: it was not initialized with `keyfront init`.
    #[error("token has no {0}; run `keyfront init` on it first")]
    NotInitialized(&'static str),
    /// The PIN was refused (incorrect, locked or expired). Never retried.
    #[error("the HSM refused the PIN ({0:?}); not retrying, as HSMs lock PINs after failures")]
    Pin(RvError),
    /// Several tokens carry the configured label.
    #[error("more than one token is labelled {0:?}")]
    TokenAmbiguous(String),
    /// No token carries the configured label.
    #[error("no token labelled {0:?}")]
    TokenNotFound(String),
    /// The HSM, its session or its module is not reachable now; retry later.
    #[error("HSM unavailable ({rv:?} in {function})")]
    Unavailable {
        /// The PKCS#11 return value.
        rv: RvError,
        /// The PKCS#11 function that failed.
        function: &'static str,
    },
    /// An unexpected PKCS#11 failure: a bug or a misconfigured token.
    #[error("HSM error ({rv:?} in {function})")]
    Internal {
        /// The PKCS#11 return value, if there was one.
        rv: Option<RvError>,
        /// The PKCS#11 function that failed.
        function: &'static str,
    },
    /// The HSM cannot do what was asked (which, never a value): e.g. RSA-OAEP with SHA-256 on
    /// SoftHSM 2.6.
    #[error("the HSM does not support {0}")]
    Unsupported(&'static str),
    /// The token cannot serve keyfront as it is: mechanisms keyfront needs are missing, or
    /// its master key allows a wrap mechanism the token does not offer. Final, not retried.
    #[error("the token cannot serve keyfront: {0}")]
    Unsuitable(String),
    /// A blob names an MWK generation this token does not hold.
    #[error("no MWK of generation {0} on this token")]
    UnknownMwk(MwkGeneration),
}

impl Error {
    /// Whether retrying later may succeed (the HSM went away), as opposed to a final answer.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

pub(crate) fn function_name(function: Function) -> &'static str {
    // `Function` has no Display; its Debug names are the PKCS#11 names without the C_ prefix.
    match function {
        Function::Decrypt => "C_Decrypt",
        Function::DecryptInit => "C_DecryptInit",
        Function::Encrypt => "C_Encrypt",
        Function::EncryptInit => "C_EncryptInit",
        Function::UnwrapKey => "C_UnwrapKey",
        Function::WrapKey => "C_WrapKey",
        Function::GenerateKey => "C_GenerateKey",
        Function::GenerateKeyPair => "C_GenerateKeyPair",
        Function::GenerateRandom => "C_GenerateRandom",
        Function::Sign => "C_Sign",
        Function::SignInit => "C_SignInit",
        Function::Login => "C_Login",
        Function::OpenSession => "C_OpenSession",
        Function::FindObjects => "C_FindObjects",
        Function::FindObjectsInit => "C_FindObjectsInit",
        Function::DestroyObject => "C_DestroyObject",
        Function::GetTokenInfo => "C_GetTokenInfo",
        Function::GetSlotList => "C_GetSlotList",
        Function::Initialize => "C_Initialize",
        _ => "PKCS#11",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kek_blob_round_trips_and_rejects_garbage() {
        let kek = WrappedKek::new(MwkGeneration(3), vec![0xAB; 40]);
        let bytes = kek.to_bytes();
        assert_eq!(&bytes[..6], &[0x05, 0x01, 0, 0, 0, 3]);
        assert_eq!(WrappedKek::from_bytes(&bytes), Some(kek));
        for len in 0..7 {
            assert_eq!(WrappedKek::from_bytes(&bytes[..len]), None);
        }
        let mut wrong = bytes;
        wrong[0] = 0x02;
        assert_eq!(WrappedKek::from_bytes(&wrong), None);
    }
}
