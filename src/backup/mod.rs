//! Backups of keyfront's own state: snapshot archives, their verification, retention, the
//! nightly schedule (`nightly.rs`) and restore (`restore.rs`).
//!
//! An archive is one file, `keyfront-YYYYMMDDTHHMMSSZ.kfb`:
//!
//! ```text
//! "KFBACKUP1\n"
//! frames: [u8 tag][u64 LE length][bytes]
//!   tag 1  a database section (postcard): the system database first, then each tenant's
//!   tag 2  the manifest (JSON): tenants, key versions, MWK generations, audit head, and the
//!          SHA-256 and record count of every section
//!   tag 3  the manifest's signature by the HSM audit key (ECDSA P-256, r ‖ s)
//!   tag 0  the end (nothing may follow)
//! ```
//!
//! The records in a section are the stored bytes, MACs included, so only the same HSM token
//! can restore them, and a restore verifies them like any open. Wrapped KEKs stay wrapped.

use std::fs::File;

use nix::fcntl::{Flock, FlockArg};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::chain::PublicKey;
use crate::ids::TenantId;
use crate::keystore::backup::RawRecords;
use crate::keystore::{self, VersionState};
use crate::kms::Kms;

pub mod nightly;
pub mod restore;

const MAGIC: &[u8] = b"KFBACKUP1\n";
const TAG_END: u8 = 0;
const TAG_SECTION: u8 = 1;
const TAG_MANIFEST: u8 = 2;
const TAG_SIGNATURE: u8 = 3;
/// Domain separation: an audit checkpoint signature can never pass as a manifest's.
const SIGNING_LABEL: &[u8] = b"keyfront backup manifest v1\0";
/// A section or manifest larger than this is refused as corrupt.
const MAX_FRAME: u64 = 1 << 32;
const PREFIX: &str = "keyfront-";
const SUFFIX: &str = ".kfb";
/// A snapshot being written: `.<archive name>.partial`, renamed to the archive when whole.
const PARTIAL_SUFFIX: &str = ".partial";

/// Errors of backups.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Which.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] keystore::Error),
    /// The HSM failed.
    #[error(transparent)]
    Hsm(#[from] crate::hsm::Error),
    /// The archive is not one, is cut short, or has a frame out of place.
    #[error("{path}: not a valid keyfront archive: {reason}")]
    Malformed {
        /// Which.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The manifest's signature does not verify with the audit key.
    #[error("{0}: the manifest's signature does not verify with the audit public key")]
    Signature(PathBuf),
    /// A section does not match the manifest (altered, swapped or missing).
    #[error("{path}: {reason}")]
    Mismatch {
        /// Which.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// A restore needs what is missing.
    #[error("{0}")]
    Refused(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One database copy in an archive.
#[derive(Serialize, Deserialize)]
struct Section {
    /// `system` or a tenant id.
    database: String,
    records: RawRecords,
}

/// What an archive holds, signed by the HSM audit key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Archive format (1).
    pub format: u32,
    /// When it was taken, seconds since the Unix epoch (server clock).
    pub created_at: u64,
    /// The same, RFC 3339.
    pub created: String,
    /// keyfront's version.
    pub keyfront_version: String,
    /// The MWK generation new KEKs are wrapped under, then.
    pub mwk_generation: u32,
    /// Every MWK generation on the token, then (a restore needs those its blobs name).
    pub mwk_generations: Vec<u32>,
    /// The audit chain head stored at the last checkpoint before the snapshot.
    pub audit_head: Option<AuditHead>,
    /// The key journal's last sequence when the snapshot began (0: none).
    pub journal_seq: u64,
    /// The system database's section.
    pub system: SectionSummary,
    /// Every tenant, in the order of their sections.
    pub tenants: Vec<TenantSummary>,
    /// Tenants the system copy lists that were destroyed before their own copy was taken: a
    /// restore destroys them again.
    pub destroyed_during_snapshot: Vec<String>,
}

/// The audit chain head, as a manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    /// Line sequence.
    pub seq: u64,
    /// SHA-256 of that line (hex).
    pub hash: String,
}

/// A section's size and checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionSummary {
    /// Records in it.
    pub records: u64,
    /// Encoded bytes.
    pub bytes: u64,
    /// SHA-256 of the encoded section (hex).
    pub sha256: String,
}

/// A tenant in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantSummary {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its database head's sequence in the copy.
    pub head_seq: u64,
    /// Its keys.
    pub keys: Vec<KeySummary>,
    /// Its section.
    pub section: SectionSummary,
}

