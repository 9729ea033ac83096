//! keyfront in cluster mode next to itself in single-node mode, on the same machine, token and
//! process: Encrypt 1 KiB through one node of a two-node cluster on PostgreSQL against a
//! single node on sled (the hot path must not touch PostgreSQL, so the ratio should be ~1), the
//! latency of the writes that do go to PostgreSQL (CreateKey, RotateKey, DisableKeyVersion),
//! and the stale window: how long after RotateKey returns on one node the other node still
//! encrypts under the old primary.
//!
//! Run with `scripts/bench.sh cluster` (release build, a fresh SoftHSM token, a private
//! PostgreSQL; writes docs/BENCHMARKS.md). `cargo test --all-targets` also runs this binary,
//! without `--bench`: it then does nothing.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod common;

use hdrhistogram::Histogram;
use keyfront::cli::dev;
use keyfront::config::{Config, Limits, Role, ServerConfig};
use keyfront::keystore::{Backend, PostgresOptions};
use keyfront::kms::KmsOptions;
use keyfront::service::pb::admin_service_client::AdminServiceClient;
use keyfront::service::pb::key_service_client::KeyServiceClient;
use keyfront::service::{Server, pb};
use tonic::transport::Channel;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ENCRYPT_CONCURRENCY: usize = 64;
/// Samples of the stale window and of DisableKeyVersion (each is one write and a wait).
const SAMPLES: usize = 30;

/// One node's clients: an officer and an app of tenant `acme`.
#[derive(Clone)]
struct Node {
    admin: AdminServiceClient<Channel>,
    app: KeyServiceClient<Channel>,
}

