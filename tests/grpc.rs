//! The gRPC API over real TLS sockets against real SoftHSM: every RPC, the role × RPC matrix,
//! tenant isolation, refused clients, bad input, HSM outage, and the audit log.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keyfront::cli::dev;
use keyfront::config::{Config, Limits, PrincipalConfig, Role, ServerConfig, TenantScope};
use keyfront::hsm::Hsm;
use keyfront::hsm::faulty::FaultyHsm;
use keyfront::hsm::pkcs11::Pkcs11Hsm;
use keyfront::kms::KmsOptions;
use keyfront::service::pb::access_service_client::AccessServiceClient;
use keyfront::service::pb::admin_service_client::AdminServiceClient;
use keyfront::service::pb::key_service_client::KeyServiceClient;
use keyfront::service::{Server, pb};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const PLAINTEXT_MARKER: &[u8] = b"MARKER-plaintext-7c1f";
const SECRET_MARKER: &[u8] = b"MARKER-secret-9a2b";
const CONTEXT_MARKER: &str = "MARKER-context-4d8e";

struct Harness {
    addr: SocketAddr,
    metrics: SocketAddr,
    dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), keyfront::service::ServeError>>,
    hsm: Arc<FaultyHsm<Pkcs11Hsm>>,
    reachable: Arc<AtomicBool>,
    #[cfg(feature = "test-hooks")]
    clock: Arc<keyfront::clock::TestClock>,
    #[cfg(feature = "test-hooks")]
    token: keyfront::hsm::pkcs11::Pkcs11Config,
    #[cfg(feature = "test-hooks")]
    audit_failure: Arc<AtomicBool>,
}

fn principal(
    identity: &str,
    tenants: &[&str],
    roles: &[Role],
    keys: Option<&[&str]>,
) -> PrincipalConfig {
    let names =
        |items: &[&str]| -> Vec<_> { items.iter().map(|t| t.parse().expect("name")).collect() };
    PrincipalConfig {
        identity: format!("{}/{identity}", dev::TRUST_DOMAIN),
        tenants: if tenants == ["*"] {
            TenantScope::All
        } else {
            TenantScope::Only(names(tenants).into_iter().collect())
        },
        roles: roles.to_vec(),
        keys: keys.map(names),
    }
}

impl Harness {
    /// A server on 127.0.0.1:0 with the dev principals plus a few for negative tests, tenants
    /// acme and globex with keys default (DATA) and secrets (SECRETS). With `start_down`, the
    /// HSM is unreachable until [`Harness::set_reachable`].
    async fn start(start_down: bool) -> Self {
        Self::start_with(start_down, |_, _| {}).await
    }

    /// [`Harness::start`] with adjusted limits and domain options.
    async fn start_with(
        start_down: bool,
        adjust: impl FnOnce(&mut Limits, &mut KmsOptions),
    ) -> Self {
        Self::start_configured(start_down, adjust, |_| {}).await
    }

    /// [`Harness::start_with`], then `configure` sees the whole config before the start.
    async fn start_configured(
        start_down: bool,
        adjust: impl FnOnce(&mut Limits, &mut KmsOptions),
        configure: impl FnOnce(&mut Config),
    ) -> Self {
        let token = common::initialized_token("grpc");
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        dev::ensure_certificates(&certs).expect("dev certificates");
        let extra = format!("{}/tenant/acme/limited", dev::TRUST_DOMAIN);
        dev::issue_client_certificate(&certs, "acme-limited", &[&extra], "limited").expect("cert");
        let two = [
            format!("{}/tenant/acme/app", dev::TRUST_DOMAIN),
            format!("{}/other", dev::TRUST_DOMAIN),
        ];
        dev::issue_client_certificate(&certs, "two-uris", &[&two[0], &two[1]], "two")
            .expect("cert");
        let stranger = format!("{}/stranger", dev::TRUST_DOMAIN);
        dev::issue_client_certificate(&certs, "stranger", &[&stranger], "stranger").expect("cert");
        dev::issue_client_certificate(&certs, "cn-only", &[], "cn-only").expect("cert");
        let second = format!("{}/officer-2", dev::TRUST_DOMAIN);
        dev::issue_client_certificate(&certs, "officer-2", &[&second], "officer-2").expect("cert");
        let support_2 = format!("{}/support-2", dev::TRUST_DOMAIN);
        dev::issue_client_certificate(&certs, "support-2", &[&support_2], "support-2")
            .expect("cert");

        let mut principals = vec![
            principal("tenant/acme/app", &["acme"], &[Role::App], None),
            principal("tenant/acme/backup", &["acme"], &[Role::Backup], None),
            principal("tenant/acme/secrets", &["acme"], &[Role::Secrets], None),
            principal("tenant/globex/app", &["globex"], &[Role::App], None),
            principal("backup", &["acme", "globex"], &[Role::Backup], None),
            principal("officer", &["*"], &[Role::Officer], None),
            principal("officer-2", &["*"], &[Role::Officer], None),
            principal("tenant/acme/admin", &["acme"], &[Role::TenantAdmin], None),
            principal(
                "tenant/globex/admin",
                &["globex"],
                &[Role::TenantAdmin],
                None,
            ),
            principal("support", &["*"], &[Role::Support], None),
            principal("support-2", &["*"], &[Role::Support], None),
            principal("auditor", &["*"], &[Role::Auditor], None),
            principal(
                "tenant/acme/limited",
                &["acme"],
                &[Role::App],
                Some(&["other"]),
            ),
        ];
        principals.push(PrincipalConfig {
            identity: "cn-only".into(),
            ..principal("x", &["acme"], &[Role::App], None)
        });
        let mut limits = Limits {
            max_message_bytes: 64 * 1024,
            max_batch_items: 10,
            max_context_pairs: 8,
            max_context_bytes: 512,
            max_concurrent_requests: 64,
            request_timeout: Duration::from_secs(10),
            max_concurrent_password_hashes: 2,
            ..Limits::default()
        };
        let mut kms = KmsOptions::default();
        adjust(&mut limits, &mut kms);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config = Config {
            hsm: token.clone(),
            hsm_retry: Duration::from_millis(100),
            data_dir: dir.path().join("data"),
            kms,
            server: Some(ServerConfig {
                listen: addr,
                cert: certs.join("server.crt"),
                key: certs.join("server.key"),
                client_ca: certs.join("ca.crt"),
                allow_cn_identity: false,
                node_id: "test".into(),
                audit_path: dir.path().join("audit/audit.log"),
                // Small, so a test run's log holds several signed checkpoints.
                audit_checkpoints: keyfront::audit::CheckpointPolicy {
                    lines: 25,
                    interval: Duration::from_secs(60),
                },
                limits,
            }),
            principals,
            metrics_listen: None,
            dual_control: Default::default(),
            revocations: Default::default(),
            access: Default::default(),
            backup: keyfront::config::Backup {
                dir: Some(dir.path().join("backups")),
                ..Default::default()
            },
        };
        configure(&mut config);
        let audit_on_full_device = config
            .server
            .as_ref()
            .is_some_and(|s| s.audit_path == std::path::Path::new("/dev/full"));
        let hsm = Arc::new(FaultyHsm::new(common::open_hsm(&token)));
        let reachable = Arc::new(AtomicBool::new(!start_down));
        let connector = {
            let hsm = Arc::clone(&hsm);
            let reachable = Arc::clone(&reachable);
            Arc::new(move || {
                if reachable.load(Ordering::SeqCst) {
                    Ok(Arc::clone(&hsm) as Arc<dyn Hsm>)
                } else {
                    Err(keyfront::hsm::Error::TokenNotFound(
                        "unreachable in this test".into(),
                    ))
                }
            })
        };
        let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind metrics");
        let metrics = metrics_listener.local_addr().expect("metrics addr");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server = Server::new(config)
            .with_hsm_connector(connector)
            .with_metrics_listener(metrics_listener);
        #[cfg(feature = "test-hooks")]
        let clock = Arc::new(keyfront::clock::TestClock::default());
        #[cfg(feature = "test-hooks")]
        let server = server.with_clock(Arc::clone(&clock) as Arc<dyn keyfront::clock::Clock>);
        #[cfg(feature = "test-hooks")]
        let audit_failure = Arc::new(AtomicBool::new(false));
        #[cfg(feature = "test-hooks")]
        let server = server.with_audit_failure(Arc::clone(&audit_failure));
        let server = tokio::spawn(server.run(listener, async move {
            let _ = rx.await;
        }));
        let harness = Self {
            addr,
            metrics,
            dir,
            shutdown: Some(tx),
            server,
            hsm,
            reachable,
            #[cfg(feature = "test-hooks")]
            clock,
            #[cfg(feature = "test-hooks")]
            token: token.clone(),
            #[cfg(feature = "test-hooks")]
            audit_failure,
        };
        // An audit log on a full device refuses everything, the setup requests too.
        if !start_down && !audit_on_full_device {
            harness.wait_for(ServingStatus::Serving).await;
            harness.create_tenants().await;
        }
        harness
    }

    fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    async fn channel(&self, name: &str) -> Channel {
        self.try_channel(name, true).await.expect("connect")
    }

    async fn try_channel(
        &self,
        name: &str,
        with_identity: bool,
    ) -> Result<Channel, tonic::transport::Error> {
        let certs = self.certs();
        let read = |file: &str| std::fs::read(certs.join(file)).expect("read cert");
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.crt")))
            .domain_name("localhost");
        if with_identity {
            tls = tls.identity(Identity::from_pem(
                read(&format!("{name}.crt")),
                read(&format!("{name}.key")),
            ));
        }
        Channel::from_shared(format!("https://{}", self.addr))
            .expect("uri")
            .tls_config(tls)?
            .connect()
            .await
    }

    async fn keys(&self, name: &str) -> KeyServiceClient<Channel> {
        KeyServiceClient::new(self.channel(name).await)
    }

    async fn access(&self, name: &str) -> AccessServiceClient<Channel> {
        AccessServiceClient::new(self.channel(name).await)
    }

    async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel("officer").await)
    }

    async fn health(&self) -> Option<i32> {
        let mut client = HealthClient::new(self.channel("officer").await);
        client
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()
            .map(|r| r.into_inner().status)
    }

    async fn wait_for(&self, status: ServingStatus) {
        for _ in 0..200 {
            if self.health().await == Some(status as i32) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("health never became {status:?}");
    }

    fn set_reachable(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::SeqCst);
    }

    async fn create_tenants(&self) {
        let mut admin = self.admin().await;
        for tenant in ["acme", "globex"] {
            admin
                .create_tenant(pb::CreateTenantRequest {
                    name: tenant.into(),
                    request_id: String::new(),
                })
                .await
                .expect("create tenant");
            for (key, purpose) in [
                ("default", pb::KeyPurpose::Data),
                ("secrets", pb::KeyPurpose::Secrets),
            ] {
                admin
                    .create_key(pb::CreateKeyRequest {
                        tenant: tenant.into(),
                        name: key.into(),
                        purpose: purpose as i32,
                        request_id: String::new(),
                        ..Default::default()
                    })
                    .await
                    .expect("create key");
            }
        }
    }

    /// Every audit line, across rotated files (a test clock may cross midnight).
    fn audit_lines(&self) -> Vec<serde_json::Value> {
        audit_files(&self.dir.path().join("audit"))
            .iter()
            .flat_map(|file| {
                std::fs::read_to_string(file)
                    .unwrap_or_default()
                    .lines()
                    .map(|l| serde_json::from_str(l).expect("audit lines are JSON"))
                    .collect::<Vec<serde_json::Value>>()
            })
            .collect()
    }

    async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.server)
            .await
            .expect("server stops")
            .expect("task")
            .expect("clean shutdown");
        self.dir
    }
}

/// The audit files in `dir`, oldest first: rotated `audit.log.DAY[.n]`, then the live file.
fn audit_files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut rotated: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("audit.log."))
                })
                .collect()
        })
        .unwrap_or_default();
    rotated.sort();
    rotated.push(dir.join("audit.log"));
    rotated
}

fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn code<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

async fn encrypt(client: &mut KeyServiceClient<Channel>, plaintext: &[u8]) -> pb::EncryptResponse {
    client
        .encrypt(pb::EncryptRequest {
            key: "default".into(),
            plaintext: plaintext.to_vec(),
            context: ctx(&[("row", CONTEXT_MARKER)]),
            plaintext_crc32c: Some(crc32c::crc32c(plaintext)),
            tenant: String::new(),
            grant_id: String::new(),
        })
        .await
        .expect("encrypt")
        .into_inner()
}

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
    let reused = admin
        .create_key(pb::CreateKeyRequest {
            tenant: "acme".into(),
            name: "other".into(),
            purpose: pb::KeyPurpose::Data as i32,
            request_id: "rot-1".into(),
            ..Default::default()
        })
        .await
        .expect_err("request_id of another call");
    assert_eq!(reused.code(), Code::FailedPrecondition);
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

