//! The server as a process runs it: the listener and TLS acceptor, health (NOT_SERVING until
//! the HSM and the store are open), connecting to the HSM with retries, the nightly backups and
//! the scheduler, SIGHUP reloads, and a graceful stop that drains handshakes and mutations
//! before the last audit checkpoint. `InProcess` (with the `test-hooks` feature) is the same
//! service for in-process tests and benchmarks.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::audit::AuditLog;
#[cfg(feature = "test-hooks")]
use crate::config::Limits;
use crate::config::{Config, PrincipalConfig, ServerConfig};
use crate::hsm::Hsm;
use crate::hsm::metered::MeteredHsm;
use crate::hsm::pkcs11::Pkcs11Hsm;
use crate::hsm::reconnect::ReconnectingHsm;
use crate::kms::Error;
use crate::kms::Kms;

use super::{Shared, access, admin, keys, layer, pb, tls};

/// Opens the HSM; the default opens the configured PKCS#11 token. Tests inject faulty HSMs.
pub type HsmConnector = Arc<dyn Fn() -> Result<Arc<dyn Hsm>, crate::hsm::Error> + Send + Sync>;

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The config has no `[server]` section.
    #[error("the config has no [server] section")]
    NoServerSection,
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The audit log could not be opened.
    #[error("cannot open the audit log: {0}")]
    Audit(std::io::Error),
    /// The HSM refused the PIN, or the token or data directory is unusable: retrying cannot help.
    #[error("cannot start: {0}")]
    Fatal(Error),
    /// The server failed.
    #[error("server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection could not be built.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// The three services over an open domain, without TLS or the request pipeline: the handlers
/// as the fuzzer drives them (fuzz/fuzz_targets/handlers.rs). A request carries the
/// [`PeerInfo`] that TLS would have put in its extensions.
#[cfg(feature = "test-hooks")]
pub struct InProcess {
    /// KeyService.
    pub keys: keys::KeyService,
    /// AdminService.
    pub admin: admin::AdminService,
    /// AccessService.
    pub access: access::AccessService,
}

#[cfg(feature = "test-hooks")]
impl InProcess {
    /// The services for `principals` over `kms`, auditing into `audit`, with default limits,
    /// grants and dual control as given.
    pub fn new(
        kms: Arc<Kms>,
        audit: Arc<AuditLog>,
        principals: &[PrincipalConfig],
        dual_control: crate::config::DualControl,
    ) -> Self {
        let shared = Arc::new(Shared::new(
            Arc::clone(&audit),
            principals,
            &crate::config::Revocations::default(),
            Limits::default(),
            dual_control,
            crate::config::Access::default(),
            &crate::config::Backup::default(),
        ));
        kms.attach_audit(&audit);
        let _ = shared.kms.set(kms);
        Self {
            keys: keys::KeyService::new(Arc::clone(&shared)),
            admin: admin::AdminService::new(Arc::clone(&shared)),
            access: access::AccessService::new(shared),
        }
    }
}

