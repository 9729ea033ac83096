//! keyfront's throughput and latency over real mutual TLS against SoftHSM, next to the limits
//! it can at best approach on the same machine: a bare tonic echo service behind the same TLS
//! setup (transport), raw SoftHSM AES-GCM and HMAC-SHA-256 through cryptoki (HSM, HSM HMAC),
//! raw AES-256-GCM-SIV (crypto).
//!
//! Run with `scripts/bench.sh` (release build, a fresh SoftHSM token, writes docs/BENCHMARKS.md).
//! `cargo test --all-targets` also runs this binary, without `--bench`: it then does nothing.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use keyfront::cli::dev;
use keyfront::config::{Config, Limits, Role, ServerConfig};
use keyfront::hsm::pkcs11;
use keyfront::kms::KmsOptions;
use keyfront::service::pb::admin_service_client::AdminServiceClient;
use keyfront::service::pb::key_service_client::KeyServiceClient;
use keyfront::service::pb::key_service_server::{KeyService, KeyServiceServer};
use keyfront::service::{Server, pb};
use tonic::{Request, Response, Status};

// The same allocator as the keyfront binary, for the server and the limits alike.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONCURRENCY: [usize; 3] = [1, 16, 64];

/// `KEYFRONT_BENCH_ONLY=Encrypt,GenerateDataKey` limits a run to operations whose names start
/// with one of these (for profiling); the limits always run.
fn wanted(operation: &str) -> bool {
    std::env::var("KEYFRONT_BENCH_ONLY").map_or(true, |only| {
        only.split(',')
            .any(|prefix| operation.starts_with(prefix.trim()))
    })
}

/// `KEYFRONT_BENCH_CONCURRENCY=64` limits the concurrencies.
fn concurrencies() -> Vec<usize> {
    std::env::var("KEYFRONT_BENCH_CONCURRENCY")
        .ok()
        .map(|list| {
            list.split(',')
                .filter_map(|c| c.trim().parse().ok())
                .collect()
        })
        .unwrap_or_else(|| CONCURRENCY.to_vec())
}

/// The transport limit: the same messages and TLS setup, no work.
struct Echo;

