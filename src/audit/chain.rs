//! The audit chain's primitives: how a line is hashed, what a checkpoint signs, and how its
//! signature is checked with the public key alone. Shared by the writer and `audit verify`.

use sha2::{Digest, Sha256};

/// The `prev` of the very first line of a log.
pub const GENESIS: [u8; 32] = [0; 32];

/// Domain separation of checkpoint signatures.
const CHECKPOINT_CONTEXT: &[u8] = b"keyfront/audit-checkpoint/v1";

/// SHA-256 of a line's exact bytes, without its newline.
pub fn line_hash(line: &[u8]) -> [u8; 32] {
    Sha256::digest(line).into()
}

/// A position in the chain: the last line's sequence number and hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainHead {
    /// Sequence number of the line (the first line of a log is 1).
    pub seq: u64,
    /// Its hash.
    pub hash: [u8; 32],
}

impl ChainHead {
    /// Before any line.
    pub const START: Self = Self {
        seq: 0,
        hash: GENESIS,
    };
}

/// What a checkpoint signs: context ‖ len-prefixed node ‖ seq (u64 BE) ‖ hash of that line.
pub fn checkpoint_message(node: &str, head: &ChainHead) -> Vec<u8> {
    let mut message = Vec::with_capacity(CHECKPOINT_CONTEXT.len() + 4 + node.len() + 40);
    message.extend_from_slice(CHECKPOINT_CONTEXT);
    message.extend_from_slice(&u32::try_from(node.len()).unwrap_or(u32::MAX).to_be_bytes());
    message.extend_from_slice(node.as_bytes());
    message.extend_from_slice(&head.seq.to_be_bytes());
    message.extend_from_slice(&head.hash);
    message
}

/// The short id of a public key that checkpoints name: the first 8 bytes of its SHA-256 (hex).
pub fn key_id(public_key: &[u8]) -> String {
    hex::encode(&Sha256::digest(public_key)[..8])
}

/// An audit public key, parsed.
#[derive(Clone, Debug)]
pub struct PublicKey(p256::ecdsa::VerifyingKey);

impl PublicKey {
    /// Parses a SEC1 P-256 point, bare or as the DER OCTET STRING of CKA_EC_POINT.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let point = match bytes {
            [0x04, 65, rest @ ..] if rest.len() == 65 => rest,
            other => other,
        };
        p256::ecdsa::VerifyingKey::from_sec1_bytes(point)
            .map(Self)
            .map_err(|_| "not a P-256 public key (SEC1 point, hex)".to_owned())
    }

    /// The SEC1 uncompressed point.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_encoded_point(false).as_bytes().to_vec()
    }

    /// Whether `signature` (r ‖ s) signs `message` (ECDSA P-256 over its SHA-256).
    pub fn verifies_message(&self, message: &[u8], signature: &[u8]) -> bool {
        use p256::ecdsa::signature::Verifier;
        let Ok(signature) = p256::ecdsa::Signature::from_slice(signature) else {
            return false;
        };
        self.0.verify(message, &signature).is_ok()
    }

    /// Whether `signature` (r ‖ s) signs the checkpoint of `head` on `node`.
    pub fn verifies(&self, node: &str, head: &ChainHead, signature: &[u8]) -> bool {
        use p256::ecdsa::signature::Verifier;
        let Ok(signature) = p256::ecdsa::Signature::from_slice(signature) else {
            return false;
        };
        self.0
            .verify(&checkpoint_message(node, head), &signature)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::Hsm;

    #[test]
    fn a_checkpoint_signed_by_the_hsm_verifies_with_the_public_key_alone() {
        let hsm = crate::hsm::memory::MemoryHsm::new();
        let key = PublicKey::from_bytes(&hsm.audit_public_key()).expect("key");
        let head = ChainHead {
            seq: 7,
            hash: line_hash(b"{}"),
        };
        let signature = hsm.sign(&checkpoint_message("n1", &head)).expect("sign");
        assert!(key.verifies("n1", &head, &signature));
        assert!(!key.verifies("n2", &head, &signature), "node is signed");
        let later = ChainHead { seq: 8, ..head };
        assert!(!key.verifies("n1", &later, &signature), "seq is signed");
        let mut bad = signature.clone();
        bad[10] ^= 1;
        assert!(!key.verifies("n1", &head, &bad));
        assert!(!key.verifies("n1", &head, &signature[..63]));
    }
}
