//! The `Hsm` contract, run against the in-memory fake and against a real token (SoftHSM and
//! Kryoptic in the test command), plus what only a real token can show: key attributes, visibility without login, no KEK token objects.

mod common;

use std::process::Command;

use secrecy::ExposeSecret;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use keyfront::crypto::import::wrap_for_import;
use keyfront::hsm::faulty::{FaultyHsm, Op};
use keyfront::hsm::memory::MemoryHsm;
use keyfront::hsm::pkcs11::{self, MWK_LABEL_PREFIX, Pkcs11Hsm};
use keyfront::hsm::{
    Error, HmacKey, Hsm, ImportTarget, ImportWrapping, MacAlgorithm, MwkGeneration, SignAlgorithm,
    WrappedKek, WrappedKind,
};

const SIGN_ALGORITHMS: [SignAlgorithm; 3] = [
    SignAlgorithm::EcdsaP256Sha256,
    SignAlgorithm::EcdsaP384Sha384,
    SignAlgorithm::RsaPss3072Sha256,
];

/// The behaviour every implementation promises.
fn contract(hsm: &dyn Hsm) {
    let wrapped = hsm.generate_kek().expect("generate KEK");
    assert_eq!(wrapped.generation(), hsm.mwk_generation());
    let kek = hsm.unwrap_kek(&wrapped).expect("unwrap KEK");

    let sealed = hsm
        .encrypt(&kek, b"aad", b"thirty-two bytes of key material")
        .expect("encrypt");
    let opened = hsm
        .decrypt(&kek, &sealed.iv, b"aad", &sealed.sealed)
        .expect("decrypt");
    assert_eq!(opened.expose_secret(), b"thirty-two bytes of key material");

    // Fresh IVs: encrypting the same input twice never repeats.
    let again = hsm
        .encrypt(&kek, b"aad", b"thirty-two bytes of key material")
        .expect("encrypt");
    assert_ne!(again.iv, sealed.iv);

    assert_eq!(
        hsm.decrypt(&kek, &sealed.iv, b"aaD", &sealed.sealed).err(),
        Some(Error::Integrity)
    );
    for i in 0..sealed.sealed.len() {
        let mut bad = sealed.sealed.clone();
        bad[i] ^= 1;
        assert_eq!(
            hsm.decrypt(&kek, &sealed.iv, b"aad", &bad).err(),
            Some(Error::Integrity)
        );
    }
    let mut bad_iv = sealed.iv;
    bad_iv[0] ^= 1;
    assert_eq!(
        hsm.decrypt(&kek, &bad_iv, b"aad", &sealed.sealed).err(),
        Some(Error::Integrity)
    );
    assert!(matches!(
        hsm.encrypt(&kek, b"", b"x"),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        hsm.decrypt(&kek, &sealed.iv, b"", &sealed.sealed),
        Err(Error::InvalidInput(_))
    ));

    // Another KEK cannot open it.
    let other = hsm
        .unwrap_kek(&hsm.generate_kek().expect("KEK"))
        .expect("unwrap");
    assert_eq!(
        hsm.decrypt(&other, &sealed.iv, b"aad", &sealed.sealed)
            .err(),
        Some(Error::Integrity)
    );

    // A tampered KEK blob does not unwrap.
    let mut tampered = wrapped.wrapped().to_vec();
    tampered[5] ^= 0x10;
    let tampered = WrappedKek::new(wrapped.generation(), tampered);
    assert!(hsm.unwrap_kek(&tampered).is_err());
    let unknown = WrappedKek::new(MwkGeneration(99), wrapped.wrapped().to_vec());
    assert_eq!(
        hsm.unwrap_kek(&unknown).err(),
        Some(Error::UnknownMwk(MwkGeneration(99)))
    );

    let mut a = [0u8; 32];
    let mut b = [0u8; 32];
    hsm.random(&mut a).expect("random");
    hsm.random(&mut b).expect("random");
    assert_ne!(a, b);

    let storage = hsm.hmac(HmacKey::StorageRoot, b"label").expect("hmac");
    assert_eq!(
        storage,
        hsm.hmac(HmacKey::StorageRoot, b"label").expect("hmac")
    );
    assert_ne!(storage, hsm.hmac(HmacKey::Pepper, b"label").expect("hmac"));
    assert_ne!(
        storage,
        hsm.hmac(HmacKey::StorageRoot, b"other").expect("hmac")
    );

    let signature = hsm.sign(b"checkpoint").expect("sign");
    assert_eq!(signature.len(), 64);

    mac_contract(hsm, &kek);
    signing_contract(hsm, &kek);
}

