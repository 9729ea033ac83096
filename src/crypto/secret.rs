//! Types that hold secret bytes: zeroized on drop, never `Clone`, `Debug` redacted.

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

/// A 256-bit symmetric key held in process memory (bulk keys, the derived storage MAC key).
///
/// Boxed so that moves do not leave copies on the stack; zeroized when dropped.
pub struct SecretKey(Box<[u8; 32]>);

impl SecretKey {
    /// Takes ownership of key bytes, zeroizing the caller's copy.
    pub fn from_bytes(bytes: &mut [u8; 32]) -> Self {
        let key = Self(Box::new(*bytes));
        bytes.zeroize();
        key
    }

    /// Copies key bytes out of a slice; `None` unless it is exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut boxed = Box::new([0u8; 32]);
        if bytes.len() != 32 {
            return None;
        }
        boxed.copy_from_slice(bytes);
        Some(Self(boxed))
    }

    /// A fresh key from the operating system's CSPRNG.
    pub fn random() -> Self {
        let mut boxed = Box::new([0u8; 32]);
        rand::fill(&mut boxed[..]);
        Self(boxed)
    }

    /// The key bytes. Every call site is a place where key material is read: keep them few.
    pub fn expose_secret(&self) -> &[u8; 32] {
        &self.0
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey([REDACTED])")
    }
}

/// Variable-length secret bytes: plaintext, plaintext data keys, secrets to seal.
pub struct Plaintext(Zeroizing<Vec<u8>>);

impl Plaintext {
    /// Takes ownership of the bytes; they are zeroized when this value is dropped.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Copies the bytes into a new zeroizing buffer sized exactly once.
    pub fn copy_from(bytes: &[u8]) -> Self {
        let mut buf = Vec::with_capacity(bytes.len());
        buf.extend_from_slice(bytes);
        Self::new(buf)
    }

    /// The secret bytes. Every call site is a place where plaintext is read.
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes (not secret: ciphertexts reveal it anyway).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn as_mut_vec(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Plaintext([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_bytes() {
        let key = SecretKey::from_slice(&[0x41; 32]).expect("32 bytes");
        let text = Plaintext::copy_from(b"hunter2-correct-horse");
        let shown = format!("{key:?} {text:?} {key:#?} {text:#?}");
        assert!(!shown.contains("41"), "{shown}");
        assert!(!shown.contains("65"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("REDACTED"));
    }

    #[test]
    fn from_bytes_zeroizes_the_source() {
        let mut raw = [7u8; 32];
        let key = SecretKey::from_bytes(&mut raw);
        assert_eq!(raw, [0u8; 32]);
        assert_eq!(key.expose_secret(), &[7u8; 32]);
        assert!(SecretKey::from_slice(&[1; 31]).is_none());
    }
}
