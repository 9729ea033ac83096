//! The PostgreSQL engine on real PostgreSQL and real SoftHSM: the whole store works on it and
//! survives a restart of the node; an attacker with write access to the database can neither
//! alter, move nor replay records, nor roll a tenant back; two nodes on one database never
//! fork a tenant's history.

mod common;

use std::path::Path;
use std::sync::Arc;

use keyfront::Error;
use keyfront::crypto::{EncryptionContext, Plaintext};
use keyfront::hsm::Hsm;
use keyfront::ids::{KeyVersion, Name, TenantId};
use keyfront::keystore::{self, Purpose};
use keyfront::kms::{Kms, KmsOptions};

fn name(s: &str) -> Name {
    s.parse().expect("valid name")
}

fn options(url: &str, namespace: &str) -> KmsOptions {
    let mut options = KmsOptions::default();
    options.store.backend = common::postgres::backend(url, namespace);
    options
}

/// A node: a domain on the shared HSM and the namespace, with a data directory of its own.
fn node(hsm: &Arc<dyn Hsm>, url: &str, namespace: &str, dir: &Path) -> Kms {
    Kms::open(Arc::clone(hsm), dir, options(url, namespace)).expect("open kms on PostgreSQL")
}

fn encrypt(kms: &Kms, tenant: TenantId, plaintext: &[u8]) -> Vec<u8> {
    kms.encrypt(
        tenant,
        &name("default"),
        &Plaintext::copy_from(plaintext),
        &EncryptionContext::new(),
    )
    .expect("encrypt")
    .ciphertext
}

fn decrypts(kms: &Kms, tenant: TenantId, ciphertext: &[u8]) -> Result<Vec<u8>, Error> {
    kms.decrypt(tenant, ciphertext, &EncryptionContext::new(), None)
        .map(|d| d.plaintext.expose_secret().to_vec())
}

struct Fixture {
    url: String,
    namespace: String,
    hsm: Arc<dyn Hsm>,
    hsm_label: String,
    token: keyfront::hsm::pkcs11::Pkcs11Config,
    _dir: tempfile::TempDir,
    acme: TenantId,
    globex: TenantId,
    ciphertext: Vec<u8>,
}

impl Fixture {
    fn schema(&self, tenant: TenantId) -> String {
        format!("{}_t_{tenant}", self.namespace)
    }

    /// A node that starts now, as after a restart: nothing in memory, a new data directory.
    fn fresh_node(&self) -> (Kms, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        (node(&self.hsm, &self.url, &self.namespace, dir.path()), dir)
    }
}

/// Two tenants with a DATA key `default` (acme's rotated once) and a ciphertext of acme's v2,
/// written by a node that is then gone.
fn fixture(prefix: &str) -> Option<Fixture> {
    let url = common::postgres::url()?;
    let namespace = common::postgres::namespace(prefix);
    let config = common::initialized_token(prefix);
    let hsm: Arc<dyn Hsm> = Arc::new(common::open_hsm(&config));
    let hsm_label = config.token_label.clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let kms = node(&hsm, &url, &namespace, dir.path());
    let mut ids = Vec::new();
    for tenant in ["acme", "globex"] {
        let id = kms.create_tenant(&name(tenant)).expect("tenant").id;
        kms.create_key(id, &name("default"), Purpose::Data)
            .expect("key");
        ids.push(id);
    }
    kms.rotate_key(ids[0], &name("default")).expect("rotate");
    let ciphertext = encrypt(&kms, ids[0], b"payload");
    Some(Fixture {
        url,
        namespace,
        hsm,
        hsm_label,
        token: config,
        _dir: dir,
        acme: ids[0],
        globex: ids[1],
        ciphertext,
    })
}

fn assert_integrity_failure<T: std::fmt::Debug>(result: Result<T, Error>) {
    assert!(
        matches!(
            result,
            Err(Error::Store(
                keystore::Error::Integrity { .. } | keystore::Error::Rollback(_)
            ))
        ),
        "expected an integrity failure, got {result:?}"
    );
}

#[test]
fn the_store_runs_on_postgres_and_survives_a_restart() {
    let Some(f) = fixture("restart") else { return };
    let (kms, _dir) = f.fresh_node();
    let mut tenants: Vec<_> = kms
        .store()
        .tenants()
        .expect("tenants")
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    tenants.sort();
    assert_eq!(tenants, ["acme", "globex"]);
    assert_eq!(
        decrypts(&kms, f.acme, &f.ciphertext).expect("decrypts after restart"),
        b"payload"
    );
    let key = kms.key(f.acme, &name("default")).expect("key");
    assert_eq!((key.primary, key.latest), (KeyVersion(2), KeyVersion(2)));

    // Writes go on from the restarted node, and a third node sees them.
    kms.rotate_key(f.acme, &name("default")).expect("rotate");
    let v3 = encrypt(&kms, f.acme, b"v3");
    let (third, _dir3) = f.fresh_node();
    assert_eq!(decrypts(&third, f.acme, &v3).expect("decrypts"), b"v3");
    assert_eq!(
        third.key(f.acme, &name("default")).expect("key").latest,
        KeyVersion(3)
    );

    // Destroying a tenant drops its schema; its id is refused everywhere afterwards.
    let sql = common::postgres::Sql::connect(&f.url);
    assert!(sql.schema_exists(&f.schema(f.globex)));
    kms.destroy_tenant(f.globex).expect("destroy");
    assert!(!sql.schema_exists(&f.schema(f.globex)));
    let (after, _dir4) = f.fresh_node();
    assert!(matches!(
        after.keys(f.globex),
        Err(Error::Store(keystore::Error::TenantDestroyed(_)))
    ));
}

