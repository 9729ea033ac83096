//! Support access with the customer's consent: a support principal asks for named operations
//! on named keys of one tenant for a bounded time; a tenant-admin of that tenant (never the
//! requester) approves or denies; the grant ends at its expiry or when revoked, whichever
//! comes first. Time is the domain's clock, so tests move it.
//!
//! Who may call what is decided by the service layer (roles, tenant scope); this module owns
//! the rules that need the record: the requester never decides, only pending requests are
//! decided, and a grant is active only while approved, unexpired and for the tenant it named.

use std::collections::HashMap;
use std::time::Duration;

use super::Error;
use super::Kms;
use crate::ids::Name;
use crate::keystore::{GrantRecord, GrantState, LastUse};

/// What a support principal asks for.
#[derive(Debug, Clone)]
pub struct GrantRequest {
    /// The tenant.
    pub tenant: Name,
    /// Why.
    pub reason: String,
    /// KeyService RPC names (validated by the caller).
    pub operations: Vec<String>,
    /// Key names.
    pub keys: Vec<Name>,
    /// How long, once approved.
    pub duration: Duration,
}

/// A grant's state as of now: stored state, with expiry applied.
pub fn grant_state(grant: &GrantRecord, now: u64) -> &'static str {
    match grant.state {
        GrantState::Pending if now > grant.request_expires_at => "EXPIRED",
        GrantState::Pending => "PENDING",
        GrantState::Approved if grant.expires_at.is_some_and(|at| now >= at) => "EXPIRED",
        GrantState::Approved => "APPROVED",
        GrantState::Denied => "DENIED",
        GrantState::Revoked => "REVOKED",
    }
}

const REASON_MAX: usize = 1024;

impl Kms {
    /// Records a pending request for support access; a tenant-admin decides on it.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for an empty or long reason or no operations or keys; NOT_FOUND for an
    /// unknown tenant; storage errors.
    pub fn request_grant(
        &self,
        request: GrantRequest,
        requested_by: &str,
        request_ttl: Duration,
    ) -> Result<GrantRecord, Error> {
        let reason = request.reason.trim();
        if reason.is_empty() || reason.len() > REASON_MAX {
            return Err(Error::InvalidArgument(format!(
                "reason: say why, in 1 to {REASON_MAX} bytes"
            )));
        }
        if request.operations.is_empty() || request.keys.is_empty() {
            return Err(Error::InvalidArgument(
                "operations and keys: name at least one of each".into(),
            ));
        }
        let tenant_id = self.tenant_id(&request.tenant)?;
        let now = self.clock.now_secs();
        let mut operations = request.operations;
        operations.sort();
        operations.dedup();
        let mut keys = request.keys;
        keys.sort();
        keys.dedup();
        let grant = GrantRecord {
            id: hex::encode(rand::random::<[u8; 12]>()),
            tenant: request.tenant,
            tenant_id,
            requested_by: requested_by.to_owned(),
            reason: reason.to_owned(),
            operations,
            keys,
            duration_secs: request.duration.as_secs(),
            requested_at: now,
            request_expires_at: now.saturating_add(request_ttl.as_secs()),
            state: GrantState::Pending,
            decided_by: None,
            decided_at: None,
            expires_at: None,
            revoked_by: None,
            revoked_at: None,
        };
        self.store.put_grant(&grant)?;
        tracing::info!(grant = %grant.id, requested_by, tenant = %grant.tenant, "support access requested");
        Ok(grant)
    }

