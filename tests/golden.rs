//! Golden vectors for every blob type, checked three ways: against `tests/data/golden.txt`,
//! against `docs/FORMAT.md` (so the document cannot drift), and by decrypting them with
//! independent code. SoftHSM's AES-GCM is shown to produce exactly the documented body.
//!
//! Regenerate (only when the format deliberately changes): `KEYFRONT_WRITE_GOLDEN=1 cargo test
//! --test golden`, then paste the new values into docs/FORMAT.md.

mod common;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use keyfront::crypto::{
    self, BlobType, EncryptionContext, HEADER_LEN, Header, SecretKey, dangerous_seal_with_nonce,
};
use keyfront::hsm::pkcs11;
use keyfront::hsm::{MwkGeneration, WrappedKek};
use keyfront::ids::{KeyId, KeyVersion, TenantId};

const GOLDEN: &str = "tests/data/golden.txt";
const TENANT: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
const KEY: [u8; 16] = [
    16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31,
];
const BULK_KEY: [u8; 32] = [0x42; 32];
const KEK: [u8; 32] = [0x5A; 32];
const DATA_KEY: [u8; 32] = [0x77; 32];
const SECRET: &[u8] = b"s3cr3t-api-token";
const MESSAGE: &[u8] = b"keyfront golden vector";

fn context() -> EncryptionContext {
    [("purpose", "golden"), ("app", "docs")]
        .into_iter()
        .collect()
}

fn header(blob_type: BlobType) -> Header {
    Header {
        blob_type,
        key_id: KeyId::from_bytes(KEY),
        version: KeyVersion(1),
    }
}

fn aad(blob_type: BlobType, context: &EncryptionContext) -> Vec<u8> {
    crypto::aad(
        blob_type,
        &TenantId::from_bytes(TENANT),
        &KeyId::from_bytes(KEY),
        KeyVersion(1),
        context,
    )
    .expect("aad fits")
}

/// A blob made in the HSM: header ‖ iv ‖ AES-256-GCM(KEK, iv, aad, plaintext) ‖ tag.
fn hsm_blob(
    blob_type: BlobType,
    iv: [u8; 12],
    context: &EncryptionContext,
    plaintext: &[u8],
) -> Vec<u8> {
    let cipher = Aes256Gcm::new(&KEK.into());
    let aad = aad(blob_type, context);
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&iv),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .expect("encrypt");
    crypto::encode_blob(&header(blob_type), &iv, &sealed)
}

fn vectors() -> Vec<(&'static str, Vec<u8>)> {
    let ctx = context();
    let mut ciphertext = Vec::new();
    crypto::write_header(&header(BlobType::Ciphertext), &mut ciphertext);
    let bulk = SecretKey::from_slice(&BULK_KEY).expect("32 bytes");
    dangerous_seal_with_nonce(
        &bulk,
        &[0x24; 12],
        &aad(BlobType::Ciphertext, &ctx),
        MESSAGE,
        &mut ciphertext,
    );
    let none = EncryptionContext::new();
    vec![
        ("aad_ciphertext", aad(BlobType::Ciphertext, &ctx)),
        ("ciphertext", ciphertext),
        ("aad_data_key", aad(BlobType::DataKey, &ctx)),
        (
            "data_key",
            hsm_blob(BlobType::DataKey, [0x36; 12], &ctx, &DATA_KEY),
        ),
        ("aad_secret", aad(BlobType::Secret, &ctx)),
        (
            "secret",
            hsm_blob(BlobType::Secret, [0x37; 12], &ctx, SECRET),
        ),
        ("aad_bulk_key", aad(BlobType::BulkKey, &none)),
        (
            "bulk_key",
            hsm_blob(BlobType::BulkKey, [0x38; 12], &none, &BULK_KEY),
        ),
        (
            "kek",
            WrappedKek::new(MwkGeneration(1), vec![0xC3; 40]).to_bytes(),
        ),
    ]
}

fn golden() -> Vec<(String, String)> {
    std::fs::read_to_string(GOLDEN)
        .expect("golden file")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, hex) = l.split_once(' ').expect("name hex");
            (name.to_owned(), hex.to_owned())
        })
        .collect()
}