/// A key in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySummary {
    /// Its name.
    pub name: String,
    /// Its primary version.
    pub primary: u32,
    /// Its versions: (number, state, MWK generation of its KEK blob).
    pub versions: Vec<(u32, String, u32)>,
}

/// A finished archive.
#[derive(Debug, Clone)]
pub struct Created {
    /// Where it is.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// What it holds.
    pub manifest: Manifest,
}

/// A verified archive, with its contents if asked for.
pub struct Verified {
    /// The signed manifest.
    pub manifest: Manifest,
    /// The system database's records (empty unless kept).
    pub system: RawRecords,
    /// Each tenant's records (empty unless kept).
    pub tenants: Vec<(TenantId, RawRecords)>,
}

fn state_name(state: VersionState) -> &'static str {
    match state {
        VersionState::Enabled => "ENABLED",
        VersionState::Disabled => "DISABLED",
        VersionState::DestroyScheduled { .. } => "DESTROY_SCHEDULED",
        VersionState::Destroyed { .. } => "DESTROYED",
    }
}

/// The file name of an archive taken at `secs`.
pub fn archive_name(secs: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    let stamp: String = humantime::format_rfc3339_seconds(time)
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    format!("{PREFIX}{stamp}{SUFFIX}")
}

/// When an archive was taken, from its file name.
pub fn archive_time(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let stamp = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    let stamp = stamp.split('-').next()?; // a same-second duplicate has a suffix
    if stamp.len() != 16 {
        return None;
    }
    let text = format!(
        "{}-{}-{}T{}:{}:{}Z",
        stamp.get(0..4)?,
        stamp.get(4..6)?,
        stamp.get(6..8)?,
        stamp.get(9..11)?,
        stamp.get(11..13)?,
        stamp.get(13..15)?
    );
    let time = humantime::parse_rfc3339(&text).ok()?;
    time.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

/// An archive in a backup directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveFile {
    /// Where.
    pub path: PathBuf,
    /// When it was taken (from its name).
    pub created_at: u64,
    /// Its size.
    pub bytes: u64,
}

/// The archives in `dir`, oldest first.
///
/// # Errors
/// I/O errors reading the directory (a missing one has none).
pub fn list(dir: &Path) -> Result<Vec<ArchiveFile>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        if let Some(created_at) = archive_time(&path) {
            let bytes = entry.metadata().map_err(io(&path))?.len();
            found.push(ArchiveFile {
                path,
                created_at,
                bytes,
            });
        }
    }
    found.sort_by(|a, b| (a.created_at, &a.path).cmp(&(b.created_at, &b.path)));
    Ok(found)
}

/// Deletes the archives in `dir` older than `retention_days` at `now`, keeping the newest
/// `retention_days` archives (at least one) in any case (a clock that jumps forward must not empty the
/// directory). Returns the deleted paths.
///
/// # Errors
/// I/O errors.
pub fn prune(dir: &Path, now: u64, retention_days: u64) -> Result<Vec<PathBuf>, Error> {
    let all = list(dir)?;
    // The newest archive always stays, whatever the retention.
    let keep_newest = usize::try_from(retention_days.max(1)).unwrap_or(usize::MAX);
    let deletable = all.len().saturating_sub(keep_newest);
    let cutoff = now.saturating_sub(retention_days.saturating_mul(86_400));
    let mut removed = Vec::new();
    for archive in all.into_iter().take(deletable) {
        if archive.created_at <= cutoff {
            std::fs::remove_file(&archive.path).map_err(io(&archive.path))?;
            removed.push(archive.path);
        }
    }
    Ok(removed)
}

