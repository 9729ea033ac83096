//! Three `keyfront serve` processes on one PostgreSQL, each with a copy of the same SoftHSM
//! token, as `keyfront dev --nodes 3 --prepare-only` makes them: under a load of Encrypt and
//! GenerateDataKey from 16 clients spread over the nodes plus an officer rotating and creating
//! keys, one node is SIGKILLed and restarted and PostgreSQL is stopped for 10 s; afterwards
//! every acknowledged ciphertext and data key decrypts on every node, every acknowledged key
//! and version exists everywhere, and a disabled version is refused on every node as soon as
//! DisableKeyVersion returns. A second test kills the scheduler's leader and checks that
//! another node takes over: no rotation twice, none missed.
//!
//! Not covered here yet: a partition of one node by a network namespace (docs/DESIGN.md,
//! "Cluster mode", says what a cut-off node does).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dev_server::{BIN, text};
use keyfront::service::pb;
use keyfront::service::pb::admin_service_client::AdminServiceClient;
use keyfront::service::pb::key_service_client::KeyServiceClient;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The tests stop the shared test PostgreSQL or depend on its timing: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const NODES: usize = 3;

struct Cluster {
    dir: tempfile::TempDir,
    namespace: String,
    url: String,
    base_port: u16,
    nodes: Vec<Option<Child>>,
}

impl Cluster {
    /// Prepares the cluster with `keyfront dev --nodes 3 --prepare-only` and starts the nodes.
    fn start(prefix: &str) -> Option<Self> {
        let url = common::postgres::url()?;
        common::require_softhsm();
        let namespace = common::postgres::namespace(prefix);
        let dir = tempfile::tempdir().expect("tempdir");
        let base_port = free_ports(NODES);
        let out = Command::new(BIN)
            .args(["dev", "--nodes", "3", "--prepare-only", "--dir"])
            .arg(dir.path())
            .args(["--listen", &format!("127.0.0.1:{base_port}")])
            .args(["--postgres-url-env", "KEYFRONT_TEST_POSTGRES_URL"])
            .args(["--postgres-namespace", &namespace])
            .env_remove("SOFTHSM2_CONF")
            .output()
            .expect("keyfront dev --prepare-only runs");
        assert!(
            out.status.success(),
            "{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        for i in 0..NODES {
            // The scheduler looks every second (the leader test rotates by age).
            let config = dir.path().join(format!("node-{i}/keyfront.toml"));
            let mut text = std::fs::read_to_string(&config).expect("config");
            text.push_str("\n[keys]\nscheduler_interval_secs = 1\n");
            std::fs::write(&config, text).expect("config");
        }
        let mut cluster = Self {
            dir,
            namespace,
            url,
            base_port,
            nodes: (0..NODES).map(|_| None).collect(),
        };
        for i in 0..NODES {
            cluster.start_node(i);
        }
        Some(cluster)
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node-{i}"))
    }

    fn port(&self, i: usize) -> u16 {
        self.base_port + u16::try_from(i).expect("small")
    }

    fn start_node(&mut self, i: usize) {
        let node_dir = self.node_dir(i);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node_dir.join("server.log"))
            .expect("log");
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(node_dir.join("keyfront.toml"))
            .env("SOFTHSM2_CONF", node_dir.join("hsm/softhsm2.conf"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("keyfront serve starts");
        self.nodes[i] = Some(child);
    }

    fn kill_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reaped");
        }
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.node_dir(i).join("server.log")).unwrap_or_default()
    }

    async fn channel(&self, i: usize, principal: &str) -> Result<Channel, tonic::transport::Error> {
        let certs = self.dir.path().join("certs");
        let read = |file: &str| std::fs::read(certs.join(file)).expect("read cert");
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.crt")))
            .domain_name("localhost")
            .identity(Identity::from_pem(
                read(&format!("{principal}.crt")),
                read(&format!("{principal}.key")),
            ));
        Channel::from_shared(format!("https://127.0.0.1:{}", self.port(i)))
            .expect("uri")
            .tls_config(tls)?
            .timeout(Duration::from_secs(15))
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
    }

    async fn keys(&self, i: usize) -> KeyServiceClient<Channel> {
        KeyServiceClient::new(self.channel(i, "acme-app").await.expect("connect"))
    }

    async fn admin(&self, i: usize) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel(i, "officer").await.expect("connect"))
    }

    /// Waits until node `i` encrypts.
    async fn wait_serving(&self, i: usize) {
        let started = Instant::now();
        loop {
            if let Ok(channel) = self.channel(i, "acme-app").await {
                if KeyServiceClient::new(channel)
                    .encrypt(encrypt_request(b"ready?"))
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "node-{i} did not come up:\n{}",
                self.log(i)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn store_health(&self, i: usize) -> Option<i32> {
        let channel = self.channel(i, "officer").await.ok()?;
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: keyfront::service::STORE_HEALTH.into(),
            })
            .await
            .ok()
            .map(|r| r.into_inner().status)
    }

    /// The node holding the leader lease, from the lease row (its holder names the address).
    fn leader(&self) -> Option<usize> {
        let sql = common::postgres::Sql::connect(&self.url);
        let holder = sql.lease_holder(&self.namespace)?;
        (0..NODES).find(|i| holder.contains(&format!("127.0.0.1:{}/", self.port(*i))))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..NODES {
            self.kill_node(i);
        }
    }
}

