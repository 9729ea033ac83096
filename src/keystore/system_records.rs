//! What the system database keeps besides the tenants: master key rotation state and retired
//! generations, audit heads, the last snapshot, support grants and approvals, last uses,
//! remembered request_ids, scheduled rotation checks and pending destructions.

use std::collections::HashMap;

use crate::ids::{ID_LEN, KeyId, KeyVersion, TenantId};

use super::layout::{
    APPROVAL_PREFIX, AUDIT_HEAD_KEY, DESTRUCTION_PREFIX, GRANT_PREFIX, LAST_SNAPSHOT_KEY,
    LAST_USE_PREFIX, MWK_RETIRED_PREFIX, MWK_ROTATION_KEY, REQUEST_PREFIX, ROTATION_PREFIX,
    TENANT_DESTRUCTION_PREFIX,
};
#[cfg(feature = "test-hooks")]
use super::layout::{LAYOUT_KEY, LAYOUT1_REQUEST_PREFIX};
use super::system::{
    DB_ID, KeyStore, PendingDestruction, audit_head_key, request_key, retired_key, rotation_key,
};
use super::{Error, decode, encode, prefixed};

impl KeyStore {
    /// The master key rotation in progress, if any.
    ///
    /// # Errors
    /// [`Error::Integrity`] if the journal fails its MAC.
    pub fn mwk_rotation(&self) -> Result<Option<super::MwkRotation>, Error> {
        self.system
            .read(MWK_ROTATION_KEY)?
            .map(|payload| decode(&payload))
            .transpose()
    }

    /// Writes the rotation journal (start, or the cursor after a tenant).
    ///
    /// # Errors
    /// Storage errors.
    pub fn set_mwk_rotation(&self, rotation: &super::MwkRotation) -> Result<(), Error> {
        self.system
            .commit(vec![(MWK_ROTATION_KEY.to_vec(), encode(rotation)?)], vec![])
    }

    /// Ends a rotation: the journal goes and the retired generations are recorded with their
    /// destruction dates, in one commit. Generations already retired keep their dates.
    ///
    /// # Errors
    /// Storage errors.
    pub fn finish_mwk_rotation(&self, retired: &[(u32, u64)]) -> Result<(), Error> {
        let known: Vec<u32> = self.retired_mwks()?.into_iter().map(|(g, _)| g).collect();
        let mut inserts = Vec::new();
        for (generation, at) in retired {
            if !known.contains(generation) {
                inserts.push((retired_key(*generation), encode(at)?));
            }
        }
        self.system.commit(inserts, vec![MWK_ROTATION_KEY.to_vec()])
    }

    /// Retired MWK generations and when each is destroyed.
    ///
    /// # Errors
    /// [`Error::Integrity`] if an entry fails its MAC.
    pub fn retired_mwks(&self) -> Result<Vec<(u32, u64)>, Error> {
        let mut all = Vec::new();
        for (key, _) in self.system.db.scan_prefix(MWK_RETIRED_PREFIX)? {
            let payload = self.system.read(&key)?.ok_or(Error::Encoding)?;
            let generation: [u8; 4] = key[MWK_RETIRED_PREFIX.len()..]
                .try_into()
                .map_err(|_| Error::Encoding)?;
            all.push((u32::from_be_bytes(generation), decode(&payload)?));
        }
        Ok(all)
    }

    /// Forgets a retired generation once it is destroyed.
    ///
    /// # Errors
    /// Storage errors.
    pub fn remove_retired_mwk(&self, generation: u32) -> Result<(), Error> {
        self.system.commit(vec![], vec![retired_key(generation)])
    }

    /// The audit chain head stored at the last checkpoint.
    ///
    /// # Errors
    /// [`Error::Integrity`] if it fails its MAC.
    pub fn audit_head(&self, node: &str) -> Result<Option<crate::audit::ChainHead>, Error> {
        let stored = match self.system.read(&audit_head_key(node))? {
            Some(payload) => Some(payload),
            // Written before heads were kept per node (one node, one log).
            None => self.system.read(AUDIT_HEAD_KEY)?,
        };
        stored.map(|payload| decode(&payload)).transpose()
    }

