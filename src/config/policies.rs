//! The policy sections: `[access]` (support grants), `[passwords]`, `[dual_control]`, `[keys]`
//! (defaults for new keys, the scheduler) and `[backup]` (nightly snapshots, retention).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::kms::KmsOptions;

/// Nightly snapshots (`[backup]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    /// Where snapshots are written and pruned (`None`: not configured).
    pub dir: Option<PathBuf>,
    /// Whether the server takes one every night.
    pub nightly: bool,
    /// Time of day (UTC, seconds after midnight) of the nightly snapshot.
    pub at_secs: u64,
    /// Snapshots older than this many days are deleted (the newest this many are always kept).
    pub retention_days: u64,
}

impl Default for Backup {
    fn default() -> Self {
        Self {
            dir: None,
            nightly: false,
            at_secs: 2 * 3600,
            retention_days: 30,
        }
    }
}

/// Support access grants (`[access]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// The longest a grant may last once approved.
    pub max_grant: Duration,
    /// How long a request waits for a tenant-admin before it expires.
    pub request_ttl: Duration,
}

impl Default for Access {
    fn default() -> Self {
        Self {
            max_grant: Duration::from_secs(8 * 3600),
            request_ttl: Duration::from_secs(86_400),
        }
    }
}

/// An operation that can be put under dual control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub enum DualOperation {
    /// AdminService/DestroyTenant.
    DestroyTenant,
    /// AdminService/ScheduleKeyVersionDestruction.
    ScheduleKeyVersionDestruction,
    /// AdminService/RotateMasterKey.
    RotateMasterKey,
    /// AdminService/UpdateKeyPolicy when it raises min_decryption_version.
    RaiseMinDecryptionVersion,
    /// AdminService/ImportKeyMaterial: key material an outsider chose becomes a key's primary.
    ImportKeyMaterial,
}

/// Dual control: these operations wait for a second, different officer's approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DualControl {
    /// The operations under dual control (none by default).
    pub operations: BTreeSet<DualOperation>,
    /// How long a request waits for approval before it expires.
    pub approval_ttl: Duration,
}

impl Default for DualControl {
    fn default() -> Self {
        Self {
            operations: BTreeSet::new(),
            approval_ttl: Duration::from_secs(86_400),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccess {
    #[serde(default = "default_max_grant_secs")]
    pub(super) max_grant_secs: u64,
    #[serde(default = "default_request_ttl_secs")]
    pub(super) request_ttl_secs: u64,
}

impl Default for RawAccess {
    fn default() -> Self {
        Self {
            max_grant_secs: default_max_grant_secs(),
            request_ttl_secs: default_request_ttl_secs(),
        }
    }
}

pub(super) fn default_max_grant_secs() -> u64 {
    Access::default().max_grant.as_secs()
}

pub(super) fn default_request_ttl_secs() -> u64 {
    Access::default().request_ttl.as_secs()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPasswords {
    #[serde(default = "default_password_memory_kib")]
    pub(super) memory_kib: u32,
    #[serde(default = "default_password_iterations")]
    pub(super) iterations: u32,
    #[serde(default = "default_password_parallelism")]
    pub(super) parallelism: u32,
    // Older costs whose hashes VerifyPassword still takes (and answers rehash_needed).
    #[serde(default)]
    pub(super) accepted: Vec<RawPasswordCosts>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPasswordCosts {
    pub(super) memory_kib: u32,
    pub(super) iterations: u32,
    pub(super) parallelism: u32,
}

impl RawPasswordCosts {
    pub(super) fn params(&self) -> crate::kms::PasswordParams {
        crate::kms::PasswordParams {
            memory_kib: self.memory_kib,
            iterations: self.iterations,
            parallelism: self.parallelism,
        }
    }
}

impl Default for RawPasswords {
    fn default() -> Self {
        Self {
            memory_kib: default_password_memory_kib(),
            iterations: default_password_iterations(),
            parallelism: default_password_parallelism(),
            accepted: Vec::new(),
        }
    }
}

pub(super) fn default_password_memory_kib() -> u32 {
    crate::kms::PasswordParams::default().memory_kib
}

pub(super) fn default_password_iterations() -> u32 {
    crate::kms::PasswordParams::default().iterations
}

pub(super) fn default_password_parallelism() -> u32 {
    crate::kms::PasswordParams::default().parallelism
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDualControl {
    #[serde(default)]
    pub(super) operations: Vec<DualOperation>,
    #[serde(default = "default_approval_ttl_secs")]
    pub(super) approval_ttl_secs: u64,
}

impl Default for RawDualControl {
    fn default() -> Self {
        Self {
            operations: Vec::new(),
            approval_ttl_secs: default_approval_ttl_secs(),
        }
    }
}

pub(super) fn default_approval_ttl_secs() -> u64 {
    DualControl::default().approval_ttl.as_secs()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeys {
    #[serde(default = "default_destruction_window_days")]
    pub(super) destruction_window_days: u64,
    #[serde(default = "default_scheduler_interval_secs")]
    pub(super) scheduler_interval_secs: u64,
    // Finer than a second, for tests that run weeks of simulated time (wins when set).
    #[serde(default)]
    pub(super) scheduler_interval_ms: Option<u64>,
}

impl Default for RawKeys {
    fn default() -> Self {
        Self {
            destruction_window_days: default_destruction_window_days(),
            scheduler_interval_secs: default_scheduler_interval_secs(),
            scheduler_interval_ms: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackup {
    #[serde(default = "default_retention_days")]
    pub(super) retention_days: u64,
    #[serde(default = "default_backup_dir")]
    pub(super) dir: PathBuf,
    #[serde(default = "default_journal_dir")]
    pub(super) journal_dir: PathBuf,
    #[serde(default = "default_backup_time")]
    pub(super) time: String,
    #[serde(default = "default_true")]
    pub(super) nightly: bool,
}

impl Default for RawBackup {
    fn default() -> Self {
        Self {
            retention_days: default_retention_days(),
            dir: default_backup_dir(),
            journal_dir: default_journal_dir(),
            time: default_backup_time(),
            nightly: true,
        }
    }
}

pub(super) fn default_true() -> bool {
    true
}

pub(super) fn default_backup_dir() -> PathBuf {
    PathBuf::from("backups")
}

pub(super) fn default_journal_dir() -> PathBuf {
    PathBuf::from("journal")
}

pub(super) fn default_backup_time() -> String {
    "02:00".into()
}

/// `HH:MM` to seconds after midnight.
pub(super) fn parse_time_of_day(text: &str) -> Option<u64> {
    let (h, m) = text.split_once(':')?;
    let (h, m): (u64, u64) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 3600 + m * 60)
}

pub(super) fn default_destruction_window_days() -> u64 {
    KmsOptions::default().destruction_window.as_secs() / 86_400
}

pub(super) fn default_scheduler_interval_secs() -> u64 {
    KmsOptions::default().scheduler_interval.as_secs()
}

pub(super) fn default_retention_days() -> u64 {
    KmsOptions::default().min_destruction_window.as_secs() / 86_400
}
