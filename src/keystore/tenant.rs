//! One tenant's database: keys, versions, and the head that anchors them.
//!
//! The head (`head` record) holds the sequence of the last commit and a digest over every other
//! record's MAC. The system database keeps a copy of each tenant's head. Opening a tenant
//! database verifies every record, recomputes the digest and compares the head with the system's
//! copy, so an altered, moved, deleted or rolled-back record or database is refused.
//!
//! Commit protocol: the tenant batch (records + new head) is applied atomically and durably,
//! guarded on the head it replaces — that is the commit point — then the system's copy of the
//! head is updated. A crash between the
//! two leaves the tenant exactly one commit ahead, which the next open or commit rolls forward.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::anchors::{Anchors, TenantHead};
use super::engine::{Batch, Database, Engine, Guard, RawRecords};
use super::journal::{Journal, JournalEntry};
use super::record::{MAC_LEN, RecordMac};
use super::{
    Error, ImportParametersRecord, ImportRecord, KeyRecord, TenantWrite, VersionRecord, decode,
    encode, prefixed,
};
use crate::ids::{ID_LEN, KeyId, KeyVersion, Name, TenantId};

use super::layout::{
    HEAD_KEY, IMPORT_PARAMETERS_PREFIX, IMPORT_PREFIX, KEY_NAME_PREFIX as NAME_PREFIX, KEY_PREFIX,
    VERSION_PREFIX,
};

/// An open tenant database. Shared behind an `Arc`; closed when the last user drops it.
pub struct TenantDb {
    id: TenantId,
    db: Arc<dyn Database>,
    mac: Arc<RecordMac>,
    system: Arc<dyn Anchors>,
    journal: Option<Arc<Journal>>,
    // Whether other nodes commit to the same database (PostgreSQL): a record newer than this
    // node's head then means this view is stale, not that the database was tampered with.
    shared: bool,
    // Set when this view is found stale; the store then opens (and verifies) it again.
    stale: AtomicBool,
    // The current head; holding the lock serializes commits to this tenant.
    head: Mutex<TenantHead>,
    // Held across a read-modify-write of this tenant's records (create key, rotate).
    writes: Mutex<()>,
    // Highest sequence a reader may see. Raised before a commit's batch is applied, so readers
    // never block on a commit and never see a record "newer than the head".
    visible_seq: AtomicU64,
}

impl TenantDb {
    /// Creates a new empty database with its first head (sequence 1), durable. The caller
    /// anchors the head in the system database; until then the database is an orphan.
    pub(crate) fn create(
        engine: &dyn Engine,
        id: TenantId,
        mac: Arc<RecordMac>,
        system: Arc<dyn Anchors>,
        journal: Option<Arc<Journal>>,
        shared: bool,
    ) -> Result<Self, Error> {
        let db = engine.create_tenant(id)?;
        let head = TenantHead {
            seq: 1,
            digest: mac.digest(std::iter::empty()),
        };
        let mut batch = Batch::default();
        batch.insert(
            HEAD_KEY,
            mac.seal(id.as_bytes(), HEAD_KEY, 1, &encode(&head)?),
        );
        let guard = Guard {
            key: HEAD_KEY,
            value: None,
        };
        if !db.apply(batch, Some(guard))? {
            return Err(Error::AlreadyExists("tenant database"));
        }
        Ok(Self::new(id, db, mac, system, journal, shared, head))
    }

