//! What backups need from the store: point-in-time copies of the system and tenant databases
//! taken while serving, an import of such copies into an empty data directory, and the replay
//! of the key journal on top of them.
//!
//! Copies are the stored bytes, MACs included, so a restore is verified by the same checks as
//! every open: nothing is re-sealed except the system's copies of tenant heads, which the
//! restore sets to the heads of the tenant copies (each tenant is copied after the system, so
//! it may be ahead of the system's copy of its head).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::anchors::{Anchors, TenantHead};
use super::engine::Batch;
pub use super::engine::RawRecords;
use super::journal::JournalEntry;
use super::layout::{
    APPROVAL_PREFIX, HEAD_KEY, HEAD_PREFIX, KEY_PREFIX, NAME_PREFIX, TENANT_DESTRUCTION_PREFIX,
    TENANT_PREFIX, TOMBSTONE_PREFIX, VERSION_PREFIX,
};
use super::record::RecordMac;
use super::system::{KeyStore, PendingDestruction, StoreOptions, Tombstone};
use super::tenant::TenantDb;
use super::{
    ApprovalState, Error, GrantState, KeyRecord, TenantRecord, VersionRecord, VersionState, decode,
    encode, now_secs, prefixed,
};
use crate::ids::{ID_LEN, TenantId};

/// A point-in-time copy of the system database.
pub struct SystemDump {
    /// Its records as stored.
    pub records: RawRecords,
    /// The tenants it lists.
    pub tenants: Vec<TenantRecord>,
}

/// A point-in-time copy of one tenant database, with its keys decoded for the manifest.
pub struct TenantDump {
    /// Its head.
    pub head: TenantHead,
    /// Its records as stored (the head included).
    pub records: RawRecords,
    /// Its keys and their versions, in id and version order.
    pub keys: Vec<(KeyRecord, Vec<VersionRecord>)>,
}

/// What a journal replay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplayReport {
    /// Tenant commits applied.
    pub commits: u64,
    /// Tenants created.
    pub tenants_created: u64,
    /// Tenant records updated.
    pub tenants_updated: u64,
    /// Tenants destroyed.
    pub tenants_destroyed: u64,
    /// Entries the snapshot already held.
    pub skipped: u64,
}

/// System records per batch when a restore writes them (see [`KeyStore::import`]).
const SYSTEM_IMPORT_BATCH: usize = 4096;

impl KeyStore {
    /// Copies the system database under its commit lock (no system commit interleaves).
    ///
    /// # Errors
    /// Storage and integrity errors.
    pub fn dump_system(&self) -> Result<SystemDump, Error> {
        let records = {
            let _seq = self
                .system
                .seq
                .lock()
                .expect("system sequence lock poisoned");
            self.system.db.scan_prefix(b"")?
        };
        let mut tenants = Vec::new();
        for (key, value) in &records {
            if key.starts_with(TENANT_PREFIX) {
                let record = self
                    .mac
                    .open(b"system", key, value)
                    .ok_or(Error::Integrity {
                        database: "system".into(),
                        reason: "a record fails its MAC",
                    })?;
                tenants.push(decode(record.payload)?);
            }
        }
        Ok(SystemDump { records, tenants })
    }

    /// Copies one tenant database under its commit lock; `None` if it is gone (destroyed since
    /// the system copy).
    ///
    /// # Errors
    /// Storage and integrity errors.
    pub fn dump_tenant(&self, id: TenantId) -> Result<Option<TenantDump>, Error> {
        let Some(db) = self.live_tenant(id)? else {
            return Ok(None);
        };
        let (head, records) = db.dump()?;
        let integrity = || Error::Integrity {
            database: id.to_string(),
            reason: "a record fails its MAC",
        };
        let mut keys: Vec<(KeyRecord, Vec<VersionRecord>)> = Vec::new();
        let mut versions: HashMap<Vec<u8>, Vec<VersionRecord>> = HashMap::new();
        for (key, value) in &records {
            if key.starts_with(KEY_PREFIX) {
                let record = self
                    .mac
                    .open(id.as_bytes(), key, value)
                    .ok_or_else(integrity)?;
                keys.push((decode(record.payload)?, Vec::new()));
            } else if key.starts_with(VERSION_PREFIX) {
                let record = self
                    .mac
                    .open(id.as_bytes(), key, value)
                    .ok_or_else(integrity)?;
                let key_id = key
                    .get(VERSION_PREFIX.len()..VERSION_PREFIX.len() + ID_LEN)
                    .ok_or(Error::Encoding)?;
                versions
                    .entry(key_id.to_vec())
                    .or_default()
                    .push(decode(record.payload)?);
            }
        }
        for (record, list) in &mut keys {
            *list = versions
                .remove(record.id.as_bytes().as_slice())
                .unwrap_or_default();
            list.sort_by_key(|v| v.version);
        }
        Ok(Some(TenantDump {
            head,
            records,
            keys,
        }))
    }

