//! The gRPC service: `KeyService`, `AdminService`, health and reflection over TLS 1.3 with
//! client certificates, behind one request pipeline (limits + audit).
//!
//! Shape of a request: TLS connection (identity parsed once, `tls.rs`) → pipeline (concurrency
//! limit, deadline, audit line, `layer.rs`) → handler (authorize before any lookup, `auth.rs`;
//! convert, `convert.rs`; call the domain on the blocking pool) → one error mapping
//! (`status.rs`).
//!
//! The HSM may be unreachable when the server starts: it serves health NOT_SERVING and
//! UNAVAILABLE, retries, and starts serving when the HSM answers. A refused PIN stops the
//! process instead (HSMs lock PINs after failed logins).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use prost::Message;
use tonic::{Request, Status};

use crate::audit::AuditLog;
use crate::config::{Config, Limits, PrincipalConfig};
use crate::ids::{Name, TenantId};
use crate::kms::Error;
use crate::kms::{Decrypted, Kms};

pub mod access;
pub mod admin;
mod admin_messages;
pub mod auth;
pub mod convert;
pub mod keys;
pub mod layer;
pub mod pb;
mod server;
pub mod status;
pub mod tls;

use auth::{Authorized, PeerInfo, Principals, Rpc};
use layer::AuditSlot;
#[cfg(feature = "test-hooks")]
pub use server::InProcess;
use server::audit_role_combinations;
pub use server::{HsmConnector, STORE_HEALTH, ServeError, Server};

/// State shared by all handlers.
pub struct Shared {
    kms: OnceLock<Arc<Kms>>,
    audit: Arc<AuditLog>,
    // Replaced whole on SIGHUP; each request reads the current rules once.
    principals: std::sync::RwLock<Arc<Principals>>,
    limits: Limits,
    dual_control: crate::config::DualControl,
    access: crate::config::Access,
    // When each principal was last authorized, for ReviewAccess; saved every minute.
    last_uses: access::LastUses,
    // Slots for Argon2 computations (HashPassword, VerifyPassword): when none is free the call
    // is refused at once instead of queueing behind a flood of logins.
    password_slots: Arc<tokio::sync::Semaphore>,
    // Snapshots (`[backup]`), if a backup directory is configured.
    backups: Option<Arc<crate::backup::nightly::Backups>>,
    pub(crate) nightly_backups: bool,
}

impl Shared {
    /// The handlers' state before the HSM is reached (the domain is set once it is).
    fn new(
        audit: Arc<AuditLog>,
        principals: &[PrincipalConfig],
        revocations: &crate::config::Revocations,
        limits: Limits,
        dual_control: crate::config::DualControl,
        grants: crate::config::Access,
        backup: &crate::config::Backup,
    ) -> Self {
        audit_role_combinations(&audit, principals);
        Self {
            kms: OnceLock::new(),
            audit,
            principals: std::sync::RwLock::new(Arc::new(Principals::new(principals, revocations))),
            limits,
            dual_control,
            access: grants,
            last_uses: access::LastUses::default(),
            password_slots: Arc::new(tokio::sync::Semaphore::new(
                limits.max_concurrent_password_hashes,
            )),
            backups: backup.dir.as_ref().map(|dir| {
                Arc::new(crate::backup::nightly::Backups::new(
                    dir,
                    backup.retention_days,
                    backup.at_secs,
                ))
            }),
            nightly_backups: backup.nightly && backup.dir.is_some(),
        }
    }

    /// The backups, or FAILED_PRECONDITION when none are configured.
    fn backups(&self) -> Result<Arc<crate::backup::nightly::Backups>, Status> {
        self.backups.clone().ok_or_else(|| {
            status::failed_precondition(
                "no backup directory is configured ([backup] dir)",
                "BACKUPS_NOT_CONFIGURED",
            )
        })
    }

