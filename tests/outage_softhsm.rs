//! HSM outage with a real SoftHSM made unreachable (its token directory moved away) under a
//! real `keyfront` process: loss while serving, recovery without restart, and a start while the
//! HSM is down. The fault-injecting variants are in tests/grpc/outage.rs.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::dev_server::{BIN, DevServer, channel, text, wait_for_health};
use keyfront::service::pb;
use keyfront::service::pb::key_service_client::KeyServiceClient;
use tonic::Code;

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

/// Moves the token directory away (leaving an empty one), as if the HSM vanished.
fn unplug(dir: &Path) {
    let tokens = dir.join("hsm/tokens");
    std::fs::rename(&tokens, dir.join("hsm/tokens.away")).expect("move tokens away");
    std::fs::create_dir(&tokens).expect("empty token dir");
}

fn plug_back(dir: &Path) {
    let tokens = dir.join("hsm/tokens");
    std::fs::remove_dir_all(&tokens).expect("remove empty dir");
    std::fs::rename(dir.join("hsm/tokens.away"), &tokens).expect("restore tokens");
}

async fn data_key(dir: &Path, port: u16) -> Result<Vec<u8>, tonic::Status> {
    KeyServiceClient::new(channel(dir, port, "acme-backup").await)
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "default".into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().wrapped_key)
}

async fn decrypt_data_key(dir: &Path, port: u16, wrapped: &[u8]) -> Result<(), tonic::Status> {
    KeyServiceClient::new(channel(dir, port, "acme-backup").await)
        .decrypt_data_key(pb::DecryptDataKeyRequest {
            wrapped_key: wrapped.to_vec(),
            ..Default::default()
        })
        .await
        .map(drop)
}

#[test]
fn a_real_softhsm_lost_while_serving_and_at_start_recovers_without_restart() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let server = DevServer::start();
    let (dir, port) = (server.dir.path().to_path_buf(), server.port);
    let warm = server.pipe(b"warm", "encrypt", &["--key", "default"]);
    assert!(warm.status.success());
    let wrapped = runtime.block_on(data_key(&dir, port)).expect("data key");

    // Lost while serving.
    unplug(&dir);
    runtime.block_on(wait_for_health(&dir, port, NOT_SERVING));
    let during = server.pipe(b"during the outage", "encrypt", &["--key", "default"]);
    assert!(
        during.status.success(),
        "Encrypt is served from the cached bulk key: {}",
        text(&during.stderr)
    );
    let back = server.pipe(&during.stdout, "decrypt", &[]);
    assert_eq!(back.stdout, b"during the outage");
    // SoftHSM keeps unwrapped KEKs (session objects) in memory, so calls on cached handles may
    // still succeed for a moment; once keyfront gives up on the broken instance they are
    // UNAVAILABLE. Never, at any point, INVALID_ARGUMENT.
    let unavailable = runtime.block_on(async {
        for _ in 0..100 {
            match decrypt_data_key(&dir, port, &wrapped).await {
                Ok(()) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                Err(status) => return status,
            }
        }
        panic!("DecryptDataKey kept succeeding with the token gone");
    });
    assert_eq!(
        unavailable.code(),
        Code::Unavailable,
        "never INVALID_ARGUMENT: {unavailable:?}"
    );
    let status = runtime
        .block_on(data_key(&dir, port))
        .expect_err("HSM needed");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let still = server.pipe(&during.stdout, "decrypt", &[]);
    assert_eq!(
        still.stdout, b"during the outage",
        "cached bulk keys keep Decrypt working"
    );

    // Back, without a restart.
    plug_back(&dir);
    runtime.block_on(wait_for_health(&dir, port, SERVING));
    runtime
        .block_on(decrypt_data_key(&dir, port, &wrapped))
        .expect("recovered");
    let (dir_guard, logs, status) = server.stop();
    assert_eq!(status, 0, "{logs}");
    assert!(logs.contains("HSM recovered"), "{logs}");

    // Started while the HSM is unreachable: NOT_SERVING, then SERVING when it returns.
    let dir = dir_guard.path();
    unplug(dir);
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(dir.join("keyfront.toml"))
        .env("SOFTHSM2_CONF", dir.join("hsm/softhsm2.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve");
    let config = std::fs::read_to_string(dir.join("keyfront.toml")).expect("config");
    let port: u16 = config
        .lines()
        .find_map(|l| l.strip_prefix("listen = \"127.0.0.1:"))
        .and_then(|rest| rest.trim_end_matches('"').parse().ok())
        .expect("listen port in config");
    runtime.block_on(async {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        wait_for_health(dir, port, NOT_SERVING).await;
        let status = decrypt_data_key(dir, port, &wrapped)
            .await
            .expect_err("down");
        assert_eq!(status.code(), Code::Unavailable);
    });
    plug_back(dir);
    runtime.block_on(async {
        wait_for_health(dir, port, SERVING).await;
        decrypt_data_key(dir, port, &wrapped)
            .await
            .expect("serving after the HSM came back");
    });
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("exit");
    assert!(status.success());
    let _ = child.stderr.take();
}
