//! `keyfront admin`: one subcommand per AdminService and AccessService RPC, for security
//! officers (and, with `--principal`, support, tenant-admins and auditors). Tables by default,
//! `--json` for scripts; errors name the principal, the status and what to do next.

use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use tonic::transport::Channel;

use crate::service::pb;
use crate::service::pb::access_service_client::AccessServiceClient;
use crate::service::pb::admin_service_client::AdminServiceClient;

use super::client::{ClientError, Endpoint};
use super::tables::{
    Output, approvals, backup_archive, backup_status, grants, import_parameters, key, keys,
    master_key, review, tenants, version,
};

/// `keyfront admin` and its options.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    #[command(flatten)]
    /// Server and identity (default principal: officer).
    pub endpoint: Endpoint,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// A key purpose on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PurposeArg {
    /// Encrypt, Decrypt, ReEncrypt, data keys.
    Data,
    /// SealSecret, UnsealSecret.
    Secrets,
    /// GenerateMac, VerifyMac with HMAC-SHA-256.
    HmacSha256,
    /// GenerateMac, VerifyMac with HMAC-SHA-512.
    HmacSha512,
    /// Sign, Verify, GetPublicKey with ECDSA on P-256 over SHA-256.
    EcdsaP256,
    /// Sign, Verify, GetPublicKey with ECDSA on P-384 over SHA-384.
    EcdsaP384,
    /// Sign, Verify, GetPublicKey with RSA-PSS 3072 over SHA-256.
    RsaPss3072,
}

/// How key material is wrapped for import (`GetImportParameters`).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum WrappingArg {
    /// RSAES-OAEP with SHA-1 of the material itself.
    RsaesOaepSha1,
    /// RSAES-OAEP with SHA-256 of the material itself.
    RsaesOaepSha256,
    /// RSA-OAEP-SHA-1 of an AES-256 key, then AES-KWP of the material under it.
    RsaAesKeyWrapSha1,
    /// RSA-OAEP-SHA-256 of an AES-256 key, then AES-KWP of the material under it.
    RsaAesKeyWrapSha256,
}

impl WrappingArg {
    fn wire(self) -> pb::WrappingAlgorithm {
        match self {
            Self::RsaesOaepSha1 => pb::WrappingAlgorithm::RsaesOaepSha1,
            Self::RsaesOaepSha256 => pb::WrappingAlgorithm::RsaesOaepSha256,
            Self::RsaAesKeyWrapSha1 => pb::WrappingAlgorithm::RsaAesKeyWrapSha1,
            Self::RsaAesKeyWrapSha256 => pb::WrappingAlgorithm::RsaAesKeyWrapSha256,
        }
    }

    fn wrapping(self) -> crate::hsm::ImportWrapping {
        use crate::hsm::ImportWrapping as W;
        match self {
            Self::RsaesOaepSha1 => W::RsaesOaepSha1,
            Self::RsaesOaepSha256 => W::RsaesOaepSha256,
            Self::RsaAesKeyWrapSha1 => W::RsaAesKeyWrapSha1,
            Self::RsaAesKeyWrapSha256 => W::RsaAesKeyWrapSha256,
        }
    }
}

impl PurposeArg {
    fn wire(self) -> (pb::KeyPurpose, pb::KeyAlgorithm) {
        match self {
            Self::Data => (pb::KeyPurpose::Data, pb::KeyAlgorithm::Unspecified),
            Self::Secrets => (pb::KeyPurpose::Secrets, pb::KeyAlgorithm::Unspecified),
            Self::HmacSha256 => (pb::KeyPurpose::Mac, pb::KeyAlgorithm::HmacSha256),
            Self::HmacSha512 => (pb::KeyPurpose::Mac, pb::KeyAlgorithm::HmacSha512),
            Self::EcdsaP256 => (pb::KeyPurpose::Sign, pb::KeyAlgorithm::EcdsaP256Sha256),
            Self::EcdsaP384 => (pb::KeyPurpose::Sign, pb::KeyAlgorithm::EcdsaP384Sha384),
            Self::RsaPss3072 => (pb::KeyPurpose::Sign, pb::KeyAlgorithm::RsaPss3072Sha256),
        }
    }
}

