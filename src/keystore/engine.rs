//! The storage seam: where the store's databases live, and the few operations the store needs
//! of them.
//!
//! Everything that makes records trustworthy — MACs, sequences, tenant heads anchored in the
//! system database, rollback detection, commit points — is computed above this seam, in
//! `system.rs` and `tenant.rs`, and is the same for every engine. An engine only keeps ordered
//! byte maps and applies batches atomically and durably. Two engines exist:
//!
//! - [`SledEngine`]: the single-node store, one sled database per tenant under `data_dir`;
//! - `postgres::PostgresEngine`: one PostgreSQL schema per tenant and a system schema, shared by
//!   the nodes of a cluster.
//!
//! A batch can carry a [`Guard`]: the value one record must still have for the batch to apply.
//! A tenant commit guards on its head record, so two nodes committing to one tenant cannot both
//! succeed from the same head; on one node the guard always holds (commits are serialized
//! there), on PostgreSQL it is checked under a row lock in the committing transaction.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use super::Error;
use crate::ids::TenantId;

/// Raw records: (key, stored value), in key order.
pub type RawRecords = Vec<(Vec<u8>, Vec<u8>)>;

/// A place that keeps one system database and one database per tenant.
pub(crate) trait Engine: Send + Sync {
    /// The system database, created empty if there is none yet.
    fn system(&self) -> Result<Arc<dyn Database>, Error>;

    /// Creates an empty database for a new tenant; [`Error::AlreadyExists`] if one is there.
    fn create_tenant(&self, id: TenantId) -> Result<Arc<dyn Database>, Error>;

    /// Opens a tenant's existing database; `None` if there is none.
    fn open_tenant(&self, id: TenantId) -> Result<Option<Arc<dyn Database>>, Error>;

    /// Removes a tenant's database and everything in it (no error if it is gone already).
    fn remove_tenant(&self, id: TenantId) -> Result<(), Error>;

    /// Every tenant database present, referenced or not (orphan collection).
    fn tenant_databases(&self) -> Result<Vec<TenantId>, Error>;

    /// Whether the engine holds nothing at all yet (an import needs an empty target).
    fn is_empty(&self) -> Result<bool, Error>;

    /// What the engine is, for messages: a directory or a redacted server address.
    fn describe(&self) -> String;

    /// The feed of other nodes' changes; `None` when no other node writes this engine.
    fn changes(&self) -> Option<Arc<super::changes::Changes>> {
        None
    }

    /// Starts contending for the leader lease as `holder`; the lease view is kept up to
    /// date until it is dropped. On one node: held at once, forever.
    fn lead(&self, holder: String) -> Arc<super::lease::Lease> {
        let _ = holder;
        Arc::new(super::lease::Lease::always())
    }
}

/// One database: an ordered map from byte keys to byte values.
pub(crate) trait Database: Send + Sync {
    /// The value stored under `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error>;

    /// Every record whose key starts with `prefix`, in key order (`b""`: all of them).
    fn scan_prefix(&self, prefix: &[u8]) -> Result<RawRecords, Error>;

    /// Whether the database holds no record.
    fn is_empty(&self) -> Result<bool, Error>;

    /// Applies `batch` atomically and durably if `guard` holds (or there is none): when this
    /// returns `Ok(true)` the writes survive a crash. `Ok(false)`: the guard did not hold and
    /// nothing was written.
    fn apply(&self, batch: Batch, guard: Option<Guard<'_>>) -> Result<bool, Error>;
}

/// Writes to apply together.
#[derive(Default)]
pub(crate) struct Batch {
    /// (key, new value); `None` removes the key. Later entries for a key win.
    pub(crate) writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// The tenant whose state this batch changes, announced to other nodes when it commits (a
    /// tenant database's batches always announce their tenant).
    pub(crate) announce: Option<TenantId>,
}

impl Batch {
    /// Sets `key` to `value`.
    pub(crate) fn insert(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.writes.push((key.into(), Some(value.into())));
    }

