//! Backups through the API: snapshots and the journal restore everything, under load too; thirty-five nights leave thirty snapshots; bad directories and narrow officers are refused.

use keyfront::hsm::Hsm;
use keyfront::kms::KmsOptions;
use keyfront::service::pb;
use keyfront::service::pb::admin_service_client::AdminServiceClient;
use keyfront::service::pb::key_service_client::KeyServiceClient;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

use crate::harness::*;

/// The restore drill (issue 7, stories 1, 4 and 5): keys and data before a snapshot, more
/// after it (a rotation, a new tenant and key, a destroyed tenant); the data directory is lost;
/// snapshot + journal restore into a new directory on the same token, and everything made
/// before the loss decrypts, while the tenant destroyed after the snapshot stays destroyed. A
/// one-byte change of the archive fails `backup verify` and the restore refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_of_last_nights_snapshot_and_the_journal_loses_nothing() {
    let h = start_with_journal(false).await;
    let mut admin = h.admin().await;
    let mut app = h.keys("acme-app").await;
    let mut acme_backup = h.keys("acme-backup").await;
    let mut globex = h.keys("globex-app").await;
    let data_key = |client: &mut KeyServiceClient<Channel>| {
        let mut client = client.clone();
        async move {
            client
                .generate_data_key(pb::GenerateDataKeyRequest {
                    key: "default".into(),
                    context: ctx(&[("row", CONTEXT_MARKER)]),
                    include_plaintext: true,
                    ..Default::default()
                })
                .await
                .expect("data key")
                .into_inner()
        }
    };
    // Before the snapshot.
    let before = encrypt(&mut app, b"before the snapshot").await;
    let key_before = data_key(&mut acme_backup).await;
    let globex_ciphertext = encrypt(&mut globex, b"globex").await.ciphertext;
    // A support grant approved before the snapshot (grants are not journaled).
    let grant = h
        .access("support")
        .await
        .request_support_access(pb::RequestSupportAccessRequest {
            tenant: "acme".into(),
            reason: "ticket 1".into(),
            operations: vec!["Decrypt".into()],
            keys: vec!["default".into()],
            duration_secs: 3600,
        })
        .await
        .expect("request access")
        .into_inner();
    h.access("acme-admin")
        .await
        .approve_support_access(pb::DecideSupportAccessRequest {
            grant_id: grant.id.clone(),
        })
        .await
        .expect("approve");
    let archive = create_backup(&mut admin).await;
    assert!(archive.verified);
    assert_eq!(archive.tenants, 2);
    let archive_path = PathBuf::from(&archive.path);
    assert!(archive_path.starts_with(h.dir.path().join("backups")));

    // After it: a rotation, a new tenant and key, data under the new version, a destroyed
    // tenant.
    admin
        .rotate_key(pb::RotateKeyRequest {
            tenant: "acme".into(),
            name: "default".into(),
            request_id: String::new(),
        })
        .await
        .expect("rotate");
    admin
        .create_key(pb::CreateKeyRequest {
            tenant: "acme".into(),
            name: "after".into(),
            purpose: pb::KeyPurpose::Data as i32,
            request_id: String::new(),
            ..Default::default()
        })
        .await
        .expect("key after");
    admin
        .create_tenant(pb::CreateTenantRequest {
            name: "initech".into(),
            request_id: String::new(),
        })
        .await
        .expect("tenant after");
    let after = encrypt(&mut app, b"after the snapshot").await;
    assert_eq!(after.key_version, 2);
    let key_after = data_key(&mut acme_backup).await;
    admin
        .destroy_tenant(pb::DestroyTenantRequest {
            name: "globex".into(),
            request_id: String::new(),
        })
        .await
        .expect("destroy globex");
    h.clock.advance(Duration::from_secs(30 * 86_400 + 60));
    let globex_gone = || {
        let mut admin = admin.clone();
        async move {
            !admin
                .list_tenants(pb::ListTenantsRequest::default())
                .await
                .expect("list")
                .into_inner()
                .tenants
                .iter()
                .any(|t| t.name == "globex")
        }
    };
    for _ in 0..400 {
        if globex_gone().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(globex_gone().await, "globex destroyed by the scheduler");

    // The loss.
    let public_key = hex::encode(h.hsm.audit_public_key());
    let hsm = Arc::clone(&h.hsm) as Arc<dyn Hsm>;
    let dir = h.stop().await;
    std::fs::remove_dir_all(dir.path().join("data")).expect("lose the data directory");

    // A one-byte change anywhere fails verify, and restore refuses it (writing nothing).
    let (ok, out) = backup_cli(&["verify", &archive.path, "--public-key", &public_key]);
    assert!(ok, "{out}");
    assert!(out.starts_with("OK: snapshot of"), "{out}");
    let bytes = std::fs::read(&archive_path).expect("archive");
    let tampered = dir.path().join("tampered.kfb");
    for at in [20, bytes.len() / 2, bytes.len() - 40] {
        let mut copy = bytes.clone();
        copy[at] ^= 0x01;
        std::fs::write(&tampered, &copy).expect("write");
        let (ok, out) = backup_cli(&[
            "verify",
            tampered.to_str().expect("path"),
            "--public-key",
            &public_key,
        ]);
        assert!(!ok, "byte {at}: {out}");
        assert!(out.starts_with("FAILED: "), "{out}");
        let refused = keyfront::backup::restore::restore(
            &hsm,
            &tampered,
            Some(&dir.path().join("journal")),
            &dir.path().join("restored"),
            Default::default(),
        );
        assert!(refused.is_err(), "byte {at}: restore refused");
        assert!(!dir.path().join("restored").exists(), "nothing written");
    }
    // Without the journal the snapshot alone would bring globex back: the journal is needed,
    // and with it globex stays destroyed.
    let restored = keyfront::backup::restore::restore(
        &hsm,
        &archive_path,
        Some(&dir.path().join("journal")),
        &dir.path().join("data"),
        Default::default(),
    )
    .expect("restore");
    assert_eq!(restored.manifest.tenants.len(), 2);
    assert!(
        restored.replay.commits >= 2,
        "rotation and new key: {:?}",
        restored.replay
    );
    assert_eq!(restored.replay.tenants_created, 1, "initech");
    assert_eq!(restored.replay.tenants_destroyed, 1, "globex");
    assert_eq!(restored.tenants, 2, "acme and initech");

    // keyfront starts on it with the same token, and everything decrypts.
    let kms = reopen(hsm, dir.path()).await;
    let acme = kms.tenant_id(&"acme".parse().expect("name")).expect("acme");
    let context: keyfront::crypto::EncryptionContext =
        [("row", CONTEXT_MARKER)].into_iter().collect();
    for (blob, plaintext) in [
        (&before.ciphertext, &b"before the snapshot"[..]),
        (&after.ciphertext, &b"after the snapshot"[..]),
    ] {
        let back = kms.decrypt(acme, blob, &context, None).expect("decrypts");
        assert_eq!(back.plaintext.expose_secret(), plaintext);
    }
    for key in [&key_before, &key_after] {
        let back = kms
            .decrypt_data_key(acme, &key.wrapped_key, &context)
            .expect("data key decrypts");
        assert_eq!(back.plaintext.expose_secret(), key.plaintext_key.as_slice());
    }
    let default = kms
        .key(acme, &"default".parse().expect("name"))
        .expect("default");
    assert_eq!(
        default.primary.0, 2,
        "the rotation after the snapshot is there"
    );
    kms.key(acme, &"after".parse().expect("name"))
        .expect("the key made after the snapshot is there");
    kms.tenant_id(&"initech".parse().expect("name"))
        .expect("the tenant made after the snapshot is there");
    let globex_id: keyfront::ids::TenantId = restored
        .manifest
        .tenants
        .iter()
        .find(|t| t.name == "globex")
        .expect("globex in the snapshot")
        .id
        .parse()
        .expect("id");
    assert!(kms.store().is_destroyed(globex_id).expect("tombstone"));
    // The grant approved in the snapshot is revoked: support asks again.
    assert_eq!(restored.grants_revoked, 1);
    let restored_grant = kms.store().grant(&grant.id).expect("grant").expect("kept");
    assert_eq!(
        restored_grant.state,
        keyfront::keystore::GrantState::Revoked
    );
    assert_eq!(restored_grant.revoked_by.as_deref(), Some("system:restore"));
    assert!(
        kms.decrypt(globex_id, &globex_ciphertext, &context, None)
            .is_err(),
        "globex stays destroyed"
    );
}