/// Calls `rpc` as `principal` with a request that is valid for a caller allowed to make it.
async fn call(h: &Harness, principal: &str, rpc: &str, blobs: &Blobs) -> Code {
    let channel = h.channel(principal).await;
    let mut keys = KeyServiceClient::new(channel.clone());
    let mut admin = AdminServiceClient::new(channel);
    let data = |key: &str| (key.to_owned(), String::new());
    let (key, tenant) = data("default");
    match rpc {
        "Encrypt" => code(
            keys.encrypt(pb::EncryptRequest {
                key,
                plaintext: b"x".to_vec(),
                tenant,
                ..Default::default()
            })
            .await,
        ),
        "Decrypt" => code(
            keys.decrypt(pb::DecryptRequest {
                ciphertext: blobs.ciphertext.clone(),
                ..Default::default()
            })
            .await,
        ),
        "BatchEncrypt" => code(
            keys.batch_encrypt(pb::BatchEncryptRequest {
                key,
                items: vec![],
                tenant,
                grant_id: String::new(),
            })
            .await,
        ),
        "BatchDecrypt" => code(
            keys.batch_decrypt(pb::BatchDecryptRequest {
                key: String::new(),
                items: vec![],
                tenant,
                grant_id: String::new(),
            })
            .await,
        ),
        "GenerateDataKey" => code(
            keys.generate_data_key(pb::GenerateDataKeyRequest {
                key,
                ..Default::default()
            })
            .await,
        ),
        "DecryptDataKey" => code(
            keys.decrypt_data_key(pb::DecryptDataKeyRequest {
                wrapped_key: blobs.data_key.clone(),
                ..Default::default()
            })
            .await,
        ),
        "SealSecret" => code(
            keys.seal_secret(pb::SealSecretRequest {
                key: "secrets".into(),
                secret: b"s".to_vec(),
                ..Default::default()
            })
            .await,
        ),
        "UnsealSecret" => code(
            keys.unseal_secret(pb::UnsealSecretRequest {
                sealed: blobs.sealed.clone(),
                ..Default::default()
            })
            .await,
        ),
        "GenerateMac" => code(
            keys.generate_mac(pb::GenerateMacRequest {
                key: "mac".into(),
                data: b"m".to_vec(),
                ..Default::default()
            })
            .await,
        ),
        "VerifyMac" => code(
            keys.verify_mac(pb::VerifyMacRequest {
                key: "mac".into(),
                data: b"m".to_vec(),
                mac: blobs.mac.clone(),
                ..Default::default()
            })
            .await,
        ),
        "Sign" => code(
            keys.sign(pb::SignRequest {
                key: "signer".into(),
                message: b"m".to_vec(),
                ..Default::default()
            })
            .await,
        ),
        "Verify" => code(
            keys.verify(pb::VerifyRequest {
                key: "signer".into(),
                message: b"m".to_vec(),
                signature: blobs.signature.clone(),
                ..Default::default()
            })
            .await,
        ),
        "GetPublicKey" => code(
            keys.get_public_key(pb::GetPublicKeyRequest {
                key: "signer".into(),
                ..Default::default()
            })
            .await,
        ),
        "CreateTenant" => code(
            admin
                .create_tenant(pb::CreateTenantRequest {
                    name: format!("n{:08x}", rand::random::<u32>()),
                    request_id: String::new(),
                })
                .await,
        ),
        "ListTenants" => code(admin.list_tenants(pb::ListTenantsRequest::default()).await),
        "CreateKey" => code(
            admin
                .create_key(pb::CreateKeyRequest {
                    tenant: "acme".into(),
                    name: format!("k{:08x}", rand::random::<u32>()),
                    purpose: pb::KeyPurpose::Data as i32,
                    request_id: String::new(),
                    ..Default::default()
                })
                .await,
        ),
        "GetKey" => code(
            admin
                .get_key(pb::GetKeyRequest {
                    tenant: "acme".into(),
                    name: "default".into(),
                })
                .await,
        ),
        "ListKeys" => code(
            admin
                .list_keys(pb::ListKeysRequest {
                    tenant: "acme".into(),
                    ..Default::default()
                })
                .await,
        ),
        "RotateKey" => code(
            admin
                .rotate_key(pb::RotateKeyRequest {
                    tenant: "acme".into(),
                    name: "secrets".into(),
                    request_id: String::new(),
                })
                .await,
        ),
        "ReEncrypt" => code(
            keys.re_encrypt(pb::ReEncryptRequest {
                ciphertext: blobs.ciphertext.clone(),
                ..Default::default()
            })
            .await,
        ),
        "ReEncryptDataKey" => code(
            keys.re_encrypt_data_key(pb::ReEncryptDataKeyRequest {
                wrapped_key: blobs.data_key.clone(),
                ..Default::default()
            })
            .await,
        ),
        "UpdateKeyPolicy" => code(
            admin
                .update_key_policy(pb::UpdateKeyPolicyRequest {
                    tenant: "acme".into(),
                    name: "default".into(),
                    rotation_period_seconds: Some(86_400),
                    ..Default::default()
                })
                .await,
        ),
        // Disable and Enable run in this order on default's primary; Schedule and Cancel on
        // secrets v1, which RotateKey (run before them) made non-primary.
        "DisableKeyVersion" | "EnableKeyVersion" => {
            let request = pb::KeyVersionRequest {
                tenant: "acme".into(),
                name: "default".into(),
                version: 1,
                request_id: String::new(),
            };
            code(if rpc == "DisableKeyVersion" {
                admin.disable_key_version(request).await
            } else {
                admin.enable_key_version(request).await
            })
        }
        "ScheduleKeyVersionDestruction" | "CancelKeyVersionDestruction" => {
            let request = pb::KeyVersionRequest {
                tenant: "acme".into(),
                name: "secrets".into(),
                version: 1,
                request_id: String::new(),
            };
            code(if rpc == "ScheduleKeyVersionDestruction" {
                admin.schedule_key_version_destruction(request).await
            } else {
                admin.cancel_key_version_destruction(request).await
            })
        }
        // In this order: globex is scheduled, then restored.
        "DestroyTenant" => code(
            admin
                .destroy_tenant(pb::DestroyTenantRequest {
                    name: "globex".into(),
                    request_id: String::new(),
                })
                .await,
        ),
        "CancelTenantDestruction" => code(
            admin
                .cancel_tenant_destruction(pb::CancelTenantDestructionRequest {
                    name: "globex".into(),
                    request_id: String::new(),
                })
                .await,
        ),
        "GetMasterKeyStatus" => code(
            admin
                .get_master_key_status(pb::GetMasterKeyStatusRequest {})
                .await,
        ),
        "ListApprovals" => code(
            admin
                .list_approvals(pb::ListApprovalsRequest::default())
                .await,
        ),
        "GetBackupStatus" => code(admin.get_backup_status(pb::GetBackupStatusRequest {}).await),
        "GetImportParameters" => code(
            admin
                .get_import_parameters(pb::GetImportParametersRequest {
                    tenant: "acme".into(),
                    name: format!("i{:08x}", rand::random::<u32>()),
                    wrapping_algorithm: pb::WrappingAlgorithm::RsaesOaepSha1 as i32,
                })
                .await,
        ),
        // Parameters made by the officer; the principal imports for them.
        "ImportKeyMaterial" => {
            let name = format!("i{:08x}", rand::random::<u32>());
            let (token, wrapped) =
                wrapped_for_import(h, &name, pb::WrappingAlgorithm::RsaesOaepSha1, &[7; 32]).await;
            code(
                admin
                    .import_key_material(pb::ImportKeyMaterialRequest {
                        tenant: "acme".into(),
                        name,
                        import_token: token,
                        encrypted_key_material: wrapped,
                        purpose: pb::KeyPurpose::Data as i32,
                        ..Default::default()
                    })
                    .await,
            )
        }
        other => panic!("unknown rpc {other}"),
    }
}

