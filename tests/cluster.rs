//! Three `keyfront serve` processes on one PostgreSQL, each with a copy of the same SoftHSM
//! token, as `keyfront dev --nodes 3 --prepare-only` makes them, under a load of Encrypt and
//! GenerateDataKey from 16 clients spread over the nodes plus an officer rotating and creating
//! keys. After each fault, every acknowledged ciphertext and data key decrypts on every node
//! and every acknowledged key and version exists everywhere.
//!
//! - One node is SIGKILLed and restarted, then PostgreSQL is stopped for 10 s; a disabled
//!   version is refused on every node as soon as DisableKeyVersion returns.
//! - One node runs in a network namespace of its own (root only; skipped otherwise). It is the
//!   leader and is partitioned completely: the lease moves, a version and a tenant it cached
//!   are disabled and destroyed elsewhere, and after the partition heals it refuses both once
//!   its store health is SERVING again. Then it is cut from PostgreSQL only: it serves cached
//!   keys for its `bulk_key_ttl_secs` and refuses after, refuses writes throughout, and
//!   recovers by itself.
//! - The scheduler's leader is killed: another node takes over, no rotation twice, none missed.

mod common;

use std::collections::HashMap;
use std::future::Future;
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
/// Each load client's pause after an acknowledged operation.
const PACE: Duration = Duration::from_millis(5);

struct Cluster {
    dir: tempfile::TempDir,
    namespace: String,
    url: String,
    base_port: u16,
    nodes: Vec<Option<Child>>,
    /// The address each node listens on and clients reach it at.
    hosts: Vec<String>,
    /// The node that runs inside a network namespace, with the namespace.
    isolated: Option<(usize, Netns)>,
    /// Holds the load's officer (no rotations, no new keys) while set.
    officer_paused: AtomicBool,
}

impl Cluster {
    /// Prepares the cluster with `keyfront dev --nodes 3 --prepare-only` and starts the nodes.
    fn start(prefix: &str) -> Option<Self> {
        let mut cluster = Self::prepare(prefix)?;
        for i in 0..NODES {
            cluster.start_node(i);
        }
        Some(cluster)
    }

    /// Prepares the cluster, then moves node `i` into `netns`: it listens on the namespace's
    /// client address, reaches PostgreSQL through the namespace's PostgreSQL link, trusts its
    /// cached keys for `bulk_key_ttl_secs` while cut off, and gives up on PostgreSQL after 2 s.
    fn start_isolating(
        prefix: &str,
        i: usize,
        netns: Netns,
        bulk_key_ttl_secs: u64,
    ) -> Option<Self> {
        let mut cluster = Self::prepare(prefix)?;
        let config = cluster.node_dir(i).join("keyfront.toml");
        let text = std::fs::read_to_string(&config).expect("config");
        let listen = format!("listen = \"127.0.0.1:{}\"", cluster.port(i));
        let namespace = format!("namespace = \"{}\"\n", cluster.namespace);
        assert!(
            text.contains(&listen) && text.contains(&namespace),
            "{text}"
        );
        let text =
            text.replace(
                &listen,
                &format!("listen = \"{}:{}\"", netns.node_ip, cluster.port(i)),
            )
            // The namespace reaches the test server through a veth address, another host as
            // far as keyfront can tell; the test server speaks no TLS.
            .replace(
                &namespace,
                &format!("{namespace}timeout_secs = 2\ndangerous_allow_plaintext = true\n"),
            ) + &format!("\n[cache]\nbulk_key_ttl_secs = {bulk_key_ttl_secs}\n");
        std::fs::write(&config, text).expect("config");
        cluster.hosts[i] = netns.node_ip.clone();
        cluster.isolated = Some((i, netns));
        // The isolated node starts first and takes the leader lease, so that the partition
        // cuts off the leader.
        cluster.start_node(i);
        let started = Instant::now();
        while cluster.leader() != Some(i) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "node-{i} did not take the lease:\n{}",
                cluster.log(i)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for other in (0..NODES).filter(|other| *other != i) {
            cluster.start_node(other);
        }
        Some(cluster)
    }