/// A snapshot taken while Encrypt and RotateKey run restores consistently (issue 7, story 2):
/// every record passes its MAC and sequence checks, and every answer given before the
/// snapshot began decrypts from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_under_encrypt_and_rotate_load_restores_consistently() {
    let h = start_with_journal(false).await;
    let mut admin = h.admin().await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for tenant in ["acme-app", "globex-app"] {
        let mut client = h.keys(tenant).await;
        let stop = Arc::clone(&stop);
        load.push(tokio::spawn(async move {
            let mut made = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                made.push(encrypt(&mut client, b"under load").await.ciphertext);
            }
            made
        }));
    }
    let rotations = {
        let mut admin = admin.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                for tenant in ["acme", "globex"] {
                    admin
                        .rotate_key(pb::RotateKeyRequest {
                            tenant: tenant.into(),
                            name: "default".into(),
                            request_id: String::new(),
                        })
                        .await
                        .expect("rotate");
                }
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut archives = Vec::new();
    for _ in 0..3 {
        archives.push(create_backup(&mut admin).await);
    }
    stop.store(true, Ordering::SeqCst);
    let rotated = rotations.await.expect("rotations");
    let mut made = Vec::new();
    for task in load {
        made.extend(task.await.expect("load"));
    }
    assert!(
        rotated > 0 && made.len() > 10,
        "load ran: {rotated} rotations"
    );
    let hsm = Arc::clone(&h.hsm) as Arc<dyn Hsm>;
    let dir = h.stop().await;
    for (i, archive) in archives.iter().enumerate() {
        let target = dir.path().join(format!("restored-{i}"));
        let restored = keyfront::backup::restore::restore(
            &hsm,
            std::path::Path::new(&archive.path),
            None,
            &target,
            Default::default(),
        )
        .expect("a snapshot under load restores");
        assert_eq!(restored.tenants, 2);
        // Opening verified every record; versions in the manifest match the databases.
        let kms = keyfront::kms::Kms::open(Arc::clone(&hsm), &target, KmsOptions::default())
            .expect("opens");
        for tenant in &restored.manifest.tenants {
            let id: keyfront::ids::TenantId = tenant.id.parse().expect("id");
            let keys = kms
                .store()
                .tenant(id)
                .expect("tenant")
                .keys()
                .expect("keys");
            for summary in &tenant.keys {
                let key = keys
                    .iter()
                    .find(|k| k.name.as_str() == summary.name)
                    .expect("key");
                assert_eq!(key.primary.0, summary.primary);
                assert_eq!(key.latest.0 as usize, summary.versions.len());
            }
        }
    }
    // With the journal, every ciphertext made under load decrypts from the last snapshot.
    let target = dir.path().join("restored-journal");
    keyfront::backup::restore::restore(
        &hsm,
        std::path::Path::new(&archives[2].path),
        Some(&dir.path().join("journal")),
        &target,
        Default::default(),
    )
    .expect("restore with the journal");
    let kms =
        keyfront::kms::Kms::open(Arc::clone(&hsm), &target, KmsOptions::default()).expect("opens");
    let context: keyfront::crypto::EncryptionContext =
        [("row", CONTEXT_MARKER)].into_iter().collect();
    for name in ["acme", "globex"] {
        let id = kms.tenant_id(&name.parse().expect("name")).expect("tenant");
        let mut decrypted = 0;
        for blob in &made {
            if let Ok(back) = kms.decrypt(id, blob, &context, None) {
                assert_eq!(back.plaintext.expose_secret(), b"under load");
                decrypted += 1;
            }
        }
        assert!(decrypted > 0, "{name}");
    }
    let all: usize = ["acme", "globex"]
        .iter()
        .map(|name| {
            let id = kms.tenant_id(&name.parse().expect("name")).expect("tenant");
            made.iter()
                .filter(|blob| kms.decrypt(id, blob, &context, None).is_ok())
                .count()
        })
        .sum();
    assert_eq!(
        all,
        made.len(),
        "every ciphertext decrypts under its tenant"
    );
}

