//! The PostgreSQL engine: the authoritative store of a cluster.
//!
//! Layout in one PostgreSQL database, under a namespace `ns` (default `keyfront`):
//! `ns_system.records` (the system database), `ns_t_<tenant-id>.records` (one schema per tenant:
//! the tenant's physical separation), and `ns_system.schema_migrations` (the versions of this
//! layout applied, under an advisory lock so nodes starting together apply each once). Every
//! `records` table is `(k bytea PRIMARY KEY, v bytea NOT NULL)`: the same MAC'd records as the
//! sled engine, so the checks above the seam hold against whoever can write the database.
//!
//! The store is synchronous (its callers run on the blocking pool); this engine drives
//! tokio-postgres connections from a pool on a small runtime of its own and waits for each
//! operation, bounded by `timeout`. A server that cannot be reached is
//! [`Error::Unavailable`]: the caller is told to retry, nothing is half-written (every batch is
//! one transaction).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

mod connect;
mod listener;

use connect::{describe, pg_error, pool_error, tls_connector};
use listener::{Listener, channel};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use secrecy::{ExposeSecret, SecretString};
use tokio_postgres::error::SqlState;

use super::Error;
use super::changes::Changes;
use super::engine::{Batch, Database, Engine, Guard, RawRecords};
use super::lease::Lease;
use crate::ids::TenantId;

/// Connection settings of the PostgreSQL engine.
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// libpq-style connection string or URL (it may hold a password: never logged).
    pub url: SecretString,
    /// CA certificate (PEM) for TLS to the server; `None`: no TLS.
    pub ca_file: Option<PathBuf>,
    /// Prefix of every schema keyfront creates (`[a-z][a-z0-9_]{0,23}`).
    pub namespace: String,
    /// Most connections this node opens.
    pub pool_size: usize,
    /// Bound on connecting and on each operation.
    pub timeout: Duration,
    /// How long this node trusts its caches after its change listener was last confirmed
    /// (see `changes.rs`); commits that must be seen everywhere wait this long.
    pub stale_bound: Duration,
    /// The leader lease's term: a dead leader's singletons move to another node within it.
    pub lease_term: Duration,
    /// Connect without TLS (no `ca_file`) to a server that is not on this host: refused
    /// unless set, since records, MACs aside, and the login would cross the network in clear.
    pub dangerous_allow_plaintext: bool,
}

impl PostgresOptions {
    /// Whether `namespace` is a valid schema prefix.
    pub fn valid_namespace(namespace: &str) -> bool {
        let bytes = namespace.as_bytes();
        bytes.first().is_some_and(u8::is_ascii_lowercase)
            && bytes.len() <= 24
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
    }
}

/// The layout's migrations, in order; each runs once, in one transaction. `{ns}` is the
/// namespace.
const MIGRATIONS: &[&str] = &[
    // 1: the system database.
    "CREATE TABLE {ns}_system.records (k bytea PRIMARY KEY, v bytea NOT NULL)",
    // 2: the leader lease (see `lease.rs`).
    "CREATE TABLE {ns}_system.leases (
         name text PRIMARY KEY,
         holder text NOT NULL,
         token bigint NOT NULL,
         expires_at timestamptz NOT NULL)",
];

/// The PostgreSQL engine (see the module docs).
pub(crate) struct PostgresEngine {
    // Always `Some` until drop (shut down in the background: dropping a runtime may happen on
    // an async thread).
    runtime: Option<tokio::runtime::Runtime>,
    pool: Pool,
    namespace: String,
    description: String,
    timeout: Duration,
    changes: Arc<Changes>,
    lease_term: Duration,
    // Announcements carry it, so a node skips its own (it has updated its caches already).
    node: String,
}

