//! Usage counters per key version: HSM AES-GCM encryptions under its KEK (random 96-bit IVs:
//! keep well below 2^32) and local AES-GCM-SIV encryptions under its bulk key.
//!
//! Uses are counted in memory and reserved in blocks: before a use beyond the reserved count,
//! a larger reservation is committed to the tenant database (the version record). A crash
//! loses at most the unused part of a block, so the persisted count can only over-count. A
//! restart counts every reserved use as used.
//!
//! When a reservation reaches three quarters of the limit, the key is queued for the scheduler,
//! which rotates it once three quarters are used (`Kms::run_due_rotations`), leaving a quarter
//! for the time until its tick. If the limit itself is reached first, the version refuses to
//! encrypt (FAILED_PRECONDITION, USAGE_LIMIT_REACHED).

use std::sync::atomic::{AtomicU64, Ordering};

use super::Error;
use super::Kms;
use crate::ids::{KeyId, KeyVersion, TenantId};
use crate::keystore::{KeyPolicy, KeyRecord, TenantWrite, VersionRecord};

/// Which counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum UseKind {
    /// An HSM AES-GCM encryption under the version's KEK.
    Kek,
    /// A local AES-GCM-SIV encryption under the version's bulk key.
    Bulk,
}

/// Default limit of HSM AES-GCM encryptions per KEK: 2^31, half the 2^32 bound for random IVs.
pub const DEFAULT_MAX_KEK_USES: u64 = 1 << 31;
/// Default limit of AES-GCM-SIV encryptions per bulk key: 2^48 (RFC 8452 leaves a wide margin
/// beyond this for random nonces).
pub const DEFAULT_MAX_BULK_USES: u64 = 1 << 48;
/// Largest reservation block.
const MAX_BLOCK: u64 = 65_536;

/// One version's counters in memory.
#[derive(Debug)]
pub(super) struct Usage {
    used: [AtomicU64; 2],
    reserved: [AtomicU64; 2],
}

impl Usage {
    fn new(version: &VersionRecord) -> Self {
        // Everything reserved before (this run or an earlier one) counts as used.
        Self {
            used: [
                AtomicU64::new(version.reserved_kek_uses),
                AtomicU64::new(version.reserved_bulk_uses),
            ],
            reserved: [
                AtomicU64::new(version.reserved_kek_uses),
                AtomicU64::new(version.reserved_bulk_uses),
            ],
        }
    }
}

fn index(kind: UseKind) -> usize {
    match kind {
        UseKind::Kek => 0,
        UseKind::Bulk => 1,
    }
}

/// What taking one use found.
pub(super) enum Taken {
    /// Counted.
    Ok,
    /// The reservation is exhausted: reserve a block (blocking), then try again.
    Reserve,
}

fn block(limit: u64) -> u64 {
    (limit / 16).clamp(1, MAX_BLOCK)
}

impl Kms {
    /// The version's limit for this kind of use.
    pub(super) fn use_limit(record: &KeyRecord, kind: UseKind) -> u64 {
        Self::policy_limit(&record.policy, kind)
    }

    fn policy_limit(policy: &KeyPolicy, kind: UseKind) -> u64 {
        match kind {
            UseKind::Kek => policy.max_kek_uses.unwrap_or(DEFAULT_MAX_KEK_USES),
            UseKind::Bulk => policy.max_bulk_uses.unwrap_or(DEFAULT_MAX_BULK_USES),
        }
    }

    /// What a new version reserves in the commit that creates it.
    pub(super) fn first_block(policy: &KeyPolicy, kind: UseKind) -> u64 {
        block(Self::policy_limit(policy, kind))
    }

    /// Counters of a version this process just created: one KEK use (its bulk key was
    /// encrypted under it), no bulk use, the first blocks reserved.
    pub(super) fn register_new_version(
        &self,
        tenant: TenantId,
        key_id: KeyId,
        version: &VersionRecord,
    ) {
        let usage = Usage {
            used: [AtomicU64::new(1), AtomicU64::new(0)],
            reserved: [
                AtomicU64::new(version.reserved_kek_uses),
                AtomicU64::new(version.reserved_bulk_uses),
            ],
        };
        self.usage.write().expect("usage lock poisoned").insert(
            (tenant, key_id, version.version),
            std::sync::Arc::new(usage),
        );
    }

    /// The in-memory counters of a version (created from its record the first time).
    pub(super) fn usage(
        &self,
        tenant: TenantId,
        key_id: KeyId,
        version: &VersionRecord,
    ) -> std::sync::Arc<Usage> {
        let id = (tenant, key_id, version.version);
        if let Some(usage) = self.usage.read().expect("usage lock poisoned").get(&id) {
            return std::sync::Arc::clone(usage);
        }
        let mut all = self.usage.write().expect("usage lock poisoned");
        std::sync::Arc::clone(
            all.entry(id)
                .or_insert_with(|| std::sync::Arc::new(Usage::new(version))),
        )
    }

