//! The server's scheduler: at each tick it rotates keys whose rotation period elapsed, expires
//! remembered request_ids, removes support grants and approvals that ended over 30 days ago,
//! and executes the tenant and version destructions whose pending window has ended.
//!
//! Destruction trusts the wall clock, so the scheduler watches it: if wall time moved more
//! than an hour further than monotonic time between two ticks, the clock jumped (a wrong NTP
//! step, a mistaken `date`). Destructions then stop until the process restarts, and an alert is
//! logged: better a late destruction than an early one.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::Kms;

/// A forward jump of the wall clock beyond this pauses destructive jobs.
pub const MAX_CLOCK_JUMP: Duration = Duration::from_secs(3600);

/// Runs one tick every `interval` until the domain is dropped.
pub async fn run(kms: Weak<Kms>, interval: Duration) {
    let Some(clock) = kms.upgrade().map(|kms| Arc::clone(kms.clock())) else {
        return;
    };
    let mut last_wall = clock.now_secs();
    let mut last_monotonic = clock.monotonic();
    let mut paused = false;
    loop {
        tokio::time::sleep(interval).await;
        let (wall, monotonic) = (clock.now_secs(), clock.monotonic());
        let wall_passed = wall.saturating_sub(last_wall);
        let really_passed = monotonic.saturating_sub(last_monotonic).as_secs();
        (last_wall, last_monotonic) = (wall, monotonic);
        if !paused && wall_passed > really_passed + MAX_CLOCK_JUMP.as_secs() {
            paused = true;
            crate::metrics::global().scheduler_paused(true);
            tracing::error!(
                alert = "clock_jump",
                jumped_secs = wall_passed - really_passed,
                "ALERT: the wall clock jumped forward; scheduled destructions are paused until \
                 keyfront restarts. Check the clock before restarting."
            );
        }
        let Some(kms) = kms.upgrade() else {
            return;
        };
        // In a cluster only the holder of the leader lease runs the jobs (none twice, none
        // missed: each job is idempotent and resumes from the store).
        if !kms.store().is_leader() {
            continue;
        }
        if kms.store().mwk_rotation().is_ok_and(|r| r.is_some()) {
            job(
                &kms,
                "resuming the master key rotation",
                Kms::resume_master_key_rotation,
            )
            .await;
        }
        // Rotation is not destructive: it goes on while destructions are paused.
        job(&kms, "scheduled rotations", Kms::run_due_rotations).await;
        if paused {
            continue;
        }
        // Expiring request_ids and removing ended grants trust the wall clock too: paused
        // with the destructions. Every one of these runs as of `wall`, the reading checked
        // above: a jump while the tick runs (during the rotations, say) must not make anything
        // due that the check did not see. (A test caught that race: a version destroyed
        // although the pause was raised.)
        job(&kms, "expiring request_ids", move |kms| {
            kms.prune_request_ids_at(wall)
        })
        .await;
        job(&kms, "pruning ended grants and approvals", move |kms| {
            kms.prune_access_history_at(wall)
        })
        .await;
        if let Some(destroyed) = job(&kms, "scheduled destructions", move |kms| {
            kms.run_due_destructions_at(wall)
        })
        .await
        {
            crate::metrics::global().versions_destroyed(destroyed.len());
        }
    }
}

/// Runs one job of a tick on the blocking pool; a failure is logged and the job runs again
/// next tick (every job resumes from the store).
async fn job<T: Send + 'static>(
    kms: &Arc<Kms>,
    what: &'static str,
    f: impl FnOnce(&Kms) -> Result<T, super::Error> + Send + 'static,
) -> Option<T> {
    let kms = Arc::clone(kms);
    match tokio::task::spawn_blocking(move || f(&kms)).await {
        Ok(Ok(value)) => Some(value),
        Ok(Err(error)) => {
            tracing::error!(%error, "{what} failed; retrying next tick");
            None
        }
        // The runtime is shutting down (SIGTERM): the job did not finish and runs again at the
        // next start. Not an error.
        Err(error) if error.is_cancelled() => {
            tracing::debug!(what, "scheduler job cancelled by the shutdown");
            None
        }
        Err(error) => {
            tracing::error!(%error, "scheduler task failed");
            None
        }
    }
}
