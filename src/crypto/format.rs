//! The typed blob and ciphertext formats and the canonical AAD (documented in docs/FORMAT.md).
//!
//! Every blob keyfront hands out or stores starts with a header:
//! `type (1) ‖ format version (1) ‖ key id (16) ‖ key version (u32 BE)`, then
//! `nonce (12) ‖ ciphertext ‖ tag (16)`. The type byte is also the first field of the AAD, so a
//! blob of one type can never be opened as another even if the parser were bypassed.

use std::collections::BTreeMap;
use std::fmt;

use super::{Error, NONCE_LEN, TAG_LEN};
use crate::ids::{ID_LEN, KeyId, KeyVersion, TenantId};

/// The one format version this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Header length: type, format version, key id, key version.
pub const HEADER_LEN: usize = 1 + 1 + ID_LEN + 4;
/// The label that opens every AAD; it changes with the format's major version.
pub const AAD_LABEL: &[u8] = b"keyfront/v1";

/// What a blob is; each operation accepts exactly one type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlobType {
    /// Encrypt's output: data under a bulk key, AES-256-GCM-SIV, made in process.
    Ciphertext = 0x01,
    /// GenerateDataKey's output: a 256-bit data key under a KEK, AES-GCM in the HSM.
    DataKey = 0x02,
    /// SealSecret's output: a secret under a KEK, AES-GCM in the HSM.
    Secret = 0x03,
    /// A version's bulk key under its KEK, AES-GCM in the HSM; stored, never handed out.
    BulkKey = 0x04,
}

impl BlobType {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0x01 => Some(Self::Ciphertext),
            0x02 => Some(Self::DataKey),
            0x03 => Some(Self::Secret),
            0x04 => Some(Self::BulkKey),
            _ => None,
        }
    }
}

/// The parsed header of a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the blob is.
    pub blob_type: BlobType,
    /// The key whose version encrypted it.
    pub key_id: KeyId,
    /// That version.
    pub version: KeyVersion,
}

/// A blob split into header and body (`nonce ‖ ciphertext ‖ tag`), borrowing the input.
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedBlob<'a> {
    /// The header.
    pub header: Header,
    /// The 96-bit nonce (GCM-SIV) or IV (GCM).
    pub nonce: &'a [u8; NONCE_LEN],
    /// Ciphertext followed by the 128-bit tag.
    pub sealed: &'a [u8],
}

/// Writes `header ‖ nonce ‖ sealed` (sealed = ciphertext ‖ tag).
pub fn encode_blob(header: &Header, nonce: &[u8; NONCE_LEN], sealed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + sealed.len());
    write_header(header, &mut out);
    out.extend_from_slice(nonce);
    out.extend_from_slice(sealed);
    out
}

/// Appends the header's 22 bytes to `out`.
pub fn write_header(header: &Header, out: &mut Vec<u8>) {
    out.push(header.blob_type as u8);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(header.key_id.as_bytes());
    out.extend_from_slice(&header.version.0.to_be_bytes());
}

/// Parses a blob, accepting only `expected` as its type.
///
/// # Errors
/// [`Error::Decrypt`] (opaque) for a wrong type, unknown format version, or a length too short
/// to hold a nonce and tag. Never panics.
pub fn parse_blob(bytes: &[u8], expected: BlobType) -> Result<ParsedBlob<'_>, Error> {
    let (header, rest) = bytes.split_at_checked(HEADER_LEN).ok_or(Error::Decrypt)?;
    let blob_type = BlobType::from_byte(header[0]).ok_or(Error::Decrypt)?;
    if blob_type != expected || header[1] != FORMAT_VERSION {
        return Err(Error::Decrypt);
    }
    let key_id: [u8; ID_LEN] = header[2..2 + ID_LEN]
        .try_into()
        .map_err(|_| Error::Decrypt)?;
    let version: [u8; 4] = header[2 + ID_LEN..]
        .try_into()
        .map_err(|_| Error::Decrypt)?;
    let (nonce, sealed) = rest.split_at_checked(NONCE_LEN).ok_or(Error::Decrypt)?;
    if sealed.len() < TAG_LEN {
        return Err(Error::Decrypt);
    }
    let nonce: &[u8; NONCE_LEN] = nonce.try_into().map_err(|_| Error::Decrypt)?;
    Ok(ParsedBlob {
        header: Header {
            blob_type,
            key_id: KeyId::from_bytes(key_id),
            version: KeyVersion(u32::from_be_bytes(version)),
        },
        nonce,
        sealed,
    })
}

/// The caller's encryption context: name → value pairs bound into the AAD.
///
/// Names are unique and sorted by their bytes (a `BTreeMap<String, _>` orders by bytes), with no
/// Unicode normalization: the bytes the caller sent are the bytes that get bound.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EncryptionContext(BTreeMap<String, String>);

