//! Secret types, local AES-256-GCM-SIV, and the typed blob formats with their canonical AAD.
//!
//! Terms used across keyfront:
//! - **MWK** (master wrapping key): AES-256 on the HSM token; wraps KEKs with AES-KWP.
//! - **KEK** (key-encryption key): one per (tenant, key, version), generated in the HSM and
//!   stored only wrapped under the MWK; encrypts data keys, secrets and bulk keys with AES-GCM
//!   inside the HSM.
//! - **Bulk key**: 256 random bits per key version, encrypted by the KEK, held in process memory
//!   to encrypt data locally with AES-256-GCM-SIV.
//!
//! Everything here is pure computation: no I/O, no HSM. Parsers never panic on any input.

mod aead;
mod format;
pub mod import;
mod secret;

pub use aead::{NONCE_LEN, TAG_LEN, dangerous_seal_with_nonce, open, seal};
pub use format::{
    AAD_LABEL, BlobType, EncryptionContext, FORMAT_VERSION, HEADER_LEN, Header, ParsedBlob, aad,
    encode_blob, parse_blob, write_header,
};
pub use secret::{Plaintext, SecretKey};

/// Errors of the pure crypto layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A blob or ciphertext did not parse, had the wrong type, or failed authentication.
    ///
    /// Deliberately one opaque variant: the caller must not learn which check failed.
    #[error("decryption failed")]
    Decrypt,
    /// The input is larger than the format can carry.
    #[error("input too large")]
    TooLarge,
}