    /// A slot for one Argon2 computation, or RESOURCE_EXHAUSTED when all are taken.
    fn password_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        Arc::clone(&self.password_slots)
            .try_acquire_owned()
            .map_err(|_| {
                Status::resource_exhausted(
                    "password hashing is at capacity (server.max_concurrent_password_hashes); retry with backoff",
                )
            })
    }

    /// Installs new principals and revocations; requests from now on, on new and open
    /// connections alike, are judged by them. Requests in flight keep the rules they began with.
    pub(crate) fn reload(&self, config: &Config) {
        audit_role_combinations(&self.audit, &config.principals);
        let principals = Arc::new(Principals::new(&config.principals, &config.revocations));
        *self.principals.write().expect("principals lock poisoned") = principals;
        let logged = self.audit.system(&crate::audit::SystemRecord {
            actor: "system:reload",
            action: "reload_principals",
            outcome: "OK".into(),
            detail: Some(format!(
                "{} principals, {} revoked serials, {} revoked fingerprints",
                config.principals.len(),
                config.revocations.serial_count(),
                config.revocations.fingerprints.len()
            )),
            ..crate::audit::SystemRecord::default()
        });
        if let Err(error) = logged {
            tracing::error!(%error, "audit write failed for the reload (the new rules are in force)");
        }
    }

    fn under_dual_control(&self, operation: crate::config::DualOperation) -> bool {
        self.dual_control.operations.contains(&operation)
    }

    /// Authorizes a request and, for a mutation, logs its intent line. `tenant` is the
    /// request's tenant field (empty if unset), `key` its key name if it names one.
    fn begin<T>(
        &self,
        request: &Request<T>,
        rpc: Rpc,
        tenant: &str,
        key: Option<&str>,
    ) -> Result<Call, Status> {
        self.begin_under(request, "", rpc, tenant, key)
    }

    /// [`Shared::begin`] for a KeyService call, which a support principal makes under the
    /// grant `grant_id` names (empty: no grant).
    fn begin_under<T>(
        &self,
        request: &Request<T>,
        grant_id: &str,
        rpc: Rpc,
        tenant: &str,
        key: Option<&str>,
    ) -> Result<Call, Status> {
        let slot = Self::slot(request);
        slot.update(|d| {
            d.tenant = (!tenant.is_empty()).then(|| tenant.to_owned());
            d.key = key.filter(|k| !k.is_empty()).map(str::to_owned);
            if !grant_id.is_empty() {
                d.grant_id = Some(grant_id.to_owned());
            }
        });
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let principals = Arc::clone(&self.principals.read().expect("principals lock poisoned"));
        let kms = || {
            self.kms
                .get()
                .cloned()
                .ok_or_else(|| Status::unavailable("the HSM is not reachable yet; retry"))
        };
        let authorized = if grant_id.is_empty() {
            principals.authorize(peer, rpc, tenant, key)?
        } else {
            // Who may name a grant at all is decided before the grant is looked up.
            let principal = principals.principal(peer)?;
            if !principal.roles.contains(&crate::config::Role::Support) {
                return Err(Status::permission_denied(
                    "grant_id is only for support principals",
                ));
            }
            if grant_id.len() > 64 {
                return Err(Status::invalid_argument("grant_id is too long"));
            }
            let grant = kms()?
                .active_grant(grant_id, &principal.identity)
                .map_err(Status::from)?
                .ok_or_else(|| Status::permission_denied(auth::GRANT_REFUSED))?;
            principals.authorize_grant(peer, rpc, &grant, tenant, key)?
        };
        if let Some(tenant) = &authorized.tenant {
            slot.update(|d| d.tenant = Some(tenant.to_string()));
        }
        let kms = kms()?;
        let identity = peer.identity.clone().unwrap_or_default();
        self.last_uses
            .touch(&identity, kms.clock().now_secs(), peer.not_after);
        if rpc.mutates() {
            // Logged before it acts: a mutation the log cannot take is not carried out.
            self.audit
                .intent(&crate::audit::IntentRecord {
                    request_id: slot.request_id(),
                    identity: identity.clone(),
                    rpc: rpc.to_string(),
                    tenant: authorized.tenant.as_ref().map(ToString::to_string),
                    key: key.filter(|k| !k.is_empty()).map(str::to_owned),
                    grant_id: slot.grant_id(),
                })
                .map_err(|error| {
                    tracing::error!(%error, "audit write failed; refusing the mutation");
                    Status::unavailable("audit log unavailable; nothing was done")
                })?;
        }
        Ok(Call {
            slot,
            authorized,
            kms,
            identity,
        })
    }

    /// The request's audit slot (shared with the pipeline that writes its line).
    fn slot<T>(request: &Request<T>) -> AuditSlot {
        request
            .extensions()
            .get::<AuditSlot>()
            .cloned()
            .unwrap_or_default()
    }

    fn check_batch(&self, items: usize) -> Result<(), Status> {
        if items > self.limits.max_batch_items {
            return Err(Status::resource_exhausted(format!(
                "batch has {items} items; at most {} are allowed",
                self.limits.max_batch_items
            )));
        }
        Ok(())
    }

    /// The first answer to a mutation retried with the same `request_id` by the same caller
    /// in the same tenant, from the store (so it survives restarts and holds across nodes);
    /// `None` for a first call or an empty id.
    async fn replay<M: Message + Default>(
        &self,
        call: &Call,
        rpc: Rpc,
        request_id: &str,
    ) -> Result<Option<M>, Status> {
        if request_id.is_empty() {
            return Ok(None);
        }
        if request_id.len() > MAX_REQUEST_ID_LEN {
            return Err(Status::invalid_argument(format!(
                "request_id: at most {MAX_REQUEST_ID_LEN} bytes"
            )));
        }
        let (scope, identity, id) = (
            call.request_scope(),
            call.identity.clone(),
            request_id.to_owned(),
        );
        let done = blocking(Arc::clone(&call.kms), move |kms| {
            Ok(kms.store().done_request(&scope, &identity, &id)?)
        })
        .await?;
        match done {
            None => Ok(None),
            Some(done) if done.rpc != rpc.to_string() => Err(status::failed_precondition(
                "request_id was already used for another call",
                "REQUEST_ID_REUSED",
            )),
            Some(done) => M::decode(done.response.as_slice())
                .map(Some)
                .map_err(|_| Status::internal("internal error")),
        }
    }

    /// Keeps a mutation's answer under its `request_id`. Best effort: the mutation is done
    /// whatever happens here, so a failure is logged and the answer still goes out (a retry
    /// of it would then run again). A crash between the mutation's commit and this one has
    /// the same effect.
    async fn remember<M: Message>(&self, call: &Call, rpc: Rpc, request_id: &str, response: &M) {
        if request_id.is_empty() {
            return;
        }
        let done = crate::keystore::DoneRequest {
            rpc: rpc.to_string(),
            response: admin::encode(response),
            at: call.now_secs(),
        };
        let (scope, identity, id) = (
            call.request_scope(),
            call.identity.clone(),
            request_id.to_owned(),
        );
        let kept = blocking(Arc::clone(&call.kms), move |kms| {
            Ok(kms
                .store()
                .put_done_request(&scope, &identity, &id, &done)?)
        })
        .await;
        if let Err(status) = kept {
            tracing::warn!(%rpc, %status, "the request_id could not be kept; a retry would run again");
        }
    }
}

