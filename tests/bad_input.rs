//! The bad-input sweep against a real `keyfront dev` process with its default limits: random
//! blobs of every length, every single-bit mutation of real ones, cut and extended blobs,
//! 10,000-pair contexts, 1 MiB and path-like names, 100,000-item batches and 1 ms deadlines.
//! Every answer is a clear status (never UNKNOWN, INTERNAL or UNAVAILABLE, never OK for
//! garbage), and afterwards nothing has changed: the same keys, everything made before still
//! decrypts, and the audit log verifies.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::dev_server::{BIN, DevServer, text};
use keyfront::service::pb;
use keyfront::service::pb::admin_service_client::AdminServiceClient;
use keyfront::service::pb::key_service_client::KeyServiceClient;
use rand::{Rng, RngCore};
use tonic::Code;
use tonic::transport::Channel;

/// The statuses a bad request may get.
const CLEAR: &[Code] = &[
    Code::InvalidArgument,
    Code::NotFound,
    Code::PermissionDenied,
    Code::FailedPrecondition,
    Code::ResourceExhausted,
    Code::OutOfRange,
];

/// Counts answers by status and fails on anything unclear.
#[derive(Default)]
struct Tally {
    codes: HashMap<Code, usize>,
}

impl Tally {
    fn refused<T: std::fmt::Debug>(&mut self, what: &str, result: Result<T, tonic::Status>) {
        match result {
            Ok(value) => panic!("{what}: bad input was accepted: {value:?}"),
            Err(status) => {
                assert!(
                    CLEAR.contains(&status.code()),
                    "{what}: unclear status {status:?}"
                );
                assert!(!status.message().is_empty(), "{what}: no message");
                *self.codes.entry(status.code()).or_default() += 1;
            }
        }
    }

    /// A deadline may also expire, or the call may be fast enough; never anything unclear.
    fn in_time<T>(&mut self, what: &str, result: Result<T, tonic::Status>) {
        let code = match result {
            Ok(_) => Code::Ok,
            Err(status) => {
                assert!(
                    matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
                    "{what}: {status:?}"
                );
                status.code()
            }
        };
        *self.codes.entry(code).or_default() += 1;
    }

    fn total(&self) -> usize {
        self.codes.values().sum()
    }
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// Every length from 0 to 600, then some large ones; each filled at random, and for each
/// length also a copy that keeps a real blob's header (so the body is what is wrong).
fn lengths() -> impl Iterator<Item = usize> {
    (0..=600).chain([1023, 4096, 65_535, 1 << 20])
}

fn with_header(real: &[u8], len: usize) -> Vec<u8> {
    let mut bytes = random_bytes(len);
    let keep = real.len().min(len).min(24);
    bytes[..keep].copy_from_slice(&real[..keep]);
    bytes
}

/// Every single-bit flip, every cut, and a few extensions of a real blob.
fn mutations(real: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for i in 0..real.len() {
        for bit in [0, 7] {
            let mut m = real.to_vec();
            m[i] ^= 1 << bit;
            out.push(m);
        }
        out.push(real[..i].to_vec());
    }
    for extra in [1, 16, 1000] {
        let mut m = real.to_vec();
        m.extend(random_bytes(extra));
        out.push(m);
    }
    out
}

async fn keys(server: &DevServer, principal: &str) -> KeyServiceClient<Channel> {
    KeyServiceClient::new(server.channel(principal).await)
}

/// What existed before the sweep, to check nothing changed.
struct Before {
    ciphertext: Vec<u8>,
    wrapped: (Vec<u8>, Vec<u8>),
    sealed: Vec<u8>,
    hash: String,
    keys: Vec<(String, u32)>,
}

async fn key_list(admin: &mut AdminServiceClient<Channel>) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for tenant in ["acme", "globex"] {
        let reply = admin
            .list_keys(pb::ListKeysRequest {
                tenant: tenant.into(),
                page_size: 1000,
                page_token: String::new(),
            })
            .await
            .expect("list keys")
            .into_inner();
        out.extend(
            reply
                .keys
                .into_iter()
                .map(|k| (format!("{tenant}/{}", k.name), k.latest_version)),
        );
    }
    out.sort();
    out
}