fn write_frame(out: &mut impl Write, tag: u8, bytes: &[u8], path: &Path) -> Result<(), Error> {
    out.write_all(&[tag]).map_err(io(path))?;
    out.write_all(&(bytes.len() as u64).to_le_bytes())
        .map_err(io(path))?;
    out.write_all(bytes).map_err(io(path))
}

fn summary(bytes: &[u8], records: usize) -> SectionSummary {
    SectionSummary {
        records: records as u64,
        bytes: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(bytes)),
    }
}

fn encode_section(database: String, records: RawRecords) -> Result<(Vec<u8>, usize), Error> {
    let count = records.len();
    let section = Section { database, records };
    let bytes = postcard::to_allocvec(&section).map_err(|_| keystore::Error::Encoding)?;
    Ok((bytes, count))
}

/// Takes a snapshot while serving and writes it as a new archive in `dir`: the system
/// database first, then each tenant's, each copied under its own commit lock. Readers never
/// wait; a tenant's writers wait for the length of its copy.
///
/// # Errors
/// I/O, store and HSM errors; nothing is left in `dir` on error.
pub fn create(kms: &Kms, dir: &Path) -> Result<Created, Error> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    remove_abandoned_partials(dir);
    let now = kms.clock().now_secs();
    let name = archive_name(now);
    let mut path = dir.join(&name);
    let mut n = 1;
    while path.exists() {
        n += 1;
        let stem = name.trim_end_matches(SUFFIX);
        path = dir.join(format!("{stem}-{n}{SUFFIX}"));
    }
    let partial = dir.join(format!(
        ".{}{PARTIAL_SUFFIX}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("archive")
    ));
    let result = write_archive(kms, now, &partial);
    let (manifest, _locked) = match result {
        Ok(written) => written,
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
    };
    std::fs::rename(&partial, &path).map_err(io(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    let bytes = std::fs::metadata(&path).map_err(io(&path))?.len();
    Ok(Created {
        path,
        bytes,
        manifest,
    })
}

/// Removes the `.partial` files of snapshots whose writer died (a crash or `kill -9` in the
/// middle of one): a live writer holds an exclusive lock on its file, so a file that can be
/// locked is abandoned. Another process's snapshot in progress keeps its file.
fn remove_abandoned_partials(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if !(name.starts_with('.') && name.ends_with(PARTIAL_SUFFIX)) {
            continue;
        }
        let path = entry.path();
        let Ok(file) = File::open(&path) else {
            continue;
        };
        if Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok()
            && std::fs::remove_file(&path).is_ok()
        {
            tracing::info!(path = %path.display(), "removed the partial file of an interrupted snapshot");
        }
    }
}

