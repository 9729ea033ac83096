//! `keyfront selfcheck`: proves that a keyfront works, and leaves nothing behind.
//!
//! - Offline (`--config`, the server stopped): the token opens and holds keyfront's keys, every
//!   tenant database of the store opens and passes its integrity checks (read only), and every
//!   domain operation round-trips on a scratch store in a temporary directory, made with the
//!   same token and deleted afterwards. Nothing of the check is written to the real store.
//! - Online (no `--config`): a running server, through its API, as one or more principals:
//!   health, then what each principal's role allows (Encrypt/Decrypt with a wrong context
//!   refused, data keys, sealed secrets, the officer's status reads). These calls store
//!   nothing; they are audited like any other.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::client::{ClientError, Endpoint};
use crate::config::{Config, ProcessEnv};
use crate::crypto::{EncryptionContext, Plaintext};
use crate::hsm::Hsm;
use crate::hsm::pkcs11::Pkcs11Hsm;
use crate::ids::Name;
use crate::keystore::Purpose;
use crate::kms::Kms;
use crate::service::pb;

/// `keyfront selfcheck`'s options.
#[derive(Debug, clap::Args)]
pub struct SelfcheckArgs {
    /// Offline: the config of a keyfront that is not running (the HSM, the store, and a
    /// scratch round trip of every operation). Without it: check the running server at
    /// --endpoint through its API.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    /// Online: the server and identity (default: the dev principals acme-app, acme-backup,
    /// acme-secrets and officer, those of them whose certificates DIR/certs holds).
    pub endpoint: Endpoint,
    /// Online: the DATA key to round-trip with.
    #[arg(long, default_value = "default")]
    pub key: String,
    /// Online: the SECRETS key to seal a secret with.
    #[arg(long, default_value = "secrets")]
    pub secrets_key: String,
    /// Online: the tenant, for principals with several.
    #[arg(long, default_value = "")]
    pub tenant: String,
    /// Online: wait up to this many seconds for the server to answer and be SERVING (a server
    /// just started; the HSM and store open after it listens).
    #[arg(long, default_value_t = 0)]
    pub wait: u64,
}

/// The dev principals an online selfcheck uses when none is named.
const DEV_PRINCIPALS: &[&str] = &["acme-app", "acme-backup", "acme-secrets", "officer"];

/// Runs the offline or the online check.
pub fn run(args: SelfcheckArgs) -> std::process::ExitCode {
    match &args.config {
        Some(config) => match offline(config) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("keyfront selfcheck: {error}");
                std::process::ExitCode::FAILURE
            }
        },
        None => super::run_client(online(args)),
    }
}

/// The offline check (see the module docs).
///
/// # Errors
/// The first failure: the HSM, the store's integrity, or a round trip.
pub fn offline(config: &Path) -> Result<(), super::Error> {
    let config = Config::load_offline(config, &ProcessEnv)?;
    let hsm: Arc<dyn Hsm> = Arc::new(Pkcs11Hsm::open(&config.hsm)?);
    println!(
        "HSM: token {:?} via {}, MWK generation {}",
        config.hsm.token_label,
        config.hsm.module.display(),
        hsm.mwk_generation()
    );
    verify_store(&hsm, &config)?;
    let scratch =
        tempfile::tempdir().map_err(|e| crate::Error::Store(crate::keystore::Error::Io(e)))?;
    let mut options = config.kms;
    options.store = crate::keystore::StoreOptions::default();
    let kms = Kms::open(Arc::clone(&hsm), scratch.path(), options)?;
    round_trips(&kms)?;
    drop(kms);
    println!(
        "selfcheck passed; it wrote nothing to the store (the scratch store in {} is deleted)",
        scratch.path().display()
    );
    Ok(())
}

/// Opens the real store and every tenant database in it, which verifies each one's records
/// and head; writes nothing of its own.
fn verify_store(hsm: &Arc<dyn Hsm>, config: &Config) -> Result<(), crate::Error> {
    let kms = match Kms::open(Arc::clone(hsm), &config.data_dir, config.kms.clone()) {
        Err(crate::Error::Store(crate::keystore::Error::Locked(_))) => {
            return Err(crate::Error::InvalidArgument(format!(
                "{} is in use by a running keyfront: check that server through its API instead, \
                 e.g. keyfront selfcheck --endpoint https://HOST:PORT --cert CLIENT.crt \
                 --client-key CLIENT.key --ca CA.crt (without --config)",
                config.data_dir.display()
            )));
        }
        other => other?,
    };
    let tenants = kms.store().tenants()?;
    let mut keys = 0;
    let mut leftovers = Vec::new();
    for tenant in &tenants {
        keys += kms.store().tenant(tenant.id)?.keys()?.len();
        if tenant.name.as_str().starts_with("selfcheck-") {
            leftovers.push(tenant.name.to_string());
        }
    }
    println!(
        "store: {} ({} tenants, {keys} keys): every tenant database opened and passed its \
         integrity checks",
        config.data_dir.display(),
        tenants.len()
    );
    if !leftovers.is_empty() {
        println!(
            "note: {} tenant(s) named selfcheck-* were left by an earlier keyfront's selfcheck; \
             remove them with keyfront admin destroy-tenant NAME: {}",
            leftovers.len(),
            leftovers.join(", ")
        );
    }
    Ok(())
}