impl PostgresEngine {
    /// Connects, and applies the layout's migrations not yet applied.
    pub(crate) fn open(options: &PostgresOptions) -> Result<Self, Error> {
        if !PostgresOptions::valid_namespace(&options.namespace) {
            return Err(Error::Config("storage.postgres.namespace"));
        }
        let config = tokio_postgres::Config::from_str(options.url.expose_secret())
            .map_err(|_| Error::Config("the PostgreSQL connection string does not parse"))?;
        let description = describe(&config);
        let mut config = config;
        config.connect_timeout(options.timeout);
        config.application_name("keyfront");
        // A node cut off in the middle of a transaction leaves its session open on the
        // server, with its row locks (a guarded batch locks the tenant's head), until the
        // server notices the connection is gone: hours with default keepalives, never behind
        // a proxy that keeps its side open. Every other node's write to that tenant would
        // wait and fail meanwhile. The server ends such a session after half the operation
        // bound; a healthy node never pauses that long inside a transaction.
        let idle_in_transaction = (options.timeout / 2).max(Duration::from_millis(200));
        let session = format!(
            "-c idle_in_transaction_session_timeout={}",
            idle_in_transaction.as_millis()
        );
        let session = match config.get_options() {
            Some(given) if !given.trim().is_empty() => format!("{given} {session}"),
            _ => session,
        };
        config.options(session);
        if options.ca_file.is_some() {
            // With a CA, TLS is required: the connection string's default (`prefer`) would
            // fall back to plain text against a server that does not offer TLS.
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        } else {
            let loopback = config.get_hosts().iter().all(|host| match host {
                tokio_postgres::config::Host::Unix(_) => true,
                tokio_postgres::config::Host::Tcp(name) => {
                    name == "localhost"
                        || name
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip.is_loopback())
                }
            });
            if !loopback && !options.dangerous_allow_plaintext {
                return Err(Error::Config(
                    "storage.postgres: without ca_file the connection to a server on another host would be plain text; set ca_file (TLS 1.3), or dangerous_allow_plaintext = true",
                ));
            }
            tracing::warn!(
                server = %describe(&config),
                "the connection to PostgreSQL is NOT encrypted (no storage.postgres.ca_file)"
            );
            crate::metrics::global().store_plaintext(true);
        }
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("keyfront-postgres")
            .enable_all()
            .build()?;
        let changes = Arc::new(Changes::new(options.stale_bound));
        let node = format!("{:016x}", rand::random::<u64>());
        let listener = Listener {
            config: config.clone(),
            channel: channel(&options.namespace),
            node: node.clone(),
            changes: Arc::clone(&changes),
            bound: options.stale_bound,
        };
        let manager = match &options.ca_file {
            Some(ca_file) => {
                let tls = tls_connector(ca_file)?;
                runtime.spawn(listener.run(tls.clone()));
                Manager::from_config(config, tls, manager_config)
            }
            None => {
                runtime.spawn(listener.run(tokio_postgres::NoTls));
                Manager::from_config(config, tokio_postgres::NoTls, manager_config)
            }
        };
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(options.timeout))
            .create_timeout(Some(options.timeout))
            .recycle_timeout(Some(options.timeout))
            .build()
            .map_err(|_| Error::Config("the PostgreSQL pool cannot be built"))?;
        let engine = Self {
            runtime: Some(runtime),
            pool,
            namespace: options.namespace.clone(),
            description,
            timeout: options.timeout,
            changes,
            lease_term: options.lease_term,
            node,
        };
        engine.migrate()?;
        Ok(engine)
    }

    /// Runs `op` on the engine's runtime and waits for it (see [`EngineHandle::wait`]).
    fn wait<T: Send + 'static>(
        &self,
        op: impl Future<Output = Result<T, Error>> + Send + 'static,
    ) -> Result<T, Error> {
        self.handle().wait(op)
    }

    fn migrate(&self) -> Result<(), Error> {
        let pool = self.pool.clone();
        let ns = self.namespace.clone();
        self.wait(async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg_error)?;
            // Nodes starting together take turns; the lock ends with the transaction.
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))",
                &[&format!("{ns}/migrations")],
            )
            .await
            .map_err(pg_error)?;
            tx.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {ns}_system;
                 CREATE TABLE IF NOT EXISTS {ns}_system.schema_migrations (
                     version integer PRIMARY KEY,
                     applied_at timestamptz NOT NULL DEFAULT now())"
            ))
            .await
            .map_err(pg_error)?;
            let row = tx
                .query_one(
                    &format!("SELECT coalesce(max(version), 0) FROM {ns}_system.schema_migrations"),
                    &[],
                )
                .await
                .map_err(pg_error)?;
            let applied: i32 = row.get(0);
            let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
            if applied > known {
                return Err(Error::Integrity {
                    database: "postgres".into(),
                    reason: "the database was migrated by a newer keyfront",
                });
            }
            for (version, sql) in (1..)
                .zip(MIGRATIONS)
                .skip(usize::try_from(applied).unwrap_or(0))
            {
                tx.batch_execute(&sql.replace("{ns}", &ns))
                    .await
                    .map_err(pg_error)?;
                tx.execute(
                    &format!("INSERT INTO {ns}_system.schema_migrations (version) VALUES ($1)"),
                    &[&version],
                )
                .await
                .map_err(pg_error)?;
                tracing::info!(version, "applied PostgreSQL migration");
            }
            tx.commit().await.map_err(pg_error)
        })
    }

    fn tenant_schema(&self, id: TenantId) -> String {
        format!("{}_t_{id}", self.namespace)
    }

    fn database(&self, schema: String, tenant: Option<TenantId>) -> Arc<dyn Database> {
        Arc::new(PostgresDatabase {
            engine: self.handle(),
            table: format!("{schema}.records"),
            tenant,
        })
    }

    fn handle(&self) -> EngineHandle {
        EngineHandle {
            runtime: self
                .runtime
                .as_ref()
                .map(|runtime| runtime.handle().clone()),
            pool: self.pool.clone(),
            timeout: self.timeout,
            channel: channel(&self.namespace),
            node: self.node.clone(),
        }
    }

    fn schema_exists(&self, schema: String) -> Result<bool, Error> {
        let pool = self.pool.clone();
        self.wait(async move {
            let client = pool.get().await.map_err(pool_error)?;
            let row = client
                .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
                .await
                .map_err(pg_error)?;
            Ok(row.is_some())
        })
    }
}