/// The keyfront server.
pub struct Server {
    config: Config,
    connect: HsmConnector,
    reset: Option<crate::hsm::reconnect::Reset>,
    metrics: Option<TcpListener>,
    clock: Arc<dyn crate::clock::Clock>,
    config_path: Option<std::path::PathBuf>,
    #[cfg(feature = "test-hooks")]
    audit_failure: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Server {
    /// A server for `config` that opens the configured PKCS#11 token.
    pub fn new(config: Config) -> Self {
        let hsm_config = config.hsm.clone();
        let module = config.hsm.module.clone();
        Self {
            config,
            connect: Arc::new(move || Ok(Arc::new(Pkcs11Hsm::open(&hsm_config)?) as Arc<dyn Hsm>)),
            reset: Some(Arc::new(move || {
                crate::hsm::pkcs11::reinitialize(&module, Duration::from_secs(10))
            })),
            metrics: None,
            clock: Arc::new(crate::clock::SystemClock::new()),
            config_path: None,
            #[cfg(feature = "test-hooks")]
            audit_failure: None,
        }
    }

    /// Serves `/metrics` on this listener (the CLI binds `[metrics] listen`).
    pub fn with_metrics_listener(mut self, listener: TcpListener) -> Self {
        self.metrics = Some(listener);
        self
    }

    /// Replaces the clock (tests: pending windows and expiries).
    #[cfg(feature = "test-hooks")]
    pub fn with_clock(mut self, clock: Arc<dyn crate::clock::Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Makes every audit write fail while `switch` is on (tests: a broken audit sink).
    #[cfg(feature = "test-hooks")]
    pub fn with_audit_failure(mut self, switch: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.audit_failure = Some(switch);
        self
    }

    /// Reloads principals and revocations from this file on SIGHUP (`keyfront serve`).
    pub fn with_config_path(mut self, path: std::path::PathBuf) -> Self {
        self.config_path = Some(path);
        self
    }

    /// Replaces how the HSM is opened (tests: fault injection); no library reset then.
    pub fn with_hsm_connector(mut self, connect: HsmConnector) -> Self {
        self.connect = connect;
        self.reset = None;
        self
    }

    /// Serves on `listener` until `shutdown` resolves, then finishes in-flight requests.
    ///
    /// # Errors
    /// [`ServeError::Fatal`] when the HSM refuses the PIN or the token or data directory cannot
    /// be used; setup errors otherwise.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let server = self
            .config
            .server
            .clone()
            .ok_or(ServeError::NoServerSection)?;
        let audit = AuditLog::open(
            &server.audit_path,
            &server.node_id,
            Arc::clone(&self.clock),
            server.audit_checkpoints,
        )
        .map_err(ServeError::Audit)?;
        #[cfg(feature = "test-hooks")]
        let audit = match self.audit_failure.clone() {
            Some(switch) => audit.with_failure_switch(switch),
            None => audit,
        };
        let audit = Arc::new(audit);
        let tls = tls::TlsConfigs::new(tls::server_config(&server, &self.config.revocations)?);
        let shared = Arc::new(Shared::new(
            Arc::clone(&audit),
            &self.config.principals,
            &self.config.revocations,
            server.limits,
            self.config.dual_control.clone(),
            self.config.access,
            &self.config.backup,
        ));

        if let Some(path) = self.config_path.clone() {
            tokio::spawn(reload_on_sighup(
                path,
                Arc::clone(&shared),
                tls.clone(),
                server.clone(),
            ));
        }

        if let Some(listener) = self.metrics {
            tracing::info!(listen = ?listener.local_addr().ok(), "serving /metrics");
            tokio::spawn(crate::metrics::serve(listener));
        }
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::NotServing).await;
        let (fatal_tx, fatal_rx) = tokio::sync::oneshot::channel();
        // Stopped when serving ends, so the domain (and its databases) close with the server.
        let hsm_task = tokio::spawn(connect_hsm(
            self.connect,
            self.reset,
            self.clock,
            self.config.clone(),
            Arc::clone(&shared),
            health.clone(),
            fatal_tx,
        ));

        // Both reflection versions: grpcurl speaks v1, many client libraries still v1alpha.
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let limits = server.limits;
        let keys = pb::key_service_server::KeyServiceServer::new(keys::KeyService::new(
            Arc::clone(&shared),
        ))
        .max_decoding_message_size(limits.max_message_bytes);
        let admin = pb::admin_service_server::AdminServiceServer::new(admin::AdminService::new(
            Arc::clone(&shared),
        ))
        .max_decoding_message_size(limits.max_message_bytes);
        let access = pb::access_service_server::AccessServiceServer::new(
            access::AccessService::new(Arc::clone(&shared)),
        )
        .max_decoding_message_size(limits.max_message_bytes);
        let (incoming, accepting) = tls::incoming(
            listener,
            tls,
            Arc::clone(&audit),
            server.allow_cn_identity,
            limits,
        );
        // Not "serving" yet: the HSM and the store open in `connect_hsm`, which logs "serving"
        // once they did (and a fatal error there ends the server instead).
        tracing::info!(listen = %server.listen, "listening (TLS 1.3, client certificates required); health is NOT_SERVING until the HSM and the store are open");
        let request_layer = layer::RequestLayer::new(
            audit,
            limits.max_concurrent_requests,
            limits.request_timeout,
        );
        let mutations = request_layer.mutations();
        let serving = tonic::transport::Server::builder()
            .layer(request_layer)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(keys)
            .add_service(admin)
            .add_service(access)
            .serve_with_incoming_shutdown(incoming, shutdown);
        let result = tokio::select! {
            result = serving => result.map_err(ServeError::from),
            Ok(error) = fatal_rx => Err(ServeError::Fatal(error)),
        };
        // Lines still to come: handshakes in progress (refused now) and mutations whose
        // callers went away, which run to their end. Then nothing writes but the checkpoint.
        let draining = async {
            let _ = accepting.await;
            mutations.close();
            mutations.wait().await;
        };
        if tokio::time::timeout(limits.request_timeout + limits.handshake_timeout, draining)
            .await
            .is_err()
        {
            tracing::warn!(
                "handshakes or mutations still running at stop; their audit lines may follow the last checkpoint"
            );
        }
        hsm_task.abort();
        // A graceful stop signs the lines written since the last checkpoint, so that a log
        // closed cleanly verifies to its last line.
        let closing = Arc::clone(&shared.audit);
        match tokio::task::spawn_blocking(move || closing.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "the final audit checkpoint failed; the log's last lines are covered by the chain only")
            }
            Err(error) => tracing::warn!(%error, "the final audit checkpoint task failed"),
        }
        result
    }
}

