//! Dual control: an operation under dual control is recorded, not done; a second, different
//! officer approves it, and only then is it carried out, with the parameters recorded when it
//! was asked for. Requests expire.
//!
//! Approving is idempotent where it matters: every operation under dual control keeps its
//! result when repeated (a scheduled destruction keeps its date, a policy is set to the same
//! values), so a crash between carrying it out and marking it executed is harmless.

use super::Error;
use super::lifecycle::{min_refusal, primary_refusal};
use super::{Kms, PolicyUpdate};
use crate::ids::KeyVersion;
use crate::keystore::{ApprovalRecord, ApprovalState, PendingOperation};

/// How long ended support grants and approvals stay in the store (ListGrants,
/// ListApprovals) before the scheduler removes them: the backup retention.
pub const ACCESS_HISTORY: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// How long a mutation's request_id is remembered: a retry within it gets the first answer.
pub const REQUEST_ID_TTL: std::time::Duration = std::time::Duration::from_secs(86_400);

/// Most request_ids remembered per tenant (and for calls on no tenant); the oldest go first.
pub const MAX_REQUEST_IDS_PER_TENANT: usize = 10_000;

impl Kms {
    /// Records an operation that waits for a second officer; returns the approval to name.
    ///
    /// # Errors
    /// Storage errors.
    pub fn request_approval(
        &self,
        operation: PendingOperation,
        requested_by: &str,
        ttl: std::time::Duration,
    ) -> Result<ApprovalRecord, Error> {
        self.validate(&operation)?;
        let now = self.clock.now_secs();
        let approval = ApprovalRecord {
            id: hex::encode(rand::random::<[u8; 8]>()),
            operation,
            requested_by: requested_by.to_owned(),
            requested_at: now,
            expires_at: now.saturating_add(ttl.as_secs()),
            state: ApprovalState::Pending,
        };
        self.store.put_approval(&approval)?;
        tracing::info!(approval = %approval.id, requested_by, "operation waits for a second officer");
        Ok(approval)
    }

    /// Approves and carries out a pending operation.
    ///
    /// # Errors
    /// NOT_FOUND for an unknown id; PERMISSION_DENIED when the approver is the requester or
    /// `in_scope` refuses the operation's tenant; FAILED_PRECONDITION APPROVAL_EXPIRED or
    /// ALREADY_EXECUTED; the operation's own errors.
    pub fn approve(
        &self,
        id: &str,
        approved_by: &str,
        in_scope: impl FnOnce(&PendingOperation) -> bool,
    ) -> Result<ApprovalRecord, Error> {
        let mut approval = self
            .store
            .approval(id)?
            .ok_or_else(|| Error::NotFound(format!("approval {id} not found")))?;
        if !in_scope(&approval.operation) {
            return Err(Error::PermissionDenied);
        }
        if approval.requested_by == approved_by {
            return Err(Error::PermissionDeniedBecause(
                "dual control: a second, different officer must approve".into(),
            ));
        }
        if let ApprovalState::Executed { .. } = approval.state {
            return Err(Error::KeyState {
                reason: "ALREADY_EXECUTED",
                message: format!("approval {id} was already approved and carried out"),
            });
        }
        let now = self.clock.now_secs();
        if now > approval.expires_at {
            return Err(Error::KeyState {
                reason: "APPROVAL_EXPIRED",
                message: format!(
                    "approval {id} expired at {} (seconds since the epoch); ask again",
                    approval.expires_at
                ),
            });
        }
        self.execute(&approval.operation)?;
        approval.state = ApprovalState::Executed {
            approved_by: approved_by.to_owned(),
            at: now,
        };
        self.store.put_approval(&approval)?;
        tracing::info!(approval = %id, approved_by, "approved operation carried out");
        Ok(approval)
    }

    /// Every approval, pending or done.
    ///
    /// # Errors
    /// Storage errors.
    pub fn approvals(&self) -> Result<Vec<ApprovalRecord>, Error> {
        Ok(self.store.approvals()?)
    }

    /// Removes support grants and approvals that ended more than [`ACCESS_HISTORY`] ago (the
    /// scheduler runs it each tick), with one `system:scheduler` audit line when anything
    /// went. Returns how many grants and approvals were removed.
    ///
    /// # Errors
    /// Storage errors; [`Error::AuditUnavailable`].
    pub fn prune_access_history(&self) -> Result<(usize, usize), Error> {
        self.prune_access_history_at(self.clock.now_secs())
    }