    fn prepare(prefix: &str) -> Option<Self> {
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
        Some(Self {
            dir,
            namespace,
            url,
            base_port,
            nodes: (0..NODES).map(|_| None).collect(),
            hosts: vec!["127.0.0.1".into(); NODES],
            isolated: None,
            officer_paused: AtomicBool::new(false),
        })
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
        let mut command = match &self.isolated {
            // `ip netns exec` enters the namespace and execs the server: the pid stays.
            Some((node, netns)) if *node == i => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", &netns.name, BIN])
                    .env("KEYFRONT_TEST_POSTGRES_URL", netns.postgres_url(&self.url));
                command
            }
            _ => Command::new(BIN),
        };
        let child = command
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
        Channel::from_shared(format!("https://{}:{}", self.hosts[i], self.port(i)))
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
        (0..NODES).find(|i| holder.contains(&format!("{}:{}/", self.hosts[*i], self.port(*i))))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..NODES {
            self.kill_node(i);
        }
    }
}

/// Prints the end of every node's log when the test fails (the cluster itself may be dropped
/// later, off the failing thread, by a load task).
struct LogsOnPanic(Arc<Cluster>);

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..NODES {
                eprintln!("--- node-{i}'s log, the end:\n{}", tail(&self.0.log(i)));
            }
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
        // The client's own deadline (a request to a partitioned node never gets an answer).
        || (status.code() == Code::Cancelled && status.message() == "Timeout expired")
}

/// A network namespace for one node, joined to the host by two veth pairs: the client link
/// carries the clients' traffic to the node, the PostgreSQL link the node's traffic to
/// PostgreSQL (through a forwarder on the host end, since the test server listens on loopback
/// only). A link is cut by setting its namespace end down: the host keeps its route (marked
/// linkdown), so packets to the node are dropped, never routed elsewhere, and the namespace has
/// no other route out.
struct Netns {
    name: String,
    /// The node's address on the client link.
    node_ip: String,
    client_dev: String,
    postgres_dev: String,
    /// The host end of the PostgreSQL link, where the forwarder listens.
    postgres_host_ip: String,
    forward_port: u16,
}

#[derive(Clone, Copy, Debug)]
enum Link {
    Client,
    Postgres,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), text(&out.stderr)))
    }
}

