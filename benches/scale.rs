//! Scale and growth: many tenants with two keys each, created in process against SoftHSM; then
//! the real `keyfront serve` binary started on them, measured from outside as an operator
//! would: startup time to SERVING, RSS, each tenant's first request, and Encrypt with 1, 100
//! and 10,000 tenants active in turn.
//!
//! Run with `scripts/bench.sh scale` (release build, the bench token; writes the `scale`
//! section of docs/BENCHMARKS.md). `KEYFRONT_SCALE_TENANTS` sets the number of tenants
//! (default 100000); `KEYFRONT_SCALE_REUSE=1` reuses the tenants of an earlier run of the same
//! size in `target/bench-scale` instead of creating them again.
//! `cargo test --all-targets` also runs this binary, without `--bench`: it then does nothing.

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use keyfront::cli::dev;
use keyfront::hsm::Hsm;
use keyfront::hsm::pkcs11::{Pkcs11Config, Pkcs11Hsm};
use keyfront::ids::Name;
use keyfront::keystore::Purpose;
use keyfront::kms::{Kms, KmsOptions};
use keyfront::service::pb;
use keyfront::service::pb::key_service_client::KeyServiceClient;
use rand::seq::SliceRandom;

use common::TOKEN_LABEL;
const APP_IDENTITY: &str = "spiffe://keyfront.dev/scale/app";
const ACTIVE: [usize; 3] = [1, 100, 10_000];
const ENCRYPT_CONCURRENCY: usize = 64;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn tenant_name(i: usize) -> String {
    format!("t{i:06}")
}

