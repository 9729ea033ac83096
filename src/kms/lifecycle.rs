//! Key version states and key policies: the changes officers make, and the checks every use of
//! a version passes.
//!
//! Every change is one tenant commit that rewrites the key record (its generation rises) and,
//! for a state change, the version record. The in-memory snapshots of the key are then dropped
//! under the cache epoch lock (`Kms::invalidate_key`), so the next request reads the new state.
//! A request that took its snapshot before the commit may still finish under the old state.

use super::Error;
use super::{KeySnapshot, Kms};
use crate::ids::{KeyId, KeyVersion, Name, TenantId};
use crate::keystore::{
    KeyPolicy, KeyRecord, PendingDestruction, TenantWrite, VersionRecord, VersionState,
};

/// What UpdateKeyPolicy changes; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct PolicyUpdate {
    /// New minimum version that may decrypt.
    pub min_decryption_version: Option<u32>,
    /// New rotation period in seconds (`Some(0)` turns rotation by age off).
    pub rotation_period_secs: Option<u64>,
    /// New pending window for scheduled destructions, in seconds (`Some(0)`: the default).
    pub destruction_window_secs: Option<u64>,
    /// New limit of HSM encryptions per KEK (`Some(0)`: the default).
    pub max_kek_uses: Option<u64>,
    /// New limit of bulk-key encryptions per version (`Some(0)`: the default).
    pub max_bulk_uses: Option<u64>,
}

/// A key with all its versions, for GetKey and `keyfront admin`.
#[derive(Clone, Debug)]
pub struct KeyDetails {
    /// The key record.
    pub record: KeyRecord,
    /// Every version, oldest first (blobs included; callers must not return them).
    pub versions: Vec<VersionRecord>,
    /// Its import record, if its material was ever imported.
    pub import: Option<crate::keystore::ImportRecord>,
}

impl Kms {
    /// The key and every version of it.
    ///
    /// # Errors
    /// [`Error::KeyNotFound`], storage errors.
    pub fn key_details(&self, tenant: TenantId, name: &Name) -> Result<KeyDetails, Error> {
        self.reading(tenant, |db, _| {
            let record = db
                .key_by_name(name)?
                .ok_or_else(|| Error::KeyNotFound(name.clone()))?;
            let mut versions = Vec::new();
            for v in 1..=record.latest.0 {
                if let Some(version) = db.version(&record.id, KeyVersion(v))? {
                    versions.push(version);
                }
            }
            let import = db.import(&record.id)?;
            Ok(KeyDetails {
                record,
                versions,
                import,
            })
        })
    }

    /// Disables a version (the primary too: encrypting then fails until it is enabled again or
    /// the key is rotated). Disabling a disabled version changes nothing.
    ///
    /// # Errors
    /// [`Error::KeyState`] for a version scheduled for destruction or destroyed.
    pub fn disable_version(
        &self,
        tenant: TenantId,
        name: &Name,
        version: KeyVersion,
    ) -> Result<VersionRecord, Error> {
        self.set_enabled(tenant, name, version, false)
    }

    /// Enables a disabled version. Enabling an enabled version changes nothing.
    ///
    /// # Errors
    /// [`Error::KeyState`] for a version scheduled for destruction (cancel it first) or
    /// destroyed.
    pub fn enable_version(
        &self,
        tenant: TenantId,
        name: &Name,
        version: KeyVersion,
    ) -> Result<VersionRecord, Error> {
        self.set_enabled(tenant, name, version, true)
    }

    fn set_enabled(
        &self,
        tenant: TenantId,
        name: &Name,
        version: KeyVersion,
        enabled: bool,
    ) -> Result<VersionRecord, Error> {
        self.change_version(tenant, name, version, |record, v| match v.state {
            VersionState::Enabled | VersionState::Disabled => {
                v.state = if enabled {
                    VersionState::Enabled
                } else {
                    VersionState::Disabled
                };
                Ok(())
            }
            other => Err(not_now(
                record,
                v.version,
                other,
                if enabled { "enabled" } else { "disabled" },
            )),
        })
    }

