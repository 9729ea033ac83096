//! AdminService's messages: domain records (tenants, keys, versions, approvals, master key
//! status) as protobuf, protobuf requests as domain values (purposes, wrapping algorithms),
//! and pages of List answers.

use tonic::Status;

use crate::config::TenantScope;
use crate::hsm::{ImportWrapping, MacAlgorithm, SignAlgorithm};
use crate::ids::Name;
use crate::keystore::{ApprovalRecord, ApprovalState, PendingOperation};
use crate::keystore::{
    ImportRecord, KeyRecord, Purpose, TenantRecord, VersionRecord, VersionState,
};

use super::pb;

pub(super) fn tenant_message(record: &TenantRecord) -> pb::Tenant {
    pb::Tenant {
        name: record.name.to_string(),
        id: record.id.to_string(),
        create_time: i64::try_from(record.created_at).unwrap_or(i64::MAX),
        destroy_time: record
            .destroy_at
            .map_or(0, |at| i64::try_from(at).unwrap_or(i64::MAX)),
    }
}

pub(super) fn key_message(
    tenant: &str,
    record: &KeyRecord,
    import: Option<&ImportRecord>,
) -> pb::Key {
    let secs = |s: Option<u64>| s.map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX));
    pb::Key {
        origin: origin(import.is_some()) as i32,
        allow_generated_rotation: import.is_some_and(|i| i.allow_generated_rotation),
        policy: Some(pb::KeyPolicy {
            min_decryption_version: record.policy.min_decryption_version,
            rotation_period_seconds: secs(record.policy.rotation_period_secs),
            destruction_window_seconds: secs(record.policy.destruction_window_secs),
            max_kek_uses: record.policy.max_kek_uses.unwrap_or_default(),
            max_bulk_uses: record.policy.max_bulk_uses.unwrap_or_default(),
        }),
        versions: Vec::new(),
        tenant: tenant.to_owned(),
        name: record.name.to_string(),
        id: record.id.to_string(),
        purpose: match record.purpose {
            Purpose::Data => pb::KeyPurpose::Data,
            Purpose::Secrets => pb::KeyPurpose::Secrets,
            Purpose::Mac(_) => pb::KeyPurpose::Mac,
            Purpose::Sign(_) => pb::KeyPurpose::Sign,
        } as i32,
        algorithm: match record.purpose {
            Purpose::Data | Purpose::Secrets => pb::KeyAlgorithm::Aes256,
            Purpose::Mac(MacAlgorithm::HmacSha256) => pb::KeyAlgorithm::HmacSha256,
            Purpose::Mac(MacAlgorithm::HmacSha512) => pb::KeyAlgorithm::HmacSha512,
            Purpose::Sign(algorithm) => super::convert::sign_algorithm(algorithm),
        } as i32,
        primary_version: record.primary.0,
        latest_version: record.latest.0,
        create_time: i64::try_from(record.created_at).unwrap_or(i64::MAX),
    }
}

/// A CreateKey request's purpose and algorithm, which must go together.
pub(super) fn purpose(purpose: i32, algorithm: i32) -> Result<Purpose, Status> {
    use pb::KeyAlgorithm as A;
    let algorithm = A::try_from(algorithm)
        .map_err(|_| Status::invalid_argument("algorithm: not a KeyAlgorithm"))?;
    match (pb::KeyPurpose::try_from(purpose), algorithm) {
        (Ok(pb::KeyPurpose::Data), A::Unspecified | A::Aes256) => Ok(Purpose::Data),
        (Ok(pb::KeyPurpose::Secrets), A::Unspecified | A::Aes256) => Ok(Purpose::Secrets),
        (Ok(pb::KeyPurpose::Mac), A::HmacSha256) => Ok(Purpose::Mac(MacAlgorithm::HmacSha256)),
        (Ok(pb::KeyPurpose::Mac), A::HmacSha512) => Ok(Purpose::Mac(MacAlgorithm::HmacSha512)),
        (Ok(pb::KeyPurpose::Mac), _) => Err(Status::invalid_argument(
            "algorithm: a MAC key needs KEY_ALGORITHM_HMAC_SHA256 or KEY_ALGORITHM_HMAC_SHA512",
        )),
        (Ok(pb::KeyPurpose::Sign), A::EcdsaP256Sha256) => {
            Ok(Purpose::Sign(SignAlgorithm::EcdsaP256Sha256))
        }
        (Ok(pb::KeyPurpose::Sign), A::EcdsaP384Sha384) => {
            Ok(Purpose::Sign(SignAlgorithm::EcdsaP384Sha384))
        }
        (Ok(pb::KeyPurpose::Sign), A::RsaPss3072Sha256) => {
            Ok(Purpose::Sign(SignAlgorithm::RsaPss3072Sha256))
        }
        (Ok(pb::KeyPurpose::Sign), _) => Err(Status::invalid_argument(
            "algorithm: a SIGN key needs KEY_ALGORITHM_ECDSA_P256_SHA256, \
             KEY_ALGORITHM_ECDSA_P384_SHA384 or KEY_ALGORITHM_RSA_PSS_3072_SHA256",
        )),
        (Ok(pb::KeyPurpose::Data | pb::KeyPurpose::Secrets), _) => Err(Status::invalid_argument(
            "algorithm: DATA and SECRETS keys are KEY_ALGORITHM_AES_256 (or leave it unspecified)",
        )),
        _ => Err(Status::invalid_argument(
            "purpose: KEY_PURPOSE_DATA, KEY_PURPOSE_SECRETS, KEY_PURPOSE_MAC or KEY_PURPOSE_SIGN",
        )),
    }
}

