//! Failure and load: the HSM made unavailable and back, deadlines and the concurrency limit, a graceful stop, bounded password hashing, and callers that go away.

use keyfront::service::pb;
use keyfront::service::pb::key_service_client::KeyServiceClient;
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_outage_is_unavailable_and_recovers_without_restart() {
    let h = Harness::start(true).await;
    // Started while the HSM is unreachable: not serving, data calls UNAVAILABLE.
    assert_eq!(h.health().await, Some(ServingStatus::NotServing as i32));
    expect_refused(
        h.keys("acme-app")
            .await
            .encrypt(pb::EncryptRequest {
                key: "default".into(),
                ..Default::default()
            })
            .await,
        Code::Unavailable,
        "not yet",
    );
    h.set_reachable(true);
    h.wait_for(ServingStatus::Serving).await;
    h.create_tenants().await;

    let mut app = h.keys("acme-app").await;
    let mut backup = h.keys("acme-backup").await;
    let warm = encrypt(&mut app, b"warm").await;
    let data_key = backup
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "default".into(),
            ..Default::default()
        })
        .await
        .expect("dk")
        .into_inner();
    // Lost while serving.
    h.hsm.set_down(true);
    let during = encrypt(&mut app, b"served from the cached bulk key").await;
    app.decrypt(pb::DecryptRequest {
        ciphertext: warm.ciphertext,
        context: ctx(&[("row", CONTEXT_MARKER)]),
        ..Default::default()
    })
    .await
    .expect("decrypt from cache");
    expect_refused(
        backup
            .generate_data_key(pb::GenerateDataKeyRequest {
                key: "default".into(),
                ..Default::default()
            })
            .await,
        Code::Unavailable,
        "needs the HSM",
    );
    let status = backup
        .decrypt_data_key(pb::DecryptDataKeyRequest {
            wrapped_key: data_key.wrapped_key.clone(),
            ..Default::default()
        })
        .await
        .expect_err("needs the HSM");
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "an HSM failure is never called tampering"
    );
    h.wait_for(ServingStatus::NotServing).await;
    // Back without a restart.
    h.hsm.set_down(false);
    h.wait_for(ServingStatus::Serving).await;
    backup
        .decrypt_data_key(pb::DecryptDataKeyRequest {
            wrapped_key: data_key.wrapped_key,
            ..Default::default()
        })
        .await
        .expect("recovered");
    app.decrypt(pb::DecryptRequest {
        ciphertext: during.ciphertext,
        context: ctx(&[("row", CONTEXT_MARKER)]),
        ..Default::default()
    })
    .await
    .expect("decrypt");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_hit_the_deadline_and_excess_ones_are_refused() {
    // A slow HSM: the configuration DESIGN.md advises for one, HSM calls off the async workers.
    let h = Harness::start_with(false, |limits, kms| {
        limits.request_timeout = Duration::from_millis(400);
        limits.max_concurrent_requests = 2;
        kms.inline_hsm_calls = false;
    })
    .await;
    let backup = h.keys("acme-backup").await;
    let generate = |mut client: KeyServiceClient<Channel>| async move {
        client
            .generate_data_key(pb::GenerateDataKeyRequest {
                key: "default".into(),
                ..Default::default()
            })
            .await
            .map(drop)
    };
    h.hsm.set_delay(Duration::from_millis(1000));
    let status = generate(backup.clone()).await.expect_err("too slow");
    assert_eq!(status.code(), Code::DeadlineExceeded);

    // GenerateDataKey makes three HSM calls: 3 × 100 ms stays within the 400 ms deadline.
    h.hsm.set_delay(Duration::from_millis(100));
    let calls: Vec<_> = (0..6)
        .map(|_| tokio::spawn(generate(backup.clone())))
        .collect();
    let mut codes = Vec::new();
    for call in calls {
        codes.push(match call.await.expect("task") {
            Ok(()) => Code::Ok,
            Err(status) => status.code(),
        });
    }
    assert!(codes.contains(&Code::Ok), "{codes:?}");
    assert!(
        codes.contains(&Code::ResourceExhausted),
        "at most 2 at once: {codes:?}"
    );
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, Code::Ok | Code::ResourceExhausted)),
        "{codes:?}"
    );
    h.hsm.set_delay(Duration::ZERO);
    let audited: Vec<_> = h
        .audit_lines()
        .into_iter()
        .filter(|l| l["kind"] == "request")
        .collect();
    assert!(audited.iter().any(|l| l["outcome"] == "DEADLINE_EXCEEDED"));
    assert!(audited.iter().any(|l| l["outcome"] == "RESOURCE_EXHAUSTED"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight() {
    let mut h = Harness::start(false).await;
    let mut backup = h.keys("acme-backup").await;
    h.hsm.set_delay(Duration::from_millis(500));
    let in_flight = tokio::spawn(async move {
        backup
            .generate_data_key(pb::GenerateDataKeyRequest {
                key: "default".into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().wrapped_key.len())
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    if let Some(tx) = h.shutdown.take() {
        let _ = tx.send(());
    }
    let result = in_flight.await.expect("task");
    assert_eq!(result.ok(), Some(82), "the request in flight completed");
    h.hsm.set_delay(Duration::ZERO);
    tokio::time::timeout(Duration::from_secs(10), &mut h.server)
        .await
        .expect("server stops")
        .expect("task")
        .expect("clean shutdown");
}

/// HashPassword/VerifyPassword over gRPC; a flood of hashing is refused with
/// RESOURCE_EXHAUSTED while Encrypt keeps being served (issue 6, story 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_hashing_is_bounded_and_encrypt_keeps_going() {
    let harness = Harness::start_configured(
        false,
        |limits, kms| {
            limits.max_concurrent_password_hashes = 1;
            kms.password_params = keyfront::kms::PasswordParams {
                memory_kib: 8 * 1024,
                iterations: 2,
                parallelism: 1,
            };
        },
        |_| {},
    )
    .await;
    let mut secrets = harness.keys("acme-secrets").await;
    let hash = secrets
        .hash_password(pb::HashPasswordRequest {
            key: "secrets".into(),
            password: b"hunter2".to_vec(),
            tenant: String::new(),
            grant_id: String::new(),
        })
        .await
        .expect("hash")
        .into_inner()
        .hash;
    let verify = |password: &[u8]| pb::VerifyPasswordRequest {
        key: "secrets".into(),
        password: password.to_vec(),
        hash: hash.clone(),
        tenant: String::new(),
        grant_id: String::new(),
    };
    let ok = secrets
        .verify_password(verify(b"hunter2"))
        .await
        .expect("verify")
        .into_inner();
    assert!(ok.matches && !ok.rehash_needed);
    let no = secrets
        .verify_password(verify(b"hunter3"))
        .await
        .expect("verify")
        .into_inner();
    assert!(!no.matches);
    // Issue 25, finding 2: a hash string naming costs this server never uses (the reviewer's
    // 1 GiB, 16 passes, 16 lanes, as the least privileged data role) is refused before any
    // Argon2 work: at once, holding no slot, so HashPassword goes on for everyone.
    let salt = "AAAAAAAAAAAAAAAAAAAAAA";
    let digest = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    for costs in ["m=1048576,t=16,p=16", "m=8192,t=3,p=1", "m=8192,t=2,p=2"] {
        let refused = secrets
            .verify_password(pb::VerifyPasswordRequest {
                hash: format!("$argon2id$v=19${costs},pv=1${salt}${digest}"),
                ..verify(b"hunter2")
            })
            .await
            .expect_err("costs this server does not make");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("accepted"), "{refused:?}");
        // With one password slot, a hash started for the refused call would hold it: this
        // one would be RESOURCE_EXHAUSTED.
        secrets
            .hash_password(pb::HashPasswordRequest {
                key: "secrets".into(),
                password: b"after".to_vec(),
                tenant: String::new(),
                grant_id: String::new(),
            })
            .await
            .expect("the one slot is free");
    }
    // The app role cannot hash passwords.
    expect_refused(
        harness
            .keys("acme-app")
            .await
            .hash_password(pb::HashPasswordRequest {
                key: "secrets".into(),
                password: b"x".to_vec(),
                tenant: String::new(),
                grant_id: String::new(),
            })
            .await,
        Code::PermissionDenied,
        "role",
    );

    // A flood: 16 hashes at once with one slot.
    let flood: Vec<_> = (0..16)
        .map(|_| {
            let mut client = secrets.clone();
            tokio::spawn(async move {
                client
                    .hash_password(pb::HashPasswordRequest {
                        key: "secrets".into(),
                        password: b"flood".to_vec(),
                        tenant: String::new(),
                        grant_id: String::new(),
                    })
                    .await
                    .map(drop)
            })
        })
        .collect();
    let mut app = harness.keys("acme-app").await;
    for _ in 0..20 {
        encrypt(&mut app, b"still served").await;
    }
    let mut exhausted = 0;
    for task in flood {
        match task.await.expect("task") {
            Ok(()) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                exhausted += 1;
            }
        }
    }
    assert!(exhausted > 0, "some of the flood was refused");
}

/// Issue 25, finding 7: a request whose caller cancels it, or whose own grpc-timeout passes,
/// has exactly one audit line too (tonic's timeout layer dropped the pipeline before it wrote
/// one): a read stops and says CANCELLED or DEADLINE_EXCEEDED; a mutation runs to its end, its
/// line says what it did and that its caller was gone, and a retry with its request_id finds
/// that answer instead of a second change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_goes_away_leaves_one_audit_line_and_no_half_done_mutation() {
    // The server's own bound fires before any client timer: which of a caller's grpc-timeout
    // and the client library's timer (the same deadline) ends a call first is a race that gRPC
    // itself has, so deterministic labels come from the server's bound.
    let h = Harness::start_with(false, |limits, _| {
        limits.request_timeout = Duration::from_millis(200);
    })
    .await;
    // HashPassword runs on the blocking pool (its pepper HMAC in the HSM, then Argon2), so a
    // caller that leaves can be left while it runs.
    let mut secrets = h.keys("acme-secrets").await;
    // Every HSM call now takes 400 ms.
    h.hsm.set_delay(Duration::from_millis(400));
    let hash = || pb::HashPasswordRequest {
        key: "secrets".into(),
        password: b"hunter2".to_vec(),
        ..Default::default()
    };
    // The blocking work of an abandoned hash holds its password slot until the HSM answers.
    let slot_freed = || tokio::time::sleep(Duration::from_millis(600));
    let status = secrets.hash_password(hash()).await.expect_err("too late");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    slot_freed().await;
    // The caller's own grpc-timeout shortens the server's bound; the client library times the
    // call out as well, so its line says either.
    let mut late = tonic::Request::new(hash());
    late.set_timeout(Duration::from_millis(60));
    let status = secrets.hash_password(late).await.expect_err("too late");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    slot_freed().await;
    let mut cancelled = secrets.clone();
    let request = hash();
    let call = tokio::spawn(async move { cancelled.hash_password(request).await });
    tokio::time::sleep(Duration::from_millis(60)).await;
    call.abort();
    let _ = call.await;

    let mut admin = h.admin().await;
    let rotate = pb::RotateKeyRequest {
        tenant: "acme".into(),
        name: "default".into(),
        request_id: "gone-1".into(),
    };
    let status = admin.rotate_key(rotate).await.expect_err("too late");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    h.hsm.set_delay(Duration::ZERO);

    // The mutation went on to its end, once.
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = h.audit_lines();
        if lines
            .iter()
            .any(|l| l["rpc"] == "keyfront.v1.AdminService/RotateKey" && l["kind"] == "request")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let requests = |rpc: &str| -> Vec<(String, Option<String>)> {
        lines
            .iter()
            .filter(|l| l["kind"] == "request" && l["rpc"] == rpc)
            .map(|l| {
                (
                    l["outcome"].as_str().unwrap_or_default().to_owned(),
                    l["caller_gone"].as_str().map(str::to_owned),
                )
            })
            .collect()
    };
    let hashes = requests("keyfront.v1.KeyService/HashPassword");
    let ended = |outcome: &str| {
        hashes
            .iter()
            .filter(|h| *h == &(outcome.into(), None))
            .count()
    };
    assert!(
        hashes.len() == 3 && ended("DEADLINE_EXCEEDED") >= 1 && ended("CANCELLED") >= 1,
        "one line each, with how it ended: {hashes:?}"
    );
    let rotations = requests("keyfront.v1.AdminService/RotateKey");
    assert_eq!(
        rotations,
        [("OK".to_owned(), Some("DEADLINE_EXCEEDED".to_owned()))],
        "the rotation is audited once, as done, its caller gone"
    );
    let again = admin
        .rotate_key(pb::RotateKeyRequest {
            tenant: "acme".into(),
            name: "default".into(),
            request_id: "gone-1".into(),
        })
        .await
        .expect("the retry")
        .into_inner();
    assert_eq!(
        again.primary_version, 2,
        "the first answer, not a second rotation"
    );
}