impl Drop for PostgresEngine {
    fn drop(&mut self) {
        self.pool.close();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Engine for PostgresEngine {
    fn system(&self) -> Result<Arc<dyn Database>, Error> {
        Ok(self.database(format!("{}_system", self.namespace), None))
    }

    fn create_tenant(&self, id: TenantId) -> Result<Arc<dyn Database>, Error> {
        let schema = self.tenant_schema(id);
        let pool = self.pool.clone();
        let ddl = format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {schema}.records (k bytea PRIMARY KEY, v bytea NOT NULL)"
        );
        let created = self.wait(async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg_error)?;
            match tx.batch_execute(&ddl).await {
                Ok(()) => {}
                Err(e) if e.code() == Some(&SqlState::DUPLICATE_SCHEMA) => return Ok(false),
                Err(e) => return Err(pg_error(e)),
            }
            tx.commit().await.map_err(pg_error)?;
            Ok(true)
        })?;
        if !created {
            return Err(Error::AlreadyExists("tenant database"));
        }
        Ok(self.database(schema, Some(id)))
    }

    fn open_tenant(&self, id: TenantId) -> Result<Option<Arc<dyn Database>>, Error> {
        let schema = self.tenant_schema(id);
        if !self.schema_exists(schema.clone())? {
            return Ok(None);
        }
        Ok(Some(self.database(schema, Some(id))))
    }

    fn remove_tenant(&self, id: TenantId) -> Result<(), Error> {
        let pool = self.pool.clone();
        let ddl = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.tenant_schema(id));
        self.wait(async move {
            let client = pool.get().await.map_err(pool_error)?;
            client.batch_execute(&ddl).await.map_err(pg_error)
        })
    }

    fn tenant_databases(&self) -> Result<Vec<TenantId>, Error> {
        let pool = self.pool.clone();
        let prefix = format!("{}_t_", self.namespace);
        let names = self.wait(async move {
            let client = pool.get().await.map_err(pool_error)?;
            let rows = client
                .query(
                    "SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname, $1)",
                    &[&prefix],
                )
                .await
                .map_err(pg_error)?;
            Ok(rows
                .iter()
                .map(|row| row.get::<_, String>(0))
                .collect::<Vec<_>>())
        })?;
        let prefix_len = self.namespace.len() + 3;
        Ok(names
            .iter()
            .filter_map(|name| name.get(prefix_len..)?.parse().ok())
            .collect())
    }

    fn is_empty(&self) -> Result<bool, Error> {
        Ok(self.system()?.is_empty()? && self.tenant_databases()?.is_empty())
    }

    fn describe(&self) -> String {
        format!("{} (namespace {})", self.description, self.namespace)
    }

    fn changes(&self) -> Option<Arc<Changes>> {
        Some(Arc::clone(&self.changes))
    }

    fn lead(&self, holder: String) -> Arc<Lease> {
        let term = self.lease_term;
        let lease = Arc::new(Lease::contested());
        let Some(runtime) = &self.runtime else {
            return lease;
        };
        let view = Arc::downgrade(&lease);
        let pool = self.pool.clone();
        let sql = format!(
            "INSERT INTO {ns}_system.leases AS l (name, holder, token, expires_at)
             VALUES ('leader', $1, 1, now() + $2::float8 * interval '1 second')
             ON CONFLICT (name) DO UPDATE SET
                 token = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at >= now()
                              THEN l.token ELSE l.token + 1 END,
                 holder = EXCLUDED.holder,
                 expires_at = EXCLUDED.expires_at
             WHERE l.holder = EXCLUDED.holder OR l.expires_at < now()
             RETURNING token",
            ns = self.namespace
        );
        runtime.spawn(async move {
            // Renewed every fifth of the term; trusted for four fifths of it from the moment
            // the renewal was sent (see `lease.rs`).
            let every = term / 5;
            let trusted = term - every;
            let mut held = false;
            loop {
                let Some(lease) = view.upgrade() else {
                    return;
                };
                let sent = lease.now_ms();
                let attempt = async {
                    let client = pool.get().await.map_err(pool_error)?;
                    let row = client
                        .query_opt(&sql, &[&holder, &term.as_secs_f64()])
                        .await
                        .map_err(pg_error)?;
                    Ok::<_, Error>(row.map(|row| row.get::<_, i64>(0)))
                };
                match tokio::time::timeout(every, attempt).await {
                    Ok(Ok(Some(token))) => {
                        let token = u64::try_from(token).unwrap_or(0);
                        lease.granted(token, sent, trusted);
                        if !held {
                            tracing::info!(token, "this node holds the leader lease");
                        }
                        held = true;
                    }
                    Ok(Ok(None)) => {
                        lease.refused();
                        if held {
                            tracing::warn!("another node holds the leader lease now");
                        }
                        held = false;
                    }
                    // Unreachable: the term runs out by itself.
                    Ok(Err(_)) | Err(_) => {
                        if held && !lease.is_held() {
                            tracing::warn!("leader lease expired: PostgreSQL unreachable");
                            held = false;
                        }
                    }
                }
                drop(lease);
                tokio::time::sleep(every).await;
            }
        });
        lease
    }
}

