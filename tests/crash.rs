//! `kill -9` under load against a real `keyfront dev` process on real SoftHSM and sled files:
//! whatever the server acknowledged before the kill (ciphertexts, data keys, keys, versions)
//! is there after the restart, and the audit log verifies, or names its torn last line.
//!
//! - Under load: 16 clients doing Encrypt and GenerateDataKey and an officer doing RotateKey
//!   and CreateKey; the kill comes at a random moment. `KEYFRONT_CRASH_ROUNDS` rounds (default
//!   5; the stress run in docs/TESTING.md uses 50 on a release build).
//! - During RotateMasterKey with 200 keys, and during CreateBackup.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dev_server::{BIN, DevServer, text};
use keyfront::service::pb;
use keyfront::service::pb::admin_service_client::AdminServiceClient;
use keyfront::service::pb::key_service_client::KeyServiceClient;
use rand::Rng;
use tonic::transport::Channel;

const CLIENTS: usize = 16;

/// What the server acknowledged; all of it must survive.
#[derive(Default)]
struct Acknowledged {
    /// (ciphertext, plaintext).
    ciphertexts: Vec<(Vec<u8>, Vec<u8>)>,
    /// (wrapped key, plaintext key).
    data_keys: Vec<(Vec<u8>, Vec<u8>)>,
    /// Keys created, by name.
    keys: Vec<String>,
    /// The highest version of `default` a RotateKey returned.
    default_version: u32,
}

fn rounds() -> usize {
    std::env::var("KEYFRONT_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// Runs `keyfront audit verify` over the log; Ok(output) or Err(output).
fn audit_verify(dir: &Path) -> Result<String, String> {
    let audit = dir.join("audit");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&audit)
        .expect("audit dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit.log."))
        })
        .collect();
    files.sort();
    files.push(audit.join("audit.log"));
    // A log a crash ended, or a live one, ends in lines no checkpoint signed yet: accepted on
    // purpose here (the chain still links them; what this test checks is the chain).
    let output = std::process::Command::new(BIN)
        .args([
            "audit",
            "verify",
            "--allow-unsigned-tail",
            "1000000",
            "--public-key",
        ])
        .arg(format!("@{}", dir.join("audit-public-key.hex").display()))
        .args(&files)
        .output()
        .expect("audit verify runs");
    let said = format!("{}{}", text(&output.stdout), text(&output.stderr));
    if output.status.success() {
        Ok(said)
    } else {
        Err(said)
    }
}

/// Right after a kill the log either verifies or fails on its torn last line, named exactly:
/// the live file's last line, which has no newline. Anything else is corruption.
fn check_audit_after_kill(dir: &Path) {
    let live = dir.join("audit/audit.log");
    let bytes = std::fs::read(&live).expect("audit log");
    match audit_verify(dir) {
        Ok(_) => assert!(bytes.is_empty() || bytes.ends_with(b"\n")),
        Err(said) => {
            assert!(
                !bytes.ends_with(b"\n"),
                "a log that ends in a whole line must verify: {said}"
            );
            let torn_line = bytes.iter().filter(|&&b| b == b'\n').count() + 1;
            let named = format!("{}:{torn_line}:", live.display());
            assert!(
                said.contains(&named) && said.contains("cut off"),
                "the failure must name the torn tail {named}: {said}"
            );
        }
    }
}