pub(super) fn wrapping_algorithm(value: i32) -> Result<ImportWrapping, Status> {
    use pb::WrappingAlgorithm as W;
    match W::try_from(value) {
        Ok(W::RsaesOaepSha1) => Ok(ImportWrapping::RsaesOaepSha1),
        Ok(W::RsaesOaepSha256) => Ok(ImportWrapping::RsaesOaepSha256),
        Ok(W::RsaAesKeyWrapSha1) => Ok(ImportWrapping::RsaAesKeyWrapSha1),
        Ok(W::RsaAesKeyWrapSha256) => Ok(ImportWrapping::RsaAesKeyWrapSha256),
        _ => Err(Status::invalid_argument(
            "wrapping_algorithm: RSAES_OAEP_SHA_1, RSAES_OAEP_SHA_256, RSA_AES_KEY_WRAP_SHA_1 or RSA_AES_KEY_WRAP_SHA_256",
        )),
    }
}

pub(super) fn origin(imported: bool) -> pb::KeyOrigin {
    if imported {
        pb::KeyOrigin::External
    } else {
        pb::KeyOrigin::Generated
    }
}

/// A version as the API shows it; its origin and material expiry only where the key's import
/// record was read (GetKey).
pub(super) fn version_message(
    version: &VersionRecord,
    import: Option<Option<&ImportRecord>>,
) -> pb::KeyVersion {
    let time = |t: u64| i64::try_from(t).unwrap_or(i64::MAX);
    let (state, destroy_time) = match version.state {
        VersionState::Enabled => (pb::KeyVersionState::Enabled, 0),
        VersionState::Disabled => (pb::KeyVersionState::Disabled, 0),
        VersionState::DestroyScheduled { at, .. } => {
            (pb::KeyVersionState::DestroyScheduled, time(at))
        }
        VersionState::Destroyed { at } => (pb::KeyVersionState::Destroyed, time(at)),
    };
    let imported = import.map(|i| i.and_then(|i| i.version(version.version)));
    pb::KeyVersion {
        version: version.version.0,
        state: state as i32,
        create_time: time(version.created_at),
        destroy_time,
        origin: imported.map_or(pb::KeyOrigin::Unspecified, |v| origin(v.is_some())) as i32,
        expire_time: imported
            .flatten()
            .and_then(|v| v.expires_at)
            .map_or(0, time),
    }
}

pub(super) fn describe(operation: &PendingOperation) -> String {
    match operation {
        PendingOperation::RotateMasterKey => "RotateMasterKey".to_owned(),
        PendingOperation::DestroyTenant { tenant } => format!("DestroyTenant {tenant}"),
        PendingOperation::ScheduleKeyVersionDestruction {
            tenant,
            key,
            version,
        } => format!("ScheduleKeyVersionDestruction {tenant}/{key} v{version}"),
        PendingOperation::UpdateKeyPolicy {
            tenant,
            key,
            min_decryption_version,
            ..
        } => format!(
            "UpdateKeyPolicy {tenant}/{key} (min_decryption_version {})",
            min_decryption_version.unwrap_or_default()
        ),
        PendingOperation::ImportKeyMaterial {
            tenant,
            key,
            key_check_value,
            ..
        } => format!("ImportKeyMaterial {tenant}/{key} (key check value {key_check_value})"),
    }
}