    /// Removes `key`.
    pub(crate) fn remove(&mut self, key: impl Into<Vec<u8>>) {
        self.writes.push((key.into(), None));
    }
}

/// The condition of a guarded batch: the record under `key` is exactly `value`.
#[derive(Clone, Copy)]
pub(crate) struct Guard<'a> {
    /// The record's key.
    pub(crate) key: &'a [u8],
    /// Its expected stored value (`None`: absent).
    pub(crate) value: Option<&'a [u8]>,
}

/// The single-node engine: sled databases under a data directory (`system/` and
/// `tenants/<tenant-id>/`).
pub(crate) struct SledEngine {
    data_dir: PathBuf,
    tenants_dir: PathBuf,
    tenant_cache_bytes: u64,
}

impl SledEngine {
    /// The engine over `data_dir` (created if missing).
    pub(crate) fn open(data_dir: &Path, tenant_cache_bytes: u64) -> Result<Self, Error> {
        let tenants_dir = data_dir.join("tenants");
        std::fs::create_dir_all(&tenants_dir)?;
        Ok(Self {
            data_dir: data_dir.to_path_buf(),
            tenants_dir,
            tenant_cache_bytes,
        })
    }

    fn tenant_dir(&self, id: TenantId) -> PathBuf {
        self.tenants_dir.join(id.to_string())
    }

    /// sled settings for a tenant database: small segments (an idle database is ~48 KiB instead
    /// of 512 KiB) and no background flusher thread; commits flush explicitly.
    fn tenant_config(&self, dir: &Path) -> sled::Config {
        sled::Config::new()
            .path(dir)
            .segment_size(32 * 1024)
            .cache_capacity(self.tenant_cache_bytes)
            .flush_every_ms(None)
    }
}

impl Engine for SledEngine {
    fn system(&self) -> Result<Arc<dyn Database>, Error> {
        let config = sled::Config::new()
            .path(self.data_dir.join("system"))
            .flush_every_ms(None)
            .cache_capacity(16 * 1024 * 1024);
        Ok(Arc::new(SledDatabase::open(config)?))
    }

    fn create_tenant(&self, id: TenantId) -> Result<Arc<dyn Database>, Error> {
        let dir = self.tenant_dir(id);
        if dir.exists() {
            return Err(Error::AlreadyExists("tenant database directory"));
        }
        Ok(Arc::new(SledDatabase::open(self.tenant_config(&dir))?))
    }

    fn open_tenant(&self, id: TenantId) -> Result<Option<Arc<dyn Database>>, Error> {
        let dir = self.tenant_dir(id);
        if !dir.is_dir() {
            return Ok(None);
        }
        Ok(Some(Arc::new(SledDatabase::open(
            self.tenant_config(&dir),
        )?)))
    }

