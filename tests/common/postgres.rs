//! The test PostgreSQL server: `scripts/test.sh` starts one (scripts/postgres.sh) and exports
//! `KEYFRONT_TEST_POSTGRES_URL`. Each test takes its own namespace, so tests never share
//! schemas; raw SQL (`Sql`) lets a test play the attacker with write access to the database.

use std::time::Duration;

use keyfront::keystore::{Backend, PostgresOptions};

/// The test server's connection string. Without one: a panic under CI (the suite must not
/// skip), else `None` and a message (a developer running one test binary by hand).
pub fn url() -> Option<String> {
    match std::env::var("KEYFRONT_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "PostgreSQL tests need KEYFRONT_TEST_POSTGRES_URL: run scripts/test.sh"
            );
            eprintln!("skipped: KEYFRONT_TEST_POSTGRES_URL is not set (scripts/test.sh sets it)");
            None
        }
    }
}

/// A namespace of its own for one test.
pub fn namespace(prefix: &str) -> String {
    format!("kft_{prefix}_{:08x}", rand::random::<u32>())
}

/// The backend for `namespace` on the test server.
pub fn backend(url: &str, namespace: &str) -> Backend {
    Backend::Postgres(PostgresOptions {
        url: url.to_owned().into(),
        ca_file: None,
        namespace: namespace.to_owned(),
        pool_size: 8,
        timeout: Duration::from_secs(10),
        stale_bound: Duration::from_secs(1),
        lease_term: Duration::from_secs(5),
        dangerous_allow_plaintext: false,
    })
}

/// A raw connection to the test server.
pub struct Sql {
    runtime: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Sql {
    pub fn connect(url: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .expect("connect to the test PostgreSQL");
            tokio::spawn(connection);
            client
        });
        Self { runtime, client }
    }

    /// Every (k, v) of a `schema.records` table, in key order.
    pub fn records(&self, schema: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.runtime.block_on(async {
            self.client
                .query(
                    &format!("SELECT k, v FROM {schema}.records ORDER BY k"),
                    &[],
                )
                .await
                .expect("select")
                .iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect()
        })
    }

    /// Sets (k, v) in a `schema.records` table.
    pub fn put(&self, schema: &str, key: &[u8], value: &[u8]) {
        self.runtime.block_on(async {
            self.client
                .execute(
                    &format!(
                        "INSERT INTO {schema}.records (k, v) VALUES ($1, $2) \
                         ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
                    ),
                    &[&key, &value],
                )
                .await
                .expect("upsert")
        });
    }

    /// Replaces a `schema.records` table's rows by `rows`.
    pub fn replace_all(&self, schema: &str, rows: &[(Vec<u8>, Vec<u8>)]) {
        self.runtime.block_on(async {
            self.client
                .execute(&format!("DELETE FROM {schema}.records"), &[])
                .await
                .expect("delete");
        });
        for (key, value) in rows {
            self.put(schema, key, value);
        }
    }

    /// Who holds the leader lease of `namespace` now (an expired row names nobody).
    #[allow(dead_code)]
    pub fn lease_holder(&self, namespace: &str) -> Option<String> {
        self.runtime.block_on(async {
            self.client
                .query_opt(
                    &format!(
                        "SELECT holder FROM {namespace}_system.leases WHERE name = 'leader' AND expires_at > now()"
                    ),
                    &[],
                )
                .await
                .ok()
                .flatten()
                .map(|row| row.get(0))
        })
    }

    /// Runs `sql` (statements without results).
    #[allow(dead_code)]
    pub fn execute(&self, sql: &str) {
        self.runtime.block_on(async {
            self.client
                .batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        });
    }

    /// The first column of every row of `sql`, as text.
    #[allow(dead_code)]
    pub fn strings(&self, sql: &str) -> Vec<String> {
        self.runtime.block_on(async {
            self.client
                .query(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .iter()
                .map(|row| row.get(0))
                .collect()
        })
    }

    /// Whether a schema exists.
    pub fn schema_exists(&self, schema: &str) -> bool {
        self.runtime.block_on(async {
            self.client
                .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
                .await
                .expect("select")
                .is_some()
        })
    }
}