/// Signing keys: generated with the private key only wrapped, unwrapped by kind; signatures
/// verify in software (the RustCrypto crates) under the public key the HSM gave, and only for
/// the digest signed; a signing key neither encrypts nor MACs, a KEK does not sign, and a
/// tampered blob does not unwrap.
fn signing_contract(hsm: &dyn Hsm, kek: &keyfront::hsm::Kek) {
    for algorithm in SIGN_ALGORITHMS {
        let (wrapped, spki) = hsm.generate_signing_key(algorithm).expect("generate");
        assert_eq!(wrapped.kind(), algorithm.wrapped_kind());
        assert_eq!(wrapped.generation(), hsm.mwk_generation());
        let bytes = wrapped.to_bytes();
        assert_eq!(
            bytes[0],
            match algorithm {
                SignAlgorithm::RsaPss3072Sha256 => keyfront::hsm::RSA_PRIVATE_KEY_BLOB_TYPE,
                _ => keyfront::hsm::EC_PRIVATE_KEY_BLOB_TYPE,
            }
        );
        assert_eq!(WrappedKek::from_bytes(&bytes).as_ref(), Some(&wrapped));
        let pem = algorithm
            .public_key_pem(&spki)
            .expect("a public key of the algorithm");
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
        let key = hsm.unwrap_kek(&wrapped).expect("unwrap");
        // Many signatures: ECDSA's are random, and every one must verify (high S included).
        for i in 0..12u8 {
            let digest = algorithm.digest(&[i; 5]);
            let signature = hsm.sign_digest(&key, algorithm, &digest).expect("sign");
            assert!(
                algorithm.verify(&spki, &digest, &signature),
                "{algorithm:?} #{i}"
            );
            let other = algorithm.digest(&[i; 6]);
            assert!(!algorithm.verify(&spki, &other, &signature));
            // The whole-message path (ring) agrees with the digest path (RustCrypto).
            assert!(algorithm.verify_message(&spki, &[i; 5], &signature));
            assert!(!algorithm.verify_message(&spki, &[i; 6], &signature));
            let mut forged = signature.clone();
            let last = forged.len() - 1;
            forged[last] ^= 0x01;
            assert!(!algorithm.verify(&spki, &digest, &forged));
            assert!(!algorithm.verify_message(&spki, &[i; 5], &forged));
        }
        let digest = algorithm.digest(b"message");
        assert!(matches!(
            hsm.sign_digest(&key, algorithm, &digest[1..]),
            Err(Error::InvalidInput(_))
        ));
        // Another key of the algorithm: its signatures do not verify under this public key.
        let (other, _) = hsm.generate_signing_key(algorithm).expect("another");
        let other = hsm.unwrap_kek(&other).expect("unwrap");
        let signature = hsm.sign_digest(&other, algorithm, &digest).expect("sign");
        assert!(!algorithm.verify(&spki, &digest, &signature));
        // Purposes hold inside the HSM.
        assert!(hsm.encrypt(&key, b"aad", b"x").is_err());
        assert!(hsm.mac(&key, MacAlgorithm::HmacSha256, b"m").is_err());
        assert!(hsm.sign_digest(kek, algorithm, &digest).is_err());
        let mut tampered = wrapped.wrapped().to_vec();
        tampered[5] ^= 0x01;
        let tampered = WrappedKek::of_kind(wrapped.kind(), wrapped.generation(), tampered);
        assert!(hsm.unwrap_kek(&tampered).is_err());
        // The same bytes read as a KEK or MAC key blob give nothing that signs.
        for kind in [WrappedKind::Kek, WrappedKind::MacKey] {
            let confused =
                WrappedKek::of_kind(kind, wrapped.generation(), wrapped.wrapped().to_vec());
            if let Ok(confused) = hsm.unwrap_kek(&confused) {
                assert!(hsm.sign_digest(&confused, algorithm, &digest).is_err());
            }
        }
    }
}

