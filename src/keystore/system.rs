//! The system database and the [`KeyStore`] that owns it and the tenant databases.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Serialize};

use super::anchors::{Anchors, TenantHead};
use super::engine::{Batch, Database, Engine};
use super::journal::{Journal, JournalEntry};
use super::layout::{
    AUDIT_HEAD_KEY, DESTRUCTION_PREFIX, HEAD_PREFIX, LAYOUT_KEY, LAYOUT1_REQUEST_PREFIX, META_KEY,
    MWK_RETIRED_PREFIX, NAME_PREFIX, REQUEST_PREFIX, ROTATION_PREFIX, SEQ_KEY, SYSTEM_LAYOUT,
    TENANT_DESTRUCTION_PREFIX, TENANT_PREFIX, TOMBSTONE_PREFIX,
};
use super::record::RecordMac;
use super::tenant::TenantDb;
use super::{Error, TenantRecord, decode, encode, now_secs, prefixed};
use crate::ids::{ID_LEN, KeyId, KeyVersion, Name, TenantId};

pub(super) const DB_ID: &[u8] = b"system";
/// Tuning of the key store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// How many tenant databases may be open at once (least recently used are closed).
    pub max_open_tenants: NonZeroUsize,
    /// sled page cache per tenant database, in bytes.
    pub tenant_cache_bytes: u64,
    /// Where the key journal lives (`None`: no journal).
    pub journal_dir: Option<PathBuf>,
    /// Where the authoritative store lives.
    pub backend: super::Backend,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_open_tenants: NonZeroUsize::new(16).unwrap_or(NonZeroUsize::MIN),
            tenant_cache_bytes: 256 * 1024,
            journal_dir: None,
            backend: super::Backend::Sled,
        }
    }
}

#[derive(Serialize, Deserialize)]
pub(super) struct Meta {
    schema: u16,
    created_at: u64,
}

#[derive(Serialize, Deserialize)]
pub(super) struct Tombstone {
    pub(super) name: Name,
    pub(super) destroyed_at: u64,
}

/// A key version scheduled for destruction, as the system database indexes it for the
/// scheduler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingDestruction {
    /// The tenant.
    pub tenant: TenantId,
    /// The key.
    pub key_id: KeyId,
    /// The version.
    pub version: KeyVersion,
    /// When it is due, seconds since the Unix epoch.
    pub at: u64,
}

/// Where the audit chain head of `node`'s log is kept (`audit/head/<node>`; the nodes of a
/// cluster share the system database, and each writes its own log).
pub(super) fn audit_head_key(node: &str) -> Vec<u8> {
    let mut key = AUDIT_HEAD_KEY.to_vec();
    key.push(b'/');
    key.extend_from_slice(node.as_bytes());
    key
}

pub(super) fn retired_key(generation: u32) -> Vec<u8> {
    prefixed(MWK_RETIRED_PREFIX, &generation.to_be_bytes())
}

pub(super) fn rotation_key(tenant: TenantId, key_id: KeyId) -> Vec<u8> {
    let mut key = prefixed(ROTATION_PREFIX, tenant.as_bytes());
    key.extend_from_slice(key_id.as_bytes());
    key
}

impl PendingDestruction {
    pub(super) fn record_key(&self) -> Vec<u8> {
        let mut key = prefixed(DESTRUCTION_PREFIX, self.tenant.as_bytes());
        key.extend_from_slice(self.key_id.as_bytes());
        key.extend_from_slice(&self.version.0.to_be_bytes());
        key
    }
}

/// The system database: tenants, their heads, tombstones.
pub(crate) struct SystemDb {
    pub(super) db: Arc<dyn Database>,
    pub(super) mac: Arc<RecordMac>,
    // Sequence of the last system commit; the lock serializes system commits.
    pub(super) seq: Mutex<u64>,
}

