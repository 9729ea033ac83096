//! Who may call what: every RPC round trips; the role x RPC matrix; tenants isolated from each other; clients without a valid identity refused; support sees only its own grants.

use keyfront::cli::dev;
use keyfront::service::pb;
use keyfront::service::pb::admin_service_client::AdminServiceClient;
use keyfront::service::pb::key_service_client::KeyServiceClient;
use std::collections::HashMap;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_round_trips() {
    let h = Harness::start(false).await;
    let mut app = h.keys("acme-app").await;
    let encrypted = encrypt(&mut app, PLAINTEXT_MARKER).await;
    assert!(encrypted.verified_plaintext_crc32c);
    assert_eq!(
        encrypted.ciphertext_crc32c,
        crc32c::crc32c(&encrypted.ciphertext)
    );
    let decrypted = app
        .decrypt(pb::DecryptRequest {
            ciphertext: encrypted.ciphertext.clone(),
            context: ctx(&[("row", CONTEXT_MARKER)]),
            key: "default".into(),
            ciphertext_crc32c: Some(encrypted.ciphertext_crc32c),
            tenant: String::new(),
            grant_id: String::new(),
        })
        .await
        .expect("decrypt")
        .into_inner();
    assert_eq!(decrypted.plaintext, PLAINTEXT_MARKER);
    assert!(decrypted.verified_ciphertext_crc32c);
    assert_eq!(decrypted.key_id, encrypted.key_id);

    let items: Vec<_> = (0..5)
        .map(|i| pb::BatchEncryptItem {
            plaintext: format!("item {i}").into_bytes(),
            context: ctx(&[("i", &i.to_string())]),
            plaintext_crc32c: None,
        })
        .collect();
    let batch = app
        .batch_encrypt(pb::BatchEncryptRequest {
            key: "default".into(),
            items,
            tenant: String::new(),
            grant_id: String::new(),
        })
        .await
        .expect("batch encrypt")
        .into_inner();
    assert!(
        batch
            .results
            .iter()
            .all(|r| r.status.as_ref().is_some_and(|s| s.code == 0))
    );
    let decrypt_items = batch
        .results
        .iter()
        .enumerate()
        .map(|(i, r)| pb::BatchDecryptItem {
            ciphertext: r.ciphertext.clone(),
            context: ctx(&[("i", &i.to_string())]),
            ciphertext_crc32c: Some(r.ciphertext_crc32c),
        })
        .collect();
    let opened = app
        .batch_decrypt(pb::BatchDecryptRequest {
            key: String::new(),
            items: decrypt_items,
            tenant: String::new(),
            grant_id: String::new(),
        })
        .await
        .expect("batch decrypt")
        .into_inner();
    for (i, result) in opened.results.iter().enumerate() {
        assert_eq!(result.plaintext, format!("item {i}").into_bytes());
    }

    let mut backup = h.keys("acme-backup").await;
    let data_key = backup
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "default".into(),
            context: ctx(&[("night", "2026-11-24")]),
            include_plaintext: true,
            tenant: String::new(),
            grant_id: String::new(),
        })
        .await
        .expect("generate data key")
        .into_inner();
    assert_eq!(data_key.plaintext_key.len(), 32);
    let again = backup
        .decrypt_data_key(pb::DecryptDataKeyRequest {
            wrapped_key: data_key.wrapped_key.clone(),
            context: ctx(&[("night", "2026-11-24")]),
            wrapped_key_crc32c: Some(data_key.wrapped_key_crc32c),
            tenant: String::new(),
            grant_id: String::new(),
        })
        .await
        .expect("decrypt data key")
        .into_inner();
    assert_eq!(again.plaintext_key, data_key.plaintext_key);
    let without = backup
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "default".into(),
            include_plaintext: false,
            ..Default::default()
        })
        .await
        .expect("generate")
        .into_inner();
    assert!(without.plaintext_key.is_empty());

    let mut secrets = h.keys("acme-secrets").await;
    let sealed = secrets
        .seal_secret(pb::SealSecretRequest {
            key: "secrets".into(),
            secret: SECRET_MARKER.to_vec(),
            context: HashMap::new(),
            secret_crc32c: None,
            tenant: String::new(),
            include_lookup_digest: true,
            grant_id: String::new(),
        })
        .await
        .expect("seal")
        .into_inner();
    // The lookup digest finds the sealed token again from what a client presents.
    assert_eq!(sealed.lookup_digest.len(), 32);
    let lookup = |secret: &[u8]| pb::LookupDigestRequest {
        secret: secret.to_vec(),
        tenant: String::new(),
        grant_id: String::new(),
    };
    let again = secrets
        .lookup_digest(lookup(SECRET_MARKER))
        .await
        .expect("lookup digest")
        .into_inner()
        .lookup_digest;
    assert_eq!(again, sealed.lookup_digest);
    let other = secrets
        .lookup_digest(lookup(b"another token"))
        .await
        .expect("lookup digest")
        .into_inner()
        .lookup_digest;
    assert_ne!(other, sealed.lookup_digest);
    let unsealed = secrets
        .unseal_secret(pb::UnsealSecretRequest {
            sealed: sealed.sealed,
            ..Default::default()
        })
        .await
        .expect("unseal")
        .into_inner();
    assert_eq!(unsealed.secret, SECRET_MARKER);

    let mut admin = h.admin().await;
    let rotated = admin
        .rotate_key(pb::RotateKeyRequest {
            tenant: "acme".into(),
            name: "default".into(),
            request_id: "rot-1".into(),
        })
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(rotated.primary_version, 2);
    let retried = admin
        .rotate_key(pb::RotateKeyRequest {
            tenant: "acme".into(),
            name: "default".into(),
            request_id: "rot-1".into(),
        })
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(
        retried.primary_version, 2,
        "a retry with the same request_id is idempotent"
    );
    let reused = expect_refused(
        admin
            .create_key(pb::CreateKeyRequest {
                tenant: "acme".into(),
                name: "other".into(),
                purpose: pb::KeyPurpose::Data as i32,
                request_id: "rot-1".into(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "request_id of another call",
    );
    use tonic_types::StatusExt;
    assert_eq!(
        reused.get_details_error_info().map(|info| info.reason),
        Some("REQUEST_ID_REUSED".to_owned())
    );
    let key = admin
        .get_key(pb::GetKeyRequest {
            tenant: "acme".into(),
            name: "default".into(),
        })
        .await
        .expect("get key")
        .into_inner();
    assert_eq!((key.primary_version, key.latest_version), (2, 2));
    assert_eq!(key.purpose, pb::KeyPurpose::Data as i32);
    let old = app
        .decrypt(pb::DecryptRequest {
            ciphertext: encrypted.ciphertext,
            context: ctx(&[("row", CONTEXT_MARKER)]),
            ..Default::default()
        })
        .await
        .expect("v1 still decrypts")
        .into_inner();
    assert_eq!(old.key_version, 1);
    assert_eq!(encrypt(&mut app, b"after rotation").await.key_version, 2);

    for i in 0..5 {
        admin
            .create_tenant(pb::CreateTenantRequest {
                name: format!("t{i}"),
                request_id: String::new(),
            })
            .await
            .expect("tenant");
    }
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_tenants(pb::ListTenantsRequest {
                page_size: 3,
                page_token: token.clone(),
            })
            .await
            .expect("list")
            .into_inner();
        assert!(page.tenants.len() <= 3);
        names.extend(page.tenants.into_iter().map(|t| t.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(names, ["acme", "globex", "t0", "t1", "t2", "t3", "t4"]);
    let keys = admin
        .list_keys(pb::ListKeysRequest {
            tenant: "acme".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .expect("list keys")
        .into_inner();
    assert_eq!(
        keys.keys
            .iter()
            .map(|k| k.name.as_str())
            .collect::<Vec<_>>(),
        ["default", "secrets"]
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_can_call_exactly_its_rpcs() {
    let h = Harness::start(false).await;
    let blobs = blobs(&h).await;
    // Support reaches data only under a grant; tenant-admins and auditors never.
    let allowed: [(&str, &[&str]); 7] = [
        ("support", &[]),
        ("acme-admin", &[]),
        ("auditor", &["GetBackupStatus"]),
        (
            "acme-app",
            &[
                "Encrypt",
                "Decrypt",
                "BatchEncrypt",
                "BatchDecrypt",
                "ReEncrypt",
                "GenerateMac",
                "VerifyMac",
                "Sign",
                "Verify",
                "GetPublicKey",
            ],
        ),
        (
            "acme-backup",
            &["GenerateDataKey", "DecryptDataKey", "ReEncryptDataKey"],
        ),
        ("acme-secrets", &["SealSecret", "UnsealSecret"]),
        (
            "officer",
            &[
                "CreateTenant",
                "ListTenants",
                "CreateKey",
                "GetKey",
                "ListKeys",
                "RotateKey",
                "UpdateKeyPolicy",
                "DisableKeyVersion",
                "EnableKeyVersion",
                "ScheduleKeyVersionDestruction",
                "CancelKeyVersionDestruction",
                "DestroyTenant",
                "CancelTenantDestruction",
                "ListApprovals",
                "GetMasterKeyStatus",
                "GetBackupStatus",
                "GetImportParameters",
                "ImportKeyMaterial",
            ],
        ),
    ];
    for (principal, rpcs) in allowed {
        for rpc in RPCS {
            let got = call(&h, principal, rpc, &blobs).await;
            if rpcs.contains(&rpc) {
                assert_eq!(got, Code::Ok, "{principal} may call {rpc}");
            } else {
                assert_eq!(
                    got,
                    Code::PermissionDenied,
                    "{principal} may not call {rpc}"
                );
            }
        }
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn globex_can_neither_use_nor_learn_about_acme() {
    let h = Harness::start(false).await;
    let acme_ciphertext = encrypt(&mut h.keys("acme-app").await, b"acme only")
        .await
        .ciphertext;
    let mut globex = h.keys("globex-app").await;
    // Naming acme is refused before any lookup, for existing and made-up keys alike.
    for key in ["default", "does-not-exist"] {
        let status = expect_refused(
            globex
                .encrypt(pb::EncryptRequest {
                    key: key.into(),
                    tenant: "acme".into(),
                    ..Default::default()
                })
                .await,
            Code::PermissionDenied,
            "refused",
        );
        assert!(!status.message().contains(key), "{}", status.message());
    }
    // acme's ciphertext, presented in globex's own tenant, is the one opaque error.
    let status = globex
        .decrypt(pb::DecryptRequest {
            ciphertext: acme_ciphertext.clone(),
            ..Default::default()
        })
        .await
        .expect_err("opaque");
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "decryption failed")
    );
    expect_refused(
        globex
            .decrypt(pb::DecryptRequest {
                ciphertext: acme_ciphertext,
                tenant: "acme".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "refused",
    );
    // Admin calls are not for apps at all.
    expect_refused(
        AdminServiceClient::new(h.channel("globex-app").await)
            .list_keys(pb::ListKeysRequest {
                tenant: "acme".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "refused",
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_principal_reaches_its_tenants_only_by_name() {
    let h = Harness::start(false).await;
    let mut backup = h.keys("backup").await;
    for tenant in ["acme", "globex"] {
        let dk = backup
            .generate_data_key(pb::GenerateDataKeyRequest {
                key: "default".into(),
                tenant: tenant.into(),
                ..Default::default()
            })
            .await
            .expect("generate")
            .into_inner();
        backup
            .decrypt_data_key(pb::DecryptDataKeyRequest {
                wrapped_key: dk.wrapped_key.clone(),
                tenant: tenant.into(),
                ..Default::default()
            })
            .await
            .expect("decrypt in its own tenant");
        let other = if tenant == "acme" { "globex" } else { "acme" };
        expect_refused(
            backup
                .decrypt_data_key(pb::DecryptDataKeyRequest {
                    wrapped_key: dk.wrapped_key,
                    tenant: other.into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            "another tenant's data key",
        );
    }
    for tenant in ["", "initech"] {
        let status = backup
            .generate_data_key(pb::GenerateDataKeyRequest {
                key: "default".into(),
                tenant: tenant.into(),
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::PermissionDenied, "tenant {tenant:?}");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_identity_are_refused() {
    let h = Harness::start(false).await;
    // Identities the server does not accept: answered UNAUTHENTICATED on every request.
    for name in ["two-uris", "stranger", "cn-only"] {
        let status = h
            .keys(name)
            .await
            .encrypt(pb::EncryptRequest {
                key: "default".into(),
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{name}: {status:?}");
    }
    // No client certificate: the handshake fails.
    let refused = match h.try_channel("acme-app", false).await {
        Err(_) => true,
        Ok(channel) => KeyServiceClient::new(channel)
            .encrypt(pb::EncryptRequest {
                key: "default".into(),
                ..Default::default()
            })
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate is refused");
    // A certificate from another CA: the handshake fails.
    let other = tempfile::tempdir().expect("tempdir");
    dev::ensure_certificates(other.path()).expect("other CA");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(h.certs().join("ca.crt")).expect("ca"),
        ))
        .identity(Identity::from_pem(
            std::fs::read(other.path().join("acme-app.crt")).expect("crt"),
            std::fs::read(other.path().join("acme-app.key")).expect("key"),
        ))
        .domain_name("localhost");
    let result = match Channel::from_shared(format!("https://{}", h.addr))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
    {
        Err(_) => true,
        Ok(channel) => KeyServiceClient::new(channel)
            .encrypt(pb::EncryptRequest {
                key: "default".into(),
                ..Default::default()
            })
            .await
            .is_err(),
    };
    assert!(result, "a certificate of another CA is refused");
    // A TLS 1.2-only client cannot even complete the handshake.
    assert!(tls12_handshake(&h).await.is_err(), "TLS 1.2 is refused");
    let rejected = h
        .audit_lines()
        .iter()
        .filter(|l| l["kind"] == "connection" && l["outcome"] == "rejected")
        .count();
    assert!(
        rejected >= 2,
        "rejected connections are audited ({rejected})"
    );
    h.stop().await;
}

/// Issue 25, finding 8: support sees its own grant requests only, not other supporters'
/// reasons or the tenants they reach; officers, auditors and the tenant's admin see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn support_lists_only_its_own_grants() {
    let h = Harness::start(false).await;
    let grant = h
        .access("support")
        .await
        .request_support_access(pb::RequestSupportAccessRequest {
            tenant: "acme".into(),
            reason: "ticket 31337: a customer's secret reason".into(),
            operations: vec!["Decrypt".into()],
            keys: vec!["default".into()],
            duration_secs: 600,
        })
        .await
        .expect("request")
        .into_inner();
    let listed = |who: &'static str| {
        let h = &h;
        async move {
            h.access(who)
                .await
                .list_grants(pb::ListGrantsRequest::default())
                .await
                .expect("list")
                .into_inner()
                .grants
                .into_iter()
                .map(|g| g.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed("support").await, std::slice::from_ref(&grant.id));
    assert!(
        listed("support-2").await.is_empty(),
        "another supporter sees nothing of it"
    );
    for reviewer in ["officer", "auditor", "acme-admin"] {
        assert_eq!(
            listed(reviewer).await,
            std::slice::from_ref(&grant.id),
            "{reviewer}"
        );
    }
}
