//! AES-256-GCM-SIV under a bulk key, for Encrypt/Decrypt at memory speed.
//!
//! GCM-SIV is nonce-misuse resistant, so random 96-bit nonces are safe far beyond the
//! 2^32-message bound of plain GCM; each version still counts its uses (see the key lifecycle).

use aes_gcm_siv::aead::{AeadInOut, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce, Tag};

use super::{Error, Plaintext, SecretKey};

/// Nonce length of AES-256-GCM-SIV (96 bits).
pub const NONCE_LEN: usize = 12;
/// Authentication tag length (128 bits).
pub const TAG_LEN: usize = 16;

/// Encrypts `plaintext` under `key` with a random nonce and appends `nonce ‖ ciphertext ‖ tag`
/// to `out`.
pub fn seal(key: &SecretKey, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
    let nonce: [u8; NONCE_LEN] = rand::random();
    dangerous_seal_with_nonce(key, &nonce, aad, plaintext, out);
}

/// [`seal`] with a caller-chosen nonce, for golden vectors only: a fixed nonce makes equal
/// messages encrypt equally, which is exactly what the random nonce of [`seal`] prevents.
pub fn dangerous_seal_with_nonce(
    key: &SecretKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
    out: &mut Vec<u8>,
) {
    let cipher = Aes256GcmSiv::new(key.expose_secret().into());
    out.reserve(NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(nonce);
    let start = out.len();
    out.extend_from_slice(plaintext);
    let nonce = Nonce::from(*nonce);
    // Encryption only fails for messages over 2^36 bytes; callers bound sizes far below that,
    // and `encode_blob` refuses anything larger than u32::MAX first.
    let Ok(tag) = cipher.encrypt_inout_detached(&nonce, aad, out[start..].as_mut().into()) else {
        unreachable_encrypt_failure()
    };
    out.extend_from_slice(&tag);
}

#[cold]
fn unreachable_encrypt_failure() -> ! {
    // Invariant: AES-GCM-SIV encryption fails only above 2^36 bytes of plaintext, and every
    // caller passes input bounded by the request size limit (far smaller).
    panic!("AES-GCM-SIV refused a message within its size limits")
}

/// Opens `nonce ‖ ciphertext ‖ tag` produced by [`seal`] with the same key and AAD.
///
/// # Errors
/// [`Error::Decrypt`] for a short body or any authentication failure.
pub fn open(key: &SecretKey, aad: &[u8], body: &[u8]) -> Result<Plaintext, Error> {
    if body.len() < NONCE_LEN + TAG_LEN {
        return Err(Error::Decrypt);
    }
    let (nonce, rest) = body.split_at(NONCE_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| Error::Decrypt)?;
    let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| Error::Decrypt)?;
    let mut plaintext = Plaintext::copy_from(ciphertext);
    let cipher = Aes256GcmSiv::new(key.expose_secret().into());
    cipher
        .decrypt_inout_detached(
            &Nonce::from(nonce),
            aad,
            plaintext.as_mut_vec().as_mut_slice().into(),
            &Tag::from(tag),
        )
        .map_err(|_| Error::Decrypt)?;
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8452 Appendix C.2, AES-256-GCM-SIV, the first vector with both AAD and plaintext.
    #[test]
    fn matches_rfc8452_known_answer() {
        let key = SecretKey::from_slice(
            &hex::decode("0100000000000000000000000000000000000000000000000000000000000000")
                .expect("hex"),
        )
        .expect("32 bytes");
        let nonce: [u8; 12] = hex::decode("030000000000000000000000")
            .expect("hex")
            .try_into()
            .expect("12 bytes");
        let aad = hex::decode("01").expect("hex");
        let plaintext = hex::decode("0200000000000000").expect("hex");
        let mut out = Vec::new();
        dangerous_seal_with_nonce(&key, &nonce, &aad, &plaintext, &mut out);
        assert_eq!(
            hex::encode(&out[NONCE_LEN..]),
            "1de22967237a813291213f267e3b452f02d01ae33e4ec854"
        );
        let opened = open(&key, &aad, &out).expect("opens");
        assert_eq!(opened.expose_secret(), plaintext.as_slice());
    }

    #[test]
    fn any_changed_byte_fails_to_open() {
        let key = SecretKey::random();
        let mut out = Vec::new();
        seal(&key, b"aad", b"some plaintext", &mut out);
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 0x01;
            assert_eq!(open(&key, b"aad", &bad).err(), Some(Error::Decrypt));
        }
        assert_eq!(open(&key, b"aaD", &out).err(), Some(Error::Decrypt));
        assert_eq!(open(&key, b"aad", &out[..10]).err(), Some(Error::Decrypt));
    }
}