    fn remove_tenant(&self, id: TenantId) -> Result<(), Error> {
        match std::fs::remove_dir_all(self.tenant_dir(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn tenant_databases(&self) -> Result<Vec<TenantId>, Error> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.tenants_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            match name.to_str().and_then(|n| n.parse::<TenantId>().ok()) {
                Some(id) => ids.push(id),
                None => {
                    tracing::warn!(path = %entry.path().display(), "ignoring unknown entry in tenants/");
                }
            }
        }
        Ok(ids)
    }

    fn is_empty(&self) -> Result<bool, Error> {
        // `open` made `tenants/` already: empty means no system database and no tenant.
        for entry in std::fs::read_dir(&self.data_dir)? {
            if entry?.file_name() != "tenants" {
                return Ok(false);
            }
        }
        Ok(std::fs::read_dir(&self.tenants_dir)?.next().is_none())
    }

    fn describe(&self) -> String {
        self.data_dir.display().to_string()
    }
}

/// One sled database.
///
/// A write that fails (a full disk, an I/O error) leaves sled's memory ahead of its files, and
/// sled may refuse every later write of that instance. So the batch is taken back out of
/// memory, the instance is dropped, and the next call opens the files again and sees what is
/// durable: the store recovers without a restart once the disk takes writes again.
struct SledDatabase {
    // How to open it again after a failed write.
    config: sled::Config,
    // `None` after a failed write, until the next call opens it again.
    db: RwLock<Option<sled::Db>>,
    // Serializes guarded batches: the guard's read and the batch must not interleave with
    // another guarded batch (the store serializes commits already; this keeps the promise
    // local to the engine).
    guarded: Mutex<()>,
}

/// What became of a batch.
enum Applied {
    Done,
    GuardFailed,
    Failed(sled::Error),
}

/// Opens a sled database after removing the snapshot files that sled left unfinished.
///
/// sled 0.34 writes a snapshot as `snap.<lsn>.generating`, syncs it, then renames it to
/// `snap.<lsn>`; but when it looks for the newest snapshot it takes `.generating` files too.
/// One left by a crash or a full disk in the middle of that write (measured: an empty file
/// after ENOSPC) sorts as the newest, and every later open fails with "Read corrupted data"
/// although the log is whole. Only an unfinished write leaves such a file, so it is removed,
/// but only under sled's own lock on `db`: no other instance can be writing it then.
///
/// A database whose lock another process holds (a second keyfront on the same data directory)
/// is [`Error::Locked`], named, instead of sled's raw lock error.
fn open_sled(config: &sled::Config) -> Result<sled::Db, Error> {
    if remove_unfinished_snapshots(&config.path) == Lock::HeldElsewhere {
        // Opened elsewhere: sled's own open would fail on the same lock, with its Debug text.
        // (This process never opens one database twice: see `KeyStore::tenant`.)
        return Err(Error::Locked(config.path.display().to_string()));
    }
    Ok(config.open()?)
}

/// Whether a database's lock was free when its unfinished snapshots were looked for.
#[derive(PartialEq, Eq)]
enum Lock {
    Free,
    HeldElsewhere,
}

fn remove_unfinished_snapshots(dir: &Path) -> Lock {
    use nix::fcntl::{Flock, FlockArg};
    let Ok(db) = std::fs::File::open(dir.join("db")) else {
        // A new database, or one sled cannot open either: nothing to clean.
        return Lock::Free;
    };
    let _locked = match Flock::lock(db, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => locked,
        // Open elsewhere: its owner's snapshot may be in the making.
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Lock::HeldElsewhere,
        Err(_) => return Lock::Free,
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Lock::Free;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if name.starts_with("snap.")
            && name.ends_with(".generating")
            && std::fs::remove_file(entry.path()).is_ok()
        {
            tracing::warn!(path = %entry.path().display(), "removed an unfinished sled snapshot (a crash or a full disk while it was written)");
        }
    }
    Lock::Free
}

impl SledDatabase {
    fn open(config: sled::Config) -> Result<Self, Error> {
        let db = open_sled(&config)?;
        Ok(Self {
            config,
            db: RwLock::new(Some(db)),
            guarded: Mutex::new(()),
        })
    }

    /// Runs `f` on the open instance, opening the files again after a failed write.
    fn with<T>(&self, f: impl FnOnce(&sled::Db) -> Result<T, Error>) -> Result<T, Error> {
        {
            let db = self.db.read().expect("sled handle lock poisoned");
            if let Some(db) = db.as_ref() {
                return f(db);
            }
        }
        let mut db = self.db.write().expect("sled handle lock poisoned");
        if db.is_none() {
            // A full disk stays StorageFull; anything else is a store that cannot serve now.
            let reopened = open_sled(&self.config).map_err(|e| match e {
                Error::StorageFull => e,
                other => Error::Unavailable(format!(
                    "reopening the database after a failed write: {other}"
                )),
            })?;
            tracing::info!(path = %self.config.path.display(), "database opened again after a failed write");
            *db = Some(reopened);
        }
        match db.as_ref() {
            Some(db) => f(db),
            None => Err(Error::Unavailable("database closed".into())),
        }
    }
}

/// Whether an I/O error says the disk (or the user's quota) is full.
pub(super) fn is_disk_full(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::StorageFull
        || error.kind() == std::io::ErrorKind::QuotaExceeded
}

impl Database for SledDatabase {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.with(|db| Ok(db.get(key)?.map(|v| v.to_vec())))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<RawRecords, Error> {
        self.with(|db| {
            db.scan_prefix(prefix)
                .map(|item| {
                    let (key, value) = item?;
                    Ok((key.to_vec(), value.to_vec()))
                })
                .collect()
        })
    }

