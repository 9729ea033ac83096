//! Heads and anchors: how a tenant database proves it is whole and current. Every commit to a
//! tenant database moves its head (sequence, digest of all records), and the system database
//! keeps a copy of each tenant's head, its anchor. A tenant database whose head is behind its
//! anchor was rolled back; one a commit ahead is the one case a crash leaves, rolled forward.
//! The tenant databases check and move anchors through [`Anchors`], which the system database
//! implements; neither needs the other's type.

use serde::{Deserialize, Serialize};

use super::Error;
use crate::ids::TenantId;

/// The anchor of a tenant database: last commit's sequence and the digest of all records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantHead {
    /// Sequence of the last commit (starts at 1).
    pub seq: u64,
    /// HMAC over (record key, record MAC) of every record but the head, in key order.
    pub digest: [u8; 32],
}

/// Where tenant heads are anchored (the system database). Implementors store and read the
/// anchors; the checks are the same for every implementor.
pub(crate) trait Anchors: Send + Sync {
    /// The anchored head of tenant `id` (none: never anchored, or destroyed).
    ///
    /// # Errors
    /// Store errors.
    fn tenant_head(&self, id: TenantId) -> Result<Option<TenantHead>, Error>;

    /// Moves the anchor of tenant `id` forward to `head`, never back: nodes anchor
    /// concurrently, and a late anchor of an older commit must not overwrite a newer one (the
    /// tenant would then look rolled back). A tenant without an anchor (destroyed meanwhile)
    /// stays without one.
    ///
    /// # Errors
    /// Store errors.
    fn advance_tenant_head(&self, id: TenantId, head: &TenantHead) -> Result<(), Error>;

    /// Checks a tenant database's head against the system's copy, rolling forward the one case
    /// a crash can produce: the tenant committed, the system copy was not yet updated.
    fn anchor_tenant(&self, id: TenantId, head: &TenantHead) -> Result<(), Error> {
        self.check_tenant_head(id, self.tenant_head(id)?, head, false)
    }

    /// [`Self::anchor_tenant`] against an anchor read before the tenant's head was. On a
    /// shared store (`shared`) a head more than one commit ahead of that anchor is other
    /// nodes' commits since, and moves the anchor forward too; a head behind it is a rollback
    /// either way.
    fn check_tenant_head(
        &self,
        id: TenantId,
        anchored: Option<TenantHead>,
        head: &TenantHead,
        shared: bool,
    ) -> Result<(), Error> {
        match anchored {
            Some(anchored) if anchored == *head => Ok(()),
            Some(anchored)
                if head.seq == anchored.seq + 1 || (shared && head.seq > anchored.seq) =>
            {
                if shared {
                    // Usually another node's commit whose anchor is on its way: routine.
                    tracing::debug!(tenant = %id, seq = head.seq, "tenant head ahead of its anchor");
                } else {
                    tracing::info!(tenant = %id, seq = head.seq, "rolling tenant head forward");
                }
                self.advance_tenant_head(id, head)
            }
            Some(_) => Err(Error::Rollback(id)),
            None => Err(Error::Integrity {
                database: "system".into(),
                reason: "tenant has no anchored head",
            }),
        }
    }
}
