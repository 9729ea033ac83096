//! A full disk under a real `keyfront dev` process: the data directory and key journal on one
//! small tmpfs, the audit log on another. Needs root to mount them; skipped with a message
//! otherwise (CI runs as root).
//!
//! - Data disk full: writes are refused with RESOURCE_EXHAUSTED (never INTERNAL), nothing
//!   acknowledged is lost, Encrypt and Decrypt with cached keys go on, and once space is freed
//!   writes succeed again without a restart. After a `kill -9` and a restart everything
//!   acknowledged is there.
//! - Audit disk full: every request is refused with UNAVAILABLE before it acts (fail closed);
//!   once space is freed requests are served again without a restart, and the log verifies.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::dev_server::{BIN, DevServer, text, try_channel};
use keyfront::service::pb;
use keyfront::service::pb::admin_service_client::AdminServiceClient;
use keyfront::service::pb::key_service_client::KeyServiceClient;
use tonic::Code;

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).expect("mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem of `dir` to the last byte with `dir/filler`.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).expect("filler");
    for chunk in [1 << 20, 4096, 1] {
        let block = vec![0u8; chunk];
        while file.write_all(&block).is_ok() {}
    }
    let _ = file.sync_all();
    path
}

/// Whether the test can mount filesystems (root); says why not when it cannot.
fn can_mount() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        return true;
    }
    eprintln!("SKIPPED: the full-disk tests mount tmpfs and need root");
    false
}

/// A dev directory whose data, journal and audit log live on small tmpfs mounts.
fn prepared_dir() -> (tempfile::TempDir, Tmpfs, Tmpfs) {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Tmpfs::mount(&dir.path().join("disk"), "16m").expect("mount the data tmpfs");
    let audit = Tmpfs::mount(&dir.path().join("audit"), "2m").expect("mount the audit tmpfs");
    for (name, target) in [("data", "disk/data"), ("journal", "disk/journal")] {
        std::fs::create_dir(dir.path().join(target)).expect("dir");
        std::os::unix::fs::symlink(dir.path().join(target), dir.path().join(name))
            .expect("symlink");
    }
    (dir, disk, audit)
}

