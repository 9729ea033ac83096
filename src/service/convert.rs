//! Proto ↔ domain: context and CRC32C checks, and the redacting `Debug` of every generated
//! message that carries plaintext, keys or secrets (build.rs skips their derived `Debug`).

use std::collections::HashMap;
use std::fmt;

use tonic::Status;

use super::pb;
use crate::config::Limits;
use crate::crypto::EncryptionContext;

/// Checks a request's context against the limits and makes it the domain type.
///
/// # Errors
/// RESOURCE_EXHAUSTED when there are too many pairs or bytes.
pub fn context(map: HashMap<String, String>, limits: &Limits) -> Result<EncryptionContext, Status> {
    if map.len() > limits.max_context_pairs {
        return Err(Status::resource_exhausted(format!(
            "context has {} pairs; at most {} are allowed",
            map.len(),
            limits.max_context_pairs
        )));
    }
    let bytes: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > limits.max_context_bytes {
        return Err(Status::resource_exhausted(format!(
            "context has {bytes} bytes; at most {} are allowed",
            limits.max_context_bytes
        )));
    }
    Ok(map.into_iter().collect())
}

/// Verifies an optional CRC32C a client sent with `data`; returns whether one was checked.
///
/// # Errors
/// INVALID_ARGUMENT naming the field when it does not match.
pub fn verify_crc(data: &[u8], expected: Option<u32>, field: &'static str) -> Result<bool, Status> {
    match expected {
        None => Ok(false),
        Some(crc) if crc == crc32c::crc32c(data) => Ok(true),
        Some(_) => Err(Status::invalid_argument(format!(
            "{field} does not match the data: it was corrupted in transit"
        ))),
    }
}

/// The CRC32C of data keyfront returns.
pub fn crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// The API's name of a signing algorithm.
pub fn sign_algorithm(algorithm: crate::hsm::SignAlgorithm) -> pb::KeyAlgorithm {
    use crate::hsm::SignAlgorithm as S;
    match algorithm {
        S::EcdsaP256Sha256 => pb::KeyAlgorithm::EcdsaP256Sha256,
        S::EcdsaP384Sha384 => pb::KeyAlgorithm::EcdsaP384Sha384,
        S::RsaPss3072Sha256 => pb::KeyAlgorithm::RsaPss3072Sha256,
    }
}

/// Whether a Sign or Verify request gives a digest (else the message itself).
///
/// # Errors
/// INVALID_ARGUMENT for a value that is not a MessageType.
pub fn is_digest(message_type: i32) -> Result<bool, Status> {
    match pb::MessageType::try_from(message_type) {
        Ok(pb::MessageType::Unspecified | pb::MessageType::Raw) => Ok(false),
        Ok(pb::MessageType::Digest) => Ok(true),
        Err(_) => Err(Status::invalid_argument(
            "message_type: MESSAGE_TYPE_RAW or MESSAGE_TYPE_DIGEST",
        )),
    }
}

struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[REDACTED; {} bytes]", self.0)
    }
}

struct Names<'a>(&'a HashMap<String, String>);

impl fmt::Debug for Names<'_> {
    /// Context names only; values may identify customers' records.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl fmt::Debug for pb::EncryptRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptRequest")
            .field("key", &self.key)
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("context", &Names(&self.context))
            .field("plaintext_crc32c", &self.plaintext_crc32c)
            .field("tenant", &self.tenant)
            .finish()
    }
}

impl fmt::Debug for pb::DecryptResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecryptResponse")
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for pb::BatchEncryptItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchEncryptItem")
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("context", &Names(&self.context))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for pb::BatchDecryptResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchDecryptResult")
            .field("status", &self.status)
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for pb::GenerateDataKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerateDataKeyResponse")
            .field("wrapped_key_len", &self.wrapped_key.len())
            .field("plaintext_key", &Redacted(self.plaintext_key.len()))
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for pb::DecryptDataKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecryptDataKeyResponse")
            .field("plaintext_key", &Redacted(self.plaintext_key.len()))
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for pb::SealSecretRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealSecretRequest")
            .field("key", &self.key)
            .field("secret", &Redacted(self.secret.len()))
            .field("context", &Names(&self.context))
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for pb::HashPasswordRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HashPasswordRequest")
            .field("key", &self.key)
            .field("password", &Redacted(self.password.len()))
            .field("tenant", &self.tenant)
            .finish()
    }
}