/// What a database of the engine needs of it: a way to run operations, and the pool.
#[derive(Clone)]
struct EngineHandle {
    runtime: Option<tokio::runtime::Handle>,
    pool: Pool,
    timeout: Duration,
    channel: String,
    node: String,
}

impl EngineHandle {
    /// Runs `op` on the engine's runtime and waits for it (at most `timeout`). Waiting on a
    /// channel rather than `block_on` works from any thread, inside another runtime or not.
    fn wait<T: Send + 'static>(
        &self,
        op: impl Future<Output = Result<T, Error>> + Send + 'static,
    ) -> Result<T, Error> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or(Error::Unavailable("engine shut down".into()))?;
        let timeout = self.timeout;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let result = match tokio::time::timeout(timeout, op).await {
                Ok(result) => result,
                Err(_) => Err(Error::Unavailable(
                    "PostgreSQL did not answer in time".into(),
                )),
            };
            let _ = tx.send(result);
        });
        rx.recv()
            .map_err(|_| Error::Unavailable("PostgreSQL operation was cancelled".into()))?
    }
}

/// One `records` table.
struct PostgresDatabase {
    engine: EngineHandle,
    // `schema.records`; built from the validated namespace and a hex id only.
    table: String,
    // The tenant whose database this is (`None`: the system database).
    tenant: Option<TenantId>,
}

impl Database for PostgresDatabase {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let pool = self.engine.pool.clone();
        let sql = format!("SELECT v FROM {} WHERE k = $1", self.table);
        let key = key.to_vec();
        self.engine.wait(async move {
            let client = pool.get().await.map_err(pool_error)?;
            let statement = client.prepare_cached(&sql).await.map_err(pg_error)?;
            let row = client
                .query_opt(&statement, &[&key])
                .await
                .map_err(pg_error)?;
            Ok(row.map(|row| row.get::<_, Vec<u8>>(0)))
        })
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<RawRecords, Error> {
        let pool = self.engine.pool.clone();
        let table = self.table.clone();
        let start = prefix.to_vec();
        let end = prefix_end(prefix);
        self.engine.wait(async move {
            let client = pool.get().await.map_err(pool_error)?;
            let rows = match end {
                Some(end) => {
                    let sql =
                        format!("SELECT k, v FROM {table} WHERE k >= $1 AND k < $2 ORDER BY k");
                    let statement = client.prepare_cached(&sql).await.map_err(pg_error)?;
                    client.query(&statement, &[&start, &end]).await
                }
                None => {
                    let sql = format!("SELECT k, v FROM {table} WHERE k >= $1 ORDER BY k");
                    let statement = client.prepare_cached(&sql).await.map_err(pg_error)?;
                    client.query(&statement, &[&start]).await
                }
            }
            .map_err(pg_error)?;
            Ok(rows
                .iter()
                .map(|row| (row.get::<_, Vec<u8>>(0), row.get::<_, Vec<u8>>(1)))
                .collect())
        })
    }