    /// Writes copies into the empty store that `data_dir` and `options` name (a data
    /// directory, or a PostgreSQL database) and opens the store on them, with each tenant's
    /// head anchored as its copy has it. Every record is verified when its database is opened.
    ///
    /// # Errors
    /// [`Error::AlreadyExists`] if the target holds anything; storage and integrity errors.
    pub fn import<E: From<Error>>(
        data_dir: &Path,
        mac: RecordMac,
        options: StoreOptions,
        system: &RawRecords,
        tenants: impl IntoIterator<Item = Result<(TenantId, RawRecords), E>>,
    ) -> Result<Self, E> {
        let (engine, shared) = super::open_engine(data_dir, &options)?;
        if !engine.is_empty()? {
            return Err(Error::AlreadyExists(
                "data directory or database (a restore needs an empty one)",
            )
            .into());
        }
        // In batches of a bounded size: one sled batch of every system record (four per
        // tenant) made the whole restore's heap peak, 1.7 GiB at 100,000 tenants, while sled
        // applied it. Nothing needs them to land at once: the target was empty, and a restore
        // that fails is removed as a whole.
        {
            // Closed before the store opens it again (sled locks its files).
            let system_db = engine.system()?;
            for chunk in system.chunks(SYSTEM_IMPORT_BATCH) {
                let mut batch = Batch::default();
                for (key, value) in chunk {
                    batch.insert(key.as_slice(), value.as_slice());
                }
                system_db.apply(batch, None)?;
            }
        }
        let mut heads = Vec::new();
        // One tenant at a time: a restore streams them from the archive.
        for tenant in tenants {
            let (id, records) = tenant?;
            let db = engine.create_tenant(id)?;
            let mut batch = Batch::default();
            let mut head = None;
            for (key, value) in &records {
                if key.as_slice() == HEAD_KEY {
                    let record = mac
                        .open(id.as_bytes(), key, value)
                        .ok_or(Error::Integrity {
                            database: id.to_string(),
                            reason: "head record fails its MAC",
                        })?;
                    head = Some(decode::<TenantHead>(record.payload)?);
                }
                batch.insert(key.as_slice(), value.as_slice());
            }
            db.apply(batch, None)?;
            heads.push((
                id,
                head.ok_or(Error::Integrity {
                    database: id.to_string(),
                    reason: "head record missing",
                })?,
            ));
        }
        let store = Self::open_engine(engine, shared, mac, options)?;
        for (id, head) in heads {
            store.system.set_tenant_head(id, &head)?;
        }
        Ok(store)
    }

    /// Applies journal entries the snapshot does not hold, in order: tenant commits beyond
    /// each tenant's head (the last entry of a sequence wins: an earlier one's commit failed),
    /// tenant creations, updates and destructions. Destroyed tenants stay destroyed.
    ///
    /// # Errors
    /// [`Error::Integrity`] if the journal misses commits the snapshot does not hold (it
    /// starts after the snapshot); storage errors.
    pub fn replay(&self, entries: &[(u64, JournalEntry)]) -> Result<ReplayReport, Error> {
        let mut last_of: HashMap<(TenantId, u64), usize> = HashMap::new();
        for (i, (_, entry)) in entries.iter().enumerate() {
            if let JournalEntry::Commit { tenant, seq, .. } = entry {
                last_of.insert((*tenant, *seq), i);
            }
        }
        let mut report = ReplayReport::default();
        for (i, (_, entry)) in entries.iter().enumerate() {
            match entry {
                JournalEntry::TenantCreated(record) => {
                    if self.is_destroyed(record.id)? || self.tenant_record(record.id)?.is_some() {
                        report.skipped += 1;
                    } else {
                        self.recreate_tenant(record)?;
                        report.tenants_created += 1;
                    }
                }
                JournalEntry::TenantUpdated(record) => match self.tenant_record(record.id)? {
                    Some(current) if current.generation < record.generation => {
                        let key = prefixed(TENANT_DESTRUCTION_PREFIX, record.id.as_bytes());
                        let (inserts, removes) = match record.destroy_at {
                            Some(at) => (vec![(key, encode(&at)?)], vec![]),
                            None => (vec![], vec![key]),
                        };
                        let mut inserts = inserts;
                        inserts.push((
                            prefixed(TENANT_PREFIX, record.id.as_bytes()),
                            encode(record)?,
                        ));
                        self.system.commit(inserts, removes)?;
                        report.tenants_updated += 1;
                    }
                    _ => report.skipped += 1,
                },
                JournalEntry::TenantDestroyed { id, name, at } => {
                    if self.tenant_record(*id)?.is_some() {
                        self.destroy_tenant(*id)?;
                        report.tenants_destroyed += 1;
                    } else if !self.is_destroyed(*id)? {
                        // Never seen here, but destroyed: keep its tombstone all the same.
                        let tombstone = Tombstone {
                            name: name.clone(),
                            destroyed_at: *at,
                        };
                        self.system.commit(
                            vec![(
                                prefixed(TOMBSTONE_PREFIX, id.as_bytes()),
                                encode(&tombstone)?,
                            )],
                            vec![],
                        )?;
                        report.tenants_destroyed += 1;
                    } else {
                        report.skipped += 1;
                    }
                }
                JournalEntry::Commit {
                    tenant,
                    seq,
                    writes,
                } => {
                    if last_of.get(&(*tenant, *seq)) != Some(&i) {
                        report.skipped += 1;
                        continue;
                    }
                    let Some(db) = self.live_tenant(*tenant)? else {
                        report.skipped += 1;
                        continue;
                    };
                    let head = db.head().seq;
                    if *seq <= head {
                        report.skipped += 1;
                        continue;
                    }
                    if *seq != head + 1 {
                        return Err(Error::Integrity {
                            database: tenant.to_string(),
                            reason: "the journal misses commits after the snapshot (it starts later than the snapshot)",
                        });
                    }
                    db.commit(writes.clone())?;
                    report.commits += 1;
                }
            }
        }
        Ok(report)
    }