    /// Schedules a version's destruction after the key's pending window (or the default),
    /// never sooner than the minimum window (the backup retention). The version is refused
    /// at once; [`Kms::cancel_destruction`] restores it until the window ends. Scheduling a
    /// scheduled version keeps its date.
    ///
    /// # Errors
    /// [`Error::KeyState`] for the primary version (rotate first) or a destroyed version.
    pub fn schedule_destruction(
        &self,
        tenant: TenantId,
        name: &Name,
        version: KeyVersion,
    ) -> Result<VersionRecord, Error> {
        let record = self.key(tenant, name)?;
        let window = record
            .policy
            .destruction_window_secs
            .unwrap_or(self.destruction_window.as_secs())
            .max(self.min_destruction_window.as_secs());
        let at = self.clock.now_secs().saturating_add(window);
        let mut entry = PendingDestruction {
            tenant,
            key_id: record.id,
            version,
            at,
        };
        // The scheduler's index first: a crash after it leaves an entry the scheduler drops,
        // never a scheduled version it does not know.
        self.store.add_pending_destruction(&entry)?;
        let changed = self.change_version(tenant, name, version, |record, v| {
            if let Some(refusal) = primary_refusal(record, v.version) {
                return Err(refusal);
            }
            match v.state {
                VersionState::Enabled | VersionState::Disabled => {
                    v.state = VersionState::DestroyScheduled {
                        at,
                        was_disabled: v.state == VersionState::Disabled,
                    };
                    Ok(())
                }
                VersionState::DestroyScheduled { .. } => Ok(()),
                other @ VersionState::Destroyed { .. } => Err(not_now(
                    record,
                    v.version,
                    other,
                    "scheduled for destruction",
                )),
            }
        });
        match &changed {
            Ok(VersionRecord {
                state: VersionState::DestroyScheduled { at: actual, .. },
                ..
            }) if *actual != at => {
                entry.at = *actual;
                self.store.add_pending_destruction(&entry)?;
            }
            Ok(_) => {}
            Err(_) => self.store.remove_pending_destruction(&entry)?,
        }
        changed
    }

    /// Cancels a scheduled destruction: the version returns to the state it had before.
    ///
    /// # Errors
    /// [`Error::KeyState`] if it is not scheduled for destruction.
    pub fn cancel_destruction(
        &self,
        tenant: TenantId,
        name: &Name,
        version: KeyVersion,
    ) -> Result<VersionRecord, Error> {
        let mut key_id = None;
        let restored = self.change_version(tenant, name, version, |record, v| {
            key_id = Some(record.id);
            Self::restore(record, v)
        })?;
        if let Some(key_id) = key_id {
            self.store.remove_pending_destruction(&PendingDestruction {
                tenant,
                key_id,
                version,
                at: 0,
            })?;
        }
        Ok(restored)
    }

    fn restore(record: &KeyRecord, v: &mut VersionRecord) -> Result<(), Error> {
        match v.state {
            VersionState::DestroyScheduled { was_disabled, .. } => {
                v.state = if was_disabled {
                    VersionState::Disabled
                } else {
                    VersionState::Enabled
                };
                Ok(())
            }
            other => Err(Error::KeyState {
                reason: "NOT_SCHEDULED",
                message: format!(
                    "version {} of key {} is {}, not scheduled for destruction",
                    v.version.0,
                    record.name,
                    state_name(other)
                ),
            }),
        }
    }

    /// Destroys every tenant and version whose pending window has ended. A tenant is
    /// crypto-shredded (see [`Kms::schedule_tenant_destruction`]). A version's KEK and bulk-key
    /// blobs are erased in one commit per version (the commit point), then its index entry goes.
    /// Idempotent; entries that no longer match a scheduled version are dropped. Returns the
    /// versions destroyed.
    ///
    /// # Errors
    /// Storage errors (versions destroyed before the error stay destroyed).
    pub fn run_due_destructions(&self) -> Result<Vec<(TenantId, Name, KeyVersion)>, Error> {
        self.run_due_destructions_at(self.clock.now_secs())
    }