/// Master key rotation re-wraps signing keys by kind: the key pair stays the same.
#[test]
fn the_token_rewraps_signing_keys_under_a_new_mwk() {
    let config = common::initialized_token("signrewrap");
    let hsm = common::open_hsm(&config);
    for algorithm in SIGN_ALGORITHMS {
        let (wrapped, spki) = hsm.generate_signing_key(algorithm).expect("signing key");
        let generation = hsm.create_mwk().expect("new MWK");
        let rewrapped = hsm.rewrap_kek(&wrapped).expect("rewrap");
        assert_eq!(rewrapped.kind(), wrapped.kind());
        assert_eq!(rewrapped.generation(), generation);
        let digest = algorithm.digest(b"m");
        let signature = hsm
            .sign_digest(
                &hsm.unwrap_kek(&rewrapped).expect("unwrap"),
                algorithm,
                &digest,
            )
            .expect("sign");
        assert!(algorithm.verify(&spki, &digest, &signature));
    }
}

/// MAC keys: generated wrapped, unwrapped by kind, deterministic, one key per algorithm,
/// never usable for AES-GCM, and a tampered blob does not unwrap.
fn mac_contract(hsm: &dyn Hsm, kek: &keyfront::hsm::Kek) {
    for algorithm in [MacAlgorithm::HmacSha256, MacAlgorithm::HmacSha512] {
        let wrapped = hsm.generate_mac_key(algorithm).expect("generate MAC key");
        assert_eq!(wrapped.kind(), WrappedKind::MacKey);
        assert_eq!(wrapped.generation(), hsm.mwk_generation());
        let bytes = wrapped.to_bytes();
        assert_eq!(bytes[0], keyfront::hsm::MAC_KEY_BLOB_TYPE);
        assert_eq!(WrappedKek::from_bytes(&bytes).as_ref(), Some(&wrapped));
        let key = hsm.unwrap_kek(&wrapped).expect("unwrap MAC key");
        let mac = hsm.mac(&key, algorithm, b"message").expect("mac");
        assert_eq!(mac.len(), algorithm.mac_len());
        assert_eq!(mac, hsm.mac(&key, algorithm, b"message").expect("mac"));
        assert_ne!(mac, hsm.mac(&key, algorithm, b"messagf").expect("mac"));
        assert_eq!(
            hsm.mac(&key, algorithm, b"").expect("empty").len(),
            algorithm.mac_len()
        );
        let other = hsm
            .unwrap_kek(&hsm.generate_mac_key(algorithm).expect("another"))
            .expect("unwrap");
        assert_ne!(mac, hsm.mac(&other, algorithm, b"message").expect("mac"));
        // A MAC key cannot encrypt, and a KEK cannot MAC.
        assert!(hsm.encrypt(&key, b"aad", b"x").is_err());
        assert!(hsm.mac(kek, algorithm, b"message").is_err());
        let mut tampered = wrapped.wrapped().to_vec();
        tampered[3] ^= 0x01;
        let tampered = WrappedKek::of_kind(WrappedKind::MacKey, wrapped.generation(), tampered);
        assert!(hsm.unwrap_kek(&tampered).is_err());
        // The same bytes read as a KEK blob do not give a usable AES-GCM key (an HSM may
        // refuse the unwrap, or the length).
        let as_kek = WrappedKek::new(wrapped.generation(), wrapped.wrapped().to_vec());
        if let Ok(confused) = hsm.unwrap_kek(&as_kek) {
            assert!(hsm.mac(&confused, algorithm, b"message").is_err());
        }
    }
}

/// Master key rotation re-wraps MAC keys by kind: the MAC stays the same.
#[test]
fn the_token_rewraps_mac_keys_under_a_new_mwk() {
    let config = common::initialized_token("macrewrap");
    let hsm = common::open_hsm(&config);
    for algorithm in [MacAlgorithm::HmacSha256, MacAlgorithm::HmacSha512] {
        let wrapped = hsm.generate_mac_key(algorithm).expect("MAC key");
        let before = hsm
            .mac(&hsm.unwrap_kek(&wrapped).expect("unwrap"), algorithm, b"m")
            .expect("mac");
        let generation = hsm.create_mwk().expect("new MWK");
        let rewrapped = hsm.rewrap_kek(&wrapped).expect("rewrap");
        assert_eq!(rewrapped.kind(), WrappedKind::MacKey);
        assert_eq!(rewrapped.generation(), generation);
        let after = hsm
            .mac(
                &hsm.unwrap_kek(&rewrapped).expect("unwrap"),
                algorithm,
                b"m",
            )
            .expect("mac");
        assert_eq!(before, after);
    }
}