#[tonic::async_trait]
impl KeyService for Echo {
    async fn encrypt(
        &self,
        r: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let r = r.into_inner();
        Ok(Response::new(pb::EncryptResponse {
            ciphertext: r.plaintext,
            ..Default::default()
        }))
    }
    async fn decrypt(
        &self,
        r: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let r = r.into_inner();
        Ok(Response::new(pb::DecryptResponse {
            plaintext: r.ciphertext,
            ..Default::default()
        }))
    }
    async fn batch_encrypt(
        &self,
        r: Request<pb::BatchEncryptRequest>,
    ) -> Result<Response<pb::BatchEncryptResponse>, Status> {
        // The same bytes back, item by item: the transport cost of a batch.
        let results = r
            .into_inner()
            .items
            .into_iter()
            .map(|item| pb::BatchEncryptResult {
                ciphertext: item.plaintext,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(pb::BatchEncryptResponse { results }))
    }
    async fn batch_decrypt(
        &self,
        _: Request<pb::BatchDecryptRequest>,
    ) -> Result<Response<pb::BatchDecryptResponse>, Status> {
        Ok(Response::new(pb::BatchDecryptResponse::default()))
    }
    async fn generate_data_key(
        &self,
        _: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        Ok(Response::new(pb::GenerateDataKeyResponse::default()))
    }
    async fn decrypt_data_key(
        &self,
        _: Request<pb::DecryptDataKeyRequest>,
    ) -> Result<Response<pb::DecryptDataKeyResponse>, Status> {
        Ok(Response::new(pb::DecryptDataKeyResponse::default()))
    }
    async fn seal_secret(
        &self,
        _: Request<pb::SealSecretRequest>,
    ) -> Result<Response<pb::SealSecretResponse>, Status> {
        Ok(Response::new(pb::SealSecretResponse::default()))
    }
    async fn unseal_secret(
        &self,
        _: Request<pb::UnsealSecretRequest>,
    ) -> Result<Response<pb::UnsealSecretResponse>, Status> {
        Ok(Response::new(pb::UnsealSecretResponse::default()))
    }
    async fn re_encrypt(
        &self,
        _: Request<pb::ReEncryptRequest>,
    ) -> Result<Response<pb::ReEncryptResponse>, Status> {
        Ok(Response::new(pb::ReEncryptResponse::default()))
    }
    async fn re_encrypt_data_key(
        &self,
        _: Request<pb::ReEncryptDataKeyRequest>,
    ) -> Result<Response<pb::ReEncryptDataKeyResponse>, Status> {
        Ok(Response::new(pb::ReEncryptDataKeyResponse::default()))
    }
    async fn hash_password(
        &self,
        _: Request<pb::HashPasswordRequest>,
    ) -> Result<Response<pb::HashPasswordResponse>, Status> {
        Ok(Response::new(pb::HashPasswordResponse::default()))
    }
    async fn verify_password(
        &self,
        _: Request<pb::VerifyPasswordRequest>,
    ) -> Result<Response<pb::VerifyPasswordResponse>, Status> {
        Ok(Response::new(pb::VerifyPasswordResponse::default()))
    }
    async fn generate_mac(
        &self,
        _: Request<pb::GenerateMacRequest>,
    ) -> Result<Response<pb::GenerateMacResponse>, Status> {
        Ok(Response::new(pb::GenerateMacResponse::default()))
    }
    async fn verify_mac(
        &self,
        _: Request<pb::VerifyMacRequest>,
    ) -> Result<Response<pb::VerifyMacResponse>, Status> {
        Ok(Response::new(pb::VerifyMacResponse::default()))
    }
    async fn sign(
        &self,
        _: Request<pb::SignRequest>,
    ) -> Result<Response<pb::SignResponse>, Status> {
        Ok(Response::new(pb::SignResponse::default()))
    }
    async fn verify(
        &self,
        _: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        Ok(Response::new(pb::VerifyResponse::default()))
    }
    async fn get_public_key(
        &self,
        _: Request<pb::GetPublicKeyRequest>,
    ) -> Result<Response<pb::GetPublicKeyResponse>, Status> {
        Ok(Response::new(pb::GetPublicKeyResponse::default()))
    }
    async fn lookup_digest(
        &self,
        _: Request<pb::LookupDigestRequest>,
    ) -> Result<Response<pb::LookupDigestResponse>, Status> {
        Ok(Response::new(pb::LookupDigestResponse::default()))
    }
}

/// The HSM limit: raw AES-GCM encrypt of 32 bytes on a session-object key, one session per
/// thread, as many threads as cores (the best strategy in notes/pkcs11-softhsm.md).
fn hsm_limit(config: &pkcs11::Pkcs11Config, seconds: f64) -> f64 {
    use cryptoki::mechanism::Mechanism;
    use cryptoki::mechanism::aead::GcmParams;
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    raw_rate(
        config,
        seconds,
        |session| {
            session
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen(32.into()),
                        Attribute::Token(false),
                        Attribute::Encrypt(true),
                    ],
                )
                .expect("key")
        },
        |session, key| {
            let mut iv: [u8; 12] = rand::random();
            let params = GcmParams::new(&mut iv, b"aad", 128.into()).expect("params");
            session
                .encrypt(&Mechanism::AesGcm(params), key, &[7u8; 32])
                .expect("encrypt");
        },
    )
}

/// The HSM limit of MAC keys: raw HMAC-SHA-256 (`C_Sign`) of 32 bytes on a session-object
/// generic secret key, the same way.
fn hmac_limit(config: &pkcs11::Pkcs11Config, seconds: f64) -> f64 {
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    raw_rate(
        config,
        seconds,
        |session| {
            session
                .generate_key(
                    &Mechanism::GenericSecretKeyGen,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::GENERIC_SECRET),
                        Attribute::ValueLen(32.into()),
                        Attribute::Token(false),
                        Attribute::Sign(true),
                    ],
                )
                .expect("key")
        },
        |session, key| {
            session
                .sign(&Mechanism::Sha256Hmac, key, &[7u8; 32])
                .expect("hmac");
        },
    )
}

