//! The audit log and the metrics: every request audited without secrets, a tampered log named at its first bad line, a failing or full audit device refusing requests before they act.

use keyfront::hsm::Hsm;
use keyfront::service::pb;
#[cfg(feature = "test-hooks")]
use std::sync::atomic::Ordering;
use std::time::Duration;
use tonic::Code;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_audited_without_secrets() {
    let h = Harness::start(false).await;
    let before = h
        .audit_lines()
        .iter()
        .filter(|l| l["kind"] == "request")
        .count();
    let mut app = h.keys("acme-app").await;
    let encrypted = encrypt(&mut app, PLAINTEXT_MARKER).await;
    app.decrypt(pb::DecryptRequest {
        ciphertext: encrypted.ciphertext,
        context: ctx(&[("row", CONTEXT_MARKER)]),
        ..Default::default()
    })
    .await
    .expect("decrypt");
    let mut secrets = h.keys("acme-secrets").await;
    let sealed = secrets
        .seal_secret(pb::SealSecretRequest {
            key: "secrets".into(),
            secret: SECRET_MARKER.to_vec(),
            context: ctx(&[("user", CONTEXT_MARKER)]),
            ..Default::default()
        })
        .await
        .expect("seal")
        .into_inner();
    secrets
        .unseal_secret(pb::UnsealSecretRequest {
            sealed: sealed.sealed,
            context: ctx(&[("user", CONTEXT_MARKER)]),
            ..Default::default()
        })
        .await
        .expect("unseal");
    let dk = h
        .keys("acme-backup")
        .await
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "default".into(),
            include_plaintext: true,
            ..Default::default()
        })
        .await
        .expect("dk")
        .into_inner();
    // Refused ones: wrong role, and too large for the server to even decode.
    let _ = app
        .seal_secret(pb::SealSecretRequest {
            key: "secrets".into(),
            secret: SECRET_MARKER.to_vec(),
            ..Default::default()
        })
        .await;
    let _ = app
        .encrypt(pb::EncryptRequest {
            key: "default".into(),
            plaintext: vec![0; 100 * 1024],
            ..Default::default()
        })
        .await;
    let made = 7;
    let dir = h.stop().await;
    let text = std::fs::read_to_string(dir.path().join("audit/audit.log")).expect("audit");
    let requests: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .filter(|l: &serde_json::Value| l["kind"] == "request")
        .collect();
    assert_eq!(
        requests.len() - before,
        made,
        "one line per request:\n{text}"
    );
    let outcomes: Vec<&str> = requests[before..]
        .iter()
        .map(|l| l["outcome"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(outcomes[..5], ["OK", "OK", "OK", "OK", "OK"]);
    assert_eq!(outcomes[5], "PERMISSION_DENIED");
    assert!(
        matches!(outcomes[6], "OUT_OF_RANGE" | "RESOURCE_EXHAUSTED"),
        "{outcomes:?}"
    );
    for line in &requests[before..] {
        for field in [
            "time",
            "node",
            "request_id",
            "peer",
            "identity",
            "cert_fingerprint",
            "rpc",
            "outcome",
            "latency_us",
        ] {
            assert!(!line[field].is_null(), "{field} missing in {line}");
        }
    }
    assert_eq!(requests[before]["tenant"], "acme");
    assert_eq!(requests[before]["key"], "default");
    assert_eq!(requests[before]["version"], 1);
    assert!(
        requests[before]["context"]["row"]
            .as_str()
            .is_some_and(|v| v.len() == 64)
    );
    for marker in [PLAINTEXT_MARKER, SECRET_MARKER, CONTEXT_MARKER.as_bytes()] {
        let marker = String::from_utf8_lossy(marker);
        assert!(
            !text.contains(marker.as_ref()),
            "{marker} leaked into the audit log"
        );
    }
    let key_hex = hex::encode(&dk.plaintext_key);
    assert!(!text.contains(&key_hex));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_requests_latencies_hsm_and_caches() {
    let h = Harness::start(false).await;
    let mut app = h.keys("acme-app").await;
    let encrypted = encrypt(&mut app, b"metered").await;
    encrypt(&mut app, b"metered again").await;
    app.decrypt(pb::DecryptRequest {
        ciphertext: encrypted.ciphertext,
        context: ctx(&[("row", CONTEXT_MARKER)]),
        ..Default::default()
    })
    .await
    .expect("decrypt");
    let _ = app
        .seal_secret(pb::SealSecretRequest::default())
        .await
        .expect_err("denied");
    h.keys("acme-backup")
        .await
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "default".into(),
            ..Default::default()
        })
        .await
        .expect("dk");
    let text = scrape(h.metrics).await;
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    for expected in [
        "keyfront_requests_total{rpc=\"keyfront.v1.KeyService/Encrypt\",code=\"OK\"}",
        "keyfront_requests_total{rpc=\"keyfront.v1.KeyService/SealSecret\",code=\"PERMISSION_DENIED\"}",
        "keyfront_request_duration_seconds_bucket{",
        "keyfront_hsm_operations_total{op=\"encrypt\",outcome=\"ok\"}",
        "keyfront_hsm_operation_duration_seconds_bucket{",
        "keyfront_cache_requests_total{cache=\"bulk_key\",result=\"hit\"}",
        "keyfront_cache_requests_total{cache=\"bulk_key\",result=\"miss\"}",
        "keyfront_audit_write_duration_seconds_bucket{",
        "keyfront_open_tenant_databases",
    ] {
        assert!(text.contains(expected), "missing {expected} in:\n{text}");
    }
    h.stop().await;
}