    /// [`Kms::run_due_destructions`] as of `now` (seconds since the Unix epoch): the scheduler
    /// passes the wall time it checked against monotonic time, so a clock jump after that
    /// check cannot make anything due.
    ///
    /// # Errors
    /// As [`Kms::run_due_destructions`].
    pub fn run_due_destructions_at(
        &self,
        now: u64,
    ) -> Result<Vec<(TenantId, Name, KeyVersion)>, Error> {
        let mut destroyed = Vec::new();
        self.destroy_retired_master_keys_at(now)?;
        for (tenant, at) in self.store.pending_tenant_destructions()? {
            // A leader that lost its lease stops before the next node starts.
            if !self.store.is_leader() {
                return Ok(destroyed);
            }
            if at <= now {
                // Tombstone, records and the scheduler's entry in one system commit, then the
                // directory; `destroy_tenant` is idempotent past the commit.
                match self.scheduled(
                    "destroy_tenant",
                    Some(tenant.to_string()),
                    None,
                    None,
                    || self.destroy_tenant(tenant),
                ) {
                    Ok(()) => tracing::info!(%tenant, "tenant destroyed"),
                    Err(Error::Store(crate::keystore::Error::TenantNotFound(_))) => {}
                    Err(error) => return Err(error),
                }
            }
        }
        for mut entry in self.store.pending_destructions()? {
            if !self.store.is_leader() {
                return Ok(destroyed);
            }
            if entry.at > now {
                continue;
            }
            let record = match self.store.live_tenant(entry.tenant)? {
                Some(db) => db.key(&entry.key_id)?,
                None => None,
            };
            let Some(record) = record else {
                self.store.remove_pending_destruction(&entry)?;
                continue;
            };
            let result = self.scheduled(
                "destroy_key_version",
                Some(entry.tenant.to_string()),
                Some(&record.name),
                Some(entry.version),
                || {
                    self.change_version(entry.tenant, &record.name, entry.version, |_, v| {
                        if let VersionState::DestroyScheduled { at, .. } = v.state {
                            if at <= now {
                                v.state = VersionState::Destroyed { at: now };
                                v.kek = Vec::new();
                                v.bulk_key = Vec::new();
                            }
                        }
                        Ok(())
                    })
                },
            );
            match result {
                Ok(VersionRecord {
                    state: VersionState::Destroyed { .. },
                    ..
                }) => {
                    tracing::info!(tenant = %entry.tenant, key = %record.name, version = entry.version.0, "key version destroyed");
                    destroyed.push((entry.tenant, record.name.clone(), entry.version));
                    self.store.remove_pending_destruction(&entry)?;
                }
                Ok(VersionRecord {
                    state: VersionState::DestroyScheduled { at, .. },
                    ..
                }) => {
                    // Rescheduled since the entry was written: keep it, with the real date.
                    entry.at = at;
                    self.store.add_pending_destruction(&entry)?;
                }
                Ok(_) | Err(Error::VersionNotFound { .. }) => {
                    self.store.remove_pending_destruction(&entry)?;
                }
                Err(error) => return Err(error),
            }
        }
        Ok(destroyed)
    }

