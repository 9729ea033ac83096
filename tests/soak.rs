//! Soak: 64 clients, each on its own TLS connection, call every KeyService RPC against a real
//! `keyfront dev` process for `KEYFRONT_SOAK_SECS` seconds (default 60; docs/TESTING.md records
//! a 10-minute run). Every call must succeed and return what it should; the server's resident
//! memory and open file descriptors, sampled from /proc, must stay flat after the warm-up.
//! Latency percentiles are printed per RPC (figures, not assertions).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dev_server::DevServer;
use hdrhistogram::Histogram;
use keyfront::service::pb;
use keyfront::service::pb::key_service_client::KeyServiceClient;
use tonic::transport::Channel;

const CLIENTS: usize = 64;
/// HashPassword and VerifyPassword run on at most `max_concurrent_password_hashes` (2) at once
/// and refuse the rest by design, so two clients do them; the others share the other RPCs.
const PASSWORD_CLIENTS: usize = 2;
/// After the warm-up, resident memory and descriptors may move by this much.
const FLAT: f64 = 0.10;

fn soak_secs() -> u64 {
    std::env::var("KEYFRONT_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
}

/// Resident memory (KiB) and open descriptors of a process.
fn sample(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .count();
    (rss, fds)
}

#[derive(Default)]
struct Results {
    latencies: BTreeMap<&'static str, Histogram<u64>>,
    errors: Vec<String>,
}

impl Results {
    fn record(&mut self, rpc: &'static str, took: Duration) {
        self.latencies
            .entry(rpc)
            .or_insert_with(|| {
                // 1 µs to 60 s; `Histogram::new` would clamp every value at its initial 2 ms.
                Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram")
            })
            .saturating_record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }
}

/// Times one call; a failure or a wrong answer is an error.
async fn timed<T>(
    results: &Mutex<Results>,
    rpc: &'static str,
    call: impl Future<Output = Result<T, String>>,
) -> Option<T> {
    let started = Instant::now();
    let outcome = call.await;
    let mut results = results.lock().expect("results");
    match outcome {
        Ok(value) => {
            results.record(rpc, started.elapsed());
            Some(value)
        }
        Err(error) => {
            if results.errors.len() < 20 {
                results.errors.push(format!("{rpc}: {error}"));
            } else {
                results.errors.push(String::new());
            }
            None
        }
    }
}

fn check(ok: bool, what: &str) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what.to_owned()) }
}