/// Every domain operation on a tenant of `kms`'s (scratch) store.
fn round_trips(kms: &Kms) -> Result<(), crate::Error> {
    let tenant = kms.create_tenant(&name("selfcheck"))?;
    let data = name("data");
    let secrets = name("secrets");
    let mac = name("mac");
    let signing = name("signing");
    kms.create_key(tenant.id, &data, Purpose::Data)?;
    kms.create_key(tenant.id, &secrets, Purpose::Secrets)?;
    kms.create_key(
        tenant.id,
        &mac,
        Purpose::Mac(crate::hsm::MacAlgorithm::HmacSha256),
    )?;
    kms.create_key(
        tenant.id,
        &signing,
        Purpose::Sign(crate::hsm::SignAlgorithm::EcdsaP256Sha256),
    )?;
    println!("scratch store: a tenant with DATA, SECRETS, MAC and SIGN keys");

    let context: EncryptionContext = [("purpose", "selfcheck")].into_iter().collect();
    let message = Plaintext::copy_from(b"keyfront selfcheck message");
    let v1 = kms.encrypt(tenant.id, &data, &message, &context)?;
    check(
        kms.decrypt(tenant.id, &v1.ciphertext, &context, None)?
            .plaintext
            .expose_secret()
            == message.expose_secret(),
        "decrypt returns the plaintext",
    )?;
    let rotated = kms.rotate_key(tenant.id, &data)?;
    let v2 = kms.encrypt(tenant.id, &data, &message, &context)?;
    check(
        v2.version == rotated.primary,
        "rotation moves the primary version",
    )?;
    for old in [&v1, &v2] {
        kms.decrypt(tenant.id, &old.ciphertext, &context, Some(&data))?;
    }
    let wrong: EncryptionContext = [("purpose", "other")].into_iter().collect();
    check(
        matches!(
            kms.decrypt(tenant.id, &v1.ciphertext, &wrong, None),
            Err(crate::Error::Decrypt)
        ),
        "a wrong context is refused",
    )?;
    println!("encrypt/decrypt: v1 and v2 (after a rotation) decrypt; a wrong context is refused");

    let data_key = kms.generate_data_key(tenant.id, &data, &context)?;
    let unwrapped = kms.decrypt_data_key(tenant.id, &data_key.wrapped, &context)?;
    check(
        unwrapped.plaintext.expose_secret() == data_key.plaintext.expose_secret(),
        "the data key round-trips",
    )?;
    let secret = Plaintext::copy_from(b"api-token-for-selfcheck");
    let sealed = kms.seal_secret(tenant.id, &secrets, &secret, &context)?;
    check(
        kms.unseal_secret(tenant.id, &sealed.sealed, &context)?
            .plaintext
            .expose_secret()
            == secret.expose_secret(),
        "the secret round-trips",
    )?;
    println!("data key and sealed secret: both round-trip in the HSM");

    let tag = kms.generate_mac(tenant.id, &mac, b"selfcheck")?;
    let version = Some(tag.version);
    check(
        kms.verify_mac(tenant.id, &mac, version, b"selfcheck", &tag.mac)?
            .valid
            && !kms
                .verify_mac(tenant.id, &mac, version, b"selfcheck!", &tag.mac)?
                .valid,
        "the MAC verifies, and not for other data",
    )?;
    let signed = crate::kms::Signable::Message(b"selfcheck");
    let signature = kms.sign(tenant.id, &signing, signed)?;
    check(
        kms.verify(
            tenant.id,
            &signing,
            Some(signature.version),
            signed,
            &signature.signature,
        )?
        .valid,
        "the signature verifies",
    )?;
    println!("MAC and signature: computed in the HSM, verified");

    check(
        matches!(
            kms.encrypt(tenant.id, &secrets, &message, &context),
            Err(crate::Error::PurposeMismatch { .. })
        ) && matches!(
            kms.seal_secret(tenant.id, &data, &secret, &context),
            Err(crate::Error::PurposeMismatch { .. })
        ),
        "purposes are enforced",
    )?;
    println!("purposes: the SECRETS key refuses Encrypt, the DATA key refuses SealSecret");
    Ok(())
}