    /// Changes a key's policy.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a minimum decryption version above the primary, or a
    /// pending window below the minimum (the backup retention).
    pub fn update_policy(
        &self,
        tenant: TenantId,
        name: &Name,
        update: &PolicyUpdate,
    ) -> Result<KeyRecord, Error> {
        let record = self.writing(|| {
            let db = self.store.tenant(tenant)?;
            let _writes = db.lock_writes();
            let mut record = db
                .key_by_name(name)?
                .ok_or_else(|| Error::KeyNotFound(name.clone()))?;
            let mut policy: KeyPolicy = record.policy.clone();
            if let Some(min) = update.min_decryption_version {
                if let Some(refusal) = min_refusal(&record, min) {
                    return Err(refusal);
                }
                policy.min_decryption_version = min;
            }
            if let Some(period) = update.rotation_period_secs {
                policy.rotation_period_secs = (period > 0).then_some(period);
                if period > 0 {
                    // Before the commit, due now: the scheduler recomputes the real date.
                    self.store
                        .set_rotation_check(tenant, record.id, self.clock.now_secs())?;
                }
            }
            if let Some(window) = update.destruction_window_secs {
                if window > 0 && window < self.min_destruction_window.as_secs() {
                    return Err(Error::InvalidArgument(format!(
                        "destruction_window of {window} s is below the minimum of {} s (the backup retention)",
                        self.min_destruction_window.as_secs()
                    )));
                }
                policy.destruction_window_secs = (window > 0).then_some(window);
            }
            if let Some(max) = update.max_kek_uses {
                policy.max_kek_uses = (max > 0).then_some(max.min(super::DEFAULT_MAX_KEK_USES));
            }
            if let Some(max) = update.max_bulk_uses {
                policy.max_bulk_uses = (max > 0).then_some(max.min(super::DEFAULT_MAX_BULK_USES));
            }
            if update.max_kek_uses.is_some() || update.max_bulk_uses.is_some() {
                // A lower limit may already be near: let the scheduler look now.
                self.store
                    .set_rotation_check(tenant, record.id, self.clock.now_secs())?;
            }
            record.policy = policy;
            record.generation += 1;
            db.commit(vec![TenantWrite::Key(record.clone())])?;
            self.invalidate_key(tenant, &record);
            Ok(record)
        })?;
        if update.min_decryption_version.is_some() {
            self.await_propagation();
        }
        Ok(record)
    }

    /// Rotates every key whose primary is older than its rotation period. Idempotent: a key
    /// rotated meanwhile (by hand, or by another run) is only rescheduled. Returns the keys
    /// rotated.
    ///
    /// # Errors
    /// Storage or HSM errors (keys rotated before the error stay rotated).
    pub fn run_due_rotations(&self) -> Result<Vec<(TenantId, Name, KeyVersion)>, Error> {
        let now = self.clock.now_secs();
        let mut rotated = Vec::new();
        for (tenant, key_id, at) in self.store.rotation_checks()? {
            if !self.store.is_leader() {
                return Ok(rotated);
            }
            if at > now {
                continue;
            }
            // On a cluster another node may commit to the tenant meanwhile: its view is then
            // stale, and the key is looked at again on a fresh one (as every write does). Each
            // attempt decides from the records it reads, so a rotation done by an earlier
            // attempt is not done twice.
            if let Some(done) = self.writing(|| self.rotate_if_due(tenant, key_id, now))? {
                rotated.push(done);
            }
        }
        Ok(rotated)
    }

