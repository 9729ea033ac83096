//! The server's backups: a snapshot every night at the configured time (UTC, server clock),
//! verified right after it is written, then retention; and what `backup-status` reports.
//!
//! Every snapshot and every pruned archive is an audit line by `system:backup`, intent first.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::{Created, Error, list, prune, verify};
use crate::audit::chain::PublicKey;
use crate::kms::Kms;

/// The next time of day `at_secs` (seconds after UTC midnight) strictly after `now`.
pub fn next_due(now: u64, at_secs: u64) -> u64 {
    let today = now - now % 86_400 + at_secs;
    if today > now { today } else { today + 86_400 }
}

/// The backup directory, schedule and the last results.
pub struct Backups {
    dir: PathBuf,
    retention_days: u64,
    at_secs: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    // The last run (nightly or asked for): when, and the archive or the failure.
    last_run: Option<(u64, Result<PathBuf, String>)>,
    // The newest archive's verification, by path.
    verified: Option<(PathBuf, Result<(), String>)>,
}

/// What `backup-status` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The backup directory.
    pub dir: PathBuf,
    /// The newest archive, if any.
    pub newest: Option<super::ArchiveFile>,
    /// Its age in seconds (server clock).
    pub age_secs: u64,
    /// Whether it verified (signature, checksums, completeness), or why not.
    pub verification: Result<(), String>,
    /// How many archives there are.
    pub archives: usize,
    /// The retention.
    pub retention_days: u64,
    /// When the next nightly snapshot is due, seconds since the Unix epoch (0: none).
    pub next_due: u64,
    /// The last run's failure, if it failed.
    pub last_failure: Option<String>,
}

impl Backups {
    /// Backups into `dir`.
    pub fn new(dir: &Path, retention_days: u64, at_secs: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            retention_days,
            at_secs,
            state: Mutex::new(State::default()),
        }
    }

    /// The backup directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes a snapshot into `out` (default: the backup directory), verifies it, and prunes the
    /// backup directory. Each step is logged as `system:backup`.
    ///
    /// # Errors
    /// The snapshot's or its verification's; [`Error::Refused`] if the intent cannot be logged.
    pub fn take(&self, kms: &Kms, out: Option<&Path>) -> Result<Created, Error> {
        let dir = out.unwrap_or(&self.dir);
        let now = kms.clock().now_secs();
        let result = self.take_logged(kms, dir);
        let mut state = self.state.lock().expect("backup state lock poisoned");
        state.last_run = Some((
            now,
            result
                .as_ref()
                .map(|c| c.path.clone())
                .map_err(ToString::to_string),
        ));
        if let Ok(created) = &result {
            state.verified = Some((created.path.clone(), Ok(())));
        }
        drop(state);
        let created = result?;
        if dir == self.dir {
            // The night's snapshot, for whichever node leads next (the store is shared).
            if let Err(error) = kms.store().set_last_snapshot(created.manifest.created_at) {
                tracing::warn!(%error, "could not record the snapshot's time; the next leader may take another");
            }
            self.prune(kms)?;
        }
        Ok(created)
    }

    fn take_logged(&self, kms: &Kms, dir: &Path) -> Result<Created, Error> {
        kms.backup_event("backup_create", "intent", Some(dir.display().to_string()))
            .map_err(|_| Error::Refused("audit log unavailable; no snapshot taken".into()))?;
        let result = super::create(kms, dir).and_then(|created| {
            let key =
                PublicKey::from_bytes(&kms.hsm().audit_public_key()).map_err(Error::Refused)?;
            verify(&created.path, &key, false)?;
            Ok(created)
        });
        let outcome = match &result {
            Ok(created) => {
                tracing::info!(
                    archive = %created.path.display(),
                    bytes = created.bytes,
                    tenants = created.manifest.tenants.len(),
                    "snapshot taken and verified"
                );
                "OK".to_owned()
            }
            Err(error) => {
                tracing::error!(%error, "snapshot failed");
                format!("FAILED: {error}")
            }
        };
        let detail = result
            .as_ref()
            .map(|c| format!("{} ({} bytes, verified)", c.path.display(), c.bytes))
            .ok();
        let _ = kms.backup_event("backup_create", &outcome, detail);
        result
    }

    /// Deletes the archives past the retention (and journal segments no archive needs any
    /// more), each logged.
    ///
    /// # Errors
    /// I/O errors.
    pub fn prune(&self, kms: &Kms) -> Result<Vec<PathBuf>, Error> {
        let now = kms.clock().now_secs();
        let removed = prune(&self.dir, now, self.retention_days)?;
        for path in &removed {
            tracing::info!(archive = %path.display(), "snapshot past the retention deleted");
            let _ = kms.backup_event(
                "backup_prune",
                "OK",
                Some(format!(
                    "{} deleted (older than {} days)",
                    path.display(),
                    self.retention_days
                )),
            );
        }
        // The journal must reach back to the oldest archive kept (a day of margin).
        if let (Some(journal), Some(oldest)) = (kms.store().key_journal(), list(&self.dir)?.first())
        {
            let day = crate::keystore::journal::day_of(oldest.created_at.saturating_sub(86_400));
            for path in journal.prune_before(&day)? {
                let _ = kms.backup_event(
                    "journal_prune",
                    "OK",
                    Some(format!(
                        "{} deleted (before the oldest snapshot)",
                        path.display()
                    )),
                );
            }
        }
        Ok(removed)
    }

    /// Where the backups stand. Verifies the newest archive if this process has not yet.
    ///
    /// # Errors
    /// I/O errors listing the directory.
    pub fn status(&self, kms: &Kms) -> Result<Status, Error> {
        let all = list(&self.dir)?;
        let now = kms.clock().now_secs();
        let newest = all.last().cloned();
        let known = {
            let state = self.state.lock().expect("backup state lock poisoned");
            state
                .verified
                .as_ref()
                .filter(|(path, _)| newest.as_ref().is_some_and(|n| &n.path == path))
                .map(|(_, result)| result.clone())
        };
        let verification = match (&newest, known) {
            (None, _) => Err("no snapshot yet".to_owned()),
            (Some(_), Some(result)) => result,
            (Some(newest), None) => {
                let result = PublicKey::from_bytes(&kms.hsm().audit_public_key())
                    .map_err(Error::Refused)
                    .and_then(|key| verify(&newest.path, &key, false))
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                self.state
                    .lock()
                    .expect("backup state lock poisoned")
                    .verified = Some((newest.path.clone(), result.clone()));
                result
            }
        };
        let last_failure = self
            .state
            .lock()
            .expect("backup state lock poisoned")
            .last_run
            .as_ref()
            .and_then(|(_, r)| r.as_ref().err().cloned());
        Ok(Status {
            dir: self.dir.clone(),
            age_secs: newest
                .as_ref()
                .map_or(0, |n| now.saturating_sub(n.created_at)),
            newest,
            verification,
            archives: all.len(),
            retention_days: self.retention_days,
            next_due: next_due(now, self.at_secs),
            last_failure,
        })
    }
}