async fn before(server: &DevServer) -> Before {
    let mut app = keys(server, "acme-app").await;
    let ciphertext = app
        .encrypt(pb::EncryptRequest {
            key: "default".into(),
            plaintext: b"made before the sweep".to_vec(),
            context: [("row".to_owned(), "1".to_owned())].into(),
            ..Default::default()
        })
        .await
        .expect("encrypt")
        .into_inner()
        .ciphertext;
    let data_key = keys(server, "acme-backup")
        .await
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "default".into(),
            include_plaintext: true,
            ..Default::default()
        })
        .await
        .expect("data key")
        .into_inner();
    let mut secrets = keys(server, "acme-secrets").await;
    let sealed = secrets
        .seal_secret(pb::SealSecretRequest {
            key: "secrets".into(),
            secret: b"token".to_vec(),
            ..Default::default()
        })
        .await
        .expect("seal")
        .into_inner()
        .sealed;
    let hash = secrets
        .hash_password(pb::HashPasswordRequest {
            key: "secrets".into(),
            password: b"hunter2".to_vec(),
            ..Default::default()
        })
        .await
        .expect("hash")
        .into_inner()
        .hash;
    let mut admin = AdminServiceClient::new(server.channel("officer").await);
    Before {
        ciphertext,
        wrapped: (data_key.wrapped_key, data_key.plaintext_key),
        sealed,
        hash,
        keys: key_list(&mut admin).await,
    }
}