    /// [`Kms::prune_access_history`] as of `now` (see [`Kms::run_due_destructions_at`]).
    ///
    /// # Errors
    /// As [`Kms::prune_access_history`].
    pub fn prune_access_history_at(&self, now: u64) -> Result<(usize, usize), Error> {
        let before = now.saturating_sub(ACCESS_HISTORY.as_secs());
        let (grants, approvals) = self.store.prune_ended_access(before)?;
        if grants + approvals > 0 {
            self.system_event(
                "prune_access_history",
                &format!("OK: {grants} grant(s) and {approvals} approval(s) ended over 30 days ago removed"),
                None,
                None,
                None,
            )?;
        }
        Ok((grants, approvals))
    }

    /// Removes kept request_id responses older than [`REQUEST_ID_TTL`], and in each tenant all
    /// but the newest [`MAX_REQUEST_IDS_PER_TENANT`] (the scheduler runs it each tick).
    ///
    /// # Errors
    /// Storage errors.
    pub fn prune_request_ids(&self) -> Result<usize, Error> {
        self.prune_request_ids_at(self.clock.now_secs())
    }

    /// [`Kms::prune_request_ids`] as of `now` (see [`Kms::run_due_destructions_at`]).
    ///
    /// # Errors
    /// As [`Kms::prune_request_ids`].
    pub fn prune_request_ids_at(&self, now: u64) -> Result<usize, Error> {
        let before = now.saturating_sub(REQUEST_ID_TTL.as_secs());
        Ok(self
            .store
            .prune_done_requests(before, MAX_REQUEST_IDS_PER_TENANT)?)
    }

    /// Refuses at request time what could never be carried out, so no approval is wasted.
    fn validate(&self, operation: &PendingOperation) -> Result<(), Error> {
        match operation {
            PendingOperation::RotateMasterKey => {}
            PendingOperation::DestroyTenant { tenant } => {
                self.tenant(tenant)?;
            }
            PendingOperation::ScheduleKeyVersionDestruction {
                tenant,
                key,
                version,
            } => {
                let record = self.key(self.tenant_id(tenant)?, key)?;
                if *version == 0 || *version > record.latest.0 {
                    return Err(Error::VersionNotFound {
                        key: key.clone(),
                        version: *version,
                    });
                }
                if let Some(refusal) = primary_refusal(&record, KeyVersion(*version)) {
                    return Err(refusal);
                }
            }
            PendingOperation::UpdateKeyPolicy {
                tenant,
                key,
                min_decryption_version,
                ..
            } => {
                let record = self.key(self.tenant_id(tenant)?, key)?;
                if let Some(refusal) =
                    min_decryption_version.and_then(|min| min_refusal(&record, min))
                {
                    return Err(refusal);
                }
            }
            // Checked by its handler (the material unwrapped, its check value taken).
            PendingOperation::ImportKeyMaterial { .. } => {}
        }
        Ok(())
    }

    fn execute(&self, operation: &PendingOperation) -> Result<(), Error> {
        match operation {
            PendingOperation::RotateMasterKey => {
                self.rotate_master_key()?;
            }
            PendingOperation::DestroyTenant { tenant } => {
                self.schedule_tenant_destruction(tenant)?;
            }
            PendingOperation::ScheduleKeyVersionDestruction {
                tenant,
                key,
                version,
            } => {
                let id = self.tenant_id(tenant)?;
                self.schedule_destruction(id, key, KeyVersion(*version))?;
            }
            PendingOperation::ImportKeyMaterial {
                tenant,
                key,
                token,
                material,
                purpose,
                expires_at,
                allow_generated_rotation,
                key_check_value,
            } => {
                let id = self.tenant_id(tenant)?;
                let import = super::Import {
                    token,
                    material,
                    purpose: *purpose,
                    expires_at: *expires_at,
                    allow_generated_rotation: *allow_generated_rotation,
                };
                // The same material the first officer asked for, or nothing.
                if self.check_key_material(id, key, &import)? != *key_check_value {
                    return Err(Error::InvalidArgument(
                        "the key material no longer has the check value it was approved with"
                            .into(),
                    ));
                }
                self.import_key_material(id, key, &import)?;
            }
            PendingOperation::UpdateKeyPolicy {
                tenant,
                key,
                min_decryption_version,
                rotation_period_secs,
                destruction_window_secs,
                max_kek_uses,
                max_bulk_uses,
            } => {
                let id = self.tenant_id(tenant)?;
                self.update_policy(
                    id,
                    key,
                    &PolicyUpdate {
                        min_decryption_version: *min_decryption_version,
                        rotation_period_secs: *rotation_period_secs,
                        destruction_window_secs: *destruction_window_secs,
                        max_kek_uses: *max_kek_uses,
                        max_bulk_uses: *max_bulk_uses,
                    },
                )?;
            }
        }
        Ok(())
    }
}