/// Writes the archive to `partial`; returns its manifest and the still-locked file, to be
/// closed only after the rename.
fn write_archive(kms: &Kms, now: u64, partial: &Path) -> Result<(Manifest, Flock<File>), Error> {
    let store = kms.store();
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(partial)
            .map_err(io(partial))?
    };
    // Held until the file is closed (after the rename): tells remove_abandoned_partials that
    // this writer is alive.
    let file = Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, errno)| io(partial)(errno.into()))?;
    let mut out = BufWriter::new(&*file);
    out.write_all(MAGIC).map_err(io(partial))?;
    let journal_seq = store.key_journal().map_or(0, |j| j.last_seq());
    let system = store.dump_system()?;
    let (bytes, count) = encode_section("system".into(), system.records)?;
    write_frame(&mut out, TAG_SECTION, &bytes, partial)?;
    let system_summary = summary(&bytes, count);
    let mut tenants = Vec::new();
    let mut destroyed = Vec::new();
    for tenant in &system.tenants {
        let Some(dump) = store.dump_tenant(tenant.id)? else {
            destroyed.push(tenant.id.to_string());
            continue;
        };
        let keys = dump
            .keys
            .iter()
            .map(|(key, versions)| KeySummary {
                name: key.name.to_string(),
                primary: key.primary.0,
                versions: versions
                    .iter()
                    .map(|v| {
                        let generation = crate::hsm::WrappedKek::from_bytes(&v.kek)
                            .map_or(0, |k| k.generation().0);
                        (v.version.0, state_name(v.state).to_owned(), generation)
                    })
                    .collect(),
            })
            .collect();
        let (bytes, count) = encode_section(tenant.id.to_string(), dump.records)?;
        write_frame(&mut out, TAG_SECTION, &bytes, partial)?;
        tenants.push(TenantSummary {
            id: tenant.id.to_string(),
            name: tenant.name.to_string(),
            head_seq: dump.head.seq,
            keys,
            section: summary(&bytes, count),
        });
    }
    let hsm = kms.hsm();
    let manifest = Manifest {
        format: 1,
        created_at: now,
        created: humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(now),
        )
        .to_string(),
        keyfront_version: env!("CARGO_PKG_VERSION").into(),
        mwk_generation: hsm.mwk_generation().0,
        mwk_generations: hsm.mwk_generations().iter().map(|g| g.0).collect(),
        audit_head: store.audit_head(kms.audit_node())?.map(|head| AuditHead {
            seq: head.seq,
            hash: hex::encode(head.hash),
        }),
        journal_seq,
        system: system_summary,
        tenants,
        destroyed_during_snapshot: destroyed,
    };
    let manifest_bytes =
        serde_json::to_vec_pretty(&manifest).map_err(|_| keystore::Error::Encoding)?;
    let signature = hsm.sign(&signed_message(&manifest_bytes))?;
    write_frame(&mut out, TAG_MANIFEST, &manifest_bytes, partial)?;
    write_frame(&mut out, TAG_SIGNATURE, &signature, partial)?;
    out.write_all(&[TAG_END]).map_err(io(partial))?;
    out.into_inner()
        .map_err(|e| io(partial)(e.into_error()))?
        .sync_all()
        .map_err(io(partial))?;
    Ok((manifest, file))
}

fn signed_message(manifest: &[u8]) -> Vec<u8> {
    let mut message = SIGNING_LABEL.to_vec();
    message.extend_from_slice(manifest);
    message
}

/// Reads an archive's frames in order: the magic first, then (tag, bytes) frames, each bounded
/// by what is left of the file, up to the end tag with nothing after it.
struct Frames {
    path: PathBuf,
    input: BufReader<File>,
    offset: u64,
    total: u64,
}

impl Frames {
    fn open(path: &Path) -> Result<Self, Error> {
        let file = File::open(path).map_err(io(path))?;
        let total = file.metadata().map_err(io(path))?.len();
        let mut frames = Self {
            path: path.to_path_buf(),
            input: BufReader::new(file),
            offset: 0,
            total,
        };
        let mut magic = vec![0u8; MAGIC.len()];
        frames
            .input
            .read_exact(&mut magic)
            .map_err(|_| frames.malformed("too short".into()))?;
        if magic != MAGIC {
            return Err(frames.malformed("wrong magic".into()));
        }
        frames.offset = MAGIC.len() as u64;
        Ok(frames)
    }

    fn malformed(&self, reason: String) -> Error {
        Error::Malformed {
            path: self.path.clone(),
            reason,
        }
    }