/// One authorized request in progress.
struct Call {
    slot: AuditSlot,
    authorized: Authorized,
    kms: Arc<Kms>,
    identity: String,
}

impl Call {
    /// Where this call's request_ids live: its tenant, or `*` for calls on no tenant.
    fn request_scope(&self) -> String {
        self.authorized
            .tenant
            .as_ref()
            .map_or_else(|| "*".to_owned(), ToString::to_string)
    }

    fn identity(&self) -> &str {
        &self.identity
    }

    fn now_secs(&self) -> u64 {
        self.kms.clock().now_secs()
    }

    fn tenant(&self) -> Result<Name, Status> {
        self.authorized
            .tenant
            .clone()
            .ok_or_else(|| Status::invalid_argument("tenant is required"))
    }

    fn principal(&self) -> Arc<PrincipalConfig> {
        Arc::clone(&self.authorized.principal)
    }

    fn allowed_keys(&self) -> Option<Vec<Name>> {
        self.authorized.principal.keys.clone()
    }

    /// Checks the context's limits and records its names with HMAC'd values for the audit line.
    fn context(
        &self,
        map: HashMap<String, String>,
        limits: &Limits,
    ) -> Result<crate::crypto::EncryptionContext, Status> {
        let context = convert::context(map, limits)?;
        let digests = context
            .pairs()
            .map(|(name, value)| (name.to_owned(), self.kms.audit_digest(value.as_bytes())))
            .collect();
        self.slot.update(|d| d.context = Some(digests));
        Ok(context)
    }