/// The HSM limits of a signing algorithm: raw `C_Sign` and `C_Verify` of a 32-byte digest
/// (`CKM_ECDSA` on P-256, or `CKM_RSA_PKCS_PSS` with SHA-256/MGF1-SHA-256/salt 32 on RSA-3072)
/// with session-object keys, the same way.
fn signing_limits(config: &pkcs11::Pkcs11Config, seconds: f64, rsa: bool) -> (f64, f64) {
    use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
    use cryptoki::mechanism::{Mechanism, MechanismType};
    use cryptoki::object::Attribute;
    // Made per call: a Mechanism holds raw pointers and cannot be shared between threads.
    let mechanism = move || match rsa {
        true => Mechanism::RsaPkcsPss(PkcsPssParams {
            hash_alg: MechanismType::SHA256,
            mgf: PkcsMgfType::MGF1_SHA256,
            s_len: 32.into(),
        }),
        false => Mechanism::Ecdsa,
    };
    let pair = |session: &cryptoki::session::Session| {
        let (generate, public) = match rsa {
            true => (
                Mechanism::RsaPkcsKeyPairGen,
                vec![
                    Attribute::ModulusBits(3072.into()),
                    Attribute::PublicExponent(vec![1, 0, 1]),
                ],
            ),
            false => (
                Mechanism::EccKeyPairGen,
                // secp256r1
                vec![Attribute::EcParams(vec![
                    0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07,
                ])],
            ),
        };
        let mut public = public;
        public.extend([Attribute::Token(false), Attribute::Verify(true)]);
        session
            .generate_key_pair(
                &generate,
                &public,
                &[
                    Attribute::Token(false),
                    Attribute::Sign(true),
                    Attribute::Sensitive(true),
                ],
            )
            .expect("key pair")
    };
    let digest = [7u8; 32];
    let sign = raw_rate(
        config,
        seconds,
        |session| pair(session).1,
        |session, key| {
            session.sign(&mechanism(), key, &digest).expect("sign");
        },
    );
    let signature = std::sync::OnceLock::new();
    let verify = raw_rate(
        config,
        seconds,
        |session| {
            let (public, private) = pair(session);
            let _ = signature.set(session.sign(&mechanism(), private, &digest).expect("sign"));
            public
        },
        |session, key| {
            let signature = signature.get().expect("signed");
            session
                .verify(&mechanism(), key, &digest, signature)
                .expect("verify");
        },
    );
    (sign, verify)
}

/// Operations per second of `op` on one session-object key made by `make`: one logged-in
/// session per thread, as many threads as cores, for `seconds`.
fn raw_rate(
    config: &pkcs11::Pkcs11Config,
    seconds: f64,
    make: impl FnOnce(&cryptoki::session::Session) -> cryptoki::object::ObjectHandle,
    op: impl Fn(&cryptoki::session::Session, cryptoki::object::ObjectHandle) + Sync,
) -> f64 {
    let ctx = pkcs11::context(&config.module).expect("context");
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let session = pkcs11::open_logged_in(&ctx, config).expect("session");
    let key = make(&session);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let total: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (ctx, op) = (ctx.clone(), &op);
                scope.spawn(move || {
                    let session = pkcs11::open_logged_in(&ctx, config).expect("session");
                    let mut ops = 0u64;
                    while Instant::now() < deadline {
                        op(&session, key);
                        ops += 1;
                    }
                    ops
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("worker")).sum()
    });
    let rate = total as f64 / started.elapsed().as_secs_f64();
    let _ = session.destroy_object(key);
    rate
}

/// The crypto limit: AES-256-GCM-SIV of 1 KiB on one thread.
fn crypto_limit(seconds: f64) -> f64 {
    let key = keyfront::crypto::SecretKey::random();
    let plaintext = [0x5Au8; 1024];
    let mut out = Vec::with_capacity(2048);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut ops = 0u64;
    while Instant::now() < deadline {
        out.clear();
        keyfront::crypto::seal(
            &key,
            b"keyfront/v1 aad of realistic length....",
            &plaintext,
            &mut out,
        );
        ops += 1;
    }
    ops as f64 / started.elapsed().as_secs_f64()
}

/// The local limit of the client library's envelopes: AES-256-GCM-SIV of 1 MiB in process,
/// one thread per core.
fn envelope_limit(seconds: f64) -> f64 {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let total: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(move || {
                    let key = keyfront::crypto::SecretKey::random();
                    let plaintext = vec![0x5Au8; 1 << 20];
                    let mut out = Vec::with_capacity((1 << 20) + 64);
                    let mut ops = 0u64;
                    while Instant::now() < deadline {
                        out.clear();
                        keyfront::crypto::seal(&key, b"kfe1 header", &plaintext, &mut out);
                        ops += 1;
                    }
                    ops
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("worker")).sum()
    });
    total as f64 / started.elapsed().as_secs_f64()
}

struct Row {
    operation: String,
    concurrency: usize,
    /// The transport limit measured right before, in the same round.
    transport_rate: f64,
    measurement: common::Measurement,
    unit_per_op: u64,
    /// The HSM or crypto limit, for operations that have one besides the transport.
    other_limit: Option<(String, f64)>,
}