struct Blobs {
    ciphertext: Vec<u8>,
    data_key: Vec<u8>,
    sealed: Vec<u8>,
    mac: Vec<u8>,
    signature: Vec<u8>,
}

/// New import parameters (made by the officer) for acme's key `name`, and `material` wrapped
/// for them as a key owner would.
async fn wrapped_for_import(
    h: &Harness,
    name: &str,
    algorithm: pb::WrappingAlgorithm,
    material: &[u8],
) -> (String, Vec<u8>) {
    let parameters = h
        .admin()
        .await
        .get_import_parameters(pb::GetImportParametersRequest {
            tenant: "acme".into(),
            name: name.into(),
            wrapping_algorithm: algorithm as i32,
        })
        .await
        .expect("import parameters")
        .into_inner();
    let wrapping = match algorithm {
        pb::WrappingAlgorithm::RsaesOaepSha1 => keyfront::hsm::ImportWrapping::RsaesOaepSha1,
        pb::WrappingAlgorithm::RsaAesKeyWrapSha1 => {
            keyfront::hsm::ImportWrapping::RsaAesKeyWrapSha1
        }
        other => panic!("{other:?}"),
    };
    let wrapped =
        keyfront::crypto::import::wrap_for_import(&parameters.public_key_der, wrapping, material)
            .expect("wrap");
    (parameters.import_token, wrapped)
}

/// Creates acme's SIGN key `name`.
async fn create_signing_key(h: &Harness, name: &str, algorithm: pb::KeyAlgorithm) -> pb::Key {
    h.admin()
        .await
        .create_key(pb::CreateKeyRequest {
            tenant: "acme".into(),
            name: name.into(),
            purpose: pb::KeyPurpose::Sign as i32,
            algorithm: algorithm as i32,
            request_id: String::new(),
        })
        .await
        .expect("create SIGN key")
        .into_inner()
}

/// Creates acme's MAC key `mac` (HMAC-SHA-256).
async fn create_mac_key(h: &Harness, name: &str, algorithm: pb::KeyAlgorithm) -> pb::Key {
    h.admin()
        .await
        .create_key(pb::CreateKeyRequest {
            tenant: "acme".into(),
            name: name.into(),
            purpose: pb::KeyPurpose::Mac as i32,
            algorithm: algorithm as i32,
            request_id: String::new(),
        })
        .await
        .expect("create MAC key")
        .into_inner()
}