impl Node {
    async fn connect(certs: &std::path::Path, port: u16) -> Self {
        let mut admin = None;
        for _ in 0..200 {
            if let Some(channel) = common::try_channel(certs, port, "officer").await {
                let mut client = AdminServiceClient::new(channel);
                if client
                    .list_tenants(pb::ListTenantsRequest::default())
                    .await
                    .is_ok()
                {
                    admin = Some(client);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            admin: admin.expect("the node serves"),
            app: KeyServiceClient::new(common::channel(certs, port, "acme-app").await),
        }
    }

    async fn encrypt(&self, plaintext: Vec<u8>) -> pb::EncryptResponse {
        self.app
            .clone()
            .encrypt(pb::EncryptRequest {
                key: "default".into(),
                plaintext,
                ..Default::default()
            })
            .await
            .expect("encrypt")
            .into_inner()
    }
}

fn postgres_backend(url: &str, namespace: &str) -> Backend {
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

/// Transactions committed in the benchmark's database so far (PostgreSQL's statistics, which
/// it publishes with up to a second's delay).
async fn committed_transactions(url: &str) -> i64 {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the bench PostgreSQL");
    tokio::spawn(connection);
    client
        .query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .expect("pg_stat_database")
        .get(0)
}

/// One row of the latency table.
fn row(
    table: &mut String,
    operation: &str,
    mode: &str,
    concurrency: usize,
    m: &common::Measurement,
) {
    let _ = writeln!(
        table,
        "| {operation} | {mode} | {concurrency} | {:.0} | {:.2} | {:.2} | {:.2} |",
        m.rate(),
        m.quantile_ms(0.5),
        m.quantile_ms(0.99),
        m.latency.max() as f64 / 1000.0
    );
}

fn quantiles(histogram: &Histogram<u64>) -> String {
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    format!("{:.2} | {:.2} | {:.2}", ms(0.5), ms(0.99), ms(1.0))
}

fn main() {
    if !common::benchmarking() {
        println!("cluster: a benchmark; run it with scripts/bench.sh cluster");
        return;
    }
    let url = std::env::var("KEYFRONT_BENCH_POSTGRES_URL")
        .expect("KEYFRONT_BENCH_POSTGRES_URL (scripts/bench.sh cluster starts PostgreSQL)");
    let seconds = common::seconds();
    let rounds = common::rounds();
    let hsm = common::bench_hsm();
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    dev::ensure_certificates(&certs).expect("certificates");
    let namespace = format!("bench_{:08x}", rand::random::<u32>());

    let config = |name: &str, backend: Backend| Config {
        hsm: hsm.clone(),
        hsm_retry: Duration::from_secs(1),
        data_dir: dir.path().join(name).join("data"),
        kms: {
            let mut kms = KmsOptions::default();
            kms.store.backend = backend;
            kms
        },
        server: Some(ServerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            cert: certs.join("server.crt"),
            key: certs.join("server.key"),
            client_ca: certs.join("ca.crt"),
            allow_cn_identity: false,
            node_id: name.into(),
            audit_path: dir.path().join(name).join("audit/audit.log"),
            audit_checkpoints: keyfront::audit::CheckpointPolicy::default(),
            limits: Limits {
                max_concurrent_requests: 4096,
                request_timeout: Duration::from_secs(60),
                ..Limits::default()
            },
        }),
        principals: vec![
            common::principal("tenant/acme/app", &["acme"], Role::App),
            common::principal("officer", &["*"], Role::Officer),
        ],
        metrics_listen: None,
        dual_control: Default::default(),
        revocations: Default::default(),
        access: Default::default(),
        backup: Default::default(),
    };
    let configs = [
        config("single", Backend::Sled),
        config("node-a", postgres_backend(&url, &namespace)),
        config("node-b", postgres_backend(&url, &namespace)),
    ];

    // The three servers share one runtime of two workers, as `keyfront serve` has on this
    // machine; only one of them is under load at a time. The load has its own runtime.
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let ports: Vec<u16> = servers.block_on(async {
        let mut ports = Vec::new();
        for config in configs {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            ports.push(listener.local_addr().expect("addr").port());
            tokio::spawn(Server::new(config).run(listener, std::future::pending()));
        }
        ports
    });

    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let report = clients.block_on(async move {
        let single = Node::connect(&certs, ports[0]).await;
        let node_a = Node::connect(&certs, ports[1]).await;
        let node_b = Node::connect(&certs, ports[2]).await;
        for node in [&single, &node_a] {
            let mut admin = node.admin.clone();
            admin
                .create_tenant(pb::CreateTenantRequest { name: "acme".into(), request_id: String::new() })
                .await
                .expect("tenant");
            for key in ["default", "rotated"] {
                admin
                    .create_key(pb::CreateKeyRequest {
                        tenant: "acme".into(),
                        name: key.into(),
                        purpose: pb::KeyPurpose::Data as i32,
                        request_id: String::new(), ..Default::default() })
                    .await
                    .expect("key");
            }
        }
        // Both cluster nodes have the key cached before anything is measured.
        node_b.encrypt(vec![1; 16]).await;

        // 1. Encrypt 1 KiB at c=64, single node and cluster node in alternating rounds (the
        // order alternates too); the round with the median ratio is reported.
        let encrypt = |node: &Node| {
            let app = node.app.clone();
            move || {
                let mut app = app.clone();
                async move {
                    app.encrypt(pb::EncryptRequest { key: "default".into(), plaintext: vec![0xA5; 1024], ..Default::default() })
                        .await
                        .map(drop)
                }
            }
        };
        let mut pairs = Vec::new();
        let mut cluster_transactions = Vec::new();
        for round in 0..rounds {
            let (s, c) = if round % 2 == 0 {
                let s = common::drive(ENCRYPT_CONCURRENCY, seconds, encrypt(&single)).await;
                let before = committed_transactions(&url).await;
                let c = common::drive(ENCRYPT_CONCURRENCY, seconds, encrypt(&node_a)).await;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                cluster_transactions.push((committed_transactions(&url).await - before, c.elapsed, c.ops));
                (s, c)
            } else {
                let before = committed_transactions(&url).await;
                let c = common::drive(ENCRYPT_CONCURRENCY, seconds, encrypt(&node_a)).await;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                cluster_transactions.push((committed_transactions(&url).await - before, c.elapsed, c.ops));
                let s = common::drive(ENCRYPT_CONCURRENCY, seconds, encrypt(&single)).await;
                (s, c)
            };
            println!("round {round}: single {:.0}/s, cluster node {:.0}/s", s.rate(), c.rate());
            pairs.push((s, c));
        }
        pairs.sort_by(|a, b| (a.1.rate() / a.0.rate()).total_cmp(&(b.1.rate() / b.0.rate())));
        let ratios: Vec<String> = pairs.iter().map(|(s, c)| format!("{:.2}", c.rate() / s.rate())).collect();
        let (single_encrypt, cluster_encrypt) = pairs.swap_remove(pairs.len() / 2);
        let mut table = String::new();
        let _ = writeln!(table, "| operation | mode | concurrency | ops/s | p50 ms | p99 ms | max ms |");
        let _ = writeln!(table, "|---|---|---:|---:|---:|---:|---:|");
        for (mode, m) in [("single node (sled)", &single_encrypt), ("cluster node (PostgreSQL)", &cluster_encrypt)] {
            row(&mut table, "Encrypt 1 KiB", mode, ENCRYPT_CONCURRENCY, m);
        }

        // 2. The writes that go to PostgreSQL, at c=1 and c=4, next to the same on sled.
        let counter = Arc::new(AtomicU64::new(0));
        for concurrency in [1, 4] {
            for (mode, node) in [("single node (sled)", &single), ("cluster node (PostgreSQL)", &node_a)] {
                let create = {
                    let (admin, counter) = (node.admin.clone(), Arc::clone(&counter));
                    move || {
                        let mut admin = admin.clone();
                        let n = counter.fetch_add(1, Ordering::Relaxed);
                        async move {
                            admin
                                .create_key(pb::CreateKeyRequest {
                                    tenant: "acme".into(),
                                    name: format!("k{n:07}"),
                                    purpose: pb::KeyPurpose::Data as i32,
                                    request_id: String::new(), ..Default::default() })
                                .await
                                .map(drop)
                        }
                    }
                };
                let m = common::drive(concurrency, seconds, create).await;
                row(&mut table, "CreateKey", mode, concurrency, &m);
                let rotate = {
                    let admin = node.admin.clone();
                    move || {
                        let mut admin = admin.clone();
                        async move {
                            admin
                                .rotate_key(pb::RotateKeyRequest { tenant: "acme".into(), name: "rotated".into(), request_id: String::new() })
                                .await
                                .map(drop)
                        }
                    }
                };
                let m = common::drive(concurrency, seconds, rotate).await;
                row(&mut table, "RotateKey (one key)", mode, concurrency, &m);
            }
        }

        // 3. The stale window: RotateKey on node A, then Encrypt on node B until it names the
        // new version; and DisableKeyVersion, which waits out the bound before it returns.
        let mut window = Histogram::<u64>::new(3).expect("histogram");
        let mut disable = Histogram::<u64>::new(3).expect("histogram");
        let mut first_already_new = 0;
        for _ in 0..SAMPLES {
            let rotated = node_a
                .admin
                .clone()
                .rotate_key(pb::RotateKeyRequest { tenant: "acme".into(), name: "default".into(), request_id: String::new() })
                .await
                .expect("rotate")
                .into_inner();
            let acknowledged = Instant::now();
            let mut first = true;
            loop {
                let response = node_b.encrypt(vec![2; 16]).await;
                if response.key_version == rotated.latest_version {
                    if first {
                        first_already_new += 1;
                    }
                    break;
                }
                first = false;
            }
            let micros = u64::try_from(acknowledged.elapsed().as_micros()).unwrap_or(u64::MAX);
            let _ = window.record(micros.max(1));
            let started = Instant::now();
            node_a
                .admin
                .clone()
                .disable_key_version(pb::KeyVersionRequest {
                    tenant: "acme".into(),
                    name: "default".into(),
                    version: rotated.latest_version - 1,
                    request_id: String::new(),
                })
                .await
                .expect("disable");
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            let _ = disable.record(micros.max(1));
        }
        let transactions: Vec<String> = cluster_transactions
            .iter()
            .map(|(n, elapsed, ops)| format!("{n} transactions in {:.1} s during {ops} Encrypt requests", elapsed.as_secs_f64() + 1.5))
            .collect();
        let machine = common::machine();
        format!(
            "Command: `scripts/bench.sh cluster` ({seconds} s per cell, {rounds} rounds). Machine: {machine}. \
             One process runs three servers on one runtime of two workers, sharing the SoftHSM token: a single node on sled \
             and two cluster nodes on a private PostgreSQL 15 (loopback, `synchronous_commit` on); the load generator has its own two workers. \
             Only one server is under load at a time.\n\n{table}\n\
             Encrypt: the round with the median ratio of {rounds} is shown; cluster/single ratios of all rounds: {}. \
             PostgreSQL's own count of committed transactions (pg_stat_database, all nodes and the measuring connections included) \
             while the cluster node served Encrypt, per round: {}.\n\n\
             | stale window and bound | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|\n\
             | RotateKey returns on node A → node B encrypts under the new version ({SAMPLES} samples; {first_already_new} times the first Encrypt on B already did) | {} |\n\
             | DisableKeyVersion on node A (waits the 1 s bound, so that no node uses the version after it returns) | {} |\n",
            ratios.join(", "),
            transactions.join(", "),
            quantiles(&window),
            quantiles(&disable),
        )
    });
    println!("\n{report}");
    common::write_report("cluster", &report);
}