    /// The next frame, or `None` at the end tag.
    fn next_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, Error> {
        let mut tag = [0u8; 1];
        self.input
            .read_exact(&mut tag)
            .map_err(|_| self.malformed(format!("cut short at byte {}", self.offset)))?;
        self.offset += 1;
        if tag[0] == TAG_END {
            let mut rest = [0u8; 1];
            if self.input.read(&mut rest).map_err(io(&self.path))? != 0 {
                return Err(self.malformed(format!("bytes after the end at byte {}", self.offset)));
            }
            return Ok(None);
        }
        let mut len = [0u8; 8];
        self.input
            .read_exact(&mut len)
            .map_err(|_| self.malformed(format!("cut short at byte {}", self.offset)))?;
        self.offset += 8;
        let len = u64::from_le_bytes(len);
        if len > MAX_FRAME || len > self.total.saturating_sub(self.offset) {
            return Err(self.malformed(format!(
                "a frame at byte {} is longer than the file",
                self.offset
            )));
        }
        let mut bytes =
            vec![0u8; usize::try_from(len).map_err(|_| self.malformed("frame too large".into()))?];
        self.input
            .read_exact(&mut bytes)
            .map_err(|_| self.malformed(format!("cut short at byte {}", self.offset)))?;
        self.offset += len;
        Ok(Some((tag[0], bytes)))
    }
}

/// Checks an archive: its format, the manifest's signature with `key`, every section's
/// checksum and record count against the manifest, and that every tenant's section is there
/// in order. With `keep`, the records are returned (tests); a restore streams them instead
/// with [`sections`] after this check, holding one section at a time.
///
/// # Errors
/// [`Error::Malformed`], [`Error::Signature`], [`Error::Mismatch`], I/O errors.
pub fn verify(path: &Path, key: &PublicKey, keep: bool) -> Result<Verified, Error> {
    let mut frames = Frames::open(path)?;
    let mut sections: Vec<(SectionSummary, Option<Section>)> = Vec::new();
    let mut manifest_bytes = None;
    let mut signature = None;
    while let Some((tag, bytes)) = frames.next_frame()? {
        match tag {
            TAG_SECTION if manifest_bytes.is_none() => {
                let section: Section = postcard::from_bytes(&bytes).map_err(|_| {
                    frames.malformed(format!("section {} does not decode", sections.len()))
                })?;
                let records = section.records.len();
                sections.push((summary(&bytes, records), keep.then_some(section)));
            }
            TAG_MANIFEST if manifest_bytes.is_none() => manifest_bytes = Some(bytes),
            TAG_SIGNATURE if manifest_bytes.is_some() && signature.is_none() => {
                signature = Some(bytes);
            }
            other => {
                return Err(frames.malformed(format!(
                    "unexpected frame {other} at byte {}",
                    frames.offset
                )));
            }
        }
    }
    let (Some(manifest_bytes), Some(signature)) = (manifest_bytes, signature) else {
        return Err(frames.malformed("no signed manifest".into()));
    };
    if !key.verifies_message(&signed_message(&manifest_bytes), &signature) {
        return Err(Error::Signature(path.to_path_buf()));
    }
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|_| frames.malformed("the manifest does not decode".into()))?;
    if sections.len() != 1 + manifest.tenants.len() {
        return Err(mismatch(
            path,
            format!(
                "incomplete: {} sections, the manifest lists {}",
                sections.len(),
                1 + manifest.tenants.len()
            ),
        ));
    }
    let mut verified = Verified {
        manifest: manifest.clone(),
        system: Vec::new(),
        tenants: Vec::new(),
    };
    for ((database, want), (got, section)) in expected_sections(&manifest).zip(sections) {
        if &got != want {
            return Err(mismatch(
                path,
                format!("the section of {database} does not match its checksum in the manifest"),
            ));
        }
        if let Some(section) = section {
            let records = records_of(path, &database, section)?;
            if database == "system" {
                verified.system = records;
            } else {
                verified
                    .tenants
                    .push((tenant_id(path, &database)?, records));
            }
        }
    }
    Ok(verified)
}

pub(super) fn mismatch(path: &Path, reason: String) -> Error {
    Error::Mismatch {
        path: path.to_path_buf(),
        reason,
    }
}