async fn blobs(h: &Harness) -> Blobs {
    create_mac_key(h, "mac", pb::KeyAlgorithm::HmacSha256).await;
    let mac = h
        .keys("acme-app")
        .await
        .generate_mac(pb::GenerateMacRequest {
            key: "mac".into(),
            data: b"m".to_vec(),
            ..Default::default()
        })
        .await
        .expect("mac")
        .into_inner()
        .mac;
    let ciphertext = h
        .keys("acme-app")
        .await
        .encrypt(pb::EncryptRequest {
            key: "default".into(),
            plaintext: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .expect("encrypt")
        .into_inner()
        .ciphertext;
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
    let sealed = h
        .keys("acme-secrets")
        .await
        .seal_secret(pb::SealSecretRequest {
            key: "secrets".into(),
            secret: b"s".to_vec(),
            ..Default::default()
        })
        .await
        .expect("seal")
        .into_inner()
        .sealed;
    create_signing_key(h, "signer", pb::KeyAlgorithm::EcdsaP256Sha256).await;
    let signature = h
        .keys("acme-app")
        .await
        .sign(pb::SignRequest {
            key: "signer".into(),
            message: b"m".to_vec(),
            ..Default::default()
        })
        .await
        .expect("sign")
        .into_inner()
        .signature;
    Blobs {
        ciphertext,
        data_key,
        sealed,
        mac,
        signature,
    }
}

const RPCS: [&str; 33] = [
    "Encrypt",
    "GenerateMac",
    "VerifyMac",
    "Sign",
    "Verify",
    "GetPublicKey",
    "Decrypt",
    "BatchEncrypt",
    "BatchDecrypt",
    "GenerateDataKey",
    "DecryptDataKey",
    "SealSecret",
    "UnsealSecret",
    "CreateTenant",
    "ListTenants",
    "CreateKey",
    "GetKey",
    "ListKeys",
    "RotateKey",
    "ReEncrypt",
    "ReEncryptDataKey",
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
];

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
        let status = globex
            .encrypt(pb::EncryptRequest {
                key: key.into(),
                tenant: "acme".into(),
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::PermissionDenied);
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
    let status = globex
        .decrypt(pb::DecryptRequest {
            ciphertext: acme_ciphertext,
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied);
    // Admin calls are not for apps at all.
    let status = AdminServiceClient::new(h.channel("globex-app").await)
        .list_keys(pb::ListKeysRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied);
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
        let status = backup
            .decrypt_data_key(pb::DecryptDataKeyRequest {
                wrapped_key: dk.wrapped_key,
                tenant: other.into(),
                ..Default::default()
            })
            .await
            .expect_err("another tenant's data key");
        assert_eq!(status.code(), Code::InvalidArgument);
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

async fn tls12_handshake(h: &Harness) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let certs = h.certs();
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(certs.join("ca.crt")).expect("ca") {
        roots.add(ca.expect("ca")).expect("add");
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(certs.join("acme-app.crt"))
        .expect("crt")
        .map(|c| c.expect("crt"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(certs.join("acme-app.key")).expect("key");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .expect("tls12")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client auth");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(h.addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").expect("name");
    connector
        .connect(name, tcp)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

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
    let crc = app
        .encrypt(pb::EncryptRequest {
            key: "default".into(),
            plaintext: b"abc".to_vec(),
            plaintext_crc32c: Some(0),
            ..Default::default()
        })
        .await
        .expect_err("crc");
    assert_eq!(crc.code(), Code::InvalidArgument);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_outage_is_unavailable_and_recovers_without_restart() {
    let h = Harness::start(true).await;
    // Started while the HSM is unreachable: not serving, data calls UNAVAILABLE.
    assert_eq!(h.health().await, Some(ServingStatus::NotServing as i32));
    let status = h
        .keys("acme-app")
        .await
        .encrypt(pb::EncryptRequest {
            key: "default".into(),
            ..Default::default()
        })
        .await
        .expect_err("not yet");
    assert_eq!(status.code(), Code::Unavailable);
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
    let status = backup
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "default".into(),
            ..Default::default()
        })
        .await
        .expect_err("needs the HSM");
    assert_eq!(status.code(), Code::Unavailable);
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

/// GET /metrics with a minimal HTTP/1.0 request.
async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
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

/// The domain on a stopped server's data directory. The server's last references go
/// asynchronously and sled locks its files, so this retries for a few seconds.
#[cfg(feature = "test-hooks")]
async fn reopen(hsm: Arc<dyn Hsm>, dir: &std::path::Path) -> keyfront::kms::Kms {
    for _ in 0..50 {
        match keyfront::kms::Kms::open(Arc::clone(&hsm), &dir.join("data"), KmsOptions::default()) {
            Ok(kms) => return kms,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("cannot reopen the data directory");
}

fn reason(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    status.get_details_error_info().map(|info| info.reason)
}

#[cfg(feature = "test-hooks")]
fn expect_precondition(result: Result<impl std::fmt::Debug, tonic::Status>, wanted: &str) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status).as_deref(), Some(wanted), "{status:?}");
}

/// The key lifecycle over gRPC against SoftHSM (issue 5, story 1): versions, ReEncrypt,
/// min_decryption_version, disable/enable, schedule/cancel, destruction after the window with a
/// test clock, data keys alike, and a restart.
#[cfg(feature = "test-hooks")]
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
    let denied = backup
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext: v1.ciphertext.clone(),
            ..Default::default()
        })
        .await
        .expect_err("backup may not re-encrypt");
    assert_eq!(denied.code(), Code::PermissionDenied);

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
    let above = admin
        .update_key_policy(policy(3))
        .await
        .expect_err("above primary");
    assert_eq!(above.code(), Code::InvalidArgument);
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
#[cfg(feature = "test-hooks")]
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

#[cfg(feature = "test-hooks")]
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// DestroyTenant over gRPC (issue 5, story 2): refused at once, restorable until the window
/// ends, then crypto-shredded: directory gone, its ciphertexts and data keys undecryptable even
/// with an old copy of its database put back; other tenants untouched.
#[cfg(feature = "test-hooks")]
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
    let status = globex
        .decrypt(pb::DecryptRequest {
            ciphertext: ciphertext.clone(),
            context: ctx(&[("row", CONTEXT_MARKER)]),
            ..Default::default()
        })
        .await
        .expect_err("destroyed");
    assert_eq!(status.code(), Code::NotFound);
    let status = backup
        .decrypt_data_key(pb::DecryptDataKeyRequest {
            wrapped_key: data_key.clone(),
            tenant: "globex".into(),
            ..Default::default()
        })
        .await
        .expect_err("destroyed");
    assert_eq!(status.code(), Code::NotFound);
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
#[cfg(feature = "test-hooks")]
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
#[cfg(feature = "test-hooks")]
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
#[cfg(feature = "test-hooks")]
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

    let status = officer
        .destroy_tenant(pb::DestroyTenantRequest {
            name: "globex".into(),
            request_id: String::new(),
        })
        .await
        .expect_err("waits for approval");
    assert_eq!(status.code(), Code::FailedPrecondition);
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
    let own = officer
        .approve_operation(pb::ApproveOperationRequest {
            approval_id: id.clone(),
        })
        .await
        .expect_err("not the requester");
    assert_eq!(own.code(), Code::PermissionDenied);
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
#[cfg(feature = "test-hooks")]
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
    let denied = harness
        .keys("acme-app")
        .await
        .hash_password(pb::HashPasswordRequest {
            key: "secrets".into(),
            password: b"x".to_vec(),
            tenant: String::new(),
            grant_id: String::new(),
        })
        .await
        .expect_err("role");
    assert_eq!(denied.code(), Code::PermissionDenied);

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
    let status = secrets
        .hash_password(pb::HashPasswordRequest {
            key: "secrets".into(),
            password: Vec::new(),
            tenant: String::new(),
            grant_id: String::new(),
        })
        .await
        .expect_err("empty password");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = secrets
        .verify_password(pb::VerifyPasswordRequest {
            key: "secrets".into(),
            password: b"x".to_vec(),
            hash: "$argon2id$v=19$m=4194304,t=1,p=1,pv=1$AAAA$AAAA".into(),
            tenant: String::new(),
            grant_id: String::new(),
        })
        .await
        .expect_err("crafted hash");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = secrets
        .lookup_digest(pb::LookupDigestRequest {
            secret: Vec::new(),
            tenant: String::new(),
            grant_id: String::new(),
        })
        .await
        .expect_err("empty secret");
    assert_eq!(status.code(), Code::InvalidArgument);
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

#[cfg(feature = "test-hooks")]
fn grant_lines(h: &Harness, grant: &str) -> Vec<(String, String, String)> {
    h.audit_lines()
        .iter()
        .filter(|l| l["grant_id"] == grant)
        .map(|l| {
            let field = |name: &str| l[name].as_str().unwrap_or_default().to_owned();
            (
                field("kind"),
                field("rpc")
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
                field("outcome"),
            )
        })
        .collect()
}

/// The consent story (issue 6): support is refused without a grant; it asks; the wrong
/// tenant's admin and the requester cannot approve; acme's admin approves; support decrypts
/// under the grant, exactly what it names; expiry and revocation end it; each step is audited
/// with the grant id.
#[cfg(feature = "test-hooks")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn support_reaches_a_tenant_only_with_its_admins_consent() {
    let h = Harness::start(false).await;
    let mut app = h.keys("acme-app").await;
    let customer = encrypt(&mut app, b"customer row").await;
    let mut globex_app = h.keys("globex-app").await;
    let other = encrypt(&mut globex_app, b"globex row").await;
    let decrypt = |ciphertext: &[u8], grant: &str| pb::DecryptRequest {
        ciphertext: ciphertext.to_vec(),
        context: ctx(&[("row", CONTEXT_MARKER)]),
        grant_id: grant.into(),
        ..Default::default()
    };
    let mut support_data = h.keys("support").await;
    let mut support = h.access("support").await;
    let mut acme_admin = h.access("acme-admin").await;
    let mut globex_admin = h.access("globex-admin").await;

    // Without a grant: nothing, whatever tenant it names.
    for tenant in ["", "acme"] {
        let refused = support_data
            .decrypt(pb::DecryptRequest {
                tenant: tenant.into(),
                ..decrypt(&customer.ciphertext, "")
            })
            .await
            .expect_err("no grant");
        assert_eq!(refused.code(), Code::PermissionDenied);
        assert!(refused.message().contains("grant"), "{}", refused.message());
    }

    // Bad requests are refused with what to fix.
    for bad in [
        pb::RequestSupportAccessRequest {
            duration_secs: 8 * 3600 + 1,
            ..Default::default()
        },
        pb::RequestSupportAccessRequest {
            operations: vec!["CreateKey".into()],
            ..Default::default()
        },
        pb::RequestSupportAccessRequest {
            reason: "   ".into(),
            ..Default::default()
        },
    ] {
        let request = pb::RequestSupportAccessRequest {
            tenant: "acme".into(),
            reason: if bad.reason.is_empty() {
                "ticket 4711".into()
            } else {
                bad.reason.clone()
            },
            operations: if bad.operations.is_empty() {
                vec!["Decrypt".into()]
            } else {
                bad.operations.clone()
            },
            keys: vec!["default".into()],
            duration_secs: if bad.duration_secs == 0 {
                3600
            } else {
                bad.duration_secs
            },
        };
        let refused = support
            .request_support_access(request)
            .await
            .expect_err("bad request");
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{}",
            refused.message()
        );
    }
    let ask = || pb::RequestSupportAccessRequest {
        tenant: "acme".into(),
        reason: "ticket 4711: customer cannot read its export".into(),
        operations: vec!["Decrypt".into()],
        keys: vec!["default".into()],
        duration_secs: 3600,
    };
    let grant = support
        .request_support_access(ask())
        .await
        .expect("request access")
        .into_inner();
    assert_eq!(grant.state, "PENDING");
    assert_eq!(grant.tenant, "acme");
    let pending = support_data
        .decrypt(decrypt(&customer.ciphertext, &grant.id))
        .await
        .expect_err("pending");
    assert_eq!(pending.code(), Code::PermissionDenied);

    let decide = |id: &str| pb::DecideSupportAccessRequest {
        grant_id: id.into(),
    };
    let wrong_tenant = globex_admin
        .approve_support_access(decide(&grant.id))
        .await
        .expect_err("globex's admin");
    assert_eq!(wrong_tenant.code(), Code::PermissionDenied);
    let own = support
        .approve_support_access(decide(&grant.id))
        .await
        .expect_err("the requester");
    assert_eq!(own.code(), Code::PermissionDenied);
    let officer = AccessServiceClient::new(h.channel("officer").await)
        .approve_support_access(decide(&grant.id))
        .await
        .expect_err("an officer is not the customer");
    assert_eq!(officer.code(), Code::PermissionDenied);
    let malformed = acme_admin
        .approve_support_access(decide("not-a-grant"))
        .await
        .expect_err("not hex");
    assert_eq!(malformed.code(), Code::InvalidArgument);
    let oversized = support_data
        .decrypt(decrypt(&customer.ciphertext, &"a".repeat(65)))
        .await
        .expect_err("too long");
    assert_eq!(oversized.code(), Code::InvalidArgument);
    let unknown = acme_admin
        .approve_support_access(decide("00112233445566778899aabb"))
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), Code::NotFound);

    let approved = acme_admin
        .approve_support_access(decide(&grant.id))
        .await
        .expect("acme's admin approves")
        .into_inner();
    assert_eq!(approved.state, "APPROVED");
    assert!(approved.decided_by.ends_with("/tenant/acme/admin"));
    assert_eq!(approved.expire_time, approved.decide_time + 3600);
    let again = acme_admin
        .approve_support_access(decide(&grant.id))
        .await
        .expect_err("decided already");
    assert_eq!(again.code(), Code::FailedPrecondition);

    let plain = support_data
        .decrypt(decrypt(&customer.ciphertext, &grant.id))
        .await
        .expect("decrypt under the grant")
        .into_inner();
    assert_eq!(plain.plaintext, b"customer row");
    // Exactly what it names: not another RPC, key or tenant.
    let encrypt_refused = support_data
        .encrypt(pb::EncryptRequest {
            key: "default".into(),
            plaintext: b"x".to_vec(),
            grant_id: grant.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("Encrypt is not granted");
    assert_eq!(encrypt_refused.code(), Code::PermissionDenied);
    let other_key = support_data
        .decrypt(pb::DecryptRequest {
            key: "secrets".into(),
            ..decrypt(&customer.ciphertext, &grant.id)
        })
        .await
        .expect_err("key not granted");
    assert_eq!(other_key.code(), Code::PermissionDenied);
    let other_tenant = support_data
        .decrypt(pb::DecryptRequest {
            tenant: "globex".into(),
            ..decrypt(&other.ciphertext, &grant.id)
        })
        .await
        .expect_err("tenant not granted");
    assert_eq!(other_tenant.code(), Code::PermissionDenied);
    let globex_under_acme = support_data
        .decrypt(decrypt(&other.ciphertext, &grant.id))
        .await
        .expect_err("globex's ciphertext is not acme's");
    assert_ne!(globex_under_acme.code(), Code::Ok);
    // A grant is its requester's alone.
    let stolen = h
        .keys("acme-app")
        .await
        .decrypt(decrypt(&customer.ciphertext, &grant.id))
        .await
        .expect_err("not a support principal");
    assert_eq!(stolen.code(), Code::PermissionDenied);

    // Expiry (test clock): refused again.
    h.clock.advance(Duration::from_secs(3601));
    let expired = support_data
        .decrypt(decrypt(&customer.ciphertext, &grant.id))
        .await
        .expect_err("expired");
    assert_eq!(expired.code(), Code::PermissionDenied);
    let listed = acme_admin
        .list_grants(pb::ListGrantsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.grants.len(), 1);
    assert_eq!(listed.grants[0].state, "EXPIRED");
    let globex_list = globex_admin
        .list_grants(pb::ListGrantsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(
        globex_list.grants.is_empty(),
        "globex sees none of acme's grants"
    );

    // Revocation ends a live grant at once.
    let second = support
        .request_support_access(ask())
        .await
        .expect("ask again")
        .into_inner();
    acme_admin
        .approve_support_access(decide(&second.id))
        .await
        .expect("approve");
    support_data
        .decrypt(decrypt(&customer.ciphertext, &second.id))
        .await
        .expect("live grant");
    let revoked = acme_admin
        .revoke_grant(pb::RevokeGrantRequest {
            grant_id: second.id.clone(),
        })
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(revoked.state, "REVOKED");
    let after = support_data
        .decrypt(decrypt(&customer.ciphertext, &second.id))
        .await
        .expect_err("revoked");
    assert_eq!(after.code(), Code::PermissionDenied);

    // Denied stays denied.
    let third = support
        .request_support_access(ask())
        .await
        .expect("ask a third time")
        .into_inner();
    let denied = acme_admin
        .deny_support_access(decide(&third.id))
        .await
        .expect("deny")
        .into_inner();
    assert_eq!(denied.state, "DENIED");
    assert_eq!(
        support_data
            .decrypt(decrypt(&customer.ciphertext, &third.id))
            .await
            .expect_err("denied")
            .code(),
        Code::PermissionDenied
    );

    // Every step, with its grant id.
    let first = grant_lines(&h, &grant.id);
    let expected = [
        ("request", "RequestSupportAccess", "OK"),
        ("request", "Decrypt", "PERMISSION_DENIED"),
        ("request", "ApproveSupportAccess", "PERMISSION_DENIED"),
        ("intent", "ApproveSupportAccess", ""),
        ("request", "ApproveSupportAccess", "OK"),
        ("request", "Decrypt", "OK"),
    ];
    for (kind, rpc, outcome) in expected {
        assert!(
            first
                .iter()
                .any(|(k, r, o)| k == kind && r == rpc && (outcome.is_empty() || o == outcome)),
            "audit has {kind} {rpc} {outcome} for the grant: {first:?}"
        );
    }
    let approvals_refused = first
        .iter()
        .filter(|(k, r, o)| {
            k == "request" && r == "ApproveSupportAccess" && o == "PERMISSION_DENIED"
        })
        .count();
    assert_eq!(
        approvals_refused, 3,
        "globex's admin, the requester, the officer"
    );
    assert!(
        first
            .iter()
            .filter(|(k, r, o)| k == "request" && r == "Decrypt" && o == "PERMISSION_DENIED")
            .count()
            >= 2,
        "pending and expired refusals: {first:?}"
    );
    let second_lines = grant_lines(&h, &second.id);
    assert!(second_lines.contains(&("request".into(), "RevokeGrant".into(), "OK".into())));
    assert!(second_lines.contains(&("intent".into(), "RevokeGrant".into(), String::new())));
    let third_lines = grant_lines(&h, &third.id);
    assert!(third_lines.contains(&("request".into(), "DenySupportAccess".into(), "OK".into())));
    h.stop().await;
}

/// The access review (issue 6): every configured principal with its scope, last use and
/// certificate expiry, for officers and auditors only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_review_lists_every_principal_with_its_last_use() {
    let h = Harness::start(false).await;
    let mut app = h.keys("acme-app").await;
    encrypt(&mut app, b"used").await;
    let refused = AccessServiceClient::new(h.channel("acme-app").await)
        .review_access(pb::ReviewAccessRequest::default())
        .await
        .expect_err("apps do not review");
    assert_eq!(refused.code(), Code::PermissionDenied);
    let mut auditor = h.access("auditor").await;
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = auditor
            .review_access(pb::ReviewAccessRequest {
                page_size: 4,
                page_token,
            })
            .await
            .expect("review")
            .into_inner();
        all.extend(page.principals);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let find = |suffix: &str| {
        all.iter()
            .find(|p| p.identity.ends_with(suffix))
            .unwrap_or_else(|| panic!("{suffix} is in the review"))
    };
    assert_eq!(all.len(), 14, "every configured principal once: {all:?}");
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_secs(),
    )
    .expect("time");
    let used = find("/tenant/acme/app");
    assert_eq!(used.roles, ["app"]);
    assert_eq!(used.tenants, ["acme"]);
    assert!(
        (now - 300..=now + 300).contains(&used.last_use_time),
        "{used:?}"
    );
    assert!(used.certificate_expire_time > now, "{used:?}");
    let never = find("/tenant/globex/app");
    assert_eq!(never.last_use_time, 0, "never used: {never:?}");
    let officer = find("/officer");
    assert_eq!(officer.tenants, ["*"]);
    assert!(officer.last_use_time > 0);
    let auditor_entry = find("/auditor");
    assert!(auditor_entry.last_use_time > 0, "the review itself counts");
    assert_eq!(find("/tenant/acme/limited").keys, ["other"]);
    h.stop().await;
}

