//! Restore: a verified archive plus the key journal into an empty data directory, with the
//! same HSM token.
//!
//! Order: verify the archive (signature with the token's audit key, checksums, completeness);
//! import its copies (every record keeps its MAC); destroy again the tenants destroyed while
//! the snapshot was taken; replay the journal (commits beyond each tenant's head, tenant
//! creations, updates and destructions: tombstones win); revoke every support grant and drop
//! every pending dual-control approval (neither is journaled: the snapshot may hold one
//! revoked or carried out since); rebuild the scheduler's indexes; open and verify every
//! tenant database.

use std::path::Path;
use std::sync::Arc;

use super::{Error, Manifest, verify};
use crate::audit::chain::PublicKey;
use crate::hsm::Hsm;
use crate::keystore::backup::ReplayReport;
use crate::keystore::{KeyStore, StoreOptions, journal};

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    /// The archive's manifest.
    pub manifest: Manifest,
    /// The journal replay (default when no journal was given).
    pub replay: ReplayReport,
    /// Tenants in the restored directory.
    pub tenants: usize,
    /// Tenants destroyed again because they were destroyed during the snapshot.
    pub destroyed_again: usize,
    /// Support grants revoked (pending or approved in the snapshot).
    pub grants_revoked: usize,
    /// Pending dual-control approvals dropped.
    pub approvals_dropped: usize,
}

/// Restores `archive` (and, if given, the journal in `journal_dir`) into the empty `data_dir`.
///
/// # Errors
/// The archive's verification errors (nothing is written then), [`Error::Refused`] for a
/// non-empty `data_dir` or a journal that does not continue the snapshot, store and HSM errors.
pub fn restore(
    hsm: &Arc<dyn Hsm>,
    archive: &Path,
    journal_dir: Option<&Path>,
    data_dir: &Path,
    options: StoreOptions,
) -> Result<Restored, Error> {
    let key = PublicKey::from_bytes(&hsm.audit_public_key()).map_err(Error::Refused)?;
    // First the whole archive is checked without keeping its records; then it is read again
    // one section at a time (each checked against the signed manifest) while importing, so a
    // restore of 100,000 tenants holds one tenant's records, not all of them.
    let verified = verify(archive, &key, false)?;
    if data_dir.exists()
        && std::fs::read_dir(data_dir)
            .map_err(super::io(data_dir))?
            .next()
            .is_some()
    {
        return Err(Error::Refused(format!(
            "{} is not empty: a restore goes into a new, empty data directory",
            data_dir.display()
        )));
    }
    let mac = || crate::kms::Kms::storage_mac(hsm.as_ref());
    // Read the journal before writing anything: a tampered one refuses the whole restore.
    let entries = match journal_dir {
        Some(dir) => journal::read_all(dir, &mac()?)?,
        None => Vec::new(),
    };
    // One tenant database open at a time: the restore and its index rebuild visit each tenant
    // once, and sled allocates a 6 MiB page table for every open database (16 open by default
    // cost the restore 100 MiB of heap for nothing).
    let options = StoreOptions {
        journal_dir: None,
        max_open_tenants: std::num::NonZeroUsize::MIN,
        ..options
    };
    let manifest = verified.manifest;
    let (system, tenants) = super::sections(archive, &manifest)?;
    let result = KeyStore::import(data_dir, mac()?, options, &system, tenants)
        .and_then(|store| finish(&store, manifest, &entries));
    if result.is_err() {
        // The directory was empty or new: leave nothing half-restored behind.
        let _ = std::fs::remove_dir_all(data_dir);
    }
    result
}

/// Destroys again, replays, ends grants and approvals, rebuilds and verifies.
fn finish(
    store: &KeyStore,
    manifest: Manifest,
    entries: &[(u64, journal::JournalEntry)],
) -> Result<Restored, Error> {
    let mut destroyed_again = 0;
    for id in &manifest.destroyed_during_snapshot {
        let Ok(id) = id.parse() else {
            continue;
        };
        if store.tenant_record(id)?.is_some() {
            store.destroy_tenant(id)?;
            destroyed_again += 1;
        }
    }
    let replay = store.replay(entries)?;
    let (grants_revoked, approvals_dropped) = store.end_grants_and_approvals()?;
    let tenants = store.rebuild_indexes()?;
    Ok(Restored {
        manifest,
        replay,
        tenants,
        destroyed_again,
        grants_revoked,
        approvals_dropped,
    })
}
