//! `AccessService`: support access with the customer's consent, and the access review; plus
//! the record of when each principal was last authorized, which the review reports.
//!
//! Roles decide who may call each RPC (`auth.rs`); tenant scope and "never the requester" are
//! judged against the grant record in the domain (`kms/access.rs`). Under an approved grant a
//! support principal calls KeyService with `grant_id` (`Shared::begin_under`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::admin_messages::page;
use super::auth::{Rpc, parse_name};
use super::{Shared, blocking, pb};
use crate::config::{Role, TenantScope};
use crate::keystore::{GrantRecord, LastUse};
use crate::kms::{GrantRequest, Kms, grant_state};

/// When each principal was last authorized, in memory; a task stores what changed
/// once a minute, so a busy principal costs no write per request.
#[derive(Debug, Default)]
pub struct LastUses {
    by_identity: RwLock<HashMap<String, Entry>>,
}

#[derive(Debug, Default)]
struct Entry {
    at: AtomicU64,
    not_after: AtomicU64,
    saved: AtomicU64,
}

impl LastUses {
    /// Records an authorized request of `identity` at `now`, with its certificate's notAfter.
    pub fn touch(&self, identity: &str, now: u64, not_after: u64) {
        let set = |entry: &Entry| {
            entry.at.fetch_max(now, Ordering::Relaxed);
            entry.not_after.store(not_after, Ordering::Relaxed);
        };
        if let Some(entry) = self
            .by_identity
            .read()
            .expect("last-use lock poisoned")
            .get(identity)
        {
            set(entry);
            return;
        }
        let mut all = self.by_identity.write().expect("last-use lock poisoned");
        set(all.entry(identity.to_owned()).or_default());
    }

    /// What changed since the last save.
    fn unsaved(&self) -> Vec<(String, LastUse)> {
        self.by_identity
            .read()
            .expect("last-use lock poisoned")
            .iter()
            .filter_map(|(identity, entry)| {
                let at = entry.at.load(Ordering::Relaxed);
                (at > entry.saved.load(Ordering::Relaxed)).then(|| {
                    let certificate_not_after = entry.not_after.load(Ordering::Relaxed);
                    (
                        identity.clone(),
                        LastUse {
                            at,
                            certificate_not_after,
                        },
                    )
                })
            })
            .collect()
    }

    fn mark_saved(&self, saved: &[(String, LastUse)]) {
        let all = self.by_identity.read().expect("last-use lock poisoned");
        for (identity, last) in saved {
            if let Some(entry) = all.get(identity) {
                entry.saved.fetch_max(last.at, Ordering::Relaxed);
            }
        }
    }

    /// The stored last uses, overlaid with the newer ones in memory.
    fn merged(&self, mut stored: HashMap<String, LastUse>) -> HashMap<String, LastUse> {
        for (identity, entry) in self
            .by_identity
            .read()
            .expect("last-use lock poisoned")
            .iter()
        {
            let at = entry.at.load(Ordering::Relaxed);
            let known = stored.entry(identity.clone()).or_default();
            if at >= known.at {
                *known = LastUse {
                    at,
                    certificate_not_after: entry.not_after.load(Ordering::Relaxed),
                };
            }
        }
        stored
    }
}

const SAVE_EVERY: Duration = Duration::from_secs(60);

/// Stores changed last uses every minute while the server and its domain live. A crash loses
/// at most the last minute of them; the audit log has every request anyway.
pub(super) async fn save_last_uses(shared: Weak<Shared>, kms: Weak<Kms>) {
    loop {
        tokio::time::sleep(SAVE_EVERY).await;
        let (Some(shared), Some(kms)) = (shared.upgrade(), kms.upgrade()) else {
            return;
        };
        let unsaved = shared.last_uses.unsaved();
        if unsaved.is_empty() {
            continue;
        }
        let saving = unsaved.clone();
        match blocking(kms, move |kms| kms.store_last_uses(&saving)).await {
            Ok(()) => shared.last_uses.mark_saved(&unsaved),
            Err(status) => {
                tracing::warn!(error = %status.message(), "saving principals' last use failed; retried in a minute");
            }
        }
    }
}

/// The `AccessService` implementation.
pub struct AccessService {
    shared: Arc<Shared>,
}

impl AccessService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