#[test]
fn vectors_match_the_golden_file() {
    let computed: Vec<(String, String)> = vectors()
        .into_iter()
        .map(|(n, v)| (n.to_owned(), hex::encode(v)))
        .collect();
    if std::env::var_os("KEYFRONT_WRITE_GOLDEN").is_some() {
        let mut text = String::from("# keyfront golden vectors (tests/golden.rs); name hex\n");
        for (name, hex) in &computed {
            text.push_str(&format!("{name} {hex}\n"));
        }
        std::fs::write(GOLDEN, text).expect("write golden");
    }
    assert_eq!(computed, golden());
}

#[test]
fn format_md_shows_every_golden_vector() {
    let doc = std::fs::read_to_string("docs/FORMAT.md").expect("docs/FORMAT.md");
    for (name, hex) in golden() {
        assert!(
            doc.contains(&hex),
            "docs/FORMAT.md lacks the {name} vector {hex}"
        );
    }
}

#[test]
fn golden_blobs_parse_and_decrypt_with_independent_code() {
    let ctx = context();
    let vectors: std::collections::HashMap<_, _> = vectors().into_iter().collect();
    let ciphertext = &vectors["ciphertext"];
    let parsed = crypto::parse_blob(ciphertext, BlobType::Ciphertext).expect("parse");
    assert_eq!(parsed.header, header(BlobType::Ciphertext));
    let bulk = SecretKey::from_slice(&BULK_KEY).expect("32 bytes");
    let opened = crypto::open(
        &bulk,
        &aad(BlobType::Ciphertext, &ctx),
        &ciphertext[HEADER_LEN..],
    )
    .expect("opens");
    assert_eq!(opened.expose_secret(), MESSAGE);

    let cipher = Aes256Gcm::new(&KEK.into());
    for (name, blob_type, context, plaintext) in [
        ("data_key", BlobType::DataKey, ctx.clone(), &DATA_KEY[..]),
        ("secret", BlobType::Secret, ctx, SECRET),
        (
            "bulk_key",
            BlobType::BulkKey,
            EncryptionContext::new(),
            &BULK_KEY[..],
        ),
    ] {
        let parsed = crypto::parse_blob(&vectors[name], blob_type).expect("parse");
        assert_eq!(parsed.header, header(blob_type));
        let aad = aad(blob_type, &context);
        let opened = cipher
            .decrypt(
                Nonce::from_slice(parsed.nonce),
                Payload {
                    msg: parsed.sealed,
                    aad: &aad,
                },
            )
            .expect("decrypts");
        assert_eq!(opened, plaintext, "{name}");
    }
    let kek = WrappedKek::from_bytes(&vectors["kek"]).expect("kek blob");
    assert_eq!(kek.generation(), MwkGeneration(1));
}

#[test]
fn softhsm_aes_gcm_produces_the_documented_bytes() {
    let config = common::new_token("golden");
    let _guard = common::token_lock();
    let ctx = pkcs11::context(&common::module()).expect("context");
    let session = pkcs11::open_logged_in(&ctx, &config).expect("session");
    // A test-only KEK with a known value, so the HSM's output can be compared byte for byte.
    let kek = session
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Encrypt(true),
            Attribute::Value(KEK.to_vec()),
        ])
        .expect("import test KEK");
    let golden: std::collections::HashMap<_, _> = golden().into_iter().collect();
    for (name, blob_type, iv, context, plaintext) in [
        (
            "data_key",
            BlobType::DataKey,
            [0x36; 12],
            context(),
            &DATA_KEY[..],
        ),
        ("secret", BlobType::Secret, [0x37; 12], context(), SECRET),
        (
            "bulk_key",
            BlobType::BulkKey,
            [0x38; 12],
            EncryptionContext::new(),
            &BULK_KEY[..],
        ),
    ] {
        let aad = aad(blob_type, &context);
        let mut iv_param = iv;
        let params = GcmParams::new(&mut iv_param, &aad, 128.into()).expect("params");
        let sealed = session
            .encrypt(&Mechanism::AesGcm(params), kek, plaintext)
            .expect("encrypt");
        let blob = crypto::encode_blob(&header(blob_type), &iv, &sealed);
        assert_eq!(hex::encode(blob), golden[name], "{name}");
    }
}
