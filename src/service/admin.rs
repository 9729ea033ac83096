//! `AdminService`: tenants and keys, for officers. Lists are paginated by name; mutations with
//! a `request_id` are idempotent (a retry returns the first call's result).

use super::admin_messages::{
    approval_message, approval_required, in_scope, key_message, master_key_message, page, purpose,
    tenant_message, version_message, wrapping_algorithm,
};
use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use super::auth::{Rpc, parse_name};
use super::{Shared, pb};
use crate::config::DualOperation;
use crate::config::TenantScope;
use crate::ids::KeyVersion;
use crate::ids::Name;
use crate::keystore::PendingOperation;
use crate::keystore::VersionRecord;
use crate::kms::{Import, Kms, PolicyUpdate};

/// The `AdminService` implementation.
pub struct AdminService {
    shared: Arc<Shared>,
}

impl AdminService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// Longest import token accepted (they are 32 hex digits).
const MAX_IMPORT_TOKEN_LEN: usize = 64;
/// Longest wrapped material accepted: one RSA-OAEP block and a KWP of up to 4 KiB.
const MAX_WRAPPED_MATERIAL_LEN: usize = 384 + 4096 + 16;

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminService {
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let r = request.get_ref();
        let call = self
            .shared
            .begin(&request, Rpc::CreateTenant, &r.name, None)?;
        let r = request.into_inner();
        call.client_request_id(&r.request_id);
        if let Some(done) = self
            .shared
            .replay(&call, Rpc::CreateTenant, &r.request_id)
            .await?
        {
            return Ok(Response::new(done));
        }
        let name = parse_name(&r.name, "name")?;
        let record = call.run_global(move |kms| kms.create_tenant(&name)).await?;
        let message = tenant_message(&record);
        self.shared
            .remember(&call, Rpc::CreateTenant, &r.request_id, &message)
            .await;
        Ok(Response::new(message))
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let call = self.shared.begin(&request, Rpc::ListTenants, "", None)?;
        let r = request.into_inner();
        let principal = call.principal();
        let mut tenants = call
            .run_global(|kms| Ok(kms.store().tenants()?))
            .await?
            .into_iter()
            .filter(|t| match &principal.tenants {
                TenantScope::All => true,
                TenantScope::Only(names) => names.contains(&t.name),
            })
            .collect::<Vec<_>>();
        tenants.sort_by(|a, b| a.name.cmp(&b.name));
        let (tenants, next_page_token) =
            page(tenants, |t| t.name.as_str(), r.page_size, &r.page_token)?;
        Ok(Response::new(pb::ListTenantsResponse {
            tenants: tenants.iter().map(tenant_message).collect(),
            next_page_token,
        }))
    }

    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let r = request.get_ref();
        let call = self
            .shared
            .begin(&request, Rpc::CreateKey, &r.tenant, Some(&r.name))?;
        let r = request.into_inner();
        call.client_request_id(&r.request_id);
        if let Some(done) = self
            .shared
            .replay(&call, Rpc::CreateKey, &r.request_id)
            .await?
        {
            return Ok(Response::new(done));
        }
        let name = parse_name(&r.name, "name")?;
        let purpose = purpose(r.purpose, r.algorithm)?;
        let record = call
            .run(move |kms, tenant| kms.create_key(tenant, &name, purpose))
            .await?;
        call.version(record.primary.0);
        let message = key_message(&r.tenant, &record, None);
        self.shared
            .remember(&call, Rpc::CreateKey, &r.request_id, &message)
            .await;
        Ok(Response::new(message))
    }

    async fn get_import_parameters(
        &self,
        request: Request<pb::GetImportParametersRequest>,
    ) -> Result<Response<pb::ImportParameters>, Status> {
        let r = request.get_ref();
        let call =
            self.shared
                .begin(&request, Rpc::GetImportParameters, &r.tenant, Some(&r.name))?;
        let r = request.into_inner();
        let name = parse_name(&r.name, "name")?;
        let wrapping = wrapping_algorithm(r.wrapping_algorithm)?;
        let parameters = call
            .run(move |kms, tenant| kms.get_import_parameters(tenant, &name, wrapping))
            .await?;
        let public_key_pem = crate::crypto::import::public_key_pem(&parameters.public_key)
            .ok_or_else(|| {
                tracing::error!("import parameters hold a public key that is not RSA-3072");
                Status::internal("internal error")
            })?;
        Ok(Response::new(pb::ImportParameters {
            tenant: r.tenant,
            name: r.name,
            import_token: parameters.token,
            public_key_der: parameters.public_key,
            public_key_pem,
            wrapping_algorithm: r.wrapping_algorithm,
            expire_time: i64::try_from(parameters.expires_at).unwrap_or(i64::MAX),
        }))
    }

    async fn import_key_material(
        &self,
        request: Request<pb::ImportKeyMaterialRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let r = request.get_ref();
        let call = self
            .shared
            .begin(&request, Rpc::ImportKeyMaterial, &r.tenant, Some(&r.name))?;
        let r = request.into_inner();
        call.client_request_id(&r.request_id);
        if let Some(done) = self
            .shared
            .replay(&call, Rpc::ImportKeyMaterial, &r.request_id)
            .await?
        {
            return Ok(Response::new(done));
        }
        let name = parse_name(&r.name, "name")?;
        let purpose = if r.purpose == 0 && r.algorithm == 0 {
            None
        } else {
            Some(purpose(r.purpose, r.algorithm)?)
        };
        if r.import_token.is_empty() || r.import_token.len() > MAX_IMPORT_TOKEN_LEN {
            return Err(Status::invalid_argument(
                "import_token: the token GetImportParameters returned",
            ));
        }
        if r.encrypted_key_material.is_empty()
            || r.encrypted_key_material.len() > MAX_WRAPPED_MATERIAL_LEN
        {
            return Err(Status::invalid_argument(format!(
                "encrypted_key_material: 1 to {MAX_WRAPPED_MATERIAL_LEN} bytes"
            )));
        }
        let expires_at = match u64::try_from(r.valid_to) {
            Ok(0) => None,
            Ok(at) => Some(at),
            Err(_) => {
                return Err(Status::invalid_argument(
                    "valid_to: seconds since the Unix epoch, or 0 for never",
                ));
            }
        };
        let allow_generated_rotation = r.allow_generated_rotation;
        let (token, material) = (r.import_token, r.encrypted_key_material);
        if self
            .shared
            .under_dual_control(DualOperation::ImportKeyMaterial)
        {
            // Checked and identified now (unwrapped inside the HSM, nothing stored); carried
            // out when a second officer, shown the check value, approves.
            let (key, token2, material2) = (name.clone(), token.clone(), material.clone());
            let check_value = call
                .run(move |kms, tenant| {
                    let import = Import {
                        token: &token2,
                        material: &material2,
                        purpose,
                        expires_at,
                        allow_generated_rotation,
                    };
                    kms.check_key_material(tenant, &key, &import)
                })
                .await?;
            call.key_check_value(&check_value);
            let operation = PendingOperation::ImportKeyMaterial {
                tenant: parse_name(&r.tenant, "tenant")?,
                key: name,
                token,
                material,
                purpose,
                expires_at,
                allow_generated_rotation,
                key_check_value: check_value,
            };
            return Err(self.ask_approval(&call, operation).await);
        }
        let record = call
            .run(move |kms, tenant| {
                let import = Import {
                    token: &token,
                    material: &material,
                    purpose,
                    expires_at,
                    allow_generated_rotation,
                };
                kms.import_key_material(tenant, &name, &import)
            })
            .await;
        let (record, import, check_value) = record?;
        call.version(record.primary.0);
        call.key_check_value(&check_value);
        let message = key_message(&r.tenant, &record, Some(&import));
        self.shared
            .remember(&call, Rpc::ImportKeyMaterial, &r.request_id, &message)
            .await;
        Ok(Response::new(message))
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let r = request.get_ref();
        let call = self
            .shared
            .begin(&request, Rpc::GetKey, &r.tenant, Some(&r.name))?;
        let r = request.into_inner();
        let name = parse_name(&r.name, "name")?;
        let details = call
            .run(move |kms, tenant| kms.key_details(tenant, &name))
            .await?;
        let import = details.import.as_ref();
        let mut message = key_message(&r.tenant, &details.record, import);
        message.versions = details
            .versions
            .iter()
            .map(|v| version_message(v, Some(import)))
            .collect();
        Ok(Response::new(message))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let r = request.get_ref();
        let call = self
            .shared
            .begin(&request, Rpc::ListKeys, &r.tenant, None)?;
        let r = request.into_inner();
        let mut keys = call
            .run(|kms, tenant| {
                kms.keys(tenant)?
                    .into_iter()
                    .map(|k| Ok((kms.key_import(tenant, k.id)?, k)))
                    .collect::<Result<Vec<_>, crate::kms::Error>>()
            })
            .await?;
        keys.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        let (keys, next_page_token) =
            page(keys, |(_, k)| k.name.as_str(), r.page_size, &r.page_token)?;
        Ok(Response::new(pb::ListKeysResponse {
            keys: keys
                .iter()
                .map(|(import, k)| key_message(&r.tenant, k, import.as_ref()))
                .collect(),
            next_page_token,
        }))
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let r = request.get_ref();
        let call = self
            .shared
            .begin(&request, Rpc::RotateKey, &r.tenant, Some(&r.name))?;
        let r = request.into_inner();
        call.client_request_id(&r.request_id);
        if let Some(done) = self
            .shared
            .replay(&call, Rpc::RotateKey, &r.request_id)
            .await?
        {
            return Ok(Response::new(done));
        }
        let name = parse_name(&r.name, "name")?;
        let (import, record) = call
            .run(move |kms, tenant| {
                let record = kms.rotate_key(tenant, &name)?;
                Ok((kms.key_import(tenant, record.id)?, record))
            })
            .await?;
        call.version(record.primary.0);
        let message = key_message(&r.tenant, &record, import.as_ref());
        self.shared
            .remember(&call, Rpc::RotateKey, &r.request_id, &message)
            .await;
        Ok(Response::new(message))
    }

    async fn destroy_tenant(
        &self,
        request: Request<pb::DestroyTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let r = request.get_ref();
        let call = self
            .shared
            .begin(&request, Rpc::DestroyTenant, &r.name, None)?;
        let r = request.into_inner();
        call.client_request_id(&r.request_id);
        if let Some(done) = self
            .shared
            .replay(&call, Rpc::DestroyTenant, &r.request_id)
            .await?
        {
            return Ok(Response::new(done));
        }
        let name = parse_name(&r.name, "name")?;
        if self.shared.under_dual_control(DualOperation::DestroyTenant) {
            let operation = PendingOperation::DestroyTenant { tenant: name };
            return Err(self.ask_approval(&call, operation).await);
        }
        let record = call
            .run_global(move |kms| kms.schedule_tenant_destruction(&name))
            .await?;
        let message = tenant_message(&record);
        self.shared
            .remember(&call, Rpc::DestroyTenant, &r.request_id, &message)
            .await;
        Ok(Response::new(message))
    }

    async fn cancel_tenant_destruction(
        &self,
        request: Request<pb::CancelTenantDestructionRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let r = request.get_ref();
        let call = self
            .shared
            .begin(&request, Rpc::CancelTenantDestruction, &r.name, None)?;
        let r = request.into_inner();
        call.client_request_id(&r.request_id);
        if let Some(done) = self
            .shared
            .replay(&call, Rpc::CancelTenantDestruction, &r.request_id)
            .await?
        {
            return Ok(Response::new(done));
        }
        let name = parse_name(&r.name, "name")?;
        let record = call
            .run_global(move |kms| kms.cancel_tenant_destruction(&name))
            .await?;
        let message = tenant_message(&record);
        self.shared
            .remember(&call, Rpc::CancelTenantDestruction, &r.request_id, &message)
            .await;
        Ok(Response::new(message))
    }

    async fn update_key_policy(
        &self,
        request: Request<pb::UpdateKeyPolicyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let r = request.get_ref();
        let call = self
            .shared
            .begin(&request, Rpc::UpdateKeyPolicy, &r.tenant, Some(&r.name))?;
        let r = request.into_inner();
        call.client_request_id(&r.request_id);
        if let Some(done) = self
            .shared
            .replay(&call, Rpc::UpdateKeyPolicy, &r.request_id)
            .await?
        {
            return Ok(Response::new(done));
        }
        let name = parse_name(&r.name, "name")?;
        let seconds = |value: Option<i64>, field: &str| {
            value
                .map(|v| {
                    u64::try_from(v).map_err(|_| {
                        Status::invalid_argument(format!("{field} must not be negative"))
                    })
                })
                .transpose()
        };
        let update = PolicyUpdate {
            min_decryption_version: r.min_decryption_version,
            rotation_period_secs: seconds(r.rotation_period_seconds, "rotation_period_seconds")?,
            destruction_window_secs: seconds(
                r.destruction_window_seconds,
                "destruction_window_seconds",
            )?,
            max_kek_uses: r.max_kek_uses,
            max_bulk_uses: r.max_bulk_uses,
        };
        if let Some(min) = update.min_decryption_version {
            if self
                .shared
                .under_dual_control(DualOperation::RaiseMinDecryptionVersion)
            {
                let key = name.clone();
                let current = call
                    .run(move |kms, tenant| kms.key(tenant, &key))
                    .await?
                    .policy
                    .min_decryption_version;
                if min > current {
                    let operation = PendingOperation::UpdateKeyPolicy {
                        tenant: call.tenant()?,
                        key: name,
                        min_decryption_version: update.min_decryption_version,
                        rotation_period_secs: update.rotation_period_secs,
                        destruction_window_secs: update.destruction_window_secs,
                        max_kek_uses: update.max_kek_uses,
                        max_bulk_uses: update.max_bulk_uses,
                    };
                    return Err(self.ask_approval(&call, operation).await);
                }
            }
        }
        let (import, record) = call
            .run(move |kms, tenant| {
                let record = kms.update_policy(tenant, &name, &update)?;
                Ok((kms.key_import(tenant, record.id)?, record))
            })
            .await?;
        let message = key_message(&r.tenant, &record, import.as_ref());
        self.shared
            .remember(&call, Rpc::UpdateKeyPolicy, &r.request_id, &message)
            .await;
        Ok(Response::new(message))
    }

    async fn approve_operation(
        &self,
        request: Request<pb::ApproveOperationRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        let call = self
            .shared
            .begin(&request, Rpc::ApproveOperation, "", None)?;
        let id = request.into_inner().approval_id;
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument(
                "approval_id: the hex id from APPROVAL_REQUIRED",
            ));
        }
        let principal = call.principal();
        let approver = call.identity().to_owned();
        let approval = call
            .run_global(move |kms| {
                kms.approve(&id, &approver, |operation| {
                    in_scope(&principal.tenants, operation)
                })
            })
            .await?;
        if let PendingOperation::ImportKeyMaterial {
            key_check_value, ..
        } = &approval.operation
        {
            call.key_check_value(key_check_value);
        }
        let now = call.now_secs();
        Ok(Response::new(approval_message(&approval, now)))
    }

    async fn list_approvals(
        &self,
        request: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        let call = self.shared.begin(&request, Rpc::ListApprovals, "", None)?;
        let r = request.into_inner();
        let principal = call.principal();
        let mut approvals = call
            .run_global(|kms| kms.approvals())
            .await?
            .into_iter()
            .filter(|a| in_scope(&principal.tenants, &a.operation))
            .collect::<Vec<_>>();
        approvals.sort_by(|a, b| a.id.cmp(&b.id));
        let (approvals, next_page_token) =
            page(approvals, |a| a.id.as_str(), r.page_size, &r.page_token)?;
        let now = call.now_secs();
        Ok(Response::new(pb::ListApprovalsResponse {
            approvals: approvals.iter().map(|a| approval_message(a, now)).collect(),
            next_page_token,
        }))
    }

    async fn rotate_master_key(
        &self,
        request: Request<pb::RotateMasterKeyRequest>,
    ) -> Result<Response<pb::MasterKeyStatus>, Status> {
        let call = self
            .shared
            .begin(&request, Rpc::RotateMasterKey, "", None)?;
        let r = request.into_inner();
        call.client_request_id(&r.request_id);
        if !matches!(call.principal().tenants, TenantScope::All) {
            return Err(Status::permission_denied(
                "RotateMasterKey touches every tenant: it needs an officer with tenants = [\"*\"]",
            ));
        }
        if let Some(done) = self
            .shared
            .replay(&call, Rpc::RotateMasterKey, &r.request_id)
            .await?
        {
            return Ok(Response::new(done));
        }
        if self
            .shared
            .under_dual_control(DualOperation::RotateMasterKey)
        {
            return Err(self
                .ask_approval(&call, PendingOperation::RotateMasterKey)
                .await);
        }
        let status = call.run_global(|kms| kms.rotate_master_key()).await?;
        let message = master_key_message(&status);
        self.shared
            .remember(&call, Rpc::RotateMasterKey, &r.request_id, &message)
            .await;
        Ok(Response::new(message))
    }

    async fn create_backup(
        &self,
        request: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<pb::BackupArchive>, Status> {
        let call = self.shared.begin(&request, Rpc::CreateBackup, "", None)?;
        let r = request.into_inner();
        call.client_request_id(&r.request_id);
        if !matches!(call.principal().tenants, TenantScope::All) {
            return Err(Status::permission_denied(
                "CreateBackup copies every tenant: it needs an officer with tenants = [\"*\"]",
            ));
        }
        let backups = self.shared.backups()?;
        let out = match r.out_dir.as_str() {
            "" => None,
            dir if dir.len() > 4096 => {
                return Err(Status::invalid_argument(
                    "out_dir is longer than 4096 bytes",
                ));
            }
            dir => {
                let path = std::path::PathBuf::from(dir);
                if !path.is_absolute() || !path.is_dir() {
                    return Err(Status::invalid_argument(
                        "out_dir must be an absolute path of an existing directory on the server's host",
                    ));
                }
                // Within the backup directory only: an officer must not make the server write
                // (and clean up `.partial` files) wherever it may. Symbolic links are followed
                // before the check.
                let inside = match (
                    std::fs::canonicalize(&path),
                    std::fs::canonicalize(backups.dir()),
                ) {
                    (Ok(path), Ok(root)) => path.starts_with(&root).then_some(path),
                    _ => None,
                };
                match inside {
                    Some(path) => Some(path),
                    None => {
                        return Err(Status::invalid_argument(format!(
                            "out_dir must be the backup directory ({}) or a directory inside it",
                            backups.dir().display()
                        )));
                    }
                }
            }
        };
        if let Some(done) = self
            .shared
            .replay(&call, Rpc::CreateBackup, &r.request_id)
            .await?
        {
            return Ok(Response::new(done));
        }
        let created = call
            .run_global(move |kms| Ok(backups.take(kms, out.as_deref())))
            .await?
            .map_err(Status::from)?;
        let message = pb::BackupArchive {
            path: created.path.display().to_string(),
            create_time: i64::try_from(created.manifest.created_at).unwrap_or(i64::MAX),
            size_bytes: created.bytes,
            tenants: i32::try_from(created.manifest.tenants.len()).unwrap_or(i32::MAX),
            verified: true,
        };
        self.shared
            .remember(&call, Rpc::CreateBackup, &r.request_id, &message)
            .await;
        Ok(Response::new(message))
    }

    async fn get_backup_status(
        &self,
        request: Request<pb::GetBackupStatusRequest>,
    ) -> Result<Response<pb::BackupStatus>, Status> {
        let call = self
            .shared
            .begin(&request, Rpc::GetBackupStatus, "", None)?;
        let backups = self.shared.backups()?;
        let nightly = self.shared.nightly_backups;
        let status = call
            .run_global(move |kms| Ok(backups.status(kms)))
            .await?
            .map_err(Status::from)?;
        let secs = |s: u64| i64::try_from(s).unwrap_or(i64::MAX);
        Ok(Response::new(pb::BackupStatus {
            dir: status.dir.display().to_string(),
            newest: status.newest.as_ref().map(|n| pb::BackupArchive {
                path: n.path.display().to_string(),
                create_time: secs(n.created_at),
                size_bytes: n.bytes,
                tenants: 0,
                verified: status.verification.is_ok(),
            }),
            age_seconds: secs(status.age_secs),
            verification_error: status.verification.err().unwrap_or_default(),
            archives: i32::try_from(status.archives).unwrap_or(i32::MAX),
            retention_days: i32::try_from(status.retention_days).unwrap_or(i32::MAX),
            next_due_time: if nightly { secs(status.next_due) } else { 0 },
            last_failure: status.last_failure.unwrap_or_default(),
        }))
    }

    async fn get_master_key_status(
        &self,
        request: Request<pb::GetMasterKeyStatusRequest>,
    ) -> Result<Response<pb::MasterKeyStatus>, Status> {
        let call = self
            .shared
            .begin(&request, Rpc::GetMasterKeyStatus, "", None)?;
        let status = call.run_global(|kms| kms.master_key_status()).await?;
        Ok(Response::new(master_key_message(&status)))
    }

    async fn disable_key_version(
        &self,
        request: Request<pb::KeyVersionRequest>,
    ) -> Result<Response<pb::KeyVersion>, Status> {
        self.change_version(request, Rpc::DisableKeyVersion, Kms::disable_version)
            .await
    }

    async fn enable_key_version(
        &self,
        request: Request<pb::KeyVersionRequest>,
    ) -> Result<Response<pb::KeyVersion>, Status> {
        self.change_version(request, Rpc::EnableKeyVersion, Kms::enable_version)
            .await
    }

    async fn schedule_key_version_destruction(
        &self,
        request: Request<pb::KeyVersionRequest>,
    ) -> Result<Response<pb::KeyVersion>, Status> {
        self.change_version(
            request,
            Rpc::ScheduleKeyVersionDestruction,
            Kms::schedule_destruction,
        )
        .await
    }

    async fn cancel_key_version_destruction(
        &self,
        request: Request<pb::KeyVersionRequest>,
    ) -> Result<Response<pb::KeyVersion>, Status> {
        self.change_version(
            request,
            Rpc::CancelKeyVersionDestruction,
            Kms::cancel_destruction,
        )
        .await
    }
}