    /// Opens and verifies an existing database against its anchor in the system database.
    pub(crate) fn open(
        engine: &dyn Engine,
        id: TenantId,
        mac: Arc<RecordMac>,
        system: Arc<dyn Anchors>,
        journal: Option<Arc<Journal>>,
        shared: bool,
    ) -> Result<Self, Error> {
        let integrity = |reason| Error::Integrity {
            database: id.to_string(),
            reason,
        };
        let db = engine
            .open_tenant(id)?
            .ok_or(integrity("database missing"))?;
        // The anchor is read before the records: anchors only move forward, and only after
        // their tenant commit, so a head older than this anchor is a rollback, while a newer
        // one may be another node's commit made after this read.
        let anchored = system.tenant_head(id)?;
        // One read of every record: the head and the records are from the same moment even
        // while another node commits (a scan is one statement, one snapshot).
        let records = db.scan_prefix(b"")?;
        let raw_head = records
            .iter()
            .find(|(key, _)| key.as_slice() == HEAD_KEY)
            .map(|(_, value)| value)
            .ok_or(integrity("head record missing"))?;
        let head_record = mac
            .open(id.as_bytes(), HEAD_KEY, raw_head)
            .ok_or(integrity("head record fails its MAC"))?;
        let head: TenantHead = decode(head_record.payload)?;
        if head_record.seq != head.seq {
            return Err(integrity("head sequence mismatch"));
        }
        let mut macs = Vec::new();
        for (key, value) in &records {
            if key.as_slice() == HEAD_KEY {
                continue;
            }
            let record = mac
                .open(id.as_bytes(), key, value)
                .ok_or(integrity("a record fails its MAC"))?;
            if record.seq > head.seq {
                return Err(integrity("a record is newer than the head"));
            }
            macs.push((key.as_slice(), record.mac));
        }
        let digest = mac.digest(macs.iter().map(|(k, m)| (*k, m)));
        if digest != head.digest {
            return Err(integrity("records do not match the head"));
        }
        system.check_tenant_head(id, anchored, &head, shared)?;
        Ok(Self::new(id, db, mac, system, journal, shared, head))
    }

    fn new(
        id: TenantId,
        db: Arc<dyn Database>,
        mac: Arc<RecordMac>,
        system: Arc<dyn Anchors>,
        journal: Option<Arc<Journal>>,
        shared: bool,
        head: TenantHead,
    ) -> Self {
        Self {
            id,
            db,
            mac,
            system,
            journal,
            shared,
            stale: AtomicBool::new(false),
            writes: Mutex::new(()),
            visible_seq: AtomicU64::new(head.seq),
            head: Mutex::new(head),
        }
    }

    /// Whether another node committed since this view was opened (the store reopens it).
    pub(crate) fn is_stale(&self) -> bool {
        self.stale.load(Ordering::SeqCst)
    }

    /// Marks this view stale (another node announced a commit): the store opens it again.
    pub(crate) fn mark_stale(&self) {
        self.stale.store(true, Ordering::SeqCst);
    }

    fn went_stale(&self) -> Error {
        self.stale.store(true, Ordering::SeqCst);
        Error::Stale(self.id)
    }

    /// The tenant's id.
    pub fn id(&self) -> TenantId {
        self.id
    }