#[test]
fn an_altered_record_is_refused() {
    let Some(f) = fixture("altered") else { return };
    let sql = common::postgres::Sql::connect(&f.url);
    let schema = f.schema(f.acme);
    let (key, mut value) = sql
        .records(&schema)
        .into_iter()
        .find(|(k, _)| k.starts_with(b"v/"))
        .expect("a version record");
    let middle = value.len() / 2;
    value[middle] ^= 0x01;
    sql.put(&schema, &key, &value);
    let (kms, _dir) = f.fresh_node();
    assert_integrity_failure(decrypts(&kms, f.acme, &f.ciphertext));
}

#[test]
fn a_record_moved_to_another_tenants_schema_is_refused() {
    let Some(f) = fixture("moved") else { return };
    let sql = common::postgres::Sql::connect(&f.url);
    // globex's key record, put over acme's (both keys are named `default`, ids differ).
    let globex_key = sql
        .records(&f.schema(f.globex))
        .into_iter()
        .find(|(k, _)| k.starts_with(b"k/"))
        .expect("a key record");
    sql.put(&f.schema(f.acme), &globex_key.0, &globex_key.1);
    let (kms, _dir) = f.fresh_node();
    assert_integrity_failure(kms.keys(f.acme));
    // globex itself is untouched.
    kms.keys(f.globex).expect("globex opens");
}

#[test]
fn an_old_record_replayed_over_a_newer_one_is_refused() {
    let Some(f) = fixture("replay") else { return };
    let sql = common::postgres::Sql::connect(&f.url);
    let schema = f.schema(f.acme);
    let old_key_record = sql
        .records(&schema)
        .into_iter()
        .find(|(k, _)| k.starts_with(b"k/"))
        .expect("a key record");
    {
        let (kms, _dir) = f.fresh_node();
        kms.rotate_key(f.acme, &name("default")).expect("rotate");
    }
    // The key record as it was before the rotation: its MAC is valid, its sequence old.
    sql.put(&schema, &old_key_record.0, &old_key_record.1);
    let (kms, _dir) = f.fresh_node();
    assert_integrity_failure(kms.keys(f.acme));
}

#[test]
fn a_tenant_schema_rolled_back_to_an_older_copy_is_refused() {
    let Some(f) = fixture("rollback") else { return };
    let sql = common::postgres::Sql::connect(&f.url);
    let schema = f.schema(f.acme);
    let old_copy = sql.records(&schema);
    {
        let (kms, _dir) = f.fresh_node();
        kms.rotate_key(f.acme, &name("default")).expect("rotate");
    }
    sql.replace_all(&schema, &old_copy);
    let (kms, _dir) = f.fresh_node();
    let result = kms.keys(f.acme);
    assert!(
        matches!(result, Err(Error::Store(keystore::Error::Rollback(id))) if id == f.acme),
        "{result:?}"
    );
}

#[test]
fn a_node_whose_view_is_stale_never_writes_from_it_and_retries_on_a_fresh_one() {
    let Some(f) = fixture("stale") else { return };
    let (a, _dir_a) = f.fresh_node();
    let (b, _dir_b) = f.fresh_node();
    assert_eq!(
        b.key(f.acme, &name("default")).expect("b reads").latest,
        KeyVersion(2)
    );
    a.rotate_key(f.acme, &name("default"))
        .expect("a rotates to v3");
    // b opened acme at v2: its commit over that view is refused as stale (nothing written),
    // and the rotation is decided again on a fresh view: v4, not a second v3.
    let record = b.rotate_key(f.acme, &name("default")).expect("b rotates");
    assert_eq!(record.latest, KeyVersion(4));
    let (c, _dir_c) = f.fresh_node();
    let details = c.key_details(f.acme, &name("default")).expect("details");
    assert_eq!(details.versions.len(), 4, "{details:?}");
    let versions: Vec<u32> = details.versions.iter().map(|v| v.version.0).collect();
    assert_eq!(versions, [1, 2, 3, 4]);
    // What a caller sees when the tenant keeps changing under every attempt.
    let status = tonic::Status::from(Error::Store(keystore::Error::Stale(f.acme)));
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
}

