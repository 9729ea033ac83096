//! The gRPC harness: a server over real TLS on a real token, its principals and clients, and
//! helpers the suites share.

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
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common;

pub(crate) const PLAINTEXT_MARKER: &[u8] = b"MARKER-plaintext-7c1f";

pub(crate) const SECRET_MARKER: &[u8] = b"MARKER-secret-9a2b";

pub(crate) const CONTEXT_MARKER: &str = "MARKER-context-4d8e";

pub(crate) struct Harness {
    pub(crate) addr: SocketAddr,
    pub(crate) metrics: SocketAddr,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub(crate) server: tokio::task::JoinHandle<Result<(), keyfront::service::ServeError>>,
    pub(crate) hsm: Arc<FaultyHsm<Pkcs11Hsm>>,
    pub(crate) reachable: Arc<AtomicBool>,
    #[cfg(feature = "test-hooks")]
    pub(crate) clock: Arc<keyfront::clock::TestClock>,
    #[cfg(feature = "test-hooks")]
    pub(crate) token: keyfront::hsm::pkcs11::Pkcs11Config,
    #[cfg(feature = "test-hooks")]
    pub(crate) audit_failure: Arc<AtomicBool>,
}

pub(crate) fn principal(
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
    pub(crate) async fn start(start_down: bool) -> Self {
        Self::start_with(start_down, |_, _| {}).await
    }

    /// [`Harness::start`] with adjusted limits and domain options.
    pub(crate) async fn start_with(
        start_down: bool,
        adjust: impl FnOnce(&mut Limits, &mut KmsOptions),
    ) -> Self {
        Self::start_configured(start_down, adjust, |_| {}).await
    }

    /// [`Harness::start_with`], then `configure` sees the whole config before the start.
    pub(crate) async fn start_configured(
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

    pub(crate) fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    pub(crate) async fn channel(&self, name: &str) -> Channel {
        self.try_channel(name, true).await.expect("connect")
    }

    pub(crate) async fn try_channel(
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

    pub(crate) async fn keys(&self, name: &str) -> KeyServiceClient<Channel> {
        KeyServiceClient::new(self.channel(name).await)
    }

    pub(crate) async fn access(&self, name: &str) -> AccessServiceClient<Channel> {
        AccessServiceClient::new(self.channel(name).await)
    }

    pub(crate) async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel("officer").await)
    }

    pub(crate) async fn health(&self) -> Option<i32> {
        let mut client = HealthClient::new(self.channel("officer").await);
        client
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()
            .map(|r| r.into_inner().status)
    }

    pub(crate) async fn wait_for(&self, status: ServingStatus) {
        for _ in 0..200 {
            if self.health().await == Some(status as i32) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("health never became {status:?}");
    }

    pub(crate) fn set_reachable(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::SeqCst);
    }

    pub(crate) async fn create_tenants(&self) {
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
    pub(crate) fn audit_lines(&self) -> Vec<serde_json::Value> {
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

    pub(crate) async fn stop(mut self) -> tempfile::TempDir {
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
pub(crate) fn audit_files(dir: &std::path::Path) -> Vec<PathBuf> {
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

pub(crate) fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

pub(crate) fn code<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

pub(crate) async fn encrypt(
    client: &mut KeyServiceClient<Channel>,
    plaintext: &[u8],
) -> pb::EncryptResponse {
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

/// Calls `rpc` as `principal` with a request that is valid for a caller allowed to make it.
pub(crate) async fn call(h: &Harness, principal: &str, rpc: &str, blobs: &Blobs) -> Code {
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

pub(crate) struct Blobs {
    pub(crate) ciphertext: Vec<u8>,
    pub(crate) data_key: Vec<u8>,
    pub(crate) sealed: Vec<u8>,
    pub(crate) mac: Vec<u8>,
    pub(crate) signature: Vec<u8>,
}

/// New import parameters (made by the officer) for acme's key `name`, and `material` wrapped
/// for them as a key owner would.
pub(crate) async fn wrapped_for_import(
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
pub(crate) async fn create_signing_key(
    h: &Harness,
    name: &str,
    algorithm: pb::KeyAlgorithm,
) -> pb::Key {
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
pub(crate) async fn create_mac_key(
    h: &Harness,
    name: &str,
    algorithm: pb::KeyAlgorithm,
) -> pb::Key {
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

pub(crate) async fn blobs(h: &Harness) -> Blobs {
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

pub(crate) const RPCS: [&str; 33] = [
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

pub(crate) async fn tls12_handshake(h: &Harness) -> Result<(), String> {
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

/// GET /metrics with a minimal HTTP/1.0 request.
pub(crate) async fn scrape(addr: SocketAddr) -> String {
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

/// The domain on a stopped server's data directory. The server's last references go
/// asynchronously and sled locks its files, so this retries for a few seconds.
#[cfg(feature = "test-hooks")]
pub(crate) async fn reopen(hsm: Arc<dyn Hsm>, dir: &std::path::Path) -> keyfront::kms::Kms {
    for _ in 0..50 {
        match keyfront::kms::Kms::open(Arc::clone(&hsm), &dir.join("data"), KmsOptions::default()) {
            Ok(kms) => return kms,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("cannot reopen the data directory");
}

pub(crate) fn reason(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    status.get_details_error_info().map(|info| info.reason)
}

#[cfg(feature = "test-hooks")]
pub(crate) fn expect_precondition(
    result: Result<impl std::fmt::Debug, tonic::Status>,
    wanted: &str,
) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status).as_deref(), Some(wanted), "{status:?}");
}

#[cfg(feature = "test-hooks")]
pub(crate) fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
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

#[cfg(feature = "test-hooks")]
pub(crate) fn grant_lines(h: &Harness, grant: &str) -> Vec<(String, String, String)> {
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

pub(crate) fn verify(args: &[&str]) -> (bool, String) {
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

/// A harness whose key journal is in `DIR/journal` (next to `DIR/data` and `DIR/backups`).
#[cfg(feature = "test-hooks")]
pub(crate) async fn start_with_journal(nightly: bool) -> Harness {
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
pub(crate) async fn create_backup(admin: &mut AdminServiceClient<Channel>) -> pb::BackupArchive {
    admin
        .create_backup(pb::CreateBackupRequest::default())
        .await
        .expect("create backup")
        .into_inner()
}

#[cfg(feature = "test-hooks")]
pub(crate) fn backup_cli(args: &[&str]) -> (bool, String) {
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

/// Asserts that a call was refused with `code` (`why` names the case when it was not), and
/// returns the refusal for further checks.
pub(crate) fn expect_refused<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    why: &str,
) -> tonic::Status {
    match result {
        Ok(answer) => panic!("{why}: expected {code:?}, got {answer:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{why}: {status:?}");
            status
        }
    }
}
