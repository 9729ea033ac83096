//! A month of production in minutes: `keyfront serve` processes run for weeks of simulated time
//! (the test clock, shared through `KEYFRONT_TEST_CLOCK_FILE` so that it survives `kill -9`),
//! with every feature on at once, and after each simulated day the test checks what a month
//! of production must keep true. Features that each pass their own tests fail where they meet
//! over time (a shared key prefix once stopped scheduled rotation for every tenant); this is
//! where they meet. In the manner of FoundationDB's simulation and TigerBeetle's VOPR: one
//! seeded random stream decides what happens when; the seed is printed, and
//! `KEYFRONT_SIM_SEED` replays the same decisions.
//!
//! What runs: tenants acme, globex and umbrella (destroyed on day 3); keys with rotation
//! periods (1 day, 3 days, 7 days) and a usage limit; Encrypt, Decrypt, data keys and MACs;
//! keys created and rotated through the Rust client (which sends request_ids) and through raw
//! requests whose ids are reused on purpose; nightly snapshots with 30 days' retention;
//! support grants requested, approved, used, revoked or left to expire; version destructions
//! scheduled early, carried out after their 30-day window; a master key rotation (sled); audit
//! checkpoints and daily files; `kill -9` of a node at random moments, under load.
//!
//! After each day: every acknowledged ciphertext and data key in a sample (all of them at the
//! end) opens, unless its version or tenant was destroyed or scheduled for it, and then never;
//! every key with a period is not overdue (it rotated at the first tick after it was due); a
//! request_id over a day old is forgotten; grants ended when they should; no ERROR in any
//! node's log. At the end: a snapshot for every one of the last 30 nights, each verifying, and
//! every node's audit log verifying with the HSM's public key.
//!
//! `KEYFRONT_SIM_DAYS` (default 36: the 30-day destruction windows must end inside the run);
//! `KEYFRONT_SIM_DAYS=365` is the long form (docs/TESTING.md).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::dev_server::{BIN, text};
use keyfront::service::pb;
use keyfront::service::pb::access_service_client::AccessServiceClient;
use keyfront::service::pb::admin_service_client::AdminServiceClient;
use keyfront::service::pb::key_service_client::KeyServiceClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::Code;
use tonic::transport::Channel;

const DAY: u64 = 86_400;
const STEP: u64 = 6 * 3_600;
const STEPS_PER_DAY: u64 = DAY / STEP;
/// Keys with a rotation period: (tenant, key, period in days).
const PERIODS: &[(&str, &str, u64)] = &[
    ("acme", "default", 1),
    ("globex", "default", 3),
    ("acme", "mac", 7),
];
/// The DATA keys that traffic uses (umbrella's until it is destroyed).
const DATA_KEYS: &[(&str, &str)] = &[
    ("acme", "default"),
    ("globex", "default"),
    ("umbrella", "default"),
];