/// Whether the night's snapshot is due at `now`: the time of day `at_secs` passed last after
/// the last snapshot (`last`) was taken.
pub fn night_due(now: u64, at_secs: u64, last: u64) -> bool {
    let last_night = next_due(now, at_secs) - 86_400;
    last < last_night
}

/// Takes a snapshot every night at the configured time, checking every `interval`, until the
/// domain is dropped. Whether the night's snapshot was taken is read from the store at each
/// check (on a cluster: by whichever node took it, into whichever directory), so a night is
/// taken late rather than missed when the server was down at its time, restarted before it
/// took it, or lost the leader lease meanwhile. Before the store records any snapshot, the
/// directory's newest archive counts, and without one the first night after the start.
pub async fn run(kms: Weak<Kms>, backups: Arc<Backups>, interval: Duration) {
    let Some(now) = kms.upgrade().map(|kms| kms.clock().now_secs()) else {
        return;
    };
    let baseline = list(&backups.dir)
        .ok()
        .and_then(|archives| archives.last().map(|a| a.created_at))
        .unwrap_or(now);
    // After a failed snapshot (a full disk, say), the next attempt waits an hour, not a check.
    const RETRY_AFTER: u64 = 3_600;
    let mut failed_at: Option<u64> = None;
    loop {
        tokio::time::sleep(interval).await;
        let Some(kms) = kms.upgrade() else {
            return;
        };
        // Not the leader: the night's snapshot is another node's.
        if !kms.store().is_leader() {
            continue;
        }
        let last = match kms.store().last_snapshot() {
            Ok(last) => last.unwrap_or(baseline),
            Err(error) => {
                tracing::warn!(%error, "cannot read when the last snapshot was taken; retrying");
                continue;
            }
        };
        let now = kms.clock().now_secs();
        if !night_due(now, backups.at_secs, last)
            || failed_at.is_some_and(|at| now < at.saturating_add(RETRY_AFTER))
        {
            continue;
        }
        let backups = Arc::clone(&backups);
        match tokio::task::spawn_blocking(move || backups.take(&kms, None)).await {
            Ok(Ok(_)) => failed_at = None,
            // Logged and recorded for backup-status; tried again in an hour.
            Ok(Err(error)) => {
                failed_at = Some(now);
                tracing::error!(%error, "nightly snapshot failed; trying again in an hour");
            }
            // Cancelled by the shutdown: the next start takes the night's snapshot it missed.
            Err(error) if error.is_cancelled() => {
                tracing::info!(
                    "nightly snapshot cancelled by the shutdown; taken at the next start"
                );
            }
            Err(error) => tracing::error!(%error, "nightly snapshot task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_snapshot_is_the_next_occurrence_of_the_time_of_day() {
        let midnight = 20_000 * 86_400;
        assert_eq!(next_due(midnight, 7200), midnight + 7200);
        assert_eq!(next_due(midnight + 7199, 7200), midnight + 7200);
        assert_eq!(next_due(midnight + 7200, 7200), midnight + 86_400 + 7200);
        assert_eq!(next_due(midnight + 80_000, 7200), midnight + 86_400 + 7200);
    }

    #[test]
    fn a_night_is_due_until_a_snapshot_after_its_time() {
        let midnight = 20_000 * 86_400;
        let two = 7200;
        let yesterday = midnight - 86_400 + two + 5;
        // At 02:30, last night's (yesterday 02:00) the last: today's is due (a restart, a
        // failover, or simply the first check after 02:00).
        assert!(night_due(midnight + two + 1800, two, yesterday));
        // Taken at 02:00:03 today: not again today.
        assert!(!night_due(midnight + two + 1800, two, midnight + two + 3));
        assert!(!night_due(midnight + 80_000, two, midnight + two + 3));
        // Before today's time: yesterday's counts.
        assert!(!night_due(midnight + 60, two, yesterday));
        // Down for three nights: one snapshot at once, not three.
        assert!(night_due(midnight + two + 60, two, yesterday - 3 * 86_400));
    }
}
