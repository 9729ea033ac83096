//! What one node learns of the commits of the others, and how far it may trust its caches.
//!
//! On a shared engine every commit that changes a tenant announces the tenant (PostgreSQL:
//! `NOTIFY` in the committing transaction, so only committed changes are announced). Each
//! node listens, records the tenants announced here, and confirms its listener with a
//! heartbeat on the same connection: PostgreSQL delivers a session's notifications before the
//! answer to its next query, so once a heartbeat sent at `t` is answered, every change committed
//! before `t` has been recorded. The node's caches are *fresh* while the newest confirmed
//! heartbeat is younger than `bound`; a cache that is not fresh is not used for decisions
//! (the store is read instead), except when the store cannot be reached at all.
//!
//! Nothing here is pushed into the caches: the domain layer takes the recorded changes before
//! it reads a cache (`Kms::cache_trusted`), so the invalidation and the read it protects are on
//! the same thread and cannot be reordered.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::ids::TenantId;

/// Changes announced by other nodes and not yet applied to this node's caches.
#[derive(Debug, Default)]
pub struct Pending {
    /// Everything may have changed (the listener was reconnected and may have missed some).
    pub everything: bool,
    /// The tenants that changed.
    pub tenants: HashSet<TenantId>,
}

/// The change feed of one node (see the module docs).
#[derive(Debug)]
pub struct Changes {
    base: Instant,
    bound: Duration,
    // Milliseconds since `base` at which the newest answered heartbeat was sent (0: none yet).
    confirmed_ms: AtomicU64,
    // Raised for every recorded change, so a reader can tell cheaply whether any is pending.
    seq: AtomicU64,
    pending: Mutex<Pending>,
    // Set while the listener cannot reach the server (connect or heartbeat failed).
    unreachable: AtomicBool,
}

impl Changes {
    /// A feed whose caches count as fresh for `bound` after each confirmed heartbeat.
    pub(crate) fn new(bound: Duration) -> Self {
        Self {
            base: Instant::now(),
            bound,
            confirmed_ms: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            pending: Mutex::new(Pending::default()),
            unreachable: AtomicBool::new(false),
        }
    }

    /// Milliseconds since this feed began (at least 1, so that 0 means "never").
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Records that another node changed `tenant`.
    pub(crate) fn tenant_changed(&self, tenant: TenantId) {
        self.pending
            .lock()
            .expect("changes lock poisoned")
            .tenants
            .insert(tenant);
        self.seq.fetch_add(1, Ordering::SeqCst);
    }

    /// Records that anything may have changed.
    pub(crate) fn everything_changed(&self) {
        self.pending
            .lock()
            .expect("changes lock poisoned")
            .everything = true;
        self.seq.fetch_add(1, Ordering::SeqCst);
    }

    /// Confirms that every change committed before `sent_ms` has been recorded.
    pub(crate) fn confirm(&self, sent_ms: u64) {
        self.confirmed_ms.fetch_max(sent_ms, Ordering::SeqCst);
        self.unreachable.store(false, Ordering::SeqCst);
    }

    /// Records that the listener lost the server.
    pub(crate) fn lost(&self) {
        self.unreachable.store(true, Ordering::SeqCst);
    }

    /// Whether the listener has lost the server and not reached it again: requests then
    /// answer from the caches without waiting on the store first.
    pub fn unreachable(&self) -> bool {
        self.unreachable.load(Ordering::SeqCst)
    }

    /// A number that moves whenever a change is recorded.
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// Takes the changes recorded so far.
    pub fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().expect("changes lock poisoned"))
    }

    /// Whether every change committed more than `bound` ago is known here.
    pub fn is_fresh(&self) -> bool {
        self.confirmed_within(self.bound)
    }

    /// Whether the listener was confirmed within `age` (for serving from caches while the
    /// store is unreachable: only state that was fresh at most `age` ago).
    pub fn confirmed_within(&self, age: Duration) -> bool {
        let confirmed = self.confirmed_ms.load(Ordering::SeqCst);
        let age = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        confirmed != 0 && self.now_ms() < confirmed.saturating_add(age)
    }

    /// The bound after which an unconfirmed node stops trusting its caches; a commit that
    /// must be seen everywhere before it is acknowledged waits this long.
    pub fn bound(&self) -> Duration {
        self.bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feed_is_fresh_only_within_its_bound_after_a_confirmation() {
        let changes = Changes::new(Duration::from_millis(50));
        assert!(!changes.is_fresh(), "never confirmed");
        changes.confirm(changes.now_ms());
        assert!(changes.is_fresh());
        std::thread::sleep(Duration::from_millis(80));
        assert!(!changes.is_fresh(), "confirmation too old");
        assert!(changes.confirmed_within(Duration::from_secs(10)));
    }

    #[test]
    fn recorded_changes_are_taken_once() {
        let changes = Changes::new(Duration::from_secs(1));
        let before = changes.seq();
        let tenant = TenantId::random();
        changes.tenant_changed(tenant);
        assert_ne!(changes.seq(), before);
        let pending = changes.take();
        assert!(pending.tenants.contains(&tenant) && !pending.everything);
        assert!(changes.take().tenants.is_empty());
        changes.everything_changed();
        assert!(changes.take().everything);
    }
}