/// A version state change as the domain offers it.
type VersionChange =
    fn(&Kms, crate::ids::TenantId, &Name, KeyVersion) -> Result<VersionRecord, crate::Error>;

impl AdminService {
    /// Records an operation under dual control; the status to answer with.
    async fn ask_approval(&self, call: &super::Call, operation: PendingOperation) -> Status {
        let requester = call.identity().to_owned();
        let ttl = self.shared.dual_control.approval_ttl;
        match call
            .run_global(move |kms| kms.request_approval(operation, &requester, ttl))
            .await
        {
            Ok(approval) => approval_required(&approval),
            Err(status) => status,
        }
    }

    /// The four version state changes: authorize, replay a retried request_id, change, audit
    /// the version.
    async fn change_version(
        &self,
        request: Request<pb::KeyVersionRequest>,
        rpc: Rpc,
        change: VersionChange,
    ) -> Result<Response<pb::KeyVersion>, Status> {
        let r = request.get_ref();
        let call = self.shared.begin(&request, rpc, &r.tenant, Some(&r.name))?;
        let r = request.into_inner();
        call.client_request_id(&r.request_id);
        call.version(r.version);
        if let Some(done) = self.shared.replay(&call, rpc, &r.request_id).await? {
            return Ok(Response::new(done));
        }
        let name = parse_name(&r.name, "name")?;
        if r.version == 0 {
            return Err(Status::invalid_argument("version: versions start at 1"));
        }
        let version = KeyVersion(r.version);
        if rpc == Rpc::ScheduleKeyVersionDestruction
            && self
                .shared
                .under_dual_control(DualOperation::ScheduleKeyVersionDestruction)
        {
            let operation = PendingOperation::ScheduleKeyVersionDestruction {
                tenant: call.tenant()?,
                key: name,
                version: version.0,
            };
            return Err(self.ask_approval(&call, operation).await);
        }
        let record = call
            .run(move |kms, tenant| change(kms, tenant, &name, version))
            .await?;
        let message = version_message(&record, None);
        self.shared
            .remember(&call, rpc, &r.request_id, &message)
            .await;
        Ok(Response::new(message))
    }
}

/// Encodes a response for the idempotency table.
pub(crate) fn encode<M: Message>(message: &M) -> Vec<u8> {
    message.encode_to_vec()
}