    /// Serializes read-modify-write sequences on this tenant (read a record, derive the next
    /// one, commit) so two rotations cannot both write the same new version.
    pub fn lock_writes(&self) -> MutexGuard<'_, ()> {
        self.writes.lock().expect("tenant write lock poisoned")
    }

    /// Every record as stored (the head included), read under the commit lock: a
    /// point-in-time copy that no commit can interleave with. Readers are not blocked.
    ///
    /// # Errors
    /// Storage errors.
    pub(crate) fn dump(&self) -> Result<(TenantHead, RawRecords), Error> {
        let head = self.head.lock().expect("tenant head lock poisoned");
        let records = self.db.scan_prefix(b"")?;
        Ok((*head, records))
    }

    /// The current head.
    pub fn head(&self) -> TenantHead {
        *self.head.lock().expect("tenant head lock poisoned")
    }

    /// The key with this name, if any.
    ///
    /// # Errors
    /// [`Error::Integrity`] if a record fails its MAC.
    pub fn key_by_name(&self, name: &Name) -> Result<Option<KeyRecord>, Error> {
        let Some(id) = self.read(&prefixed(NAME_PREFIX, name.as_str().as_bytes()))? else {
            return Ok(None);
        };
        let id: [u8; ID_LEN] = id.as_slice().try_into().map_err(|_| Error::Encoding)?;
        let key = self.key(&KeyId::from_bytes(id))?;
        if key.as_ref().is_some_and(|k| &k.name != name) {
            return Err(Error::Integrity {
                database: self.id.to_string(),
                reason: "name index points at another key",
            });
        }
        Ok(key)
    }

    /// The key with this id, if any.
    ///
    /// # Errors
    /// [`Error::Integrity`] if a record fails its MAC.
    pub fn key(&self, id: &KeyId) -> Result<Option<KeyRecord>, Error> {
        let Some(payload) = self.read(&prefixed(KEY_PREFIX, id.as_bytes()))? else {
            return Ok(None);
        };
        let record: KeyRecord = decode(&payload)?;
        if &record.id != id {
            return Err(Error::Integrity {
                database: self.id.to_string(),
                reason: "key record under another id",
            });
        }
        Ok(Some(record))
    }

    /// Every key, in id order.
    ///
    /// # Errors
    /// [`Error::Integrity`] if a record fails its MAC.
    pub fn keys(&self) -> Result<Vec<KeyRecord>, Error> {
        let mut keys = Vec::new();
        for (key, value) in self.db.scan_prefix(KEY_PREFIX)? {
            let payload = self.verify(&key, &value)?;
            keys.push(decode(payload)?);
        }
        Ok(keys)
    }

    /// One version of a key, if it exists.
    ///
    /// # Errors
    /// [`Error::Integrity`] if a record fails its MAC.
    pub fn version(
        &self,
        key: &KeyId,
        version: KeyVersion,
    ) -> Result<Option<VersionRecord>, Error> {
        let Some(payload) = self.read(&version_key(key, version))? else {
            return Ok(None);
        };
        let record: VersionRecord = decode(&payload)?;
        if record.version != version {
            return Err(Error::Integrity {
                database: self.id.to_string(),
                reason: "version record under another version",
            });
        }
        Ok(Some(record))
    }

    /// The import record of a key, if its material was ever imported.
    ///
    /// # Errors
    /// [`Error::Integrity`] if a record fails its MAC.
    pub fn import(&self, key: &KeyId) -> Result<Option<ImportRecord>, Error> {
        self.read(&prefixed(IMPORT_PREFIX, key.as_bytes()))?
            .map(|payload| decode(&payload))
            .transpose()
    }

    /// The import parameters of a key name, if any were made (expired ones included).
    ///
    /// # Errors
    /// [`Error::Integrity`] if a record fails its MAC or is filed under another name.
    pub fn import_parameters(&self, name: &Name) -> Result<Option<ImportParametersRecord>, Error> {
        let Some(payload) = self.read(&prefixed(
            IMPORT_PARAMETERS_PREFIX,
            name.as_str().as_bytes(),
        ))?
        else {
            return Ok(None);
        };
        let record: ImportParametersRecord = decode(&payload)?;
        if &record.key != name {
            return Err(Error::Integrity {
                database: self.id.to_string(),
                reason: "import parameters under another name",
            });
        }
        Ok(Some(record))
    }

    /// Applies `writes` atomically as one commit, flushed to disk before returning, then
    /// anchors the new head in the system database.
    ///
    /// # Errors
    /// Storage errors; on error before the flush nothing changed.
    pub fn commit(&self, writes: Vec<TenantWrite>) -> Result<(), Error> {
        let mut head = self.head.lock().expect("tenant head lock poisoned");
        if self.is_stale() {
            return Err(Error::Stale(self.id));
        }
        // A previous commit whose anchor update failed is rolled forward first, so the tenant
        // is never more than one commit ahead of the system database.
        match self.system.anchor_tenant(self.id, &head) {
            // The system's copy is ahead of this view: another node committed. (A rolled-back
            // database is caught when the store opens it again.)
            Err(Error::Rollback(_)) if self.shared => return Err(self.went_stale()),
            result => result?,
        }
        let seq = head.seq + 1;
        if let Some(journal) = &self.journal {
            // Before the commit point: a new version is journaled before it can be primary.
            journal.append(&JournalEntry::Commit {
                tenant: self.id,
                seq,
                writes: writes.clone(),
            })?;
        }
        let db_id = self.id.as_bytes();
        let mut staged: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for write in writes {
            match write {
                TenantWrite::Key(record) => {
                    let name_key = prefixed(NAME_PREFIX, record.name.as_str().as_bytes());
                    let value = self.mac.seal(db_id, &name_key, seq, record.id.as_bytes());
                    staged.insert(name_key, value);
                    let key = prefixed(KEY_PREFIX, record.id.as_bytes());
                    let value = self.mac.seal(db_id, &key, seq, &encode(&record)?);
                    staged.insert(key, value);
                }
                TenantWrite::Version(key_id, record) => {
                    let key = version_key(&key_id, record.version);
                    let value = self.mac.seal(db_id, &key, seq, &encode(&record)?);
                    staged.insert(key, value);
                }
                TenantWrite::Import(key_id, record) => {
                    let key = prefixed(IMPORT_PREFIX, key_id.as_bytes());
                    let value = self.mac.seal(db_id, &key, seq, &encode(&record)?);
                    staged.insert(key, value);
                }
                TenantWrite::ImportParameters(record) => {
                    let key = prefixed(IMPORT_PARAMETERS_PREFIX, record.key.as_str().as_bytes());
                    let value = self.mac.seal(db_id, &key, seq, &encode(&record)?);
                    staged.insert(key, value);
                }
            }
        }

        let mut macs: BTreeMap<Vec<u8>, [u8; MAC_LEN]> = BTreeMap::new();
        for (key, value) in self.db.scan_prefix(b"")? {
            if key != HEAD_KEY {
                let record = self.mac.open(db_id, &key, &value).ok_or(Error::Integrity {
                    database: self.id.to_string(),
                    reason: "a record fails its MAC",
                })?;
                macs.insert(key, record.mac);
            }
        }
        for (key, value) in &staged {
            let tail: [u8; MAC_LEN] = value[value.len() - MAC_LEN..]
                .try_into()
                .map_err(|_| Error::Encoding)?;
            macs.insert(key.clone(), tail);
        }
        let new_head = TenantHead {
            seq,
            digest: self.mac.digest(macs.iter().map(|(k, m)| (k.as_slice(), m))),
        };

        let mut batch = Batch::default();
        for (key, value) in staged {
            batch.insert(key, value);
        }
        batch.insert(
            HEAD_KEY,
            self.mac.seal(db_id, HEAD_KEY, seq, &encode(&new_head)?),
        );
        // The batch applies only over the head this node holds: a commit of another node in
        // between makes this one fail as stale instead of forking the tenant's history.
        let current = self.mac.seal(db_id, HEAD_KEY, head.seq, &encode(&*head)?);
        let guard = Guard {
            key: HEAD_KEY,
            value: Some(&current),
        };
        self.visible_seq.store(seq, Ordering::SeqCst);
        let applied = self.db.apply(batch, Some(guard));
        if !matches!(applied, Ok(true)) {
            self.visible_seq.store(head.seq, Ordering::SeqCst);
        }
        if applied.is_err() {
            // A failed write (a full disk): whether any of it became durable is not known
            // here, so the store reads this tenant again from disk before its next use.
            self.stale.store(true, Ordering::SeqCst);
        }
        if !applied? {
            return Err(if self.shared {
                self.went_stale()
            } else {
                Error::Integrity {
                    database: self.id.to_string(),
                    reason: "head record changed under the store",
                }
            });
        }
        *head = new_head;
        if let Err(error) = self.system.advance_tenant_head(self.id, &new_head) {
            // Committed already; the anchor catches up on the next commit or open.
            tracing::warn!(tenant = %self.id, %error, "tenant head not yet anchored");
        }
        Ok(())
    }

    fn read(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        match self.db.get(key)? {
            Some(value) => Ok(Some(self.verify(key, &value)?.to_vec())),
            None => Ok(None),
        }
    }

    fn verify<'a>(&self, key: &[u8], value: &'a [u8]) -> Result<&'a [u8], Error> {
        let integrity = |reason| Error::Integrity {
            database: self.id.to_string(),
            reason,
        };
        let record = self
            .mac
            .open(self.id.as_bytes(), key, value)
            .ok_or(integrity("a record fails its MAC"))?;
        if record.seq > self.visible_seq.load(Ordering::SeqCst) {
            if self.shared {
                return Err(self.went_stale());
            }
            return Err(integrity("a record is newer than the head"));
        }
        Ok(record.payload)
    }
}

fn version_key(key: &KeyId, version: KeyVersion) -> Vec<u8> {
    let mut out = prefixed(VERSION_PREFIX, key.as_bytes());
    out.extend_from_slice(&version.0.to_be_bytes());
    out
}
