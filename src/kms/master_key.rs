//! RotateMasterKey: a new MWK generation, and every KEK blob re-wrapped under it inside the HSM
//! through a persisted journal, so a crash resumes where it stopped.
//!
//! Steps and commit points:
//! 1. The journal (`MwkRotation { to, cursor: None }`) is written to the system database.
//! 2. The HSM creates generation `to` if it does not have it yet (a crash before the journal
//!    is written leaves nothing; one after leaves a journal that step 2 completes).
//! 3. Tenant by tenant, in id order: every KEK blob not under `to` is re-wrapped in the HSM,
//!    and all of the tenant's re-wrapped versions are committed at once. Then the journal's
//!    cursor moves past the tenant. Re-doing a tenant is harmless: blobs already under `to`
//!    are skipped.
//! 4. One system commit removes the journal and records each older generation as retired,
//!    with the date it will be destroyed: the backup retention plus a margin, so every kept
//!    backup can still be restored. Until then the retired MWK only unwraps (keyfront never
//!    wraps under it; the HSM cannot enforce it, as the MWK is not modifiable).
//! 5. The scheduler destroys retired generations whose date has passed.
//!
//! Resumed at server start when a journal is found.

use std::time::Duration;

use super::Error;
use super::Kms;
use crate::hsm::{MwkGeneration, WrappedKek};
use crate::ids::{KeyVersion, TenantId};
use crate::keystore::{self, MwkRotation, TenantWrite};

/// Kept beyond the backup retention before a retired MWK is destroyed.
pub const RETIRED_MWK_MARGIN: Duration = Duration::from_secs(7 * 86_400);

/// Where the master key stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasterKeyStatus {
    /// The generation new KEKs are wrapped under.
    pub current: MwkGeneration,
    /// The rotation in progress, if any.
    pub rotation: Option<MwkRotation>,
    /// Every generation on the token, with the destruction date of retired ones.
    pub generations: Vec<(MwkGeneration, Option<u64>)>,
}

impl Kms {
    /// Starts a master key rotation (or continues the one in progress) and runs it to the end.
    ///
    /// # Errors
    /// HSM and storage errors; the journal stays, and the next call or start resumes it.
    pub fn rotate_master_key(&self) -> Result<MasterKeyStatus, Error> {
        // One node at a time re-wraps every KEK (a cluster's singleton).
        if !self.store.is_leader() {
            return Err(Error::NotLeader);
        }
        if self.store.mwk_rotation()?.is_none() {
            let rotation = MwkRotation {
                to: self
                    .hsm
                    .mwk_generation()
                    .0
                    .checked_add(1)
                    .ok_or(Error::InvalidArgument("no more MWK generations".into()))?,
                cursor: None,
                started_at: self.clock.now_secs(),
            };
            self.store.set_mwk_rotation(&rotation)?;
            tracing::info!(to = rotation.to, "master key rotation started");
            crate::failpoint::hit("mwk:journal-written");
        }
        self.resume_master_key_rotation()?;
        self.master_key_status()
    }

    /// Finishes a master key rotation a crash interrupted; does nothing without a journal.
    ///
    /// # Errors
    /// HSM and storage errors (the journal stays for the next attempt).
    pub fn resume_master_key_rotation(&self) -> Result<(), Error> {
        if !self.store.is_leader() {
            return Err(Error::NotLeader);
        }
        let _one_at_a_time = self
            .mwk_rotation
            .lock()
            .expect("master key rotation lock poisoned");
        let Some(mut rotation) = self.store.mwk_rotation()? else {
            return Ok(());
        };
        if self.hsm.mwk_generation().0 < rotation.to {
            let created = self.hsm.create_mwk()?;
            tracing::info!(generation = created.0, "new master wrapping key created");
            crate::failpoint::hit("mwk:created");
        }
        let to = MwkGeneration(rotation.to);
        for tenant in self.store.tenants()? {
            if rotation.cursor.is_some_and(|done| tenant.id <= done) {
                continue;
            }
            self.writing(|| self.rewrap_tenant(tenant.id, to))?;
            crate::failpoint::hit("mwk:tenant-committed");
            rotation.cursor = Some(tenant.id);
            self.store.set_mwk_rotation(&rotation)?;
            crate::failpoint::hit("mwk:cursor-moved");
        }
        let retire_at = self
            .clock
            .now_secs()
            .saturating_add((self.min_destruction_window + RETIRED_MWK_MARGIN).as_secs());
        let retired: Vec<(u32, u64)> = self
            .hsm
            .mwk_generations()
            .into_iter()
            .filter(|g| *g < to)
            .map(|g| (g.0, retire_at))
            .collect();
        self.store.finish_mwk_rotation(&retired)?;
        tracing::info!(generation = to.0, retired = ?retired, "master key rotation finished");
        crate::failpoint::hit("mwk:finished");
        Ok(())
    }