fn main() {
    if !common::benchmarking() {
        println!("scale: a benchmark; run it with scripts/bench.sh scale");
        return;
    }
    assert!(
        std::env::var_os("SOFTHSM2_CONF").is_some(),
        "run through scripts/bench.sh (sets SOFTHSM2_CONF)"
    );
    let tenants: usize = env_or("KEYFRONT_SCALE_TENANTS", 100_000);
    let creators: usize = env_or("KEYFRONT_SCALE_CREATORS", 4);
    let touch_concurrency: usize = env_or("KEYFRONT_SCALE_TOUCH_CONCURRENCY", 1);
    let seconds = common::seconds();
    let rounds: usize = env_or("KEYFRONT_BENCH_ROUNDS", 3);
    let work = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-scale");
    let pin_file =
        PathBuf::from(std::env::var("KEYFRONT_BENCH_PIN_FILE").expect("KEYFRONT_BENCH_PIN_FILE"));
    let hsm_config = common::bench_hsm();

    // 1. Create the tenants (or reuse those of an earlier run of the same size and token).
    let data = work.join("data");
    let marker = work.join(format!("created-{tenants}"));
    let reuse = std::env::var_os("KEYFRONT_SCALE_REUSE").is_some() && marker.exists();
    let creation = if reuse {
        println!("reusing {tenants} tenants in {}", data.display());
        std::fs::read_to_string(&marker).expect("marker")
    } else {
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).expect("work dir");
        let summary = create_tenants(&hsm_config, &data, tenants, creators);
        std::fs::write(&marker, &summary).expect("marker");
        summary
    };
    println!("creation: {creation}");
    let disk_tenants = disk_bytes(&data.join("tenants"));
    let disk_system = disk_bytes(&data.join("system"));
    let per_tenant = |bytes: u64| bytes as f64 / tenants as f64 / 1024.0;
    println!(
        "disk: tenant databases {:.1} KiB per tenant, system database {:.1} KiB per tenant",
        per_tenant(disk_tenants),
        per_tenant(disk_system)
    );

    // 2. Start the real server on them.
    let certs = work.join("certs");
    dev::ensure_certificates(&certs).expect("certificates");
    if !certs.join("scale-app.crt").exists() {
        dev::issue_client_certificate(&certs, "scale-app", &[APP_IDENTITY], "scale-app")
            .expect("client certificate");
    }
    let port = free_port();
    let metrics_port = free_port();
    let config = write_config(&work, &pin_file, port, metrics_port, tenants);
    let _ = std::fs::remove_dir_all(work.join("audit"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let mut server = Server::spawn(&config, &work.join("server.log"));
    let startup = runtime.block_on(wait_until_serving(&certs, port, started, &mut server));
    println!("startup to SERVING: {:.0} ms", startup.as_secs_f64() * 1e3);
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss = server.rss_bytes();
    println!("idle RSS: {:.0} MiB", mib(idle_rss));

    // 3. Each tenant's first request, in random order; then the RSS.
    let first = runtime.block_on(first_requests(&certs, port, tenants, touch_concurrency));
    let touch_rss = server.rss_bytes();
    let metrics_after_touch = scrape(metrics_port);
    std::fs::write(work.join("metrics-after-touch.txt"), &metrics_after_touch).expect("metrics");
    println!(
        "first requests: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; RSS after: {:.0} MiB",
        first.quantile_ms(0.5),
        first.quantile_ms(0.99),
        first.quantile_ms(0.999),
        first.latency.max() as f64 / 1000.0,
        mib(touch_rss)
    );

    // 4. Encrypt with 1, 100 and 10,000 tenants active, in alternating rounds.
    let active: Vec<usize> = ACTIVE.iter().map(|a| (*a).min(tenants)).collect();
    let encrypt = runtime.block_on(encrypt_active(&certs, port, &active, rounds, seconds));
    let final_rss = server.rss_bytes();
    let metrics = scrape(metrics_port);
    std::fs::write(work.join("metrics-at-end.txt"), &metrics).expect("metrics");
    server.stop();

    let mut table = String::new();
    let _ = writeln!(table, "| measure | result | target |");
    let _ = writeln!(table, "|---|---|---|");
    let _ = writeln!(
        table,
        "| create {tenants} tenants with 2 keys each (in process, {creators} threads) | {creation} | — |"
    );
    let _ = writeln!(
        table,
        "| disk per idle tenant | {:.1} KiB tenant database + {:.1} KiB in the system database | < 100 KiB |",
        per_tenant(disk_tenants),
        per_tenant(disk_system)
    );
    let _ = writeln!(
        table,
        "| startup to SERVING (process start to first SERVING health answer) | {:.0} ms | < 2 s |",
        startup.as_secs_f64() * 1e3
    );
    let _ = writeln!(
        table,
        "| idle RSS after start | {:.0} MiB | — |",
        mib(idle_rss)
    );
    let _ = writeln!(
        table,
        "| first Encrypt of each tenant after start (opens its database, unwraps KEK and bulk key), {} at a time, random order | p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms | p99 < 10 ms |",
        touch_concurrency,
        first.quantile_ms(0.5),
        first.quantile_ms(0.99),
        first.quantile_ms(0.999),
        first.latency.max() as f64 / 1000.0
    );
    let _ = writeln!(
        table,
        "| RSS after touching every tenant once | {:.0} MiB ({} tenant databases open) | < 512 MiB |",
        mib(touch_rss),
        metric(&metrics_after_touch, "keyfront_open_tenant_databases")
    );
    let base = encrypt.first().map_or(1.0, |(_, m)| m.rate());
    for (active, measurement) in &encrypt {
        let _ = writeln!(
            table,
            "| Encrypt 1 KiB, concurrency {ENCRYPT_CONCURRENCY}, active tenants: {active} | {:.0}/s ({:.2} × 1 tenant), p50 {:.2} ms, p99 {:.2} ms | ≥ 0.8 × 1 tenant |",
            measurement.rate(),
            measurement.rate() / base,
            measurement.quantile_ms(0.5),
            measurement.quantile_ms(0.99),
        );
    }
    let _ = writeln!(
        table,
        "| RSS at the end | {:.0} MiB | < 512 MiB |",
        mib(final_rss)
    );
    let report = format!(
        "Command: `scripts/bench.sh scale` ({seconds} s per cell, median of {rounds} rounds). \
         Machine: {}.\n\n{table}\n\
         From /metrics at the end: bulk-key cache {:.0} hits / {:.0} misses; HSM unwrap_kek {:.0}, \
         decrypt {:.0}; open tenant databases {}.\n",
        common::machine(),
        metric_sum(
            &metrics,
            "keyfront_cache_requests_total{cache=\"bulk_key\",result=\"hit\"}"
        ),
        metric_sum(
            &metrics,
            "keyfront_cache_requests_total{cache=\"bulk_key\",result=\"miss\"}"
        ),
        metric_sum(
            &metrics,
            "keyfront_hsm_operations_total{op=\"unwrap_kek\",outcome=\"ok\"}"
        ),
        metric_sum(
            &metrics,
            "keyfront_hsm_operations_total{op=\"decrypt\",outcome=\"ok\"}"
        ),
        metric(&metrics, "keyfront_open_tenant_databases"),
    );
    println!("\n{report}");
    if tenants == 100_000 {
        common::write_report("scale", &report);
    } else {
        println!("(not written to docs/BENCHMARKS.md: only a 100000-tenant run is)");
    }
}

/// Creates `count` tenants with keys `default` (data) and `secrets` from `threads` threads;
/// returns a one-line summary.
fn create_tenants(config: &Pkcs11Config, data: &Path, count: usize, threads: usize) -> String {
    let hsm = Arc::new(Pkcs11Hsm::open(config).expect("open HSM")) as Arc<dyn Hsm>;
    let kms = Kms::open(hsm, data, KmsOptions::default()).expect("open kms");
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let latency = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut latency = Histogram::<u64>::new(3).expect("histogram");
                    let default: Name = "default".parse().expect("name");
                    let secrets: Name = "secrets".parse().expect("name");
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            return latency;
                        }
                        let begun = Instant::now();
                        let name: Name = tenant_name(i).parse().expect("name");
                        let id = kms.create_tenant(&name).expect("create tenant").id;
                        kms.create_key(id, &default, Purpose::Data)
                            .expect("create key");
                        kms.create_key(id, &secrets, Purpose::Secrets)
                            .expect("create key");
                        let _ = latency.record(micros(begun.elapsed()));
                        if (i + 1) % 10_000 == 0 {
                            println!(
                                "created {} tenants in {:.0} s",
                                i + 1,
                                started.elapsed().as_secs_f64()
                            );
                        }
                    }
                })
            })
            .collect();
        let mut total = Histogram::<u64>::new(3).expect("histogram");
        for worker in workers {
            total.add(worker.join().expect("worker")).expect("merge");
        }
        total
    });
    let elapsed = started.elapsed().as_secs_f64();
    format!(
        "{elapsed:.0} s ({:.0} tenants/s; per tenant p50 {:.1} ms, p99 {:.1} ms)",
        count as f64 / elapsed,
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0
    )
}