/// `count` consecutive free ports.
fn free_ports(count: usize) -> u16 {
    loop {
        let first = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        if first > 65_000 {
            continue;
        }
        let all_free = (0..count).all(|i| {
            std::net::TcpListener::bind(("127.0.0.1", first + u16::try_from(i).expect("small")))
                .is_ok()
        });
        if all_free {
            return first;
        }
    }
}

fn encrypt_request(plaintext: &[u8]) -> pb::EncryptRequest {
    pb::EncryptRequest {
        key: "default".into(),
        plaintext: plaintext.to_vec(),
        context: HashMap::new(),
        plaintext_crc32c: None,
        tenant: String::new(),
        grant_id: String::new(),
    }
}

fn decrypt_request(ciphertext: &[u8]) -> pb::DecryptRequest {
    pb::DecryptRequest {
        ciphertext: ciphertext.to_vec(),
        context: HashMap::new(),
        key: String::new(),
        ciphertext_crc32c: None,
        tenant: String::new(),
        grant_id: String::new(),
    }
}

/// What a client retries on another node: a node or PostgreSQL away, a commit that lost a race
/// with another node, or a connection the killed node reset (tonic reports that as UNKNOWN
/// "transport error": no server answered).
fn transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Aborted | Code::DeadlineExceeded
    ) || (status.code() == Code::Unknown && status.message() == "transport error")
}

/// What the load acknowledged.
#[derive(Default)]
struct Acknowledged {
    ciphertexts: Vec<(Vec<u8>, Vec<u8>)>,
    data_keys: Vec<(Vec<u8>, Vec<u8>)>,
    keys: Vec<String>,
    rotated_to: u32,
    failures: Vec<String>,
}