/// Nightly snapshots at 02:00 on the server clock, kept 30 days (issue 7, story 3): across 35
/// nights exactly 30 remain, every snapshot and deletion is an audit line, and
/// GetBackupStatus shows the newest, verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_five_nights_leave_exactly_thirty_snapshots() {
    let h = start_with_journal(true).await;
    let backups = h.dir.path().join("backups");
    let count = || keyfront::backup::list(&backups).expect("list").len();
    let mut admin = h.admin().await;
    let status = admin
        .get_backup_status(pb::GetBackupStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(status.newest.is_none());
    assert_eq!(status.retention_days, 30);
    assert!(status.next_due_time > 0);
    let mut app = h.keys("acme-app").await;
    for night in 1..=35usize {
        encrypt(&mut app, b"a day's work").await;
        h.clock.advance(Duration::from_secs(86_400));
        let want = night.min(30);
        let mut got = 0;
        // Up to 20 s: the scheduler ticks on a loaded machine too.
        for _ in 0..400 {
            got = count();
            if got == want
                && keyfront::backup::list(&backups)
                    .expect("list")
                    .last()
                    .is_some_and(|a| {
                        keyfront::clock::Clock::now_secs(&*h.clock) - a.created_at < 86_400
                    })
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(got, want, "night {night}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(), 30, "exactly 30 after 35 nights");
    let status = admin
        .get_backup_status(pb::GetBackupStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.archives, 30);
    assert!(status.verification_error.is_empty(), "{status:?}");
    assert!(
        status
            .newest
            .as_ref()
            .is_some_and(|n| n.verified && n.size_bytes > 0)
    );
    assert!(status.age_seconds < 86_400);
    // The auditor may look; an app may not.
    let mut auditor = AdminServiceClient::new(h.channel("auditor").await);
    auditor
        .get_backup_status(pb::GetBackupStatusRequest {})
        .await
        .expect("auditor reads the status");
    expect_refused(
        AdminServiceClient::new(h.channel("acme-app").await)
            .get_backup_status(pb::GetBackupStatusRequest {})
            .await,
        Code::PermissionDenied,
        "app",
    );
    let lines = h.audit_lines();
    let backup_lines = |action: &str, outcome: &str| {
        lines
            .iter()
            .filter(|l| {
                l["actor"] == "system:backup" && l["action"] == action && l["outcome"] == outcome
            })
            .count()
    };
    assert_eq!(backup_lines("backup_create", "intent"), 35);
    assert_eq!(backup_lines("backup_create", "OK"), 35);
    assert_eq!(backup_lines("backup_prune", "OK"), 5);
}

/// CreateBackup's bad input and refusals get clear statuses and leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_backup_refuses_bad_directories_and_narrow_officers() {
    let h = start_with_journal(false).await;
    let mut admin = h.admin().await;
    for bad in [
        "relative/dir",
        "/nonexistent/keyfront-backups",
        &"/x".repeat(3000),
    ] {
        let status = admin
            .create_backup(pb::CreateBackupRequest {
                out_dir: bad.to_owned(),
                request_id: String::new(),
            })
            .await
            .expect_err("bad out_dir");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{bad:.40}: {status:?}"
        );
    }
    // Issue 25, finding 8: outside the backup directory is refused, a symbolic link inside it
    // that leads out too, and nothing is written there.
    let outside = h.dir.path().join("outside");
    std::fs::create_dir(&outside).expect("dir");
    let backups_root = h.dir.path().join("backups");
    std::fs::create_dir_all(&backups_root).expect("dir");
    std::os::unix::fs::symlink(&outside, backups_root.join("link-out")).expect("symlink");
    for refused in [outside.clone(), backups_root.join("link-out")] {
        let status = admin
            .create_backup(pb::CreateBackupRequest {
                out_dir: refused.display().to_string(),
                request_id: String::new(),
            })
            .await
            .expect_err("outside the backup directory");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("backup directory"), "{status:?}");
    }
    assert_eq!(std::fs::read_dir(&outside).expect("dir").count(), 0);
    let elsewhere = backups_root.join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("dir");
    let archive = admin
        .create_backup(pb::CreateBackupRequest {
            out_dir: elsewhere.display().to_string(),
            request_id: String::new(),
        })
        .await
        .expect("into another directory")
        .into_inner();
    assert!(PathBuf::from(&archive.path).starts_with(&elsewhere));
    assert_eq!(keyfront::backup::list(&elsewhere).expect("list").len(), 1);
    expect_refused(
        AdminServiceClient::new(h.channel("acme-app").await)
            .create_backup(pb::CreateBackupRequest::default())
            .await,
        Code::PermissionDenied,
        "an app cannot",
    );
    expect_refused(
        AdminServiceClient::new(h.channel("auditor").await)
            .create_backup(pb::CreateBackupRequest::default())
            .await,
        Code::PermissionDenied,
        "an auditor cannot",
    );
}
