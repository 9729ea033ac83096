//! Key lifecycle over (test) time: versions, policies, destruction windows, clock jumps, tenant destruction, the scheduler, request_ids, dual control and master key rotation.

use keyfront::hsm::Hsm;
use keyfront::service::pb;
use keyfront::service::pb::admin_service_client::AdminServiceClient;
use keyfront::service::pb::key_service_client::KeyServiceClient;
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

use crate::common;
use crate::harness::*;

/// The key lifecycle over gRPC against SoftHSM (issue 5, story 1): versions, ReEncrypt,
/// min_decryption_version, disable/enable, schedule/cancel, destruction after the window with a
/// test clock, data keys alike, and a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_lifecycle_story() {
    let harness = Harness::start_with(false, |_, kms| {
        kms.scheduler_interval = Duration::from_millis(50);
    })
    .await;
    let mut admin = harness.admin().await;
    let mut app = harness.keys("acme-app").await;
    let mut backup = harness.keys("acme-backup").await;
    let version_request = |version: u32| pb::KeyVersionRequest {
        tenant: "acme".into(),
        name: "default".into(),
        version,
        request_id: String::new(),
    };
    let encrypt = |plaintext: &[u8]| pb::EncryptRequest {
        key: "default".into(),
        plaintext: plaintext.to_vec(),
        ..Default::default()
    };
    let decrypt = |ciphertext: &[u8]| pb::DecryptRequest {
        ciphertext: ciphertext.to_vec(),
        ..Default::default()
    };
    let decrypt_dk = |wrapped: &[u8]| pb::DecryptDataKeyRequest {
        wrapped_key: wrapped.to_vec(),
        ..Default::default()
    };

    // v1, then v2 after a rotation; both decrypt.
    let v1 = app.encrypt(encrypt(b"one")).await.expect("v1").into_inner();
    assert_eq!(v1.key_version, 1);
    let dk1 = backup
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "default".into(),
            include_plaintext: true,
            ..Default::default()
        })
        .await
        .expect("data key")
        .into_inner();
    admin
        .rotate_key(pb::RotateKeyRequest {
            tenant: "acme".into(),
            name: "default".into(),
            request_id: String::new(),
        })
        .await
        .expect("rotate");
    let v2 = app.encrypt(encrypt(b"two")).await.expect("v2").into_inner();
    assert_eq!(v2.key_version, 2);
    for (ciphertext, plaintext) in [(&v1.ciphertext, b"one"), (&v2.ciphertext, b"two")] {
        let out = app.decrypt(decrypt(ciphertext)).await.expect("decrypt");
        assert_eq!(out.into_inner().plaintext, plaintext);
    }

    // ReEncrypt moves a v1 ciphertext to v2 without the plaintext leaving.
    let moved = app
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext: v1.ciphertext.clone(),
            ..Default::default()
        })
        .await
        .expect("re-encrypt")
        .into_inner();
    assert_eq!((moved.source_key_version, moved.key_version), (1, 2));
    let out = app
        .decrypt(decrypt(&moved.ciphertext))
        .await
        .expect("decrypt moved");
    assert_eq!(out.into_inner().plaintext, b"one");
    // ReEncrypt is the app's, not the officer's or the backup daemon's.
    expect_refused(
        backup
            .re_encrypt(pb::ReEncryptRequest {
                ciphertext: v1.ciphertext.clone(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "backup may not re-encrypt",
    );

    // min_decryption_version = 2 refuses v1 ciphertexts and data keys; back to 0 restores.
    let policy = |min: u32| pb::UpdateKeyPolicyRequest {
        tenant: "acme".into(),
        name: "default".into(),
        min_decryption_version: Some(min),
        ..Default::default()
    };
    let key = admin
        .update_key_policy(policy(2))
        .await
        .expect("policy")
        .into_inner();
    assert_eq!(key.policy.map(|p| p.min_decryption_version), Some(2));
    expect_precondition(
        app.decrypt(decrypt(&v1.ciphertext)).await,
        "BELOW_MIN_DECRYPTION_VERSION",
    );
    expect_precondition(
        backup.decrypt_data_key(decrypt_dk(&dk1.wrapped_key)).await,
        "BELOW_MIN_DECRYPTION_VERSION",
    );
    app.decrypt(decrypt(&v2.ciphertext))
        .await
        .expect("v2 still decrypts");
    expect_refused(
        admin.update_key_policy(policy(3)).await,
        Code::InvalidArgument,
        "above primary",
    );
    admin
        .update_key_policy(policy(0))
        .await
        .expect("policy back");
    app.decrypt(decrypt(&v1.ciphertext))
        .await
        .expect("v1 again");

    // Disabling the primary refuses encryption at once; enabling restores it.
    let disabled = admin
        .disable_key_version(version_request(2))
        .await
        .expect("disable")
        .into_inner();
    assert_eq!(disabled.state, pb::KeyVersionState::Disabled as i32);
    expect_precondition(app.encrypt(encrypt(b"x")).await, "VERSION_DISABLED");
    expect_precondition(
        app.decrypt(decrypt(&v2.ciphertext)).await,
        "VERSION_DISABLED",
    );
    admin
        .enable_key_version(version_request(2))
        .await
        .expect("enable");
    app.encrypt(encrypt(b"x"))
        .await
        .expect("encrypt after enable");

    // The primary cannot be scheduled for destruction; v1 can, and cancelling restores it.
    expect_precondition(
        admin
            .schedule_key_version_destruction(version_request(2))
            .await,
        "PRIMARY_VERSION",
    );
    let scheduled = admin
        .schedule_key_version_destruction(version_request(1))
        .await
        .expect("schedule")
        .into_inner();
    assert_eq!(
        scheduled.state,
        pb::KeyVersionState::DestroyScheduled as i32
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs() as i64;
    assert!(
        scheduled.destroy_time >= now + 30 * 86_400 - 5,
        "30-day default window"
    );
    expect_precondition(
        app.decrypt(decrypt(&v1.ciphertext)).await,
        "VERSION_DESTROY_SCHEDULED",
    );
    expect_precondition(
        backup.decrypt_data_key(decrypt_dk(&dk1.wrapped_key)).await,
        "VERSION_DESTROY_SCHEDULED",
    );
    admin
        .cancel_key_version_destruction(version_request(1))
        .await
        .expect("cancel");
    app.decrypt(decrypt(&v1.ciphertext))
        .await
        .expect("v1 after cancel");

    // ReEncryptDataKey moves the v1 data key to v2; the plaintext key stays the same.
    let rewrapped = backup
        .re_encrypt_data_key(pb::ReEncryptDataKeyRequest {
            wrapped_key: dk1.wrapped_key.clone(),
            ..Default::default()
        })
        .await
        .expect("re-encrypt data key")
        .into_inner();
    assert_eq!(
        (rewrapped.source_key_version, rewrapped.key_version),
        (1, 2)
    );
    let same = backup
        .decrypt_data_key(decrypt_dk(&rewrapped.wrapped_key))
        .await
        .expect("dk v2");
    assert_eq!(same.into_inner().plaintext_key, dk1.plaintext_key);

    // Scheduled again, then the clock passes the window: the scheduler destroys v1.
    admin
        .schedule_key_version_destruction(version_request(1))
        .await
        .expect("schedule again");
    harness.clock.advance(Duration::from_secs(30 * 86_400 + 60));
    let mut destroyed = false;
    for _ in 0..100 {
        let key = admin
            .get_key(pb::GetKeyRequest {
                tenant: "acme".into(),
                name: "default".into(),
            })
            .await
            .expect("get key")
            .into_inner();
        if key.versions.first().map(|v| v.state) == Some(pb::KeyVersionState::Destroyed as i32) {
            destroyed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(destroyed, "the scheduler destroyed v1 after its window");
    expect_precondition(
        app.decrypt(decrypt(&v1.ciphertext)).await,
        "VERSION_DESTROYED",
    );
    expect_precondition(
        backup.decrypt_data_key(decrypt_dk(&dk1.wrapped_key)).await,
        "VERSION_DESTROYED",
    );
    expect_precondition(
        admin.enable_key_version(version_request(1)).await,
        "VERSION_DESTROYED",
    );
    app.decrypt(decrypt(&moved.ciphertext))
        .await
        .expect("the re-encrypted copy survives");

    // After a restart on the same data directory, v1 stays destroyed and its blobs are gone.
    let hsm = Arc::clone(&harness.hsm) as Arc<dyn Hsm>;
    let dir = harness.stop().await;
    let kms = reopen(hsm, dir.path()).await;
    let acme = kms.tenant(&"acme".parse().expect("name")).expect("acme").id;
    let details = kms
        .key_details(acme, &"default".parse().expect("name"))
        .expect("key");
    let v1_record = &details.versions[0];
    assert!(matches!(
        v1_record.state,
        keyfront::keystore::VersionState::Destroyed { .. }
    ));
    assert!(
        v1_record.kek.is_empty() && v1_record.bulk_key.is_empty(),
        "blobs erased"
    );
    let err = kms
        .decrypt(acme, &v1.ciphertext, &Default::default(), None)
        .expect_err("destroyed after restart");
    assert!(matches!(
        err,
        keyfront::Error::KeyState {
            reason: "VERSION_DESTROYED",
            ..
        }
    ));
}

/// A forward jump of the wall clock pauses scheduled destructions (issue 5, story 4): the
/// version stays scheduled though its date has passed, and the pause is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_jump_pauses_destruction() {
    let harness = Harness::start_with(false, |_, kms| {
        kms.scheduler_interval = Duration::from_millis(50);
    })
    .await;
    let mut admin = harness.admin().await;
    let version = |version: u32| pb::KeyVersionRequest {
        tenant: "acme".into(),
        name: "default".into(),
        version,
        request_id: String::new(),
    };
    admin
        .rotate_key(pb::RotateKeyRequest {
            tenant: "acme".into(),
            name: "default".into(),
            request_id: String::new(),
        })
        .await
        .expect("rotate");
    admin
        .schedule_key_version_destruction(version(1))
        .await
        .expect("schedule");
    // The wall clock jumps 31 days without that time passing.
    harness.clock.jump(Duration::from_secs(31 * 86_400));
    let mut paused = false;
    // Up to 20 s: the scheduler ticks on a loaded machine too.
    for _ in 0..400 {
        if scrape(harness.metrics)
            .await
            .contains("keyfront_scheduler_paused 1")
        {
            paused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(paused, "the scheduler reports the pause");
    // Several ticks later the version is still only scheduled.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let key = admin
        .get_key(pb::GetKeyRequest {
            tenant: "acme".into(),
            name: "default".into(),
        })
        .await
        .expect("get key")
        .into_inner();
    assert_eq!(
        key.versions.first().map(|v| v.state),
        Some(pb::KeyVersionState::DestroyScheduled as i32)
    );
}

/// DestroyTenant over gRPC (issue 5, story 2): refused at once, restorable until the window
/// ends, then crypto-shredded: directory gone, its ciphertexts and data keys undecryptable even
/// with an old copy of its database put back; other tenants untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_tenant_story() {
    let harness = Harness::start_with(false, |_, kms| {
        kms.scheduler_interval = Duration::from_millis(50);
    })
    .await;
    let mut admin = harness.admin().await;
    let mut globex = harness.keys("globex-app").await;
    let mut acme = harness.keys("acme-app").await;
    let mut backup = harness.keys("backup").await;
    let ciphertext = encrypt(&mut globex, b"globex data").await.ciphertext;
    let data_key = backup
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "default".into(),
            tenant: "globex".into(),
            ..Default::default()
        })
        .await
        .expect("data key")
        .into_inner()
        .wrapped_key;
    let acme_ciphertext = encrypt(&mut acme, b"acme data").await.ciphertext;
    let globex_id = admin
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .tenants
        .into_iter()
        .find(|t| t.name == "globex")
        .expect("globex")
        .id;
    let globex_dir = harness.dir.path().join("data/tenants").join(&globex_id);
    let old_copy = tempfile::tempdir().expect("tempdir");
    copy_dir(&globex_dir, old_copy.path());

    let destroy = || pb::DestroyTenantRequest {
        name: "globex".into(),
        request_id: String::new(),
    };
    let scheduled = admin
        .destroy_tenant(destroy())
        .await
        .expect("destroy")
        .into_inner();
    assert!(scheduled.destroy_time > 0);
    expect_precondition(
        globex
            .encrypt(pb::EncryptRequest {
                key: "default".into(),
                plaintext: b"x".to_vec(),
                ..Default::default()
            })
            .await,
        "TENANT_DESTROY_SCHEDULED",
    );
    admin
        .cancel_tenant_destruction(pb::CancelTenantDestructionRequest {
            name: "globex".into(),
            request_id: String::new(),
        })
        .await
        .expect("cancel");
    let back = globex
        .decrypt(pb::DecryptRequest {
            ciphertext: ciphertext.clone(),
            context: ctx(&[("row", CONTEXT_MARKER)]),
            ..Default::default()
        })
        .await
        .expect("restored");
    assert_eq!(back.into_inner().plaintext, b"globex data");

    admin
        .destroy_tenant(destroy())
        .await
        .expect("destroy again");
    harness.clock.advance(Duration::from_secs(30 * 86_400 + 60));
    // Up to 20 s: the scheduler ticks on a loaded machine too.
    for _ in 0..400 {
        if !globex_dir.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!globex_dir.exists(), "the tenant's directory is gone");
    // Its ciphertexts and data keys are undecryptable; the tenant no longer exists.
    expect_refused(
        globex
            .decrypt(pb::DecryptRequest {
                ciphertext: ciphertext.clone(),
                context: ctx(&[("row", CONTEXT_MARKER)]),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "destroyed",
    );
    expect_refused(
        backup
            .decrypt_data_key(pb::DecryptDataKeyRequest {
                wrapped_key: data_key.clone(),
                tenant: "globex".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "destroyed",
    );
    // acme is untouched.
    let acme_back = acme
        .decrypt(pb::DecryptRequest {
            ciphertext: acme_ciphertext,
            context: ctx(&[("row", CONTEXT_MARKER)]),
            ..Default::default()
        })
        .await
        .expect("acme untouched");
    assert_eq!(acme_back.into_inner().plaintext, b"acme data");

    // An old copy of the database put back does not resurrect it: the tombstone is checked
    // before anything of it is opened or unwrapped.
    let hsm = Arc::clone(&harness.hsm) as Arc<dyn Hsm>;
    let dir = harness.stop().await;
    copy_dir(
        old_copy.path(),
        &dir.path().join("data/tenants").join(&globex_id),
    );
    let kms = reopen(hsm, dir.path()).await;
    let id: keyfront::ids::TenantId = globex_id.parse().expect("id");
    assert!(kms.store().is_destroyed(id).expect("tombstone"));
    let err = kms
        .decrypt(id, &ciphertext, &Default::default(), None)
        .expect_err("still destroyed");
    assert!(
        matches!(
            err,
            keyfront::Error::Store(keyfront::keystore::Error::TenantDestroyed(_))
        ),
        "{err:?}"
    );
    assert!(
        !dir.path().join("data/tenants").join(&globex_id).exists(),
        "the put-back copy is collected at start as an orphan"
    );
}

/// The scheduler rotates a key whose rotation period elapsed, and one whose usage neared its
/// limit (issue 5, story 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_rotates_by_age_and_by_usage() {
    let harness = Harness::start_with(false, |_, kms| {
        kms.scheduler_interval = Duration::from_millis(50);
    })
    .await;
    let mut admin = harness.admin().await;
    let policy = |tenant: &str| pb::UpdateKeyPolicyRequest {
        tenant: tenant.into(),
        name: "default".into(),
        ..Default::default()
    };
    let primary = |admin: &mut AdminServiceClient<Channel>, tenant: &'static str| {
        let mut admin = admin.clone();
        async move {
            admin
                .get_key(pb::GetKeyRequest {
                    tenant: tenant.into(),
                    name: "default".into(),
                })
                .await
                .expect("get key")
                .into_inner()
                .primary_version
        }
    };
    // By age: a one-day period, then a day passes.
    admin
        .update_key_policy(pb::UpdateKeyPolicyRequest {
            rotation_period_seconds: Some(86_400),
            ..policy("acme")
        })
        .await
        .expect("period");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        primary(&mut admin, "acme").await,
        1,
        "not before the period"
    );
    harness.clock.advance(Duration::from_secs(86_400 + 60));
    let mut by_age = 0;
    // Up to 20 s: the scheduler ticks on a loaded machine too.
    for _ in 0..400 {
        by_age = primary(&mut admin, "acme").await;
        if by_age == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(by_age, 2, "rotated once its period elapsed");

    // By usage: a limit of 32 Encrypts; at nine tenths the scheduler rotates.
    admin
        .update_key_policy(pb::UpdateKeyPolicyRequest {
            max_bulk_uses: Some(32),
            ..policy("globex")
        })
        .await
        .expect("limit");
    let mut globex = harness.keys("globex-app").await;
    for _ in 0..29 {
        encrypt(&mut globex, b"counted").await;
    }
    let mut by_usage = 0;
    // Up to 20 s: the scheduler ticks on a loaded machine too.
    for _ in 0..400 {
        by_usage = primary(&mut admin, "globex").await;
        if by_usage == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(by_usage, 2, "rotated before its usage limit");
    // The scheduler's actions are in the audit log as system:scheduler, intent then outcome.
    // The outcome line is written once the rotation is done, new primary cached included;
    // GetKey reads the store and sees the commit a moment earlier (an fsync of the system
    // database lies between), so Encrypt is checked after the outcome line.
    let scheduled = || -> Vec<String> {
        harness
            .audit_lines()
            .iter()
            .filter(|l| {
                l["kind"] == "system"
                    && l["actor"] == "system:scheduler"
                    && l["action"] == "rotate_key"
            })
            .map(|l| l["outcome"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let mut logged = Vec::new();
    // Up to 20 s: the scheduler ticks on a loaded machine too.
    for _ in 0..400 {
        logged = scheduled();
        if logged.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        logged,
        ["intent", "OK", "intent", "OK"],
        "two rotations, each logged"
    );
    assert_eq!(encrypt(&mut globex, b"fresh").await.key_version, 2);
}

/// Issue 24, defect 1: rotation checks and remembered request_ids shared the system prefix
/// `r/`. Once one mutation carried a request_id (the Rust client's always do), every
/// scheduler tick failed reading the other's records: no key rotated by age again, and no
/// request_id was ever pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_rotation_and_request_id_expiry_go_on_after_a_request_id_is_stored() {
    let harness = Harness::start_with(false, |_, kms| {
        kms.scheduler_interval = Duration::from_millis(50);
    })
    .await;
    let mut admin = harness.admin().await;
    let rotate = |tenant: &str, request_id: &str| pb::RotateKeyRequest {
        tenant: tenant.into(),
        name: "default".into(),
        request_id: request_id.into(),
    };
    // A mutation with a request_id, on another tenant than the key with a period.
    let first = admin
        .rotate_key(rotate("globex", "rid-seam"))
        .await
        .expect("rotate with a request_id")
        .into_inner();
    assert_eq!(first.primary_version, 2);
    let again = admin
        .rotate_key(rotate("globex", "rid-seam"))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(
        again.primary_version, 2,
        "within a day: the first answer, nothing rotated"
    );
    admin
        .update_key_policy(pb::UpdateKeyPolicyRequest {
            tenant: "acme".into(),
            name: "default".into(),
            rotation_period_seconds: Some(86_400),
            ..Default::default()
        })
        .await
        .expect("period");
    let primary = |admin: &mut AdminServiceClient<Channel>, tenant: &'static str| {
        let mut admin = admin.clone();
        async move {
            admin
                .get_key(pb::GetKeyRequest {
                    tenant: tenant.into(),
                    name: "default".into(),
                })
                .await
                .expect("get key")
                .into_inner()
                .primary_version
        }
    };
    harness.clock.advance(Duration::from_secs(86_400 + 60));
    let mut version = 0;
    // Up to 20 s: the scheduler ticks on a loaded machine too.
    for _ in 0..400 {
        version = primary(&mut admin, "acme").await;
        if version == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(version, 2, "rotated by age although a request_id is stored");

    // Over a day passed: the scheduler pruned the request_id, so the same id is a new call.
    let mut after_expiry = 0;
    for _ in 0..400 {
        after_expiry = admin
            .rotate_key(rotate("globex", "rid-seam"))
            .await
            .expect("after expiry")
            .into_inner()
            .primary_version;
        if after_expiry == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        after_expiry, 3,
        "the expired request_id was pruned: a new call"
    );
}

/// Dual control (issue 5): an operation under it is recorded, not done; its requester cannot
/// approve it; a second officer can, and then it takes effect; approvals expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_control_needs_a_second_officer() {
    use keyfront::config::DualOperation;
    let harness = Harness::start_configured(
        false,
        |_, _| {},
        |config| {
            config.dual_control.operations = [
                DualOperation::DestroyTenant,
                DualOperation::ScheduleKeyVersionDestruction,
                DualOperation::RaiseMinDecryptionVersion,
            ]
            .into();
        },
    )
    .await;
    let mut officer = harness.admin().await;
    let mut second = AdminServiceClient::new(harness.channel("officer-2").await);
    let mut globex = harness.keys("globex-app").await;

    let status = expect_refused(
        officer
            .destroy_tenant(pb::DestroyTenantRequest {
                name: "globex".into(),
                request_id: String::new(),
            })
            .await,
        Code::FailedPrecondition,
        "waits for approval",
    );
    use tonic_types::StatusExt;
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "APPROVAL_REQUIRED");
    let id = info
        .metadata
        .get("approval_id")
        .expect("approval id")
        .clone();
    // Nothing happened yet.
    encrypt(&mut globex, b"still here").await;
    // The requester cannot approve its own request.
    expect_refused(
        officer
            .approve_operation(pb::ApproveOperationRequest {
                approval_id: id.clone(),
            })
            .await,
        Code::PermissionDenied,
        "not the requester",
    );
    let listed = second
        .list_approvals(pb::ListApprovalsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .approvals;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].state.as_str(), listed[0].operation.as_str()),
        ("PENDING", "DestroyTenant globex")
    );
    let approved = second
        .approve_operation(pb::ApproveOperationRequest {
            approval_id: id.clone(),
        })
        .await
        .expect("second officer approves")
        .into_inner();
    assert_eq!(approved.state, "EXECUTED");
    assert!(approved.approved_by.ends_with("/officer-2"));
    expect_precondition(
        globex
            .encrypt(pb::EncryptRequest {
                key: "default".into(),
                plaintext: b"x".to_vec(),
                ..Default::default()
            })
            .await,
        "TENANT_DESTROY_SCHEDULED",
    );
    // Approving twice does nothing more.
    expect_precondition(
        second
            .approve_operation(pb::ApproveOperationRequest { approval_id: id })
            .await,
        "ALREADY_EXECUTED",
    );

    // Raising min_decryption_version waits too; lowering or other fields do not.
    officer
        .rotate_key(pb::RotateKeyRequest {
            tenant: "acme".into(),
            name: "default".into(),
            request_id: String::new(),
        })
        .await
        .expect("rotate");
    let raise = pb::UpdateKeyPolicyRequest {
        tenant: "acme".into(),
        name: "default".into(),
        min_decryption_version: Some(2),
        ..Default::default()
    };
    let status = officer
        .update_key_policy(raise.clone())
        .await
        .expect_err("waits");
    assert_eq!(reason(&status).as_deref(), Some("APPROVAL_REQUIRED"));
    officer
        .update_key_policy(pb::UpdateKeyPolicyRequest {
            tenant: "acme".into(),
            name: "default".into(),
            rotation_period_seconds: Some(86_400),
            ..Default::default()
        })
        .await
        .expect("not under dual control");

    // Approvals expire.
    let status = officer
        .schedule_key_version_destruction(pb::KeyVersionRequest {
            tenant: "acme".into(),
            name: "default".into(),
            version: 1,
            request_id: String::new(),
        })
        .await
        .expect_err("waits");
    let id = status
        .get_details_error_info()
        .and_then(|info| info.metadata.get("approval_id").cloned())
        .expect("approval id");
    harness.clock.advance(Duration::from_secs(2 * 86_400));
    expect_precondition(
        second
            .approve_operation(pb::ApproveOperationRequest { approval_id: id })
            .await,
        "APPROVAL_EXPIRED",
    );
    let key = officer
        .get_key(pb::GetKeyRequest {
            tenant: "acme".into(),
            name: "default".into(),
        })
        .await
        .expect("key")
        .into_inner();
    assert_eq!(key.versions[0].state, pb::KeyVersionState::Enabled as i32);
    assert_eq!(key.policy.map(|p| p.min_decryption_version), Some(0));
}

/// RotateMasterKey (issue 5, story 3): every tenant's keys work afterwards and after a restart;
/// every KEK blob is under the new generation; the retired MWK is destroyed after its
/// retention (backup retention + margin), not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_key_rotation_story() {
    let harness = Harness::start_with(false, |_, kms| {
        kms.scheduler_interval = Duration::from_millis(50);
    })
    .await;
    let mut admin = harness.admin().await;
    let mut acme = harness.keys("acme-app").await;
    let mut globex = harness.keys("globex-app").await;
    let mut backup = harness.keys("backup").await;
    let acme_ct = encrypt(&mut acme, b"acme before").await.ciphertext;
    let globex_ct = encrypt(&mut globex, b"globex before").await.ciphertext;
    let dk = backup
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "default".into(),
            tenant: "acme".into(),
            include_plaintext: true,
            ..Default::default()
        })
        .await
        .expect("data key")
        .into_inner();

    let status = admin
        .rotate_master_key(pb::RotateMasterKeyRequest::default())
        .await
        .expect("rotate master key")
        .into_inner();
    assert_eq!((status.current_generation, status.rotating_to), (2, 0));
    let retired = status
        .generations
        .iter()
        .find(|g| g.generation == 1)
        .expect("generation 1 kept");
    assert_eq!(retired.state, "RETIRED");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs() as i64;
    assert!(
        retired.destroy_time >= now + 37 * 86_400 - 5,
        "retention + margin"
    );

    let decrypt_all = |mut acme: KeyServiceClient<Channel>,
                       mut globex: KeyServiceClient<Channel>,
                       mut backup: KeyServiceClient<Channel>| {
        let (acme_ct, globex_ct, dk) = (acme_ct.clone(), globex_ct.clone(), dk.clone());
        async move {
            let ctx = ctx(&[("row", CONTEXT_MARKER)]);
            let a = acme
                .decrypt(pb::DecryptRequest {
                    ciphertext: acme_ct,
                    context: ctx.clone(),
                    ..Default::default()
                })
                .await
                .expect("acme decrypts");
            assert_eq!(a.into_inner().plaintext, b"acme before");
            let g = globex
                .decrypt(pb::DecryptRequest {
                    ciphertext: globex_ct,
                    context: ctx,
                    ..Default::default()
                })
                .await
                .expect("globex decrypts");
            assert_eq!(g.into_inner().plaintext, b"globex before");
            let d = backup
                .decrypt_data_key(pb::DecryptDataKeyRequest {
                    wrapped_key: dk.wrapped_key,
                    tenant: "acme".into(),
                    ..Default::default()
                })
                .await
                .expect("data key decrypts");
            assert_eq!(d.into_inner().plaintext_key, dk.plaintext_key);
        }
    };
    decrypt_all(acme.clone(), globex.clone(), backup.clone()).await;
    encrypt(&mut acme, b"after").await;

    // Not destroyed before its date; destroyed after it; everything still works.
    harness.clock.advance(Duration::from_secs(36 * 86_400));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let generations = |admin: &AdminServiceClient<Channel>| {
        let mut admin = admin.clone();
        async move {
            admin
                .get_master_key_status(pb::GetMasterKeyStatusRequest {})
                .await
                .expect("status")
                .into_inner()
                .generations
                .iter()
                .map(|g| g.generation)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        generations(&admin).await,
        vec![1, 2],
        "kept before its date"
    );
    harness.clock.advance(Duration::from_secs(2 * 86_400));
    let mut left = Vec::new();
    for _ in 0..100 {
        left = generations(&admin).await;
        if left == [2] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, vec![2], "generation 1 destroyed after its date");
    decrypt_all(acme.clone(), globex.clone(), backup.clone()).await;

    // After a restart with a fresh HSM session (it finds generation 2 alone), every blob is
    // under generation 2 and decrypts.
    let token = harness.token.clone();
    let dir = harness.stop().await;
    let kms = reopen(Arc::new(common::open_hsm(&token)), dir.path()).await;
    assert_eq!(
        kms.hsm().mwk_generations(),
        vec![keyfront::hsm::MwkGeneration(2)]
    );
    for tenant in kms.store().tenants().expect("tenants") {
        for key in kms.keys(tenant.id).expect("keys") {
            let details = kms.key_details(tenant.id, &key.name).expect("details");
            for version in details.versions {
                let wrapped = keyfront::hsm::WrappedKek::from_bytes(&version.kek).expect("blob");
                assert_eq!(wrapped.generation(), keyfront::hsm::MwkGeneration(2));
            }
        }
    }
    let acme_id = kms.tenant(&"acme".parse().expect("name")).expect("acme").id;
    let out = kms
        .decrypt(
            acme_id,
            &acme_ct,
            &[("row", CONTEXT_MARKER)].into_iter().collect(),
            None,
        )
        .expect("decrypts after restart");
    assert_eq!(out.plaintext.expose_secret(), b"acme before");
}