impl SystemDb {
    fn open(engine: &dyn Engine, mac: Arc<RecordMac>) -> Result<Self, Error> {
        let db = engine.system()?;
        let integrity = |reason| Error::Integrity {
            database: "system".into(),
            reason,
        };
        let seq = match db.get(META_KEY)? {
            Some(meta) => {
                if mac.open(DB_ID, META_KEY, &meta).is_none() {
                    return Err(Error::StorageKeyMismatch(engine.describe()));
                }
                let raw = db
                    .get(SEQ_KEY)?
                    .ok_or(integrity("sequence record missing"))?;
                let record = mac
                    .open(DB_ID, SEQ_KEY, &raw)
                    .ok_or(integrity("sequence record fails its MAC"))?;
                record.seq
            }
            None => {
                if !db.is_empty()? {
                    return Err(integrity("meta record missing"));
                }
                let meta = Meta {
                    schema: super::SCHEMA_VERSION,
                    created_at: now_secs(),
                };
                let mut batch = Batch::default();
                batch.insert(META_KEY, mac.seal(DB_ID, META_KEY, 1, &encode(&meta)?));
                batch.insert(
                    LAYOUT_KEY,
                    mac.seal(DB_ID, LAYOUT_KEY, 1, &encode(&SYSTEM_LAYOUT)?),
                );
                batch.insert(SEQ_KEY, mac.seal(DB_ID, SEQ_KEY, 1, &[]));
                // Guarded on the meta record's absence: of two nodes starting on an empty
                // database, one creates it and the other reads it back.
                let guard = super::engine::Guard {
                    key: META_KEY,
                    value: None,
                };
                if !db.apply(batch, Some(guard))? {
                    return Self::open(engine, mac);
                }
                1
            }
        };
        let system = Self {
            db,
            mac,
            seq: Mutex::new(seq),
        };
        system.migrate()?;
        Ok(system)
    }

    /// Brings the stored records to this build's key layout ([`SYSTEM_LAYOUT`]) in one
    /// guarded commit: on a shared store the nodes that start together migrate once, and a
    /// node that loses the race reads the layout the winner wrote. A store written by a newer
    /// layout is refused: this build would misread it.
    fn migrate(&self) -> Result<(), Error> {
        loop {
            let raw = self.db.get(LAYOUT_KEY)?;
            let layout: u32 = match &raw {
                // Stores made before the layout was recorded follow layout 1.
                None => 1,
                Some(raw) => {
                    let record = self
                        .mac
                        .open(DB_ID, LAYOUT_KEY, raw)
                        .ok_or(Error::Integrity {
                            database: "system".into(),
                            reason: "the layout record fails its MAC",
                        })?;
                    decode(record.payload)?
                }
            };
            if layout > SYSTEM_LAYOUT {
                return Err(Error::NewerLayout {
                    found: layout,
                    known: SYSTEM_LAYOUT,
                });
            }
            if layout == SYSTEM_LAYOUT {
                return Ok(());
            }
            // Layout 1 -> 2: remembered request_ids leave `r/` (the rotation checks' prefix)
            // for `q/`. A rotation check's key is `r/` ‖ tenant id ‖ key id; a request's is
            // `r/` ‖ scope ‖ `/` ‖ 64 hex digits, always longer.
            let mut inserts = Vec::new();
            let mut removes = Vec::new();
            for (key, _) in self.db.scan_prefix(LAYOUT1_REQUEST_PREFIX)? {
                let rest = &key[LAYOUT1_REQUEST_PREFIX.len()..];
                if rest.len() == 2 * ID_LEN {
                    continue;
                }
                let payload = self.read(&key)?.ok_or(Error::Encoding)?;
                inserts.push((prefixed(REQUEST_PREFIX, rest), payload));
                removes.push(key);
            }
            let moved = inserts.len();
            inserts.push((LAYOUT_KEY.to_vec(), encode(&SYSTEM_LAYOUT)?));
            let guard = super::engine::Guard {
                key: LAYOUT_KEY,
                value: raw.as_deref(),
            };
            if self.apply(Batch::default(), inserts, removes, Some(guard))? {
                tracing::info!(
                    from = layout,
                    to = SYSTEM_LAYOUT,
                    request_ids_moved = moved,
                    "system database migrated to a new key layout"
                );
                return Ok(());
            }
        }
    }

    /// One atomic, flushed system commit.
    pub(super) fn commit(
        &self,
        inserts: Vec<(Vec<u8>, Vec<u8>)>,
        removes: Vec<Vec<u8>>,
    ) -> Result<(), Error> {
        self.commit_for(None, inserts, removes)
    }