fn time(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

fn grant_message(grant: &GrantRecord, now: u64) -> pb::Grant {
    pb::Grant {
        id: grant.id.clone(),
        tenant: grant.tenant.to_string(),
        requested_by: grant.requested_by.clone(),
        reason: grant.reason.clone(),
        operations: grant.operations.clone(),
        keys: grant.keys.iter().map(ToString::to_string).collect(),
        duration_secs: grant.duration_secs,
        state: grant_state(grant, now).to_owned(),
        request_time: time(grant.requested_at),
        decided_by: grant.decided_by.clone().unwrap_or_default(),
        decide_time: grant.decided_at.map_or(0, time),
        expire_time: grant.expires_at.map_or(0, time),
        revoked_by: grant.revoked_by.clone().unwrap_or_default(),
        revoke_time: grant.revoked_at.map_or(0, time),
    }
}

fn grant_id(id: &str) -> Result<String, Status> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Status::invalid_argument(
            "grant_id: the hex id RequestSupportAccess returned",
        ));
    }
    Ok(id.to_owned())
}

fn scope_contains(scope: &TenantScope, tenant: &crate::ids::Name) -> bool {
    match scope {
        TenantScope::All => true,
        TenantScope::Only(names) => names.contains(tenant),
    }
}

impl AccessService {
    async fn decide(
        &self,
        request: Request<pb::DecideSupportAccessRequest>,
        rpc: Rpc,
    ) -> Result<Response<pb::Grant>, Status> {
        let id = grant_id(&request.get_ref().grant_id)?;
        Shared::slot(&request).update(|d| d.grant_id = Some(id.clone()));
        let call = self.shared.begin(&request, rpc, "", None)?;
        let principal = call.principal();
        let decider = call.identity().to_owned();
        let approve = rpc == Rpc::ApproveSupportAccess;
        let grant = call
            .run_global(move |kms| {
                kms.decide_grant(&id, &decider, approve, |tenant| {
                    scope_contains(&principal.tenants, tenant)
                })
            })
            .await?;
        call.slot
            .update(|d| d.tenant = Some(grant.tenant.to_string()));
        Ok(Response::new(grant_message(&grant, call.now_secs())))
    }
}