    /// Stores the audit chain head (flushed).
    ///
    /// # Errors
    /// Storage errors.
    pub fn set_audit_head(&self, node: &str, head: &crate::audit::ChainHead) -> Result<(), Error> {
        self.system
            .commit(vec![(audit_head_key(node), encode(head)?)], vec![])
    }

    /// When the last snapshot into the backup directory was taken (seconds), if one was since
    /// this was first recorded.
    ///
    /// # Errors
    /// Storage and integrity errors.
    pub fn last_snapshot(&self) -> Result<Option<u64>, Error> {
        self.system
            .read(LAST_SNAPSHOT_KEY)?
            .map(|payload| decode(&payload))
            .transpose()
    }

    /// Records a snapshot taken at `at` into the backup directory (flushed).
    ///
    /// # Errors
    /// Storage errors.
    pub fn set_last_snapshot(&self, at: u64) -> Result<(), Error> {
        self.system
            .commit(vec![(LAST_SNAPSHOT_KEY.to_vec(), encode(&at)?)], vec![])
    }

    /// Writes (creates or updates) a support grant (flushed).
    ///
    /// # Errors
    /// Storage errors.
    pub fn put_grant(&self, grant: &super::GrantRecord) -> Result<(), Error> {
        self.system.commit(
            vec![(prefixed(GRANT_PREFIX, grant.id.as_bytes()), encode(grant)?)],
            vec![],
        )
    }

    /// The support grant with this id.
    ///
    /// # Errors
    /// [`Error::Integrity`] if it fails its MAC.
    pub fn grant(&self, id: &str) -> Result<Option<super::GrantRecord>, Error> {
        self.system
            .read(&prefixed(GRANT_PREFIX, id.as_bytes()))?
            .map(|payload| decode(&payload))
            .transpose()
    }

    /// The support grant with this id and its stored bytes, for [`KeyStore::replace_grant`].
    ///
    /// # Errors
    /// [`Error::Integrity`] if it fails its MAC.
    pub fn grant_for_update(
        &self,
        id: &str,
    ) -> Result<Option<(super::GrantRecord, Vec<u8>)>, Error> {
        let key = prefixed(GRANT_PREFIX, id.as_bytes());
        let Some(raw) = self.system.db.get(&key)? else {
            return Ok(None);
        };
        let record = self
            .system
            .mac
            .open(DB_ID, &key, &raw)
            .ok_or(Error::Integrity {
                database: "system".into(),
                reason: "a record fails its MAC",
            })?;
        Ok(Some((decode(record.payload)?, raw)))
    }

    /// Writes `grant` if its record is still the `expected` bytes that
    /// [`KeyStore::grant_for_update`] read: a guarded transition, so two decisions on one
    /// grant (an approval and a revocation, on one node or two) cannot both be told they won.
    /// `Ok(false)`: it changed meanwhile and nothing was written; read it again and decide
    /// again.
    ///
    /// # Errors
    /// Storage errors.
    pub fn replace_grant(
        &self,
        expected: &[u8],
        grant: &super::GrantRecord,
    ) -> Result<bool, Error> {
        let key = prefixed(GRANT_PREFIX, grant.id.as_bytes());
        let guard = super::engine::Guard {
            key: &key,
            value: Some(expected),
        };
        self.system
            .commit_guarded(vec![(key.clone(), encode(grant)?)], guard)
    }