impl fmt::Debug for pb::VerifyPasswordRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyPasswordRequest")
            .field("key", &self.key)
            .field("password", &Redacted(self.password.len()))
            .field("hash", &Redacted(self.hash.len()))
            .field("tenant", &self.tenant)
            .finish()
    }
}

impl fmt::Debug for pb::GenerateMacRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerateMacRequest")
            .field("key", &self.key)
            .field("data", &Redacted(self.data.len()))
            .field("tenant", &self.tenant)
            .finish()
    }
}

impl fmt::Debug for pb::VerifyMacRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyMacRequest")
            .field("key", &self.key)
            .field("data", &Redacted(self.data.len()))
            .field("mac", &Redacted(self.mac.len()))
            .field("key_version", &self.key_version)
            .field("tenant", &self.tenant)
            .finish()
    }
}

/// A message to sign may be anything the caller keeps private: only its length is shown.
impl fmt::Debug for pb::SignRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignRequest")
            .field("key", &self.key)
            .field("message", &Redacted(self.message.len()))
            .field("message_type", &self.message_type)
            .field("tenant", &self.tenant)
            .finish()
    }
}

impl fmt::Debug for pb::VerifyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyRequest")
            .field("key", &self.key)
            .field("message", &Redacted(self.message.len()))
            .field("message_type", &self.message_type)
            .field("signature", &Redacted(self.signature.len()))
            .field("key_version", &self.key_version)
            .field("tenant", &self.tenant)
            .finish()
    }
}

impl fmt::Debug for pb::LookupDigestRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LookupDigestRequest")
            .field("secret", &Redacted(self.secret.len()))
            .field("tenant", &self.tenant)
            .finish()
    }
}

impl fmt::Debug for pb::UnsealSecretResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnsealSecretResponse")
            .field("secret", &Redacted(self.secret.len()))
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_with_secrets_print_no_secret() {
        let context: HashMap<_, _> = [("order".to_owned(), "value-4711".to_owned())].into();
        let shown = format!(
            "{:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?}",
            pb::EncryptRequest {
                plaintext: b"plain-4711".to_vec(),
                context: context.clone(),
                ..Default::default()
            },
            pb::DecryptResponse {
                plaintext: b"plain-4711".to_vec(),
                ..Default::default()
            },
            pb::BatchEncryptItem {
                plaintext: b"plain-4711".to_vec(),
                context,
                ..Default::default()
            },
            pb::BatchDecryptResult {
                plaintext: b"plain-4711".to_vec(),
                ..Default::default()
            },
            pb::GenerateDataKeyResponse {
                plaintext_key: b"plain-4711".to_vec(),
                ..Default::default()
            },
            pb::DecryptDataKeyResponse {
                plaintext_key: b"plain-4711".to_vec(),
                ..Default::default()
            },
            pb::SealSecretRequest {
                secret: b"plain-4711".to_vec(),
                ..Default::default()
            },
            pb::UnsealSecretResponse {
                secret: b"plain-4711".to_vec(),
                ..Default::default()
            },
            pb::HashPasswordRequest {
                password: b"plain-4711".to_vec(),
                ..Default::default()
            },
            pb::VerifyPasswordRequest {
                password: b"plain-4711".to_vec(),
                hash: "$argon2id$4711".into(),
                ..Default::default()
            },
            pb::LookupDigestRequest {
                secret: b"plain-4711".to_vec(),
                ..Default::default()
            },
            pb::GenerateMacRequest {
                data: b"plain-4711".to_vec(),
                ..Default::default()
            },
            pb::VerifyMacRequest {
                data: b"plain-4711".to_vec(),
                mac: b"mac-4711".to_vec(),
                ..Default::default()
            },
            pb::SignRequest {
                message: b"plain-4711".to_vec(),
                ..Default::default()
            },
            pb::VerifyRequest {
                message: b"plain-4711".to_vec(),
                signature: b"sig-4711".to_vec(),
                ..Default::default()
            },
        );
        assert!(!shown.contains("4711"), "{shown}");
        assert!(!shown.contains("112, 108"), "{shown}");
        assert_eq!(shown.matches("REDACTED").count(), 18);
    }

    #[test]
    fn crc_mismatch_is_invalid_argument() {
        assert_eq!(verify_crc(b"abc", None, "f").ok(), Some(false));
        assert_eq!(verify_crc(b"abc", Some(crc(b"abc")), "f").ok(), Some(true));
        let error = verify_crc(b"abc", Some(crc(b"abd")), "f").expect_err("mismatch");
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
    }
}