/// On each SIGHUP, reads the config again and installs its principals and revocations, and a
/// TLS configuration with its CRLs for the next handshakes. An invalid file changes nothing:
/// the running rules stay and the problems are logged.
pub(super) async fn reload_on_sighup(
    path: std::path::PathBuf,
    shared: Arc<Shared>,
    tls: tls::TlsConfigs,
    server: ServerConfig,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; principals reload only with a restart");
        return;
    };
    while hangups.recv().await.is_some() {
        let file = path.clone();
        let loaded =
            tokio::task::spawn_blocking(move || Config::load(&file, &crate::config::ProcessEnv))
                .await;
        match loaded {
            Ok(Ok(config)) => {
                // The TLS configuration first: if its files do not make one, nothing changes.
                match tls::server_config(&server, &config.revocations) {
                    Ok(new) => tls.replace(new),
                    Err(error) => {
                        tracing::error!(%error, "SIGHUP: the TLS configuration cannot be rebuilt; keeping the running principals, revocations and TLS configuration");
                        continue;
                    }
                }
                shared.reload(&config);
                tracing::info!(
                    principals = config.principals.len(),
                    revoked_serials = config.revocations.serial_count(),
                    crls = config.revocations.crls.len(),
                    revoked_fingerprints = config.revocations.fingerprints.len(),
                    "SIGHUP: principals and revocations reloaded"
                );
            }
            Ok(Err(error)) => {
                tracing::error!(%error, "SIGHUP: the config is invalid; keeping the running principals")
            }
            Err(error) => tracing::error!(%error, "SIGHUP: reload task failed"),
        }
    }
}

/// Logs and audits every principal allowed roles that exclude each other
/// (`dangerous_allow_role_combination`), each time the principals are installed.
pub(super) fn audit_role_combinations(audit: &AuditLog, principals: &[PrincipalConfig]) {
    for principal in principals {
        let Some((a, b, why)) = crate::config::conflicting_roles(&principal.roles) else {
            continue;
        };
        tracing::warn!(
            identity = %principal.identity,
            roles = %format!("{} + {}", a.as_str(), b.as_str()),
            "dangerous_allow_role_combination: {why}"
        );
        let _ = audit.system(&crate::audit::SystemRecord {
            actor: "system:config",
            action: "dangerous_role_combination",
            outcome: "ALLOWED".into(),
            detail: Some(format!(
                "{} holds {} and {}: {why}",
                principal.identity,
                a.as_str(),
                b.as_str()
            )),
            ..crate::audit::SystemRecord::default()
        });
    }
}

/// The health service name of the key store (NOT_SERVING while PostgreSQL is unreachable).
pub const STORE_HEALTH: &str = "keyfront.store";

pub(super) async fn set_health(
    health: &tonic_health::server::HealthReporter,
    status: ServingStatus,
) {
    for service in [
        "",
        "keyfront.v1.KeyService",
        "keyfront.v1.AdminService",
        "keyfront.v1.AccessService",
    ] {
        health.set_service_status(service, status).await;
    }
}

/// How this node names itself in the leader lease: host, listening address, process.
pub(super) fn node_name(config: &Config) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".into());
    let listen = config
        .server
        .as_ref()
        .map_or_else(String::new, |server| server.listen.to_string());
    format!("{host}/{listen}/{}", std::process::id())
}

