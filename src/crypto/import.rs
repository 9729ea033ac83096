//! The key owner's side of key import (BYOK): wrapping material to the public key of import
//! parameters, as AWS KMS's documentation has its users do with OpenSSL. `keyfront import-key`
//! and the tests use it; keyfront itself only ever unwraps, inside the HSM.

use rsa::pkcs8::DecodePublicKey;
use zeroize::Zeroizing;

/// The modulus of an import key, in bits.
pub const IMPORT_KEY_BITS: usize = 3072;

/// How a caller wraps key material for import, as AWS KMS names them: RSA-OAEP of the
/// material itself (it must fit: at most 318 bytes with SHA-1, 318 - 2·(32 - 20) with SHA-256),
/// or RSA-AES key wrap (RSA-OAEP of an ephemeral AES-256 key, then AES-KWP (RFC 5649) of the
/// material under it). MGF1 uses the OAEP hash; the OAEP label is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ImportWrapping {
    /// RSAES-OAEP with SHA-1.
    RsaesOaepSha1,
    /// RSAES-OAEP with SHA-256.
    RsaesOaepSha256,
    /// RSA-AES key wrap, its OAEP with SHA-1.
    RsaAesKeyWrapSha1,
    /// RSA-AES key wrap, its OAEP with SHA-256.
    RsaAesKeyWrapSha256,
}

impl ImportWrapping {
    /// Whether its OAEP hash is SHA-256 (else SHA-1).
    pub fn sha256(self) -> bool {
        matches!(self, Self::RsaesOaepSha256 | Self::RsaAesKeyWrapSha256)
    }

    /// Whether the material is AES-KWP-wrapped under an RSA-OAEP-wrapped ephemeral key.
    pub fn aes_key_wrap(self) -> bool {
        matches!(self, Self::RsaAesKeyWrapSha1 | Self::RsaAesKeyWrapSha256)
    }

    /// The name the API uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::RsaesOaepSha1 => "RSAES_OAEP_SHA_1",
            Self::RsaesOaepSha256 => "RSAES_OAEP_SHA_256",
            Self::RsaAesKeyWrapSha1 => "RSA_AES_KEY_WRAP_SHA_1",
            Self::RsaAesKeyWrapSha256 => "RSA_AES_KEY_WRAP_SHA_256",
        }
    }
}

/// Why material could not be wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WrapError {
    /// The public key is not an RSA SubjectPublicKeyInfo of the import key's size.
    #[error("the import public key is not an RSA-{IMPORT_KEY_BITS} SubjectPublicKeyInfo")]
    PublicKey,
    /// The material does not fit one RSA-OAEP block (use an RSA-AES key wrap algorithm).
    #[error("the key material is too long for {0}; use an RSA_AES_KEY_WRAP algorithm")]
    TooLong(&'static str),
    /// Empty material.
    #[error("the key material is empty")]
    Empty,
}

/// `material` wrapped for import with `wrapping` to `public_key_der` (SubjectPublicKeyInfo):
/// one RSA-OAEP block, or for RSA-AES key wrap an RSA-OAEP block of a fresh AES-256 key
/// followed by the material wrapped under it with AES-KWP (RFC 5649).
///
/// # Errors
/// [`WrapError`].
pub fn wrap_for_import(
    public_key_der: &[u8],
    wrapping: ImportWrapping,
    material: &[u8],
) -> Result<Vec<u8>, WrapError> {
    if material.is_empty() {
        return Err(WrapError::Empty);
    }
    let public = import_public_key(public_key_der).ok_or(WrapError::PublicKey)?;
    let oaep = |data: &[u8]| {
        public
            .encrypt(&mut rsa::rand_core::OsRng, oaep(wrapping), data)
            .map_err(|_| WrapError::TooLong(wrapping.name()))
    };
    if !wrapping.aes_key_wrap() {
        return oaep(material);
    }
    let ephemeral: Zeroizing<[u8; 32]> = Zeroizing::new(rand::random());
    let mut out = oaep(ephemeral.as_slice())?;
    let kwp = aes_kw::KekAes256::from(*ephemeral)
        .wrap_with_padding_vec(material)
        .map_err(|_| WrapError::TooLong(wrapping.name()))?;
    out.extend_from_slice(&kwp);
    Ok(out)
}

/// An import public key (SubjectPublicKeyInfo DER) as PEM (`-----BEGIN PUBLIC KEY-----`), for
/// `openssl pkeyutl`; `None` if it is not an RSA key of the import key's size.
pub fn public_key_pem(public_key_der: &[u8]) -> Option<String> {
    use rsa::pkcs8::EncodePublicKey;
    import_public_key(public_key_der)?
        .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
        .ok()
}

/// The OAEP padding of `wrapping`: its hash, MGF1 on the same hash, no label (what the HSM
/// unwraps with, and the memory fake decrypts with).
pub(crate) fn oaep(wrapping: ImportWrapping) -> rsa::Oaep {
    if wrapping.sha256() {
        rsa::Oaep::new::<sha2::Sha256>()
    } else {
        rsa::Oaep::new::<sha1::Sha1>()
    }
}

/// An import public key from its SubjectPublicKeyInfo DER, if it is RSA of the import key's
/// size.
fn import_public_key(der: &[u8]) -> Option<rsa::RsaPublicKey> {
    rsa::RsaPublicKey::from_public_key_der(der)
        .ok()
        .filter(|key| rsa::traits::PublicKeyParts::size(key) == IMPORT_KEY_BITS / 8)
}