    /// A tenant created after the snapshot, re-created with its id and an empty database.
    fn recreate_tenant(&self, record: &TenantRecord) -> Result<(), Error> {
        let _lifecycle = self.lifecycle.lock().expect("lifecycle lock poisoned");
        let name_key = prefixed(NAME_PREFIX, record.name.as_str().as_bytes());
        if self.system.read(&name_key)?.is_some() {
            return Err(Error::Integrity {
                database: "system".into(),
                reason: "the journal creates a tenant whose name another tenant holds",
            });
        }
        let tenant = TenantDb::create(
            self.engine.as_ref(),
            record.id,
            Arc::clone(&self.mac),
            Arc::clone(&self.system) as Arc<dyn Anchors>,
            None,
            self.shared,
        )?;
        self.system.commit(
            vec![
                (
                    prefixed(TENANT_PREFIX, record.id.as_bytes()),
                    encode(record)?,
                ),
                (name_key, record.id.as_bytes().to_vec()),
                (
                    prefixed(HEAD_PREFIX, record.id.as_bytes()),
                    encode(&tenant.head())?,
                ),
            ],
            vec![],
        )?;
        self.remember(Arc::new(tenant));
        Ok(())
    }

    /// After a restore: revokes every pending or approved support grant and drops every
    /// pending dual-control approval. Neither is journaled, so the snapshot may hold one that
    /// was revoked, denied or carried out after it; support asks again, officers request again.
    /// Returns (grants revoked, approvals dropped).
    ///
    /// # Errors
    /// Storage and integrity errors.
    pub fn end_grants_and_approvals(&self) -> Result<(usize, usize), Error> {
        let now = now_secs();
        let mut revoked = 0;
        for mut grant in self.grants()? {
            if matches!(grant.state, GrantState::Pending | GrantState::Approved) {
                grant.state = GrantState::Revoked;
                grant.revoked_by = Some("system:restore".into());
                grant.revoked_at = Some(now);
                self.put_grant(&grant)?;
                revoked += 1;
            }
        }
        let mut dropped = 0;
        for approval in self.approvals()? {
            if approval.state == ApprovalState::Pending {
                self.system.commit(
                    vec![],
                    vec![prefixed(APPROVAL_PREFIX, approval.id.as_bytes())],
                )?;
                dropped += 1;
            }
        }
        Ok((revoked, dropped))
    }

    /// Rebuilds the scheduler's indexes from the records (after a restore): every pending
    /// version destruction, every tenant destruction, and a rotation check due now for every
    /// key (the scheduler then computes the real dates). Opens, and so verifies, every tenant
    /// database. Returns the number of tenants.
    ///
    /// # Errors
    /// Storage and integrity errors.
    pub fn rebuild_indexes(&self) -> Result<usize, Error> {
        let now = now_secs();
        let tenants = self.tenants()?;
        for tenant in &tenants {
            if let Some(at) = tenant.destroy_at {
                self.system.commit(
                    vec![(
                        prefixed(TENANT_DESTRUCTION_PREFIX, tenant.id.as_bytes()),
                        encode(&at)?,
                    )],
                    vec![],
                )?;
            }
            let db = self.tenant(tenant.id)?;
            for key in db.keys()? {
                self.set_rotation_check(tenant.id, key.id, now)?;
                for v in 1..=key.latest.0 {
                    let version = crate::ids::KeyVersion(v);
                    if let Some(VersionRecord {
                        state: VersionState::DestroyScheduled { at, .. },
                        ..
                    }) = db.version(&key.id, version)?
                    {
                        self.add_pending_destruction(&PendingDestruction {
                            tenant: tenant.id,
                            key_id: key.id,
                            version,
                            at,
                        })?;
                    }
                }
            }
        }
        Ok(tenants.len())
    }
}