    /// [`SystemDb::commit`] of a change to what `tenant` is (its record, its existence),
    /// announced to other nodes so they drop what they cached of it.
    pub(super) fn commit_for(
        &self,
        tenant: Option<TenantId>,
        inserts: Vec<(Vec<u8>, Vec<u8>)>,
        removes: Vec<Vec<u8>>,
    ) -> Result<(), Error> {
        let batch = Batch {
            announce: tenant,
            ..Batch::default()
        };
        self.apply(batch, inserts, removes, None).map(drop)
    }

    /// One system commit of `inserts` if `guard` holds; `Ok(false)`: it did not, nothing
    /// was written.
    pub(super) fn commit_guarded(
        &self,
        inserts: Vec<(Vec<u8>, Vec<u8>)>,
        guard: super::engine::Guard<'_>,
    ) -> Result<bool, Error> {
        self.apply(Batch::default(), inserts, Vec::new(), Some(guard))
    }

    fn apply(
        &self,
        mut batch: Batch,
        inserts: Vec<(Vec<u8>, Vec<u8>)>,
        removes: Vec<Vec<u8>>,
        guard: Option<super::engine::Guard<'_>>,
    ) -> Result<bool, Error> {
        let mut seq = self.seq.lock().expect("system sequence lock poisoned");
        let next = *seq + 1;
        for key in removes {
            batch.remove(key);
        }
        for (key, payload) in inserts {
            let value = self.mac.seal(DB_ID, &key, next, &payload);
            batch.insert(key, value);
        }
        batch.insert(SEQ_KEY, self.mac.seal(DB_ID, SEQ_KEY, next, &[]));
        let applied = self.db.apply(batch, guard)?;
        if applied {
            *seq = next;
        }
        Ok(applied)
    }

    pub(super) fn read(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let Some(value) = self.db.get(key)? else {
            return Ok(None);
        };
        let record = self.mac.open(DB_ID, key, &value).ok_or(Error::Integrity {
            database: "system".into(),
            reason: "a record fails its MAC",
        })?;
        Ok(Some(record.payload.to_vec()))
    }

    pub(crate) fn set_tenant_head(&self, id: TenantId, head: &TenantHead) -> Result<(), Error> {
        self.commit(
            vec![(prefixed(HEAD_PREFIX, id.as_bytes()), encode(head)?)],
            vec![],
        )
    }
}

impl Anchors for SystemDb {
    fn tenant_head(&self, id: TenantId) -> Result<Option<TenantHead>, Error> {
        self.read(&prefixed(HEAD_PREFIX, id.as_bytes()))?
            .map(|payload| decode(&payload))
            .transpose()
    }

    /// Moves the system's copy of a tenant's head forward to `head`, never back: nodes
    /// anchor concurrently, and a late anchor of an older commit must not overwrite a newer
    /// one (the tenant would then look rolled back). A tenant without an anchored head (it
    /// was destroyed meanwhile) stays without one.
    fn advance_tenant_head(&self, id: TenantId, head: &TenantHead) -> Result<(), Error> {
        let key = prefixed(HEAD_PREFIX, id.as_bytes());
        loop {
            let Some(raw) = self.db.get(&key)? else {
                return Ok(());
            };
            let record = self.mac.open(DB_ID, &key, &raw).ok_or(Error::Integrity {
                database: "system".into(),
                reason: "a record fails its MAC",
            })?;
            let anchored: TenantHead = decode(record.payload)?;
            if anchored.seq >= head.seq {
                return Ok(());
            }
            let guard = super::engine::Guard {
                key: &key,
                value: Some(&raw),
            };
            if self.commit_guarded(vec![(key.clone(), encode(head)?)], guard)? {
                return Ok(());
            }
        }
    }
}

