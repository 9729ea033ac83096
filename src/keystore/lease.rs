//! Leadership: which node runs the singletons (scheduled rotations and destructions, nightly
//! backups, master key rotation).
//!
//! On one node it is always that node. On a shared engine it is the holder of a lease row
//! (`postgres.rs`): acquired when free or expired, renewed every fifth of its term, and each
//! new holder gets a larger fencing token. Expiry is judged by the server's clock alone; the
//! holder counts its own term from the moment it *sent* the renewal, minus a margin, so it
//! stops trusting the lease before the server could hand it to another node: a node that
//! loses the lease stops before another starts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// This node's view of the leader lease.
#[derive(Debug)]
pub struct Lease {
    base: Instant,
    // Milliseconds since `base` until which this node holds the lease (0: it does not;
    // `u64::MAX`: always, on a single node).
    held_until_ms: AtomicU64,
    // The fencing token of the current term (0: none).
    token: AtomicU64,
}

impl Lease {
    /// A lease held forever (single node).
    pub(crate) fn always() -> Self {
        Self {
            base: Instant::now(),
            held_until_ms: AtomicU64::new(u64::MAX),
            token: AtomicU64::new(1),
        }
    }

    /// A lease not held yet.
    pub(crate) fn contested() -> Self {
        Self {
            base: Instant::now(),
            held_until_ms: AtomicU64::new(0),
            token: AtomicU64::new(0),
        }
    }

    /// Milliseconds since this lease view began.
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records a granted or renewed term: held until `sent_ms + term` (the caller has taken
    /// the margin off `term` already).
    pub(crate) fn granted(&self, token: u64, sent_ms: u64, term: Duration) {
        let term = u64::try_from(term.as_millis()).unwrap_or(u64::MAX);
        self.token.store(token, Ordering::SeqCst);
        self.held_until_ms
            .store(sent_ms.saturating_add(term), Ordering::SeqCst);
    }

    /// Records that another node holds the lease.
    pub(crate) fn refused(&self) {
        self.held_until_ms.store(0, Ordering::SeqCst);
    }

    /// Whether this node holds the lease now.
    pub fn is_held(&self) -> bool {
        self.now_ms() < self.held_until_ms.load(Ordering::SeqCst)
    }

    /// The fencing token of the term this node holds, if it holds one.
    pub fn token(&self) -> Option<u64> {
        let token = self.token.load(Ordering::SeqCst);
        (self.is_held() && token != 0).then_some(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_term_ends_on_time_and_a_refusal_ends_it_at_once() {
        let lease = Lease::contested();
        assert!(!lease.is_held() && lease.token().is_none());
        lease.granted(7, lease.now_ms(), Duration::from_millis(60));
        assert_eq!(lease.token(), Some(7));
        std::thread::sleep(Duration::from_millis(90));
        assert!(!lease.is_held(), "term over");
        lease.granted(8, lease.now_ms(), Duration::from_secs(10));
        assert!(lease.is_held());
        lease.refused();
        assert!(!lease.is_held());
        assert!(Lease::always().is_held());
    }
}