fn days() -> u64 {
    std::env::var("KEYFRONT_SIM_DAYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(36)
}

fn seed() -> u64 {
    std::env::var("KEYFRONT_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random)
}

fn real_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Simulated time: an offset every server process reads from one file.
struct SimClock {
    file: PathBuf,
    offset: u64,
}

impl SimClock {
    fn new(dir: &Path) -> Self {
        let file = dir.join("clock");
        std::fs::write(&file, "0").expect("clock file");
        Self { file, offset: 0 }
    }

    fn now(&self) -> u64 {
        real_now() + self.offset
    }

    /// Lets `secs` pass for every process (each reads the file every 5 ms).
    async fn advance(&mut self, secs: u64) {
        self.offset += secs;
        let partial = self.file.with_extension("partial");
        std::fs::write(&partial, self.offset.to_string()).expect("write clock");
        std::fs::rename(&partial, &self.file).expect("rename clock");
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

/// One `keyfront serve` process of the deployment.
struct Node {
    config: PathBuf,
    /// The PostgreSQL connection string (cluster nodes read it from the environment).
    postgres_url: Option<String>,
    softhsm_conf: PathBuf,
    port: u16,
    log: PathBuf,
    audit_dir: PathBuf,
    child: Option<Child>,
    /// Bytes of `log` already scanned for ERROR lines.
    scanned: usize,
}

impl Node {
    fn start(&mut self, clock: &SimClock) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("node log");
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("SOFTHSM2_CONF", &self.softhsm_conf)
            .env("KEYFRONT_TEST_CLOCK_FILE", &clock.file)
            .env("RUST_LOG", "info")
            .envs(
                self.postgres_url
                    .iter()
                    .map(|url| ("KEYFRONT_DEV_POSTGRES_URL", url.as_str())),
            )
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("keyfront serve starts");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn stop(&mut self) -> i32 {
        let Some(mut child) = self.child.take() else {
            return 0;
        };
        let pid = i32::try_from(child.id()).expect("pid");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        child.wait().ok().and_then(|s| s.code()).unwrap_or(-1)
    }

    /// The ERROR lines the node logged since the last call.
    fn new_errors(&mut self) -> Vec<String> {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        let fresh = text(&bytes[self.scanned.min(bytes.len())..]);
        self.scanned = bytes.len();
        fresh
            .lines()
            .filter(|l| l.contains(" ERROR "))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A ciphertext or data key the server acknowledged.
#[derive(Clone, Debug)]
struct Acked {
    tenant: String,
    key: String,
    version: u32,
    blob: Vec<u8>,
    context: String,
    plaintext: Vec<u8>,
    data_key: bool,
}

/// What the test knows the state must be.
#[derive(Default)]
struct Model {
    acked: Vec<Acked>,
    /// (tenant, key, version) → when its scheduled destruction is due.
    destructions: HashMap<(String, String, u32), u64>,
    /// Tenants whose destruction was asked for.
    doomed: HashSet<String>,
    /// request_id → (the day it was used, the key it created).
    request_ids: BTreeMap<u64, String>,
}

impl Model {
    /// Whether `acked` must open now.
    fn opens(&self, acked: &Acked) -> bool {
        !self.doomed.contains(&acked.tenant)
            && !self.destructions.contains_key(&(
                acked.tenant.clone(),
                acked.key.clone(),
                acked.version,
            ))
    }
}

/// The deployment under simulation: the dev directory (certificates, token, public key) and
/// its nodes.
struct Sim {
    seed: u64,
    rng: StdRng,
    _root: tempfile::TempDir,
    dir: PathBuf,
    clock: SimClock,
    nodes: Vec<Node>,
    model: Model,
    /// Figures for the report.
    kills: usize,
    operations: u64,
    rotations_seen: u64,
    postgres: bool,
    /// PostgreSQL's connection string and the deployment's namespace (cluster mode).
    lease: Option<(String, String)>,
}

/// Edits a node config for the simulation: a fast scheduler, frequent checkpoints, and the
/// simulation's principals.
fn simulation_config(text: &str) -> String {
    let mut config = text.replacen(
        "audit_path = \"audit/audit.log\"",
        "audit_path = \"audit/audit.log\"\naudit_checkpoint_lines = 40",
        1,
    );
    config.push_str(
        "\n[keys]\nscheduler_interval_ms = 100\n\n\
         # The simulation's principals: its three tenants, one data role each.\n\
         [[principals]]\nidentity = \"spiffe://keyfront.dev/sim-app\"\ntenants = [\"acme\", \"globex\", \"umbrella\"]\nroles = [\"app\"]\n\n\
         [[principals]]\nidentity = \"spiffe://keyfront.dev/sim-backup\"\ntenants = [\"acme\", \"globex\", \"umbrella\"]\nroles = [\"backup\"]\n",
    );
    config
}

fn free_port_pair() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        if port < 65_000 && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

impl Sim {
    /// A single node on sled, or two nodes on PostgreSQL, made by `keyfront dev`.
    fn new(postgres: Option<String>) -> Self {
        let seed = seed();
        eprintln!("simulation seed {seed} (KEYFRONT_SIM_SEED={seed} replays it)");
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("dev");
        let port = free_port_pair();
        let clock = SimClock::new(root.path());
        let mut command = Command::new(BIN);
        command
            .args(["dev", "--dir"])
            .arg(&dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env_remove("SOFTHSM2_CONF")
            .env_remove("KEYFRONT_DEV_DIR");
        let mut nodes = Vec::new();
        let mut lease = None;
        if let Some(url) = &postgres {
            let namespace = common::postgres::namespace("sim");
            lease = Some((url.clone(), namespace.clone()));
            let made = command
                .args([
                    "--nodes",
                    "2",
                    "--prepare-only",
                    "--postgres-namespace",
                    &namespace,
                ])
                .env("KEYFRONT_DEV_POSTGRES_URL", url)
                .output()
                .expect("keyfront dev --prepare-only");
            assert!(made.status.success(), "{}", text(&made.stderr));
            for i in 0..2u16 {
                let node = dir.join(format!("node-{i}"));
                nodes.push(Node {
                    config: node.join("keyfront.toml"),
                    postgres_url: Some(url.clone()),
                    softhsm_conf: node.join("hsm/softhsm2.conf"),
                    port: port + i,
                    log: node.join("server.log"),
                    audit_dir: node.join("audit"),
                    child: None,
                    scanned: 0,
                });
            }
        } else {
            // Made once by `keyfront dev`, then served by `keyfront serve` as production would.
            let mut dev = command
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("keyfront dev");
            let ready = (0..300).any(|_| {
                std::thread::sleep(Duration::from_millis(100));
                dir.join(keyfront::cli::dev::PID_FILE).exists()
            });
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(dev.id()).expect("pid")),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = dev.wait();
            assert!(ready, "keyfront dev did not come up");
            nodes.push(Node {
                config: dir.join("keyfront.toml"),
                postgres_url: None,
                softhsm_conf: dir.join("hsm/softhsm2.conf"),
                port,
                log: dir.join("server.log"),
                audit_dir: dir.join("audit"),
                child: None,
                scanned: 0,
            });
        }
        let certs = dir.join("certs");
        for name in ["sim-app", "sim-backup"] {
            keyfront::cli::dev::issue_client_certificate(
                &certs,
                name,
                &[&format!("spiffe://keyfront.dev/{name}")],
                name,
            )
            .expect("certificate");
        }
        for node in &nodes {
            let config = std::fs::read_to_string(&node.config).expect("config");
            std::fs::write(&node.config, simulation_config(&config)).expect("write config");
        }
        let mut sim = Self {
            seed,
            rng: StdRng::seed_from_u64(seed),
            _root: root,
            dir,
            clock,
            nodes,
            model: Model::default(),
            kills: 0,
            operations: 0,
            rotations_seen: 0,
            postgres: postgres.is_some(),
            lease,
        };
        for i in 0..sim.nodes.len() {
            sim.nodes[i].start(&sim.clock);
        }
        sim
    }

    fn fail(&self, what: impl std::fmt::Display) -> ! {
        let mut logs = String::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let log = text(&std::fs::read(&node.log).unwrap_or_default());
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            logs.push_str(&format!("\n--- the last lines of node {i}'s log:\n{tail}"));
        }
        panic!(
            "day {:.2} of the simulation (seed {}; KEYFRONT_SIM_SEED={} replays it): {what}{logs}",
            self.clock.offset as f64 / DAY as f64,
            self.seed,
            self.seed
        );
    }

    /// A channel to a node (random on a cluster) as `principal`; reconnects by itself.
    fn channel(&mut self, principal: &str) -> Channel {
        let node = self.rng.random_range(0..self.nodes.len());
        self.channel_to(node, principal)
    }

    fn channel_to(&self, node: usize, principal: &str) -> Channel {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let certs = self.dir.join("certs");
        let read = |f: String| std::fs::read(certs.join(f)).expect("certificate");
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.crt".into())))
            .identity(Identity::from_pem(
                read(format!("{principal}.crt")),
                read(format!("{principal}.key")),
            ))
            .domain_name("localhost");
        Channel::from_shared(format!("https://127.0.0.1:{}", self.nodes[node].port))
            .expect("uri")
            .tls_config(tls)
            .expect("tls")
            .timeout(Duration::from_secs(20))
            .connect_lazy()
    }

    fn client(&mut self, principal: &str) -> keyfront_client::Client {
        let node = self.rng.random_range(0..self.nodes.len());
        let certs = self.dir.join("certs");
        let mut config = keyfront_client::Config::new(
            format!("https://localhost:{}", self.nodes[node].port),
            certs.join("ca.crt"),
            certs.join(format!("{principal}.crt")),
            certs.join(format!("{principal}.key")),
        );
        config.retry.max_attempts = 10;
        config.timeout_ms = 30_000;
        keyfront_client::Client::connect(config).expect("client")
    }

    /// Waits until every node answers health SERVING (after a start or a restart).
    async fn until_serving(&self) {
        for node in 0..self.nodes.len() {
            let mut health = tonic_health::pb::health_client::HealthClient::new(
                self.channel_to(node, "officer"),
            );
            let mut serving = false;
            for _ in 0..300 {
                if let Some(child) = self.nodes[node].child.as_ref() {
                    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
                    if nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG))
                        .is_ok_and(|s| !matches!(s, nix::sys::wait::WaitStatus::StillAlive))
                    {
                        self.fail(format!("node {node} exited"));
                    }
                }
                let status = health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(|r| r.into_inner().status);
                if status.is_ok_and(|s| s == 1) {
                    serving = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if !serving {
                self.fail(format!("node {node} never became SERVING"));
            }
        }
    }

    /// An officer call retried through restarts (UNAVAILABLE) and cluster commit races
    /// (ABORTED); anything else is the answer.
    async fn admin<T, F, Fut>(&mut self, what: &str, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(AdminServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = None;
        for _ in 0..100 {
            let admin = AdminServiceClient::new(self.channel("officer"));
            match call(admin).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status)
                    if matches!(
                        status.code(),
                        Code::Unavailable | Code::Aborted | Code::Unknown | Code::Cancelled
                    ) =>
                {
                    last = Some(status);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => return Err(status),
            }
        }
        self.fail(format!("{what}: still refused after retries: {last:?}"))
    }

    async fn key(&mut self, tenant: &str, name: &str) -> pb::Key {
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        self.admin("GetKey", |mut admin| {
            let request = pb::GetKeyRequest {
                tenant: tenant.clone(),
                name: name.clone(),
            };
            async move { admin.get_key(request).await }
        })
        .await
        .unwrap_or_else(|status| self.fail(format!("GetKey {tenant}/{name}: {status:?}")))
    }

    /// Day 0: the simulation's tenant, periods and limits.
    async fn set_up(&mut self) {
        self.until_serving().await;
        let officer = self.client("officer");
        self.admin("CreateTenant umbrella", |mut admin| async move {
            admin
                .create_tenant(pb::CreateTenantRequest {
                    name: "umbrella".into(),
                    request_id: "sim-umbrella".into(),
                })
                .await
        })
        .await
        .unwrap_or_else(|s| self.fail(format!("CreateTenant: {s:?}")));
        officer
            .create_key(
                "umbrella",
                "default",
                keyfront_client::pb::KeyPurpose::Data,
                keyfront_client::pb::KeyAlgorithm::Unspecified,
            )
            .await
            .unwrap_or_else(|e| self.fail(format!("CreateKey umbrella/default: {e}")));
        for (tenant, key, days) in PERIODS {
            let (tenant, key) = ((*tenant).to_owned(), (*key).to_owned());
            let seconds = i64::try_from(days * DAY).expect("period");
            let limit = (tenant == "globex").then_some(400);
            self.admin("UpdateKeyPolicy", |mut admin| {
                let request = pb::UpdateKeyPolicyRequest {
                    tenant: tenant.clone(),
                    name: key.clone(),
                    rotation_period_seconds: Some(seconds),
                    max_bulk_uses: limit,
                    ..Default::default()
                };
                async move { admin.update_key_policy(request).await }
            })
            .await
            .unwrap_or_else(|s| self.fail(format!("UpdateKeyPolicy: {s:?}")));
        }
    }

    /// A burst of data traffic (Encrypt, GenerateDataKey, GenerateMac), every answer
    /// recorded; with `kill`, one node is killed at a random moment during it, and what was
    /// not answered is simply not acknowledged.
    async fn traffic(&mut self, kill: bool) {
        let day = self.clock.offset / DAY;
        let mut tasks = Vec::new();
        for worker in 0..4u64 {
            let app = KeyServiceClient::new(self.channel("sim-app"));
            let backup = KeyServiceClient::new(self.channel("sim-backup"));
            let count = self.rng.random_range(3..8);
            let plan: Vec<(usize, u64)> = (0..count)
                .map(|_| (self.rng.random_range(0..DATA_KEYS.len()), self.rng.random()))
                .collect();
            let doomed = self.model.doomed.clone();
            tasks.push(tokio::spawn(async move {
                let (mut app, mut backup) = (app, backup);
                let mut acked = Vec::new();
                for (n, (key, nonce)) in plan.into_iter().enumerate() {
                    let (tenant, name) = DATA_KEYS[key];
                    if doomed.contains(tenant) {
                        continue;
                    }
                    let context = format!("d{day}-w{worker}-n{n}");
                    let plaintext = format!("{tenant} {nonce:016x}").into_bytes();
                    let contexts: HashMap<String, String> =
                        [("sim".to_owned(), context.clone())].into();
                    if n % 3 == 2 {
                        if let Ok(reply) = backup
                            .generate_data_key(pb::GenerateDataKeyRequest {
                                key: name.into(),
                                context: contexts,
                                include_plaintext: true,
                                tenant: tenant.into(),
                                grant_id: String::new(),
                            })
                            .await
                        {
                            let reply = reply.into_inner();
                            acked.push(Acked {
                                tenant: tenant.into(),
                                key: name.into(),
                                version: reply.key_version,
                                blob: reply.wrapped_key,
                                context,
                                plaintext: reply.plaintext_key,
                                data_key: true,
                            });
                        }
                    } else if let Ok(reply) = app
                        .encrypt(pb::EncryptRequest {
                            key: name.into(),
                            plaintext: plaintext.clone(),
                            context: contexts,
                            plaintext_crc32c: None,
                            tenant: tenant.into(),
                            grant_id: String::new(),
                        })
                        .await
                    {
                        let reply = reply.into_inner();
                        acked.push(Acked {
                            tenant: tenant.into(),
                            key: name.into(),
                            version: reply.key_version,
                            blob: reply.ciphertext,
                            context,
                            plaintext,
                            data_key: false,
                        });
                    }
                }
                acked
            }));
        }
        let mut mac = KeyServiceClient::new(self.channel("acme-app"));
        let _ = mac
            .generate_mac(pb::GenerateMacRequest {
                key: "mac".into(),
                data: b"simulated invoice".to_vec(),
                ..Default::default()
            })
            .await;
        let mut dead_lease = None;
        if kill {
            let victim = self.rng.random_range(0..self.nodes.len());
            tokio::time::sleep(Duration::from_millis(self.rng.random_range(0..60))).await;
            let holder = self.lease_holder().await;
            let port = format!(":{}/", self.nodes[victim].port);
            dead_lease = holder.filter(|holder| holder.contains(&port));
            self.nodes[victim].kill9();
            self.kills += 1;
            // While it is down, time does not pass (a restart within the step).
            self.nodes[victim].start(&self.clock);
        }
        for task in tasks {
            let acked = task.await.expect("traffic task");
            self.operations += acked.len() as u64;
            self.model.acked.extend(acked);
        }
        if kill {
            self.until_serving().await;
        }
        if let Some(dead) = dead_lease {
            self.until_lease_passes_from(&dead).await;
        }
    }

    /// The holder of the leader lease now, if it is held (cluster mode).
    async fn lease_holder(&self) -> Option<String> {
        let (url, namespace) = self.lease.clone()?;
        tokio::task::spawn_blocking(move || {
            common::postgres::Sql::connect(&url).lease_holder(&namespace)
        })
        .await
        .expect("lease query")
    }

    /// A killed leader's lease lasts its term in real seconds, during which the simulated
    /// clock would race through days without a leader (no scheduled rotation, no nightly
    /// snapshot): in production the term is a few seconds of a day. Time waits until another
    /// process holds the lease.
    async fn until_lease_passes_from(&self, dead: &str) {
        let started = std::time::Instant::now();
        loop {
            match self.lease_holder().await {
                Some(holder) if holder != dead => return,
                _ => {}
            }
            if started.elapsed() > Duration::from_secs(30) {
                self.fail("no node took the leader lease in 30 s after its holder was killed");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Opens `acked` and holds the answer to the model.
    async fn check_opens(&mut self, acked: &Acked) {
        let contexts: HashMap<String, String> = [("sim".to_owned(), acked.context.clone())].into();
        let result = if acked.data_key {
            KeyServiceClient::new(self.channel("sim-backup"))
                .decrypt_data_key(pb::DecryptDataKeyRequest {
                    wrapped_key: acked.blob.clone(),
                    context: contexts,
                    wrapped_key_crc32c: None,
                    tenant: acked.tenant.clone(),
                    grant_id: String::new(),
                })
                .await
                .map(|r| r.into_inner().plaintext_key)
        } else {
            KeyServiceClient::new(self.channel("sim-app"))
                .decrypt(pb::DecryptRequest {
                    ciphertext: acked.blob.clone(),
                    context: contexts,
                    key: String::new(),
                    ciphertext_crc32c: None,
                    tenant: acked.tenant.clone(),
                    grant_id: String::new(),
                })
                .await
                .map(|r| r.into_inner().plaintext)
        };
        let must_open = self.model.opens(acked);
        match result {
            Ok(plaintext) if must_open && plaintext == acked.plaintext => {}
            Err(status)
                if !must_open
                    && matches!(status.code(), Code::FailedPrecondition | Code::NotFound) => {}
            Err(status) if status.code() == Code::Unavailable => {
                // A node just restarting: ask again.
                tokio::time::sleep(Duration::from_millis(200)).await;
                Box::pin(self.check_opens(acked)).await;
            }
            other => self.fail(format!(
                "{}/{} v{} {} (must {}open): {:?}",
                acked.tenant,
                acked.key,
                acked.version,
                if acked.data_key {
                    "data key"
                } else {
                    "ciphertext"
                },
                if must_open { "" } else { "not " },
                other.map(|p| format!("{} bytes", p.len()))
            )),
        }
    }

    /// Waits for the scheduler's tick after a step, then holds the keys to their periods: none
    /// may be overdue, and the versions the model scheduled for destruction are destroyed once
    /// due.
    async fn check_schedules(&mut self) {
        let now = self.clock.now();
        for (tenant, key, days) in PERIODS {
            let period = i64::try_from(days * DAY).expect("period");
            let mut current = None;
            for _ in 0..100 {
                let details = self.key(tenant, key).await;
                let primary = details
                    .versions
                    .iter()
                    .find(|v| v.version == details.primary_version)
                    .map_or(0, |v| v.create_time);
                if primary + period > i64::try_from(now).expect("now") {
                    current = Some(details.primary_version);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            match current {
                Some(version) => self.rotations_seen = self.rotations_seen.max(u64::from(version)),
                None => self.fail(format!(
                    "{tenant}/{key} is overdue: its period is {days} day(s), and the scheduler \
                     did not rotate it within 5 s of the step"
                )),
            }
        }
        let due: Vec<(String, String, u32)> = self
            .model
            .destructions
            .iter()
            .filter(|(_, at)| **at + 60 < now)
            .map(|(k, _)| k.clone())
            .collect();
        for (tenant, key, version) in due {
            if self.model.doomed.contains(&tenant) {
                continue;
            }
            let mut destroyed = false;
            for _ in 0..100 {
                let details = self.key(&tenant, &key).await;
                if details.versions.iter().any(|v| {
                    v.version == version && v.state == pb::KeyVersionState::Destroyed as i32
                }) {
                    destroyed = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if !destroyed {
                self.fail(format!(
                    "{tenant}/{key} v{version} was due for destruction and is not destroyed"
                ));
            }
        }
    }

    /// A support grant's life: requested, approved, used; then revoked, or left to expire.
    async fn support_grant(&mut self, revoke: bool) -> (String, bool) {
        let mut support = AccessServiceClient::new(self.channel("support"));
        let grant = support
            .request_support_access(pb::RequestSupportAccessRequest {
                tenant: "acme".into(),
                reason: "simulated ticket".into(),
                operations: vec!["Decrypt".into()],
                keys: vec!["default".into()],
                duration_secs: 4 * 3_600,
            })
            .await
            .unwrap_or_else(|s| self.fail(format!("RequestSupportAccess: {s:?}")))
            .into_inner();
        AccessServiceClient::new(self.channel("acme-admin"))
            .approve_support_access(pb::DecideSupportAccessRequest {
                grant_id: grant.id.clone(),
            })
            .await
            .unwrap_or_else(|s| self.fail(format!("ApproveSupportAccess: {s:?}")));
        if self.support_decrypts(&grant.id).await == Some(false) {
            self.fail("an approved grant does not decrypt");
        }
        if revoke {
            AccessServiceClient::new(self.channel("acme-admin"))
                .revoke_grant(pb::RevokeGrantRequest {
                    grant_id: grant.id.clone(),
                })
                .await
                .unwrap_or_else(|s| self.fail(format!("RevokeGrant: {s:?}")));
            if self.support_decrypts(&grant.id).await == Some(true) {
                self.fail("a revoked grant still decrypts");
            }
        }
        (grant.id, revoke)
    }

    /// Whether support decrypts acme's newest ciphertext of `default` under the grant (`None`
    /// while there is none that opens).
    async fn support_decrypts(&mut self, grant: &str) -> Option<bool> {
        let acked = self
            .model
            .acked
            .iter()
            .rev()
            .find(|a| {
                a.tenant == "acme" && a.key == "default" && !a.data_key && self.model.opens(a)
            })
            .cloned()?;
        let result = KeyServiceClient::new(self.channel("support"))
            .decrypt(pb::DecryptRequest {
                ciphertext: acked.blob,
                context: [("sim".to_owned(), acked.context)].into(),
                grant_id: grant.to_owned(),
                ..Default::default()
            })
            .await;
        match result {
            Ok(reply) => Some(reply.into_inner().plaintext == acked.plaintext),
            Err(status) if status.code() == Code::PermissionDenied => Some(false),
            Err(status) => self.fail(format!("support decrypt: {status:?}")),
        }
    }

    /// Key creation with a request_id: a retry answers the first call; two days later the id
    /// is forgotten (the scheduler pruned it), so reusing it for another call is a new call.
    async fn request_ids(&mut self, day: u64) {
        let name = format!("k{day}");
        let id = format!("sim-{day}");
        let create = |name: String, id: String| {
            move |mut admin: AdminServiceClient<Channel>| {
                let request = pb::CreateKeyRequest {
                    tenant: "globex".into(),
                    name: name.clone(),
                    purpose: pb::KeyPurpose::Data as i32,
                    request_id: id.clone(),
                    algorithm: 0,
                };
                async move { admin.create_key(request).await }
            }
        };
        let first = self
            .admin("CreateKey", create(name.clone(), id.clone()))
            .await
            .unwrap_or_else(|s| self.fail(format!("CreateKey {name}: {s:?}")));
        let again = self
            .admin("CreateKey again", create(name.clone(), id.clone()))
            .await
            .unwrap_or_else(|s| self.fail(format!("a retried CreateKey {name}: {s:?}")));
        if again.id != first.id {
            self.fail("a CreateKey retried with its request_id made another key");
        }
        self.model.request_ids.insert(day, name);
        if day >= 2 {
            let old = format!("sim-{}", day - 2);
            let key = self.model.request_ids[&(day - 2)].clone();
            let reused = self
                .admin("RotateKey with an old request_id", |mut admin| {
                    let request = pb::RotateKeyRequest {
                        tenant: "globex".into(),
                        name: key.clone(),
                        request_id: old.clone(),
                    };
                    async move { admin.rotate_key(request).await }
                })
                .await;
            if let Err(status) = reused {
                self.fail(format!(
                    "a request_id two days old is still remembered (not pruned): {status:?}"
                ));
            }
        }
        // The client library sends a request_id with every mutation.
        let officer = self.client("officer");
        if let Err(error) = officer.rotate_key("globex", &format!("k{day}")).await {
            self.fail(format!("Client::rotate_key: {error}"));
        }
    }

    /// Schedules the destruction of a version that is not primary.
    async fn schedule_destruction(&mut self, tenant: &str, key: &str) {
        let details = self.key(tenant, key).await;
        let Some(version) = details
            .versions
            .iter()
            .find(|v| {
                v.version != details.primary_version
                    && v.state == pb::KeyVersionState::Enabled as i32
            })
            .map(|v| v.version)
        else {
            return;
        };
        let (t, k) = (tenant.to_owned(), key.to_owned());
        let scheduled = self
            .admin("ScheduleKeyVersionDestruction", |mut admin| {
                let request = pb::KeyVersionRequest {
                    tenant: t.clone(),
                    name: k.clone(),
                    version,
                    request_id: String::new(),
                };
                async move { admin.schedule_key_version_destruction(request).await }
            })
            .await
            .unwrap_or_else(|s| self.fail(format!("ScheduleKeyVersionDestruction: {s:?}")));
        self.model.destructions.insert(
            (tenant.to_owned(), key.to_owned(), version),
            u64::try_from(scheduled.destroy_time).expect("time"),
        );
    }

    fn check_logs(&mut self) {
        for i in 0..self.nodes.len() {
            let errors = self.nodes[i].new_errors();
            if !errors.is_empty() {
                self.fail(format!("node {i} logged ERROR:\n{}", errors.join("\n")));
            }
        }
    }

    /// Opens a sample of what was acknowledged (everything with `all`).
    async fn check_acknowledged(&mut self, all: bool) {
        let chosen: Vec<Acked> = if all || self.model.acked.len() <= 60 {
            self.model.acked.clone()
        } else {
            (0..60)
                .map(|_| {
                    let i = self.rng.random_range(0..self.model.acked.len());
                    self.model.acked[i].clone()
                })
                .collect()
        };
        for acked in &chosen {
            self.check_opens(acked).await;
        }
    }

    /// The end: nodes stopped gracefully; a snapshot for each of the last 30 nights, each
    /// verifying; every node's audit log verifying.
    fn check_end(&mut self, days: u64) {
        for node in &mut self.nodes {
            let status = node.stop();
            assert_eq!(status, 0, "a node did not stop cleanly");
        }
        self.check_logs();
        // `keyfront dev` writes the HSM audit key's public half next to the (first) data dir.
        let public_key = format!(
            "@{}",
            self.nodes[0]
                .config
                .with_file_name("audit-public-key.hex")
                .display()
        );
        let backups: Vec<PathBuf> = self
            .nodes
            .iter()
            .map(|n| n.config.with_file_name("backups"))
            .collect();
        let mut nights = BTreeMap::new();
        for dir in &backups {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(date) = name.strip_prefix("keyfront-").and_then(|n| n.get(..8)) {
                    nights.insert(date.to_owned(), entry.path());
                }
            }
        }
        if days > 31 {
            // The newest 30 are always kept: one for each of the last 30 nights (02:00 UTC),
            // none missed, a restart across 02:00 included.
            let last_night = (self.clock.now() - 7_200) / DAY;
            let newest: Vec<&String> = nights.keys().rev().take(30).collect();
            let expected: Vec<String> = (0..30).map(|back| civil_date(last_night - back)).collect();
            if newest
                .iter()
                .map(|d| d.as_str())
                .ne(expected.iter().map(String::as_str))
            {
                let mut story = String::new();
                for (i, node) in self.nodes.iter().enumerate() {
                    let log = text(&std::fs::read(&node.log).unwrap_or_default());
                    for line in log.lines().filter(|l| {
                        l.contains("snapshot") || l.contains("lease") || l.contains("listening")
                    }) {
                        story.push_str(&format!("\nnode {i}: {line}"));
                    }
                }
                self.fail(format!(
                    "the snapshots are not one for each of the last 30 nights: {:?}{story}",
                    nights.keys().collect::<Vec<_>>()
                ));
            }
        }
        for archive in nights.values() {
            let verified = Command::new(BIN)
                .args(["backup", "verify"])
                .arg(archive)
                .args(["--public-key", &public_key])
                .output()
                .expect("backup verify");
            if !verified.status.success() {
                self.fail(format!(
                    "{} does not verify: {}{}",
                    archive.display(),
                    text(&verified.stdout),
                    text(&verified.stderr)
                ));
            }
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&node.audit_dir)
                .expect("audit dir")
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("audit.log."))
                })
                .collect();
            files.sort();
            files.push(node.audit_dir.join("audit.log"));
            let verified = Command::new(BIN)
                .args(["audit", "verify", "--public-key", &public_key])
                .args(&files)
                .output()
                .expect("audit verify");
            if !verified.status.success() {
                self.fail(format!(
                    "node {i}'s audit log ({} files) does not verify: {}{}",
                    files.len(),
                    text(&verified.stdout),
                    text(&verified.stderr)
                ));
            }
            if (files.len() as u64) < days / 2 {
                self.fail(format!(
                    "node {i}'s audit log has {} daily files",
                    files.len()
                ));
            }
        }
        eprintln!(
            "simulation (seed {}, {}): {days} days, {} acknowledged ciphertexts and data keys \
             ({} operations), {} kill -9 restarts, the busiest periodic key at version {} at \
             the end, {} snapshots kept",
            self.seed,
            if self.postgres {
                "PostgreSQL, two nodes"
            } else {
                "sled, one node"
            },
            self.model.acked.len(),
            self.operations,
            self.kills,
            self.rotations_seen,
            nights.len()
        );
    }
}

/// `YYYYMMDD` of a day number since the Unix epoch (Howard Hinnant's civil_from_days).
fn civil_date(day: u64) -> String {
    let z = i64::try_from(day).expect("day") + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}")
}

/// The simulated month, against whichever store `sim` runs on.
async fn month(mut sim: Sim) {
    let days = days();
    sim.set_up().await;
    let mut open_grant: Option<(String, bool)> = None;
    for day in 0..days {
        for step in 0..STEPS_PER_DAY {
            let kill = sim.rng.random_range(0..14) == 0;
            sim.traffic(kill).await;
            match (day, step) {
                (1, 1) => sim.schedule_destruction("acme", "default").await,
                (2, 2) => sim.schedule_destruction("globex", "default").await,
                (3, 0) => {
                    sim.admin("DestroyTenant umbrella", |mut admin| async move {
                        admin
                            .destroy_tenant(pb::DestroyTenantRequest {
                                name: "umbrella".into(),
                                request_id: "sim-destroy-umbrella".into(),
                            })
                            .await
                    })
                    .await
                    .unwrap_or_else(|s| sim.fail(format!("DestroyTenant: {s:?}")));
                    sim.model.doomed.insert("umbrella".into());
                }
                (10, 1) if !sim.postgres => {
                    // On sled only: each PostgreSQL node runs on its own copy of the token
                    // (docs/OPERATIONS.md), and a new MWK would exist on one copy.
                    sim.admin("RotateMasterKey", |mut admin| async move {
                        admin
                            .rotate_master_key(pb::RotateMasterKeyRequest {
                                request_id: "sim-mwk".into(),
                            })
                            .await
                    })
                    .await
                    .unwrap_or_else(|s| sim.fail(format!("RotateMasterKey: {s:?}")));
                }
                _ => {}
            }
            if step == 0 {
                sim.request_ids(day).await;
                // A grant's end: the one from the step before was revoked, or expired now.
                let revoke = sim.rng.random_bool(0.5);
                open_grant = Some(sim.support_grant(revoke).await);
            }
            sim.clock.advance(STEP).await;
            if step == 0 {
                if let Some((grant, _)) = open_grant.take() {
                    // Four hours granted, six passed: over, revoked or not.
                    if sim.support_decrypts(&grant).await == Some(true) {
                        sim.fail("a grant decrypts after its expiry");
                    }
                }
            }
            sim.check_schedules().await;
        }
        sim.check_acknowledged(false).await;
        sim.check_logs();
    }
    sim.check_acknowledged(true).await;
    sim.check_end(days);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_month_of_production_on_sled() {
    common::require_softhsm();
    month(Sim::new(None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_month_of_production_on_postgres_with_two_nodes() {
    let Some(url) = common::postgres::url() else {
        return;
    };
    month(Sim::new(Some(url))).await;
}

#[test]
fn civil_dates_are_right() {
    assert_eq!(civil_date(0), "19700101");
    assert_eq!(civil_date(20_454), "20260101");
    assert_eq!(civil_date(20_794), "20261207");
}