/// The sections a manifest lists, in archive order: the system database, then each tenant.
fn expected_sections(manifest: &Manifest) -> impl Iterator<Item = (String, &SectionSummary)> {
    std::iter::once(("system".to_owned(), &manifest.system))
        .chain(manifest.tenants.iter().map(|t| (t.id.clone(), &t.section)))
}

/// A section's records, once it is the one the manifest names next.
fn records_of(path: &Path, database: &str, section: Section) -> Result<RawRecords, Error> {
    if section.database != database {
        return Err(mismatch(
            path,
            format!("the section of {database} is out of place"),
        ));
    }
    Ok(section.records)
}

fn tenant_id(path: &Path, database: &str) -> Result<TenantId, Error> {
    database
        .parse::<TenantId>()
        .map_err(|_| mismatch(path, format!("{database} is not a tenant id")))
}

/// The next frame of `frames` as the section `want` of `database` describes it.
fn next_section(
    frames: &mut Frames,
    path: &Path,
    database: &str,
    want: &SectionSummary,
) -> Result<RawRecords, Error> {
    let (_, bytes) = frames
        .next_frame()?
        .filter(|(tag, _)| *tag == TAG_SECTION)
        .ok_or_else(|| mismatch(path, "a section is missing".into()))?;
    let section: Section = postcard::from_bytes(&bytes)
        .map_err(|_| frames.malformed(format!("the section of {database} does not decode")))?;
    if &summary(&bytes, section.records.len()) != want {
        return Err(mismatch(
            path,
            format!("the section of {database} changed since it was verified"),
        ));
    }
    records_of(path, database, section)
}

/// The tenants' sections of a verified archive, read one at a time.
pub type TenantSections<'a> = Box<dyn Iterator<Item = Result<(TenantId, RawRecords), Error>> + 'a>;