fn main() {
    if !common::benchmarking() {
        println!("throughput: a benchmark; run it with scripts/bench.sh");
        return;
    }
    let seconds = common::seconds();

    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    dev::ensure_certificates(&certs).expect("certificates");
    let hsm = common::bench_hsm();
    let limits = Limits {
        max_concurrent_requests: 4096,
        request_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let server_config = |listen, audit: &str| ServerConfig {
        listen,
        cert: certs.join("server.crt"),
        key: certs.join("server.key"),
        client_ca: certs.join("ca.crt"),
        allow_cn_identity: false,
        node_id: "bench".into(),
        audit_path: dir.path().join(audit),
        audit_checkpoints: keyfront::audit::CheckpointPolicy::default(),
        limits,
    };
    let config = Config {
        hsm: hsm.clone(),
        hsm_retry: Duration::from_secs(1),
        data_dir: dir.path().join("data"),
        kms: KmsOptions::default(),
        server: Some(server_config(
            "127.0.0.1:0".parse().expect("addr"),
            "audit/audit.log",
        )),
        principals: vec![
            common::principal("tenant/acme/app", &["acme"], Role::App),
            common::principal("tenant/acme/backup", &["acme"], Role::Backup),
            common::principal("tenant/acme/secrets", &["acme"], Role::Secrets),
            common::principal("officer", &["*"], Role::Officer),
        ],
        metrics_listen: None,
        dual_control: Default::default(),
        revocations: Default::default(),
        access: Default::default(),
        backup: keyfront::config::Backup {
            dir: Some(dir.path().join("backups")),
            ..Default::default()
        },
    };

    // The servers get their own runtime (two workers, as `keyfront serve` has on this machine);
    // the load generator has another, so both compete for the same cores as in production.
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (keyfront_port, echo_port) = servers.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(Server::new(config.clone()).run(listener, std::future::pending()));
        let echo_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let echo_port = echo_listener.local_addr().expect("addr").port();
        let echo_server = server_config("127.0.0.1:0".parse().expect("addr"), "echo-audit.log");
        let audit = Arc::new(
            keyfront::audit::AuditLog::open(
                &echo_server.audit_path,
                "echo",
                Arc::new(keyfront::clock::SystemClock::new()),
                keyfront::audit::CheckpointPolicy::default(),
            )
            .expect("audit"),
        );
        let tls = keyfront::service::tls::server_config(
            &echo_server,
            &keyfront::config::Revocations::default(),
        )
        .expect("tls");
        let (incoming, _accepting) = keyfront::service::tls::incoming(
            echo_listener,
            keyfront::service::tls::TlsConfigs::new(tls),
            audit,
            false,
            limits,
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(KeyServiceServer::new(Echo))
                .serve_with_incoming(incoming),
        );
        (port, echo_port)
    });

    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let rows = clients.block_on(async move {
        let mut admin = AdminServiceClient::new(common::channel(&certs, keyfront_port, "officer").await);
        for _ in 0..100 {
            if admin.list_tenants(pb::ListTenantsRequest::default()).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        admin.create_tenant(pb::CreateTenantRequest { name: "acme".into(), request_id: String::new() }).await.expect("tenant");
        for (name, purpose) in [("default", pb::KeyPurpose::Data), ("secrets", pb::KeyPurpose::Secrets)] {
            admin
                .create_key(pb::CreateKeyRequest { tenant: "acme".into(), name: name.into(), purpose: purpose as i32, request_id: String::new(), ..Default::default() })
                .await
                .expect("key");
        }
        let app = KeyServiceClient::new(common::channel(&certs, keyfront_port, "acme-app").await);
        let backup = KeyServiceClient::new(common::channel(&certs, keyfront_port, "acme-backup").await);
        let secrets = KeyServiceClient::new(common::channel(&certs, keyfront_port, "acme-secrets").await);
        let echo = KeyServiceClient::new(common::channel(&certs, echo_port, "acme-app").await);
        let kib = vec![0xA5u8; 1024];
        let ciphertext = app.clone().encrypt(pb::EncryptRequest { key: "default".into(), plaintext: kib.clone(), ..Default::default() }).await.expect("encrypt").into_inner().ciphertext;
        let wrapped = backup.clone().generate_data_key(pb::GenerateDataKeyRequest { key: "default".into(), ..Default::default() }).await.expect("dk").into_inner().wrapped_key;
        admin
            .create_key(pb::CreateKeyRequest { tenant: "acme".into(), name: "mac".into(), purpose: pb::KeyPurpose::Mac as i32, algorithm: pb::KeyAlgorithm::HmacSha256 as i32, request_id: String::new() })
            .await
            .expect("MAC key");
        let mac = app.clone().generate_mac(pb::GenerateMacRequest { key: "mac".into(), data: vec![7; 32], ..Default::default() }).await.expect("mac").into_inner().mac;
        for (name, algorithm) in [("p256", pb::KeyAlgorithm::EcdsaP256Sha256), ("rsa", pb::KeyAlgorithm::RsaPss3072Sha256)] {
            admin
                .create_key(pb::CreateKeyRequest { tenant: "acme".into(), name: name.into(), purpose: pb::KeyPurpose::Sign as i32, algorithm: algorithm as i32, request_id: String::new() })
                .await
                .expect("SIGN key");
        }
        // A 32-byte message (keyfront hashes it; the raw limits sign a 32-byte digest).
        let digest = vec![7u8; 32];
        let mut signatures = HashMap::new();
        for name in ["p256", "rsa"] {
            let signed = app.clone().sign(pb::SignRequest { key: name.into(), message: digest.clone(), ..Default::default() }).await.expect("sign").into_inner();
            signatures.insert(name, signed.signature);
        }
        let sealed = secrets.clone().seal_secret(pb::SealSecretRequest { key: "secrets".into(), secret: vec![1; 32], ..Default::default() }).await.expect("seal").into_inner().sealed;

        let hsm_rate = tokio::task::spawn_blocking({
            let hsm = hsm.clone();
            move || hsm_limit(&hsm, seconds)
        })
        .await
        .expect("hsm limit");
        let hmac_rate = tokio::task::spawn_blocking({
            let hsm = hsm.clone();
            move || hmac_limit(&hsm, seconds)
        })
        .await
        .expect("HMAC limit");
        let ((ecdsa_sign, ecdsa_verify), (rsa_sign, rsa_verify)) = tokio::task::spawn_blocking({
            let hsm = hsm.clone();
            move || (signing_limits(&hsm, seconds, false), signing_limits(&hsm, seconds, true))
        })
        .await
        .expect("signing limits");
        let crypto_rate = tokio::task::spawn_blocking(move || crypto_limit(seconds)).await.expect("crypto limit");
        let envelope_rate = tokio::task::spawn_blocking(move || envelope_limit(seconds)).await.expect("envelope limit");
        println!("limits: local AES-256-GCM-SIV 1 MiB {envelope_rate:.0}/s (all cores)");
        // The client library's envelopes, as role backup (data keys).
        let envelope = {
            let client = keyfront_client::Client::connect(keyfront_client::Config::new(
                format!("https://localhost:{keyfront_port}"),
                certs.join("ca.crt"),
                certs.join("acme-backup.crt"),
                certs.join("acme-backup.key"),
            ))
            .expect("client");
            keyfront_client::Envelope::new(client, "default", &[("bucket", "bench")], keyfront_client::EnvelopeOptions::default())
        };
        let mib = vec![0x5Au8; 1 << 20];
        let sealed_mib = envelope.seal(&mib).await.expect("seal");
        println!("limits: HSM AES-GCM 32 B {hsm_rate:.0}/s; HSM HMAC-SHA-256 32 B {hmac_rate:.0}/s; HSM ECDSA P-256 sign {ecdsa_sign:.0}/s, verify {ecdsa_verify:.0}/s; HSM RSA-PSS 3072 sign {rsa_sign:.0}/s, verify {rsa_verify:.0}/s; AES-256-GCM-SIV 1 KiB {crypto_rate:.0}/s (1 thread)");
        let signing_limits = format!(
            "HSM ECDSA P-256 (raw `C_Sign`/`C_Verify` of a 32-byte digest) sign **{ecdsa_sign:.0}/s**, verify **{ecdsa_verify:.0}/s**; HSM RSA-PSS 3072 sign **{rsa_sign:.0}/s**, verify **{rsa_verify:.0}/s**"
        );

        type Call = Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<(), Status>> + Send>> + Send + Sync>;
        fn boxed<F, Fut>(f: F) -> Call
        where
            F: Fn() -> Fut + Send + Sync + 'static,
            Fut: Future<Output = Result<(), Status>> + Send + 'static,
        {
            Arc::new(move || Box::pin(f()))
        }
        fn sign_call(app: &KeyServiceClient<tonic::transport::Channel>, key: &'static str, digest: &[u8]) -> Call {
            let (client, digest) = (app.clone(), digest.to_vec());
            boxed(move || {
                let (mut client, message) = (client.clone(), digest.clone());
                async move { client.sign(pb::SignRequest { key: key.into(), message, ..Default::default() }).await.map(drop) }
            })
        }
        fn verify_call(app: &KeyServiceClient<tonic::transport::Channel>, key: &'static str, digest: &[u8], signature: &[u8]) -> Call {
            let (client, digest, signature) = (app.clone(), digest.to_vec(), signature.to_vec());
            boxed(move || {
                let (mut client, message, signature) = (client.clone(), digest.clone(), signature.clone());
                async move {
                    let answer = client.verify(pb::VerifyRequest { key: key.into(), message, signature, key_version: 1, ..Default::default() }).await?;
                    assert!(answer.get_ref().valid, "the benchmark's signature must verify");
                    Ok(())
                }
            })
        }
        let echo_call = {
            let (client, kib) = (echo.clone(), kib.clone());
            boxed(move || {
                let (mut client, kib) = (client.clone(), kib.clone());
                async move { client.encrypt(pb::EncryptRequest { plaintext: kib, ..Default::default() }).await.map(drop) }
            })
        };
        // A batch's transport limit is an echo of the same batch.
        let batch_echo_call = {
            let (client, kib) = (echo.clone(), kib.clone());
            boxed(move || {
                let mut client = client.clone();
                let items = (0..100).map(|_| pb::BatchEncryptItem { plaintext: kib.clone(), ..Default::default() }).collect();
                async move { client.batch_encrypt(pb::BatchEncryptRequest { items, ..Default::default() }).await.map(drop) }
            })
        };
        // (name, units per request, the limit besides transport, the call)
        type Operation = (&'static str, u64, Option<(&'static str, f64)>, Call);
        let operations: Vec<Operation> = vec![
            ("Encrypt 1 KiB", 1, None, {
                let (client, kib) = (app.clone(), kib.clone());
                boxed(move || {
                    let (mut client, kib) = (client.clone(), kib.clone());
                    async move { client.encrypt(pb::EncryptRequest { key: "default".into(), plaintext: kib, ..Default::default() }).await.map(drop) }
                })
            }),
            ("Decrypt 1 KiB", 1, None, {
                let (client, ct) = (app.clone(), ciphertext.clone());
                boxed(move || {
                    let (mut client, ct) = (client.clone(), ct.clone());
                    async move { client.decrypt(pb::DecryptRequest { ciphertext: ct, ..Default::default() }).await.map(drop) }
                })
            }),
            ("BatchEncrypt 100 × 1 KiB (items)", 100, Some(("crypto", crypto_rate)), {
                let (client, kib) = (app.clone(), kib.clone());
                boxed(move || {
                    let mut client = client.clone();
                    let items = (0..100).map(|_| pb::BatchEncryptItem { plaintext: kib.clone(), ..Default::default() }).collect();
                    async move { client.batch_encrypt(pb::BatchEncryptRequest { key: "default".into(), items, tenant: String::new(), grant_id: String::new() }).await.map(drop) }
                })
            }),
            ("GenerateDataKey", 1, Some(("HSM", hsm_rate)), {
                let client = backup.clone();
                boxed(move || {
                    let mut client = client.clone();
                    async move { client.generate_data_key(pb::GenerateDataKeyRequest { key: "default".into(), ..Default::default() }).await.map(drop) }
                })
            }),
            ("DecryptDataKey", 1, Some(("HSM", hsm_rate)), {
                let (client, wrapped) = (backup.clone(), wrapped.clone());
                boxed(move || {
                    let (mut client, wrapped) = (client.clone(), wrapped.clone());
                    async move { client.decrypt_data_key(pb::DecryptDataKeyRequest { wrapped_key: wrapped, ..Default::default() }).await.map(drop) }
                })
            }),
            ("SealSecret 32 B", 1, Some(("HSM", hsm_rate)), {
                let client = secrets.clone();
                boxed(move || {
                    let mut client = client.clone();
                    async move { client.seal_secret(pb::SealSecretRequest { key: "secrets".into(), secret: vec![1; 32], ..Default::default() }).await.map(drop) }
                })
            }),
            ("GenerateMac 32 B", 1, Some(("HSM HMAC", hmac_rate)), {
                let client = app.clone();
                boxed(move || {
                    let mut client = client.clone();
                    async move { client.generate_mac(pb::GenerateMacRequest { key: "mac".into(), data: vec![7; 32], ..Default::default() }).await.map(drop) }
                })
            }),
            ("VerifyMac 32 B", 1, Some(("HSM HMAC", hmac_rate)), {
                let (client, mac) = (app.clone(), mac.clone());
                boxed(move || {
                    let (mut client, mac) = (client.clone(), mac.clone());
                    async move {
                        let answer = client.verify_mac(pb::VerifyMacRequest { key: "mac".into(), data: vec![7; 32], mac, key_version: 1, ..Default::default() }).await?;
                        assert!(answer.get_ref().valid, "the benchmark's MAC must verify");
                        Ok(())
                    }
                })
            }),
            ("Sign ECDSA P-256 32 B", 1, Some(("HSM ECDSA sign", ecdsa_sign)), sign_call(&app, "p256", &digest)),
            ("Verify ECDSA P-256 32 B", 1, Some(("HSM ECDSA verify", ecdsa_verify)), verify_call(&app, "p256", &digest, &signatures["p256"])),
            ("Sign RSA-PSS 3072 32 B", 1, Some(("HSM RSA-PSS sign", rsa_sign)), sign_call(&app, "rsa", &digest)),
            ("Verify RSA-PSS 3072 32 B", 1, Some(("HSM RSA-PSS verify", rsa_verify)), verify_call(&app, "rsa", &digest, &signatures["rsa"])),
            ("Envelope seal 1 MiB (client library)", 1, Some(("local AES-GCM-SIV 1 MiB", envelope_rate)), {
                let (envelope, mib) = (envelope.clone(), Arc::new(mib.clone()));
                boxed(move || {
                    let (envelope, mib) = (envelope.clone(), Arc::clone(&mib));
                    async move { envelope.seal(&mib).await.map(drop).map_err(|e| Status::internal(e.to_string())) }
                })
            }),
            ("Envelope open 1 MiB (client library)", 1, Some(("local AES-GCM-SIV 1 MiB", envelope_rate)), {
                let (envelope, sealed) = (envelope.clone(), Arc::new(sealed_mib.clone()));
                boxed(move || {
                    let (envelope, sealed) = (envelope.clone(), Arc::clone(&sealed));
                    async move { envelope.open(&sealed).await.map(drop).map_err(|e| Status::internal(e.to_string())) }
                })
            }),
            ("UnsealSecret 32 B", 1, Some(("HSM", hsm_rate)), {
                let (client, sealed) = (secrets.clone(), sealed.clone());
                boxed(move || {
                    let (mut client, sealed) = (client.clone(), sealed.clone());
                    async move { client.unseal_secret(pb::UnsealSecretRequest { sealed, ..Default::default() }).await.map(drop) }
                })
            }),
        ];
        let rounds = common::rounds();
        let mut rows = Vec::new();
        for concurrency in concurrencies() {
            for (operation, unit, other_limit, call) in &operations {
                if !wanted(operation) {
                    continue;
                }
                // Alternate the transport limit and the operation in short rounds and keep the
                // median: the noise between runs on this machine is about ±12%.
                let mut pairs = Vec::new();
                for _ in 0..rounds {
                    let echo = if operation.starts_with("Batch") { batch_echo_call.clone() } else { echo_call.clone() };
                    let transport = common::drive(concurrency, seconds, move || echo()).await;
                    let call = call.clone();
                    let measured = common::drive(concurrency, seconds, move || call()).await;
                    pairs.push((transport, measured));
                }
                pairs.sort_by(|a, b| (a.1.rate() / a.0.rate()).total_cmp(&(b.1.rate() / b.0.rate())));
                let (transport, measured) = pairs.swap_remove(pairs.len() / 2);
                rows.push(Row {
                    operation: (*operation).to_owned(),
                    concurrency,
                    transport_rate: transport.rate(),
                    measurement: measured,
                    unit_per_op: *unit,
                    other_limit: other_limit.map(|(name, rate)| (name.to_owned(), rate)),
                });
            }
        }
        // Encrypt while snapshots are taken back to back (issue 7): the server keeps serving.
        let mut snapshot_note = String::new();
        const SNAPSHOT_ROW: &str = "Encrypt 1 KiB, snapshots running";
        if wanted(SNAPSHOT_ROW) {
            const TENANTS: usize = 200;
            for i in 0..TENANTS {
                let name = format!("tenant-{i:03}");
                admin.create_tenant(pb::CreateTenantRequest { name: name.clone(), request_id: String::new() }).await.expect("tenant");
                admin
                    .create_key(pb::CreateKeyRequest { tenant: name, name: "default".into(), purpose: pb::KeyPurpose::Data as i32, request_id: String::new(), ..Default::default() })
                    .await
                    .expect("key");
            }
            let encrypt = operations[0].3.clone();
            let (mut taken, mut spent) = (0u32, Duration::ZERO);
            for concurrency in concurrencies() {
                let mut pairs = Vec::new();
                for _ in 0..rounds {
                    let echo = echo_call.clone();
                    let transport = common::drive(concurrency, seconds, move || echo()).await;
                    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let snapshots = tokio::spawn({
                        let (mut admin, stop) = (admin.clone(), Arc::clone(&stop));
                        async move {
                            let (mut n, mut spent) = (0u32, Duration::ZERO);
                            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                                let started = Instant::now();
                                admin.create_backup(pb::CreateBackupRequest::default()).await.expect("snapshot");
                                spent += started.elapsed();
                                n += 1;
                            }
                            (n, spent)
                        }
                    });
                    let call = encrypt.clone();
                    let measured = common::drive(concurrency, seconds, move || call()).await;
                    stop.store(true, std::sync::atomic::Ordering::SeqCst);
                    let (n, time) = snapshots.await.expect("snapshots");
                    taken += n;
                    spent += time;
                    pairs.push((transport, measured));
                }
                pairs.sort_by(|a, b| (a.1.rate() / a.0.rate()).total_cmp(&(b.1.rate() / b.0.rate())));
                let (transport, measured) = pairs.swap_remove(pairs.len() / 2);
                rows.push(Row {
                    operation: SNAPSHOT_ROW.to_owned(),
                    concurrency,
                    transport_rate: transport.rate(),
                    measurement: measured,
                    unit_per_op: 1,
                    other_limit: None,
                });
            }
            snapshot_note = format!(
                " The \"{SNAPSHOT_ROW}\" rows ran Encrypt while CreateBackup took snapshots of {} tenants back to back: {taken} snapshots, {:.0} ms each on average (each written, fsynced and read back to verify).",
                TENANTS + 1,
                spent.as_secs_f64() * 1000.0 / f64::from(taken.max(1))
            );
        }
        (rows, hsm_rate, hmac_rate, crypto_rate, snapshot_note, signing_limits)
    });
    let (rows, hsm_rate, hmac_rate, crypto_rate, snapshot_note, signing_limits) = rows;
    let rounds = common::rounds();

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| operation | concurrency | ops/s | p50 ms | p99 ms | p99.9 ms | transport limit ops/s | × transport | × other limit |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for row in &rows {
        let rate = row.measurement.rate() * row.unit_per_op as f64;
        let requests = row.measurement.rate();
        let other = row
            .other_limit
            .as_ref()
            .map_or(String::from("—"), |(name, limit)| {
                format!("{:.2} × {name}", rate / limit)
            });
        let _ = writeln!(
            table,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {} |",
            row.operation,
            row.concurrency,
            rate,
            row.measurement.quantile_ms(0.5),
            row.measurement.quantile_ms(0.99),
            row.measurement.quantile_ms(0.999),
            row.transport_rate,
            requests / row.transport_rate,
            other
        );
    }
    let metrics = keyfront::metrics::global().encode();
    let counter = |needle: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let audit_mean_us = 1e6 * counter("keyfront_audit_write_duration_seconds_sum")
        / counter("keyfront_audit_write_duration_seconds_count").max(1.0);
    let hits = counter("keyfront_cache_requests_total{cache=\"bulk_key\",result=\"hit\"}");
    let misses = counter("keyfront_cache_requests_total{cache=\"bulk_key\",result=\"miss\"}");
    let mut hsm_ops: HashMap<&str, f64> = HashMap::new();
    for op in ["encrypt", "decrypt", "random", "unwrap_kek", "hmac"] {
        hsm_ops.insert(
            op,
            counter(&format!(
                "keyfront_hsm_operations_total{{op=\"{op}\",outcome=\"ok\"}}"
            )),
        );
    }
    let machine = common::machine();
    let report = format!(
        "Command: `scripts/bench.sh throughput` ({seconds} s per cell). Machine: {machine}.\n\n\
         Limits measured in the same run: HSM (raw SoftHSM AES-GCM encrypt of 32 B through cryptoki, \
         one session per core, session-object key) **{hsm_rate:.0}/s**; HSM HMAC (raw SoftHSM \
         HMAC-SHA-256 `C_Sign` of 32 B, the same way) **{hmac_rate:.0}/s**; {signing_limits}; crypto (AES-256-GCM-SIV of 1 KiB, \
         one thread) **{crypto_rate:.0}/s**; transport (bare tonic echo of the same request, \
         1 KiB or a batch of 100 × 1 KiB, same TLS 1.3 mutual-auth acceptor), measured right before each operation in alternating rounds; each row is the round \
         with the median ratio of {rounds} (`× transport` compares requests/s).\n\n{table}\n\
         From /metrics after the run: bulk-key cache {hits:.0} hits / {misses:.0} misses; mean audit \
         write {audit_mean_us:.1} µs per line; HSM operations {:?}.{snapshot_note}\n",
        hsm_ops
    );
    println!("\n{report}");
    common::write_report("throughput", &report);
}