/// Audit integrity (issue 6): a test run's log verifies with the HSM's public key alone; a
/// modified byte, a deleted line, two swapped lines and (with --expect-head) a cut tail fail,
/// naming the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_verifies_and_names_the_first_tampered_line() {
    let h = Harness::start(false).await;
    let mut app = h.keys("acme-app").await;
    for _ in 0..60 {
        encrypt(&mut app, b"line").await;
    }
    for _ in 0..100 {
        if h.audit_lines()
            .iter()
            .filter(|l| l["kind"] == "checkpoint")
            .count()
            >= 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let public_key = hex::encode(h.hsm.inner().audit_public_key());
    let dir = h.stop().await;
    let log = dir.path().join("audit/audit.log");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains("\"kind\":\"checkpoint\""),
        "checkpoints were signed"
    );
    let log_arg = log.to_str().expect("path");
    let (ok, out) = verify(&["--public-key", &public_key, log_arg]);
    let tail: Vec<&str> = text.lines().rev().take(3).collect();
    assert!(ok, "a clean log verifies: {out}\nits last lines: {tail:#?}");
    let head = out
        .lines()
        .find_map(|l| l.strip_prefix("head: "))
        .expect("prints the head")
        .to_owned();
    let wrong_key = hex::encode(keyfront::hsm::memory::MemoryHsm::new().audit_public_key());
    let (ok, out) = verify(&["--public-key", &wrong_key, log_arg]);
    assert!(!ok, "another key's checkpoints fail: {out}");

    let lines: Vec<&str> = text.lines().collect();
    let tampered = dir.path().join("tampered.log");
    let tampered_arg = tampered.to_str().expect("path");
    let check = |lines: Vec<String>, extra: &[&str], wanted_line: usize, what: &str| {
        std::fs::write(&tampered, lines.join("\n") + "\n").expect("write");
        let mut args = vec!["--public-key", public_key.as_str()];
        args.extend_from_slice(extra);
        args.push(tampered_arg);
        let (ok, out) = verify(&args);
        assert!(!ok, "{what} is found: {out}");
        assert!(
            out.contains(&format!("tampered.log:{wanted_line}:")),
            "{what} names line {wanted_line}: {out}"
        );
    };
    let owned = || {
        lines
            .iter()
            .map(|l| (*l).to_owned())
            .collect::<Vec<String>>()
    };
    // A modified byte in line 10: one letter of the node id.
    let mut modified = owned();
    modified[9] = modified[9].replacen("\"node\":\"test\"", "\"node\":\"tesT\"", 1);
    assert_ne!(modified[9], lines[9], "line 10 names the node");
    check(modified, &[], 10, "a modified byte");
    let mut deleted = owned();
    deleted.remove(9);
    check(deleted, &[], 10, "a deleted line");
    let mut swapped = owned();
    swapped.swap(9, 10);
    check(swapped, &[], 10, "two swapped lines");
    // Cut before the graceful stop's checkpoint, and before any checkpoint just before it:
    // the log then ends in lines only that checkpoint signed.
    let mut cut = owned();
    let last_checkpoint = cut
        .iter()
        .rposition(|l| l.contains("\"kind\":\"checkpoint\""))
        .expect("the final checkpoint");
    cut.truncate(last_checkpoint);
    while cut
        .last()
        .is_some_and(|l| l.contains("\"kind\":\"checkpoint\""))
    {
        cut.pop();
    }
    let cut_len = cut.len();
    std::fs::write(&tampered, cut.join("\n") + "\n").expect("write");
    // The clean log ended with the signed checkpoint of the graceful stop: cut, its last lines
    // are unsigned, and that fails (issue 25, finding 3). Accepted on purpose as a live log's
    // tail, a cut at a line boundary looks whole, and only the expected head catches it.
    let (ok, out) = verify(&["--public-key", &public_key, tampered_arg]);
    assert!(!ok, "a cut tail leaves unsigned lines: {out}");
    assert!(out.contains("not covered by a checkpoint"), "{out}");
    let (ok, out) = verify(&[
        "--public-key",
        &public_key,
        "--allow-unsigned-tail",
        "100",
        tampered_arg,
    ]);
    assert!(ok, "with an allowance, a cut tail looks whole: {out}");
    check(
        cut,
        &["--allow-unsigned-tail", "100", "--expect-head", &head],
        cut_len,
        "a truncated tail",
    );
}

