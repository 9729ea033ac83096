//! Keys of other purposes: MAC keys, signing keys, and imported key material (BYOK), with and without dual control.

use keyfront::service::pb;
use keyfront::service::pb::admin_service_client::AdminServiceClient;
use tonic::Code;

use crate::common;
use crate::harness::*;

/// MAC keys over gRPC: CreateKey with purpose and algorithm (and refusals of mismatched
/// pairs), GenerateMac/VerifyMac with CRC32C, a MAC of the old version verifying after
/// RotateKey, purposes enforced in both directions with clear statuses, and audit lines that
/// name the version but never the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mac_keys_story() {
    let h = Harness::start(false).await;
    let key = create_mac_key(&h, "mac512", pb::KeyAlgorithm::HmacSha512).await;
    assert_eq!(key.purpose, pb::KeyPurpose::Mac as i32);
    assert_eq!(key.algorithm, pb::KeyAlgorithm::HmacSha512 as i32);
    let mut admin = h.admin().await;
    for (purpose, algorithm) in [
        (pb::KeyPurpose::Mac, pb::KeyAlgorithm::Unspecified),
        (pb::KeyPurpose::Mac, pb::KeyAlgorithm::Aes256),
        (pb::KeyPurpose::Data, pb::KeyAlgorithm::HmacSha256),
        (pb::KeyPurpose::Unspecified, pb::KeyAlgorithm::HmacSha256),
    ] {
        let refused = admin
            .create_key(pb::CreateKeyRequest {
                tenant: "acme".into(),
                name: "refused".into(),
                purpose: purpose as i32,
                algorithm: algorithm as i32,
                request_id: String::new(),
            })
            .await
            .expect_err("mismatched purpose and algorithm");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    }
    expect_refused(
        admin
            .create_key(pb::CreateKeyRequest {
                tenant: "acme".into(),
                name: "refused".into(),
                purpose: pb::KeyPurpose::Mac as i32,
                algorithm: 99,
                request_id: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "unknown algorithm",
    );

    let mut app = h.keys("acme-app").await;
    let data = [b"account ".as_slice(), PLAINTEXT_MARKER].concat();
    let made = app
        .generate_mac(pb::GenerateMacRequest {
            key: "mac512".into(),
            data: data.clone(),
            data_crc32c: Some(crc32c::crc32c(&data)),
            ..Default::default()
        })
        .await
        .expect("generate")
        .into_inner();
    assert!(made.verified_data_crc32c);
    assert_eq!(made.mac.len(), 64);
    assert_eq!(made.key_version, 1);
    let verify = |mac: Vec<u8>, data: Vec<u8>, key_version: u32| pb::VerifyMacRequest {
        key: "mac512".into(),
        data,
        mac,
        key_version,
        ..Default::default()
    };
    let answer = app
        .verify_mac(verify(made.mac.clone(), data.clone(), 1))
        .await
        .expect("verify")
        .into_inner();
    assert!(answer.valid);
    assert_eq!(answer.key_version, 1);
    let mut wrong = made.mac.clone();
    wrong[0] ^= 1;
    assert!(
        !app.verify_mac(verify(wrong, data.clone(), 1))
            .await
            .expect("verify")
            .into_inner()
            .valid
    );
    assert!(
        !app.verify_mac(verify(made.mac.clone(), b"other".to_vec(), 1))
            .await
            .expect("verify")
            .into_inner()
            .valid
    );

    // A bad CRC32C is refused before anything is computed.
    expect_refused(
        app.generate_mac(pb::GenerateMacRequest {
            key: "mac512".into(),
            data: data.clone(),
            data_crc32c: Some(crc32c::crc32c(&data) ^ 1),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "bad crc",
    );

    admin
        .rotate_key(pb::RotateKeyRequest {
            tenant: "acme".into(),
            name: "mac512".into(),
            request_id: String::new(),
        })
        .await
        .expect("rotate");
    let old = app
        .verify_mac(verify(made.mac.clone(), data.clone(), 1))
        .await
        .expect("verify the old version")
        .into_inner();
    assert!(old.valid);
    let primary = app
        .verify_mac(verify(made.mac.clone(), data.clone(), 0))
        .await
        .expect("verify with the primary")
        .into_inner();
    assert!(!primary.valid);
    assert_eq!(primary.key_version, 2);
    let missing = app
        .verify_mac(verify(made.mac.clone(), data.clone(), 7))
        .await
        .expect_err("no version 7");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");

    // Purposes: a MAC key does not encrypt, a DATA key does not MAC.
    let refused = expect_refused(
        app.encrypt(pb::EncryptRequest {
            key: "mac512".into(),
            plaintext: b"p".to_vec(),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "a MAC key cannot encrypt",
    );
    assert!(refused.message().contains("purpose MAC"), "{refused:?}");
    let refused = expect_refused(
        app.generate_mac(pb::GenerateMacRequest {
            key: "default".into(),
            data: b"m".to_vec(),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "a DATA key cannot MAC",
    );
    assert!(refused.message().contains("purpose DATA"), "{refused:?}");
    expect_refused(
        app.generate_mac(pb::GenerateMacRequest {
            key: "nosuch".into(),
            data: b"m".to_vec(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "no such key",
    );

    // Each call has an audit line with the key and version, and the data is nowhere.
    let lines = h.audit_lines();
    let macs: Vec<_> = lines
        .iter()
        .filter(|l| {
            l["kind"] == "request"
                && l["rpc"]
                    .as_str()
                    .is_some_and(|r| r.ends_with("GenerateMac") || r.ends_with("VerifyMac"))
        })
        .collect();
    assert!(macs.len() >= 8, "{} MAC audit lines", macs.len());
    assert!(
        macs.iter()
            .any(|l| l["key"] == "mac512" && l["version"] == 2)
    );
    let marker = String::from_utf8_lossy(PLAINTEXT_MARKER).into_owned();
    for file in audit_files(&h.dir.path().join("audit")) {
        let text = std::fs::read_to_string(file).expect("audit");
        assert!(!text.contains(&marker), "MAC data in the audit log");
    }
    h.stop().await;
}

/// Signing keys over gRPC: CreateKey with purpose SIGN and an algorithm (and refusals of
/// mismatched pairs), Sign of a message and of a digest with CRC32C, Verify, GetPublicKey whose
/// PEM and DER verify the signature outside keyfront (openssl), a signature of the old version
/// verifying after RotateKey, purposes in both directions with clear statuses, bad message
/// types and digest lengths refused, and audit lines that never hold the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_keys_story() {
    let h = Harness::start(false).await;
    let mut admin = h.admin().await;
    for (purpose, algorithm) in [
        (pb::KeyPurpose::Sign, pb::KeyAlgorithm::Unspecified),
        (pb::KeyPurpose::Sign, pb::KeyAlgorithm::Aes256),
        (pb::KeyPurpose::Sign, pb::KeyAlgorithm::HmacSha256),
        (pb::KeyPurpose::Data, pb::KeyAlgorithm::EcdsaP256Sha256),
        (pb::KeyPurpose::Mac, pb::KeyAlgorithm::RsaPss3072Sha256),
    ] {
        let refused = admin
            .create_key(pb::CreateKeyRequest {
                tenant: "acme".into(),
                name: "refused".into(),
                purpose: purpose as i32,
                algorithm: algorithm as i32,
                request_id: String::new(),
            })
            .await
            .expect_err("mismatched purpose and algorithm");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    }
    let mut app = h.keys("acme-app").await;
    let message = [b"release ".as_slice(), PLAINTEXT_MARKER].concat();
    for (name, algorithm, openssl_digest) in [
        ("p256", pb::KeyAlgorithm::EcdsaP256Sha256, "-sha256"),
        ("p384", pb::KeyAlgorithm::EcdsaP384Sha384, "-sha384"),
        ("rsa", pb::KeyAlgorithm::RsaPss3072Sha256, "-sha256"),
    ] {
        let key = create_signing_key(&h, name, algorithm).await;
        assert_eq!(key.purpose, pb::KeyPurpose::Sign as i32);
        assert_eq!(key.algorithm, algorithm as i32);
        let signed = app
            .sign(pb::SignRequest {
                key: name.into(),
                message: message.clone(),
                message_crc32c: Some(crc32c::crc32c(&message)),
                ..Default::default()
            })
            .await
            .expect("sign")
            .into_inner();
        assert!(signed.verified_message_crc32c);
        assert_eq!(signed.key_version, 1);
        assert_eq!(signed.algorithm, algorithm as i32);
        let public = app
            .get_public_key(pb::GetPublicKeyRequest {
                key: name.into(),
                ..Default::default()
            })
            .await
            .expect("public key")
            .into_inner();
        assert_eq!(public.key_version, 1);
        assert_eq!(public.algorithm, algorithm as i32);
        // openssl, knowing nothing of keyfront, verifies the signature with the PEM.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = |f: &str| dir.path().join(f);
        std::fs::write(path("key.pem"), &public.public_key_pem).expect("pem");
        std::fs::write(path("message"), &message).expect("message");
        std::fs::write(path("signature"), &signed.signature).expect("signature");
        let mut openssl = std::process::Command::new("openssl");
        openssl
            .args(["dgst", openssl_digest, "-verify"])
            .arg(path("key.pem"));
        if algorithm == pb::KeyAlgorithm::RsaPss3072Sha256 {
            openssl.args([
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                "rsa_pss_saltlen:32",
            ]);
        }
        let verified = openssl
            .arg("-signature")
            .arg(path("signature"))
            .arg(path("message"))
            .output()
            .expect("openssl runs");
        assert!(
            verified.status.success(),
            "{name}: openssl: {}",
            String::from_utf8_lossy(&verified.stdout)
        );
        // The DER is the same key as the PEM.
        let pem_body: String = public
            .public_key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        use base64::Engine;
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(pem_body)
                .expect("base64"),
            public.public_key_der
        );

        let verify = |message: Vec<u8>,
                      message_type: pb::MessageType,
                      signature: Vec<u8>,
                      key_version: u32| {
            pb::VerifyRequest {
                key: name.into(),
                message,
                message_type: message_type as i32,
                signature,
                key_version,
                ..Default::default()
            }
        };
        let answer = app
            .verify(verify(
                message.clone(),
                pb::MessageType::Raw,
                signed.signature.clone(),
                1,
            ))
            .await
            .expect("verify")
            .into_inner();
        assert!(answer.valid);
        assert_eq!(answer.key_version, 1);
        let mut wrong = signed.signature.clone();
        let last = wrong.len() - 1;
        wrong[last] ^= 1;
        assert!(
            !app.verify(verify(message.clone(), pb::MessageType::Raw, wrong, 1))
                .await
                .expect("verify")
                .into_inner()
                .valid
        );
        // A digest made by the caller.
        use sha2::Digest;
        let digest = match algorithm {
            pb::KeyAlgorithm::EcdsaP384Sha384 => sha2::Sha384::digest(&message).to_vec(),
            _ => sha2::Sha256::digest(&message).to_vec(),
        };
        assert!(
            app.verify(verify(
                digest.clone(),
                pb::MessageType::Digest,
                signed.signature.clone(),
                1
            ))
            .await
            .expect("verify a digest")
            .into_inner()
            .valid
        );
        let by_digest = app
            .sign(pb::SignRequest {
                key: name.into(),
                message: digest.clone(),
                message_type: pb::MessageType::Digest as i32,
                ..Default::default()
            })
            .await
            .expect("sign a digest")
            .into_inner();
        assert!(
            app.verify(verify(
                message.clone(),
                pb::MessageType::Raw,
                by_digest.signature,
                1
            ))
            .await
            .expect("verify")
            .into_inner()
            .valid
        );
        let refused = app
            .sign(pb::SignRequest {
                key: name.into(),
                message: digest[1..].to_vec(),
                message_type: pb::MessageType::Digest as i32,
                ..Default::default()
            })
            .await
            .expect_err("a digest of the wrong length");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("digest"), "{refused:?}");
        let refused = app
            .sign(pb::SignRequest {
                key: name.into(),
                message: message.clone(),
                message_type: 9,
                ..Default::default()
            })
            .await
            .expect_err("an unknown message type");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        expect_refused(
            app.sign(pb::SignRequest {
                key: name.into(),
                message: message.clone(),
                message_crc32c: Some(crc32c::crc32c(&message) ^ 1),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "bad crc",
        );

        admin
            .rotate_key(pb::RotateKeyRequest {
                tenant: "acme".into(),
                name: name.into(),
                request_id: String::new(),
            })
            .await
            .expect("rotate");
        assert!(
            app.verify(verify(
                message.clone(),
                pb::MessageType::Raw,
                signed.signature.clone(),
                1
            ))
            .await
            .expect("verify the old version")
            .into_inner()
            .valid
        );
        let primary = app
            .verify(verify(
                message.clone(),
                pb::MessageType::Raw,
                signed.signature.clone(),
                0,
            ))
            .await
            .expect("verify with the primary")
            .into_inner();
        assert!(!primary.valid);
        assert_eq!(primary.key_version, 2);
        let missing = app
            .get_public_key(pb::GetPublicKeyRequest {
                key: name.into(),
                key_version: 7,
                ..Default::default()
            })
            .await
            .expect_err("no version 7");
        assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    }

    // Purposes: a SIGN key does not encrypt or MAC, a DATA key does not sign.
    let refused = expect_refused(
        app.encrypt(pb::EncryptRequest {
            key: "p256".into(),
            plaintext: b"p".to_vec(),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "a SIGN key cannot encrypt",
    );
    assert!(refused.message().contains("purpose SIGN"), "{refused:?}");
    expect_refused(
        app.generate_mac(pb::GenerateMacRequest {
            key: "p256".into(),
            data: b"m".to_vec(),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "a SIGN key cannot MAC",
    );
    for rpc in ["Sign", "GetPublicKey"] {
        let refused = match rpc {
            "Sign" => app
                .sign(pb::SignRequest {
                    key: "default".into(),
                    message: b"m".to_vec(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            _ => app
                .get_public_key(pb::GetPublicKeyRequest {
                    key: "default".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        }
        .expect_err("a DATA key has no signatures");
        assert_eq!(refused.code(), Code::PermissionDenied, "{rpc}");
        assert!(refused.message().contains("purpose DATA"), "{refused:?}");
    }

    // Each call has an audit line with the key and version; the message is nowhere.
    let lines = h.audit_lines();
    let signing: Vec<_> = lines
        .iter()
        .filter(|l| {
            l["kind"] == "request"
                && l["rpc"].as_str().is_some_and(|r| {
                    r.ends_with("/Sign") || r.ends_with("/Verify") || r.ends_with("GetPublicKey")
                })
        })
        .collect();
    assert!(signing.len() >= 30, "{} signing audit lines", signing.len());
    assert!(
        signing
            .iter()
            .any(|l| l["key"] == "rsa" && l["version"] == 2)
    );
    let marker = String::from_utf8_lossy(PLAINTEXT_MARKER).into_owned();
    for file in audit_files(&h.dir.path().join("audit")) {
        let text = std::fs::read_to_string(file).expect("audit");
        assert!(!text.contains(&marker), "a signed message in the audit log");
    }
    h.stop().await;
}

/// Key import over gRPC: parameters (PEM, DER, expiry), a DATA key created from imported
/// material serving Encrypt and Decrypt, GetKey and ListKeys reporting origin and expiry,
/// ImportKeyMaterial idempotent under its request_id, RotateKey refused for imported keys
/// unless allowed, the SHA-256 algorithms refused on SoftHSM 2.6, and audit lines that never
/// hold the wrapped material.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_import_story() {
    let h = Harness::start(false).await;
    let mut admin = h.admin().await;
    let parameters = admin
        .get_import_parameters(pb::GetImportParametersRequest {
            tenant: "acme".into(),
            name: "byok".into(),
            wrapping_algorithm: pb::WrappingAlgorithm::RsaAesKeyWrapSha1 as i32,
        })
        .await
        .expect("parameters")
        .into_inner();
    assert!(
        parameters
            .public_key_pem
            .starts_with("-----BEGIN PUBLIC KEY-----"),
        "{}",
        parameters.public_key_pem
    );
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_secs(),
    )
    .expect("i64");
    assert!((parameters.expire_time - now - 86_400).abs() < 60);
    let wrapped = keyfront::crypto::import::wrap_for_import(
        &parameters.public_key_der,
        keyfront::hsm::ImportWrapping::RsaAesKeyWrapSha1,
        &[0x5a; 32],
    )
    .expect("wrap");
    let request = pb::ImportKeyMaterialRequest {
        tenant: "acme".into(),
        name: "byok".into(),
        import_token: parameters.import_token.clone(),
        encrypted_key_material: wrapped.clone(),
        purpose: pb::KeyPurpose::Data as i32,
        valid_to: now + 3600,
        request_id: "import-1".into(),
        ..Default::default()
    };
    let key = admin
        .import_key_material(request.clone())
        .await
        .expect("import")
        .into_inner();
    assert_eq!(key.origin, pb::KeyOrigin::External as i32);
    assert_eq!(key.primary_version, 1);
    assert!(!key.allow_generated_rotation);
    let again = admin
        .import_key_material(request)
        .await
        .expect("the same request_id")
        .into_inner();
    assert_eq!(
        again, key,
        "a retry returns the first answer, no second version"
    );

    let mut app = h.keys("acme-app").await;
    let sealed = app
        .encrypt(pb::EncryptRequest {
            key: "byok".into(),
            plaintext: b"bring your own key".to_vec(),
            ..Default::default()
        })
        .await
        .expect("encrypt")
        .into_inner();
    let opened = app
        .decrypt(pb::DecryptRequest {
            ciphertext: sealed.ciphertext,
            ..Default::default()
        })
        .await
        .expect("decrypt")
        .into_inner();
    assert_eq!(opened.plaintext, b"bring your own key");

    let details = admin
        .get_key(pb::GetKeyRequest {
            tenant: "acme".into(),
            name: "byok".into(),
        })
        .await
        .expect("get key")
        .into_inner();
    assert_eq!(details.latest_version, 1);
    assert_eq!(details.versions[0].origin, pb::KeyOrigin::External as i32);
    assert_eq!(details.versions[0].expire_time, now + 3600);
    let listed = admin
        .list_keys(pb::ListKeysRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .keys;
    for key in &listed {
        let expected = if key.name == "byok" {
            pb::KeyOrigin::External
        } else {
            pb::KeyOrigin::Generated
        };
        assert_eq!(key.origin, expected as i32, "{}", key.name);
    }

    let refused = expect_refused(
        admin
            .rotate_key(pb::RotateKeyRequest {
                tenant: "acme".into(),
                name: "byok".into(),
                request_id: String::new(),
            })
            .await,
        Code::FailedPrecondition,
        "imported keys rotate by import",
    );
    assert!(
        refused.message().contains("ImportKeyMaterial"),
        "{refused:?}"
    );
    // Version 2 with generated rotation allowed; then RotateKey adds version 3.
    let parameters = admin
        .get_import_parameters(pb::GetImportParametersRequest {
            tenant: "acme".into(),
            name: "byok".into(),
            wrapping_algorithm: pb::WrappingAlgorithm::RsaesOaepSha1 as i32,
        })
        .await
        .expect("parameters")
        .into_inner();
    let wrapped = keyfront::crypto::import::wrap_for_import(
        &parameters.public_key_der,
        keyfront::hsm::ImportWrapping::RsaesOaepSha1,
        &[0x6b; 32],
    )
    .expect("wrap");
    let key = admin
        .import_key_material(pb::ImportKeyMaterialRequest {
            tenant: "acme".into(),
            name: "byok".into(),
            import_token: parameters.import_token,
            encrypted_key_material: wrapped.clone(),
            allow_generated_rotation: true,
            ..Default::default()
        })
        .await
        .expect("import version 2")
        .into_inner();
    assert_eq!(key.primary_version, 2);
    assert!(key.allow_generated_rotation);
    let rotated = admin
        .rotate_key(pb::RotateKeyRequest {
            tenant: "acme".into(),
            name: "byok".into(),
            request_id: String::new(),
        })
        .await
        .expect("allowed now")
        .into_inner();
    assert_eq!(rotated.primary_version, 3);
    assert_eq!(rotated.origin, pb::KeyOrigin::External as i32);

    // RSA-OAEP with SHA-256: a token that does it (Kryoptic) imports with it; one that does
    // not (SoftHSM 2.6: SHA-1 only) refuses the parameters before anything is made. Which is
    // which is known of the tokens (docs/DESIGN.md), not taken from keyfront's own probe.
    let token_does_oaep_sha256 = !common::module().to_string_lossy().contains("softhsm");
    for (algorithm, wrapping, name) in [
        (
            pb::WrappingAlgorithm::RsaesOaepSha256,
            keyfront::hsm::ImportWrapping::RsaesOaepSha256,
            "byok-oaep-256",
        ),
        (
            pb::WrappingAlgorithm::RsaAesKeyWrapSha256,
            keyfront::hsm::ImportWrapping::RsaAesKeyWrapSha256,
            "byok-kwp-256",
        ),
    ] {
        let answer = admin
            .get_import_parameters(pb::GetImportParametersRequest {
                tenant: "acme".into(),
                name: name.into(),
                wrapping_algorithm: algorithm as i32,
            })
            .await;
        let parameters = match answer {
            Ok(parameters) => parameters.into_inner(),
            Err(refused) => {
                assert!(
                    !token_does_oaep_sha256,
                    "this token unwraps RSA-OAEP with SHA-256: {refused:?}"
                );
                assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
                assert!(refused.message().contains("SHA-256"), "{refused:?}");
                continue;
            }
        };
        assert!(
            token_does_oaep_sha256,
            "SoftHSM 2.6 does not unwrap RSA-OAEP with SHA-256, so the parameters must be refused"
        );
        let material = keyfront::crypto::import::wrap_for_import(
            &parameters.public_key_der,
            wrapping,
            &[0x6b; 32],
        )
        .expect("wrap");
        let key = admin
            .import_key_material(pb::ImportKeyMaterialRequest {
                tenant: "acme".into(),
                name: name.into(),
                import_token: parameters.import_token,
                encrypted_key_material: material,
                purpose: pb::KeyPurpose::Data as i32,
                valid_to: now + 3600,
                ..Default::default()
            })
            .await
            .expect("the token does SHA-256: the import goes through")
            .into_inner();
        assert_eq!(key.origin, pb::KeyOrigin::External as i32);
    }

    let audit = std::fs::read_to_string(h.dir.path().join("audit/audit.log")).expect("audit");
    use base64::Engine;
    for secret in [
        hex::encode(&wrapped[..32]),
        base64::engine::general_purpose::STANDARD.encode(&wrapped[..30]),
    ] {
        assert!(
            !audit.contains(&secret),
            "wrapped material in the audit log"
        );
    }
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .filter(|l: &serde_json::Value| l["rpc"] == "ImportKeyMaterial")
        .collect();
    assert!(lines.len() >= 2, "ImportKeyMaterial is audited: {lines:?}");
    h.stop().await;
}

/// Issue 25, finding 6: with ImportKeyMaterial under dual control, one officer's import waits
/// for a second, who is shown the material's key check value; the import happens only when
/// the second approves; the check value (HMAC-SHA-256 of the material, as the key's owner
/// computes it) is in the audit lines, and the material never is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_import_under_dual_control_shows_the_check_value_to_the_second_officer() {
    use keyfront::config::DualOperation;
    use tonic_types::StatusExt;
    let h = Harness::start_configured(
        false,
        |_, _| {},
        |config| config.dual_control.operations = [DualOperation::ImportKeyMaterial].into(),
    )
    .await;
    let material = [0x42u8; 32];
    let expected = keyfront::hsm::KeyCheckValue::of(&material).to_string();
    let (token, wrapped) = wrapped_for_import(
        &h,
        "byok",
        pb::WrappingAlgorithm::RsaAesKeyWrapSha1,
        &material,
    )
    .await;
    let mut officer = h.admin().await;
    let status = officer
        .import_key_material(pb::ImportKeyMaterialRequest {
            tenant: "acme".into(),
            name: "byok".into(),
            import_token: token,
            encrypted_key_material: wrapped.clone(),
            purpose: pb::KeyPurpose::Data as i32,
            ..Default::default()
        })
        .await
        .expect_err("waits for a second officer");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "APPROVAL_REQUIRED");
    let id = info.metadata.get("approval_id").expect("id").clone();
    expect_refused(
        officer
            .get_key(pb::GetKeyRequest {
                tenant: "acme".into(),
                name: "byok".into(),
            })
            .await,
        Code::NotFound,
        "not imported yet",
    );
    let mut second = AdminServiceClient::new(h.channel("officer-2").await);
    let listed = second
        .list_approvals(pb::ListApprovalsRequest::default())
        .await
        .expect("list")
        .into_inner();
    let pending = listed
        .approvals
        .iter()
        .find(|a| a.id == id)
        .expect("the request is listed");
    assert!(
        pending
            .operation
            .contains(&format!("key check value {expected}")),
        "the second officer sees the check value: {}",
        pending.operation
    );
    second
        .approve_operation(pb::ApproveOperationRequest {
            approval_id: id.clone(),
        })
        .await
        .expect("the second officer approves");
    let key = officer
        .get_key(pb::GetKeyRequest {
            tenant: "acme".into(),
            name: "byok".into(),
        })
        .await
        .expect("imported now")
        .into_inner();
    assert_eq!(key.origin, pb::KeyOrigin::External as i32);
    let lines = h.audit_lines();
    let with_value: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["key_check_value"] == expected.as_str())
        .collect();
    let rpcs: Vec<&str> = with_value
        .iter()
        .filter_map(|l| l["rpc"].as_str())
        .collect();
    assert!(
        rpcs.iter().any(|r| r.ends_with("/ImportKeyMaterial"))
            && rpcs.iter().any(|r| r.ends_with("/ApproveOperation")),
        "{rpcs:?}"
    );
    let log = std::fs::read_to_string(h.dir.path().join("audit/audit.log")).expect("log");
    assert!(!log.contains(&hex::encode(material)), "never the material");
}