/// The tenant an operation acts on (`None`: every tenant).
pub(super) fn operation_tenant(operation: &PendingOperation) -> Option<&Name> {
    match operation {
        PendingOperation::RotateMasterKey => None,
        PendingOperation::DestroyTenant { tenant }
        | PendingOperation::ScheduleKeyVersionDestruction { tenant, .. }
        | PendingOperation::UpdateKeyPolicy { tenant, .. }
        | PendingOperation::ImportKeyMaterial { tenant, .. } => Some(tenant),
    }
}

/// Whether a principal's scope covers an operation's tenant (all tenants for global ones).
pub(super) fn in_scope(scope: &TenantScope, operation: &PendingOperation) -> bool {
    match (scope, operation_tenant(operation)) {
        (TenantScope::All, _) => true,
        (TenantScope::Only(names), Some(tenant)) => names.contains(tenant),
        (TenantScope::Only(_), None) => false,
    }
}

pub(super) fn master_key_message(status: &crate::kms::MasterKeyStatus) -> pb::MasterKeyStatus {
    let time = |t: u64| i64::try_from(t).unwrap_or(i64::MAX);
    pb::MasterKeyStatus {
        current_generation: status.current.0,
        rotating_to: status.rotation.as_ref().map_or(0, |r| r.to),
        rotation_cursor: status
            .rotation
            .as_ref()
            .and_then(|r| r.cursor)
            .map(|t| t.to_string())
            .unwrap_or_default(),
        generations: status
            .generations
            .iter()
            .map(|(generation, destroy_at)| pb::MasterKeyGeneration {
                generation: generation.0,
                state: if *generation == status.current {
                    "CURRENT"
                } else if destroy_at.is_some() {
                    "RETIRED"
                } else {
                    "OLD"
                }
                .to_owned(),
                destroy_time: destroy_at.map_or(0, time),
            })
            .collect(),
    }
}

pub(super) fn approval_message(approval: &ApprovalRecord, now: u64) -> pb::Approval {
    let time = |t: u64| i64::try_from(t).unwrap_or(i64::MAX);
    let (state, approved_by) = match &approval.state {
        ApprovalState::Executed { approved_by, .. } => ("EXECUTED", approved_by.clone()),
        ApprovalState::Pending if now > approval.expires_at => ("EXPIRED", String::new()),
        ApprovalState::Pending => ("PENDING", String::new()),
    };
    pb::Approval {
        id: approval.id.clone(),
        operation: describe(&approval.operation),
        requested_by: approval.requested_by.clone(),
        request_time: time(approval.requested_at),
        expire_time: time(approval.expires_at),
        state: state.to_owned(),
        approved_by,
    }
}

/// The answer to a call under dual control: not done yet, here is what to approve.
pub(super) fn approval_required(approval: &ApprovalRecord) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let metadata =
        std::collections::HashMap::from([("approval_id".to_owned(), approval.id.clone())]);
    Status::with_error_details(
        tonic::Code::FailedPrecondition,
        format!(
            "{} is under dual control: approval {} waits for a second officer (keyfront admin approve {})",
            describe(&approval.operation),
            approval.id,
            approval.id
        ),
        ErrorDetails::with_error_info("APPROVAL_REQUIRED", "keyfront", metadata),
    )
}

/// One page of `items` (sorted by name) after `page_token`, and the next token.
pub(super) fn page<T>(
    items: Vec<T>,
    name: impl Fn(&T) -> &str,
    page_size: i32,
    page_token: &str,
) -> Result<(Vec<T>, String), Status> {
    let size = match usize::try_from(page_size) {
        Ok(0) | Err(_) => DEFAULT_PAGE,
        Ok(n) => n.min(MAX_PAGE),
    };
    let after = if page_token.is_empty() {
        None
    } else {
        let bytes = hex::decode(page_token)
            .map_err(|_| Status::invalid_argument("page_token is not one this server issued"))?;
        Some(
            String::from_utf8(bytes).map_err(|_| {
                Status::invalid_argument("page_token is not one this server issued")
            })?,
        )
    };
    let mut rest: Vec<T> = items
        .into_iter()
        .filter(|item| after.as_deref().is_none_or(|after| name(item) > after))
        .collect();
    let next = if rest.len() > size {
        rest.truncate(size);
        rest.last()
            .map(|item| hex::encode(name(item)))
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok((rest, next))
}

/// Default and largest page sizes of List calls.
pub(super) const DEFAULT_PAGE: usize = 100;

pub(super) const MAX_PAGE: usize = 1000;