/// 16 data clients (client `w` starts on node `w % 3` and moves on after a transient error)
/// and one officer, until `stop`.
fn start_load(
    cluster: &Arc<Cluster>,
    stop: &Arc<AtomicBool>,
    acked: &Arc<Mutex<Acknowledged>>,
    ok_ops: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for worker in 0..16usize {
        let (cluster, stop, acked, ok_ops) = (
            Arc::clone(cluster),
            Arc::clone(stop),
            Arc::clone(acked),
            Arc::clone(ok_ops),
        );
        tasks.push(tokio::spawn(async move {
            let mut node = worker % NODES;
            // Even clients encrypt (role app), odd ones take data keys (role backup).
            let data_keys = worker % 2 == 1;
            let principal = if data_keys { "acme-backup" } else { "acme-app" };
            let mut client: Option<KeyServiceClient<Channel>> = None;
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let Some(c) = client.as_mut() else {
                    match cluster.channel(node, principal).await {
                        Ok(channel) => client = Some(KeyServiceClient::new(channel)),
                        Err(_) => {
                            node = (node + 1) % NODES;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    continue;
                };
                n += 1;
                let plaintext = format!("w{worker}-{n}").into_bytes();
                let result = if !data_keys {
                    c.encrypt(encrypt_request(&plaintext)).await.map(|r| {
                        let r = r.into_inner();
                        (false, r.ciphertext, plaintext)
                    })
                } else {
                    c.generate_data_key(pb::GenerateDataKeyRequest {
                        key: "default".into(),
                        context: HashMap::new(),
                        include_plaintext: true,
                        tenant: String::new(),
                        grant_id: String::new(),
                    })
                    .await
                    .map(|r| {
                        let r = r.into_inner();
                        (true, r.wrapped_key, r.plaintext_key)
                    })
                };
                match result {
                    Ok((is_data_key, blob, plaintext)) => {
                        ok_ops.fetch_add(1, Ordering::Relaxed);
                        let mut acked = acked.lock().expect("acked");
                        if is_data_key {
                            acked.data_keys.push((blob, plaintext));
                        } else {
                            acked.ciphertexts.push((blob, plaintext));
                        }
                    }
                    Err(status) if transient(&status) => {
                        client = None;
                        node = (node + 1) % NODES;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(status) => acked
                        .lock()
                        .expect("acked")
                        .failures
                        .push(format!("worker {worker} on node-{node}: {status:?}")),
                }
            }
        }));
    }
    let (cluster, stop, acked) = (Arc::clone(cluster), Arc::clone(stop), Arc::clone(acked));
    tasks.push(tokio::spawn(async move {
        let mut node = 0;
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let Ok(channel) = cluster.channel(node, "officer").await else {
                node = (node + 1) % NODES;
                continue;
            };
            let mut admin = AdminServiceClient::new(channel);
            n += 1;
            let rotated = admin
                .rotate_key(pb::RotateKeyRequest {
                    tenant: "acme".into(),
                    name: "default".into(),
                    request_id: String::new(),
                })
                .await;
            let name = format!("k-{n}");
            let created = admin
                .create_key(pb::CreateKeyRequest {
                    tenant: "acme".into(),
                    name: name.clone(),
                    purpose: pb::KeyPurpose::Data as i32,
                    request_id: String::new(),
                })
                .await;
            let mut acked = acked.lock().expect("acked");
            for result in [
                rotated.map(|r| r.into_inner()),
                created.map(|r| r.into_inner()),
            ] {
                match result {
                    Ok(key) if key.name == "default" => {
                        acked.rotated_to = acked.rotated_to.max(key.latest_version);
                    }
                    Ok(_) => acked.keys.push(name.clone()),
                    Err(status) if transient(&status) => node = (node + 1) % NODES,
                    Err(status) => acked
                        .failures
                        .push(format!("officer on node-{node}: {status:?}")),
                }
            }
        }
    }));
    tasks
}

fn postgres_dir() -> (PathBuf, String) {
    let dir = std::env::var("KEYFRONT_TEST_POSTGRES_DIR")
        .expect("KEYFRONT_TEST_POSTGRES_DIR (scripts/test.sh sets it)");
    let port = std::env::var("KEYFRONT_TEST_POSTGRES_PORT")
        .expect("KEYFRONT_TEST_POSTGRES_PORT (scripts/test.sh sets it)");
    (PathBuf::from(dir), port)
}

fn postgres_ctl(action: &str, dir: &Path, port: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/postgres.sh");
    let out = Command::new(script)
        .arg(action)
        .arg(dir)
        .arg(port)
        .output()
        .expect("scripts/postgres.sh runs");
    assert!(
        out.status.success(),
        "postgres.sh {action}: {}",
        text(&out.stderr)
    );
}

#[test]
fn acknowledged_work_survives_a_killed_node_and_a_postgres_outage_on_every_node() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(cluster) = Cluster::start("chaos") else {
        return;
    };
    let (pg_dir, pg_port) = postgres_dir();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let cluster = Arc::new(cluster);
    runtime.block_on(async {
        for i in 0..NODES {
            cluster.wait_serving(i).await;
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    let ok_ops = Arc::new(AtomicU64::new(0));
    let tasks = runtime.block_on(async { start_load(&cluster, &stop, &acked, &ok_ops) });
    std::thread::sleep(Duration::from_secs(3));

    // 1. SIGKILL node-1 under load, then start it again. (The load shares the cluster, so the
    // child is signalled by pid; the cluster's drop reaps it.)
    let pid = cluster.nodes[1].as_ref().map(Child::id).expect("running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL");
    std::thread::sleep(Duration::from_secs(3));
    let restarted = {
        // A fresh process on node-1's config, data directory and token copy.
        let node_dir = cluster.node_dir(1);
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(node_dir.join("server.log"))
            .expect("log");
        Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(node_dir.join("keyfront.toml"))
            .env("SOFTHSM2_CONF", node_dir.join("hsm/softhsm2.conf"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("node-1 restarts")
    };
    runtime.block_on(cluster.wait_serving(1));
    std::thread::sleep(Duration::from_secs(2));

    // 2. PostgreSQL stopped for 10 s: cached keys go on, writes fail, health says so.
    let ops_before = ok_ops.load(Ordering::SeqCst);
    postgres_ctl("stop", &pg_dir, &pg_port);
    // A rotation that committed while PostgreSQL was shutting down may still be acknowledged
    // just after `pg_ctl stop` returns; the baseline is taken once those replies are in.
    std::thread::sleep(Duration::from_secs(1));
    let before_outage = acked.lock().expect("acked").rotated_to;
    std::thread::sleep(Duration::from_secs(3));
    let ops_mid = ok_ops.load(Ordering::SeqCst);
    let store_health: Vec<_> = runtime.block_on(async {
        let mut all = Vec::new();
        for i in 0..NODES {
            all.push(cluster.store_health(i).await);
        }
        all
    });
    std::thread::sleep(Duration::from_secs(3));
    let ops_late = ok_ops.load(Ordering::SeqCst);
    let rotated_during = acked.lock().expect("acked").rotated_to;
    std::thread::sleep(Duration::from_secs(3));
    postgres_ctl("start", &pg_dir, &pg_port);
    let outage_ops = ops_late - ops_mid;
    eprintln!(
        "during the outage: {outage_ops} data operations in 3 s (before it: {ops_before} in all); store health {store_health:?}"
    );
    assert!(
        outage_ops > 0,
        "cached keys must serve while PostgreSQL is down"
    );
    assert_eq!(
        rotated_during, before_outage,
        "no rotation can be acknowledged without PostgreSQL"
    );
    assert!(
        store_health.iter().all(|s| *s
            == Some(tonic_health::pb::health_check_response::ServingStatus::NotServing as i32)),
        "{store_health:?}"
    );
    // Everything recovers by itself: rotations are acknowledged again.
    let recovering = Instant::now();
    while acked.lock().expect("acked").rotated_to == before_outage {
        assert!(
            recovering.elapsed() < Duration::from_secs(30),
            "writes did not recover after PostgreSQL came back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "writes recovered {:?} after PostgreSQL started",
        recovering.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    runtime.block_on(async {
        for task in tasks {
            task.await.expect("load task");
        }
    });

    // 3. Every acknowledged item, on every node.
    let acked = std::mem::take(&mut *acked.lock().expect("acked"));
    assert!(acked.failures.is_empty(), "{:#?}", acked.failures);
    eprintln!(
        "acknowledged: {} ciphertexts, {} data keys, {} keys created, default rotated to v{}",
        acked.ciphertexts.len(),
        acked.data_keys.len(),
        acked.keys.len(),
        acked.rotated_to
    );
    assert!(!acked.ciphertexts.is_empty() && !acked.keys.is_empty());
    let sample = |len: usize| -> Vec<usize> {
        let step = (len / 400).max(1);
        (0..len).step_by(step).chain(len.checked_sub(1)).collect()
    };
    runtime.block_on(async {
        for i in 0..NODES {
            let mut keys = cluster.keys(i).await;
            for at in sample(acked.ciphertexts.len()) {
                let (ciphertext, plaintext) = &acked.ciphertexts[at];
                let out = keys
                    .decrypt(decrypt_request(ciphertext))
                    .await
                    .unwrap_or_else(|s| panic!("node-{i} decrypts ciphertext {at}: {s:?}"))
                    .into_inner();
                assert_eq!(&out.plaintext, plaintext);
            }
            let mut keys =
                KeyServiceClient::new(cluster.channel(i, "acme-backup").await.expect("connect"));
            for at in sample(acked.data_keys.len()) {
                let (wrapped, plaintext) = &acked.data_keys[at];
                let out = keys
                    .decrypt_data_key(pb::DecryptDataKeyRequest {
                        wrapped_key: wrapped.clone(),
                        context: HashMap::new(),
                        wrapped_key_crc32c: None,
                        tenant: String::new(),
                        grant_id: String::new(),
                    })
                    .await
                    .unwrap_or_else(|s| panic!("node-{i} decrypts data key {at}: {s:?}"))
                    .into_inner();
                assert_eq!(&out.plaintext_key, plaintext);
            }
            let mut admin = cluster.admin(i).await;
            let default = admin
                .get_key(pb::GetKeyRequest {
                    tenant: "acme".into(),
                    name: "default".into(),
                })
                .await
                .expect("get default")
                .into_inner();
            assert!(default.latest_version >= acked.rotated_to);
            assert_eq!(default.versions.len(), default.latest_version as usize);
            for name in &acked.keys {
                admin
                    .get_key(pb::GetKeyRequest {
                        tenant: "acme".into(),
                        name: name.clone(),
                    })
                    .await
                    .unwrap_or_else(|s| panic!("node-{i} has key {name}: {s:?}"));
            }
        }

        // 4. A disabled version is refused on every node once DisableKeyVersion returns.
        let mut on_one = cluster.keys(1).await;
        let old = on_one
            .encrypt(encrypt_request(b"old"))
            .await
            .expect("encrypt")
            .into_inner();
        let mut admin = cluster.admin(0).await;
        admin
            .rotate_key(pb::RotateKeyRequest {
                tenant: "acme".into(),
                name: "default".into(),
                request_id: String::new(),
            })
            .await
            .expect("rotate");
        for i in 1..NODES {
            let mut keys = cluster.keys(i).await;
            keys.decrypt(decrypt_request(&old.ciphertext))
                .await
                .expect("decrypts before the disable (and caches the version)");
        }
        admin
            .disable_key_version(pb::KeyVersionRequest {
                tenant: "acme".into(),
                name: "default".into(),
                version: old.key_version,
                request_id: String::new(),
            })
            .await
            .expect("disable");
        for i in 1..NODES {
            let mut keys = cluster.keys(i).await;
            let refused = keys.decrypt(decrypt_request(&old.ciphertext)).await;
            assert_eq!(
                refused.as_ref().map_err(tonic::Status::code).err(),
                Some(Code::FailedPrecondition),
                "node-{i}: {refused:?}"
            );
        }
    });
    let mut restarted = restarted;
    let _ = restarted.kill();
    let _ = restarted.wait();
}

#[test]
fn the_scheduler_moves_to_another_node_when_its_leader_dies_without_double_or_missed_rotations() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut cluster) = Cluster::start("leader") else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    const PERIOD: i64 = 4;
    runtime.block_on(async {
        for i in 0..NODES {
            cluster.wait_serving(i).await;
        }
        cluster
            .admin(0)
            .await
            .update_key_policy(pb::UpdateKeyPolicyRequest {
                tenant: "acme".into(),
                name: "default".into(),
                rotation_period_seconds: Some(PERIOD),
                ..Default::default()
            })
            .await
            .expect("rotation period");
    });
    let started = Instant::now();
    let leader = loop {
        if let Some(leader) = cluster.leader() {
            break leader;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "no leader");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(9));
    cluster.kill_node(leader);
    let killed = Instant::now();
    let successor = loop {
        if let Some(now) = cluster.leader().filter(|now| *now != leader) {
            break now;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "no node took the lease over within 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let failover = killed.elapsed();
    std::thread::sleep(Duration::from_secs(12));
    let survivor = (0..NODES).find(|i| *i != leader).expect("a survivor");
    let key = runtime.block_on(async {
        cluster
            .admin(survivor)
            .await
            .get_key(pb::GetKeyRequest {
                tenant: "acme".into(),
                name: "default".into(),
            })
            .await
            .expect("get key")
            .into_inner()
    });
    let times: Vec<i64> = key.versions.iter().map(|v| v.create_time).collect();
    let gaps: Vec<i64> = times.windows(2).skip(1).map(|w| w[1] - w[0]).collect();
    eprintln!(
        "leader node-{leader} killed; node-{successor} took over in {failover:?}; versions {} created at {times:?}, gaps {gaps:?}",
        key.latest_version
    );
    // v1 came with the key; every later version is a scheduled rotation. Rotated twice in a
    // period: a gap below it. Missed: a gap above period + tick + lease term + a tick of slack.
    assert!(key.latest_version >= 5, "{times:?}");
    for gap in &gaps {
        assert!(
            *gap >= PERIOD - 1,
            "two rotations within one period: {gaps:?}"
        );
        assert!(
            *gap <= PERIOD + 1 + 5 + 2,
            "a rotation was missed: {gaps:?}"
        );
    }
}