/// Reads a verified archive's sections again, for a restore: the system database's records,
/// then each tenant's, one at a time. Each is checked against `manifest` (from [`verify`],
/// signed) before it is handed out, so a file changed since the check is refused, and memory
/// holds one section instead of the whole archive.
///
/// # Errors
/// As [`verify`]; each tenant item fails on a section that is not the one the manifest lists
/// next.
pub fn sections<'a>(
    path: &'a Path,
    manifest: &'a Manifest,
) -> Result<(RawRecords, TenantSections<'a>), Error> {
    let mut frames = Frames::open(path)?;
    let system = next_section(&mut frames, path, "system", &manifest.system)?;
    let tenants = manifest.tenants.iter().map(move |tenant| {
        let records = next_section(&mut frames, path, &tenant.id, &tenant.section)?;
        Ok((tenant_id(path, &tenant.id)?, records))
    });
    Ok((system, Box::new(tenants)))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::hsm::Hsm;
    use crate::hsm::memory::MemoryHsm;

    fn archive() -> (tempfile::TempDir, Created, PublicKey) {
        let dir = tempfile::tempdir().expect("dir");
        let hsm: Arc<dyn Hsm> = Arc::new(MemoryHsm::new());
        let key = PublicKey::from_bytes(&hsm.audit_public_key()).expect("key");
        let kms = Kms::open(hsm, &dir.path().join("data"), Default::default()).expect("kms");
        for name in ["acme", "globex"] {
            let tenant = kms
                .create_tenant(&name.parse().expect("name"))
                .expect("tenant");
            kms.create_key(
                tenant.id,
                &"default".parse().expect("name"),
                keystore::Purpose::Data,
            )
            .expect("key");
        }
        let created = create(&kms, &dir.path().join("backups")).expect("snapshot");
        (dir, created, key)
    }

    #[test]
    fn sections_are_streamed_in_order_and_a_file_changed_after_verify_is_refused() {
        let (dir, created, key) = archive();
        let verified = verify(&created.path, &key, true).expect("verifies");
        let (system, tenants) = sections(&created.path, &verified.manifest).expect("open");
        assert_eq!(system, verified.system);
        let tenants: Vec<_> = tenants.collect::<Result<_, _>>().expect("every tenant");
        assert_eq!(tenants, verified.tenants);
        // The same archive with one byte of the last tenant's section changed after the
        // check: that section is refused, the ones before it were whole.
        let mut bytes = std::fs::read(&created.path).expect("read");
        let system_len = u64::from_le_bytes(
            bytes[MAGIC.len() + 1..MAGIC.len() + 9]
                .try_into()
                .expect("len"),
        ) as usize;
        let first_tenant = MAGIC.len() + 9 + system_len;
        let first_len = u64::from_le_bytes(
            bytes[first_tenant + 1..first_tenant + 9]
                .try_into()
                .expect("len"),
        ) as usize;
        let last_tenant = first_tenant + 9 + first_len;
        bytes[last_tenant + 9 + 3] ^= 1;
        let changed = dir.path().join("changed.kfb");
        std::fs::write(&changed, &bytes).expect("write");
        let (_, tenants) = sections(&changed, &verified.manifest).expect("the system section");
        let results: Vec<_> = tenants.collect();
        assert!(results[0].is_ok());
        let error = results[1].as_ref().expect_err("refused").to_string();
        assert!(
            error.contains("changed since it was verified") || error.contains("does not decode"),
            "{error}"
        );
    }

    #[test]
    fn a_cut_extended_or_foreign_archive_is_refused_with_a_reason() {
        let (dir, created, key) = archive();
        let verified = verify(&created.path, &key, true).expect("verifies");
        assert_eq!(verified.manifest, created.manifest);
        assert_eq!(verified.tenants.len(), 2);
        let bytes = std::fs::read(&created.path).expect("read");
        let copy = dir.path().join("copy.kfb");
        let refused = |content: &[u8]| {
            std::fs::write(&copy, content).expect("write");
            verify(&copy, &key, false)
                .map(|_| ())
                .expect_err("refused")
                .to_string()
        };
        // Cut anywhere: malformed, never a panic or an OK.
        for len in [0, 5, MAGIC.len(), 30, bytes.len() / 2, bytes.len() - 1] {
            let reason = refused(&bytes[..len]);
            assert!(
                reason.contains("not a valid keyfront archive"),
                "{len}: {reason}"
            );
        }
        assert!(refused(&[&bytes[..], b"x"].concat()).contains("after the end"));
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(refused(&magic).contains("wrong magic"));
        // Signed by another HSM: the signature is named.
        let other = PublicKey::from_bytes(&MemoryHsm::new().audit_public_key()).expect("key");
        let error = verify(&created.path, &other, false)
            .map(|_| ())
            .expect_err("foreign");
        assert!(matches!(error, Error::Signature(_)), "{error}");
        // A frame claiming more bytes than the file has.
        let mut long = bytes;
        long[MAGIC.len() + 1..MAGIC.len() + 9].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(refused(&long).contains("longer than the file"));
    }

    #[test]
    fn retention_deletes_by_age_but_keeps_the_newest() {
        let dir = tempfile::tempdir().expect("dir");
        let day = 86_400;
        let start = 20_000 * day + 7200;
        for n in 0..5 {
            std::fs::write(dir.path().join(archive_name(start + n * day)), b"x").expect("write");
        }
        let now = start + 4 * day;
        // Three days' retention: the two older than three days go.
        assert_eq!(prune(dir.path(), now, 3).expect("prune").len(), 2);
        assert_eq!(list(dir.path()).expect("list").len(), 3);
        // A clock a year ahead: still the newest three (at least one with no retention).
        assert!(
            prune(dir.path(), now + 365 * day, 3)
                .expect("prune")
                .is_empty()
        );
        assert_eq!(
            prune(dir.path(), now + 365 * day, 0).expect("prune").len(),
            2
        );
        assert_eq!(list(dir.path()).expect("list").len(), 1);
    }
}