/// The system database plus lazily opened, bounded tenant databases.
pub struct KeyStore {
    pub(super) engine: Arc<dyn Engine>,
    // Whether other nodes write the same databases (see `TenantDb`).
    pub(super) shared: bool,
    pub(super) system: Arc<SystemDb>,
    pub(super) mac: Arc<RecordMac>,
    pub(super) options: StoreOptions,
    open: Mutex<OpenTenants>,
    // Serializes tenant creation and destruction, so name checks cannot race.
    pub(super) lifecycle: Mutex<()>,
    // Every change is appended here before its commit point (see `journal.rs`).
    journal: Option<Arc<Journal>>,
    // Other nodes' commits, on a shared engine.
    changes: Option<Arc<super::changes::Changes>>,
    // The leader lease, once the server contends for it (see `lead`).
    leadership: std::sync::OnceLock<Arc<super::lease::Lease>>,
}

#[derive(Default)]
struct OpenTenants {
    tick: u64,
    open: HashMap<TenantId, (Arc<TenantDb>, u64)>,
    // Evicted but maybe still in use: reused rather than opened twice (sled locks its files).
    closing: HashMap<TenantId, Weak<TenantDb>>,
}

impl KeyStore {
    /// Opens (or creates) the store under `data_dir` and collects orphans of earlier crashes.
    ///
    /// # Errors
    /// [`Error::StorageKeyMismatch`] if the directory was written under another token.
    pub fn open(data_dir: &Path, mac: RecordMac, options: StoreOptions) -> Result<Self, Error> {
        let (engine, shared) = super::open_engine(data_dir, &options)?;
        Self::open_engine(engine, shared, mac, options)
    }

    /// Opens (or creates) the store on `engine`; `shared` if other nodes write it too.
    pub(super) fn open_engine(
        engine: Arc<dyn Engine>,
        shared: bool,
        mac: RecordMac,
        options: StoreOptions,
    ) -> Result<Self, Error> {
        let mac = Arc::new(mac);
        let system = Arc::new(SystemDb::open(engine.as_ref(), Arc::clone(&mac))?);
        let journal = match &options.journal_dir {
            Some(dir) => Some(Arc::new(Journal::open(dir, Arc::clone(&mac))?)),
            None => None,
        };
        let changes = engine.changes();
        let store = Self {
            engine,
            changes,
            leadership: std::sync::OnceLock::new(),
            shared,
            system,
            mac,
            options,
            open: Mutex::new(OpenTenants::default()),
            lifecycle: Mutex::new(()),
            journal,
        };
        store.collect_orphans()?;
        Ok(store)
    }

    /// Creates a tenant: its database first, then the system records (the commit point).
    ///
    /// # Errors
    /// [`Error::AlreadyExists`] if the name is taken.
    pub fn create_tenant(&self, name: &Name) -> Result<TenantRecord, Error> {
        let _lifecycle = self.lifecycle.lock().expect("lifecycle lock poisoned");
        let name_key = prefixed(NAME_PREFIX, name.as_str().as_bytes());
        if self.system.read(&name_key)?.is_some() {
            return Err(Error::AlreadyExists("tenant"));
        }
        let id = TenantId::random();
        let tenant = TenantDb::create(
            self.engine.as_ref(),
            id,
            Arc::clone(&self.mac),
            Arc::clone(&self.system) as Arc<dyn Anchors>,
            self.journal.clone(),
            self.shared,
        )?;
        let record = TenantRecord {
            id,
            name: name.clone(),
            created_at: now_secs(),
            generation: 1,
            destroy_at: None,
        };
        self.journal(&JournalEntry::TenantCreated(record.clone()))?;
        self.system.commit(
            vec![
                (prefixed(TENANT_PREFIX, id.as_bytes()), encode(&record)?),
                (name_key, id.as_bytes().to_vec()),
                (
                    prefixed(HEAD_PREFIX, id.as_bytes()),
                    encode(&tenant.head())?,
                ),
            ],
            vec![],
        )?;
        self.remember(Arc::new(tenant));
        Ok(record)
    }

    /// The tenant with this name, if any.
    ///
    /// # Errors
    /// [`Error::Integrity`] if a record fails its MAC.
    pub fn tenant_by_name(&self, name: &Name) -> Result<Option<TenantRecord>, Error> {
        let Some(id) = self
            .system
            .read(&prefixed(NAME_PREFIX, name.as_str().as_bytes()))?
        else {
            return Ok(None);
        };
        let id: [u8; ID_LEN] = id.as_slice().try_into().map_err(|_| Error::Encoding)?;
        self.tenant_record(TenantId::from_bytes(id))
    }