    /// Counts one use if it is within the reservation (no I/O: safe on an async worker).
    ///
    /// # Errors
    /// [`Error::KeyState`] USAGE_LIMIT_REACHED once the limit is used up.
    pub(super) fn take_use(
        record: &KeyRecord,
        version: KeyVersion,
        usage: &Usage,
        kind: UseKind,
    ) -> Result<Taken, Error> {
        let i = index(kind);
        let limit = Self::use_limit(record, kind);
        let n = usage.used[i].fetch_add(1, Ordering::Relaxed) + 1;
        if n > limit {
            usage.used[i].fetch_sub(1, Ordering::Relaxed);
            return Err(Error::KeyState {
                reason: "USAGE_LIMIT_REACHED",
                message: format!(
                    "version {} of key {} reached its limit of {limit} {} encryptions; rotate the key",
                    version.0,
                    record.name,
                    match kind {
                        UseKind::Kek => "HSM",
                        UseKind::Bulk => "bulk-key",
                    }
                ),
            });
        }
        if n > usage.reserved[i].load(Ordering::Acquire) {
            usage.used[i].fetch_sub(1, Ordering::Relaxed);
            return Ok(Taken::Reserve);
        }
        Ok(Taken::Ok)
    }

    /// Counts one use, reserving a block first if needed (may write: blocking threads only).
    ///
    /// # Errors
    /// USAGE_LIMIT_REACHED; storage errors of the reservation.
    pub(super) fn use_blocking(
        &self,
        tenant: TenantId,
        record: &KeyRecord,
        version: &VersionRecord,
        usage: &Usage,
        kind: UseKind,
    ) -> Result<(), Error> {
        loop {
            match Self::take_use(record, version.version, usage, kind)? {
                Taken::Ok => return Ok(()),
                Taken::Reserve => {
                    self.writing(|| self.reserve(tenant, record, version.version, usage, kind))?
                }
            }
        }
    }

    /// Commits a larger reservation for a version, then raises the in-memory one; queues the
    /// key for rotation when the reservation nears the limit.
    fn reserve(
        &self,
        tenant: TenantId,
        record: &KeyRecord,
        version: KeyVersion,
        usage: &Usage,
        kind: UseKind,
    ) -> Result<(), Error> {
        let i = index(kind);
        let limit = Self::use_limit(record, kind);
        let db = self.store.tenant(tenant)?;
        let _writes = db.lock_writes();
        let reserved_now = usage.reserved[i].load(Ordering::Acquire);
        if usage.used[i].load(Ordering::Relaxed) < reserved_now {
            return Ok(()); // another thread reserved meanwhile
        }
        let mut stored =
            db.version(&record.id, version)?
                .ok_or_else(|| crate::keystore::Error::Integrity {
                    database: tenant.to_string(),
                    reason: "a key in use names a version that does not exist",
                })?;
        let block = block(limit);
        let field = match kind {
            UseKind::Kek => &mut stored.reserved_kek_uses,
            UseKind::Bulk => &mut stored.reserved_bulk_uses,
        };
        let reserved = (*field).max(reserved_now).saturating_add(block).min(limit);
        *field = reserved;
        db.commit(vec![TenantWrite::Version(record.id, stored)])?;
        usage.reserved[i].store(reserved, Ordering::Release);
        if reserved.saturating_mul(4) >= limit.saturating_mul(3) {
            // Due now: the scheduler looks at every tick and rotates at three quarters used.
            self.store
                .set_rotation_check(tenant, record.id, self.clock.now_secs())?;
        }
        Ok(())
    }

    /// Whether a version has used three quarters of a limit, counting from memory when this
    /// process has its counters and from its persisted reservations otherwise (an over-count).
    pub(super) fn near_usage_limit(
        &self,
        tenant: TenantId,
        record: &KeyRecord,
        version: &VersionRecord,
    ) -> bool {
        let usage = self
            .usage
            .read()
            .expect("usage lock poisoned")
            .get(&(tenant, record.id, version.version))
            .cloned();
        [UseKind::Kek, UseKind::Bulk].into_iter().any(|kind| {
            let used = match (&usage, kind) {
                (Some(usage), kind) => usage.used[index(kind)].load(Ordering::Relaxed),
                (None, UseKind::Kek) => version.reserved_kek_uses,
                (None, UseKind::Bulk) => version.reserved_bulk_uses,
            };
            used.saturating_mul(4) >= Self::use_limit(record, kind).saturating_mul(3)
        })
    }

    /// Whether a version has reserved three quarters of a limit: the scheduler keeps
    /// looking at it every tick until it rotates.
    pub(super) fn reserved_near_limit(record: &KeyRecord, version: &VersionRecord) -> bool {
        [
            (version.reserved_kek_uses, UseKind::Kek),
            (version.reserved_bulk_uses, UseKind::Bulk),
        ]
        .into_iter()
        .any(|(reserved, kind)| {
            reserved.saturating_mul(4) >= Self::use_limit(record, kind).saturating_mul(3)
        })
    }
}
