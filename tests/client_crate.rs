//! The client library (`client/`, crate keyfront-client) against a real keyfront (`keyfront
//! dev` on SoftHSM): configuration from a file, every wrapped call, CRC32C checks, envelope
//! encryption with its data-key reuse and bounded cache, and retries through a real outage
//! (the server stopped and started again on the same port) that act exactly once.

mod common;

use std::time::Duration;

use common::dev_server::DevServer;
use keyfront_client::{Client, Config, Envelope, EnvelopeOptions, Error, RetryPolicy, pb};
use tonic::Code;

fn config(server: &DevServer, principal: &str) -> Config {
    let certs = server.dir.path().join("certs");
    Config::new(
        format!("https://localhost:{}", server.port),
        certs.join("ca.crt"),
        certs.join(format!("{principal}.crt")),
        certs.join(format!("{principal}.key")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_wrapped_call_works_against_keyfront_from_a_config_file() {
    let server = DevServer::start();
    // From a TOML file, as an app would deploy it.
    let app = config(&server, "acme-app");
    let file = server.dir.path().join("client.toml");
    std::fs::write(
        &file,
        format!(
            "endpoint = {:?}\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\ntimeout_ms = 5000\n[retry]\nmax_attempts = 3\n",
            app.endpoint, app.ca_file, app.cert_file, app.key_file
        ),
    )
    .expect("write config");
    let client = Client::connect(Config::from_file(&file).expect("config file")).expect("client");

    let encrypted = client
        .encrypt("default", b"card 4111", &[("order", "42")])
        .await
        .expect("encrypt");
    assert_eq!(encrypted.key_version, 1);
    let plaintext = client
        .decrypt(&encrypted.ciphertext, &[("order", "42")])
        .await
        .expect("decrypt");
    assert_eq!(&plaintext[..], b"card 4111");
    let refused = client
        .decrypt(&encrypted.ciphertext, &[("order", "41")])
        .await
        .expect_err("another context");
    assert_eq!(refused.code(), Some(Code::InvalidArgument), "{refused}");
    assert!(!refused.to_string().contains("4111"), "{refused}");

    let mac = client
        .generate_mac("mac", b"invoice 42")
        .await
        .expect("mac");
    assert!(
        client
            .verify_mac("mac", mac.key_version, b"invoice 42", &mac.bytes)
            .await
            .expect("verify")
    );
    assert!(
        !client
            .verify_mac("mac", mac.key_version, b"invoice 43", &mac.bytes)
            .await
            .expect("verify")
    );

    let signature = client.sign("signing", b"release 1.0").await.expect("sign");
    assert!(
        client
            .verify(
                "signing",
                signature.key_version,
                b"release 1.0",
                &signature.bytes
            )
            .await
            .expect("verify")
    );
    assert!(
        !client
            .verify(
                "signing",
                signature.key_version,
                b"release 1.1",
                &signature.bytes
            )
            .await
            .expect("verify")
    );
    let public = client.public_key("signing", 0).await.expect("public key");
    assert!(public.pem.starts_with("-----BEGIN PUBLIC KEY-----"));
    assert_eq!(public.key_version, signature.key_version);

    // A purpose mismatch is keyfront's answer, passed on, not retried.
    let before = client.stats();
    let refused = client.sign("default", b"m").await.expect_err("a DATA key");
    assert_eq!(refused.code(), Some(Code::PermissionDenied));
    assert_eq!(client.stats().attempts, before.attempts + 1);
    assert_eq!(client.stats().retries, 0);

    // Data keys need role backup.
    let refused = client
        .generate_data_key("default", &[])
        .await
        .expect_err("role app");
    assert_eq!(refused.code(), Some(Code::PermissionDenied));
    let backup = Client::connect(config(&server, "acme-backup")).expect("client");
    let data_key = backup
        .generate_data_key("default", &[("bucket", "b")])
        .await
        .expect("data key");
    assert_eq!(data_key.plaintext.len(), 32);
    assert!(!format!("{data_key:?}").contains(&format!("{:?}", &data_key.plaintext[..4])));
    let unwrapped = backup
        .decrypt_data_key(&data_key.wrapped, &[("bucket", "b")])
        .await
        .expect("unwrap");
    assert_eq!(unwrapped, data_key.plaintext);

    // Admin calls as an officer.
    let officer = Client::connect(config(&server, "officer")).expect("client");
    let key = officer
        .create_key(
            "acme",
            "client-made",
            pb::KeyPurpose::Data,
            pb::KeyAlgorithm::Unspecified,
        )
        .await
        .expect("create");
    assert_eq!(key.latest_version, 1);
    assert_eq!(
        officer
            .rotate_key("acme", "client-made")
            .await
            .expect("rotate")
            .latest_version,
        2
    );

    // An unreadable file and a missing server are clear errors.
    let mut broken = config(&server, "acme-app");
    broken.key_file = server.dir.path().join("nosuch.key");
    assert!(matches!(Client::connect(broken), Err(Error::Io { .. })));
    server.stop();
}

/// Envelopes: one data key seals many objects (1 MiB ones included), a fresh Envelope opens
/// them with one DecryptDataKey and then from its cache; a changed envelope, another context
/// and garbage are refused; the data-key reuse and the cache are bounded as configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_reuse_data_keys_and_cache_them_within_their_bounds() {
    let server = DevServer::start();
    let client = Client::connect(config(&server, "acme-backup")).expect("client");
    let sealer = Envelope::new(
        client.clone(),
        "default",
        &[("bucket", "invoices")],
        EnvelopeOptions::default(),
    );
    let objects: Vec<Vec<u8>> = (0..50u8)
        .map(|i| match i {
            0 => vec![0xA5; 1 << 20],
            1 => Vec::new(),
            i => format!("invoice {i}").into_bytes(),
        })
        .collect();
    let mut sealed = Vec::new();
    for object in &objects {
        sealed.push(sealer.seal(object).await.expect("seal"));
    }
    assert_eq!(
        sealer.stats().data_keys_generated,
        1,
        "one data key for all"
    );
    // What it sealed it opens from its cache.
    assert_eq!(
        &sealer.open(&sealed[2]).await.expect("open")[..],
        &objects[2][..]
    );
    assert_eq!(sealer.stats().data_keys_unwrapped, 0);

    let opener = Envelope::new(
        client.clone(),
        "default",
        &[("bucket", "invoices")],
        EnvelopeOptions::default(),
    );
    for (object, envelope) in objects.iter().zip(&sealed) {
        assert_eq!(&opener.open(envelope).await.expect("open")[..], &object[..]);
    }
    let stats = opener.stats();
    assert_eq!(
        (stats.data_keys_unwrapped, stats.cache_hits),
        (1, 49),
        "{stats:?}"
    );

    // Changed anywhere: the header (its wrapped key), the nonce, the ciphertext or the tag.
    let envelope = &sealed[3];
    for at in [
        0,
        5,
        6,
        20,
        envelope.len() - 29,
        envelope.len() - 17,
        envelope.len() - 1,
    ] {
        let mut changed = envelope.clone();
        changed[at] ^= 0x01;
        let refused = opener.open(&changed).await.expect_err("changed");
        assert!(
            matches!(refused, Error::Integrity | Error::Envelope(_))
                || refused.code() == Some(Code::InvalidArgument),
            "byte {at}: {refused:?}"
        );
    }
    for garbage in [&b""[..], b"kfe1", b"not an envelope at all, nope"] {
        assert!(matches!(
            opener.open(garbage).await,
            Err(Error::Envelope(_))
        ));
    }
    let elsewhere = Envelope::new(
        client.clone(),
        "default",
        &[("bucket", "payroll")],
        EnvelopeOptions::default(),
    );
    let refused = elsewhere.open(envelope).await.expect_err("another context");
    assert_eq!(refused.code(), Some(Code::InvalidArgument), "{refused:?}");

    // Bounds: a data key per 10 objects; a cache of 2 entries over 3 data keys misses; a zero
    // lifetime unwraps every time.
    let small = EnvelopeOptions {
        max_objects_per_data_key: 10,
        cache_capacity: 2,
        ..EnvelopeOptions::default()
    };
    let rotating = Envelope::new(client.clone(), "default", &[("bucket", "invoices")], small);
    let mut thirty = Vec::new();
    for i in 0..30u32 {
        thirty.push(rotating.seal(&i.to_be_bytes()).await.expect("seal"));
    }
    assert_eq!(rotating.stats().data_keys_generated, 3);
    let bounded = Envelope::new(client.clone(), "default", &[("bucket", "invoices")], small);
    for _ in 0..2 {
        for envelope in [&thirty[0], &thirty[10], &thirty[20]] {
            bounded.open(envelope).await.expect("open");
        }
    }
    assert!(
        bounded.stats().data_keys_unwrapped > 3,
        "{:?}",
        bounded.stats()
    );
    let expiring = Envelope::new(
        client,
        "default",
        &[("bucket", "invoices")],
        EnvelopeOptions {
            cache_ttl: Duration::ZERO,
            ..EnvelopeOptions::default()
        },
    );
    for _ in 0..3 {
        expiring.open(&thirty[0]).await.expect("open");
    }
    assert_eq!(expiring.stats().data_keys_unwrapped, 3);
    server.stop();
}

/// The server goes away and comes back on the same port: a call made meanwhile is retried on
/// UNAVAILABLE until it gets through, with the same request_id, and acts exactly once.
#[test]
fn a_call_during_an_outage_is_retried_until_it_gets_through_and_acts_once() {
    let server = DevServer::start();
    let port = server.port;
    let mut officer = config(&server, "officer");
    officer.timeout_ms = 60_000;
    officer.retry = RetryPolicy {
        max_attempts: 200,
        initial_backoff_ms: 50,
        max_backoff_ms: 300,
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = {
        let _runtime = runtime.enter();
        Client::connect(officer).expect("client")
    };
    let before = runtime
        .block_on(client.rotate_key("acme", "default"))
        .expect("rotate")
        .latest_version;
    let (dir, _, _) = server.stop();
    let call = {
        let client = client.clone();
        runtime.spawn(async move { client.rotate_key("acme", "default").await })
    };
    std::thread::sleep(Duration::from_millis(1500));
    let server = DevServer::start_in_on(dir, port, &[]);
    let rotated = runtime
        .block_on(call)
        .expect("task")
        .expect("rotated after the outage");
    assert_eq!(rotated.latest_version, before + 1, "exactly one rotation");
    assert!(client.stats().retries >= 1, "{:?}", client.stats());
    let mut admin = client.admin_service();
    let key = runtime
        .block_on(admin.get_key(pb::GetKeyRequest {
            tenant: "acme".into(),
            name: "default".into(),
        }))
        .expect("get key")
        .into_inner();
    assert_eq!(key.latest_version, before + 1);
    server.stop();
}