async fn create_key(server: &DevServer, name: &str) -> Result<(), tonic::Status> {
    let channel = try_channel(server.dir.path(), server.port, "officer")
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    AdminServiceClient::new(channel)
        .create_key(pb::CreateKeyRequest {
            tenant: "acme".into(),
            name: name.into(),
            purpose: pb::KeyPurpose::Data.into(),
            request_id: String::new(),
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn encrypt(server: &DevServer, plaintext: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    let channel = try_channel(server.dir.path(), server.port, "acme-app")
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    KeyServiceClient::new(channel)
        .encrypt(pb::EncryptRequest {
            key: "default".into(),
            plaintext: plaintext.to_vec(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().ciphertext)
}

async fn decrypt(server: &DevServer, ciphertext: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    let channel = try_channel(server.dir.path(), server.port, "acme-app")
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    KeyServiceClient::new(channel)
        .decrypt(pb::DecryptRequest {
            ciphertext: ciphertext.to_vec(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().plaintext)
}

async fn key_names(server: &DevServer) -> Vec<String> {
    let reply = AdminServiceClient::new(server.channel("officer").await)
        .list_keys(pb::ListKeysRequest {
            tenant: "acme".into(),
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .expect("list keys")
        .into_inner();
    reply.keys.into_iter().map(|k| k.name).collect()
}

#[test]
fn a_full_data_disk_refuses_writes_clearly_keeps_encrypting_and_recovers_without_restart() {
    if !can_mount() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (dir, disk, _audit) = prepared_dir();
    let server = DevServer::start_in(dir);
    let mut acknowledged_keys = Vec::new();
    let mut ciphertexts = Vec::new();
    runtime.block_on(async {
        create_key(&server, "before-full").await.expect("create");
        acknowledged_keys.push("before-full".to_owned());
        ciphertexts.push((
            encrypt(&server, b"before").await.expect("encrypt"),
            b"before".to_vec(),
        ));
    });

    let filler = fill(&disk.0);
    let mut refused = 0;
    runtime.block_on(async {
        for i in 0..40 {
            let name = format!("while-full-{i}");
            match create_key(&server, &name).await {
                Ok(()) => acknowledged_keys.push(name),
                Err(status) => {
                    assert_eq!(
                        status.code(),
                        Code::ResourceExhausted,
                        "a full disk is RESOURCE_EXHAUSTED: {status:?}"
                    );
                    assert!(status.message().contains("disk is full"), "{status:?}");
                    refused += 1;
                }
            }
        }
        // The data plane goes on with cached keys.
        for i in 0..20 {
            let plaintext = format!("while full {i}").into_bytes();
            let ciphertext = encrypt(&server, &plaintext)
                .await
                .expect("Encrypt with a cached key on a full disk");
            ciphertexts.push((ciphertext, plaintext));
        }
        let back = decrypt(&server, &ciphertexts[0].0)
            .await
            .expect("Decrypt on a full disk");
        assert_eq!(back, b"before");
    });
    assert!(refused > 0, "the disk never filled up");
    println!(
        "full disk: {refused} of 40 CreateKey refused with RESOURCE_EXHAUSTED, {} acknowledged (space sled had already allocated)",
        acknowledged_keys.len() - 1
    );

    // Space freed: writes work again, without a restart.
    std::fs::remove_file(filler).expect("free space");
    runtime.block_on(async {
        let mut last = None;
        for attempt in 0..50 {
            match create_key(&server, &format!("after-full-{attempt}")).await {
                Ok(()) => {
                    acknowledged_keys.push(format!("after-full-{attempt}"));
                    last = None;
                    break;
                }
                Err(status) => last = Some(status),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(last.is_none(), "writes did not come back: {last:?}");
        let names = key_names(&server).await;
        for name in &acknowledged_keys {
            assert!(names.contains(name), "acknowledged key {name} is missing");
        }
    });

    // Everything acknowledged survives a kill -9 and a restart.
    let (dir, logs) = server.kill9();
    assert!(
        !logs.contains("internal error"),
        "no request ended as INTERNAL: {logs}"
    );
    let server = DevServer::start_in(dir);
    runtime.block_on(async {
        let names = key_names(&server).await;
        for name in &acknowledged_keys {
            assert!(
                names.contains(name),
                "acknowledged key {name} lost after the restart"
            );
        }
        for (ciphertext, plaintext) in &ciphertexts {
            assert_eq!(
                &decrypt(&server, ciphertext).await.expect("decrypt"),
                plaintext
            );
        }
    });
    let (_dir, logs, status) = server.stop();
    assert_eq!(status, 0, "{logs}");
}

#[test]
fn a_full_audit_disk_fails_closed_and_recovers_without_restart() {
    if !can_mount() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (dir, _disk, audit) = prepared_dir();
    let server = DevServer::start_in(dir);
    let before = runtime
        .block_on(encrypt(&server, b"before"))
        .expect("encrypt");

    let filler = fill(&audit.0);
    runtime.block_on(async {
        // The log's last page may still take a few lines: those requests are audited and
        // served. Once a line cannot be written, nothing is.
        let mut served = 0;
        loop {
            match encrypt(&server, b"while the audit disk fills").await {
                Ok(_) => served += 1,
                Err(status) => {
                    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                    break;
                }
            }
            assert!(served < 500, "the audit disk never filled up");
        }
        println!("{served} requests were audited in the log's last page before it was full");
        for _ in 0..5 {
            let status = encrypt(&server, b"unaudited")
                .await
                .expect_err("nothing is served without its audit line");
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            let status = create_key(&server, "unaudited")
                .await
                .expect_err("no mutation without its audit line");
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        }
    });

    std::fs::remove_file(filler).expect("free space");
    runtime.block_on(async {
        // The first request after the space is back may still be refused (its own line is
        // what shows the log works again); the ones after it are served.
        let mut served = None;
        for _ in 0..50 {
            if let Ok(ciphertext) = encrypt(&server, b"after").await {
                served = Some(ciphertext);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let after = served.expect("served again once the audit disk has room");
        assert_eq!(decrypt(&server, &after).await.expect("decrypt"), b"after");
        assert_eq!(decrypt(&server, &before).await.expect("decrypt"), b"before");
        assert!(
            !key_names(&server).await.contains(&"unaudited".to_owned()),
            "a refused CreateKey did nothing"
        );
    });
    let (dir, logs, status) = server.stop();
    assert_eq!(status, 0, "{logs}");
    let out = Command::new(BIN)
        .args(["audit", "verify", "--public-key"])
        .arg(format!(
            "@{}",
            dir.path().join("audit-public-key.hex").display()
        ))
        .arg(dir.path().join("audit/audit.log"))
        .output()
        .expect("audit verify");
    assert!(
        out.status.success(),
        "the audit log verifies after the full disk: {}",
        text(&out.stdout)
    );
}