    /// Every record under `prefix`, MAC-checked and decoded, with the rest of its key.
    pub(super) fn scan<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &[u8],
    ) -> Result<Vec<(Vec<u8>, T)>, Error> {
        let mut all = Vec::new();
        for (key, _) in self.system.db.scan_prefix(prefix)? {
            let payload = self.system.read(&key)?.ok_or(Error::Encoding)?;
            all.push((key[prefix.len()..].to_vec(), decode(&payload)?));
        }
        Ok(all)
    }

    /// Every support grant, in id order.
    ///
    /// # Errors
    /// [`Error::Integrity`] if one fails its MAC.
    pub fn grants(&self) -> Result<Vec<super::GrantRecord>, Error> {
        Ok(self
            .scan(GRANT_PREFIX)?
            .into_iter()
            .map(|(_, grant)| grant)
            .collect())
    }

    /// Stores principals' last use (one flushed commit).
    ///
    /// # Errors
    /// Storage errors.
    pub fn set_last_uses(&self, uses: &[(String, super::LastUse)]) -> Result<(), Error> {
        let puts = uses
            .iter()
            .map(|(identity, last)| {
                Ok((
                    prefixed(LAST_USE_PREFIX, identity.as_bytes()),
                    encode(last)?,
                ))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        self.system.commit(puts, vec![])
    }

    /// Every principal's stored last use, by identity.
    ///
    /// # Errors
    /// [`Error::Integrity`] if one fails its MAC.
    pub fn last_uses(&self) -> Result<HashMap<String, super::LastUse>, Error> {
        Ok(self
            .scan(LAST_USE_PREFIX)?
            .into_iter()
            .map(|(identity, last)| (String::from_utf8_lossy(&identity).into_owned(), last))
            .collect())
    }

    /// Removes the support grants and dual-control approvals that ended before `before`
    /// (seconds since the Unix epoch), in one commit; returns how many of each. A grant ends
    /// when it is denied, revoked or expires, or when its request expires unanswered; an
    /// approval when it can no longer be approved (`expires_at`), carried out or not. The
    /// audit log keeps their whole story; the store keeps only what can still matter.
    ///
    /// # Errors
    /// Storage and integrity errors (nothing is removed then).
    pub fn prune_ended_access(&self, before: u64) -> Result<(usize, usize), Error> {
        use super::{ApprovalRecord, GrantRecord, GrantState};
        let grants: Vec<Vec<u8>> = self
            .scan::<GrantRecord>(GRANT_PREFIX)?
            .into_iter()
            .filter(|(_, grant)| {
                let ended = match grant.state {
                    GrantState::Pending => Some(grant.request_expires_at),
                    GrantState::Approved => grant.expires_at,
                    GrantState::Denied => grant.decided_at,
                    GrantState::Revoked => grant.revoked_at,
                };
                ended.is_some_and(|at| at < before)
            })
            .map(|(id, _)| prefixed(GRANT_PREFIX, &id))
            .collect();
        let approvals: Vec<Vec<u8>> = self
            .scan::<ApprovalRecord>(APPROVAL_PREFIX)?
            .into_iter()
            .filter(|(_, approval)| approval.expires_at < before)
            .map(|(id, _)| prefixed(APPROVAL_PREFIX, &id))
            .collect();
        let counts = (grants.len(), approvals.len());
        if counts != (0, 0) {
            self.system
                .commit(vec![], grants.into_iter().chain(approvals).collect())?;
        }
        Ok(counts)
    }

    /// The stored response of a mutation that `identity` made with `request_id` in `scope`
    /// (a tenant name, or `*` for calls on no tenant).
    ///
    /// # Errors
    /// Storage and integrity errors.
    pub fn done_request(
        &self,
        scope: &str,
        identity: &str,
        request_id: &str,
    ) -> Result<Option<super::DoneRequest>, Error> {
        self.system
            .read(&request_key(scope, identity, request_id))?
            .map(|payload| decode(&payload))
            .transpose()
    }

    /// Keeps a mutation's response under its caller's request_id (one flushed commit).
    ///
    /// # Errors
    /// Storage errors.
    pub fn put_done_request(
        &self,
        scope: &str,
        identity: &str,
        request_id: &str,
        done: &super::DoneRequest,
    ) -> Result<(), Error> {
        self.system.commit(
            vec![(request_key(scope, identity, request_id), encode(done)?)],
            vec![],
        )
    }

    /// Removes the kept responses made before `before`, and in each scope all but the newest
    /// `keep` of the rest, in one commit; returns how many went.
    ///
    /// # Errors
    /// Storage and integrity errors (nothing is removed then).
    pub fn prune_done_requests(&self, before: u64, keep: usize) -> Result<usize, Error> {
        let mut by_scope: HashMap<Vec<u8>, Vec<(u64, Vec<u8>)>> = HashMap::new();
        let mut removes = Vec::new();
        for (rest, done) in self.scan::<super::DoneRequest>(REQUEST_PREFIX)? {
            let key = prefixed(REQUEST_PREFIX, &rest);
            if done.at < before {
                removes.push(key);
                continue;
            }
            let scope = rest
                .split(|b| *b == b'/')
                .next()
                .unwrap_or_default()
                .to_vec();
            by_scope.entry(scope).or_default().push((done.at, key));
        }
        for mut entries in by_scope.into_values() {
            if entries.len() > keep {
                entries.sort();
                let excess = entries.len() - keep;
                removes.extend(entries.into_iter().take(excess).map(|(_, key)| key));
            }
        }
        let removed = removes.len();
        if removed > 0 {
            self.system.commit(vec![], removes)?;
        }
        Ok(removed)
    }

    /// Rewrites the system database as a keyfront of key layout 1 left it: remembered
    /// request_ids under `r/`, beside the rotation checks, and no layout record. Tests only:
    /// the store then needs [`SystemDb::migrate`] at its next open.
    ///
    /// # Errors
    /// Storage and integrity errors.
    #[cfg(feature = "test-hooks")]
    pub fn dangerous_rewrite_as_layout1(&self) -> Result<(), Error> {
        let mut inserts = Vec::new();
        let mut removes = vec![LAYOUT_KEY.to_vec()];
        for (rest, done) in self.scan::<super::DoneRequest>(REQUEST_PREFIX)? {
            inserts.push((prefixed(LAYOUT1_REQUEST_PREFIX, &rest), encode(&done)?));
            removes.push(prefixed(REQUEST_PREFIX, &rest));
        }
        self.system.commit(inserts, removes)
    }

    /// Writes (creates or updates) an approval.
    ///
    /// # Errors
    /// Storage errors.
    pub fn put_approval(&self, approval: &super::ApprovalRecord) -> Result<(), Error> {
        self.system.commit(
            vec![(
                prefixed(APPROVAL_PREFIX, approval.id.as_bytes()),
                encode(approval)?,
            )],
            vec![],
        )
    }

    /// The approval with this id.
    ///
    /// # Errors
    /// [`Error::Integrity`] if it fails its MAC.
    pub fn approval(&self, id: &str) -> Result<Option<super::ApprovalRecord>, Error> {
        self.system
            .read(&prefixed(APPROVAL_PREFIX, id.as_bytes()))?
            .map(|payload| decode(&payload))
            .transpose()
    }

    /// Every approval, oldest id order.
    ///
    /// # Errors
    /// [`Error::Integrity`] if one fails its MAC.
    pub fn approvals(&self) -> Result<Vec<super::ApprovalRecord>, Error> {
        Ok(self
            .scan(APPROVAL_PREFIX)?
            .into_iter()
            .map(|(_, approval)| approval)
            .collect())
    }

    /// Sets when the scheduler next looks at a key's rotation period.
    ///
    /// # Errors
    /// Storage errors.
    pub fn set_rotation_check(
        &self,
        tenant: TenantId,
        key_id: KeyId,
        at: u64,
    ) -> Result<(), Error> {
        self.system
            .commit(vec![(rotation_key(tenant, key_id), encode(&at)?)], vec![])
    }

    /// Forgets a key's rotation check.
    ///
    /// # Errors
    /// Storage errors.
    pub fn remove_rotation_check(&self, tenant: TenantId, key_id: KeyId) -> Result<(), Error> {
        self.system
            .commit(vec![], vec![rotation_key(tenant, key_id)])
    }

    /// Every key with a rotation check, and when it is due.
    ///
    /// # Errors
    /// [`Error::Integrity`] if an entry fails its MAC.
    pub fn rotation_checks(&self) -> Result<Vec<(TenantId, KeyId, u64)>, Error> {
        let mut entries = Vec::new();
        for (key, _) in self.system.db.scan_prefix(ROTATION_PREFIX)? {
            let payload = self.system.read(&key)?.ok_or(Error::Encoding)?;
            let rest = &key[ROTATION_PREFIX.len()..];
            let tenant: [u8; ID_LEN] = rest
                .get(..ID_LEN)
                .and_then(|b| b.try_into().ok())
                .ok_or(Error::Encoding)?;
            let key_id: [u8; ID_LEN] = rest
                .get(ID_LEN..)
                .and_then(|b| b.try_into().ok())
                .ok_or(Error::Encoding)?;
            entries.push((
                TenantId::from_bytes(tenant),
                KeyId::from_bytes(key_id),
                decode(&payload)?,
            ));
        }
        Ok(entries)
    }

    /// Every tenant whose destruction is scheduled, with its date.
    ///
    /// # Errors
    /// [`Error::Integrity`] if an entry fails its MAC.
    pub fn pending_tenant_destructions(&self) -> Result<Vec<(TenantId, u64)>, Error> {
        let mut entries = Vec::new();
        for (key, _) in self.system.db.scan_prefix(TENANT_DESTRUCTION_PREFIX)? {
            let payload = self.system.read(&key)?.ok_or(Error::Encoding)?;
            let id: [u8; ID_LEN] = key[TENANT_DESTRUCTION_PREFIX.len()..]
                .try_into()
                .map_err(|_| Error::Encoding)?;
            entries.push((TenantId::from_bytes(id), decode(&payload)?));
        }
        Ok(entries)
    }

    /// Records a pending destruction (before the tenant commit that schedules it).
    ///
    /// # Errors
    /// Storage errors.
    pub fn add_pending_destruction(&self, entry: &PendingDestruction) -> Result<(), Error> {
        self.system
            .commit(vec![(entry.record_key(), encode(&entry.at)?)], vec![])
    }

    /// Forgets a pending destruction (after the tenant commit that cancels or executes it).
    ///
    /// # Errors
    /// Storage errors.
    pub fn remove_pending_destruction(&self, entry: &PendingDestruction) -> Result<(), Error> {
        self.system.commit(vec![], vec![entry.record_key()])
    }

    /// Every pending destruction, due or not.
    ///
    /// # Errors
    /// [`Error::Integrity`] if an entry fails its MAC.
    pub fn pending_destructions(&self) -> Result<Vec<PendingDestruction>, Error> {
        let mut entries = Vec::new();
        for (key, _) in self.system.db.scan_prefix(DESTRUCTION_PREFIX)? {
            let payload = self.system.read(&key)?.ok_or(Error::Encoding)?;
            let rest = &key[DESTRUCTION_PREFIX.len()..];
            if rest.len() != 2 * ID_LEN + 4 {
                return Err(Error::Encoding);
            }
            let tenant: [u8; ID_LEN] = rest[..ID_LEN].try_into().map_err(|_| Error::Encoding)?;
            let key_id: [u8; ID_LEN] = rest[ID_LEN..2 * ID_LEN]
                .try_into()
                .map_err(|_| Error::Encoding)?;
            let version: [u8; 4] = rest[2 * ID_LEN..].try_into().map_err(|_| Error::Encoding)?;
            entries.push(PendingDestruction {
                tenant: TenantId::from_bytes(tenant),
                key_id: KeyId::from_bytes(key_id),
                version: KeyVersion(u32::from_be_bytes(version)),
                at: decode(&payload)?,
            });
        }
        Ok(entries)
    }
}
