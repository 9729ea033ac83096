//! The key journal: an append-only log, meant to live on another host, of every change a
//! restore needs beyond last night's snapshot.
//!
//! Every tenant commit (new key versions with their wrapped KEK and bulk-key blobs, state
//! changes, policy changes, use reservations) and every tenant creation, destruction schedule
//! and destruction is appended and synced *before* its commit point, so nothing the caller
//! was told about is missing from snapshot + journal. An entry whose commit then failed may
//! appear in a restore; a committed change never disappears.
//!
//! Layout: one segment per UTC day, `journal-YYYY-MM-DD.kfj`. A segment is a sequence of
//! frames `[u32 length][record]`, each record sealed by the storage MAC (`record.rs`) over a
//! journal-wide sequence number, so an altered, reordered or dropped entry is found. Only a
//! torn last frame (a crash while appending) is tolerated; opening the journal cuts it off.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::record::RecordMac;
use super::{Error, TenantRecord, TenantWrite, decode, encode};
use crate::ids::{Name, TenantId};

const DB_ID: &[u8] = b"journal";
const RECORD_KEY: &[u8] = b"entry";
const PREFIX: &str = "journal-";
const SUFFIX: &str = ".kfj";
/// Larger frames are refused as corrupt (a version's blobs are well under 1 KiB).
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// One journaled change.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum JournalEntry {
    /// A tenant was created (its database starts empty at sequence 1).
    TenantCreated(TenantRecord),
    /// A tenant's record changed (destruction scheduled or cancelled).
    TenantUpdated(TenantRecord),
    /// A tenant was destroyed.
    TenantDestroyed {
        /// Its id.
        id: TenantId,
        /// Its name then.
        name: Name,
        /// When, seconds since the Unix epoch.
        at: u64,
    },
    /// A tenant commit: the writes that produced head sequence `seq`.
    Commit {
        /// The tenant.
        tenant: TenantId,
        /// The head sequence the commit produced.
        seq: u64,
        /// Its records.
        writes: Vec<TenantWrite>,
    },
}

/// The open journal (appends are serialized and synced).
pub struct Journal {
    dir: PathBuf,
    mac: Arc<RecordMac>,
    state: Mutex<Appender>,
}

struct Appender {
    // The journal-wide sequence of the last entry.
    seq: u64,
    // The open segment and its day name.
    segment: Option<(String, File)>,
    // A segment whose last append failed: it may end in part of a frame, which is cut off
    // before anything else is appended (an entry after it would be unreadable for good).
    torn: Option<PathBuf>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("dir", &self.dir).finish()
    }
}

/// The journal's segments in order.
///
/// # Errors
/// I/O errors reading the directory.
pub fn segments(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// The day (`YYYY-MM-DD`, UTC) of a segment file name, if it is one.
pub fn segment_day(path: &Path) -> Option<&str> {
    path.file_name()?
        .to_str()?
        .strip_prefix(PREFIX)?
        .strip_suffix(SUFFIX)
}

/// What reading a segment found.
struct Frames {
    entries: Vec<(u64, JournalEntry)>,
    // Bytes up to the end of the last whole frame.
    good_len: u64,
    torn: bool,
}

fn read_frames(mac: &RecordMac, path: &Path) -> Result<Frames, Error> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let corrupt = |reason| Error::Integrity {
        database: format!("journal {}", path.display()),
        reason,
    };
    let mut entries = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let Some(len) = bytes
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
        else {
            return Ok(Frames {
                entries,
                good_len: at as u64,
                torn: true,
            });
        };
        let len = len as usize;
        if len > MAX_FRAME {
            return Err(corrupt("a frame length is out of range"));
        }
        let Some(frame) = bytes.get(at + 4..at + 4 + len) else {
            return Ok(Frames {
                entries,
                good_len: at as u64,
                torn: true,
            });
        };
        let record = mac
            .open(DB_ID, RECORD_KEY, frame)
            .ok_or(corrupt("an entry fails its MAC"))?;
        let entry: JournalEntry = decode(record.payload)?;
        entries.push((record.seq, entry));
        at += 4 + len;
    }
    Ok(Frames {
        entries,
        good_len: at as u64,
        torn: false,
    })
}

/// Reads a segment's frames and cuts off a torn last one (a crash or a failed write in the
/// middle of an append).
fn cut_torn_frame(mac: &RecordMac, path: &Path) -> Result<Frames, Error> {
    let frames = read_frames(mac, path)?;
    if frames.torn {
        tracing::warn!(segment = %path.display(), "cutting off a torn journal entry");
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(frames.good_len)?;
        file.sync_all()?;
    }
    Ok(frames)
}