    /// The tenant with this id, if any.
    ///
    /// # Errors
    /// [`Error::Integrity`] if a record fails its MAC.
    pub fn tenant_record(&self, id: TenantId) -> Result<Option<TenantRecord>, Error> {
        let record: Option<TenantRecord> = self
            .system
            .read(&prefixed(TENANT_PREFIX, id.as_bytes()))?
            .map(|payload| decode(&payload))
            .transpose()?;
        if record.as_ref().is_some_and(|r| r.id != id) {
            return Err(Error::Integrity {
                database: "system".into(),
                reason: "tenant record under another id",
            });
        }
        Ok(record)
    }

    /// Every tenant.
    ///
    /// # Errors
    /// [`Error::Integrity`] if a record fails its MAC.
    pub fn tenants(&self) -> Result<Vec<TenantRecord>, Error> {
        let mut tenants = Vec::new();
        for (key, _) in self.system.db.scan_prefix(TENANT_PREFIX)? {
            let id: [u8; ID_LEN] = key[TENANT_PREFIX.len()..]
                .try_into()
                .map_err(|_| Error::Encoding)?;
            if let Some(record) = self.tenant_record(TenantId::from_bytes(id))? {
                tenants.push(record);
            }
        }
        Ok(tenants)
    }

    /// The tenant's database, opening (and verifying) it if needed.
    ///
    /// # Errors
    /// [`Error::TenantDestroyed`], [`Error::TenantNotFound`], or an integrity failure.
    pub fn tenant(&self, id: TenantId) -> Result<Arc<TenantDb>, Error> {
        let mut open = self.open.lock().expect("open tenants lock poisoned");
        open.tick += 1;
        let tick = open.tick;
        if let Some((db, last_used)) = open.open.get_mut(&id) {
            if !db.is_stale() {
                *last_used = tick;
                return Ok(Arc::clone(db));
            }
            // Another node committed: open it again (and verify it) below.
            open.open.remove(&id);
        }
        let reused = open
            .closing
            .remove(&id)
            .and_then(|weak| weak.upgrade())
            .filter(|db| !db.is_stale());
        let db = match reused {
            Some(db) => db,
            None => {
                // Close the least recently used database before opening this one, not after:
                // the allocator then reuses the memory just freed (sled allocates a ~6 MiB page
                // table per database) instead of faulting in fresh pages. Measured: p99 of an
                // open went from ~9 ms to ~0.6 ms with 32 open.
                self.evict(&mut open, 1);
                if self
                    .system
                    .read(&prefixed(TOMBSTONE_PREFIX, id.as_bytes()))?
                    .is_some()
                {
                    return Err(Error::TenantDestroyed(id));
                }
                if self.tenant_record(id)?.is_none() {
                    return Err(Error::TenantNotFound(id));
                }
                Arc::new(TenantDb::open(
                    self.engine.as_ref(),
                    id,
                    Arc::clone(&self.mac),
                    Arc::clone(&self.system) as Arc<dyn Anchors>,
                    self.journal.clone(),
                    self.shared,
                )?)
            }
        };
        open.open.insert(id, (Arc::clone(&db), tick));
        self.evict(&mut open, 0);
        crate::metrics::global().open_tenants(open.open.len());
        Ok(db)
    }

