//! The key space of both kinds of database: every record key and key prefix, with its owner,
//! in one table per database.
//!
//! Two owners once shared `r/` in the system database (rotation checks and remembered
//! request_ids): each then read the other's records as its own, failed to decode them, and
//! scheduled rotation stopped for every tenant. A prefix is therefore only ever named here, and
//! the tables are checked at compile time: no entry is a prefix of another entry of the same
//! database (an exact key counts as a prefix of itself), so no owner's scan can meet another
//! owner's records.
//!
//! Changing where an owner's records live needs a migration of stored records (see
//! [`SYSTEM_LAYOUT`] and `SystemDb::migrate`).

/// One owner's part of a database's key space.
#[derive(Debug, Clone, Copy)]
pub(super) struct Space {
    /// The key, or the prefix of every key, this owner writes.
    pub(super) prefix: &'static [u8],
    /// Who writes and reads it: for people reading the table, and for the tests.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) owner: &'static str,
}

// ---- The system database ----

/// The store's creation record.
pub(super) const META_KEY: &[u8] = b"meta";
/// The sequence of the last system commit.
pub(super) const SEQ_KEY: &[u8] = b"seq";
/// Which version of this table the stored records follow (absent: 1).
pub(super) const LAYOUT_KEY: &[u8] = b"layout";
/// `t/` ‖ tenant id → TenantRecord.
pub(super) const TENANT_PREFIX: &[u8] = b"t/";
/// `n/` ‖ tenant name → tenant id.
pub(super) const NAME_PREFIX: &[u8] = b"n/";
/// `h/` ‖ tenant id → the system's copy of the tenant database's head.
pub(super) const HEAD_PREFIX: &[u8] = b"h/";
/// `x/` ‖ tenant id → Tombstone of a destroyed tenant.
pub(super) const TOMBSTONE_PREFIX: &[u8] = b"x/";
/// `d/` ‖ tenant id ‖ key id ‖ version (u32 BE) → when (u64): pending version destructions.
/// A superset of the truth: written before the tenant commit that schedules, removed after the
/// one that cancels or destroys, so a crash can leave an extra entry but never lose one.
pub(super) const DESTRUCTION_PREFIX: &[u8] = b"d/";
/// `r/` ‖ tenant id ‖ key id → when to look at the key's rotation period next (u64). Never
/// later than the key's real due date: set to "now" when a period is set, recomputed from the
/// key only by the scheduler; a stray entry is dropped by the scheduler.
pub(super) const ROTATION_PREFIX: &[u8] = b"r/";
/// The master key rotation's journal while one runs.
pub(super) const MWK_ROTATION_KEY: &[u8] = b"m/rotation";
/// `m/retired/` ‖ generation (u32 BE) → its destruction date (u64).
pub(super) const MWK_RETIRED_PREFIX: &[u8] = b"m/retired/";
/// `a/` ‖ approval id → ApprovalRecord (dual control).
pub(super) const APPROVAL_PREFIX: &[u8] = b"a/";
/// `D/` ‖ tenant id → when (u64): pending tenant destructions, committed with the record.
pub(super) const TENANT_DESTRUCTION_PREFIX: &[u8] = b"D/";
/// `audit/head/` ‖ node → the audit chain head as of the node's last signed checkpoint
/// (`audit/head` alone: written before heads were kept per node).
pub(super) const AUDIT_HEAD_KEY: &[u8] = b"audit/head";
/// When the last snapshot into the backup directory was taken (u64 seconds): on a cluster the
/// nodes share it, so the leader of the night knows whether the night's snapshot was taken,
/// whichever node took it and wherever its directory is.
pub(super) const LAST_SNAPSHOT_KEY: &[u8] = b"backup/last";
/// `g/` ‖ grant id → GrantRecord (support access).
pub(super) const GRANT_PREFIX: &[u8] = b"g/";
/// `q/` ‖ scope (tenant name or `*`) ‖ `/` ‖ hex(sha256(identity ‖ 0 ‖ request_id)) →
/// DoneRequest: responses of mutations by request_id. (Layout 1 kept these under `r/`.)
pub(super) const REQUEST_PREFIX: &[u8] = b"q/";
/// `u/` ‖ identity → LastUse: when each principal was last authorized.
pub(super) const LAST_USE_PREFIX: &[u8] = b"u/";

/// The system database's key space.
pub(super) const SYSTEM: &[Space] = &[
    space(META_KEY, "the store's creation record"),
    space(SEQ_KEY, "the system commit sequence"),
    space(
        LAYOUT_KEY,
        "the version of this table that stored records follow",
    ),
    space(TENANT_PREFIX, "tenant records"),
    space(NAME_PREFIX, "tenant names"),
    space(HEAD_PREFIX, "tenant heads (anchors)"),
    space(TOMBSTONE_PREFIX, "tombstones of destroyed tenants"),
    space(
        DESTRUCTION_PREFIX,
        "the scheduler's pending version destructions",
    ),
    space(ROTATION_PREFIX, "the scheduler's rotation checks"),
    space(MWK_ROTATION_KEY, "the master key rotation journal"),
    space(MWK_RETIRED_PREFIX, "retired master key generations"),
    space(APPROVAL_PREFIX, "dual-control approvals"),
    space(
        TENANT_DESTRUCTION_PREFIX,
        "the scheduler's pending tenant destructions",
    ),
    space(AUDIT_HEAD_KEY, "audit chain heads"),
    space(LAST_SNAPSHOT_KEY, "when the last snapshot was taken"),
    space(GRANT_PREFIX, "support access grants"),
    space(REQUEST_PREFIX, "responses remembered by request_id"),
    space(LAST_USE_PREFIX, "principals' last use"),
];