/// Encrypt, Decrypt, ReEncrypt, BatchEncrypt, BatchDecrypt, as the app.
async fn app_round(client: &mut KeyServiceClient<Channel>, results: &Mutex<Results>, n: u64) {
    let plaintext = format!("soak plaintext {n}").into_bytes();
    let context: std::collections::HashMap<String, String> =
        [("order".to_owned(), n.to_string())].into();
    let Some(ciphertext) = timed(results, "Encrypt", async {
        client
            .encrypt(pb::EncryptRequest {
                key: "default".into(),
                plaintext: plaintext.clone(),
                context: context.clone(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().ciphertext)
            .map_err(|s| format!("{s:?}"))
    })
    .await
    else {
        return;
    };
    timed(results, "Decrypt", async {
        let back = client
            .decrypt(pb::DecryptRequest {
                ciphertext: ciphertext.clone(),
                context: context.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("{s:?}"))?;
        check(back.into_inner().plaintext == plaintext, "wrong plaintext")
    })
    .await;
    timed(results, "ReEncrypt", async {
        let again = client
            .re_encrypt(pb::ReEncryptRequest {
                ciphertext: ciphertext.clone(),
                context: context.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("{s:?}"))?;
        check(
            !again.into_inner().ciphertext.is_empty(),
            "empty ciphertext",
        )
    })
    .await;
    let items: Vec<Vec<u8>> = (0..16)
        .map(|i| format!("item {n}/{i}").into_bytes())
        .collect();
    let Some(sealed) = timed(results, "BatchEncrypt", async {
        let reply = client
            .batch_encrypt(pb::BatchEncryptRequest {
                key: "default".into(),
                items: items
                    .iter()
                    .map(|p| pb::BatchEncryptItem {
                        plaintext: p.clone(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("{s:?}"))?
            .into_inner();
        let all_ok = reply
            .results
            .iter()
            .all(|r| r.status.as_ref().is_none_or(|s| s.code == 0));
        check(
            all_ok && reply.results.len() == items.len(),
            "an item failed",
        )?;
        Ok(reply
            .results
            .into_iter()
            .map(|r| r.ciphertext)
            .collect::<Vec<_>>())
    })
    .await
    else {
        return;
    };
    timed(results, "BatchDecrypt", async {
        let reply = client
            .batch_decrypt(pb::BatchDecryptRequest {
                items: sealed
                    .iter()
                    .map(|c| pb::BatchDecryptItem {
                        ciphertext: c.clone(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("{s:?}"))?
            .into_inner();
        let plaintexts: Vec<Vec<u8>> = reply.results.into_iter().map(|r| r.plaintext).collect();
        check(plaintexts == items, "wrong batch plaintexts")
    })
    .await;
}

/// GenerateDataKey, DecryptDataKey, ReEncryptDataKey, as the backup daemon.
async fn backup_round(client: &mut KeyServiceClient<Channel>, results: &Mutex<Results>) {
    let Some((wrapped, key)) = timed(results, "GenerateDataKey", async {
        client
            .generate_data_key(pb::GenerateDataKeyRequest {
                key: "default".into(),
                include_plaintext: true,
                ..Default::default()
            })
            .await
            .map(|r| {
                let r = r.into_inner();
                (r.wrapped_key, r.plaintext_key)
            })
            .map_err(|s| format!("{s:?}"))
    })
    .await
    else {
        return;
    };
    timed(results, "DecryptDataKey", async {
        let back = client
            .decrypt_data_key(pb::DecryptDataKeyRequest {
                wrapped_key: wrapped.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("{s:?}"))?;
        check(back.into_inner().plaintext_key == key, "wrong data key")
    })
    .await;
    timed(results, "ReEncryptDataKey", async {
        let again = client
            .re_encrypt_data_key(pb::ReEncryptDataKeyRequest {
                wrapped_key: wrapped.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("{s:?}"))?;
        check(
            !again.into_inner().wrapped_key.is_empty(),
            "empty wrapped key",
        )
    })
    .await;
}

/// SealSecret (with its lookup digest), UnsealSecret, LookupDigest.
async fn secrets_round(client: &mut KeyServiceClient<Channel>, results: &Mutex<Results>, n: u64) {
    let secret = format!("api-token-{n}").into_bytes();
    let Some((sealed, digest)) = timed(results, "SealSecret", async {
        client
            .seal_secret(pb::SealSecretRequest {
                key: "secrets".into(),
                secret: secret.clone(),
                include_lookup_digest: true,
                ..Default::default()
            })
            .await
            .map(|r| {
                let r = r.into_inner();
                (r.sealed, r.lookup_digest)
            })
            .map_err(|s| format!("{s:?}"))
    })
    .await
    else {
        return;
    };
    timed(results, "UnsealSecret", async {
        let back = client
            .unseal_secret(pb::UnsealSecretRequest {
                sealed: sealed.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("{s:?}"))?;
        check(back.into_inner().secret == secret, "wrong secret")
    })
    .await;
    timed(results, "LookupDigest", async {
        let again = client
            .lookup_digest(pb::LookupDigestRequest {
                secret: secret.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("{s:?}"))?;
        check(again.into_inner().lookup_digest == digest, "digest differs")
    })
    .await;
}

/// HashPassword, then VerifyPassword with the right and a wrong password.
async fn password_round(client: &mut KeyServiceClient<Channel>, results: &Mutex<Results>, n: u64) {
    let password = format!("correct horse {n}").into_bytes();
    let Some(hash) = timed(results, "HashPassword", async {
        client
            .hash_password(pb::HashPasswordRequest {
                key: "secrets".into(),
                password: password.clone(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().hash)
            .map_err(|s| format!("{s:?}"))
    })
    .await
    else {
        return;
    };
    for (attempt, expected) in [(password.clone(), true), (b"wrong".to_vec(), false)] {
        timed(results, "VerifyPassword", async {
            let reply = client
                .verify_password(pb::VerifyPasswordRequest {
                    key: "secrets".into(),
                    password: attempt,
                    hash: hash.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|s| format!("{s:?}"))?;
            check(reply.into_inner().matches == expected, "wrong verdict")
        })
        .await;
    }
}

#[test]
fn sixty_four_clients_on_every_key_rpc_with_no_error_and_flat_memory_and_descriptors() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server = DevServer::start();
    let pid = server.pid();
    let duration = Duration::from_secs(soak_secs());
    let warm_up = (duration / 5).max(Duration::from_secs(10)).min(duration);
    let stop = Arc::new(AtomicBool::new(false));
    let results = Arc::new(Mutex::new(Results::default()));
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));

    // KEYFRONT_SOAK_ONLY=app|backup|secrets: every client does that role's RPCs (to tell
    // apart where memory goes); the every-RPC assertion then does not apply.
    let only = std::env::var("KEYFRONT_SOAK_ONLY").ok();
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let principal = match (only.as_deref(), client) {
            (Some("app"), _) => "acme-app",
            (Some("backup"), _) => "acme-backup",
            (Some(_), _) => "acme-secrets",
            (None, c) if c < PASSWORD_CLIENTS => "acme-secrets",
            (None, c) if c % 3 == 0 => "acme-app",
            (None, c) if c % 3 == 1 => "acme-backup",
            (None, _) => "acme-secrets",
        };
        let channel = runtime.block_on(server.channel(principal));
        let (stop, results, calls) = (Arc::clone(&stop), Arc::clone(&results), Arc::clone(&calls));
        tasks.push(runtime.spawn(async move {
            let mut keys = KeyServiceClient::new(channel);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                match (client < PASSWORD_CLIENTS, principal) {
                    (_, "acme-app") => app_round(&mut keys, &results, n).await,
                    (_, "acme-backup") => backup_round(&mut keys, &results).await,
                    (true, _) => password_round(&mut keys, &results, n).await,
                    (false, _) => secrets_round(&mut keys, &results, n).await,
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // Samples every 2 s; only those after the warm-up count.
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < duration {
        std::thread::sleep(Duration::from_secs(2));
        samples.push((started.elapsed(), sample(pid)));
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        runtime.block_on(task).expect("client");
    }
    let elapsed = started.elapsed();

    let results = results.lock().expect("results");
    let total: u64 = results.latencies.values().map(Histogram::len).sum();
    println!(
        "{CLIENTS} clients, {elapsed:.0?}: {total} calls ({:.0}/s), {} errors",
        total as f64 / elapsed.as_secs_f64(),
        results.errors.len()
    );
    println!("| RPC | calls | p50 µs | p99 µs | max µs |");
    for (rpc, histogram) in &results.latencies {
        println!(
            "| {rpc} | {} | {} | {} | {} |",
            histogram.len(),
            histogram.value_at_quantile(0.5),
            histogram.value_at_quantile(0.99),
            histogram.max()
        );
    }
    // The series, for the record: every 30 s (time, RSS MiB, descriptors, data dir MiB).
    let series: Vec<String> = samples
        .iter()
        .filter(|(at, _)| at.as_secs() % 30 < 2)
        .map(|(at, (rss, fds))| format!("{}s {}MiB {fds}fd", at.as_secs(), rss / 1024))
        .collect();
    println!("samples: {}", series.join(", "));
    let after: Vec<(u64, usize)> = samples
        .iter()
        .filter(|(at, _)| *at >= warm_up)
        .map(|(_, s)| *s)
        .collect();
    assert!(after.len() >= 4, "too few samples after the warm-up");
    // Resident memory moves up and down as the allocator takes and returns pages, and in a
    // short run it may still be filling its heaps after the warm-up. What a leak does and a
    // plateau does not: set new levels. So the mean of the last quarter after the warm-up is
    // compared with the highest of the first half (and the mean of the first quarter is
    // printed for the record).
    let quarter = after.len() / 4;
    let first_half_peak = after[..after.len() / 2]
        .iter()
        .map(|(rss, _)| *rss as f64)
        .fold(0.0, f64::max);
    let mean = |part: &[(u64, usize)]| {
        let n = part.len() as f64;
        (
            part.iter().map(|(rss, _)| *rss as f64).sum::<f64>() / n,
            part.iter().map(|(_, fds)| *fds as f64).sum::<f64>() / n,
        )
    };
    let (first, last) = (
        mean(&after[..quarter]),
        mean(&after[after.len() - quarter..]),
    );
    let (rss_max, fds_max) = after
        .iter()
        .fold((0, 0), |(r, f), (rss, fds)| (r.max(*rss), f.max(*fds)));
    println!(
        "server RSS after the warm-up ({warm_up:?}): {:.0} MiB (mean of the first quarter), {:.0} MiB (highest of the first half), {:.0} MiB (mean of the last quarter), {} MiB at most; open fds: {:.0} / {:.0} / {fds_max}",
        first.0 / 1024.0,
        first_half_peak / 1024.0,
        last.0 / 1024.0,
        rss_max / 1024,
        first.1,
        last.1
    );
    assert!(
        results.errors.is_empty(),
        "{} errors, first: {:?}",
        results.errors.len(),
        &results.errors[..results.errors.len().min(20)]
    );
    for rpc in [
        "Encrypt",
        "Decrypt",
        "ReEncrypt",
        "BatchEncrypt",
        "BatchDecrypt",
        "GenerateDataKey",
        "DecryptDataKey",
        "ReEncryptDataKey",
        "SealSecret",
        "UnsealSecret",
        "LookupDigest",
        "HashPassword",
        "VerifyPassword",
    ] {
        assert!(
            only.is_some() || results.latencies.contains_key(rpc),
            "{rpc} was never called"
        );
    }
    assert!(
        last.0 <= first_half_peak * (1.0 + FLAT),
        "resident memory grew past {}%: {:.0} KiB at most in the first half after the warm-up, {:.0} KiB at the end",
        FLAT * 100.0,
        first_half_peak,
        last.0
    );
    assert!(
        (last.1 - first.1).abs() <= first.1 * FLAT,
        "open descriptors moved past {}%: {:.0} at first after the warm-up, {:.0} at the end",
        FLAT * 100.0,
        first.1,
        last.1
    );
    let (_, logs, status) = server.stop();
    assert_eq!(status, 0, "{logs}");
}