    /// [`Kms::run_due_rotations`] for one key: rotates it if its period elapsed or its usage
    /// neared a limit, and sets when to look at it next.
    fn rotate_if_due(
        &self,
        tenant: TenantId,
        key_id: KeyId,
        now: u64,
    ) -> Result<Option<(TenantId, Name, KeyVersion)>, Error> {
        let mut rotated = None;
        let Some(db) = self.store.live_tenant(tenant)? else {
            self.store.remove_rotation_check(tenant, key_id)?;
            return Ok(None);
        };
        let Some(record) = db.key(&key_id)? else {
            self.store.remove_rotation_check(tenant, key_id)?;
            return Ok(None);
        };
        if !Self::allows_generated_rotation(&db, &record)? {
            // Imported material only: its owner rotates it by importing (a usage limit
            // then refuses encryptions until they do).
            self.store.remove_rotation_check(tenant, key_id)?;
            return Ok(None);
        }
        let primary = self.version(&db, &record, record.primary)?;
        let period = record.policy.rotation_period_secs;
        let by_age = period.is_some_and(|p| primary.created_at.saturating_add(p) <= now);
        let by_usage = self.near_usage_limit(tenant, &record, &primary);
        let rotated_now = by_age || by_usage;
        if rotated_now {
            let rotated_record = self.scheduled(
                "rotate_key",
                Some(tenant.to_string()),
                Some(&record.name),
                None,
                || self.rotate_key(tenant, &record.name),
            )?;
            tracing::info!(
                %tenant,
                key = %record.name,
                version = rotated_record.primary.0,
                reason = if by_usage { "usage limit near" } else { "rotation period elapsed" },
                "key rotated by the scheduler"
            );
            rotated = Some((tenant, record.name, rotated_record.primary));
        }
        // When to look again: a new primary's period from now; the next tick while a
        // reservation is near a limit but the uses are not; the period's end; or never.
        // Decided under the tenant's write lock from records read again under it: a policy
        // update or a reservation sets the check under that lock, so a decision from the
        // records read above could remove a check set since (a lost update).
        let db = self.store.tenant(tenant)?;
        let _writes = db.lock_writes();
        let Some(record) = db.key(&key_id)? else {
            self.store.remove_rotation_check(tenant, key_id)?;
            return Ok(rotated);
        };
        let primary = self.version(&db, &record, record.primary)?;
        let period = record.policy.rotation_period_secs;
        let next = if rotated_now {
            period.map(|p| now.saturating_add(p))
        } else if Self::reserved_near_limit(&record, &primary) {
            Some(now)
        } else {
            period.map(|p| primary.created_at.saturating_add(p))
        };
        match next {
            Some(due) => self.store.set_rotation_check(tenant, key_id, due)?,
            None => self.store.remove_rotation_check(tenant, key_id)?,
        }
        Ok(rotated)
    }

    /// Reads a version, applies `change` to it under the tenant's write lock, and commits the
    /// version with its key record (generation raised) if it changed.
    fn change_version(
        &self,
        tenant: TenantId,
        name: &Name,
        version: KeyVersion,
        mut change: impl FnMut(&KeyRecord, &mut VersionRecord) -> Result<(), Error>,
    ) -> Result<VersionRecord, Error> {
        let found =
            self.writing(|| self.commit_version_change(tenant, name, version, &mut change))?;
        // Disabled or scheduled for destruction means refused on every node, before OK.
        self.await_propagation();
        Ok(found)
    }

    /// [`Self::change_version`]'s one attempt, without the wait.
    fn commit_version_change(
        &self,
        tenant: TenantId,
        name: &Name,
        version: KeyVersion,
        change: &mut impl FnMut(&KeyRecord, &mut VersionRecord) -> Result<(), Error>,
    ) -> Result<VersionRecord, Error> {
        let db = self.store.tenant(tenant)?;
        let _writes = db.lock_writes();
        let mut record = db
            .key_by_name(name)?
            .ok_or_else(|| Error::KeyNotFound(name.clone()))?;
        let mut found = db
            .version(&record.id, version)?
            .ok_or_else(|| Error::VersionNotFound {
                key: name.clone(),
                version: version.0,
            })?;
        let before = found.clone();
        change(&record, &mut found)?;
        if found == before {
            return Ok(found);
        }
        record.generation += 1;
        db.commit(vec![
            TenantWrite::Version(record.id, found.clone()),
            TenantWrite::Key(record.clone()),
        ])?;
        self.invalidate_key(tenant, &record);
        Ok(found)
    }

    /// Whether a snapshot's version may encrypt: it must be enabled.
    pub(super) fn check_encrypt(&self, snapshot: &KeySnapshot) -> Result<(), Error> {
        self.check_use(snapshot, "encrypt")
    }

    /// Whether a snapshot's version may `what` (encrypt, sign, generate a MAC): it is enabled
    /// and its material, if imported with an expiry, has not expired.
    pub(super) fn check_use(&self, snapshot: &KeySnapshot, what: &str) -> Result<(), Error> {
        check_enabled(&snapshot.record, &snapshot.primary, what)?;
        self.check_material(snapshot, what)
    }