impl EncryptionContext {
    /// An empty context.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces one pair.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.insert(name.into(), value.into());
    }

    /// The pairs in canonical order.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<BTreeMap<String, String>> for EncryptionContext {
    fn from(map: BTreeMap<String, String>) -> Self {
        Self(map)
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for EncryptionContext {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl fmt::Debug for EncryptionContext {
    /// Names only: values may identify customers' records and are never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// The canonical AAD:
/// `"keyfront/v1" ‖ type ‖ lp(tenant id) ‖ lp(key id) ‖ u32 version ‖ u32 count ‖
/// (lp(name) ‖ lp(value))…` with pairs sorted by name bytes; `lp` is a u32 BE length prefix.
///
/// # Errors
/// [`Error::TooLarge`] if a field or the pair count does not fit a u32.
pub fn aad(
    blob_type: BlobType,
    tenant: &TenantId,
    key: &KeyId,
    version: KeyVersion,
    context: &EncryptionContext,
) -> Result<Vec<u8>, Error> {
    let context_len: usize = context.pairs().map(|(k, v)| 8 + k.len() + v.len()).sum();
    let mut out = Vec::with_capacity(AAD_LABEL.len() + 1 + 2 * (4 + ID_LEN) + 8 + context_len);
    out.extend_from_slice(AAD_LABEL);
    out.push(blob_type as u8);
    put_lp(&mut out, tenant.as_bytes())?;
    put_lp(&mut out, key.as_bytes())?;
    out.extend_from_slice(&version.0.to_be_bytes());
    let count = u32::try_from(context.len()).map_err(|_| Error::TooLarge)?;
    out.extend_from_slice(&count.to_be_bytes());
    for (name, value) in context.pairs() {
        put_lp(&mut out, name.as_bytes())?;
        put_lp(&mut out, value.as_bytes())?;
    }
    Ok(out)
}

fn put_lp(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), Error> {
    let len = u32::try_from(bytes.len()).map_err(|_| Error::TooLarge)?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(blob_type: BlobType) -> Header {
        Header {
            blob_type,
            key_id: KeyId::from_bytes([0x11; 16]),
            version: KeyVersion(7),
        }
    }

    #[test]
    fn parse_accepts_only_the_expected_type() {
        let blob = encode_blob(&header(BlobType::DataKey), &[9; 12], &[1; 48]);
        let parsed = parse_blob(&blob, BlobType::DataKey).expect("parses");
        assert_eq!(parsed.header, header(BlobType::DataKey));
        assert_eq!(parsed.sealed.len(), 48);
        for other in [BlobType::Ciphertext, BlobType::Secret, BlobType::BulkKey] {
            assert_eq!(parse_blob(&blob, other), Err(Error::Decrypt));
        }
    }

    #[test]
    fn parse_never_panics_on_truncations_and_garbage() {
        let blob = encode_blob(&header(BlobType::Ciphertext), &[9; 12], &[1; 16]);
        for len in 0..blob.len() {
            assert_eq!(
                parse_blob(&blob[..len], BlobType::Ciphertext),
                Err(Error::Decrypt)
            );
        }
        assert!(parse_blob(&blob, BlobType::Ciphertext).is_ok());
        let mut bad_version = blob;
        bad_version[1] = 2;
        assert_eq!(
            parse_blob(&bad_version, BlobType::Ciphertext),
            Err(Error::Decrypt)
        );
        // A cheap exhaustive-ish sweep over short inputs and every type byte.
        for first in 0..=255u8 {
            for len in [0usize, 1, 2, 21, 22, 33, 49, 50, 100] {
                let mut input = vec![first; len];
                if len > 1 {
                    input[1] = FORMAT_VERSION;
                }
                for expected in [BlobType::Ciphertext, BlobType::DataKey] {
                    let _ = parse_blob(&input, expected);
                }
            }
        }
    }

    #[test]
    fn aad_sorts_context_by_name_bytes() {
        let a: EncryptionContext = [("b", "2"), ("a", "1"), ("B", "3")].into_iter().collect();
        let t = TenantId::from_bytes([1; 16]);
        let k = KeyId::from_bytes([2; 16]);
        let aad = aad(BlobType::Ciphertext, &t, &k, KeyVersion(1), &a).expect("fits");
        let tail = &aad[aad.len() - 3 * 10..];
        assert_eq!(
            tail,
            b"\0\0\0\x01B\0\0\0\x013\0\0\0\x01a\0\0\0\x011\0\0\0\x01b\0\0\0\x012"
        );
    }

    #[test]
    fn context_debug_hides_values() {
        let c: EncryptionContext = [("order", "secret-order-4711")].into_iter().collect();
        let shown = format!("{c:?}");
        assert!(shown.contains("order"));
        assert!(!shown.contains("4711"));
    }
}

#[cfg(test)]
mod random_input {
    use super::*;

    /// Parsers never panic: a few hundred thousand random inputs of every length up to 200.
    #[test]
    fn parse_blob_never_panics_on_random_input() {
        let types = [
            BlobType::Ciphertext,
            BlobType::DataKey,
            BlobType::Secret,
            BlobType::BulkKey,
        ];
        for round in 0..200_000usize {
            let len = round % 200;
            let mut input: Vec<u8> = (0..len).map(|_| rand::random()).collect();
            // Bias half the inputs towards a valid-looking prefix to reach deeper branches.
            if round % 2 == 0 && len >= 2 {
                input[0] = (round % 6) as u8;
                input[1] = FORMAT_VERSION;
            }
            let expected = types[round % types.len()];
            if let Ok(blob) = parse_blob(&input, expected) {
                assert_eq!(blob.header.blob_type, expected);
                assert!(blob.sealed.len() >= TAG_LEN);
                assert_eq!(HEADER_LEN + NONCE_LEN + blob.sealed.len(), input.len());
            }
        }
    }
}