/// The online check (see the module docs).
///
/// # Errors
/// [`ClientError::Selfcheck`] when a check failed or none could run; connection errors.
pub async fn online(args: SelfcheckArgs) -> Result<(), ClientError> {
    let mut report = Report::default();
    let identities: Vec<Endpoint> =
        if args.endpoint.has_identity() || args.endpoint.principal.is_some() {
            vec![args.endpoint.clone()]
        } else {
            DEV_PRINCIPALS
                .iter()
                .filter(|p| args.endpoint.dir.join(format!("certs/{p}.crt")).exists())
                .map(|p| Endpoint {
                    principal: Some((*p).to_owned()),
                    ..args.endpoint.clone()
                })
                .collect()
        };
    if identities.is_empty() {
        return Err(ClientError::Selfcheck(
            "no identity to check with: give --cert, --client-key and --ca (or --principal with a \
             keyfront dev directory)"
                .into(),
        ));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(args.wait);
    while std::time::Instant::now() < deadline && !serving(&identities[0]).await {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let first = identities[0].channel("acme-app").await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(first);
    for service in ["", "keyfront.v1.KeyService", crate::service::STORE_HEALTH] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map(|r| r.into_inner().status);
        let what = if service.is_empty() {
            "health".to_owned()
        } else {
            format!("health of {service}")
        };
        match status {
            Ok(1) => report.passed(&what, "SERVING"),
            Ok(status) => report.failed(&what, &format!("status {status}, not SERVING")),
            Err(status) if status.code() == tonic::Code::NotFound => {}
            Err(status) => report.failed(&what, &super::client::status_line(&status)),
        }
    }
    for identity in &identities {
        let who = identity.who("acme-app");
        let channel = identity.channel("acme-app").await?;
        data_checks(&args, &who, channel.clone(), &mut report).await;
        officer_checks(&who, channel, &mut report).await;
    }
    report.finish()
}

/// Whether the server answers and its health is SERVING.
async fn serving(identity: &Endpoint) -> bool {
    let Ok(channel) = identity.channel("acme-app").await else {
        return false;
    };
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status == 1)
}

/// Encrypt/Decrypt, data keys and sealed secrets, as far as the principal's role allows.
async fn data_checks(
    args: &SelfcheckArgs,
    who: &str,
    channel: tonic::transport::Channel,
    report: &mut Report,
) {
    use pb::key_service_client::KeyServiceClient;
    let mut keys = KeyServiceClient::new(channel);
    let nonce = hex::encode(rand::random::<[u8; 8]>());
    let context: std::collections::HashMap<String, String> =
        [("selfcheck".to_owned(), nonce.clone())].into();
    let message = format!("keyfront selfcheck {nonce}").into_bytes();
    let what = format!("as {who}: Encrypt and Decrypt with {}", args.key);
    let encrypted = keys
        .encrypt(pb::EncryptRequest {
            key: args.key.clone(),
            plaintext: message.clone(),
            context: context.clone(),
            plaintext_crc32c: Some(crc32c::crc32c(&message)),
            tenant: args.tenant.clone(),
            grant_id: String::new(),
        })
        .await;
    if let Some(encrypted) = report.outcome(&what, encrypted) {
        let decrypt = |context| pb::DecryptRequest {
            ciphertext: encrypted.ciphertext.clone(),
            context,
            key: String::new(),
            ciphertext_crc32c: Some(crc32c::crc32c(&encrypted.ciphertext)),
            tenant: args.tenant.clone(),
            grant_id: String::new(),
        };
        let decrypted = keys.decrypt(decrypt(context.clone())).await;
        let wrong = keys.decrypt(decrypt(Default::default())).await;
        match (decrypted, wrong) {
            (Ok(d), Err(w))
                if d.get_ref().plaintext == message && w.code() == tonic::Code::InvalidArgument =>
            {
                report.passed(&what, "round trip; a wrong context is refused");
            }
            (decrypted, wrong) => report.failed(
                &what,
                &format!(
                    "decrypt {:?}, wrong context {:?}",
                    decrypted.map(|_| "answered").map_err(|s| s.code()),
                    wrong.map(|_| "ACCEPTED").map_err(|s| s.code())
                ),
            ),
        }
    }
    let what = format!(
        "as {who}: GenerateDataKey and DecryptDataKey with {}",
        args.key
    );
    let generated = keys
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: args.key.clone(),
            context: context.clone(),
            include_plaintext: true,
            tenant: args.tenant.clone(),
            grant_id: String::new(),
        })
        .await;
    if let Some(generated) = report.outcome(&what, generated) {
        let opened = keys
            .decrypt_data_key(pb::DecryptDataKeyRequest {
                wrapped_key: generated.wrapped_key.clone(),
                context: context.clone(),
                wrapped_key_crc32c: None,
                tenant: args.tenant.clone(),
                grant_id: String::new(),
            })
            .await;
        if let Some(opened) = report.outcome(&what, opened) {
            report.result(
                &what,
                opened.plaintext_key == generated.plaintext_key,
                "round trip",
            );
        }
    }
    let what = format!(
        "as {who}: SealSecret and UnsealSecret with {}",
        args.secrets_key
    );
    let sealed = keys
        .seal_secret(pb::SealSecretRequest {
            key: args.secrets_key.clone(),
            secret: message.clone(),
            context: context.clone(),
            secret_crc32c: None,
            tenant: args.tenant.clone(),
            include_lookup_digest: false,
            grant_id: String::new(),
        })
        .await;
    if let Some(sealed) = report.outcome(&what, sealed) {
        let unsealed = keys
            .unseal_secret(pb::UnsealSecretRequest {
                sealed: sealed.sealed.clone(),
                context,
                sealed_crc32c: None,
                tenant: args.tenant.clone(),
                grant_id: String::new(),
            })
            .await;
        if let Some(unsealed) = report.outcome(&what, unsealed) {
            report.result(&what, unsealed.secret == message, "round trip");
        }
    }
}