#[test]
fn two_nodes_rotating_one_key_concurrently_never_fork_its_history() {
    let Some(f) = fixture("race") else { return };
    let nodes: Vec<_> = (0..2).map(|_| f.fresh_node()).collect();
    let acme = f.acme;
    let successes: Vec<usize> = std::thread::scope(|scope| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|(kms, _)| {
                scope.spawn(move || {
                    let mut ok = 0;
                    for _ in 0..15 {
                        match kms.rotate_key(acme, &name("default")) {
                            Ok(_) => ok += 1,
                            Err(Error::Store(keystore::Error::Stale(_))) => {}
                            Err(other) => panic!("unexpected error: {other:?}"),
                        }
                    }
                    ok
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let total: usize = successes.iter().sum();
    assert!(
        total >= 15,
        "at least one node's rotations go through: {successes:?}"
    );
    let (c, _dir_c) = f.fresh_node();
    let details = c.key_details(acme, &name("default")).expect("details");
    // Every successful rotation made exactly one version; none was written twice.
    let latest = 2 + u32::try_from(total).expect("small");
    assert_eq!(details.record.latest, KeyVersion(latest), "{successes:?}");
    assert_eq!(details.versions.len(), latest as usize);
    for (i, version) in details.versions.iter().enumerate() {
        assert_eq!(
            version.version,
            KeyVersion(u32::try_from(i + 1).expect("small"))
        );
    }
    assert_eq!(
        decrypts(&c, acme, &f.ciphertext).expect("v2 data still decrypts"),
        b"payload"
    );
}

/// A TCP proxy to the test server that, once armed, freezes on the first connection that
/// runs a `FOR UPDATE`: it forwards the statement, then nothing more in either direction,
/// and keeps both sockets open. The node's session then sits inside its transaction with the
/// row locked, as when a network partition cuts a node off in the middle of a write (and a
/// middlebox, like this proxy, keeps the server's side of the connection up).
struct FreezingProxy {
    port: u16,
    armed: Arc<std::sync::atomic::AtomicBool>,
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl FreezingProxy {
    fn start(url: &str) -> Self {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicBool, Ordering};
        let server_port: u16 = url
            .split(' ')
            .find_map(|part| part.strip_prefix("port="))
            .and_then(|port| port.parse().ok())
            .expect("the test URL names a port");
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("proxy binds");
        let port = listener.local_addr().expect("addr").port();
        let armed = Arc::new(AtomicBool::new(false));
        let frozen = Arc::new(AtomicBool::new(false));
        let (armed_, frozen_) = (Arc::clone(&armed), Arc::clone(&frozen));
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { continue };
                let outbound =
                    std::net::TcpStream::connect(("127.0.0.1", server_port)).expect("server");
                let pairs = [
                    (
                        true,
                        inbound.try_clone().expect("clone"),
                        outbound.try_clone().expect("clone"),
                    ),
                    (false, outbound, inbound),
                ];
                for (upstream, mut from, mut to) in pairs {
                    let (armed, frozen) = (Arc::clone(&armed_), Arc::clone(&frozen_));
                    std::thread::spawn(move || {
                        let mut locking = false;
                        let mut buffer = vec![0u8; 64 * 1024];
                        loop {
                            let Ok(n) = from.read(&mut buffer) else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            while frozen.load(Ordering::SeqCst) {
                                // Holds both sockets, forwards nothing: the partition.
                                std::thread::sleep(std::time::Duration::from_secs(3600));
                            }
                            if to.write_all(&buffer[..n]).is_err() {
                                return;
                            }
                            if !upstream || !armed.load(Ordering::SeqCst) {
                                continue;
                            }
                            // The statement's text goes in its Parse message; the next
                            // message from the node executes it and takes the lock.
                            if locking {
                                frozen.store(true, Ordering::SeqCst);
                            } else if buffer[..n].windows(10).any(|w| w == b"FOR UPDATE") {
                                locking = true;
                            }
                        }
                    });
                }
            }
        });
        Self {
            port,
            armed,
            frozen,
        }
    }

    fn url(&self, url: &str) -> String {
        url.split(' ')
            .map(|part| match part.starts_with("port=") {
                true => format!("port={}", self.port),
                false => part.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[test]
fn a_node_cut_off_inside_a_transaction_does_not_hold_up_the_others() {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    let Some(f) = fixture("cutoff") else { return };
    const BOUND: Duration = Duration::from_secs(2);
    let node_on = |url: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut options = options(url, &f.namespace);
        if let keystore::Backend::Postgres(postgres) = &mut options.store.backend {
            postgres.timeout = BOUND;
        }
        let kms = Kms::open(Arc::clone(&f.hsm), dir.path(), options).expect("open");
        (kms, dir)
    };
    let proxy = FreezingProxy::start(&f.url);
    let (cut_off, _dir_a) = node_on(&proxy.url(&f.url));
    let (healthy, _dir_b) = node_on(&f.url);
    proxy.armed.store(true, Ordering::SeqCst);
    let acme = f.acme;
    std::thread::scope(|scope| {
        let cut_off = scope.spawn(|| cut_off.rotate_key(acme, &name("default")));
        let started = Instant::now();
        while !proxy.frozen.load(Ordering::SeqCst) {
            assert!(
                started.elapsed() < BOUND,
                "the cut-off node never took a row lock"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // The cut-off node's session holds its lock on the server. The healthy node's write
        // to the same tenant must not wait for it past the operation bound.
        let started = Instant::now();
        let rotated = healthy
            .rotate_key(acme, &name("default"))
            .expect("the healthy node rotates while the other's session is orphaned");
        eprintln!(
            "the healthy node's rotation took {:?} (bound {BOUND:?})",
            started.elapsed()
        );
        assert_eq!(rotated.latest, KeyVersion(3));
        let refused = cut_off.join().expect("thread");
        assert!(
            matches!(refused, Err(Error::Store(keystore::Error::Unavailable(_)))),
            "the cut-off node is told to retry: {refused:?}"
        );
    });
    // Nothing of the cut-off node's attempt was written.
    let (fresh, _dir_c) = f.fresh_node();
    let details = fresh.key_details(acme, &name("default")).expect("details");
    let versions: Vec<u32> = details.versions.iter().map(|v| v.version.0).collect();
    assert_eq!(versions, [1, 2, 3]);
    assert_eq!(
        decrypts(&fresh, acme, &f.ciphertext).expect("v2 data still decrypts"),
        b"payload"
    );
    // The cut-off node stays blocked on its frozen connection; do not wait for it.
    std::mem::forget(cut_off);
}

/// Encrypt through the in-memory path when everything is cached, else the store path.
fn encrypt_on(
    kms: &Kms,
    tenant: &str,
    id: TenantId,
    plaintext: &[u8],
) -> Result<keyfront::kms::Encrypted, Error> {
    let plaintext = Plaintext::copy_from(plaintext);
    let context = EncryptionContext::new();
    match kms.encrypt_cached(&name(tenant), &name("default"), &plaintext, &context) {
        Some(result) => result,
        None => kms.encrypt(id, &name("default"), &plaintext, &context),
    }
}

fn decrypt_on(kms: &Kms, tenant: &str, id: TenantId, ciphertext: &[u8]) -> Result<Vec<u8>, Error> {
    let context = EncryptionContext::new();
    match kms.decrypt_cached(&name(tenant), ciphertext, &context, None, None) {
        Some(result) => result,
        None => kms.decrypt(id, ciphertext, &context, None),
    }
    .map(|d| d.plaintext.expose_secret().to_vec())
}

#[test]
fn a_rotation_on_one_node_reaches_the_hot_path_of_another_within_the_bound() {
    let Some(f) = fixture("fanout") else { return };
    let (a, _dir_a) = f.fresh_node();
    let (b, _dir_b) = f.fresh_node();
    // b has acme's primary (v2), its bulk key and its tenant id in memory.
    b.tenant_id(&name("acme")).expect("tenant id");
    assert_eq!(
        encrypt_on(&b, "acme", f.acme, b"x")
            .expect("encrypt")
            .version,
        KeyVersion(2)
    );
    assert!(
        b.encrypt_cached(
            &name("acme"),
            &name("default"),
            &Plaintext::copy_from(b"x"),
            &EncryptionContext::new()
        )
        .is_some(),
        "served from memory"
    );

    let rotated = a.rotate_key(f.acme, &name("default")).expect("rotate");
    let committed = std::time::Instant::now();
    let window = loop {
        let version = encrypt_on(&b, "acme", f.acme, b"x")
            .expect("encrypt")
            .version;
        if version == rotated.primary {
            break committed.elapsed();
        }
        assert!(
            committed.elapsed() < std::time::Duration::from_secs(1),
            "b still encrypts under {version:?} after 1 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    eprintln!("stale window after rotation: {window:?}");
}

#[test]
fn disable_min_version_and_tenant_destruction_are_refused_everywhere_before_they_return() {
    let Some(f) = fixture("refuse") else { return };
    let (a, _dir_a) = f.fresh_node();
    let (b, _dir_b) = f.fresh_node();
    let v1 = {
        // A v1 ciphertext: written before the fixture's rotation is not possible, so rotate
        // the other tenant's key and use it for the min-version check below.
        b.tenant_id(&name("globex")).expect("tenant id");
        let v1 = encrypt_on(&b, "globex", f.globex, b"v1").expect("encrypt");
        a.rotate_key(f.globex, &name("default"))
            .expect("rotate globex");
        v1.ciphertext
    };
    b.tenant_id(&name("acme")).expect("tenant id");
    assert_eq!(
        decrypt_on(&b, "acme", f.acme, &f.ciphertext).expect("b decrypts v2"),
        b"payload"
    );
    assert_eq!(
        decrypt_on(&b, "globex", f.globex, &v1).expect("b decrypts v1"),
        b"v1"
    );

    // Disable v2 (acme's primary) on a: once it returns, b refuses it for both directions.
    a.disable_version(f.acme, &name("default"), KeyVersion(2))
        .expect("disable");
    let refused = decrypt_on(&b, "acme", f.acme, &f.ciphertext);
    assert!(
        matches!(refused, Err(Error::KeyState { .. })),
        "{refused:?}"
    );
    let refused = encrypt_on(&b, "acme", f.acme, b"x");
    assert!(
        matches!(refused, Err(Error::KeyState { .. })),
        "{refused:?}"
    );
    a.enable_version(f.acme, &name("default"), KeyVersion(2))
        .expect("enable");
    assert_eq!(
        decrypt_on(&b, "acme", f.acme, &f.ciphertext).expect("enabled again"),
        b"payload"
    );

    // A minimum decryption version set on a.
    let update = keyfront::kms::PolicyUpdate {
        min_decryption_version: Some(2),
        ..Default::default()
    };
    a.update_policy(f.globex, &name("default"), &update)
        .expect("min version");
    let refused = decrypt_on(&b, "globex", f.globex, &v1);
    assert!(
        matches!(refused, Err(Error::KeyState { .. })),
        "{refused:?}"
    );

    // The tenant destroyed on a.
    a.destroy_tenant(f.acme).expect("destroy");
    let refused = decrypt_on(&b, "acme", f.acme, &f.ciphertext);
    assert!(
        matches!(
            refused,
            Err(Error::Store(keystore::Error::TenantDestroyed(_)) | Error::TenantNotFound(_))
        ),
        "{refused:?}"
    );
    assert!(matches!(
        b.tenant_id(&name("acme")),
        Err(Error::TenantNotFound(_))
    ));
}

#[test]
fn one_node_leads_and_another_takes_over_within_the_term_when_it_is_gone() {
    let Some(f) = fixture("lease") else { return };
    let term = std::time::Duration::from_secs(2);
    let node_with_term = || {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut options = options(&f.url, &f.namespace);
        if let keystore::Backend::Postgres(postgres) = &mut options.store.backend {
            postgres.lease_term = term;
        }
        let kms = Kms::open(Arc::clone(&f.hsm), dir.path(), options).expect("open");
        (kms, dir)
    };
    let (a, _dir_a) = node_with_term();
    let (b, _dir_b) = node_with_term();
    // Neither leads before it contends; offline commands do not contend.
    let lease_a = a.store().lead("a");
    let lease_b = b.store().lead("b");
    let started = std::time::Instant::now();
    while !(lease_a.is_held() || lease_b.is_held()) {
        assert!(started.elapsed() < term * 2, "nobody leads");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    for _ in 0..30 {
        assert!(
            !(lease_a.is_held() && lease_b.is_held()),
            "two leaders at once"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (leader, follower, follower_lease) = if lease_a.is_held() {
        (a, b, lease_b)
    } else {
        (b, a, lease_a)
    };
    let first_token = leader
        .store()
        .leadership()
        .and_then(|l| l.token())
        .expect("token");
    assert!(matches!(
        follower.rotate_master_key(),
        Err(Error::NotLeader)
    ));
    drop(leader);
    let gone = std::time::Instant::now();
    while !follower_lease.is_held() {
        assert!(gone.elapsed() < term * 3, "no takeover");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    eprintln!("leader failover took {:?} (term {term:?})", gone.elapsed());
    assert!(
        follower_lease.token().expect("token") > first_token,
        "a new term has a larger fencing token"
    );
    assert!(follower.store().is_leader());
}

#[test]
fn a_postgres_store_backs_up_and_restores_into_an_empty_namespace() {
    let Some(f) = fixture("backup") else { return };
    let (kms, dir) = f.fresh_node();
    let backups = keyfront::backup::nightly::Backups::new(&dir.path().join("backups"), 30, 0);
    let created = backups
        .take(&kms, None)
        .expect("snapshot of the PostgreSQL store");
    assert_eq!(created.manifest.tenants.len(), 2);
    drop(kms);

    // Restore into a namespace of its own: same archive format, PostgreSQL target.
    let target = common::postgres::namespace("restored");
    let mut options = options(&f.url, &target).store;
    options.journal_dir = None;
    let restored = keyfront::backup::restore::restore(
        &f.hsm,
        &created.path,
        None,
        &dir.path().join("unused"),
        options.clone(),
    )
    .expect("restore");
    assert_eq!(restored.tenants, 2);
    // Into a namespace that holds something: refused, nothing written.
    let again = keyfront::backup::restore::restore(
        &f.hsm,
        &created.path,
        None,
        &dir.path().join("unused2"),
        options,
    );
    assert!(again.is_err(), "a restore needs an empty target");
    let restored_dir = tempfile::tempdir().expect("tempdir");
    let node = node(&f.hsm, &f.url, &target, restored_dir.path());
    assert_eq!(
        decrypts(&node, f.acme, &f.ciphertext).expect("the restored copy decrypts"),
        b"payload"
    );
}

/// TLS to PostgreSQL, on the test server with TLS switched on for the test (TLS 1.3 only, the
/// dev server certificate for 127.0.0.1): a node with the right CA connects over TLS 1.3 and
/// works; with another CA it does not connect; and once the server stops offering TLS, a node
/// with a CA refuses to connect in plain text.
#[test]
fn a_node_with_a_ca_file_talks_to_postgres_over_verified_tls_13_only() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Some(url) = common::postgres::url() else {
        return;
    };
    let Some(pg_dir) = std::env::var_os("KEYFRONT_TEST_POSTGRES_DIR") else {
        eprintln!("skipped: KEYFRONT_TEST_POSTGRES_DIR is not set (scripts/test.sh sets it)");
        return;
    };
    let data = Path::new(&pg_dir).join("data");
    let owner = std::fs::metadata(&data).expect("PostgreSQL data directory");
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    keyfront::cli::dev::ensure_certificates(&certs).expect("certificates");
    let other = dir.path().join("other");
    keyfront::cli::dev::ensure_certificates(&other).expect("another CA");
    // The server reads its certificate and key as its own user; the key must be 0600.
    for (from, to) in [
        ("server.crt", "kft-test-server.crt"),
        ("server.key", "kft-test-server.key"),
    ] {
        let target = data.join(to);
        std::fs::copy(certs.join(from), &target).expect("copy into the data directory");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).expect("mode");
        std::os::unix::fs::chown(&target, Some(owner.uid()), Some(owner.gid())).expect("chown");
    }
    let sql = common::postgres::Sql::connect(&url);
    let set_tls = |on: bool| {
        // One statement at a time: ALTER SYSTEM refuses to run inside a transaction block.
        for statement in [
            "ALTER SYSTEM SET ssl_cert_file = 'kft-test-server.crt'".to_owned(),
            "ALTER SYSTEM SET ssl_key_file = 'kft-test-server.key'".to_owned(),
            "ALTER SYSTEM SET ssl_min_protocol_version = 'TLSv1.3'".to_owned(),
            format!("ALTER SYSTEM SET ssl = {on}"),
            "SELECT pg_reload_conf()".to_owned(),
        ] {
            sql.execute(&statement);
        }
        // The postmaster applies the reload asynchronously: wait until new sessions see it.
        for _ in 0..100 {
            let seen = common::postgres::Sql::connect(&url).strings("SHOW ssl");
            if seen == [if on { "on" } else { "off" }] {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("ssl = {on} did not take effect");
    };
    struct Restore<'a>(&'a dyn Fn(bool));
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            (self.0)(false);
        }
    }
    set_tls(true);
    let _restore = Restore(&set_tls);

    let config = common::initialized_token("pgtls");
    let hsm: Arc<dyn Hsm> = Arc::new(common::open_hsm(&config));
    let namespace = common::postgres::namespace("tls");
    let open = |ca: &Path, data_dir: &Path| {
        let mut options = KmsOptions::default();
        let mut backend = common::postgres::backend(&url, &namespace);
        if let keystore::Backend::Postgres(postgres) = &mut backend {
            postgres.ca_file = Some(ca.to_path_buf());
            postgres.timeout = std::time::Duration::from_secs(3);
        }
        options.store.backend = backend;
        Kms::open(Arc::clone(&hsm), data_dir, options)
    };
    let node_dir = tempfile::tempdir().expect("tempdir");
    let kms = open(&certs.join("ca.crt"), node_dir.path()).expect("a node over TLS");
    let tenant = kms.create_tenant(&name("acme")).expect("tenant").id;
    kms.create_key(tenant, &name("default"), Purpose::Data)
        .expect("key");
    let ciphertext = encrypt(&kms, tenant, b"over tls");
    assert_eq!(
        decrypts(&kms, tenant, &ciphertext).expect("decrypt"),
        b"over tls"
    );
    let sessions = sql.strings(
        "SELECT s.version FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid \
         WHERE a.application_name = 'keyfront' AND s.ssl",
    );
    assert!(
        !sessions.is_empty() && sessions.iter().all(|v| v == "TLSv1.3"),
        "keyfront's sessions over TLS: {sessions:?}"
    );
    drop(kms);

    // A server certificate the CA did not sign: no connection, and the message names neither
    // the connection string nor a secret.
    let wrong_dir = tempfile::tempdir().expect("tempdir");
    let refused = open(&other.join("ca.crt"), wrong_dir.path())
        .and_then(|kms| kms.create_tenant(&name("globex")).map(|_| ()));
    let message = format!("{:?}", refused.expect_err("another CA must not connect"));
    assert!(!message.contains("user=postgres"), "{message}");

    // No TLS on offer: a node with a CA does not fall back to plain text.
    set_tls(false);
    let plain_dir = tempfile::tempdir().expect("tempdir");
    let refused = open(&certs.join("ca.crt"), plain_dir.path())
        .and_then(|kms| kms.create_tenant(&name("globex")).map(|_| ()));
    assert!(
        refused.is_err(),
        "a node with a CA must not connect without TLS"
    );
}

/// `keyfront backup restore` as an operator runs it, with a config whose store is PostgreSQL:
/// the archive lands in the config's (empty) namespace, and a node on it decrypts.
#[test]
fn the_cli_restores_a_snapshot_into_a_postgres_namespace() {
    use std::os::unix::fs::PermissionsExt;
    let Some(f) = fixture("clirestore") else {
        return;
    };
    let (kms, dir) = f.fresh_node();
    let created = keyfront::backup::nightly::Backups::new(&dir.path().join("backups"), 30, 0)
        .take(&kms, None)
        .expect("snapshot of the PostgreSQL store");
    drop(kms);
    let pin = dir.path().join("pin");
    std::fs::write(&pin, common::USER_PIN).expect("pin file");
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).expect("mode");
    let target = common::postgres::namespace("clirestored");
    let config = dir.path().join("restore.toml");
    std::fs::write(
        &config,
        format!(
            "[hsm]\nmodule = \"{}\"\ntoken_label = \"{}\"\npin_file = \"{}\"\n\n\
             [storage]\ndata_dir = \"{}\"\nbackend = \"postgres\"\n\n\
             [storage.postgres]\nurl_env = \"KEYFRONT_TEST_POSTGRES_URL\"\nnamespace = \"{target}\"\n",
            common::module().display(),
            f.hsm_label,
            pin.display(),
            dir.path().join("data").display(),
        ),
    )
    .expect("config");
    let restore = |data_dir: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_keyfront"))
            .args(["backup", "restore"])
            .arg(&created.path)
            .arg("--without-journal")
            .args(["--data-dir", data_dir])
            .arg("--config")
            .arg(&config)
            .env("KEYFRONT_TEST_POSTGRES_URL", &f.url)
            .output()
            .expect("keyfront backup restore runs")
    };
    let out = restore(&dir.path().join("restored").display().to_string());
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("2 tenants"),
        "{}",
        text(&out.stdout)
    );
    assert!(!text(&out.stdout).contains(&f.url) && !text(&out.stderr).contains(&f.url));
    // Again into the same namespace: refused, nothing written.
    let again = restore(&dir.path().join("restored-again").display().to_string());
    assert!(!again.status.success(), "{}", text(&again.stdout));
    assert!(
        text(&again.stderr).contains("restore refused"),
        "{}",
        text(&again.stderr)
    );
    let node_dir = tempfile::tempdir().expect("tempdir");
    let node = node(&f.hsm, &f.url, &target, node_dir.path());
    assert_eq!(
        decrypts(&node, f.acme, &f.ciphertext).expect("the restored copy decrypts"),
        b"payload"
    );
}

/// A master key rotation on one node of a cluster on a shared HSM (here: two sessions of one
/// SoftHSM token, as two processes on a network HSM): the other node, with its own session and
/// view of the token, wraps new KEKs under the new MWK and decrypts what was rewrapped, and a
/// node that starts afterwards decrypts everything.
#[test]
fn a_master_key_rotation_on_one_node_is_followed_by_the_others_on_the_shared_hsm() {
    let Some(f) = fixture("mwk") else { return };
    let (a, _dir_a) = f.fresh_node();
    let hsm_b: Arc<dyn Hsm> = Arc::new(common::open_hsm(&f.token));
    let dir_b = tempfile::tempdir().expect("tempdir");
    let b = node(&hsm_b, &f.url, &f.namespace, dir_b.path());
    assert_eq!(
        decrypts(&b, f.acme, &f.ciphertext).expect("b decrypts"),
        b"payload"
    );
    // d opened its session before the rotation and makes no key after it.
    let hsm_d: Arc<dyn Hsm> = Arc::new(common::open_hsm(&f.token));
    let before = hsm_b.mwk_generation();
    let status = a.rotate_master_key().expect("a rotates the master key");
    assert_eq!(status.current.0, before.0 + 1);
    assert!(status.rotation.is_none(), "finished");

    // b makes a key after the rotation: its KEK is wrapped under the new generation.
    b.create_key(f.globex, &name("after-rotation"), Purpose::Data)
        .expect("b creates a key");
    assert_eq!(
        hsm_b.mwk_generation(),
        status.current,
        "b follows the new MWK"
    );
    let made_on_b = b
        .encrypt(
            f.globex,
            &name("after-rotation"),
            &Plaintext::copy_from(b"made on b"),
            &EncryptionContext::new(),
        )
        .expect("encrypt on b")
        .ciphertext;
    // A node that starts now knows the new generation only; it decrypts both.
    let hsm_c: Arc<dyn Hsm> = Arc::new(common::open_hsm(&f.token));
    let dir_c = tempfile::tempdir().expect("tempdir");
    let c = node(&hsm_c, &f.url, &f.namespace, dir_c.path());
    assert_eq!(
        decrypts(&c, f.acme, &f.ciphertext).expect("c decrypts the old ciphertext"),
        b"payload"
    );
    let out = c
        .decrypt(f.globex, &made_on_b, &EncryptionContext::new(), None)
        .expect("c decrypts b's ciphertext");
    assert_eq!(out.plaintext.expose_secret(), b"made on b");
    // d meets a KEK rewrapped under a generation it has not seen: it finds it on the token.
    let dir_d = tempfile::tempdir().expect("tempdir");
    let d = node(&hsm_d, &f.url, &f.namespace, dir_d.path());
    assert_eq!(
        decrypts(&d, f.acme, &f.ciphertext).expect("d decrypts"),
        b"payload"
    );
    assert_eq!(hsm_d.mwk_generation(), status.current);
}

/// Issue 24, defect 1, on PostgreSQL: a system schema whose request_ids shared the rotation
/// checks' prefix is migrated when a node opens it.
#[cfg(feature = "test-hooks")]
#[test]
fn a_postgres_store_of_key_layout_1_is_migrated_at_open() {
    let Some(url) = common::postgres::url() else {
        return;
    };
    let namespace = common::postgres::namespace("layout");
    let config = common::initialized_token("pg-layout");
    let hsm: Arc<dyn Hsm> = Arc::new(common::open_hsm(&config));
    let dir = tempfile::tempdir().expect("tempdir");
    common::check_key_layout_migration(|| node(&hsm, &url, &namespace, dir.path()));
}

/// Issue 24, defect 2: PostgreSQL refusing this node's login (class 28, as after a password
/// rotation) or a privilege (42501) is an outage of the store for the caller: writes answer
/// UNAVAILABLE (the client library retries it), cached keys go on encrypting and decrypting on
/// every node, as with a stopped server, and the error names the SQLSTATE and the server's
/// message (tokio-postgres's own text is only "db error").
#[test]
fn a_login_or_privilege_refused_by_postgres_is_an_outage_and_cached_keys_go_on() {
    let Some(url) = common::postgres::url() else {
        return;
    };
    let sql = common::postgres::Sql::connect(&url);
    let role = format!("kf_login_{:08x}", rand::random::<u32>());
    sql.execute(&format!(
        "CREATE ROLE {role} LOGIN; GRANT CREATE ON DATABASE postgres TO {role}"
    ));
    let role_url = url.replace("user=postgres", &format!("user={role}"));
    assert_ne!(role_url, url, "the test URL names its user");
    let namespace = common::postgres::namespace("login");
    let config = common::initialized_token("pg-login");
    let hsm: Arc<dyn Hsm> = Arc::new(common::open_hsm(&config));
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = node(&hsm, &role_url, &namespace, dir_a.path());
    let acme = a.create_tenant(&name("acme")).expect("tenant").id;
    a.create_key(acme, &name("default"), Purpose::Data)
        .expect("key");
    let b = node(&hsm, &role_url, &namespace, dir_b.path());
    let ciphertext = encrypt(&a, acme, b"before");
    // B's first Encrypt reserves uses (a commit, announced to A, whose view of acme is then
    // read again): A uses the key once more after it, so both hold a current view.
    for kms in [&a, &b, &a] {
        assert_eq!(
            decrypts(kms, acme, &ciphertext).expect("decrypt"),
            b"before"
        );
        encrypt(kms, acme, b"warm");
    }
    let outage = |kms: &Kms, sqlstate: &str| {
        // The pool's sessions that the server ended answer "connection closed" first (also
        // UNAVAILABLE); the next ones meet the refusal itself.
        let mut text = String::new();
        for _ in 0..20 {
            let error = kms
                .rotate_key(acme, &name("default"))
                .expect_err("a write while PostgreSQL refuses");
            text = error.to_string();
            assert!(
                matches!(&error, Error::Store(keystore::Error::Unavailable(_))),
                "{error:?}"
            );
            assert_eq!(tonic::Status::from(error).code(), tonic::Code::Unavailable);
            if text.contains("SQLSTATE") {
                break;
            }
        }
        assert!(text.contains(&format!("SQLSTATE {sqlstate}")), "{text}");
        assert!(
            !text.contains("db error") && !text.contains("host="),
            "{text}"
        );
        let ciphertext = encrypt(kms, acme, b"during");
        assert_eq!(
            decrypts(kms, acme, &ciphertext).expect("decrypt"),
            b"during"
        );
    };

    // The privileges on the tables taken away (42501); the sessions stay.
    let schemas = [
        format!("{namespace}_system"),
        format!("{namespace}_t_{acme}"),
    ];
    for schema in &schemas {
        sql.execute(&format!(
            "REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {role}"
        ));
    }
    for kms in [&a, &b] {
        outage(kms, "42501");
    }
    for schema in &schemas {
        sql.execute(&format!(
            "GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {role}"
        ));
    }
    // The login refused (28000, as after a password rotation), every session of the role
    // ended: the change listeners cannot reconnect either.
    sql.execute(&format!(
        "ALTER ROLE {role} NOLOGIN; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
    ));
    for kms in [&a, &b] {
        outage(kms, "28000");
    }
    // Allowed again: writes go through, nothing was half-written.
    sql.execute(&format!("ALTER ROLE {role} LOGIN"));
    let mut rotated = None;
    for _ in 0..100 {
        match a.rotate_key(acme, &name("default")) {
            Ok(record) => {
                rotated = Some(record);
                break;
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
    assert_eq!(
        rotated.expect("rotates once allowed").primary,
        KeyVersion(2)
    );
    let dir_c = tempfile::tempdir().expect("dir");
    let fresh = node(&hsm, &role_url, &namespace, dir_c.path());
    assert_eq!(
        decrypts(&fresh, acme, &ciphertext).expect("decrypt"),
        b"before"
    );
}

/// Issue 25, finding 4 on PostgreSQL: an approval on one node racing a revocation on another
/// never leaves the grant approved after the revocation answered REVOKED.
#[test]
fn grant_decisions_racing_revocations_on_two_nodes_are_guarded() {
    let Some(f) = fixture("grantrace") else {
        return;
    };
    let (a, _a) = f.fresh_node();
    let (b, _b) = f.fresh_node();
    common::check_grant_races(&a, &b, 100);
}

/// Issue 25, finding 8: without `ca_file`, a server on another host is refused (the
/// connection would be plain text) unless `dangerous_allow_plaintext` says so; on loopback it
/// is allowed, with a warning and `keyfront_store_plaintext` set.
#[test]
fn plain_text_to_another_host_is_refused() {
    let Some(url) = common::postgres::url() else {
        return;
    };
    let config = common::initialized_token("pg-plain");
    let hsm: Arc<dyn Hsm> = Arc::new(common::open_hsm(&config));
    let dir = tempfile::tempdir().expect("dir");
    let mut options = options(
        "host=192.0.2.1 port=5432 user=keyfront dbname=keyfront",
        &common::postgres::namespace("plain"),
    );
    let refused = Kms::open(Arc::clone(&hsm), dir.path(), options.clone())
        .map(drop)
        .expect_err("plain text to another host");
    assert!(
        refused.to_string().contains("ca_file") && refused.to_string().contains("plain text"),
        "{refused}"
    );
    // On loopback (the test server): allowed, and said.
    let _kms = node(
        &hsm,
        &url,
        &common::postgres::namespace("plainlocal"),
        dir.path(),
    );
    assert!(
        keyfront::metrics::global()
            .encode()
            .contains("keyfront_store_plaintext 1"),
        "the metric says so"
    );
    // Allowed on purpose: the engine is made (the connection is tried later).
    if let keystore::Backend::Postgres(postgres) = &mut options.store.backend {
        postgres.dangerous_allow_plaintext = true;
        postgres.timeout = std::time::Duration::from_millis(300);
    }
    let attempt = Kms::open(Arc::clone(&hsm), dir.path(), options).map(drop);
    assert!(
        attempt
            .as_ref()
            .err()
            .is_none_or(|e| !e.to_string().contains("ca_file")),
        "{attempt:?}"
    );
}