    /// Whether a snapshot's imported material has expired (the clock is read only for
    /// material with an expiry).
    fn check_material(&self, snapshot: &KeySnapshot, what: &str) -> Result<(), Error> {
        match snapshot.expires_at {
            Some(at) if self.clock.now_secs() >= at => Err(Error::KeyState {
                reason: "KEY_MATERIAL_EXPIRED",
                message: format!(
                    "cannot {what}: the imported key material of version {} of key {} expired at {}",
                    snapshot.primary.version.0,
                    snapshot.record.name,
                    super::rfc3339(at)
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Whether a snapshot's version may decrypt: enabled, and not below the key's minimum.
    pub(super) fn check_decrypt(&self, snapshot: &KeySnapshot) -> Result<(), Error> {
        self.check_open(snapshot, "decrypt")
    }

    /// Whether a snapshot's version may `what` (decrypt, verify MACs): what any version, not
    /// only the primary, may do while it is enabled, not below the key's minimum, and its
    /// imported material has not expired.
    pub(super) fn check_open(&self, snapshot: &KeySnapshot, what: &str) -> Result<(), Error> {
        let (record, version) = (&snapshot.record, &snapshot.primary);
        if version.version.0 < record.policy.min_decryption_version {
            return Err(Error::KeyState {
                reason: "BELOW_MIN_DECRYPTION_VERSION",
                message: format!(
                    "version {} of key {} is below its min_decryption_version {}",
                    version.version.0, record.name, record.policy.min_decryption_version
                ),
            });
        }
        self.check_use(snapshot, what)
    }
}

/// Why a version cannot be scheduled for destruction because it is the primary, if it is.
pub(super) fn primary_refusal(record: &KeyRecord, version: KeyVersion) -> Option<Error> {
    (record.primary == version).then(|| Error::KeyState {
        reason: "PRIMARY_VERSION",
        message: format!(
            "version {} is the primary of key {}; rotate the key first",
            version.0, record.name
        ),
    })
}

/// Why `min` cannot be the key's min_decryption_version, if it cannot.
pub(super) fn min_refusal(record: &KeyRecord, min: u32) -> Option<Error> {
    (min > record.primary.0).then(|| {
        Error::InvalidArgument(format!(
            "min_decryption_version {min} is above the primary version {}: nothing could decrypt new ciphertexts",
            record.primary.0
        ))
    })
}

pub(super) fn check_enabled(
    record: &KeyRecord,
    version: &VersionRecord,
    what: &str,
) -> Result<(), Error> {
    let reason = match version.state {
        VersionState::Enabled => return Ok(()),
        VersionState::Disabled => "VERSION_DISABLED",
        VersionState::DestroyScheduled { .. } => "VERSION_DESTROY_SCHEDULED",
        VersionState::Destroyed { .. } => "VERSION_DESTROYED",
    };
    let primary = if record.primary == version.version {
        "primary "
    } else {
        ""
    };
    Err(Error::KeyState {
        reason,
        message: format!(
            "cannot {what}: the {primary}version {} of key {} is {}",
            version.version.0,
            record.name,
            state_name(version.state)
        ),
    })
}

fn not_now(record: &KeyRecord, version: KeyVersion, state: VersionState, wanted: &str) -> Error {
    Error::KeyState {
        reason: match state {
            VersionState::Destroyed { .. } => "VERSION_DESTROYED",
            _ => "VERSION_DESTROY_SCHEDULED",
        },
        message: format!(
            "version {} of key {} is {} and cannot be {wanted}",
            version.0,
            record.name,
            state_name(state)
        ),
    }
}

/// The state as the API names it.
pub fn state_name(state: VersionState) -> &'static str {
    match state {
        VersionState::Enabled => "ENABLED",
        VersionState::Disabled => "DISABLED",
        VersionState::DestroyScheduled { .. } => "DESTROY_SCHEDULED",
        VersionState::Destroyed { .. } => "DESTROYED",
    }
}