/// The version of [`SYSTEM`] this build writes. Layout 1 kept remembered request_ids under
/// `r/`, the rotation checks' prefix; layout 2 moved them to `q/`.
pub(super) const SYSTEM_LAYOUT: u32 = 2;

/// The prefix under which layout 1 kept remembered request_ids (shared with rotation checks;
/// told apart by length: a rotation check's key is `r/` ‖ two ids, a request's is longer).
pub(super) const LAYOUT1_REQUEST_PREFIX: &[u8] = ROTATION_PREFIX;

// ---- A tenant database ----

/// The tenant database's head: sequence and digest of every other record.
pub(super) const HEAD_KEY: &[u8] = b"head";
/// `k/` ‖ key id → KeyRecord.
pub(super) const KEY_PREFIX: &[u8] = b"k/";
/// `n/` ‖ key name → key id.
pub(super) const KEY_NAME_PREFIX: &[u8] = b"n/";
/// `v/` ‖ key id ‖ version (u32 BE) → VersionRecord.
pub(super) const VERSION_PREFIX: &[u8] = b"v/";
/// `i/` ‖ key id → ImportRecord.
pub(super) const IMPORT_PREFIX: &[u8] = b"i/";
/// `p/` ‖ key name → ImportParametersRecord.
pub(super) const IMPORT_PARAMETERS_PREFIX: &[u8] = b"p/";

/// A tenant database's key space.
pub(super) const TENANT: &[Space] = &[
    space(HEAD_KEY, "the tenant database's head"),
    space(KEY_PREFIX, "key records"),
    space(KEY_NAME_PREFIX, "key names"),
    space(VERSION_PREFIX, "key versions"),
    space(IMPORT_PREFIX, "import records"),
    space(IMPORT_PARAMETERS_PREFIX, "import parameters"),
];

const fn space(prefix: &'static [u8], owner: &'static str) -> Space {
    Space { prefix, owner }
}

/// Whether `a` starts with `b` (a `const fn`: the tables are checked at compile time).
const fn starts_with(a: &[u8], b: &[u8]) -> bool {
    if b.len() > a.len() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Whether no entry of `table` is a prefix of another entry (or equal to one).
pub(super) const fn disjoint(table: &[Space]) -> bool {
    let mut i = 0;
    while i < table.len() {
        let mut j = 0;
        while j < table.len() {
            if i != j && starts_with(table[i].prefix, table[j].prefix) {
                return false;
            }
            j += 1;
        }
        i += 1;
    }
    true
}

// The construction check: a table where two owners meet does not compile.
const _: () = assert!(disjoint(SYSTEM), "two owners share a system key prefix");
const _: () = assert!(disjoint(TENANT), "two owners share a tenant key prefix");

/// The owner of `key` in `table`, if any.
#[cfg(test)]
fn owner(table: &[Space], key: &[u8]) -> Option<&'static str> {
    table
        .iter()
        .find(|space| key.starts_with(space.prefix))
        .map(|space| space.owner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_owner_has_a_space_of_its_own() {
        assert!(disjoint(SYSTEM));
        assert!(disjoint(TENANT));
        // The check itself finds a shared prefix, and one that is a prefix of another.
        assert!(!disjoint(&[space(b"r/", "a"), space(b"r/", "b")]));
        assert!(!disjoint(&[space(b"m/", "a"), space(b"m/retired/", "b")]));
        assert!(disjoint(&[
            space(b"m/rotation", "a"),
            space(b"m/retired/", "b")
        ]));
    }

    #[test]
    fn keys_the_store_writes_have_exactly_one_owner() {
        let id = [7u8; crate::ids::ID_LEN];
        let system_keys: Vec<Vec<u8>> = vec![
            META_KEY.to_vec(),
            [TENANT_PREFIX, &id].concat(),
            [ROTATION_PREFIX, &id, &id].concat(),
            [REQUEST_PREFIX, b"acme/0123"].concat(),
            [AUDIT_HEAD_KEY, b"/node-1"].concat(),
            [MWK_RETIRED_PREFIX, &2u32.to_be_bytes()].concat(),
            MWK_ROTATION_KEY.to_vec(),
        ];
        for key in &system_keys {
            let owners = SYSTEM
                .iter()
                .filter(|space| key.starts_with(space.prefix))
                .count();
            assert_eq!(owners, 1, "{key:?}");
        }
        assert_eq!(
            owner(SYSTEM, &[ROTATION_PREFIX, &id, &id].concat()),
            Some("the scheduler's rotation checks")
        );
        assert_eq!(
            owner(SYSTEM, &[REQUEST_PREFIX, b"*/ab"].concat()),
            Some("responses remembered by request_id")
        );
        assert_eq!(owner(SYSTEM, b"zzz"), None);
        assert_eq!(
            owner(TENANT, &[VERSION_PREFIX, &id].concat()),
            Some("key versions")
        );
    }
}