    /// The current generation, the rotation in progress, and every generation's fate.
    ///
    /// # Errors
    /// Storage errors.
    pub fn master_key_status(&self) -> Result<MasterKeyStatus, Error> {
        let retired = self.store.retired_mwks()?;
        Ok(MasterKeyStatus {
            current: self.hsm.mwk_generation(),
            rotation: self.store.mwk_rotation()?,
            generations: self
                .hsm
                .mwk_generations()
                .into_iter()
                .map(|g| {
                    let at = retired.iter().find(|(r, _)| *r == g.0).map(|(_, at)| *at);
                    (g, at)
                })
                .collect(),
        })
    }

    /// Destroys retired MWK generations whose date has passed (called by the scheduler, which
    /// pauses it after a clock jump). Returns the generations destroyed.
    ///
    /// # Errors
    /// HSM and storage errors.
    pub fn destroy_retired_master_keys(&self) -> Result<Vec<MwkGeneration>, Error> {
        self.destroy_retired_master_keys_at(self.clock.now_secs())
    }

    /// [`Kms::destroy_retired_master_keys`] as of `now` (see [`Kms::run_due_destructions_at`]).
    ///
    /// # Errors
    /// As [`Kms::destroy_retired_master_keys`].
    pub fn destroy_retired_master_keys_at(&self, now: u64) -> Result<Vec<MwkGeneration>, Error> {
        if self.store.mwk_rotation()?.is_some() {
            return Ok(Vec::new()); // blobs may still need an old generation
        }
        let mut destroyed = Vec::new();
        for (generation, at) in self.store.retired_mwks()? {
            if at <= now {
                self.scheduled(
                    "destroy_retired_master_key",
                    None,
                    None,
                    Some(KeyVersion(generation)),
                    || {
                        self.hsm.destroy_mwk(MwkGeneration(generation))?;
                        Ok(self.store.remove_retired_mwk(generation)?)
                    },
                )?;
                tracing::info!(generation, "retired master wrapping key destroyed");
                destroyed.push(MwkGeneration(generation));
            }
        }
        Ok(destroyed)
    }

    /// Re-wraps every KEK blob of one tenant under `to`, in one tenant commit.
    fn rewrap_tenant(&self, tenant: TenantId, to: MwkGeneration) -> Result<(), Error> {
        let Some(db) = self.store.live_tenant(tenant)? else {
            return Ok(());
        };
        let _writes = db.lock_writes();
        let mut writes = Vec::new();
        for record in db.keys()? {
            for v in 1..=record.latest.0 {
                let Some(mut version) = db.version(&record.id, KeyVersion(v))? else {
                    continue;
                };
                if version.kek.is_empty() {
                    continue; // destroyed
                }
                let wrapped =
                    WrappedKek::from_bytes(&version.kek).ok_or(keystore::Error::Integrity {
                        database: tenant.to_string(),
                        reason: "malformed KEK blob",
                    })?;
                if wrapped.generation() == to {
                    continue;
                }
                version.kek = self.hsm.rewrap_kek(&wrapped)?.to_bytes();
                writes.push(TenantWrite::Version(record.id, version));
            }
        }
        if !writes.is_empty() {
            db.commit(writes)?;
            // Snapshots in memory hold the old blobs, which stop working once the old MWK goes.
            self.forget_tenant(tenant);
        }
        Ok(())
    }
}