/// The token's HMAC mechanisms, which MAC keys use, are the standard ones: a key created in
/// clear (a test-only session object) gives RFC 4231's values. The in-memory fake uses the
/// `hmac` crate.
#[test]
fn the_token_hmac_matches_rfc_4231() {
    let config = common::initialized_token("rfc4231");
    let ctx = pkcs11::context(&config.module).expect("module");
    let session = pkcs11::open_logged_in(&ctx, &config).expect("session");
    // RFC 4231 test case 6 (SoftHSM refuses keys shorter than half the hash: case 2's "Jefe").
    let key = session
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Sign(true),
            Attribute::Value(vec![0xaa; 131]),
        ])
        .expect("test key");
    let data = b"Test Using Larger Than Block-Size Key - Hash Key First";
    let sha256 = session
        .sign(&Mechanism::Sha256Hmac, key, data)
        .expect("HMAC-SHA-256");
    assert_eq!(
        hex::encode(sha256),
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
    );
    let sha512 = session
        .sign(&Mechanism::Sha512Hmac, key, data)
        .expect("HMAC-SHA-512");
    assert_eq!(
        hex::encode(sha512),
        "80b24263c7c1a3ebb71493c1dd7be8b49b46d1f41b4aeec1121b013783f8f3526b56d037e05f2598bd0fd2215d6a1e5295e64f73f63f0aec8b915a985d786598"
    );
}

#[test]
fn memory_hsm_keeps_the_contract() {
    contract(&MemoryHsm::new());
}

#[test]
fn the_token_keeps_the_contract() {
    let config = common::initialized_token("contract");
    contract(&common::open_hsm(&config));
}

#[test]
fn faulty_wrapper_keeps_the_contract_and_counts() {
    let hsm = FaultyHsm::new(MemoryHsm::new());
    contract(&hsm);
    assert!(hsm.calls(Op::Encrypt) >= 3);
    hsm.set_down(true);
    assert!(hsm.generate_kek().err().is_some_and(|e| e.is_unavailable()));
}

#[test]
fn init_refuses_to_run_twice_on_a_token() {
    let config = common::initialized_token("twice");
    let _guard = common::token_lock();
    assert_eq!(
        pkcs11::init_token(&config).err(),
        Some(Error::AlreadyInitialized)
    );
}

#[test]
fn open_refuses_an_uninitialized_token_and_a_wrong_pin() {
    let config = common::new_token("uninit");
    {
        let _guard = common::token_lock();
        assert!(matches!(
            Pkcs11Hsm::open(&config),
            Err(Error::NotInitialized(_))
        ));
    }
    let mut wrong = common::config(&config.token_label);
    wrong.pin = cryptoki::types::AuthPin::from("not-the-pin".to_owned());
    let _guard = common::token_lock();
    assert!(matches!(Pkcs11Hsm::open(&wrong), Err(Error::Pin(_))));
    let missing = common::config("no-such-token-label");
    assert!(matches!(
        Pkcs11Hsm::open(&missing),
        Err(Error::TokenNotFound(_))
    ));
}

#[test]
fn a_kek_blob_from_another_token_is_refused() {
    let first = common::open_hsm(&common::initialized_token("mwk-a"));
    let Some(second) = common::second_initialized_token("mwk-b") else {
        return;
    };
    let second = common::open_hsm(&second);
    let wrapped = first.generate_kek().expect("KEK");
    assert!(first.unwrap_kek(&wrapped).is_ok());
    // Same generation number, different MWK: the KWP integrity check fails inside the HSM.
    assert_eq!(second.unwrap_kek(&wrapped).err(), Some(Error::Integrity));
}