/// The officer's reads: tenants, the master key, backups.
async fn officer_checks(who: &str, channel: tonic::transport::Channel, report: &mut Report) {
    use pb::admin_service_client::AdminServiceClient;
    let mut admin = AdminServiceClient::new(channel);
    let what = format!("as {who}: ListTenants");
    let tenants = admin
        .list_tenants(pb::ListTenantsRequest {
            page_size: 1000,
            page_token: String::new(),
        })
        .await;
    if let Some(tenants) = report.outcome(&what, tenants) {
        report.passed(
            &what,
            &format!("{} tenant(s) on the first page", tenants.tenants.len()),
        );
    }
    let what = format!("as {who}: GetMasterKeyStatus");
    let status = admin
        .get_master_key_status(pb::GetMasterKeyStatusRequest {})
        .await;
    if let Some(status) = report.outcome(&what, status) {
        report.result(
            &what,
            status.current_generation > 0,
            &format!("MWK generation {}", status.current_generation),
        );
    }
    let what = format!("as {who}: GetBackupStatus");
    let backups = admin.get_backup_status(pb::GetBackupStatusRequest {}).await;
    if let Some(backups) = report.outcome(&what, backups) {
        let newest = if backups.newest.is_some() {
            format!(
                "newest snapshot {} s old{}",
                backups.age_seconds,
                if backups.verification_error.is_empty() {
                    ", verified".to_owned()
                } else {
                    format!(", does NOT verify: {}", backups.verification_error)
                }
            )
        } else {
            "no snapshot yet".to_owned()
        };
        report.passed(&what, &newest);
    }
}

/// What an online check found.
#[derive(Default)]
struct Report {
    // Operations that passed (health answers are not counted: a server that answers health
    // but whose every RPC was skipped was not checked).
    passed: usize,
    failed: usize,
}

impl Report {
    fn passed(&mut self, what: &str, detail: &str) {
        if !what.starts_with("health") {
            self.passed += 1;
        }
        println!("ok       {what}: {detail}");
    }

    fn failed(&mut self, what: &str, detail: &str) {
        self.failed += 1;
        println!("FAILED   {what}: {detail}");
    }

    fn result(&mut self, what: &str, ok: bool, detail: &str) {
        if ok {
            self.passed(what, detail);
        } else {
            self.failed(what, &format!("{detail}: wrong answer"));
        }
    }

    /// The response, or `None` after reporting a refusal by role (skipped) or a failure.
    fn outcome<T>(
        &mut self,
        what: &str,
        result: Result<tonic::Response<T>, tonic::Status>,
    ) -> Option<T> {
        match result {
            Ok(response) => Some(response.into_inner()),
            Err(status) if status.code() == tonic::Code::PermissionDenied => {
                println!("skipped  {what}: not this principal's role");
                None
            }
            Err(status) => {
                self.failed(what, &super::client::status_line(&status));
                None
            }
        }
    }

    fn finish(self) -> Result<(), ClientError> {
        match (self.passed, self.failed) {
            (_, 1..) => Err(ClientError::Selfcheck(format!(
                "{} check(s) failed, {} passed",
                self.failed, self.passed
            ))),
            (0, 0) => Err(ClientError::Selfcheck(
                "no operation could be checked: no principal given has a role that allows one"
                    .into(),
            )),
            (passed, 0) => {
                println!("selfcheck passed: {passed} checks; nothing was stored");
                Ok(())
            }
        }
    }
}

fn check(ok: bool, what: &'static str) -> Result<(), crate::Error> {
    if ok {
        Ok(())
    } else {
        Err(crate::Error::Store(crate::keystore::Error::Integrity {
            database: "selfcheck".into(),
            reason: what,
        }))
    }
}

fn name(text: &str) -> Name {
    // Invariant: only called with literal names that match the pattern.
    text.parse().expect("valid selfcheck name")
}