/// Every AdminService RPC.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create a tenant.
    CreateTenant {
        /// Its name.
        name: String,
        /// Makes a retry idempotent.
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// List tenants.
    ListTenants,
    /// Schedule a tenant's destruction (refused at once; destroyed after the pending window).
    DestroyTenant {
        /// The tenant.
        name: String,
        /// Makes a retry idempotent.
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Restore a tenant scheduled for destruction.
    CancelTenantDestruction {
        /// The tenant.
        name: String,
        /// Makes a retry idempotent.
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Create a key.
    CreateKey {
        /// The tenant.
        tenant: String,
        /// The key's name.
        name: String,
        /// What it is for.
        #[arg(long, value_enum, default_value_t = PurposeArg::Data)]
        purpose: PurposeArg,
        /// Makes a retry idempotent.
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Show a key, its policy and every version's state.
    GetKey {
        /// The tenant.
        tenant: String,
        /// The key.
        name: String,
    },
    /// List a tenant's keys.
    ListKeys {
        /// The tenant.
        tenant: String,
    },
    /// Add a version and make it primary.
    RotateKey {
        /// The tenant.
        tenant: String,
        /// The key.
        name: String,
        /// Makes a retry idempotent.
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Key import: new import parameters for a key name (an imported key, or a name not
    /// taken yet). Prints the import token and writes the public key as PEM, for wrapping the
    /// material elsewhere (e.g. `openssl pkeyutl`).
    ImportParameters {
        /// The tenant.
        tenant: String,
        /// The key's name.
        name: String,
        /// How the material will be wrapped.
        #[arg(long, value_enum, default_value_t = WrappingArg::RsaAesKeyWrapSha1)]
        wrapping: WrappingArg,
        /// Where to write the public key (PEM).
        #[arg(long)]
        public_key_out: Option<std::path::PathBuf>,
    },
    /// Key import: import key material into a key (created at version 1 if the name is not
    /// taken, else a new primary version). Either `--material FILE` (the raw key bytes: this
    /// command gets import parameters and wraps them here) or `--wrapped FILE --token TOKEN`
    /// (material wrapped elsewhere for `import-parameters`).
    ImportKey {
        /// The tenant.
        tenant: String,
        /// The key's name.
        name: String,
        /// For a new key: what it is for (data, secrets, hmac-sha256, hmac-sha512).
        #[arg(long, value_enum)]
        purpose: Option<PurposeArg>,
        /// The raw key material (32 bytes for data and secrets keys, 32 or 64 for HMAC keys).
        #[arg(long, conflicts_with_all = ["wrapped", "token"], required_unless_present = "wrapped")]
        material: Option<std::path::PathBuf>,
        /// Material already wrapped for the parameters `--token` names.
        #[arg(long, requires = "token")]
        wrapped: Option<std::path::PathBuf>,
        /// The import token of `import-parameters`.
        #[arg(long, requires = "wrapped")]
        token: Option<String>,
        /// How `--material` is wrapped.
        #[arg(long, value_enum, default_value_t = WrappingArg::RsaAesKeyWrapSha1)]
        wrapping: WrappingArg,
        /// The material expires after this long, e.g. "365d" (default: never).
        #[arg(long, value_parser = humantime::parse_duration)]
        valid_for: Option<Duration>,
        /// Let RotateKey and the scheduler add generated versions to this key.
        #[arg(long)]
        allow_generated_rotation: bool,
        /// Makes a retry idempotent.
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Change a key's policy; options not given stay as they are.
    UpdateKeyPolicy {
        /// The tenant.
        tenant: String,
        /// The key.
        name: String,
        /// Versions below this refuse to decrypt (0: none).
        #[arg(long)]
        min_decryption_version: Option<u32>,
        /// Rotate when the primary is older than this, e.g. "90d" ("0s": never).
        #[arg(long, value_parser = humantime::parse_duration)]
        rotation_period: Option<Duration>,
        /// Pending window of scheduled destructions, e.g. "45d" ("0s": the server's default).
        #[arg(long, value_parser = humantime::parse_duration)]
        destruction_window: Option<Duration>,
        /// Most HSM encryptions per version's KEK (0: the default, 2^31).
        #[arg(long)]
        max_kek_uses: Option<u64>,
        /// Most Encrypt operations per version's bulk key (0: the default, 2^48).
        #[arg(long)]
        max_bulk_uses: Option<u64>,
        /// Makes a retry idempotent.
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Disable a version (the primary too: encrypting then fails until enabled).
    DisableVersion(VersionArgs),
    /// Enable a disabled version.
    EnableVersion(VersionArgs),
    /// Schedule a version's destruction after the pending window.
    ScheduleDestruction(VersionArgs),
    /// Cancel a scheduled destruction.
    CancelDestruction(VersionArgs),
    /// Dual control: approve (and so carry out) another officer's request.
    Approve {
        /// The approval id from APPROVAL_REQUIRED.
        id: String,
    },
    /// Dual control: every request, pending, executed or expired.
    ListApprovals,
    /// A new master wrapping key generation; every KEK re-wrapped under it in the HSM.
    RotateMasterKey {
        /// Makes a retry idempotent.
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// The master key's generations and any rotation in progress.
    MasterKeyStatus,
    /// The newest snapshot (its age, size and verification result) and the schedule.
    BackupStatus,
    /// Take a snapshot now (what `keyfront backup create` does).
    BackupCreate {
        /// A directory on the server's host (absolute; default: the configured one).
        #[arg(long, default_value = "")]
        out: String,
        /// Makes a retry idempotent.
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Access review (officer, auditor): every principal, its scope, last use and
    /// certificate expiry.
    AccessReview,
    /// Support (`--principal support`): ask a tenant-admin for access to a tenant.
    RequestAccess {
        /// The tenant.
        tenant: String,
        /// Why (the approver reads it).
        #[arg(long)]
        reason: String,
        /// KeyService RPCs wanted, e.g. Decrypt (repeatable).
        #[arg(long = "operation", required = true)]
        operations: Vec<String>,
        /// Keys wanted (repeatable).
        #[arg(long = "key", required = true)]
        keys: Vec<String>,
        /// How long once approved, e.g. "2h".
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        duration: Duration,
    },
    /// Tenant-admin: approve a support request.
    ApproveAccess {
        /// The grant id.
        id: String,
    },
    /// Tenant-admin: deny a support request.
    DenyAccess {
        /// The grant id.
        id: String,
    },
    /// End a grant now (tenant-admin, officer, or the support principal that asked).
    RevokeGrant {
        /// The grant id.
        id: String,
    },
    /// Support grants, newest first.
    ListGrants {
        /// Only this tenant.
        #[arg(long, default_value = "")]
        tenant: String,
    },
}

/// Which version.
#[derive(Debug, clap::Args)]
pub struct VersionArgs {
    /// The tenant.
    tenant: String,
    /// The key.
    name: String,
    /// The version.
    version: u32,
    /// Makes a retry idempotent.
    #[arg(long, default_value = "")]
    request_id: String,
}

impl VersionArgs {
    fn request(&self) -> pb::KeyVersionRequest {
        pb::KeyVersionRequest {
            tenant: self.tenant.clone(),
            name: self.name.clone(),
            version: self.version,
            request_id: self.request_id.clone(),
        }
    }
}

/// Runs one admin command; prints its result.
///
/// # Errors
/// [`ClientError`], with the principal and a next step for status errors.
pub async fn run(args: AdminArgs) -> Result<(), ClientError> {
    let who = args.endpoint.who("officer");
    let channel = args.endpoint.channel("officer").await?;
    let output = execute(channel, args.command)
        .await
        .map_err(|status| explain(status, &who))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&output.json).unwrap_or_default()
        );
    } else {
        print!("{}", output.table);
    }
    Ok(())
}

async fn execute(channel: Channel, command: AdminCommand) -> Result<Output, tonic::Status> {
    let mut admin = AdminServiceClient::new(channel.clone());
    let mut access = AccessServiceClient::new(channel);
    Ok(match command {
        AdminCommand::AccessReview => review(
            all_pages(|page_token| {
                let mut access = access.clone();
                async move {
                    let page = access
                        .review_access(pb::ReviewAccessRequest {
                            page_size: 1000,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.principals, page.next_page_token))
                }
            })
            .await?,
        ),
        AdminCommand::ListGrants { tenant } => grants(
            all_pages(|page_token| {
                let (mut access, tenant) = (access.clone(), tenant.clone());
                async move {
                    let page = access
                        .list_grants(pb::ListGrantsRequest {
                            tenant,
                            page_size: 1000,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.grants, page.next_page_token))
                }
            })
            .await?,
        ),
        AdminCommand::RequestAccess {
            tenant,
            reason,
            operations,
            keys,
            duration,
        } => grants(vec![
            access
                .request_support_access(pb::RequestSupportAccessRequest {
                    tenant,
                    reason,
                    operations,
                    keys,
                    duration_secs: duration.as_secs(),
                })
                .await?
                .into_inner(),
        ]),
        AdminCommand::ApproveAccess { id } => grants(vec![
            access
                .approve_support_access(pb::DecideSupportAccessRequest { grant_id: id })
                .await?
                .into_inner(),
        ]),
        AdminCommand::DenyAccess { id } => grants(vec![
            access
                .deny_support_access(pb::DecideSupportAccessRequest { grant_id: id })
                .await?
                .into_inner(),
        ]),
        AdminCommand::RevokeGrant { id } => grants(vec![
            access
                .revoke_grant(pb::RevokeGrantRequest { grant_id: id })
                .await?
                .into_inner(),
        ]),
        AdminCommand::CreateTenant { name, request_id } => tenants(vec![
            admin
                .create_tenant(pb::CreateTenantRequest { name, request_id })
                .await?
                .into_inner(),
        ]),
        AdminCommand::ListTenants => tenants(
            all_pages(|page_token| {
                let mut admin = admin.clone();
                async move {
                    let page = admin
                        .list_tenants(pb::ListTenantsRequest {
                            page_size: 1000,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.tenants, page.next_page_token))
                }
            })
            .await?,
        ),
        AdminCommand::DestroyTenant { name, request_id } => tenants(vec![
            admin
                .destroy_tenant(pb::DestroyTenantRequest { name, request_id })
                .await?
                .into_inner(),
        ]),
        AdminCommand::CancelTenantDestruction { name, request_id } => tenants(vec![
            admin
                .cancel_tenant_destruction(pb::CancelTenantDestructionRequest { name, request_id })
                .await?
                .into_inner(),
        ]),
        AdminCommand::CreateKey {
            tenant,
            name,
            purpose,
            request_id,
        } => key(admin
            .create_key(pb::CreateKeyRequest {
                tenant,
                name,
                purpose: purpose.wire().0 as i32,
                algorithm: purpose.wire().1 as i32,
                request_id,
            })
            .await?
            .into_inner()),
        AdminCommand::ImportParameters {
            tenant,
            name,
            wrapping,
            public_key_out,
        } => {
            let parameters = admin
                .get_import_parameters(pb::GetImportParametersRequest {
                    tenant,
                    name,
                    wrapping_algorithm: wrapping.wire() as i32,
                })
                .await?
                .into_inner();
            if let Some(path) = &public_key_out {
                std::fs::write(path, &parameters.public_key_pem).map_err(|e| {
                    tonic::Status::failed_precondition(format!(
                        "cannot write {}: {e}",
                        path.display()
                    ))
                })?;
            }
            import_parameters(&parameters)
        }
        AdminCommand::ImportKey {
            tenant,
            name,
            purpose,
            material,
            wrapped,
            token,
            wrapping,
            valid_for,
            allow_generated_rotation,
            request_id,
        } => {
            let read = |path: &std::path::Path| {
                std::fs::read(path).map_err(|e| {
                    tonic::Status::failed_precondition(format!(
                        "cannot read {}: {e}",
                        path.display()
                    ))
                })
            };
            let (import_token, encrypted_key_material) = match (material, wrapped, token) {
                (_, Some(wrapped), Some(token)) => (token, read(&wrapped)?),
                (Some(material), _, _) => {
                    let material = zeroize::Zeroizing::new(read(&material)?);
                    // What the audit log and a second officer (dual control) will show.
                    eprintln!(
                        "key check value of the material: {}",
                        crate::hsm::KeyCheckValue::of(&material)
                    );
                    let parameters = admin
                        .get_import_parameters(pb::GetImportParametersRequest {
                            tenant: tenant.clone(),
                            name: name.clone(),
                            wrapping_algorithm: wrapping.wire() as i32,
                        })
                        .await?
                        .into_inner();
                    let wrapped = crate::crypto::import::wrap_for_import(
                        &parameters.public_key_der,
                        wrapping.wrapping(),
                        &material,
                    )
                    .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
                    (parameters.import_token, wrapped)
                }
                _ => {
                    return Err(tonic::Status::invalid_argument(
                        "give --material, or --wrapped with --token",
                    ));
                }
            };
            let valid_to = match valid_for {
                Some(period) => std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .saturating_add(period)
                    .as_secs()
                    .try_into()
                    .unwrap_or(i64::MAX),
                None => 0,
            };
            let (purpose, algorithm) = purpose.map_or(
                (pb::KeyPurpose::Unspecified, pb::KeyAlgorithm::Unspecified),
                PurposeArg::wire,
            );
            key(admin
                .import_key_material(pb::ImportKeyMaterialRequest {
                    tenant,
                    name,
                    import_token,
                    encrypted_key_material,
                    purpose: purpose as i32,
                    algorithm: algorithm as i32,
                    valid_to,
                    allow_generated_rotation,
                    request_id,
                })
                .await?
                .into_inner())
        }
        AdminCommand::GetKey { tenant, name } => key(admin
            .get_key(pb::GetKeyRequest { tenant, name })
            .await?
            .into_inner()),
        AdminCommand::ListKeys { tenant } => keys(
            all_pages(|page_token| {
                let (mut admin, tenant) = (admin.clone(), tenant.clone());
                async move {
                    let page = admin
                        .list_keys(pb::ListKeysRequest {
                            tenant,
                            page_size: 1000,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.keys, page.next_page_token))
                }
            })
            .await?,
        ),
        AdminCommand::RotateKey {
            tenant,
            name,
            request_id,
        } => key(admin
            .rotate_key(pb::RotateKeyRequest {
                tenant,
                name,
                request_id,
            })
            .await?
            .into_inner()),
        AdminCommand::UpdateKeyPolicy {
            tenant,
            name,
            min_decryption_version,
            rotation_period,
            destruction_window,
            max_kek_uses,
            max_bulk_uses,
            request_id,
        } => {
            let seconds =
                |d: Option<Duration>| d.map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            key(admin
                .update_key_policy(pb::UpdateKeyPolicyRequest {
                    tenant,
                    name,
                    min_decryption_version,
                    rotation_period_seconds: seconds(rotation_period),
                    destruction_window_seconds: seconds(destruction_window),
                    max_kek_uses,
                    max_bulk_uses,
                    request_id,
                })
                .await?
                .into_inner())
        }
        AdminCommand::DisableVersion(v) => {
            version(admin.disable_key_version(v.request()).await?.into_inner())
        }
        AdminCommand::EnableVersion(v) => {
            version(admin.enable_key_version(v.request()).await?.into_inner())
        }
        AdminCommand::ScheduleDestruction(v) => version(
            admin
                .schedule_key_version_destruction(v.request())
                .await?
                .into_inner(),
        ),
        AdminCommand::Approve { id } => approvals(vec![
            admin
                .approve_operation(pb::ApproveOperationRequest { approval_id: id })
                .await?
                .into_inner(),
        ]),
        AdminCommand::ListApprovals => approvals(
            all_pages(|page_token| {
                let mut admin = admin.clone();
                async move {
                    let page = admin
                        .list_approvals(pb::ListApprovalsRequest {
                            page_size: 1000,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.approvals, page.next_page_token))
                }
            })
            .await?,
        ),
        AdminCommand::RotateMasterKey { request_id } => master_key(
            admin
                .rotate_master_key(pb::RotateMasterKeyRequest { request_id })
                .await?
                .into_inner(),
        ),
        AdminCommand::BackupStatus => backup_status(
            admin
                .get_backup_status(pb::GetBackupStatusRequest {})
                .await?
                .into_inner(),
        ),
        AdminCommand::BackupCreate { out, request_id } => backup_archive(
            admin
                .create_backup(pb::CreateBackupRequest {
                    out_dir: out,
                    request_id,
                })
                .await?
                .into_inner(),
        ),
        AdminCommand::MasterKeyStatus => master_key(
            admin
                .get_master_key_status(pb::GetMasterKeyStatusRequest {})
                .await?
                .into_inner(),
        ),
        AdminCommand::CancelDestruction(v) => version(
            admin
                .cancel_key_version_destruction(v.request())
                .await?
                .into_inner(),
        ),
    })
}

/// Every item of a paginated List: `fetch(page_token)` returns a page and the next token
/// (empty on the last page).
async fn all_pages<T, F, Fut>(mut fetch: F) -> Result<Vec<T>, tonic::Status>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let (items, next) = fetch(page_token).await?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        page_token = next;
    }
}

/// Turns a status into an error that says who was refused, why, and what to do.
fn explain(status: tonic::Status, who: &str) -> ClientError {
    use tonic::Code;
    use tonic_types::StatusExt;
    let reason = status
        .get_details_error_info()
        .map(|info| format!(" ({})", info.reason))
        .unwrap_or_default();
    let next = match status.code() {
        Code::Unauthenticated => {
            "the server does not accept this certificate's identity: check --principal/--cert and the server's [[principals]]"
        }
        Code::PermissionDenied => {
            "this principal lacks the role, tenant or grant: AdminService needs an officer (--principal officer), grants a support or tenant-admin principal"
        }
        Code::NotFound => {
            "check the names: keyfront admin list-tenants, keyfront admin list-keys TENANT"
        }
        Code::AlreadyExists => "it exists already: pick another name, or use the existing one",
        Code::FailedPrecondition if status.message().contains("dual control") => {
            "another officer approves it with: keyfront admin approve ID (keyfront admin list-approvals)"
        }
        Code::FailedPrecondition => {
            "the key or tenant is not in a state that allows this: keyfront admin get-key TENANT KEY shows every version's state"
        }
        Code::InvalidArgument | Code::OutOfRange => "correct the value and retry",
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => {
            "the server or its HSM is busy or unreachable: retry (with the same --request-id)"
        }
        _ => "see the server's log for this request",
    };
    ClientError::Refused {
        who: who.to_owned(),
        code: crate::service::layer::code_name(status.code()).to_owned(),
        message: format!("{}{reason}", status.message()),
        next,
    }
}