    /// Approves (`approve`) or denies a pending request.
    ///
    /// # Errors
    /// NOT_FOUND for an unknown id; PERMISSION_DENIED when `in_scope` refuses its tenant or the
    /// decider is the requester;
    /// FAILED_PRECONDITION GRANT_NOT_PENDING or REQUEST_EXPIRED.
    pub fn decide_grant(
        &self,
        id: &str,
        decided_by: &str,
        approve: bool,
        in_scope: impl Fn(&Name) -> bool,
    ) -> Result<GrantRecord, Error> {
        // A guarded transition from the state read: if another decision or a revocation
        // wrote first, the grant is read again and the rules decide on what it is now
        // (REVOKED and DENIED are final).
        loop {
            let (mut grant, stored) = self.grant_for_update(id)?;
            if !in_scope(&grant.tenant) {
                return Err(Error::PermissionDeniedBecause(
                    "the grant is for a tenant outside this principal's tenants".into(),
                ));
            }
            if grant.requested_by == decided_by {
                return Err(Error::PermissionDeniedBecause(
                    "the requester of a grant cannot decide on it".into(),
                ));
            }
            let now = self.clock.now_secs();
            match grant_state(&grant, now) {
                "PENDING" => {}
                "EXPIRED" if grant.state == GrantState::Pending => {
                    return Err(Error::KeyState {
                        reason: "REQUEST_EXPIRED",
                        message: format!("grant {id} was not decided in time; ask again"),
                    });
                }
                state => {
                    return Err(Error::KeyState {
                        reason: "GRANT_NOT_PENDING",
                        message: format!("grant {id} is {state}, not pending"),
                    });
                }
            }
            grant.decided_by = Some(decided_by.to_owned());
            grant.decided_at = Some(now);
            if approve {
                grant.state = GrantState::Approved;
                grant.expires_at = Some(now.saturating_add(grant.duration_secs));
            } else {
                grant.state = GrantState::Denied;
            }
            if self.store.replace_grant(&stored, &grant)? {
                tracing::info!(grant = %id, decided_by, approve, "support access decided");
                return Ok(grant);
            }
        }
    }

    /// Ends a pending or approved grant now. Revoking a grant that already ended changes
    /// nothing and answers it as it is.
    ///
    /// # Errors
    /// NOT_FOUND for an unknown id; PERMISSION_DENIED when `may_revoke` refuses.
    pub fn revoke_grant(
        &self,
        id: &str,
        revoked_by: &str,
        may_revoke: impl Fn(&GrantRecord) -> bool,
    ) -> Result<GrantRecord, Error> {
        // Guarded as in `decide_grant`: a revocation that raced an approval is applied to the
        // approved grant, never lost under it.
        loop {
            let (mut grant, stored) = self.grant_for_update(id)?;
            if !may_revoke(&grant) {
                return Err(Error::PermissionDeniedBecause(
                    "only a tenant-admin of its tenant, an officer or its requester may revoke a grant"
                        .into(),
                ));
            }
            if !matches!(grant.state, GrantState::Pending | GrantState::Approved) {
                return Ok(grant);
            }
            grant.state = GrantState::Revoked;
            grant.revoked_by = Some(revoked_by.to_owned());
            grant.revoked_at = Some(self.clock.now_secs());
            if self.store.replace_grant(&stored, &grant)? {
                tracing::info!(grant = %id, revoked_by, "support grant revoked");
                return Ok(grant);
            }
        }
    }

    /// The grant `identity` acts under, if it is active now: approved, unexpired, asked for by
    /// `identity`, and its tenant still the one it was given for.
    ///
    /// # Errors
    /// Storage errors only; `None` for every other reason (the caller answers one message).
    pub fn active_grant(&self, id: &str, identity: &str) -> Result<Option<GrantRecord>, Error> {
        let Some(grant) = self.store.grant(id)? else {
            return Ok(None);
        };
        if grant.requested_by != identity
            || grant_state(&grant, self.clock.now_secs()) != "APPROVED"
            || self.tenant_id(&grant.tenant).ok() != Some(grant.tenant_id)
        {
            return Ok(None);
        }
        Ok(Some(grant))
    }

    /// Every grant, newest first.
    ///
    /// # Errors
    /// Storage errors.
    pub fn grants(&self) -> Result<Vec<GrantRecord>, Error> {
        let mut all = self.store.grants()?;
        all.sort_by(|a, b| {
            b.requested_at
                .cmp(&a.requested_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(all)
    }

    /// Stores principals' last use (the service batches them, at most once a minute).
    ///
    /// # Errors
    /// Storage errors.
    pub fn store_last_uses(&self, uses: &[(String, LastUse)]) -> Result<(), Error> {
        Ok(self.store.set_last_uses(uses)?)
    }

    /// Every principal's stored last use.
    ///
    /// # Errors
    /// Storage errors.
    pub fn last_uses(&self) -> Result<HashMap<String, LastUse>, Error> {
        Ok(self.store.last_uses()?)
    }

    fn grant_for_update(&self, id: &str) -> Result<(GrantRecord, Vec<u8>), Error> {
        self.store
            .grant_for_update(id)?
            .ok_or_else(|| Error::NotFound(format!("grant {id} not found")))
    }
}
