//! What the benchmarks share: client channels, the machine description, and the generated
//! sections of docs/BENCHMARKS.md.

#![allow(dead_code)] // each benchmark uses a different part

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tonic::Status;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A channel over mutual TLS to `127.0.0.1:port` as the principal whose certificate and key
/// are `certs/{principal}.crt|key`.
pub(crate) async fn channel(certs: &Path, port: u16, principal: &str) -> Channel {
    try_channel(certs, port, principal).await.expect("connect")
}

/// [`channel`], or `None` while the server is not listening yet.
pub(crate) async fn try_channel(certs: &Path, port: u16, principal: &str) -> Option<Channel> {
    let read = |f: String| std::fs::read(certs.join(f)).expect("cert");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.crt".into())))
        .identity(Identity::from_pem(
            read(format!("{principal}.crt")),
            read(format!("{principal}.key")),
        ))
        .domain_name("localhost");
    Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .ok()
}

/// CPU model, cores, memory and the time, for the report.
pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    format!(
        "{cpu}, {cores} cores, {memory} GiB, {}",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    )
}

/// Replaces the generated part of docs/BENCHMARKS.md between `<!-- {section}:begin -->` and
/// `<!-- {section}:end -->`.
pub(crate) fn write_report(section: &str, report: &str) {
    let begin = format!("<!-- {section}:begin -->");
    let end = format!("<!-- {section}:end -->");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/BENCHMARKS.md");
    let existing = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| format!("# Benchmarks\n\n{begin}\n{end}\n"));
    let updated = match (existing.find(&begin), existing.find(&end)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{begin}\n{report}{}", &existing[..b], &existing[e..])
        }
        _ => format!("{existing}\n{begin}\n{report}{end}\n"),
    };
    std::fs::write(&path, updated).expect("write docs/BENCHMARKS.md");
    println!("wrote {}", path.display());
}

/// Whether this run was started by `cargo bench` (with `--bench`), not by `cargo test`.
pub(crate) fn benchmarking() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// `KEYFRONT_BENCH_SECONDS`, default 3.
pub(crate) fn seconds() -> f64 {
    std::env::var("KEYFRONT_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0)
}

pub(crate) struct Measurement {
    pub(crate) ops: u64,
    pub(crate) elapsed: Duration,
    pub(crate) latency: Histogram<u64>,
}

impl Measurement {
    pub(crate) fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    pub(crate) fn quantile_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Runs `call` from `concurrency` tasks for `seconds`; latency in microseconds.
pub(crate) async fn drive<F, Fut>(concurrency: usize, seconds: f64, call: F) -> Measurement
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), Status>> + Send,
{
    // A short warm-up, not measured.
    let warm_until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < warm_until {
        call().await.expect("warm-up call");
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut latency = Histogram::<u64>::new(3).expect("histogram");
                let mut ops = 0u64;
                while Instant::now() < deadline {
                    let begun = Instant::now();
                    call().await.expect("benchmark call");
                    let micros = u64::try_from(begun.elapsed().as_micros()).unwrap_or(u64::MAX);
                    let _ = latency.record(micros.max(1));
                    ops += 1;
                }
                (ops, latency)
            })
        })
        .collect();
    let mut total = Histogram::<u64>::new(3).expect("histogram");
    let mut ops = 0;
    for task in tasks {
        let (n, h) = task.await.expect("task");
        ops += n;
        total.add(h).expect("merge");
    }
    Measurement {
        ops,
        elapsed: started.elapsed(),
        latency: total,
    }
}

/// The label of the token `scripts/bench.sh` creates.
pub(crate) const TOKEN_LABEL: &str = "keyfront-bench";

/// The bench token (`scripts/bench.sh` creates it and names its PIN file), initialized for
/// keyfront.
pub(crate) fn bench_hsm() -> keyfront::hsm::pkcs11::Pkcs11Config {
    use keyfront::hsm::pkcs11;
    assert!(
        std::env::var_os("SOFTHSM2_CONF").is_some(),
        "run through scripts/bench.sh (sets SOFTHSM2_CONF)"
    );
    let pin = std::fs::read_to_string(
        std::env::var("KEYFRONT_BENCH_PIN_FILE").expect("KEYFRONT_BENCH_PIN_FILE"),
    )
    .expect("pin");
    let config = pkcs11::Pkcs11Config {
        module: "/usr/lib/softhsm/libsofthsm2.so".into(),
        token_label: TOKEN_LABEL.into(),
        pin: cryptoki::types::AuthPin::from(pin.trim().to_owned()),
        sessions: std::num::NonZeroUsize::new(2).expect("2"),
        kek_cache_capacity: std::num::NonZeroUsize::new(4096).expect("4096"),
    };
    match pkcs11::init_token(&config) {
        Ok(_) | Err(keyfront::hsm::Error::AlreadyInitialized) => {}
        Err(error) => panic!("init: {error}"),
    }
    config
}

/// A principal of the dev trust domain (the certificates `dev::ensure_certificates` makes).
pub(crate) fn principal(
    path: &str,
    tenants: &[&str],
    role: keyfront::config::Role,
) -> keyfront::config::PrincipalConfig {
    use keyfront::config::TenantScope;
    keyfront::config::PrincipalConfig {
        identity: format!("{}/{path}", keyfront::cli::dev::TRUST_DOMAIN),
        tenants: if tenants == ["*"] {
            TenantScope::All
        } else {
            TenantScope::Only(tenants.iter().map(|t| t.parse().expect("name")).collect())
        },
        roles: vec![role],
        keys: None,
    }
}

/// `KEYFRONT_BENCH_ROUNDS`, default 3.
pub(crate) fn rounds() -> usize {
    std::env::var("KEYFRONT_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
}