    fn is_empty(&self) -> Result<bool, Error> {
        let pool = self.engine.pool.clone();
        let sql = format!("SELECT NOT EXISTS (SELECT 1 FROM {})", self.table);
        self.engine.wait(async move {
            let client = pool.get().await.map_err(pool_error)?;
            let row = client.query_one(&sql, &[]).await.map_err(pg_error)?;
            Ok(row.get::<_, bool>(0))
        })
    }

    fn apply(&self, batch: Batch, guard: Option<Guard<'_>>) -> Result<bool, Error> {
        let pool = self.engine.pool.clone();
        let table = self.table.clone();
        let guard = guard.map(|g| (g.key.to_vec(), g.value.map(<[u8]>::to_vec)));
        let announce = self.tenant.or(batch.announce).map(|tenant| {
            (
                self.engine.channel.clone(),
                format!("{} {tenant}", self.engine.node),
            )
        });
        // Later writes of a key win, as in a sled batch.
        let mut last: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for (key, value) in batch.writes {
            last.insert(key, value);
        }
        let (mut upsert_keys, mut upsert_values, mut removes) =
            (Vec::new(), Vec::new(), Vec::new());
        for (key, value) in last {
            match value {
                Some(value) => {
                    upsert_keys.push(key);
                    upsert_values.push(value);
                }
                None => removes.push(key),
            }
        }
        self.engine.wait(async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg_error)?;
            let expects_absent = matches!(guard, Some((_, None)));
            if let Some((key, expected)) = &guard {
                // The row lock holds until commit: no other guarded batch passes in between.
                let sql = format!("SELECT v FROM {table} WHERE k = $1 FOR UPDATE");
                let statement = tx.prepare_cached(&sql).await.map_err(pg_error)?;
                let row = tx.query_opt(&statement, &[key]).await.map_err(pg_error)?;
                let stored = row.map(|row| row.get::<_, Vec<u8>>(0));
                if stored.as_ref() != expected.as_ref() {
                    return Ok(false);
                }
            }
            if !removes.is_empty() {
                let sql = format!("DELETE FROM {table} WHERE k = ANY($1)");
                let statement = tx.prepare_cached(&sql).await.map_err(pg_error)?;
                tx.execute(&statement, &[&removes])
                    .await
                    .map_err(pg_error)?;
            }
            if !upsert_keys.is_empty() {
                let sql = format!(
                    "INSERT INTO {table} (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
                     ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
                );
                let statement = tx.prepare_cached(&sql).await.map_err(pg_error)?;
                match tx
                    .execute(&statement, &[&upsert_keys, &upsert_values])
                    .await
                {
                    Ok(_) => {}
                    // Two batches that both expected the guard's key absent: the second loses.
                    Err(e) if expects_absent && e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                        return Ok(false);
                    }
                    Err(e) => return Err(pg_error(e)),
                }
            }
            if let Some((channel, payload)) = &announce {
                // Delivered to the listeners when (and only if) this transaction commits.
                let statement = tx
                    .prepare_cached("SELECT pg_notify($1, $2)")
                    .await
                    .map_err(pg_error)?;
                tx.execute(&statement, &[channel, payload])
                    .await
                    .map_err(pg_error)?;
            }
            match tx.commit().await {
                Ok(()) => Ok(true),
                Err(e) if expects_absent && e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    Ok(false)
                }
                Err(e) => Err(pg_error(e)),
            }
        })
    }
}

/// The smallest key above every key that starts with `prefix` (`None`: no bound).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_bound_exactly_the_prefixed_keys() {
        assert_eq!(prefix_end(b""), None);
        assert_eq!(prefix_end(b"k/"), Some(b"k0".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
    }

    #[test]
    fn namespaces_are_plain_schema_prefixes() {
        for ok in ["keyfront", "kf_test_1", "a"] {
            assert!(PostgresOptions::valid_namespace(ok), "{ok}");
        }
        for bad in ["", "1a", "Keyfront", "a-b", "a;drop", &"a".repeat(25)] {
            assert!(!PostgresOptions::valid_namespace(bad), "{bad}");
        }
    }

    #[test]
    fn descriptions_leave_out_user_and_password() {
        let config =
            tokio_postgres::Config::from_str("postgresql://kf:hunter2@db.example:6543/kms")
                .expect("parses");
        let described = describe(&config);
        assert_eq!(described, "postgresql://db.example:6543/kms");
        assert!(!described.contains("hunter2"));
    }
}