    fn is_empty(&self) -> Result<bool, Error> {
        self.with(|db| Ok(db.is_empty()))
    }

    fn apply(&self, batch: Batch, guard: Option<Guard<'_>>) -> Result<bool, Error> {
        let _guarded = self.guarded.lock().expect("sled guard lock poisoned");
        let applied = self.with(|db| {
            if let Some(guard) = guard {
                let stored = db.get(guard.key)?;
                if stored.as_deref() != guard.value {
                    return Ok(Applied::GuardFailed);
                }
            }
            let mut sled_batch = sled::Batch::default();
            // The values before the batch, to take it back out of memory if it fails.
            let mut undo = sled::Batch::default();
            let mut seen = std::collections::HashSet::new();
            for (key, value) in batch.writes {
                if seen.insert(key.clone()) {
                    match db.get(&key)? {
                        Some(old) => undo.insert(key.clone(), old),
                        None => undo.remove(key.clone()),
                    }
                }
                match value {
                    Some(value) => sled_batch.insert(key, value),
                    None => sled_batch.remove(key),
                }
            }
            match db
                .apply_batch(sled_batch)
                .and_then(|()| db.flush().map(drop))
            {
                Ok(()) => Ok(Applied::Done),
                Err(error) => {
                    // Best effort: sled may refuse it after an I/O error, and the instance is
                    // dropped below either way. Where it works, what the drop flushes is the
                    // state before the batch.
                    let _ = db.apply_batch(undo);
                    Ok(Applied::Failed(error))
                }
            }
        })?;
        match applied {
            Applied::Done => Ok(true),
            Applied::GuardFailed => Ok(false),
            Applied::Failed(error) => {
                tracing::warn!(path = %self.config.path.display(), %error, "a write failed; the database is opened again on its next use");
                *self.db.write().expect("sled handle lock poisoned") = None;
                Err(error.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unfinished_sled_snapshot_does_not_make_the_database_unreadable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = SledEngine::open(&dir.path().join("data"), 1 << 20).expect("open");
        let id = TenantId::random();
        let db = engine.create_tenant(id).expect("tenant");
        let mut batch = Batch::default();
        batch.insert(b"k".to_vec(), b"v".to_vec());
        assert!(db.apply(batch, None).expect("apply"));
        drop(db);
        // What a full disk (or a crash) leaves while sled writes a snapshot: an empty file
        // that sorts after every finished snapshot.
        let unfinished = engine
            .tenant_dir(id)
            .join("snap.FFFFFFFFFFFFFFFF.generating");
        std::fs::write(&unfinished, b"").expect("write");
        let db = engine
            .open_tenant(id)
            .expect("opens despite the unfinished snapshot")
            .expect("exists");
        assert_eq!(db.get(b"k").expect("get").as_deref(), Some(&b"v"[..]));
        assert!(!unfinished.exists());
        // While the database is open, another opener leaves its files alone.
        std::fs::write(&unfinished, b"").expect("write");
        assert!(engine.open_tenant(id).is_err(), "sled's lock holds");
        assert!(unfinished.exists());
    }

    #[test]
    fn a_new_sled_engine_is_empty_until_something_is_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = SledEngine::open(&dir.path().join("data"), 1 << 20).expect("open");
        assert!(engine.is_empty().expect("is_empty"));
        engine.create_tenant(TenantId::random()).expect("tenant");
        assert!(!engine.is_empty().expect("is_empty"));

        let other = SledEngine::open(&dir.path().join("other"), 1 << 20).expect("open");
        drop(other.system().expect("system"));
        assert!(!other.is_empty().expect("is_empty"));
    }
}