fn verify(args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keyfront"))
        .arg("audit")
        .arg("verify")
        .args(args)
        .output()
        .expect("keyfront audit verify runs");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
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
    let create = admin
        .create_key(pb::CreateKeyRequest {
            tenant: "acme".into(),
            name: "made-while-broken".into(),
            purpose: pb::KeyPurpose::Data as i32,
            request_id: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("no audit, no key");
    assert_eq!(create.code(), Code::Unavailable);
    assert!(create.message().contains("audit"), "{}", create.message());
    let rotate = admin
        .rotate_key(pb::RotateKeyRequest {
            tenant: "acme".into(),
            name: "default".into(),
            request_id: String::new(),
        })
        .await
        .expect_err("no audit, no rotation");
    assert_eq!(rotate.code(), Code::Unavailable);
    for _ in 0..3 {
        let refused = app
            .encrypt(pb::EncryptRequest {
                key: "default".into(),
                plaintext: b"x".to_vec(),
                ..Default::default()
            })
            .await
            .expect_err("no audit, no encryption");
        assert_eq!(refused.code(), Code::Unavailable);
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
    let encrypted = app
        .encrypt(pb::EncryptRequest {
            key: "default".into(),
            plaintext: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(encrypted.code(), Code::Unavailable);
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

/// A harness whose key journal is in `DIR/journal` (next to `DIR/data` and `DIR/backups`).
#[cfg(feature = "test-hooks")]
async fn start_with_journal(nightly: bool) -> Harness {
    Harness::start_configured(
        false,
        |_, kms| kms.scheduler_interval = Duration::from_millis(50),
        |config| {
            let base = config.data_dir.parent().expect("base").to_path_buf();
            config.kms.store.journal_dir = Some(base.join("journal"));
            config.backup.nightly = nightly;
        },
    )
    .await
}

#[cfg(feature = "test-hooks")]
async fn create_backup(admin: &mut AdminServiceClient<Channel>) -> pb::BackupArchive {
    admin
        .create_backup(pb::CreateBackupRequest::default())
        .await
        .expect("create backup")
        .into_inner()
}

#[cfg(feature = "test-hooks")]
fn backup_cli(args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keyfront"))
        .arg("backup")
        .args(args)
        .output()
        .expect("keyfront backup runs");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// The restore drill (issue 7, stories 1, 4 and 5): keys and data before a snapshot, more
/// after it (a rotation, a new tenant and key, a destroyed tenant); the data directory is lost;
/// snapshot + journal restore into a new directory on the same token, and everything made
/// before the loss decrypts, while the tenant destroyed after the snapshot stays destroyed. A
/// one-byte change of the archive fails `backup verify` and the restore refuses it.
#[cfg(feature = "test-hooks")]
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
#[cfg(feature = "test-hooks")]
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
#[cfg(feature = "test-hooks")]
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
    let denied = AdminServiceClient::new(h.channel("acme-app").await)
        .get_backup_status(pb::GetBackupStatusRequest {})
        .await
        .expect_err("app");
    assert_eq!(denied.code(), Code::PermissionDenied);
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
#[cfg(feature = "test-hooks")]
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
    let app_admin = AdminServiceClient::new(h.channel("acme-app").await)
        .create_backup(pb::CreateBackupRequest::default())
        .await
        .expect_err("an app cannot");
    assert_eq!(app_admin.code(), Code::PermissionDenied);
    let auditor = AdminServiceClient::new(h.channel("auditor").await)
        .create_backup(pb::CreateBackupRequest::default())
        .await
        .expect_err("an auditor cannot");
    assert_eq!(auditor.code(), Code::PermissionDenied);
}

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
    let refused = admin
        .create_key(pb::CreateKeyRequest {
            tenant: "acme".into(),
            name: "refused".into(),
            purpose: pb::KeyPurpose::Mac as i32,
            algorithm: 99,
            request_id: String::new(),
        })
        .await
        .expect_err("unknown algorithm");
    assert_eq!(refused.code(), Code::InvalidArgument);

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
    let refused = app
        .generate_mac(pb::GenerateMacRequest {
            key: "mac512".into(),
            data: data.clone(),
            data_crc32c: Some(crc32c::crc32c(&data) ^ 1),
            ..Default::default()
        })
        .await
        .expect_err("bad crc");
    assert_eq!(refused.code(), Code::InvalidArgument);

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
    let refused = app
        .encrypt(pb::EncryptRequest {
            key: "mac512".into(),
            plaintext: b"p".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("a MAC key cannot encrypt");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("purpose MAC"), "{refused:?}");
    let refused = app
        .generate_mac(pb::GenerateMacRequest {
            key: "default".into(),
            data: b"m".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("a DATA key cannot MAC");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("purpose DATA"), "{refused:?}");
    let refused = app
        .generate_mac(pb::GenerateMacRequest {
            key: "nosuch".into(),
            data: b"m".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("no such key");
    assert_eq!(refused.code(), Code::NotFound);

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
        let refused = app
            .sign(pb::SignRequest {
                key: name.into(),
                message: message.clone(),
                message_crc32c: Some(crc32c::crc32c(&message) ^ 1),
                ..Default::default()
            })
            .await
            .expect_err("bad crc");
        assert_eq!(refused.code(), Code::InvalidArgument);

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
    let refused = app
        .encrypt(pb::EncryptRequest {
            key: "p256".into(),
            plaintext: b"p".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("a SIGN key cannot encrypt");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("purpose SIGN"), "{refused:?}");
    let refused = app
        .generate_mac(pb::GenerateMacRequest {
            key: "p256".into(),
            data: b"m".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("a SIGN key cannot MAC");
    assert_eq!(refused.code(), Code::PermissionDenied);
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

    let refused = admin
        .rotate_key(pb::RotateKeyRequest {
            tenant: "acme".into(),
            name: "byok".into(),
            request_id: String::new(),
        })
        .await
        .expect_err("imported keys rotate by import");
    assert_eq!(refused.code(), Code::FailedPrecondition);
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
    let not_yet = officer
        .get_key(pb::GetKeyRequest {
            tenant: "acme".into(),
            name: "byok".into(),
        })
        .await
        .expect_err("not imported yet");
    assert_eq!(not_yet.code(), Code::NotFound);
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