#[tonic::async_trait]
impl pb::access_service_server::AccessService for AccessService {
    async fn request_support_access(
        &self,
        request: Request<pb::RequestSupportAccessRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        let r = request.get_ref();
        let call = self
            .shared
            .begin(&request, Rpc::RequestSupportAccess, &r.tenant, None)?;
        let r = request.into_inner();
        let tenant = call.tenant()?;
        let max = self.shared.access.max_grant;
        if r.duration_secs == 0 || r.duration_secs > max.as_secs() {
            return Err(Status::invalid_argument(format!(
                "duration_secs must be 1 to {} (access.max_grant_secs)",
                max.as_secs()
            )));
        }
        let mut operations = Vec::with_capacity(r.operations.len());
        for name in &r.operations {
            let rpc = Rpc::data_plane(name).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "operations: {name:?} is not a KeyService RPC (e.g. \"Decrypt\")"
                ))
            })?;
            operations.push(rpc.to_string());
        }
        if r.keys.len() > 64 || operations.len() > 64 {
            return Err(Status::invalid_argument(
                "operations and keys: at most 64 of each",
            ));
        }
        let keys = r
            .keys
            .iter()
            .map(|k| parse_name(k, "keys"))
            .collect::<Result<Vec<_>, _>>()?;
        let requested_by = call.identity().to_owned();
        let ttl = self.shared.access.request_ttl;
        let grant = call
            .run_global(move |kms| {
                kms.request_grant(
                    GrantRequest {
                        tenant,
                        reason: r.reason,
                        operations,
                        keys,
                        duration: Duration::from_secs(r.duration_secs),
                    },
                    &requested_by,
                    ttl,
                )
            })
            .await?;
        call.slot.update(|d| d.grant_id = Some(grant.id.clone()));
        Ok(Response::new(grant_message(&grant, call.now_secs())))
    }

    async fn approve_support_access(
        &self,
        request: Request<pb::DecideSupportAccessRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        self.decide(request, Rpc::ApproveSupportAccess).await
    }

    async fn deny_support_access(
        &self,
        request: Request<pb::DecideSupportAccessRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        self.decide(request, Rpc::DenySupportAccess).await
    }

    async fn revoke_grant(
        &self,
        request: Request<pb::RevokeGrantRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        let id = grant_id(&request.get_ref().grant_id)?;
        Shared::slot(&request).update(|d| d.grant_id = Some(id.clone()));
        let call = self.shared.begin(&request, Rpc::RevokeGrant, "", None)?;
        let principal = call.principal();
        let revoker = call.identity().to_owned();
        let grant = call
            .run_global(move |kms| {
                kms.revoke_grant(&id, &revoker, |grant| {
                    let roles = &principal.roles;
                    let scoped = scope_contains(&principal.tenants, &grant.tenant);
                    (scoped
                        && (roles.contains(&Role::TenantAdmin) || roles.contains(&Role::Officer)))
                        || (roles.contains(&Role::Support) && grant.requested_by == revoker)
                })
            })
            .await?;
        call.slot
            .update(|d| d.tenant = Some(grant.tenant.to_string()));
        Ok(Response::new(grant_message(&grant, call.now_secs())))
    }

    async fn list_grants(
        &self,
        request: Request<pb::ListGrantsRequest>,
    ) -> Result<Response<pb::ListGrantsResponse>, Status> {
        let r = request.get_ref();
        let call = self
            .shared
            .begin(&request, Rpc::ListGrants, &r.tenant, None)?;
        let r = request.into_inner();
        let tenant = call.authorized.tenant.clone();
        // Support sees its own requests only: not other supporters' reasons, nor which
        // tenants they reach (officers and auditors review them all; a tenant-admin its
        // tenants').
        let roles = &call.principal().roles;
        let own_only = roles.contains(&Role::Support)
            && !roles
                .iter()
                .any(|role| matches!(role, Role::Officer | Role::Auditor | Role::TenantAdmin));
        let identity = call.identity().to_owned();
        let grants = call
            .run_global(move |kms| kms.grants())
            .await?
            .into_iter()
            .filter(|g| tenant.as_ref().is_none_or(|t| *t == g.tenant))
            .filter(|g| !own_only || g.requested_by == identity)
            // Newest first, as a key the pager can compare.
            .map(|g| (format!("{:020}-{}", u64::MAX - g.requested_at, g.id), g))
            .collect::<Vec<_>>();
        let (grants, next_page_token) =
            page(grants, |(key, _)| key.as_str(), r.page_size, &r.page_token)?;
        let now = call.now_secs();
        Ok(Response::new(pb::ListGrantsResponse {
            grants: grants.iter().map(|(_, g)| grant_message(g, now)).collect(),
            next_page_token,
        }))
    }

    async fn review_access(
        &self,
        request: Request<pb::ReviewAccessRequest>,
    ) -> Result<Response<pb::ReviewAccessResponse>, Status> {
        let call = self.shared.begin(&request, Rpc::ReviewAccess, "", None)?;
        let r = request.into_inner();
        let principals = Arc::clone(
            &self
                .shared
                .principals
                .read()
                .expect("principals lock poisoned"),
        )
        .all();
        let (stored, grants) = call
            .run_global(|kms| Ok((kms.last_uses()?, kms.grants()?)))
            .await?;
        let last_uses = self.shared.last_uses.merged(stored);
        let now = call.now_secs();
        let (principals, next_page_token) = page(
            principals,
            |p| p.identity.as_str(),
            r.page_size,
            &r.page_token,
        )?;
        let reviews = principals
            .iter()
            .map(|p| {
                let last = last_uses.get(&p.identity).copied().unwrap_or_default();
                pb::PrincipalReview {
                    identity: p.identity.clone(),
                    tenants: match &p.tenants {
                        TenantScope::All => vec!["*".to_owned()],
                        TenantScope::Only(names) => names.iter().map(ToString::to_string).collect(),
                    },
                    roles: p.roles.iter().map(|r| r.as_str().to_owned()).collect(),
                    keys: p.keys.iter().flatten().map(ToString::to_string).collect(),
                    last_use_time: time(last.at),
                    certificate_expire_time: time(last.certificate_not_after),
                    active_grants: grants
                        .iter()
                        .filter(|g| {
                            g.requested_by == p.identity && grant_state(g, now) == "APPROVED"
                        })
                        .map(|g| g.id.clone())
                        .collect(),
                }
            })
            .collect();
        Ok(Response::new(pb::ReviewAccessResponse {
            principals: reviews,
            next_page_token,
        }))
    }
}