#[test]
fn mwk_and_ceremony_keys_have_the_documented_attributes() {
    let config = common::initialized_token("attrs");
    let hsm = common::open_hsm(&config);
    let _guard = common::token_lock();
    let ctx = pkcs11::context(&common::module()).expect("context");
    let session = pkcs11::open_logged_in(&ctx, &config).expect("session");
    let mwk = session
        .find_objects(&[Attribute::Label(
            format!("{MWK_LABEL_PREFIX}1").into_bytes(),
        )])
        .expect("find");
    assert_eq!(mwk.len(), 1);
    let attributes = session
        .get_attributes(
            mwk[0],
            &[
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Modifiable,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Wrap,
                AttributeType::Unwrap,
                AttributeType::AllowedMechanisms,
                AttributeType::Id,
                AttributeType::Value,
            ],
        )
        .expect("attributes");
    let has = |wanted: &Attribute| attributes.iter().any(|a| a == wanted);
    for expected in [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Id(vec![0, 0, 0, 1]),
        // RFC 5649 under the token's own code (0x210B, or SoftHSM's 0x210A).
        Attribute::AllowedMechanisms(vec![hsm.capabilities().kwp.mechanism_type()]),
    ] {
        assert!(has(&expected), "MWK lacks {expected:?}: {attributes:?}");
    }
    assert!(
        !attributes.iter().any(|a| matches!(a, Attribute::Value(_))),
        "the MWK's value must not be readable"
    );

    // Using the MWK for anything but KWP is refused by the token.
    let mut iv = [0u8; 12];
    let params =
        cryptoki::mechanism::aead::GcmParams::new(&mut iv, b"aad", 128.into()).expect("params");
    assert!(
        session
            .encrypt(&Mechanism::AesGcm(params), mwk[0], b"data")
            .is_err()
    );

    // After creating tenants' keys, the token still holds only the ceremony's objects: no KEK
    // is ever a token object.
    for _ in 0..5 {
        hsm.generate_kek().expect("KEK");
    }
    let token_objects = session
        .find_objects(&[Attribute::Token(true)])
        .expect("find");
    assert_eq!(
        token_objects.len(),
        6,
        "MWK, storage root, pepper, lookup, audit private + public"
    );
}

#[test]
fn private_keys_are_invisible_without_login() {
    let config = common::initialized_token("visible");
    let list = |login: bool| {
        let mut command = Command::new("pkcs11-tool");
        // The token's own configuration (SOFTHSM2_CONF, KRYOPTIC_CONF) is inherited.
        command.args(["--module"]).arg(common::module()).args([
            "--token-label",
            &config.token_label,
            "--list-objects",
        ]);
        if login {
            command.args(["--login", "--pin", config.pin.expose_secret()]);
        }
        let output = command
            .output()
            .expect("pkcs11-tool runs (opensc installed)");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let anonymous = list(false);
    assert!(!anonymous.contains("keyfront-mwk-1"), "{anonymous}");
    assert!(!anonymous.contains("keyfront-storage-mac"), "{anonymous}");
    assert!(!anonymous.contains("keyfront-pepper-1"), "{anonymous}");
    let logged_in = list(true);
    assert!(logged_in.contains("keyfront-mwk-1"), "{logged_in}");
    assert!(logged_in.contains("keyfront-pepper-1"), "{logged_in}");
}

/// What a caller holding the PIN can do with a KEK blob and the MWK, as DESIGN.md states it.
#[test]
fn permissive_unwrap_of_a_kek_blob_behaves_as_design_md_says() {
    let config = common::initialized_token("permissive");
    let hsm = common::open_hsm(&config);
    let wrapped = hsm.generate_kek().expect("KEK");
    let _guard = common::token_lock();
    let ctx = pkcs11::context(&common::module()).expect("context");
    let session = pkcs11::open_logged_in(&ctx, &config).expect("session");
    let mwk = session
        .find_objects(&[Attribute::Label(b"keyfront-mwk-1".to_vec())])
        .expect("find")[0];
    let permissive = |sensitive: bool, extractable: bool| {
        session.unwrap_key(
            &hsm.capabilities().kwp.mechanism(),
            mwk,
            wrapped.wrapped(),
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                Attribute::Sensitive(sensitive),
                Attribute::Extractable(extractable),
            ],
        )
    };
    let outcome = |sensitive, extractable| {
        let result = permissive(sensitive, extractable);
        if let Ok(handle) = &result {
            let value = session
                .get_attributes(
                    *handle,
                    &[
                        AttributeType::Value,
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                    ],
                )
                .expect("attrs");
            let readable = value.iter().any(|a| matches!(a, Attribute::Value(_)));
            let _ = session.destroy_object(*handle);
            return if readable {
                "value readable"
            } else {
                "unwrapped, value hidden"
            };
        }
        "refused"
    };
    // cryptoki 0.12 cannot express CKA_UNWRAP_TEMPLATE (see DESIGN.md, "What the HSM
    // enforces"), so a PIN holder can unwrap a KEK blob with a permissive template and read it.
    assert_eq!(outcome(true, false), "unwrapped, value hidden");
    assert_eq!(outcome(false, true), "value readable");
    // PKCS#11 hides the value of any non-extractable key, sensitive or not.
    assert_eq!(outcome(false, false), "unwrapped, value hidden");
    // keyfront's own template: sensitive, non-extractable, GCM only.
    let handle = session
        .unwrap_key(
            &hsm.capabilities().kwp.mechanism(),
            mwk,
            wrapped.wrapped(),
            &pkcs11::kek_unwrap_template(),
        )
        .expect("keyfront's template unwraps");
    let value = session
        .get_attributes(handle, &[AttributeType::Value])
        .expect("attrs");
    assert!(!value.iter().any(|a| matches!(a, Attribute::Value(_))));
    assert!(
        session
            .wrap_key(&hsm.capabilities().kwp.mechanism(), mwk, handle)
            .is_err()
    );
}

