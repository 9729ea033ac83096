//! Every blob format of docs/FORMAT.md as Decrypt, DecryptDataKey and UnsealSecret read it from
//! a caller: the parser for each type, then AES-256-GCM-SIV open of a ciphertext under a fixed
//! key with the AAD the header makes. Anything but a clean `Err` (a panic, an overread, a
//! plaintext from bytes never sealed) is a finding.
#![no_main]

use keyfront::crypto::{self, BlobType, EncryptionContext, SecretKey};
use keyfront::ids::TenantId;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for blob_type in [
        BlobType::Ciphertext,
        BlobType::DataKey,
        BlobType::Secret,
        BlobType::BulkKey,
    ] {
        let Ok(parsed) = crypto::parse_blob(data, blob_type) else {
            continue;
        };
        assert_eq!(parsed.header.blob_type, blob_type);
        assert!(parsed.sealed.len() >= crypto::TAG_LEN);
        if blob_type == BlobType::Ciphertext {
            let key = SecretKey::from_bytes(&mut [7u8; 32]);
            let tenant = TenantId::from_bytes([3u8; 16]);
            let header = &parsed.header;
            let aad = crypto::aad(
                blob_type,
                &tenant,
                &header.key_id,
                header.version,
                &EncryptionContext::new(),
            )
            .expect("an empty context fits");
            let body = &data[crypto::HEADER_LEN..];
            // Random bytes never authenticate under a key they were not sealed with.
            assert!(crypto::open(&key, &aad, body).is_err());
        }
    }
});
