//! Memory of `backup restore`: a store of N tenants (one key each) over the in-memory HSM is
//! snapshot, then restored while a thread samples the process's resident memory. The restore
//! streams the archive one section at a time, so its peak should not grow with N.
//!
//! `cargo bench --bench restore` (release build); `KEYFRONT_RESTORE_TENANTS` is a comma-
//! separated list of sizes (default 1000,4000). `cargo test --all-targets` also runs this
//! binary, without `--bench`: it then does nothing.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keyfront::hsm::Hsm;
use keyfront::hsm::memory::MemoryHsm;
use keyfront::keystore::Purpose;
use keyfront::kms::{Kms, KmsOptions};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    if !common::benchmarking() {
        println!("restore: a benchmark; run it with cargo bench --bench restore");
        return;
    }
    let sizes: Vec<usize> = std::env::var("KEYFRONT_RESTORE_TENANTS")
        .unwrap_or_else(|_| "1000,4000".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    println!(
        "| tenants | archive MiB | restore s | RSS before MiB | RSS peak during restore MiB | growth MiB |"
    );
    println!("|---|---|---|---|---|---|");
    for tenants in sizes {
        let dir = tempfile::tempdir().expect("tempdir");
        let hsm: Arc<dyn Hsm> = Arc::new(MemoryHsm::new());
        let archive = {
            let kms = Kms::open(
                Arc::clone(&hsm),
                &dir.path().join("data"),
                KmsOptions::default(),
            )
            .expect("kms");
            for i in 0..tenants {
                let tenant = kms
                    .create_tenant(&format!("t{i:06}").parse().expect("name"))
                    .expect("tenant");
                kms.create_key(tenant.id, &"default".parse().expect("name"), Purpose::Data)
                    .expect("key");
            }
            keyfront::backup::create(&kms, &dir.path().join("backups"))
                .expect("snapshot")
                .path
        };
        let size = std::fs::metadata(&archive).expect("archive").len();
        let before = rss_kib();
        let peak = Arc::new(AtomicU64::new(before));
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, done) = (Arc::clone(&peak), Arc::clone(&done));
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        let started = Instant::now();
        let restored = keyfront::backup::restore::restore(
            &hsm,
            &archive,
            None,
            &dir.path().join("restored"),
            Default::default(),
        )
        .expect("restore");
        let took = started.elapsed();
        done.store(true, Ordering::Relaxed);
        sampler.join().expect("sampler");
        assert_eq!(restored.tenants, tenants);
        let peak = peak.load(Ordering::Relaxed);
        // What the restore held before it streamed: every section's records at once.
        let key =
            keyfront::audit::chain::PublicKey::from_bytes(&hsm.audit_public_key()).expect("key");
        let holding_before = rss_kib();
        let all = keyfront::backup::verify(&archive, &key, true).expect("verify");
        let held = rss_kib().saturating_sub(holding_before);
        assert_eq!(all.tenants.len(), tenants);
        drop(all);
        println!(
            "| {tenants} | {:.1} | {:.1} | {} | {} | {} | {} |",
            size as f64 / 1048576.0,
            took.as_secs_f64(),
            before / 1024,
            peak / 1024,
            peak.saturating_sub(before) / 1024,
            held / 1024
        );
    }
}