#[test]
fn kek_objects_are_destroyed_after_their_last_user() {
    let config = common::initialized_token("lifetime");
    let mut small = config.clone();
    small.kek_cache_capacity = std::num::NonZeroUsize::new(2).expect("2 > 0");
    let hsm = common::open_hsm(&small);
    let _guard = common::token_lock();
    let ctx = pkcs11::context(&common::module()).expect("context");
    let session = pkcs11::open_logged_in(&ctx, &config).expect("session");
    let session_keys = || {
        session
            .find_objects(&[
                Attribute::Token(false),
                Attribute::Class(ObjectClass::SECRET_KEY),
            ])
            .expect("find")
            .len()
    };
    let blobs: Vec<_> = (0..6).map(|_| hsm.generate_kek().expect("KEK")).collect();
    assert_eq!(session_keys(), 0, "generation leaves no object behind");
    let held = hsm.unwrap_kek(&blobs[0]).expect("unwrap");
    for blob in &blobs[1..] {
        hsm.unwrap_kek(blob).expect("unwrap");
    }
    // The cache holds at most a couple of handles; the one still in use survives eviction.
    assert!(hsm.cached_keks() <= 2, "{}", hsm.cached_keks());
    let with_held = session_keys();
    assert!(with_held <= 3, "{with_held} session keys");
    let sealed = hsm
        .encrypt(&held, b"aad", b"still usable")
        .expect("held handle works");
    drop(held);
    assert!(session_keys() < with_held || with_held <= 2);
    let again = hsm.unwrap_kek(&blobs[0]).expect("unwrap again");
    assert_eq!(
        hsm.decrypt(&again, &sealed.iv, b"aad", &sealed.sealed)
            .expect("decrypt")
            .expose_secret(),
        b"still usable"
    );
}

const WRAPPINGS: [ImportWrapping; 4] = [
    ImportWrapping::RsaesOaepSha1,
    ImportWrapping::RsaesOaepSha256,
    ImportWrapping::RsaAesKeyWrapSha1,
    ImportWrapping::RsaAesKeyWrapSha256,
];