impl Netns {
    /// The namespace and its links, with a forwarder to PostgreSQL at `postgres_port`; `None`
    /// (with a message) where namespaces cannot be made here: not root, or no `ip`. Under CI a
    /// root that cannot make one fails the test.
    fn create(postgres_port: u16) -> Option<Self> {
        // The effective user, from /proc (no libc call needed).
        let root = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .map(|l| l.split_whitespace().nth(2) == Some("0"))
            })
            .unwrap_or(false);
        if !root {
            eprintln!("skipped: the partition test needs root for network namespaces");
            return None;
        }
        let used = Command::new("ip")
            .args(["-4", "addr"])
            .output()
            .map(|o| text(&o.stdout))
            .unwrap_or_default();
        let octet = loop {
            let octet = 2 + rand::random::<u8>() % 250;
            if !used.contains(&format!("10.213.{octet}."))
                && !used.contains(&format!("10.214.{octet}."))
            {
                break octet;
            }
        };
        let tag = format!("{:04x}", rand::random::<u16>());
        let netns = Self {
            name: format!("kft-{tag}"),
            node_ip: format!("10.213.{octet}.2"),
            client_dev: format!("kfc{tag}n"),
            postgres_dev: format!("kfp{tag}n"),
            postgres_host_ip: format!("10.214.{octet}.1"),
            forward_port: 0,
        };
        if let Err(error) = ip(&["netns", "add", &netns.name]) {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "root cannot make a network namespace: {error}"
            );
            eprintln!("skipped: {error}");
            return None;
        }
        let mut netns = netns;
        let name = netns.name.clone();
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &name, "ip"];
            all.extend_from_slice(args);
            ip(&all).expect("ip in the namespace");
        };
        inside(&["link", "set", "lo", "up"]);
        for (dev, subnet) in [
            (netns.client_dev.clone(), format!("10.213.{octet}")),
            (netns.postgres_dev.clone(), format!("10.214.{octet}")),
        ] {
            let host_dev = format!("{}h", &dev[..dev.len() - 1]);
            ip(&[
                "link", "add", &host_dev, "type", "veth", "peer", "name", &dev,
            ])
            .expect("veth");
            ip(&["link", "set", &dev, "netns", &name]).expect("veth into the namespace");
            ip(&["addr", "add", &format!("{subnet}.1/30"), "dev", &host_dev]).expect("address");
            ip(&["link", "set", &host_dev, "up"]).expect("up");
            inside(&["addr", "add", &format!("{subnet}.2/30"), "dev", &dev]);
            inside(&["link", "set", &dev, "up"]);
        }
        netns.forward_port = forward(&netns.postgres_host_ip, postgres_port);
        Some(netns)
    }

    /// The test server's connection string as the node inside reaches it.
    fn postgres_url(&self, url: &str) -> String {
        let host = "host=127.0.0.1";
        assert!(url.contains(host), "{url}");
        let url = url.replace(host, &format!("host={}", self.postgres_host_ip));
        url.split(' ')
            .map(|part| {
                if part.starts_with("port=") {
                    format!("port={}", self.forward_port)
                } else {
                    part.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn set(&self, link: Link, state: &str) {
        let dev = match link {
            Link::Client => &self.client_dev,
            Link::Postgres => &self.postgres_dev,
        };
        ip(&["netns", "exec", &self.name, "ip", "link", "set", dev, state]).expect("link state");
    }

    fn cut(&self, link: Link) {
        self.set(link, "down");
    }

    fn heal(&self, link: Link) {
        self.set(link, "up");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // The namespace's veth ends go with it, and their host ends with them.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Forwards TCP connections from `host:<port>` to PostgreSQL on `127.0.0.1:postgres_port`;
/// returns the port. Threads block on their sockets: a cut link just stalls them.
fn forward(host: &str, postgres_port: u16) -> u16 {
    let listener = std::net::TcpListener::bind((host, 0)).expect("forwarder binds");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for incoming in listener.incoming() {
            let Ok(inbound) = incoming else { continue };
            let Ok(outbound) = std::net::TcpStream::connect(("127.0.0.1", postgres_port)) else {
                continue;
            };
            for (mut from, mut to) in [
                (
                    inbound.try_clone().expect("clone"),
                    outbound.try_clone().expect("clone"),
                ),
                (outbound, inbound),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    port
}

/// What the load acknowledged.
#[derive(Default)]
struct Acknowledged {
    ciphertexts: Vec<(Vec<u8>, Vec<u8>)>,
    data_keys: Vec<(Vec<u8>, Vec<u8>)>,
    keys: Vec<String>,
    rotated_to: u32,
    failures: Vec<String>,
    /// The latest transient errors the load retried elsewhere (for a failure's message).
    retried: std::collections::VecDeque<String>,
}

impl Acknowledged {
    /// What was acknowledged so far (the load goes on).
    fn so_far(&self) -> Self {
        Self {
            ciphertexts: self.ciphertexts.clone(),
            data_keys: self.data_keys.clone(),
            keys: self.keys.clone(),
            rotated_to: self.rotated_to,
            ..Self::default()
        }
    }

    fn retried(&mut self, who: &str, node: usize, status: &tonic::Status) {
        if self.retried.len() == 40 {
            self.retried.pop_front();
        }
        self.retried.push_back(format!(
            "{who} on node-{node}: {:?} {}",
            status.code(),
            status.message()
        ));
    }
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
                        {
                            let mut acked = acked.lock().expect("acked");
                            if is_data_key {
                                acked.data_keys.push((blob, plaintext));
                            } else {
                                acked.ciphertexts.push((blob, plaintext));
                            }
                        }
                        // Paced: the load is there to be interrupted, not to fill the two
                        // cores CI has (every item it acknowledges is decrypted again at the
                        // end, which was most of this suite's time).
                        tokio::time::sleep(PACE).await;
                    }
                    Err(status) if transient(&status) => {
                        acked.lock().expect("acked").retried(
                            &format!("worker {worker}"),
                            node,
                            &status,
                        );
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
            if cluster.officer_paused.load(Ordering::SeqCst) {
                continue;
            }
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
                    ..Default::default()
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

/// Every acknowledged ciphertext decrypts on every node and every data key on one of them (each
/// node a third, interleaved), every acknowledged key exists everywhere, and `default` has every
/// version up to the last acknowledged rotation.
async fn verify_everywhere(cluster: &Cluster, acked: &Acknowledged) {
    const BATCH: usize = 500;
    const TASKS: usize = 8;
    for i in 0..NODES {
        let mut keys = cluster.keys(i).await;
        for (n, chunk) in acked.ciphertexts.chunks(BATCH).enumerate() {
            let results = keys
                .batch_decrypt(pb::BatchDecryptRequest {
                    key: String::new(),
                    items: chunk
                        .iter()
                        .map(|(ciphertext, _)| pb::BatchDecryptItem {
                            ciphertext: ciphertext.clone(),
                            context: HashMap::new(),
                            ciphertext_crc32c: None,
                        })
                        .collect(),
                    tenant: String::new(),
                    grant_id: String::new(),
                })
                .await
                .unwrap_or_else(|s| panic!("node-{i} decrypts batch {n}: {s:?}"))
                .into_inner()
                .results;
            assert_eq!(results.len(), chunk.len());
            for (j, (result, (_, plaintext))) in results.iter().zip(chunk).enumerate() {
                assert!(
                    result.status.as_ref().is_none_or(|s| s.code == 0),
                    "node-{i} ciphertext {}: {:?}",
                    n * BATCH + j,
                    result.status
                );
                assert_eq!(
                    &result.plaintext,
                    plaintext,
                    "node-{i} ciphertext {}",
                    n * BATCH + j
                );
            }
        }
        // Each data key is one HSM call, so each node decrypts every third one (interleaved,
        // so every node still sees every version); each ciphertext above, batched, on every node.
        let channel = cluster.channel(i, "acme-backup").await.expect("connect");
        let data_keys = Arc::new(acked.data_keys.clone());
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..TASKS {
            let mut client = KeyServiceClient::new(channel.clone());
            let data_keys = Arc::clone(&data_keys);
            tasks.spawn(async move {
                for at in (i + task * NODES..data_keys.len()).step_by(TASKS * NODES) {
                    let (wrapped, plaintext) = &data_keys[at];
                    let out = client
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
                    assert_eq!(&out.plaintext_key, plaintext, "node-{i} data key {at}");
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("data key check");
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
}

/// Stops the load, waits for it, and returns what it acknowledged (none of it failed, and
/// some of every kind was acknowledged).
fn stop_load(
    runtime: &tokio::runtime::Runtime,
    stop: &AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    acked: &Mutex<Acknowledged>,
) -> Acknowledged {
    stop.store(true, Ordering::SeqCst);
    runtime.block_on(async {
        for task in tasks {
            task.await.expect("load task");
        }
    });
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
    acked
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
    let _logs = LogsOnPanic(Arc::clone(&cluster));
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
    // Everything acknowledged up to here, on every node (the restarted one included), while
    // the load goes on.
    let so_far = acked.lock().expect("acked").so_far();
    runtime.block_on(verify_everywhere(&cluster, &so_far));
    eprintln!(
        "after the SIGKILL: {} ciphertexts and {} data keys verified on every node",
        so_far.ciphertexts.len(),
        so_far.data_keys.len()
    );

    // 2. PostgreSQL stopped for 10 s: cached keys go on, writes fail, health says so.
    // A commit announced just before the stop drops that tenant's keys from every node's cache
    // (a node cannot know what changed), and with the server going down they cannot be loaded
    // again: the load, all on one tenant, would then find nothing cached (seen once in CI: 0
    // operations during the outage). So the officer pauses for a second before the stop, and
    // goes on right after it, when its writes must fail.
    cluster.officer_paused.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(1));
    let ops_before = ok_ops.load(Ordering::SeqCst);
    postgres_ctl("stop", &pg_dir, &pg_port);
    cluster.officer_paused.store(false, Ordering::SeqCst);
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
    // 3. Every acknowledged item, on every node.
    let acked = stop_load(&runtime, &stop, tasks, &acked);
    runtime.block_on(async {
        verify_everywhere(&cluster, &acked).await;

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

/// Whether `status` says the store is unreachable (a write on a cut-off node).
fn unavailable(result: &Result<tonic::Response<impl std::fmt::Debug>, tonic::Status>) -> bool {
    matches!(result, Err(status) if status.code() == Code::Unavailable)
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Polls `check` every 100 ms until it holds; panics after `within`.
async fn until<F, Fut>(within: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

#[test]
fn a_partitioned_node_is_cut_off_then_catches_up_and_nothing_acknowledged_is_lost() {
    use tonic_health::pb::health_check_response::ServingStatus;
    const ISOLATED: usize = 2;
    /// How long the isolated node serves cached keys without PostgreSQL (bulk_key_ttl_secs).
    const TTL: Duration = Duration::from_secs(8);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if common::postgres::url().is_none() {
        return;
    }
    let (_, pg_port) = postgres_dir();
    let Some(netns) = Netns::create(pg_port.parse().expect("port")) else {
        return;
    };
    let Some(cluster) = Cluster::start_isolating("partition", ISOLATED, netns, TTL.as_secs())
    else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let cluster = Arc::new(cluster);
    let _logs = LogsOnPanic(Arc::clone(&cluster));
    let netns = || &cluster.isolated.as_ref().expect("isolated").1;
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
    let health = |i: usize| {
        let cluster = Arc::clone(&cluster);
        async move { cluster.store_health(i).await }
    };
    let serving = Some(ServingStatus::Serving as i32);
    let not_serving = Some(ServingStatus::NotServing as i32);

    // 1. A full partition of the leader: neither clients nor PostgreSQL reach it. A version and
    // a tenant it has cached are disabled and destroyed meanwhile; the others refuse them at
    // once, the lease moves within a term, and after the partition heals the node refuses both
    // as soon as it reports its store healthy again.
    runtime.block_on(async {
        let old = cluster
            .keys(ISOLATED)
            .await
            .encrypt(encrypt_request(b"cached on the isolated node"))
            .await
            .expect("encrypt")
            .into_inner();
        cluster
            .keys(ISOLATED)
            .await
            .decrypt(decrypt_request(&old.ciphertext))
            .await
            .expect("decrypts before the partition");
        // (`Cluster::leader` runs a runtime of its own.)
        let leader = || tokio::task::block_in_place(|| cluster.leader());
        // A second tenant, cached on the isolated node, is destroyed during the partition.
        let globex = || async {
            KeyServiceClient::new(cluster.channel(ISOLATED, "globex-app").await.expect("connect"))
        };
        globex()
            .await
            .encrypt(encrypt_request(b"globex"))
            .await
            .expect("globex encrypts before the partition");
        let leader_before = leader();
        netns().cut(Link::Client);
        netns().cut(Link::Postgres);
        let cut = Instant::now();
        let ops_at_cut = ok_ops.load(Ordering::SeqCst);
        let mut admin = cluster.admin(0).await;
        admin
            .rotate_key(pb::RotateKeyRequest {
                tenant: "acme".into(),
                name: "default".into(),
                request_id: String::new(),
            })
            .await
            .expect("rotate while one node is cut off");
        let started = Instant::now();
        admin
            .disable_key_version(pb::KeyVersionRequest {
                tenant: "acme".into(),
                name: "default".into(),
                version: old.key_version,
                request_id: String::new(),
            })
            .await
            .expect("disable while one node is cut off");
        let disable_took = started.elapsed();
        admin
            .destroy_tenant(pb::DestroyTenantRequest {
                name: "globex".into(),
                request_id: String::new(),
            })
            .await
            .expect("destroy a tenant while one node is cut off");
        for i in 0..ISOLATED {
            let refused = cluster.keys(i).await.decrypt(decrypt_request(&old.ciphertext)).await;
            assert_eq!(
                refused.as_ref().map_err(tonic::Status::code).err(),
                Some(Code::FailedPrecondition),
                "node-{i} during the partition: {refused:?}"
            );
            assert_eq!(health(i).await, serving, "node-{i} during the partition");
            let refused = KeyServiceClient::new(cluster.channel(i, "globex-app").await.expect("connect"))
                .encrypt(encrypt_request(b"globex"))
                .await;
            assert_eq!(
                refused.as_ref().map_err(tonic::Status::code).err(),
                Some(Code::FailedPrecondition),
                "node-{i}, the destroyed tenant: {refused:?}"
            );
        }
        assert_eq!(leader_before, Some(ISOLATED));
        // The lease lives on PostgreSQL: within a term (5 s) a node that reaches it holds it.
        until(Duration::from_secs(10), "a reachable node leads", || {
            let leads = leader().is_some_and(|l| l != ISOLATED);
            async move { leads }
        })
        .await;
        let leader_after = (cut.elapsed(), leader());
        tokio::time::sleep(Duration::from_secs(9).saturating_sub(cut.elapsed())).await;
        let served = ok_ops.load(Ordering::SeqCst) - ops_at_cut;
        if served == 0 {
            let acked = acked.lock().expect("acked");
            panic!(
                "the other nodes serve nothing during the partition (before: {ops_at_cut}); failures: {:#?}; retried: {:#?}\nnode-0:\n{}\nnode-1:\n{}",
                acked.failures,
                acked.retried,
                tail(&cluster.log(0)),
                tail(&cluster.log(1))
            );
        }
        eprintln!(
            "full partition: DisableKeyVersion took {disable_took:?}; leader {leader_before:?} before the cut, {:?} {:?} after it; {served} data operations acknowledged in {:?}",
            leader_after.1,
            leader_after.0,
            cut.elapsed()
        );
        netns().heal(Link::Client);
        netns().heal(Link::Postgres);
        let healthy = until(Duration::from_secs(15), "the healed node's store is healthy", || {
            let health = health(ISOLATED);
            async move { health.await == serving }
        })
        .await;
        let refused = cluster
            .keys(ISOLATED)
            .await
            .decrypt(decrypt_request(&old.ciphertext))
            .await;
        assert_eq!(
            refused.as_ref().map_err(tonic::Status::code).err(),
            Some(Code::FailedPrecondition),
            "the healed node: {refused:?}"
        );
        let refused = globex().await.encrypt(encrypt_request(b"globex")).await;
        assert_eq!(
            refused.as_ref().map_err(tonic::Status::code).err(),
            Some(Code::FailedPrecondition),
            "the healed node, the destroyed tenant: {refused:?}"
        );
        let latest = admin
            .get_key(pb::GetKeyRequest {
                tenant: "acme".into(),
                name: "default".into(),
            })
            .await
            .expect("get key")
            .into_inner()
            .latest_version;
        let now = cluster
            .keys(ISOLATED)
            .await
            .encrypt(encrypt_request(b"after the partition"))
            .await
            .expect("encrypt after the partition")
            .into_inner();
        assert!(now.key_version >= latest, "{} < {latest}", now.key_version);
        // Enabled again (the load's ciphertexts under it are checked at the end), and the
        // healed node follows.
        admin
            .enable_key_version(pb::KeyVersionRequest {
                tenant: "acme".into(),
                name: "default".into(),
                version: old.key_version,
                request_id: String::new(),
            })
            .await
            .expect("enable");
        cluster
            .keys(ISOLATED)
            .await
            .decrypt(decrypt_request(&old.ciphertext))
            .await
            .expect("the healed node decrypts once the version is enabled again");
        eprintln!("healed: store healthy after {healthy:?}, the disabled version refused");
    });
    // Everything acknowledged up to here, on every node (the healed one included).
    let so_far = acked.lock().expect("acked").so_far();
    runtime.block_on(verify_everywhere(&cluster, &so_far));

    // 2. The node reaches its clients but not PostgreSQL: it serves cached keys for the TTL
    // and then refuses, refuses writes throughout, says so in its health, and recovers.
    runtime.block_on(async {
        // What changes on another node is dropped from this node's cache when it hears of it
        // (it cannot know what changed); so the keys it has cached when cut off are those
        // unchanged since it last heard. The officer pauses until the cut for that.
        cluster.officer_paused.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut keys = cluster.keys(ISOLATED).await;
        keys.encrypt(encrypt_request(b"warm"))
            .await
            .expect("encrypt before the cut");
        netns().cut(Link::Postgres);
        let cut = Instant::now();
        cluster.officer_paused.store(false, Ordering::SeqCst);
        let noticed = until(Duration::from_secs(5), "the cut node reports its store down", || {
            let health = health(ISOLATED);
            async move { health.await == not_serving }
        })
        .await;
        keys.encrypt(encrypt_request(b"from the cache"))
            .await
            .expect("cached keys serve while PostgreSQL is out of reach");
        let write = cluster
            .admin(ISOLATED)
            .await
            .rotate_key(pb::RotateKeyRequest {
                tenant: "acme".into(),
                name: "default".into(),
                request_id: String::new(),
            })
            .await;
        assert!(unavailable(&write), "a write on the cut node: {write:?}");
        assert!(cut.elapsed() < TTL, "the checks ran within the TTL");
        tokio::time::sleep((TTL + Duration::from_secs(1)).saturating_sub(cut.elapsed())).await;
        let refused = keys.encrypt(encrypt_request(b"too old to trust")).await;
        assert!(
            unavailable(&refused),
            "past the TTL the cut node must refuse: {refused:?}"
        );
        netns().heal(Link::Postgres);
        let healthy = until(Duration::from_secs(15), "the node's store is healthy again", || {
            let health = health(ISOLATED);
            async move { health.await == serving }
        })
        .await;
        keys.encrypt(encrypt_request(b"back"))
            .await
            .expect("encrypt after the link is back");
        cluster
            .admin(ISOLATED)
            .await
            .rotate_key(pb::RotateKeyRequest {
                tenant: "acme".into(),
                name: "default".into(),
                request_id: String::new(),
            })
            .await
            .expect("writes on the node again");
        eprintln!(
            "cut from PostgreSQL only: store NOT_SERVING after {noticed:?}, cached Encrypt served, writes UNAVAILABLE, refused past the {TTL:?} TTL; healthy {healthy:?} after the link came back"
        );
    });
    std::thread::sleep(Duration::from_secs(2));
    // 3. Every acknowledged item, on every node.
    let acked = stop_load(&runtime, &stop, tasks, &acked);
    runtime.block_on(verify_everywhere(&cluster, &acked));
}
