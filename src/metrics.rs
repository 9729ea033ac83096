//! Prometheus metrics, served on `/metrics` at `[metrics] listen` (off unless configured).
//!
//! One process-wide registry: requests by RPC and status code, latency per RPC, HSM operations
//! and their latency, cache hits and misses, audit write latency, open tenant databases.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a finished request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    rpc: &'static str,
    code: &'static str,
}

/// Labels naming an RPC.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc: &'static str,
}

/// The RPCs keyfront serves, as label values; anything else is "other" (bounded cardinality,
/// and no allocation per request).
const KNOWN_RPCS: &[&str] = &[
    "keyfront.v1.KeyService/Encrypt",
    "keyfront.v1.KeyService/Decrypt",
    "keyfront.v1.KeyService/BatchEncrypt",
    "keyfront.v1.KeyService/BatchDecrypt",
    "keyfront.v1.KeyService/GenerateDataKey",
    "keyfront.v1.KeyService/DecryptDataKey",
    "keyfront.v1.KeyService/SealSecret",
    "keyfront.v1.KeyService/UnsealSecret",
    "keyfront.v1.AdminService/CreateTenant",
    "keyfront.v1.AdminService/ListTenants",
    "keyfront.v1.AdminService/CreateKey",
    "keyfront.v1.AdminService/GetKey",
    "keyfront.v1.AdminService/ListKeys",
    "keyfront.v1.AdminService/RotateKey",
    "grpc.health.v1.Health/Check",
    "grpc.health.v1.Health/Watch",
];

fn rpc_label(rpc: &str) -> &'static str {
    KNOWN_RPCS
        .iter()
        .copied()
        .find(|known| *known == rpc)
        .unwrap_or("other")
}

/// Labels of an HSM operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HsmLabels {
    op: &'static str,
    outcome: &'static str,
}

/// Labels naming a database of the key store (`system` or `tenant`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DatabaseLabels {
    database: &'static str,
}

/// Labels of a cache lookup.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    cache: &'static str,
    result: &'static str,
}

/// Every metric keyfront exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Family<RpcLabels, Histogram>,
    hsm_operations: Family<HsmLabels, Counter>,
    hsm_seconds: Family<HsmLabels, Histogram>,
    cache: Family<CacheLabels, Counter>,
    audit_seconds: Histogram,
    open_tenants: Gauge,
    scheduler_paused: Gauge,
    versions_destroyed: Counter,
    store_integrity_failures: Family<DatabaseLabels, Counter>,
    store_plaintext: Gauge,
}

fn latency_histogram() -> Histogram {
    // 5 µs to ~5 s, doubling.
    Histogram::new(exponential_buckets(0.000_005, 2.0, 21))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("keyfront");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_seconds =
            Family::<RpcLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        let hsm_operations = Family::<HsmLabels, Counter>::default();
        let hsm_seconds =
            Family::<HsmLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        let cache = Family::<CacheLabels, Counter>::default();
        let audit_seconds = latency_histogram();
        let open_tenants = Gauge::default();
        let scheduler_paused = Gauge::default();
        let versions_destroyed = Counter::default();
        let store_integrity_failures = Family::<DatabaseLabels, Counter>::default();
        let store_plaintext = Gauge::default();
        registry.register(
            "store_plaintext",
            "1 while the connection to PostgreSQL is not encrypted (no storage.postgres.ca_file)",
            store_plaintext.clone(),
        );
        registry.register(
            "store_integrity_failures",
            "Requests refused because a key store database failed its integrity checks \
             (a record altered, moved, deleted or rolled back), by database (system, tenant)",
            store_integrity_failures.clone(),
        );
        registry.register(
            "scheduler_paused",
            "1 while scheduled destructions are paused because the wall clock jumped",
            scheduler_paused.clone(),
        );
        registry.register(
            "key_versions_destroyed",
            "Key versions destroyed by the scheduler",
            versions_destroyed.clone(),
        );
        registry.register(
            "requests",
            "gRPC requests by RPC and status code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from receipt to response, per RPC",
            request_seconds.clone(),
        );
        registry.register(
            "hsm_operations",
            "HSM operations by operation and outcome",
            hsm_operations.clone(),
        );
        registry.register(
            "hsm_operation_duration_seconds",
            "HSM operation latency",
            hsm_seconds.clone(),
        );
        registry.register(
            "cache_requests",
            "Cache lookups by cache (bulk_key, kek) and result (hit, miss)",
            cache.clone(),
        );
        registry.register(
            "audit_write_duration_seconds",
            "Time to hand one audit line to the kernel",
            audit_seconds.clone(),
        );
        registry.register(
            "open_tenant_databases",
            "Tenant databases open now",
            open_tenants.clone(),
        );
        Self {
            registry,
            requests,
            request_seconds,
            hsm_operations,
            hsm_seconds,
            cache,
            audit_seconds,
            open_tenants,
            scheduler_paused,
            versions_destroyed,
            store_integrity_failures,
            store_plaintext,
        }
    }

    /// Records whether the store's connection is in plain text.
    pub fn store_plaintext(&self, plaintext: bool) {
        self.store_plaintext.set(i64::from(plaintext));
    }

    /// Counts a request refused because `database` (`system` or `tenant`) failed its
    /// integrity checks.
    pub fn store_integrity_failure(&self, database: &'static str) {
        self.store_integrity_failures
            .get_or_create(&DatabaseLabels { database })
            .inc();
    }

    /// Records whether the scheduler's destructions are paused.
    pub fn scheduler_paused(&self, paused: bool) {
        self.scheduler_paused.set(i64::from(paused));
    }

    /// Counts versions the scheduler destroyed.
    pub fn versions_destroyed(&self, count: usize) {
        self.versions_destroyed
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }

    /// Records a finished request.
    pub fn request(&self, rpc: &str, code: &'static str, latency: Duration) {
        let rpc = rpc_label(rpc);
        self.requests
            .get_or_create(&RequestLabels { rpc, code })
            .inc();
        self.request_seconds
            .get_or_create(&RpcLabels { rpc })
            .observe(latency.as_secs_f64());
    }

    /// Records an HSM operation.
    pub fn hsm(&self, op: &'static str, ok: bool, latency: Duration) {
        let labels = HsmLabels {
            op,
            outcome: if ok { "ok" } else { "error" },
        };
        self.hsm_operations.get_or_create(&labels).inc();
        self.hsm_seconds
            .get_or_create(&labels)
            .observe(latency.as_secs_f64());
    }

    /// Records a cache lookup.
    pub fn cache(&self, cache: &'static str, hit: bool) {
        self.cache
            .get_or_create(&CacheLabels {
                cache,
                result: if hit { "hit" } else { "miss" },
            })
            .inc();
    }

    /// Records one audit write.
    pub fn audit_write(&self, latency: Duration) {
        self.audit_seconds.observe(latency.as_secs_f64());
    }

    /// Sets the number of open tenant databases.
    pub fn open_tenants(&self, open: usize) {
        self.open_tenants
            .set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Serves `/metrics` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    http::header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                global().encode(),
            )
        }),
    );
    if let Err(error) = axum::serve(listener, app).await {
        tracing::error!(%error, "metrics endpoint failed");
    }
}
