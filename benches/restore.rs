//! Memory of `backup restore`: a store of N tenants (one key each) over the in-memory HSM is
//! snapshot, then restored. A counting allocator gives the peak of live heap bytes during the
//! restore (resident memory is the allocator's business: it keeps freed pages, so RSS does
//! not show what a phase needs). The restore streams the archive one section at a time, so its
//! peak should not grow with N; for comparison, the bench also measures what holding every
//! record at once takes (the restore before streaming).
//!
//! `cargo bench --bench restore` (release build); `KEYFRONT_RESTORE_TENANTS` is a comma-
//! separated list of sizes (default 1000,4000). `cargo test --all-targets` also runs this
//! binary, without `--bench`: it then does nothing.

mod common;

use std::alloc::System;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cap::Cap;

use keyfront::hsm::Hsm;
use keyfront::hsm::memory::MemoryHsm;
use keyfront::keystore::Purpose;
use keyfront::kms::{Kms, KmsOptions};

// The system allocator, counting live bytes (no limit set).
#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// The highest live heap while `f` runs, above what was live when it began (sampled every
/// millisecond: a spike shorter than that is missed, a held structure is not).
fn heap_peak<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATOR.allocated();
    let peak = Arc::new(AtomicUsize::new(before));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (Arc::clone(&peak), Arc::clone(&done));
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(ALLOCATOR.allocated(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let out = f();
    peak.fetch_max(ALLOCATOR.allocated(), Ordering::Relaxed);
    if std::env::var_os("KEYFRONT_RESTORE_DEBUG").is_some() {
        eprintln!(
            "retained after the phase: {:.1} MiB",
            ALLOCATOR.allocated().saturating_sub(before) as f64 / 1_048_576.0
        );
    }
    done.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    (out, peak.load(Ordering::Relaxed).saturating_sub(before))
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / 1_048_576.0
}

fn du(path: &std::path::Path) -> u64 {
    walk(path).map(|m| m.len()).sum()
}

fn walk(path: &std::path::Path) -> Box<dyn Iterator<Item = std::fs::Metadata>> {
    let Ok(entries) = std::fs::read_dir(path) else {
        return Box::new(std::iter::empty());
    };
    Box::new(entries.flatten().flat_map(|entry| {
        let path = entry.path();
        match entry.metadata() {
            Ok(m) if m.is_dir() => walk(&path),
            Ok(m) => Box::new(std::iter::once(m)),
            Err(_) => Box::new(std::iter::empty()),
        }
    }))
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
        "| tenants | archive MiB | restore s | restored store on disk MiB | heap peak of the streaming restore MiB | heap peak holding every record (the old restore) MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
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
        let started = Instant::now();
        let (restored, streaming_peak) = heap_peak(|| {
            keyfront::backup::restore::restore(
                &hsm,
                &archive,
                None,
                &dir.path().join("restored"),
                Default::default(),
            )
            .expect("restore")
        });
        let took = started.elapsed();
        assert_eq!(restored.tenants, tenants);
        let on_disk = du(&dir.path().join("restored"));
        // What the restore held before it streamed: every section's records at once.
        let key =
            keyfront::audit::chain::PublicKey::from_bytes(&hsm.audit_public_key()).expect("key");
        let (all, holding_peak) =
            heap_peak(|| keyfront::backup::verify(&archive, &key, true).expect("verify"));
        assert_eq!(all.tenants.len(), tenants);
        drop(all);
        println!(
            "| {tenants} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1} |",
            size as f64 / 1_048_576.0,
            took.as_secs_f64(),
            on_disk as f64 / 1_048_576.0,
            mib(streaming_peak),
            mib(holding_peak),
        )
    }
}