/// The keyfront server as a child process.
struct Server {
    child: Child,
}

impl Server {
    fn spawn(config: &Path, log: &Path) -> Self {
        let log = std::fs::File::create(log).expect("server log");
        let child = Command::new(env!("CARGO_BIN_EXE_keyfront"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start keyfront serve");
        Self { child }
    }

    fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("server status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn write_config(
    work: &Path,
    pin_file: &Path,
    port: u16,
    metrics_port: u16,
    tenants: usize,
) -> PathBuf {
    let names: Vec<String> = (0..tenants)
        .map(|i| format!("\"{}\"", tenant_name(i)))
        .collect();
    let text = format!(
        "[hsm]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"{TOKEN_LABEL}\"\npin_file = \"{}\"\n\n\
         [storage]\ndata_dir = \"data\"\n\n\
         [server]\nlisten = \"127.0.0.1:{port}\"\ncert = \"certs/server.crt\"\nkey = \"certs/server.key\"\n\
         client_ca = \"certs/ca.crt\"\nnode_id = \"scale\"\naudit_path = \"audit/audit.log\"\n\
         max_concurrent_requests = 4096\n\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
         [[principals]]\nidentity = \"{}/officer\"\ntenants = [\"*\"]\nroles = [\"officer\"]\n\n\
         # One application identity serving every tenant: the largest principal a config can hold.\n\
         [[principals]]\nidentity = \"{APP_IDENTITY}\"\nroles = [\"app\"]\ntenants = [{}]\n",
        pin_file.display(),
        dev::TRUST_DOMAIN,
        names.join(", ")
    );
    let path = work.join("keyfront.toml");
    std::fs::write(&path, text).expect("config");
    path
}

/// Polls health every 5 ms until SERVING; the time since `started`.
async fn wait_until_serving(
    certs: &Path,
    port: u16,
    started: Instant,
    server: &mut Server,
) -> Duration {
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    loop {
        assert!(
            !server.exited(),
            "keyfront serve exited; see target/bench-scale/server.log"
        );
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "keyfront serve did not become SERVING in 300 s"
        );
        if let Some(channel) = common::try_channel(certs, port, "officer").await {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let status = health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .map(|r| r.into_inner().status);
            if status.is_ok_and(|s| s == serving) {
                return started.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn encrypt_request(tenant: String) -> pb::EncryptRequest {
    pb::EncryptRequest {
        key: "default".into(),
        tenant,
        plaintext: vec![0xA5; 1024],
        ..Default::default()
    }
}

/// One Encrypt per tenant, in random order, `concurrency` at a time.
async fn first_requests(
    certs: &Path,
    port: u16,
    tenants: usize,
    concurrency: usize,
) -> common::Measurement {
    let client = KeyServiceClient::new(common::channel(certs, port, "scale-app").await);
    let mut order: Vec<usize> = (0..tenants).collect();
    order.shuffle(&mut rand::rng());
    let order = Arc::new(order);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (mut client, order, next) = (client.clone(), order.clone(), next.clone());
            tokio::spawn(async move {
                let mut latency = Histogram::<u64>::new(3).expect("histogram");
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(tenant) = order.get(i) else {
                        return latency;
                    };
                    let begun = Instant::now();
                    client
                        .encrypt(encrypt_request(tenant_name(*tenant)))
                        .await
                        .expect("first encrypt");
                    let _ = latency.record(micros(begun.elapsed()));
                    if (i + 1) % 20_000 == 0 {
                        println!("touched {} tenants", i + 1);
                    }
                }
            })
        })
        .collect();
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    for task in tasks {
        latency.add(task.await.expect("task")).expect("merge");
    }
    common::Measurement {
        ops: tenants as u64,
        elapsed: started.elapsed(),
        latency,
    }
}

/// Encrypt at concurrency 64 spread over the first `n` tenants, for each `n` in `active`;
/// `rounds` alternating rounds, the median of each.
async fn encrypt_active(
    certs: &Path,
    port: u16,
    active: &[usize],
    rounds: usize,
    seconds: f64,
) -> Vec<(usize, common::Measurement)> {
    let client = KeyServiceClient::new(common::channel(certs, port, "scale-app").await);
    let mut results: Vec<Vec<common::Measurement>> = active.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (slot, &n) in active.iter().enumerate() {
            let names: Arc<Vec<String>> = Arc::new((0..n).map(tenant_name).collect());
            // Warm: one request per active tenant, so the measurement sees the steady state.
            for name in names.iter() {
                client
                    .clone()
                    .encrypt(encrypt_request(name.clone()))
                    .await
                    .expect("warm encrypt");
            }
            let next = Arc::new(AtomicUsize::new(0));
            let call = {
                let client = client.clone();
                move || {
                    let mut client = client.clone();
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let tenant = names[i % names.len()].clone();
                    async move { client.encrypt(encrypt_request(tenant)).await.map(drop) }
                }
            };
            results[slot].push(common::drive(ENCRYPT_CONCURRENCY, seconds, call).await);
        }
    }
    active
        .iter()
        .zip(results)
        .map(|(&n, mut runs)| {
            runs.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
            (n, runs.swap_remove(runs.len() / 2))
        })
        .collect()
}

fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics");
    let _ = write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    );
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body
}

fn metric_sum(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn metric(metrics: &str, name: &str) -> String {
    format!("{:.0}", metric_sum(metrics, &format!("{name} ")))
}

fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    own + std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| disk_bytes(&e.path()))
                .sum::<u64>()
        })
        .unwrap_or(0)
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