#[test]
fn every_bad_input_gets_a_clear_status_and_changes_nothing() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let server = DevServer::start();
    let before = runtime.block_on(before(&server));
    let mut tally = Tally::default();
    runtime.block_on(async {
        let mut app = keys(&server, "acme-app").await;
        let mut backup = keys(&server, "acme-backup").await;
        let mut secrets = keys(&server, "acme-secrets").await;
        let mut admin = AdminServiceClient::new(server.channel("officer").await);

        // Random blobs of every length, bare and behind a real header; every mutation.
        let mut blobs: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> = lengths()
            .map(|len| (random_bytes(len), random_bytes(len), random_bytes(len)))
            .collect();
        blobs.extend(lengths().map(|len| {
            (
                with_header(&before.ciphertext, len),
                with_header(&before.wrapped.0, len),
                with_header(&before.sealed, len),
            )
        }));
        let (c, w, s) = (
            mutations(&before.ciphertext),
            mutations(&before.wrapped.0),
            mutations(&before.sealed),
        );
        let longest = c.len().max(w.len()).max(s.len());
        for i in 0..longest {
            let pick = |v: &Vec<Vec<u8>>| v[i % v.len()].clone();
            blobs.push((pick(&c), pick(&w), pick(&s)));
        }
        // One task per RPC, so both cores work.
        let blobs = std::sync::Arc::new(blobs);
        let mut sweeps = Vec::new();
        for rpc in [
            "Decrypt",
            "ReEncrypt",
            "DecryptDataKey",
            "ReEncryptDataKey",
            "UnsealSecret",
        ] {
            let blobs = std::sync::Arc::clone(&blobs);
            let (mut app, mut backup, mut secrets) = (app.clone(), backup.clone(), secrets.clone());
            sweeps.push(tokio::spawn(async move {
                let started = std::time::Instant::now();
                let mut tally = Tally::default();
                let context: HashMap<String, String> = [("row".to_owned(), "1".to_owned())].into();
                for (ciphertext, wrapped, sealed) in blobs.iter() {
                    let what = format!(
                        "{rpc} of {} bytes",
                        match rpc {
                            "Decrypt" | "ReEncrypt" => ciphertext.len(),
                            "UnsealSecret" => sealed.len(),
                            _ => wrapped.len(),
                        }
                    );
                    match rpc {
                        "Decrypt" => tally.refused(
                            &what,
                            app.decrypt(pb::DecryptRequest {
                                ciphertext: ciphertext.clone(),
                                context: context.clone(),
                                ..Default::default()
                            })
                            .await,
                        ),
                        "ReEncrypt" => tally.refused(
                            &what,
                            app.re_encrypt(pb::ReEncryptRequest {
                                ciphertext: ciphertext.clone(),
                                context: context.clone(),
                                ..Default::default()
                            })
                            .await,
                        ),
                        "DecryptDataKey" => tally.refused(
                            &what,
                            backup
                                .decrypt_data_key(pb::DecryptDataKeyRequest {
                                    wrapped_key: wrapped.clone(),
                                    ..Default::default()
                                })
                                .await,
                        ),
                        "ReEncryptDataKey" => tally.refused(
                            &what,
                            backup
                                .re_encrypt_data_key(pb::ReEncryptDataKeyRequest {
                                    wrapped_key: wrapped.clone(),
                                    ..Default::default()
                                })
                                .await,
                        ),
                        _ => tally.refused(
                            &what,
                            secrets
                                .unseal_secret(pb::UnsealSecretRequest {
                                    sealed: sealed.clone(),
                                    ..Default::default()
                                })
                                .await,
                        ),
                    }
                }
                println!("{rpc}: {} blobs in {:?}", blobs.len(), started.elapsed());
                tally
            }));
        }
        for sweep in sweeps {
            let done = sweep.await.expect("sweep");
            for (code, n) in done.codes {
                *tally.codes.entry(code).or_default() += n;
            }
        }
        // BatchDecrypt: a whole batch of garbage refuses item by item, never the call.
        let reply = app
            .batch_decrypt(pb::BatchDecryptRequest {
                items: blobs
                    .iter()
                    .take(1000)
                    .filter(|(c, _, _)| c.len() < 4096)
                    .map(|(c, _, _)| pb::BatchDecryptItem {
                        ciphertext: c.clone(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .expect("a batch of garbage is answered item by item")
            .into_inner();
        for result in &reply.results {
            let code = Code::from(result.status.as_ref().map_or(0, |s| s.code));
            assert!(CLEAR.contains(&code), "batch item: {result:?}");
        }

        // MACs: random ones of every length and every mutation of a real one are answered
        // valid = false; wrong keys, purposes and versions get clear refusals.
        let data = b"invoice 42".to_vec();
        let real = app
            .generate_mac(pb::GenerateMacRequest {
                key: "mac".into(),
                data: data.clone(),
                ..Default::default()
            })
            .await
            .expect("a MAC")
            .into_inner();
        let mut macs: Vec<Vec<u8>> = lengths().map(random_bytes).collect();
        macs.extend(mutations(&real.mac));
        for mac in macs {
            let answer = app
                .verify_mac(pb::VerifyMacRequest {
                    key: "mac".into(),
                    data: data.clone(),
                    mac: mac.clone(),
                    key_version: real.key_version,
                    ..Default::default()
                })
                .await
                .expect("a wrong MAC is an answer, not an error")
                .into_inner();
            assert!(!answer.valid, "a MAC of {} bytes verified", mac.len());
            *tally.codes.entry(Code::Ok).or_default() += 1;
        }
        for (key, version) in [
            ("default", 0),
            ("secrets", 0),
            ("nosuch", 0),
            ("mac", 99),
            ("../mac", 0),
            ("", 0),
        ] {
            tally.refused(
                &format!("VerifyMac with key {key:?} version {version}"),
                app.verify_mac(pb::VerifyMacRequest {
                    key: key.into(),
                    data: data.clone(),
                    mac: real.mac.clone(),
                    key_version: version,
                    ..Default::default()
                })
                .await,
            );
            tally.refused(
                &format!("GenerateMac with key {key:?}"),
                app.generate_mac(pb::GenerateMacRequest {
                    key: if version == 99 {
                        "default".into()
                    } else {
                        key.into()
                    },
                    data: data.clone(),
                    ..Default::default()
                })
                .await,
            );
        }
        tally.refused(
            "GenerateMac with a wrong CRC32C",
            app.generate_mac(pb::GenerateMacRequest {
                key: "mac".into(),
                data: data.clone(),
                data_crc32c: Some(crc32c::crc32c(&data) ^ 1),
                ..Default::default()
            })
            .await,
        );

        // Signatures: random ones of every length and every mutation of a real one are
        // answered valid = false; digests of every wrong length, unknown message types, wrong
        // keys, purposes and versions get clear refusals.
        let message = b"release 1.0".to_vec();
        let real = app
            .sign(pb::SignRequest {
                key: "signing".into(),
                message: message.clone(),
                ..Default::default()
            })
            .await
            .expect("a signature")
            .into_inner();
        let mut signatures: Vec<Vec<u8>> = lengths().map(random_bytes).collect();
        signatures.extend(mutations(&real.signature));
        for signature in signatures {
            let answer = app
                .verify(pb::VerifyRequest {
                    key: "signing".into(),
                    message: message.clone(),
                    signature: signature.clone(),
                    key_version: real.key_version,
                    ..Default::default()
                })
                .await
                .expect("a wrong signature is an answer, not an error")
                .into_inner();
            assert!(
                !answer.valid,
                "a signature of {} bytes verified",
                signature.len()
            );
            *tally.codes.entry(Code::Ok).or_default() += 1;
        }
        for digest in lengths().filter(|len| *len != 32).map(random_bytes) {
            tally.refused(
                &format!("Verify of a {}-byte digest", digest.len()),
                app.verify(pb::VerifyRequest {
                    key: "signing".into(),
                    message: digest.clone(),
                    message_type: pb::MessageType::Digest as i32,
                    signature: real.signature.clone(),
                    key_version: real.key_version,
                    ..Default::default()
                })
                .await,
            );
            tally.refused(
                &format!("Sign of a {}-byte digest", digest.len()),
                app.sign(pb::SignRequest {
                    key: "signing".into(),
                    message: digest,
                    message_type: pb::MessageType::Digest as i32,
                    ..Default::default()
                })
                .await,
            );
        }
        for message_type in [3, -1, i32::MAX] {
            tally.refused(
                &format!("Sign with message type {message_type}"),
                app.sign(pb::SignRequest {
                    key: "signing".into(),
                    message: message.clone(),
                    message_type,
                    ..Default::default()
                })
                .await,
            );
            tally.refused(
                &format!("Verify with message type {message_type}"),
                app.verify(pb::VerifyRequest {
                    key: "signing".into(),
                    message: message.clone(),
                    message_type,
                    signature: real.signature.clone(),
                    ..Default::default()
                })
                .await,
            );
        }
        for (key, version) in [
            ("default", 0),
            ("mac", 0),
            ("nosuch", 0),
            ("signing", 99),
            ("../signing", 0),
            ("", 0),
        ] {
            tally.refused(
                &format!("Verify with key {key:?} version {version}"),
                app.verify(pb::VerifyRequest {
                    key: key.into(),
                    message: message.clone(),
                    signature: real.signature.clone(),
                    key_version: version,
                    ..Default::default()
                })
                .await,
            );
            tally.refused(
                &format!("GetPublicKey with key {key:?} version {version}"),
                app.get_public_key(pb::GetPublicKeyRequest {
                    key: key.into(),
                    key_version: version,
                    ..Default::default()
                })
                .await,
            );
            if version == 0 {
                tally.refused(
                    &format!("Sign with key {key:?}"),
                    app.sign(pb::SignRequest {
                        key: key.into(),
                        message: message.clone(),
                        ..Default::default()
                    })
                    .await,
                );
            }
        }
        tally.refused(
            "Sign with a wrong CRC32C",
            app.sign(pb::SignRequest {
                key: "signing".into(),
                message: message.clone(),
                message_crc32c: Some(crc32c::crc32c(&message) ^ 1),
                ..Default::default()
            })
            .await,
        );

        // Password hashes: random, cut and mutated PHC strings.
        let mut hashes: Vec<String> = (0..200)
            .map(|len| {
                let mut rng = rand::rng();
                (0..len).map(|_| rng.random_range(' '..='~')).collect()
            })
            .collect();
        // Every cut; a change of one character at every fourth position (one that still
        // parses costs a whole Argon2 computation).
        for i in 0..before.hash.len() {
            hashes.push(before.hash[..i].to_owned());
            if i % 4 == 0 {
                let mut bytes = before.hash.clone().into_bytes();
                bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
                hashes.push(String::from_utf8_lossy(&bytes).into_owned());
            }
        }
        hashes.push(format!("{}$extra", before.hash));
        for hash in hashes {
            let result = secrets
                .verify_password(pb::VerifyPasswordRequest {
                    key: "secrets".into(),
                    password: b"hunter2".to_vec(),
                    hash: hash.clone(),
                    ..Default::default()
                })
                .await;
            // A mutated hash may parse and simply not match; that is a clear answer too.
            match result {
                Ok(reply) => assert!(!reply.into_inner().matches, "{hash} matched"),
                Err(status) => {
                    tally.refused(&format!("VerifyPassword {hash:?}"), Err::<(), _>(status))
                }
            }
        }

        // Oversized and hostile names, contexts and batches.
        let huge_context: HashMap<String, String> = (0..10_000)
            .map(|i| (format!("k{i}"), "v".to_owned()))
            .collect();
        tally.refused(
            "Encrypt with 10,000 context pairs",
            app.encrypt(pb::EncryptRequest {
                key: "default".into(),
                plaintext: b"x".to_vec(),
                context: huge_context.clone(),
                ..Default::default()
            })
            .await,
        );
        tally.refused(
            "Decrypt with 10,000 context pairs",
            app.decrypt(pb::DecryptRequest {
                ciphertext: before.ciphertext.clone(),
                context: huge_context,
                ..Default::default()
            })
            .await,
        );
        let names = [
            "a".repeat(1 << 20),
            "acme/default".into(),
            "../default".into(),
            "..".into(),
            "default\0".into(),
            "\0".into(),
            String::new(),
            "DEFAULT".into(),
            "défault".into(),
            "-default".into(),
            "a".repeat(64),
        ];
        for name in &names {
            let short: String = name.chars().take(20).collect();
            tally.refused(
                &format!("Encrypt under {short:?}"),
                app.encrypt(pb::EncryptRequest {
                    key: name.clone(),
                    plaintext: b"x".to_vec(),
                    ..Default::default()
                })
                .await,
            );
            tally.refused(
                &format!("CreateKey {short:?}"),
                admin
                    .create_key(pb::CreateKeyRequest {
                        tenant: "acme".into(),
                        name: name.clone(),
                        purpose: pb::KeyPurpose::Data.into(),
                        request_id: String::new(),
                        ..Default::default()
                    })
                    .await,
            );
            tally.refused(
                &format!("CreateKey in tenant {short:?}"),
                admin
                    .create_key(pb::CreateKeyRequest {
                        tenant: name.clone(),
                        name: "fresh".into(),
                        purpose: pb::KeyPurpose::Data.into(),
                        request_id: String::new(),
                        ..Default::default()
                    })
                    .await,
            );
            tally.refused(
                &format!("CreateTenant {short:?}"),
                admin
                    .create_tenant(pb::CreateTenantRequest {
                        name: name.clone(),
                        request_id: String::new(),
                    })
                    .await,
            );
            tally.refused(
                &format!("GetKey {short:?}"),
                admin
                    .get_key(pb::GetKeyRequest {
                        tenant: "acme".into(),
                        name: name.clone(),
                    })
                    .await,
            );
        }
        tally.refused(
            "CreateKey with no purpose",
            admin
                .create_key(pb::CreateKeyRequest {
                    tenant: "acme".into(),
                    name: "no-purpose".into(),
                    purpose: 0,
                    request_id: String::new(),
                    ..Default::default()
                })
                .await,
        );
        tally.refused(
            "CreateKey with purpose 99",
            admin
                .create_key(pb::CreateKeyRequest {
                    tenant: "acme".into(),
                    name: "odd-purpose".into(),
                    purpose: 99,
                    request_id: String::new(),
                    ..Default::default()
                })
                .await,
        );
        // Key import: material of every length, every mutation of real wrapped material, a
        // wrong token, bad algorithms and expiries; no key appears (the key list is compared
        // at the end).
        let parameters = admin
            .get_import_parameters(pb::GetImportParametersRequest {
                tenant: "acme".into(),
                name: "imported".into(),
                wrapping_algorithm: pb::WrappingAlgorithm::RsaAesKeyWrapSha1 as i32,
            })
            .await
            .expect("import parameters")
            .into_inner();
        let real = keyfront::crypto::import::wrap_for_import(
            &parameters.public_key_der,
            keyfront::hsm::ImportWrapping::RsaAesKeyWrapSha1,
            &[9; 32],
        )
        .expect("wrap");
        let import = |material: Vec<u8>, token: &str| pb::ImportKeyMaterialRequest {
            tenant: "acme".into(),
            name: "imported".into(),
            import_token: token.to_owned(),
            encrypted_key_material: material,
            purpose: pb::KeyPurpose::Data as i32,
            ..Default::default()
        };
        let token = parameters.import_token.clone();
        let wrong_material = lengths()
            .map(|len| (format!("{len} random bytes"), random_bytes(len)))
            .chain(
                mutations(&real)
                    .into_iter()
                    .enumerate()
                    .map(|(i, m)| (format!("mutation {i}"), m)),
            );
        for (what, material) in wrong_material {
            tally.refused(
                &format!("ImportKeyMaterial of {what}"),
                admin.import_key_material(import(material, &token)).await,
            );
        }
        for bad_token in ["", "0", &"f".repeat(32), &"x".repeat(10_000)] {
            tally.refused(
                &format!("ImportKeyMaterial with token {:.20}", bad_token),
                admin
                    .import_key_material(import(real.clone(), bad_token))
                    .await,
            );
        }
        for (what, request) in [
            (
                "valid_to in the past",
                pb::ImportKeyMaterialRequest {
                    valid_to: 1,
                    ..import(real.clone(), &token)
                },
            ),
            (
                "negative valid_to",
                pb::ImportKeyMaterialRequest {
                    valid_to: -5,
                    ..import(real.clone(), &token)
                },
            ),
            (
                "purpose SIGN",
                pb::ImportKeyMaterialRequest {
                    purpose: pb::KeyPurpose::Sign as i32,
                    algorithm: pb::KeyAlgorithm::EcdsaP256Sha256 as i32,
                    ..import(real.clone(), &token)
                },
            ),
            (
                "no purpose for a new key",
                pb::ImportKeyMaterialRequest {
                    purpose: 0,
                    ..import(real.clone(), &token)
                },
            ),
            (
                "an HMAC-SHA-512 key of 32 bytes",
                pb::ImportKeyMaterialRequest {
                    purpose: pb::KeyPurpose::Mac as i32,
                    algorithm: pb::KeyAlgorithm::HmacSha512 as i32,
                    ..import(real.clone(), &token)
                },
            ),
            (
                "into a generated key",
                pb::ImportKeyMaterialRequest {
                    name: "default".into(),
                    ..import(real.clone(), &token)
                },
            ),
        ] {
            tally.refused(
                &format!("ImportKeyMaterial with {what}"),
                admin.import_key_material(request).await,
            );
        }
        for algorithm in [0, 2, 4, 5, 99, -1] {
            tally.refused(
                &format!("GetImportParameters with wrapping algorithm {algorithm}"),
                admin
                    .get_import_parameters(pb::GetImportParametersRequest {
                        tenant: "acme".into(),
                        name: "imported".into(),
                        wrapping_algorithm: algorithm,
                    })
                    .await,
            );
        }
        for (tenant, name) in [("acme", "default"), ("nope", "x"), ("acme", "../x")] {
            tally.refused(
                &format!("GetImportParameters for {tenant}/{name}"),
                admin
                    .get_import_parameters(pb::GetImportParametersRequest {
                        tenant: tenant.into(),
                        name: name.into(),
                        wrapping_algorithm: pb::WrappingAlgorithm::RsaesOaepSha1 as i32,
                    })
                    .await,
            );
        }
        tally.refused(
            "BatchEncrypt of 100,000 items",
            app.batch_encrypt(pb::BatchEncryptRequest {
                key: "default".into(),
                items: (0..100_000)
                    .map(|_| pb::BatchEncryptItem {
                        plaintext: b"x".to_vec(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .await,
        );
        tally.refused(
            "BatchDecrypt of 100,000 items",
            app.batch_decrypt(pb::BatchDecryptRequest {
                items: (0..100_000)
                    .map(|_| pb::BatchDecryptItem {
                        ciphertext: vec![1],
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .await,
        );
        tally.refused(
            "Encrypt of 5 MiB",
            app.encrypt(pb::EncryptRequest {
                key: "default".into(),
                plaintext: vec![0; 5 << 20],
                ..Default::default()
            })
            .await,
        );

        // 1 ms deadlines: answered in time or DEADLINE_EXCEEDED, never anything else.
        for _ in 0..50 {
            let mut request = tonic::Request::new(pb::EncryptRequest {
                key: "default".into(),
                plaintext: b"hurry".to_vec(),
                ..Default::default()
            });
            request.set_timeout(Duration::from_millis(1));
            tally.in_time("Encrypt in 1 ms", app.encrypt(request).await);
            let mut request = tonic::Request::new(pb::GenerateDataKeyRequest {
                key: "default".into(),
                ..Default::default()
            });
            request.set_timeout(Duration::from_millis(1));
            tally.in_time(
                "GenerateDataKey in 1 ms",
                backup.generate_data_key(request).await,
            );
            let mut request = tonic::Request::new(pb::HashPasswordRequest {
                key: "secrets".into(),
                password: b"hurry".to_vec(),
                ..Default::default()
            });
            request.set_timeout(Duration::from_millis(1));
            let result = secrets.hash_password(request).await;
            // Two hashes at once at most: a third is refused at once, which is clear too.
            match result {
                Err(status) if status.code() == Code::ResourceExhausted => {}
                other => tally.in_time("HashPassword in 1 ms", other),
            }
        }
    });
    println!("{} bad requests answered: {:?}", tally.total(), tally.codes);

    // Nothing changed.
    runtime.block_on(async {
        let mut admin = AdminServiceClient::new(server.channel("officer").await);
        assert_eq!(key_list(&mut admin).await, before.keys, "the keys changed");
        let back = keys(&server, "acme-app")
            .await
            .decrypt(pb::DecryptRequest {
                ciphertext: before.ciphertext.clone(),
                context: [("row".to_owned(), "1".to_owned())].into(),
                ..Default::default()
            })
            .await
            .expect("decrypt after the sweep");
        assert_eq!(back.into_inner().plaintext, b"made before the sweep");
        let key = keys(&server, "acme-backup")
            .await
            .decrypt_data_key(pb::DecryptDataKeyRequest {
                wrapped_key: before.wrapped.0.clone(),
                ..Default::default()
            })
            .await
            .expect("data key after the sweep");
        assert_eq!(key.into_inner().plaintext_key, before.wrapped.1);
        let mut secrets = keys(&server, "acme-secrets").await;
        let secret = secrets
            .unseal_secret(pb::UnsealSecretRequest {
                sealed: before.sealed.clone(),
                ..Default::default()
            })
            .await
            .expect("unseal after the sweep");
        assert_eq!(secret.into_inner().secret, b"token");
        // Hashes whose callers gave up at 1 ms still finish on their threads and hold their
        // slots until then; the slots come back (a leak would refuse this forever).
        let mut verdict = None;
        for _ in 0..100 {
            match secrets
                .verify_password(pb::VerifyPasswordRequest {
                    key: "secrets".into(),
                    password: b"hunter2".to_vec(),
                    hash: before.hash.clone(),
                    ..Default::default()
                })
                .await
            {
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => {
                    verdict = Some(other.expect("verify after the sweep"));
                    break;
                }
            }
        }
        let verdict = verdict.expect("the password slots came back within 10 s");
        assert!(verdict.into_inner().matches);
    });
    let (dir, logs, status) = server.stop();
    assert_eq!(status, 0, "{logs}");
    let audit = dir.path().join("audit/audit.log");
    let out = std::process::Command::new(BIN)
        .args(["audit", "verify", "--public-key"])
        .arg(format!(
            "@{}",
            dir.path().join("audit-public-key.hex").display()
        ))
        .arg(&audit)
        .output()
        .expect("audit verify");
    assert!(out.status.success(), "{}", text(&out.stdout));
}