/// Every entry of the journal in `dir`, in order, with its journal sequence. A torn last frame
/// of the last segment is ignored; anything else out of place is an error.
///
/// # Errors
/// [`Error::Integrity`] for an entry that fails its MAC, a gap or reordering, or a torn frame
/// before the end; I/O errors.
pub fn read_all(dir: &Path, mac: &RecordMac) -> Result<Vec<(u64, JournalEntry)>, Error> {
    let paths = segments(dir)?;
    let mut all: Vec<(u64, JournalEntry)> = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let frames = read_frames(mac, path)?;
        if frames.torn && i + 1 != paths.len() {
            return Err(Error::Integrity {
                database: format!("journal {}", path.display()),
                reason: "a segment before the last one ends in a torn entry",
            });
        }
        for (seq, entry) in frames.entries {
            if let Some((last, _)) = all.last() {
                if seq != last + 1 {
                    return Err(Error::Integrity {
                        database: format!("journal {}", path.display()),
                        reason: "journal entries are missing or out of order",
                    });
                }
            }
            all.push((seq, entry));
        }
    }
    Ok(all)
}

impl Journal {
    /// Opens (or creates) the journal in `dir`, continuing its sequence and cutting off a torn
    /// last frame.
    ///
    /// # Errors
    /// I/O errors; [`Error::Integrity`] if the last segment fails its checks.
    pub fn open(dir: &Path, mac: Arc<RecordMac>) -> Result<Self, Error> {
        std::fs::create_dir_all(dir)?;
        let mut seq = 0;
        // The newest segment with an entry holds the last sequence.
        for path in segments(dir)?.iter().rev() {
            let frames = cut_torn_frame(&mac, path)?;
            if let Some((last, _)) = frames.entries.last() {
                seq = *last;
                break;
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            mac,
            state: Mutex::new(Appender {
                seq,
                segment: None,
                torn: None,
            }),
        })
    }

    /// Where it lives.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sequence of the last entry (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.state.lock().expect("journal lock poisoned").seq
    }

    /// Appends one entry and syncs it to disk before returning.
    ///
    /// # Errors
    /// I/O errors (the caller's commit must then not happen).
    pub fn append(&self, entry: &JournalEntry) -> Result<(), Error> {
        let payload = encode(entry)?;
        let mut state = self.state.lock().expect("journal lock poisoned");
        if let Some(path) = state.torn.clone() {
            // Until this succeeds nothing is appended: the journal stays readable.
            cut_torn_frame(&self.mac, &path)?;
            state.torn = None;
        }
        let next = state.seq + 1;
        let sealed = self.mac.seal(DB_ID, RECORD_KEY, next, &payload);
        let day = day_of(super::now_secs());
        let reopen = state.segment.as_ref().is_none_or(|(open, _)| *open != day);
        if reopen {
            let path = self.dir.join(format!("{PREFIX}{day}{SUFFIX}"));
            let created = !path.exists();
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            if created {
                // The new segment's name must survive a crash too.
                File::open(&self.dir)?.sync_all()?;
            }
            state.segment = Some((day, file));
        }
        let Some((open_day, file)) = state.segment.as_mut() else {
            return Err(Error::Encoding);
        };
        let len = u32::try_from(sealed.len()).map_err(|_| Error::Encoding)?;
        let mut frame = Vec::with_capacity(4 + sealed.len());
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(&sealed);
        let written = file.write_all(&frame).and_then(|()| file.sync_data());
        if let Err(error) = written {
            // The frame may be partly on disk (a full disk, an I/O error): the next append
            // first cuts it off, then reopens the segment.
            let path = self.dir.join(format!("{PREFIX}{open_day}{SUFFIX}"));
            state.segment = None;
            state.torn = Some(path);
            return Err(error.into());
        }
        state.seq = next;
        Ok(())
    }

    /// Deletes segments of days before `day` (`YYYY-MM-DD`), never the newest one. Returns the
    /// paths deleted.
    ///
    /// # Errors
    /// I/O errors.
    pub fn prune_before(&self, day: &str) -> Result<Vec<PathBuf>, Error> {
        let _state = self.state.lock().expect("journal lock poisoned");
        let mut all = segments(&self.dir)?;
        all.pop();
        let mut removed = Vec::new();
        for path in all {
            if segment_day(&path).is_some_and(|d| d < day) {
                std::fs::remove_file(&path)?;
                removed.push(path);
            }
        }
        Ok(removed)
    }
}