async fn load(
    server_port: u16,
    dir: PathBuf,
    killed: Arc<AtomicBool>,
    round: usize,
) -> Acknowledged {
    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let (dir, killed, acked) = (dir.clone(), Arc::clone(&killed), Arc::clone(&acked));
        tasks.push(tokio::spawn(async move {
            let principal = if client % 2 == 0 {
                "acme-app"
            } else {
                "acme-backup"
            };
            let channel = common::dev_server::channel(&dir, server_port, principal).await;
            let mut keys = KeyServiceClient::new(channel);
            let mut n = 0u64;
            while !killed.load(Ordering::SeqCst) {
                n += 1;
                if client % 2 == 0 {
                    let plaintext = format!("r{round}-c{client}-n{n}").into_bytes();
                    let result = keys
                        .encrypt(pb::EncryptRequest {
                            key: "default".into(),
                            plaintext: plaintext.clone(),
                            ..Default::default()
                        })
                        .await;
                    match result {
                        Ok(reply) => acked
                            .lock()
                            .expect("lock")
                            .ciphertexts
                            .push((reply.into_inner().ciphertext, plaintext)),
                        Err(status) => {
                            assert!(killed.load(Ordering::SeqCst), "before the kill: {status:?}");
                            break;
                        }
                    }
                } else {
                    let result = keys
                        .generate_data_key(pb::GenerateDataKeyRequest {
                            key: "default".into(),
                            include_plaintext: true,
                            ..Default::default()
                        })
                        .await;
                    match result {
                        Ok(reply) => {
                            let reply = reply.into_inner();
                            acked
                                .lock()
                                .expect("lock")
                                .data_keys
                                .push((reply.wrapped_key, reply.plaintext_key));
                        }
                        Err(status) => {
                            assert!(killed.load(Ordering::SeqCst), "before the kill: {status:?}");
                            break;
                        }
                    }
                }
            }
        }));
    }
    // The officer: RotateKey on `default`, CreateKey of a new key, in turn.
    {
        let (dir, killed, acked) = (dir.clone(), Arc::clone(&killed), Arc::clone(&acked));
        tasks.push(tokio::spawn(async move {
            let channel = common::dev_server::channel(&dir, server_port, "officer").await;
            let mut admin = AdminServiceClient::new(channel);
            let mut n = 0;
            while !killed.load(Ordering::SeqCst) {
                n += 1;
                let result = if n % 2 == 0 {
                    admin
                        .rotate_key(pb::RotateKeyRequest {
                            tenant: "acme".into(),
                            name: "default".into(),
                            request_id: String::new(),
                        })
                        .await
                        .map(|reply| {
                            let mut acked = acked.lock().expect("lock");
                            let version = reply.into_inner().primary_version;
                            acked.default_version = acked.default_version.max(version);
                        })
                } else {
                    let name = format!("crash-r{round}-k{n}");
                    admin
                        .create_key(pb::CreateKeyRequest {
                            tenant: "acme".into(),
                            name: name.clone(),
                            purpose: pb::KeyPurpose::Data.into(),
                            request_id: String::new(),
                            ..Default::default()
                        })
                        .await
                        .map(|_| acked.lock().expect("lock").keys.push(name))
                };
                if let Err(status) = result {
                    assert!(killed.load(Ordering::SeqCst), "before the kill: {status:?}");
                    break;
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
    Arc::try_unwrap(acked)
        .ok()
        .expect("tasks done")
        .into_inner()
        .expect("lock")
}

/// Every acknowledged item decrypts, every key and version is there.
async fn verify_all(server: &DevServer, acked: &Acknowledged) {
    let mut app = KeyServiceClient::new(server.channel("acme-app").await);
    for chunk in acked.ciphertexts.chunks(500) {
        let reply = app
            .batch_decrypt(pb::BatchDecryptRequest {
                items: chunk
                    .iter()
                    .map(|(ciphertext, _)| pb::BatchDecryptItem {
                        ciphertext: ciphertext.clone(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .expect("BatchDecrypt")
            .into_inner();
        for (result, (_, plaintext)) in reply.results.iter().zip(chunk) {
            let code = result.status.as_ref().map_or(0, |s| s.code);
            assert_eq!(code, 0, "an acknowledged ciphertext was lost: {result:?}");
            assert_eq!(&result.plaintext, plaintext);
        }
        assert_eq!(reply.results.len(), chunk.len());
    }
    let channel = server.channel("acme-backup").await;
    let data_keys = Arc::new(acked.data_keys.clone());
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let (channel, data_keys) = (channel.clone(), Arc::clone(&data_keys));
        tasks.push(tokio::spawn(async move {
            let mut backup = KeyServiceClient::new(channel);
            for (wrapped, plaintext) in data_keys.iter().skip(worker).step_by(8) {
                let reply = backup
                    .decrypt_data_key(pb::DecryptDataKeyRequest {
                        wrapped_key: wrapped.clone(),
                        ..Default::default()
                    })
                    .await
                    .expect("an acknowledged data key was lost");
                assert_eq!(&reply.into_inner().plaintext_key, plaintext);
            }
        }));
    }
    for task in tasks {
        task.await.expect("data key check");
    }
    let mut admin = AdminServiceClient::new(server.channel("officer").await);
    let key = |name: &str| pb::GetKeyRequest {
        tenant: "acme".into(),
        name: name.into(),
    };
    let default = admin
        .get_key(key("default"))
        .await
        .expect("default")
        .into_inner();
    assert!(
        default.latest_version >= acked.default_version,
        "an acknowledged rotation was lost: v{} < v{}",
        default.latest_version,
        acked.default_version
    );
    for version in 1..=acked.default_version {
        assert!(
            default.versions.iter().any(|v| v.version == version),
            "version {version} is missing"
        );
    }
    for name in &acked.keys {
        admin
            .get_key(key(name))
            .await
            .unwrap_or_else(|s| panic!("acknowledged key {name} was lost: {s:?}"));
    }
}

#[test]
fn sigkill_under_load_loses_nothing_acknowledged() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut server = DevServer::start();
    let mut everything = Acknowledged::default();
    let mut rng = rand::rng();
    for round in 0..rounds() {
        let killed = Arc::new(AtomicBool::new(false));
        let load = runtime.spawn(load(
            server.port,
            server.dir.path().to_path_buf(),
            Arc::clone(&killed),
            round,
        ));
        // A random moment between 0.3 and 2 s into the load.
        let after = Duration::from_millis(rng.random_range(300..2000));
        std::thread::sleep(after);
        killed.store(true, Ordering::SeqCst);
        let (dir, _logs) = server.kill9();
        let acked = runtime.block_on(load).expect("load");
        check_audit_after_kill(dir.path());

        let started = Instant::now();
        server = DevServer::start_in(dir);
        let restart = started.elapsed();
        runtime.block_on(verify_all(&server, &acked));
        println!(
            "round {round}: killed after {after:?}; acknowledged {} ciphertexts, {} data keys, {} keys, default v{}; restarted in {restart:?}; all verified",
            acked.ciphertexts.len(),
            acked.data_keys.len(),
            acked.keys.len(),
            acked.default_version
        );
        assert!(
            !acked.ciphertexts.is_empty() && !acked.data_keys.is_empty(),
            "the load acknowledged nothing before the kill"
        );
        everything.ciphertexts.extend(acked.ciphertexts);
        everything.data_keys.extend(acked.data_keys);
        everything.keys.extend(acked.keys);
        everything.default_version = everything.default_version.max(acked.default_version);
        // After a restart the torn tail is cut and the whole log verifies.
        audit_verify(server.dir.path()).expect("the audit log verifies after the restart");
    }
    runtime.block_on(verify_all(&server, &everything));
    println!(
        "{} rounds: {} ciphertexts, {} data keys, {} keys, {} versions of default acknowledged; 0 lost",
        rounds(),
        everything.ciphertexts.len(),
        everything.data_keys.len(),
        everything.keys.len(),
        everything.default_version
    );
    let (_, logs, status) = server.stop();
    assert_eq!(status, 0, "{logs}");
}

/// Admin calls through the officer, as the CLI test does, but in process.
async fn officer(server: &DevServer) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(server.channel("officer").await)
}

async fn master_key_status(server: &DevServer) -> pb::MasterKeyStatus {
    officer(server)
        .await
        .get_master_key_status(pb::GetMasterKeyStatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

/// A ciphertext under a named key, and what it must decrypt to.
struct Sealed {
    key: String,
    ciphertext: Vec<u8>,
    plaintext: Vec<u8>,
}

#[test]
fn sigkill_during_master_key_rotation_over_200_keys_resumes_and_loses_nothing() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let server = DevServer::start();
    // 200 keys over acme and globex, one ciphertext under each.
    let ciphertexts = runtime.block_on(async {
        let mut admin = officer(&server).await;
        let mut out: HashMap<&str, Vec<Sealed>> = HashMap::new();
        for tenant in ["acme", "globex"] {
            let mut app = KeyServiceClient::new(server.channel(&format!("{tenant}-app")).await);
            for k in 0..100 {
                let name = format!("mwk-{k}");
                admin
                    .create_key(pb::CreateKeyRequest {
                        tenant: tenant.into(),
                        name: name.clone(),
                        purpose: pb::KeyPurpose::Data.into(),
                        request_id: String::new(),
                        ..Default::default()
                    })
                    .await
                    .expect("create key");
                let plaintext = format!("{tenant}/{name}").into_bytes();
                let ciphertext = app
                    .encrypt(pb::EncryptRequest {
                        key: name.clone(),
                        plaintext: plaintext.clone(),
                        ..Default::default()
                    })
                    .await
                    .expect("encrypt")
                    .into_inner()
                    .ciphertext;
                out.entry(tenant).or_default().push(Sealed {
                    key: name,
                    ciphertext,
                    plaintext,
                });
            }
        }
        out
    });
    let before = runtime.block_on(master_key_status(&server));

    // Start the rotation and kill the server while it runs.
    let port = server.port;
    let dir = server.dir.path().to_path_buf();
    let rotation = runtime.spawn(async move {
        let mut admin =
            AdminServiceClient::new(common::dev_server::channel(&dir, port, "officer").await);
        admin
            .rotate_master_key(pb::RotateMasterKeyRequest {
                request_id: String::new(),
            })
            .await
            .map(|r| r.into_inner())
    });
    let after = Duration::from_millis(rand::rng().random_range(50..400));
    std::thread::sleep(after);
    let (dir, _logs) = server.kill9();
    let answered = runtime.block_on(rotation).expect("join");
    check_audit_after_kill(dir.path());

    // The next start resumes (or had finished) the rotation; every key decrypts.
    let server = DevServer::start_in(dir);
    let mut status = runtime.block_on(master_key_status(&server));
    for _ in 0..300 {
        if status.current_generation == before.current_generation + 1 && status.rotating_to == 0 {
            break;
        }
        // Killed before the rotation's journal was written: nothing to resume; start it again.
        if status.current_generation == before.current_generation && status.rotating_to == 0 {
            runtime
                .block_on(async {
                    officer(&server)
                        .await
                        .rotate_master_key(pb::RotateMasterKeyRequest {
                            request_id: String::new(),
                        })
                        .await
                })
                .expect("rotate again");
        }
        std::thread::sleep(Duration::from_millis(100));
        status = runtime.block_on(master_key_status(&server));
    }
    assert_eq!(
        (status.current_generation, status.rotating_to),
        (before.current_generation + 1, 0),
        "the rotation finished after the restart: {status:?}"
    );
    println!(
        "killed {after:?} into RotateMasterKey (answered before the kill: {}); resumed to generation {}",
        answered.is_ok(),
        status.current_generation
    );
    runtime.block_on(async {
        for (tenant, items) in &ciphertexts {
            let mut app = KeyServiceClient::new(server.channel(&format!("{tenant}-app")).await);
            for Sealed {
                key: name,
                ciphertext,
                plaintext,
            } in items
            {
                let back = app
                    .decrypt(pb::DecryptRequest {
                        ciphertext: ciphertext.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|s| panic!("{tenant}/{name} after the rotation: {s:?}"));
                assert_eq!(&back.into_inner().plaintext, plaintext);
                // And new data under the key, now wrapped under the new generation.
                app.encrypt(pb::EncryptRequest {
                    key: name.clone(),
                    plaintext: b"after".to_vec(),
                    ..Default::default()
                })
                .await
                .expect("encrypt after");
            }
        }
    });
    audit_verify(server.dir.path()).expect("the audit log verifies after the restart");
    let (_, logs, code) = server.stop();
    assert_eq!(code, 0, "{logs}");
}

#[test]
fn sigkill_during_a_backup_leaves_no_archive_half_written_and_the_next_one_verifies() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let server = DevServer::start();
    // A directory inside the backup directory (CreateBackup's out_dir must be).
    let backups = server.dir.path().join("backups/under-test");
    std::fs::create_dir_all(&backups).expect("backup dir");
    // Enough tenants that a snapshot takes a while.
    let sealed = runtime.block_on(async {
        let mut admin = officer(&server).await;
        for t in 0..60 {
            admin
                .create_tenant(pb::CreateTenantRequest {
                    name: format!("t{t}"),
                    request_id: String::new(),
                })
                .await
                .expect("tenant");
        }
        let mut app = KeyServiceClient::new(server.channel("acme-app").await);
        app.encrypt(pb::EncryptRequest {
            key: "default".into(),
            plaintext: b"before the backup".to_vec(),
            ..Default::default()
        })
        .await
        .expect("encrypt")
        .into_inner()
        .ciphertext
    });
    let (port, dir, out_dir) = (
        server.port,
        server.dir.path().to_path_buf(),
        backups.display().to_string(),
    );
    let backup = runtime.spawn(async move {
        let mut admin =
            AdminServiceClient::new(common::dev_server::channel(&dir, port, "officer").await);
        admin
            .create_backup(pb::CreateBackupRequest {
                out_dir,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    });
    let after = Duration::from_millis(rand::rng().random_range(5..120));
    std::thread::sleep(after);
    let (dir, _logs) = server.kill9();
    let answered = runtime.block_on(backup).expect("join");
    check_audit_after_kill(dir.path());
    let archives = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .expect("backups")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "kfb"))
            .collect()
    };
    // Whatever is under the archive name is whole: written aside, synced, then renamed.
    let public_key = format!("@{}", dir.path().join("audit-public-key.hex").display());
    for archive in archives(&backups) {
        let out = std::process::Command::new(BIN)
            .args(["backup", "verify"])
            .arg(&archive)
            .args(["--public-key", &public_key])
            .output()
            .expect("verify");
        assert!(
            out.status.success(),
            "{}: {}",
            archive.display(),
            text(&out.stdout)
        );
    }
    println!(
        "killed {after:?} into CreateBackup (answered: {}); {} archive(s) present",
        answered.is_ok(),
        archives(&backups).len()
    );

    let server = DevServer::start_in(dir);
    let archive = runtime.block_on(async {
        officer(&server)
            .await
            .create_backup(pb::CreateBackupRequest {
                out_dir: backups.display().to_string(),
                ..Default::default()
            })
            .await
            .expect("a backup after the restart")
            .into_inner()
    });
    assert!(archive.verified, "{archive:?}");
    let leftovers: Vec<_> = std::fs::read_dir(&backups)
        .expect("backups")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "a killed backup's partial file is cleaned up: {leftovers:?}"
    );
    runtime.block_on(async {
        let mut app = KeyServiceClient::new(server.channel("acme-app").await);
        let back = app
            .decrypt(pb::DecryptRequest {
                ciphertext: sealed,
                ..Default::default()
            })
            .await
            .expect("decrypt");
        assert_eq!(back.into_inner().plaintext, b"before the backup");
    });
    let (_, logs, code) = server.stop();
    assert_eq!(code, 0, "{logs}");
}

#[test]
fn a_request_id_is_remembered_across_a_sigkill() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let server = DevServer::start();
    let rotate = |server: &DevServer, id: &str| {
        let id = id.to_owned();
        runtime.block_on(async {
            officer(server)
                .await
                .rotate_key(pb::RotateKeyRequest {
                    tenant: "acme".into(),
                    name: "default".into(),
                    request_id: id,
                })
                .await
                .map(|r| r.into_inner().primary_version)
        })
    };
    let first = rotate(&server, "rotate-once").expect("rotate");
    assert_eq!(rotate(&server, "rotate-once").expect("retry"), first);
    let (dir, _) = server.kill9();
    let server = DevServer::start_in(dir);
    assert_eq!(
        rotate(&server, "rotate-once").expect("retry after the restart"),
        first,
        "the retry after a restart returns the first answer instead of rotating again"
    );
    let again = rotate(&server, "rotate-twice").expect("a new id rotates");
    assert_eq!(again, first + 1);
    // The same id for another RPC is refused.
    let reused = runtime.block_on(async {
        officer(&server)
            .await
            .create_key(pb::CreateKeyRequest {
                tenant: "acme".into(),
                name: "other".into(),
                purpose: pb::KeyPurpose::Data.into(),
                request_id: "rotate-once".into(),
                ..Default::default()
            })
            .await
    });
    let status = reused.expect_err("reused id");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    // Another tenant's scope does not see it: the same id there is a first call.
    let globex = runtime.block_on(async {
        officer(&server)
            .await
            .rotate_key(pb::RotateKeyRequest {
                tenant: "globex".into(),
                name: "default".into(),
                request_id: "rotate-once".into(),
            })
            .await
            .map(|r| r.into_inner().primary_version)
    });
    assert_eq!(globex.expect("globex rotates"), 2);
    let (_, logs, code) = server.stop();
    assert_eq!(code, 0, "{logs}");
}