/// Fail closed (issue 6): while the audit sink fails, requests are refused with UNAVAILABLE
/// before they act: no key operation reaches the HSM and nothing is created.
#[cfg(feature = "test-hooks")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_audit_sink_refuses_requests_before_they_act() {
    use keyfront::hsm::faulty::Op;
    let h = Harness::start(false).await;
    let mut admin = h.admin().await;
    let mut app = h.keys("acme-app").await;
    encrypt(&mut app, b"warm").await;
    let key_ops = |h: &Harness| {
        [
            Op::GenerateKek,
            Op::UnwrapKek,
            Op::Encrypt,
            Op::Decrypt,
            Op::Random,
            Op::Hmac,
        ]
        .iter()
        .map(|op| h.hsm.calls(*op))
        .sum::<u64>()
    };
    let before = key_ops(&h);
    h.audit_failure.store(true, Ordering::SeqCst);
    let create = expect_refused(
        admin
            .create_key(pb::CreateKeyRequest {
                tenant: "acme".into(),
                name: "made-while-broken".into(),
                purpose: pb::KeyPurpose::Data as i32,
                request_id: String::new(),
                ..Default::default()
            })
            .await,
        Code::Unavailable,
        "no audit, no key",
    );
    assert!(create.message().contains("audit"), "{}", create.message());
    expect_refused(
        admin
            .rotate_key(pb::RotateKeyRequest {
                tenant: "acme".into(),
                name: "default".into(),
                request_id: String::new(),
            })
            .await,
        Code::Unavailable,
        "no audit, no rotation",
    );
    for _ in 0..3 {
        expect_refused(
            app.encrypt(pb::EncryptRequest {
                key: "default".into(),
                plaintext: b"x".to_vec(),
                ..Default::default()
            })
            .await,
            Code::Unavailable,
            "no audit, no encryption",
        );
    }
    assert_eq!(
        key_ops(&h),
        before,
        "no key operation while the log is broken"
    );

    h.audit_failure.store(false, Ordering::SeqCst);
    let mut answer = Code::Unavailable;
    for _ in 0..10 {
        answer = code(
            admin
                .get_key(pb::GetKeyRequest {
                    tenant: "acme".into(),
                    name: "made-while-broken".into(),
                })
                .await,
        );
        if answer != Code::Unavailable {
            break;
        }
    }
    assert_eq!(
        answer,
        Code::NotFound,
        "the refused CreateKey created nothing"
    );
    let key = admin
        .get_key(pb::GetKeyRequest {
            tenant: "acme".into(),
            name: "default".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        key.primary_version, 1,
        "the refused rotation did not happen"
    );
    h.stop().await;
}

/// Fail closed on a full device (issue 6): every request is refused with UNAVAILABLE and no
/// key operation happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_log_on_a_full_device_refuses_every_request() {
    let h = Harness::start_configured(
        false,
        |_, _| {},
        |config| {
            if let Some(server) = config.server.as_mut() {
                server.audit_path = "/dev/full".into();
            }
        },
    )
    .await;
    // Wait for the HSM to be open (health answers UNAVAILABLE too, so watch the domain).
    for _ in 0..100 {
        if h.hsm.calls(keyfront::hsm::faulty::Op::Probe) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let baseline = h.hsm.total_calls() - h.hsm.calls(keyfront::hsm::faulty::Op::Probe);
    let mut admin = h.admin().await;
    let created = admin
        .create_tenant(pb::CreateTenantRequest {
            name: "acme".into(),
            request_id: String::new(),
        })
        .await
        .expect_err("refused");
    assert_eq!(created.code(), Code::Unavailable, "{}", created.message());
    let mut app = h.keys("acme-app").await;
    let encrypted = expect_refused(
        app.encrypt(pb::EncryptRequest {
            key: "default".into(),
            plaintext: b"x".to_vec(),
            ..Default::default()
        })
        .await,
        Code::Unavailable,
        "refused",
    );
    assert!(
        encrypted.message().contains("audit"),
        "{}",
        encrypted.message()
    );
    assert_eq!(
        h.hsm.total_calls() - h.hsm.calls(keyfront::hsm::faulty::Op::Probe),
        baseline,
        "no key operation"
    );
}