/// `YYYY-MM-DD` (UTC) of a Unix time.
pub fn day_of(secs: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(time).to_string()[..10].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;

    fn entry(n: u64) -> JournalEntry {
        JournalEntry::Commit {
            tenant: TenantId::random(),
            seq: n,
            writes: Vec::new(),
        }
    }

    /// A journal with three entries, closed again.
    fn three_entries() -> (tempfile::TempDir, Arc<RecordMac>) {
        let dir = tempfile::tempdir().expect("dir");
        let mac = Arc::new(RecordMac::new(SecretKey::random()));
        let journal = Journal::open(dir.path(), Arc::clone(&mac)).expect("open");
        for n in 0..3 {
            journal.append(&entry(n)).expect("append");
        }
        (dir, mac)
    }

    fn seqs(entries: &[(u64, JournalEntry)]) -> Vec<u64> {
        entries.iter().map(|(s, _)| *s).collect()
    }

    #[test]
    fn entries_read_back_in_order_and_the_sequence_continues_after_a_reopen() {
        let (dir, mac) = three_entries();
        let journal = Journal::open(dir.path(), Arc::clone(&mac)).expect("reopen");
        assert_eq!(journal.last_seq(), 3);
        journal.append(&entry(3)).expect("append");
        let all = read_all(dir.path(), &mac).expect("read");
        assert_eq!(seqs(&all), [1, 2, 3, 4]);
        // Another storage key (another token) reads nothing.
        let other = RecordMac::new(SecretKey::random());
        assert!(read_all(dir.path(), &other).is_err());
    }

    #[test]
    fn an_append_after_a_failed_one_cuts_its_partial_frame_off_first() {
        let (dir, mac) = three_entries();
        let journal = Journal::open(dir.path(), Arc::clone(&mac)).expect("open");
        journal.append(&entry(3)).expect("append");
        let segment = segments(dir.path()).expect("segments").pop().expect("one");
        // What a write that failed halfway leaves (a full disk): part of a frame, and the
        // segment remembered as torn.
        let bytes = std::fs::read(&segment).expect("read");
        std::fs::write(&segment, [&bytes[..], &bytes[..9]].concat()).expect("write");
        {
            let mut state = journal.state.lock().expect("lock");
            state.segment = None;
            state.torn = Some(segment);
        }
        journal.append(&entry(4)).expect("append after the failure");
        assert_eq!(
            seqs(&read_all(dir.path(), &mac).expect("no torn frame in the middle")),
            [1, 2, 3, 4, 5]
        );
    }

    #[test]
    fn a_torn_last_entry_is_cut_off_and_any_other_damage_is_refused() {
        let (dir, mac) = three_entries();
        let segment = segments(dir.path()).expect("segments").pop().expect("one");
        let bytes = std::fs::read(&segment).expect("read");
        // A crash while appending: half a frame at the end.
        std::fs::write(&segment, [&bytes[..], &bytes[..7]].concat()).expect("write");
        assert_eq!(
            seqs(&read_all(dir.path(), &mac).expect("torn tail")),
            [1, 2, 3]
        );
        let journal = Journal::open(dir.path(), Arc::clone(&mac)).expect("reopen");
        journal.append(&entry(3)).expect("append after the cut");
        assert_eq!(
            seqs(&read_all(dir.path(), &mac).expect("read")),
            [1, 2, 3, 4]
        );
        drop(journal);
        // One changed byte inside an entry.
        let bytes = std::fs::read(&segment).expect("read");
        let mut changed = bytes.clone();
        changed[10] ^= 1;
        std::fs::write(&segment, &changed).expect("write");
        assert!(read_all(dir.path(), &mac).is_err(), "altered entry");
        // A dropped entry in the middle.
        let first_len = 4 + u32::from_le_bytes(bytes[..4].try_into().expect("len")) as usize;
        let second_len =
            4 + u32::from_le_bytes(bytes[first_len..first_len + 4].try_into().expect("len"))
                as usize;
        let dropped = [&bytes[..first_len], &bytes[first_len + second_len..]].concat();
        std::fs::write(&segment, &dropped).expect("write");
        assert!(read_all(dir.path(), &mac).is_err(), "a gap");
    }
}