/// Key import (BYOK): material wrapped in software to an import key's public key comes out of
/// the HSM as a KEK or MAC key blob holding exactly those bytes (an AES-GCM ciphertext and an
/// HMAC the HSM makes with it are checked with the known material in software); tampered,
/// truncated, misdirected or wrongly sized material is refused. `sha256` says whether the HSM
/// is expected to unwrap OAEP with SHA-256 (`None`: either, but consistently); `gcm_siv` that
/// its "AES-GCM" is AES-GCM-SIV (the memory fake); `exact_lengths` that it knows an unwrapped
/// key's length exactly, not only to 8 bytes.
fn import_contract(hsm: &dyn Hsm, sha256: Option<bool>, gcm_siv: bool, exact_lengths: bool) {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use hmac::Mac;
    let mut sha256_seen = None;
    for wrapping in WRAPPINGS {
        let (import_key, spki) = match hsm.generate_import_key(wrapping) {
            Err(Error::Unsupported(what)) if wrapping.sha256() => {
                assert!(what.contains("SHA-256"), "{what}");
                assert_ne!(sha256, Some(true), "{wrapping:?} refused");
                assert_ne!(
                    sha256_seen,
                    Some(true),
                    "{wrapping:?} refused after working"
                );
                sha256_seen = Some(false);
                continue;
            }
            other => other.unwrap_or_else(|e| panic!("{wrapping:?}: {e}")),
        };
        if wrapping.sha256() {
            assert_ne!(sha256, Some(false), "{wrapping:?} offered");
            sha256_seen = Some(true);
        }
        assert_eq!(import_key.kind(), WrappedKind::ImportKey);
        assert_eq!(
            import_key.to_bytes()[0],
            keyfront::hsm::IMPORT_KEY_BLOB_TYPE
        );
        assert_eq!(
            hsm.unwrap_kek(&import_key).err(),
            Some(keyfront::hsm::IMPORT_KEY_ONLY),
            "an import key is no KEK"
        );

        // A KEK: what the HSM encrypts under it opens with the known bytes.
        let material: [u8; 32] = rand::random();
        let wrapped = wrap_for_import(&spki, wrapping, &material).expect("wrap");
        let imported = hsm
            .import_key(&import_key, wrapping, &wrapped, ImportTarget::Kek)
            .unwrap_or_else(|e| panic!("{wrapping:?}: {e}"));
        // The check value the HSM took equals HMAC-SHA-256 of the known bytes in software.
        assert_eq!(
            imported.check_value,
            keyfront::hsm::KeyCheckValue::of(&material),
            "{wrapping:?}: the check value"
        );
        let blob = imported.key;
        assert_eq!(blob.kind(), WrappedKind::Kek);
        assert_eq!(blob.generation(), hsm.mwk_generation());
        let kek = hsm.unwrap_kek(&blob).expect("unwrap the imported KEK");
        let sealed = hsm.encrypt(&kek, b"aad", b"imported").expect("encrypt");
        let opened = if gcm_siv {
            // The memory fake's "AES-GCM" is AES-256-GCM-SIV.
            let mut body = sealed.iv.to_vec();
            body.extend_from_slice(&sealed.sealed);
            let key = keyfront::crypto::SecretKey::from_slice(&material).expect("key");
            keyfront::crypto::open(&key, b"aad", &body)
                .map(|p| p.expose_secret().to_vec())
                .ok()
        } else {
            aes_gcm::Aes256Gcm::new_from_slice(&material)
                .expect("key")
                .decrypt(
                    aes_gcm::Nonce::from_slice(&sealed.iv),
                    Payload {
                        msg: &sealed.sealed,
                        aad: b"aad",
                    },
                )
                .ok()
        };
        assert_eq!(
            opened.as_deref(),
            Some(&b"imported"[..]),
            "{wrapping:?}: the HSM encrypts with exactly the imported bytes"
        );

        // An HMAC-SHA-512 key: its MAC equals the software HMAC under the known bytes.
        let material: [u8; 64] = std::array::from_fn(|_| rand::random());
        let wrapped = wrap_for_import(&spki, wrapping, &material);
        if let Ok(wrapped) = wrapped {
            let imported = hsm
                .import_key(
                    &import_key,
                    wrapping,
                    &wrapped,
                    ImportTarget::MacKey(MacAlgorithm::HmacSha512),
                )
                .unwrap_or_else(|e| panic!("{wrapping:?}: {e}"));
            assert_eq!(
                imported.check_value,
                keyfront::hsm::KeyCheckValue::of(&material)
            );
            let blob = imported.key;
            assert_eq!(blob.kind(), WrappedKind::MacKey);
            let key = hsm.unwrap_kek(&blob).expect("unwrap the imported MAC key");
            let mut expected =
                <hmac::Hmac<sha2::Sha512> as Mac>::new_from_slice(&material).expect("key");
            expected.update(b"message");
            assert_eq!(
                hsm.mac(&key, MacAlgorithm::HmacSha512, b"message")
                    .expect("mac"),
                expected.finalize().into_bytes().to_vec()
            );
        } else {
            // 64 bytes fit one OAEP block with either hash (at most 318 or 318 - 24).
            panic!("{wrapping:?}: {wrapped:?}");
        }

        // Refusals: nothing comes back.
        let material: [u8; 32] = rand::random();
        let wrapped = wrap_for_import(&spki, wrapping, &material).expect("wrap");
        for at in [0, 100, 383, wrapped.len() - 1] {
            let mut tampered = wrapped.clone();
            tampered[at] ^= 0x01;
            assert_eq!(
                hsm.import_key(&import_key, wrapping, &tampered, ImportTarget::Kek)
                    .err(),
                Some(Error::Integrity),
                "{wrapping:?}: byte {at} flipped"
            );
        }
        for len in [0, 1, 383, wrapped.len() - 1] {
            assert!(
                hsm.import_key(&import_key, wrapping, &wrapped[..len], ImportTarget::Kek)
                    .is_err(),
                "{wrapping:?}: truncated to {len}"
            );
        }
        let mut longer = wrapped.clone();
        longer.push(0);
        assert!(
            hsm.import_key(&import_key, wrapping, &longer, ImportTarget::Kek)
                .is_err()
        );
        assert_eq!(
            hsm.import_key(
                &import_key,
                wrapping,
                &wrapped,
                ImportTarget::MacKey(MacAlgorithm::HmacSha512)
            )
            .err(),
            Some(Error::InvalidInput("key material of the wrong length")),
            "{wrapping:?}: 32 bytes are no HMAC-SHA-512 key"
        );
        // A token that does not report an unwrapped key's length (SoftHSM 2.6) is checked to
        // within 8 bytes.
        let wrong: &[usize] = if exact_lengths {
            &[1, 16, 24, 31, 33, 40, 64]
        } else {
            &[1, 16, 24, 40, 64]
        };
        for &len in wrong {
            let material = vec![7u8; len];
            let wrapped = wrap_for_import(&spki, wrapping, &material).expect("wrap");
            assert_eq!(
                hsm.import_key(&import_key, wrapping, &wrapped, ImportTarget::Kek)
                    .err(),
                Some(Error::InvalidInput("key material of the wrong length")),
                "{wrapping:?}: {len} bytes are no AES-256 key"
            );
        }
        // The other OAEP hash does not unwrap it.
        let other_hash = match wrapping {
            ImportWrapping::RsaesOaepSha1 => ImportWrapping::RsaesOaepSha256,
            ImportWrapping::RsaesOaepSha256 => ImportWrapping::RsaesOaepSha1,
            ImportWrapping::RsaAesKeyWrapSha1 => ImportWrapping::RsaAesKeyWrapSha256,
            ImportWrapping::RsaAesKeyWrapSha256 => ImportWrapping::RsaAesKeyWrapSha1,
        };
        assert!(
            hsm.import_key(&import_key, other_hash, &wrapped, ImportTarget::Kek)
                .is_err()
        );
        // A blob that is not an import key.
        let kek_blob = hsm.generate_kek().expect("kek");
        assert!(
            hsm.import_key(&kek_blob, wrapping, &wrapped, ImportTarget::Kek)
                .is_err()
        );
        // Wrapped to another import key.
        let (other, _) = hsm
            .generate_import_key(wrapping)
            .expect("another import key");
        assert_eq!(
            hsm.import_key(&other, wrapping, &wrapped, ImportTarget::Kek)
                .err(),
            Some(Error::Integrity),
            "{wrapping:?}: wrapped to another import key"
        );
    }
}

#[test]
fn memory_hsm_imports_key_material() {
    import_contract(&MemoryHsm::new(), Some(true), true, true);
}

/// Key import on the token. SoftHSM 2.6 unwraps RSA-OAEP with SHA-1 only (docs/DESIGN.md, key
/// import); a token that does SHA-256 (Kryoptic) must do the SHA-256 wrappings as well.
#[test]
fn the_token_imports_key_material() {
    let config = common::initialized_token("import");
    // Known of the tokens (docs/DESIGN.md), not taken from keyfront's own probes: SoftHSM 2.6
    // neither unwraps OAEP with SHA-256 nor reports an unwrapped key's length; Kryoptic does
    // both.
    let softhsm = common::module().to_string_lossy().contains("softhsm");
    import_contract(&common::open_hsm(&config), Some(!softhsm), false, !softhsm);
}
