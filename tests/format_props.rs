//! Round-trip properties of the formats in docs/FORMAT.md, over random inputs:
//!
//! - every blob type encodes and parses back to the same header, nonce and body, and is
//!   refused as any other type;
//! - the AAD does not depend on the order context pairs were given in, and two contexts that
//!   differ anywhere (a name, a value, a pair more) give different AADs, also when the
//!   difference is only where one field ends and the next begins;
//! - AES-256-GCM-SIV opens what it sealed under the same key and AAD, and nothing else: any
//!   flipped bit, another AAD or another key fails.

use keyfront::crypto::{
    self, BlobType, EncryptionContext, HEADER_LEN, Header, NONCE_LEN, SecretKey, TAG_LEN,
};
use keyfront::ids::{KeyId, KeyVersion, TenantId};
use proptest::prelude::*;

fn blob_type() -> impl Strategy<Value = BlobType> {
    prop_oneof![
        Just(BlobType::Ciphertext),
        Just(BlobType::DataKey),
        Just(BlobType::Secret),
        Just(BlobType::BulkKey),
    ]
}

fn context_pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::btree_map(".{0,12}", ".{0,12}", 0..6)
        .prop_map(|map| map.into_iter().collect())
}

fn context(pairs: &[(String, String)]) -> EncryptionContext {
    let mut context = EncryptionContext::new();
    for (name, value) in pairs {
        context.insert(name.clone(), value.clone());
    }
    context
}

fn aad(pairs: &[(String, String)]) -> Vec<u8> {
    crypto::aad(
        BlobType::Ciphertext,
        &TenantId::from_bytes([1; 16]),
        &KeyId::from_bytes([2; 16]),
        KeyVersion(3),
        &context(pairs),
    )
    .expect("fits")
}

proptest! {
    #[test]
    fn blobs_parse_back_to_what_was_encoded(
        kind in blob_type(),
        key_id in any::<[u8; 16]>(),
        version in any::<u32>(),
        nonce in any::<[u8; NONCE_LEN]>(),
        sealed in proptest::collection::vec(any::<u8>(), TAG_LEN..200),
        other in blob_type(),
    ) {
        let header = Header { blob_type: kind, key_id: KeyId::from_bytes(key_id), version: KeyVersion(version) };
        let bytes = crypto::encode_blob(&header, &nonce, &sealed);
        prop_assert_eq!(bytes.len(), HEADER_LEN + NONCE_LEN + sealed.len());
        let parsed = crypto::parse_blob(&bytes, kind).expect("parses as its own type");
        prop_assert_eq!(parsed.header, header);
        prop_assert_eq!(parsed.nonce, &nonce);
        prop_assert_eq!(parsed.sealed, sealed.as_slice());
        if other != kind {
            prop_assert!(crypto::parse_blob(&bytes, other).is_err());
        }
        // A body shorter than a tag is refused, never read past.
        prop_assert!(crypto::parse_blob(&bytes[..HEADER_LEN + NONCE_LEN + TAG_LEN - 1], kind).is_err());
    }

    #[test]
    fn the_aad_is_canonical_and_tells_every_context_apart(
        pairs in context_pairs(),
        other in context_pairs(),
        seed in any::<u64>(),
    ) {
        // Any insertion order gives the same AAD.
        let mut shuffled = pairs.clone();
        let n = shuffled.len();
        if n > 1 {
            for i in 0..n {
                let j = (seed as usize).wrapping_add(i * 7) % n;
                shuffled.swap(i, j);
            }
        }
        prop_assert_eq!(aad(&pairs), aad(&shuffled));
        // Different contexts, different AADs (length prefixes keep "ab"+"c" apart from "a"+"bc").
        prop_assert_eq!(aad(&pairs) == aad(&other), pairs == other);
    }

    #[test]
    fn gcm_siv_opens_only_what_it_sealed(
        plaintext in proptest::collection::vec(any::<u8>(), 0..300),
        aad_bytes in proptest::collection::vec(any::<u8>(), 0..64),
        flip in any::<proptest::sample::Index>(),
        bit in 0u8..8,
    ) {
        let key = SecretKey::random();
        let mut body = Vec::new();
        crypto::seal(&key, &aad_bytes, &plaintext, &mut body);
        let opened = crypto::open(&key, &aad_bytes, &body).expect("opens");
        prop_assert_eq!(opened.expose_secret(), plaintext.as_slice());

        let mut tampered = body.clone();
        let at = flip.index(tampered.len());
        tampered[at] ^= 1 << bit;
        prop_assert!(crypto::open(&key, &aad_bytes, &tampered).is_err());
        let mut other_aad = aad_bytes.clone();
        other_aad.push(0);
        prop_assert!(crypto::open(&key, &other_aad, &body).is_err());
        prop_assert!(crypto::open(&SecretKey::random(), &aad_bytes, &body).is_err());
        prop_assert!(crypto::open(&key, &aad_bytes, &body[..body.len() - 1]).is_err());
    }
}
