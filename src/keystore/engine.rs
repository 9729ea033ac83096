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
use std::sync::Arc;

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
        let db = sled::Config::new()
            .path(self.data_dir.join("system"))
            .flush_every_ms(None)
            .cache_capacity(16 * 1024 * 1024)
            .open()?;
        Ok(Arc::new(SledDatabase::new(db)))
    }

    fn create_tenant(&self, id: TenantId) -> Result<Arc<dyn Database>, Error> {
        let dir = self.tenant_dir(id);
        if dir.exists() {
            return Err(Error::AlreadyExists("tenant database directory"));
        }
        Ok(Arc::new(SledDatabase::new(
            self.tenant_config(&dir).open()?,
        )))
    }

    fn open_tenant(&self, id: TenantId) -> Result<Option<Arc<dyn Database>>, Error> {
        let dir = self.tenant_dir(id);
        if !dir.is_dir() {
            return Ok(None);
        }
        Ok(Some(Arc::new(SledDatabase::new(
            self.tenant_config(&dir).open()?,
        ))))
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
struct SledDatabase {
    db: sled::Db,
    // Serializes guarded batches: the guard's read and the batch must not interleave with
    // another guarded batch (the store serializes commits already; this keeps the promise
    // local to the engine).
    guarded: std::sync::Mutex<()>,
}

impl SledDatabase {
    fn new(db: sled::Db) -> Self {
        Self {
            db,
            guarded: std::sync::Mutex::new(()),
        }
    }
}

impl Database for SledDatabase {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<RawRecords, Error> {
        self.db
            .scan_prefix(prefix)
            .map(|item| {
                let (key, value) = item?;
                Ok((key.to_vec(), value.to_vec()))
            })
            .collect()
    }

    fn is_empty(&self) -> Result<bool, Error> {
        Ok(self.db.is_empty())
    }

    fn apply(&self, batch: Batch, guard: Option<Guard<'_>>) -> Result<bool, Error> {
        let _guarded = self.guarded.lock().expect("sled guard lock poisoned");
        if let Some(guard) = guard {
            let stored = self.db.get(guard.key)?;
            if stored.as_deref() != guard.value {
                return Ok(false);
            }
        }
        let mut sled_batch = sled::Batch::default();
        for (key, value) in batch.writes {
            match value {
                Some(value) => sled_batch.insert(key, value),
                None => sled_batch.remove(key),
            }
        }
        self.db.apply_batch(sled_batch)?;
        self.db.flush()?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