    /// The tenant's database, or `None` if the tenant was destroyed or never existed: for
    /// background jobs whose index may name a tenant that is gone.
    ///
    /// # Errors
    /// Integrity and storage errors.
    pub fn live_tenant(&self, id: TenantId) -> Result<Option<Arc<TenantDb>>, Error> {
        match self.tenant(id) {
            Ok(db) => Ok(Some(db)),
            Err(Error::TenantDestroyed(_) | Error::TenantNotFound(_)) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Contends for the leader lease as `holder` (the server does, at start; later calls
    /// return the first lease).
    pub fn lead(&self, holder: &str) -> Arc<super::lease::Lease> {
        Arc::clone(
            self.leadership
                .get_or_init(|| self.engine.lead(holder.to_owned())),
        )
    }

    /// Whether this node may run the singletons now: it holds the leader lease, or it does
    /// not contend for one (a single node; an offline command, run by an operator's choice).
    pub fn is_leader(&self) -> bool {
        self.leadership.get().is_none_or(|lease| lease.is_held())
    }

    /// The leader lease, if this node contends for it.
    pub fn leadership(&self) -> Option<&Arc<super::lease::Lease>> {
        self.leadership.get()
    }

    /// The feed of other nodes' commits; `None` on a store no other node writes.
    pub fn changes(&self) -> Option<&Arc<super::changes::Changes>> {
        self.changes.as_ref()
    }

    /// Takes the commits other nodes announced since the last call, and marks the tenant
    /// views they touched stale (each is read again, and verified, at its next use).
    pub fn take_changes(&self) -> super::changes::Pending {
        let Some(changes) = &self.changes else {
            return super::changes::Pending::default();
        };
        let pending = changes.take();
        let open = self.open.lock().expect("open tenants lock poisoned");
        for (id, (db, _)) in &open.open {
            if pending.everything || pending.tenants.contains(id) {
                db.mark_stale();
            }
        }
        for (id, weak) in &open.closing {
            if pending.everything || pending.tenants.contains(id) {
                if let Some(db) = weak.upgrade() {
                    db.mark_stale();
                }
            }
        }
        pending
    }

    /// How many tenant databases are open now.
    pub fn open_tenants(&self) -> usize {
        self.open
            .lock()
            .expect("open tenants lock poisoned")
            .open
            .len()
    }

    /// Destroys a tenant now: tombstone and removal in one system commit (the commit point),
    /// then its database is deleted. Nothing of it can be decrypted afterwards.
    ///
    /// # Errors
    /// [`Error::TenantNotFound`] if there is no such tenant.
    pub fn destroy_tenant(&self, id: TenantId) -> Result<(), Error> {
        let _lifecycle = self.lifecycle.lock().expect("lifecycle lock poisoned");
        let record = self.tenant_record(id)?.ok_or(Error::TenantNotFound(id))?;
        let tombstone = Tombstone {
            name: record.name.clone(),
            destroyed_at: now_secs(),
        };
        self.journal(&JournalEntry::TenantDestroyed {
            id,
            name: record.name.clone(),
            at: tombstone.destroyed_at,
        })?;
        self.system.commit_for(
            Some(id),
            vec![(
                prefixed(TOMBSTONE_PREFIX, id.as_bytes()),
                encode(&tombstone)?,
            )],
            vec![
                prefixed(TENANT_PREFIX, id.as_bytes()),
                prefixed(NAME_PREFIX, record.name.as_str().as_bytes()),
                prefixed(HEAD_PREFIX, id.as_bytes()),
                prefixed(TENANT_DESTRUCTION_PREFIX, id.as_bytes()),
            ],
        )?;
        {
            let mut open = self.open.lock().expect("open tenants lock poisoned");
            open.open.remove(&id);
            open.closing.remove(&id);
        }
        crate::failpoint::hit("destroy-tenant:committed");
        // The tombstone is committed; on error the orphan collector removes the rest at start.
        self.engine.remove_tenant(id)
    }

    /// Whether the tenant was destroyed.
    ///
    /// # Errors
    /// [`Error::Integrity`] if the tombstone fails its MAC.
    pub fn is_destroyed(&self, id: TenantId) -> Result<bool, Error> {
        Ok(self
            .system
            .read(&prefixed(TOMBSTONE_PREFIX, id.as_bytes()))?
            .is_some())
    }

    /// Schedules a tenant's destruction at `at`: its record and the scheduler's entry in one
    /// system commit. A tenant already scheduled keeps its date.
    ///
    /// # Errors
    /// [`Error::TenantNotFound`].
    pub fn schedule_tenant_destruction(
        &self,
        id: TenantId,
        at: u64,
    ) -> Result<TenantRecord, Error> {
        let _lifecycle = self.lifecycle.lock().expect("lifecycle lock poisoned");
        let mut record = self.tenant_record(id)?.ok_or(Error::TenantNotFound(id))?;
        if record.destroy_at.is_some() {
            return Ok(record);
        }
        record.destroy_at = Some(at);
        record.generation += 1;
        self.journal(&JournalEntry::TenantUpdated(record.clone()))?;
        self.system.commit_for(
            Some(id),
            vec![
                (prefixed(TENANT_PREFIX, id.as_bytes()), encode(&record)?),
                (
                    prefixed(TENANT_DESTRUCTION_PREFIX, id.as_bytes()),
                    encode(&at)?,
                ),
            ],
            vec![],
        )?;
        Ok(record)
    }

    /// Cancels a tenant's scheduled destruction.
    ///
    /// # Errors
    /// [`Error::TenantNotFound`], [`Error::NotScheduled`].
    pub fn cancel_tenant_destruction(&self, id: TenantId) -> Result<TenantRecord, Error> {
        let _lifecycle = self.lifecycle.lock().expect("lifecycle lock poisoned");
        let mut record = self.tenant_record(id)?.ok_or(Error::TenantNotFound(id))?;
        if record.destroy_at.is_none() {
            return Err(Error::NotScheduled(id));
        }
        record.destroy_at = None;
        record.generation += 1;
        self.journal(&JournalEntry::TenantUpdated(record.clone()))?;
        self.system.commit_for(
            Some(id),
            vec![(prefixed(TENANT_PREFIX, id.as_bytes()), encode(&record)?)],
            vec![prefixed(TENANT_DESTRUCTION_PREFIX, id.as_bytes())],
        )?;
        Ok(record)
    }

    pub(super) fn remember(&self, db: Arc<TenantDb>) {
        let mut open = self.open.lock().expect("open tenants lock poisoned");
        open.tick += 1;
        let tick = open.tick;
        self.evict(&mut open, 1);
        open.open.insert(db.id(), (db, tick));
    }

    /// Closes the least recently used databases until `room` more fit.
    fn evict(&self, open: &mut OpenTenants, room: usize) {
        while open.open.len() + room > self.options.max_open_tenants.get() {
            let Some(oldest) = open
                .open
                .iter()
                .min_by_key(|(_, (_, last_used))| *last_used)
                .map(|(id, _)| *id)
            else {
                break;
            };
            if let Some((db, _)) = open.open.remove(&oldest) {
                open.closing.insert(oldest, Arc::downgrade(&db));
            }
        }
        open.closing.retain(|_, weak| weak.strong_count() > 0);
    }

    /// Appends to the journal, if there is one (before the change's commit point).
    fn journal(&self, entry: &JournalEntry) -> Result<(), Error> {
        match &self.journal {
            Some(journal) => journal.append(entry),
            None => Ok(()),
        }
    }

    /// The key journal, if configured.
    pub fn key_journal(&self) -> Option<&Arc<Journal>> {
        self.journal.as_ref()
    }

    /// Removes tenant databases that no tenant record references: a crash between creating
    /// a tenant's database and its system commit, or between a destruction's commit and the
    /// database's removal.
    ///
    /// On a shared engine another node may be creating a tenant right now (its database
    /// exists, its system commit is still to come), so only databases of destroyed tenants
    /// are removed there; the orphans of a crashed creation stay until an operator removes
    /// them (they hold no key material: a head record only).
    fn collect_orphans(&self) -> Result<(), Error> {
        for id in self.engine.tenant_databases()? {
            let orphan = if self.shared {
                self.is_destroyed(id)?
            } else {
                self.tenant_record(id)?.is_none()
            };
            if orphan {
                tracing::info!(tenant = %id, "removing orphaned tenant database");
                self.engine.remove_tenant(id)?;
            }
        }
        Ok(())
    }
}

/// Where a kept response lives: the request_id is hashed with the identity, so neither its
/// length nor its bytes reach a key, and two callers' ids never meet.
pub(super) fn request_key(scope: &str, identity: &str, request_id: &str) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(identity.as_bytes())
        .chain_update([0])
        .chain_update(request_id.as_bytes())
        .finalize();
    let mut key = prefixed(REQUEST_PREFIX, scope.as_bytes());
    key.push(b'/');
    key.extend_from_slice(hex::encode(digest).as_bytes());
    key
}
