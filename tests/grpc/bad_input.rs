//! Bad input gets the documented status and changes nothing: the data plane, the lifecycle and the password RPCs.

use keyfront::service::pb;
use std::collections::HashMap;
use tonic::Code;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_documented_status() {
    let h = Harness::start(false).await;
    let mut app = h.keys("acme-app").await;
    let good = encrypt(&mut app, b"payload").await;
    let decrypt = |ciphertext: Vec<u8>, context: HashMap<String, String>| pb::DecryptRequest {
        ciphertext,
        context,
        ..Default::default()
    };

    let mut tampered = good.ciphertext.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert_eq!(
        code(
            app.decrypt(decrypt(tampered, ctx(&[("row", CONTEXT_MARKER)])))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            app.decrypt(decrypt(good.ciphertext.clone(), ctx(&[("row", "other")])))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            app.encrypt(pb::EncryptRequest {
                key: "nope".into(),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            app.encrypt(pb::EncryptRequest {
                key: "Not A Name".into(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            app.encrypt(pb::EncryptRequest {
                key: "secrets".into(),
                ..Default::default()
            })
            .await
        ),
        Code::PermissionDenied
    );
    let too_big = app
        .encrypt(pb::EncryptRequest {
            key: "default".into(),
            plaintext: vec![0; 100 * 1024],
            ..Default::default()
        })
        .await
        .expect_err("too big");
    assert!(
        matches!(too_big.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{too_big:?}"
    );
    let crc = expect_refused(
        app.encrypt(pb::EncryptRequest {
            key: "default".into(),
            plaintext: b"abc".to_vec(),
            plaintext_crc32c: Some(0),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "crc",
    );
    assert!(crc.message().contains("plaintext_crc32c"));
    let mut bad_crc = decrypt(good.ciphertext.clone(), ctx(&[("row", CONTEXT_MARKER)]));
    bad_crc.ciphertext_crc32c = Some(good.ciphertext_crc32c ^ 1);
    assert_eq!(code(app.decrypt(bad_crc).await), Code::InvalidArgument);
    let many: HashMap<String, String> =
        (0..20).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    assert_eq!(
        code(
            app.encrypt(pb::EncryptRequest {
                key: "default".into(),
                context: many,
                ..Default::default()
            })
            .await
        ),
        Code::ResourceExhausted
    );
    let over = (0..11).map(|_| pb::BatchEncryptItem::default()).collect();
    assert_eq!(
        code(
            app.batch_encrypt(pb::BatchEncryptRequest {
                key: "default".into(),
                items: over,
                tenant: String::new(),
                grant_id: String::new()
            })
            .await
        ),
        Code::ResourceExhausted
    );
    // A data key is not a ciphertext.
    let data_key = h
        .keys("acme-backup")
        .await
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "default".into(),
            ..Default::default()
        })
        .await
        .expect("dk")
        .into_inner()
        .wrapped_key;
    assert_eq!(
        code(app.decrypt(decrypt(data_key, HashMap::new())).await),
        Code::InvalidArgument
    );
    // A batch with some bad items: the good ones succeed, each bad one has its own status.
    let items = vec![
        pb::BatchDecryptItem {
            ciphertext: good.ciphertext.clone(),
            context: ctx(&[("row", CONTEXT_MARKER)]),
            ciphertext_crc32c: None,
        },
        pb::BatchDecryptItem {
            ciphertext: b"garbage".to_vec(),
            context: HashMap::new(),
            ciphertext_crc32c: None,
        },
        pb::BatchDecryptItem {
            ciphertext: good.ciphertext.clone(),
            context: ctx(&[("row", CONTEXT_MARKER)]),
            ciphertext_crc32c: Some(1),
        },
        pb::BatchDecryptItem {
            ciphertext: good.ciphertext.clone(),
            context: (0..20).map(|i| (format!("k{i}"), String::new())).collect(),
            ciphertext_crc32c: None,
        },
    ];
    let results = app
        .batch_decrypt(pb::BatchDecryptRequest {
            key: String::new(),
            items,
            tenant: String::new(),
            grant_id: String::new(),
        })
        .await
        .expect("batch answers")
        .into_inner()
        .results;
    let codes: Vec<i32> = results
        .iter()
        .map(|r| r.status.as_ref().map_or(-1, |s| s.code))
        .collect();
    assert_eq!(
        codes,
        [
            Code::Ok as i32,
            Code::InvalidArgument as i32,
            Code::InvalidArgument as i32,
            Code::ResourceExhausted as i32
        ]
    );
    assert_eq!(results[0].plaintext, b"payload");
    assert!(results[1].plaintext.is_empty());
    let mut admin = h.admin().await;
    assert_eq!(
        code(
            admin
                .create_key(pb::CreateKeyRequest {
                    tenant: "acme".into(),
                    name: "k".into(),
                    purpose: 0,
                    request_id: String::new(),
                    ..Default::default()
                })
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            admin
                .create_tenant(pb::CreateTenantRequest {
                    name: "acme".into(),
                    request_id: String::new()
                })
                .await
        ),
        Code::AlreadyExists
    );
    assert_eq!(
        code(
            admin
                .get_key(pb::GetKeyRequest {
                    tenant: "nobody".into(),
                    name: "default".into()
                })
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            admin
                .list_tenants(pb::ListTenantsRequest {
                    page_size: 1,
                    page_token: "zz".into()
                })
                .await
        ),
        Code::InvalidArgument
    );
    h.stop().await;
}

/// Malformed and impossible lifecycle, approval and password requests get a clear status and
/// change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_and_password_bad_input_gets_clear_statuses() {
    let h = Harness::start(false).await;
    let mut admin = h.admin().await;
    let version = |version: u32| pb::KeyVersionRequest {
        tenant: "acme".into(),
        name: "default".into(),
        version,
        request_id: String::new(),
    };
    let code_of = |result: Result<tonic::Response<pb::KeyVersion>, tonic::Status>| {
        result.expect_err("refused").code()
    };
    assert_eq!(
        code_of(admin.disable_key_version(version(0)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(admin.disable_key_version(version(9)).await),
        Code::NotFound
    );
    let not_scheduled = admin
        .cancel_key_version_destruction(version(1))
        .await
        .expect_err("not scheduled");
    assert_eq!(reason(&not_scheduled).as_deref(), Some("NOT_SCHEDULED"));
    let not_scheduled = admin
        .cancel_tenant_destruction(pb::CancelTenantDestructionRequest {
            name: "acme".into(),
            request_id: String::new(),
        })
        .await
        .expect_err("not scheduled");
    assert_eq!(reason(&not_scheduled).as_deref(), Some("NOT_SCHEDULED"));
    let policy = |request: pb::UpdateKeyPolicyRequest| pb::UpdateKeyPolicyRequest {
        tenant: "acme".into(),
        name: "default".into(),
        ..request
    };
    for bad in [
        pb::UpdateKeyPolicyRequest {
            rotation_period_seconds: Some(-1),
            ..Default::default()
        },
        pb::UpdateKeyPolicyRequest {
            destruction_window_seconds: Some(86_400),
            ..Default::default()
        },
        pb::UpdateKeyPolicyRequest {
            min_decryption_version: Some(2),
            ..Default::default()
        },
    ] {
        let status = admin
            .update_key_policy(policy(bad.clone()))
            .await
            .expect_err("invalid policy");
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
    }
    for (id, code) in [
        ("", Code::InvalidArgument),
        ("not-hex", Code::InvalidArgument),
        ("00ff", Code::NotFound),
    ] {
        let status = admin
            .approve_operation(pb::ApproveOperationRequest {
                approval_id: id.into(),
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), code, "{id:?}: {status:?}");
    }
    let key = admin
        .get_key(pb::GetKeyRequest {
            tenant: "acme".into(),
            name: "default".into(),
        })
        .await
        .expect("key")
        .into_inner();
    assert_eq!(key.versions[0].state, pb::KeyVersionState::Enabled as i32);
    assert_eq!(
        key.policy
            .map(|p| (p.min_decryption_version, p.rotation_period_seconds)),
        Some((0, 0))
    );

    let mut secrets = h.keys("acme-secrets").await;
    expect_refused(
        secrets
            .hash_password(pb::HashPasswordRequest {
                key: "secrets".into(),
                password: Vec::new(),
                tenant: String::new(),
                grant_id: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "empty password",
    );
    expect_refused(
        secrets
            .verify_password(pb::VerifyPasswordRequest {
                key: "secrets".into(),
                password: b"x".to_vec(),
                hash: "$argon2id$v=19$m=4194304,t=1,p=1,pv=1$AAAA$AAAA".into(),
                tenant: String::new(),
                grant_id: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "crafted hash",
    );
    expect_refused(
        secrets
            .lookup_digest(pb::LookupDigestRequest {
                secret: Vec::new(),
                tenant: String::new(),
                grant_id: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "empty secret",
    );
    let mut app = h.keys("acme-app").await;
    let mut ciphertext = encrypt(&mut app, b"x").await.ciphertext;
    let last = ciphertext.len() - 1;
    ciphertext[last] ^= 1;
    let status = app
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext,
            context: ctx(&[("row", CONTEXT_MARKER)]),
            ..Default::default()
        })
        .await
        .expect_err("tampered");
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "decryption failed")
    );
    h.stop().await;
}