/// Opens the HSM and the store, retrying while the HSM is unreachable; then watches the HSM's
/// health with the canary and reports it.
pub(super) async fn connect_hsm(
    connect: HsmConnector,
    reset: Option<crate::hsm::reconnect::Reset>,
    clock: Arc<dyn crate::clock::Clock>,
    config: Config,
    shared: Arc<Shared>,
    health: tonic_health::server::HealthReporter,
    fatal: tokio::sync::oneshot::Sender<Error>,
) {
    let retry = config.hsm_retry;
    let mut attempts = 0u32;
    let (kms, hsm) = loop {
        attempts += 1;
        let connect = Arc::clone(&connect);
        let data_dir = config.data_dir.clone();
        let options = config.kms.clone();
        let reset = reset.clone();
        let clock = Arc::clone(&clock);
        let attempt = tokio::task::spawn_blocking(move || {
            // A token that appears after C_Initialize stays invisible to SoftHSM until the
            // library is initialized again; nothing is open yet, so resetting is safe.
            if attempts > 1 {
                if let Some(reset) = &reset {
                    reset()?;
                }
            }
            let mut hsm = ReconnectingHsm::new(connect)?;
            if let Some(reset) = reset {
                hsm = hsm.with_reset(reset);
            }
            let hsm = Arc::new(hsm);
            let metered = MeteredHsm::new(Arc::clone(&hsm) as Arc<dyn Hsm>);
            let kms = Kms::open_with_clock(Arc::new(metered), &data_dir, options, clock)?;
            Ok::<_, Error>((kms, hsm))
        })
        .await;
        match attempt {
            Ok(Ok((kms, hsm))) => break (Arc::new(kms), hsm),
            Ok(Err(Error::Hsm(error))) if retryable(&error) => {
                tracing::warn!(%error, retry_in = ?retry, "HSM not reachable; health is NOT_SERVING");
            }
            Ok(Err(error)) => {
                tracing::error!(%error, "cannot start");
                let _ = fatal.send(error);
                return;
            }
            Err(error) => tracing::error!(%error, "HSM connect task failed"),
        }
        tokio::time::sleep(retry).await;
    };
    let _ = shared.kms.set(Arc::clone(&kms));
    kms.attach_audit(&shared.audit);
    // The singletons (scheduler, nightly backups, master key rotation) run where the leader
    // lease is; on one node that is always here.
    kms.store().lead(&node_name(&config));
    if kms.store().is_leader() {
        // A master key rotation that a crash interrupted goes on (it holds no request up);
        // in a cluster the scheduler's next tick on the leader does it.
        let resuming = Arc::clone(&kms);
        tokio::task::spawn_blocking(move || {
            if let Err(error) = resuming.resume_master_key_rotation() {
                tracing::error!(%error, "resuming the master key rotation failed; RotateMasterKey retries it");
            }
        });
    }
    // The scheduler holds the domain only during a tick, and ends once it is gone.
    tokio::spawn(crate::kms::scheduler::run(
        Arc::downgrade(&kms),
        config.kms.scheduler_interval,
    ));
    if let (true, Some(backups)) = (shared.nightly_backups, shared.backups.clone()) {
        tokio::spawn(crate::backup::nightly::run(
            Arc::downgrade(&kms),
            backups,
            config.kms.scheduler_interval.min(Duration::from_secs(60)),
        ));
    }
    tokio::spawn(access::save_last_uses(
        Arc::downgrade(&shared),
        Arc::downgrade(&kms),
    ));
    tracing::info!("HSM reachable; serving");
    set_health(&health, ServingStatus::Serving).await;
    health
        .set_service_status(STORE_HEALTH, ServingStatus::Serving)
        .await;
    let mut serving = true;
    let mut store_serving = true;
    loop {
        // The shared store (PostgreSQL) as this node's change listener sees it: unreachable
        // means writes fail and only cached keys serve. KeyService stays SERVING for those;
        // `keyfront.store` and AdminService say NOT_SERVING.
        let store_reachable = kms
            .store()
            .changes()
            .is_none_or(|changes| !changes.unreachable());
        if store_reachable != store_serving {
            store_serving = store_reachable;
            let status = if store_reachable {
                tracing::info!("key store reachable again");
                ServingStatus::Serving
            } else {
                tracing::warn!(
                    "key store unreachable: writes answer UNAVAILABLE, cached keys go on serving; health of keyfront.store is NOT_SERVING"
                );
                ServingStatus::NotServing
            };
            health.set_service_status(STORE_HEALTH, status).await;
            if serving {
                health
                    .set_service_status("keyfront.v1.AdminService", status)
                    .await;
            }
        }
        tokio::time::sleep(retry.max(Duration::from_millis(200))).await;
        let hsm = Arc::clone(&hsm);
        let was_serving = serving;
        let healthy = tokio::task::spawn_blocking(move || {
            // Sessions of an HSM that went away may stay broken after it returns: while the
            // canary fails, try a fresh instance instead of waiting on the old one.
            hsm.probe().is_ok()
                || (!was_serving
                    && hsm
                        .reconnect()
                        .inspect_err(|error| tracing::info!(%error, "HSM still unreachable"))
                        .is_ok())
        })
        .await
        .unwrap_or(false);
        if healthy != serving {
            serving = healthy;
            if healthy {
                tracing::info!("HSM recovered; serving");
                set_health(&health, ServingStatus::Serving).await;
                if !store_serving {
                    health
                        .set_service_status("keyfront.v1.AdminService", ServingStatus::NotServing)
                        .await;
                }
            } else {
                tracing::warn!("HSM canary failed; health is NOT_SERVING");
                set_health(&health, ServingStatus::NotServing).await;
            }
        }
    }
}

/// Whether waiting may help: the HSM or its token is not there yet. A refused PIN, a token
/// without keyfront's keys, or a foreign data directory are final.
pub(super) fn retryable(error: &crate::hsm::Error) -> bool {
    use crate::hsm::Error as E;
    matches!(
        error,
        E::Unavailable { .. } | E::TokenNotFound(_) | E::Module(_)
    )
}