    fn version(&self, version: u32) {
        self.slot.update(|d| d.version = Some(version));
    }

    fn key_id(&self, key_id: &str) {
        self.slot.update(|d| {
            d.key.get_or_insert_with(|| key_id.to_owned());
        });
    }

    fn decrypted(&self, out: &Decrypted) {
        let key_id = out.key_id.to_string();
        self.slot.update(|d| {
            d.version = Some(out.version.0);
            d.key.get_or_insert(key_id);
        });
    }

    fn key_check_value(&self, value: &crate::hsm::KeyCheckValue) {
        let value = value.to_string();
        self.slot.update(|d| d.key_check_value = Some(value));
    }

    fn items(&self, codes: Vec<&'static str>) {
        self.slot.update(|d| d.items = Some(codes));
    }

    fn client_request_id(&self, id: &str) {
        if !id.is_empty() {
            self.slot
                .update(|d| d.client_request_id = Some(id.to_owned()));
        }
    }

    /// Runs a domain operation on the caller's tenant on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Kms, TenantId) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Status> {
        let tenant = self.tenant()?;
        self.run_global(move |kms| {
            let id = kms.tenant_id(&tenant)?;
            f(kms, id)
        })
        .await
    }

    /// Runs `fast` inline when it can answer from memory (`Some`), else `slow` on the
    /// blocking pool: the hot path never pays for a thread handoff. `data` is lent to `fast`
    /// and then moved into `slow`.
    async fn run_cached<D: Send + 'static, T: Send + 'static>(
        &self,
        data: D,
        fast: impl FnOnce(&Kms, &Name, &D) -> Option<Result<T, Error>>,
        slow: impl FnOnce(&Kms, TenantId, D) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Status> {
        let tenant = self.tenant()?;
        match fast(&self.kms, &tenant, &data) {
            Some(result) => result.map_err(Status::from),
            None => self.run(move |kms, id| slow(kms, id, data)).await,
        }
    }

    /// Runs a domain operation not tied to one tenant on the blocking pool.
    async fn run_global<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Kms) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Status> {
        blocking(Arc::clone(&self.kms), f).await
    }
}

/// The one crossing from async handlers to blocking PKCS#11 and sled calls.
async fn blocking<T: Send + 'static>(
    kms: Arc<Kms>,
    f: impl FnOnce(&Kms) -> Result<T, Error> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(move || f(&kms))
        .await
        .map_err(|error| {
            tracing::error!(%error, "blocking task failed");
            Status::internal("internal error")
        })?
        .map_err(Status::from)
}

/// The longest request_id a mutation may carry (it is kept, hashed, for a day).
pub const MAX_REQUEST_ID_LEN: usize = 128;
