//! `keyfront audit verify`: walks audit files in chain order and reports the first line that
//! was altered, dropped, reordered or cut off, and checks every checkpoint's signature with the
//! audit public key alone (no PIN, no HSM).
//!
//! The hash chain alone proves nothing against whoever can write the files: they can edit a
//! line and compute the chain again. What cannot be recomputed is a checkpoint, signed by the
//! HSM's audit key over the chain head. So a log verifies only if it starts at seq 1 (or where
//! `from_seq` says, on purpose) and signed checkpoints cover every line but at most
//! `allow_unsigned_tail` at its end. A server that stops gracefully signs a last checkpoint, so
//! its log verifies with no allowance; a live log, or one a crash ended, needs one, given on
//! purpose.

use std::collections::HashMap;
use std::fmt;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use super::chain::{self, ChainHead, PublicKey};

/// What to check beyond the chain itself.
#[derive(Debug, Default)]
pub struct Options {
    /// Checkpoint signatures are checked with this key; without it they are only counted.
    pub public_key: Option<PublicKey>,
    /// A chain head recorded earlier (by a previous verify, or the system database): it must
    /// be in the chain, so a log cut after it is caught.
    pub expect_head: Option<[u8; 32]>,
    /// How many lines at the end may lack a signed checkpoint (a live log; one a crash ended).
    pub allow_unsigned_tail: u64,
    /// The sequence the files given start at, when they are not the log from its start.
    pub from_seq: Option<u64>,
}

/// A log that verified.
#[derive(Debug, Default)]
pub struct Report {
    /// Files read (empty ones skipped).
    pub files: usize,
    /// Lines read.
    pub lines: u64,
    /// The first line's sequence number (1 when the log is complete from its start).
    pub first_seq: u64,
    /// The last line.
    pub head: Option<ChainHead>,
    /// Checkpoints whose signature verified.
    pub checkpoints_verified: u64,
    /// Checkpoints not checked (no public key given).
    pub checkpoints_unchecked: u64,
    /// Lines (checkpoints aside) after the last checkpoint's signed position: covered by the
    /// chain only.
    pub unsigned_tail: u64,
}

/// Where and why verification failed.
#[derive(Debug)]
pub struct Failure {
    /// The file.
    pub file: PathBuf,
    /// Its 1-based line number (0: the file as a whole).
    pub line: u64,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.reason)
    }
}

#[derive(serde::Deserialize)]
struct Parsed {
    seq: u64,
    prev: String,
    node: String,
    kind: String,
    signed_seq: Option<u64>,
    signed_hash: Option<String>,
    signature: Option<String>,
    key_id: Option<String>,
}

struct Walk<'a> {
    options: &'a Options,
    report: Report,
    last: Option<(ChainHead, PathBuf, u64)>,
    // Hashes of the lines since the last checkpoint's position, to check what the next one signs.
    recent: HashMap<u64, [u8; 32]>,
    last_signed: u64,
    // Lines (not checkpoints) after the last signed position: (seq, file, line number).
    unsigned: Vec<(u64, PathBuf, u64)>,
    expected_found: bool,
}

/// Verifies `paths` (in any order: they are sorted by their first sequence number).
///
/// # Errors
/// The first failure.
pub fn verify(paths: &[PathBuf], options: &Options) -> Result<Report, Failure> {
    let mut ordered = Vec::new();
    for path in paths {
        let first = first_seq(path)?;
        if let Some(seq) = first {
            ordered.push((seq, path.clone()));
        }
    }
    ordered.sort();
    let mut walk = Walk {
        options,
        report: Report::default(),
        last: None,
        recent: HashMap::new(),
        last_signed: 0,
        unsigned: Vec::new(),
        expected_found: false,
    };
    for (_, path) in &ordered {
        walk.file(path)?;
        walk.report.files += 1;
    }
    if let Some(expected) = options.expect_head {
        if !walk.expected_found {
            let (file, line, seq) = walk.last.as_ref().map_or_else(
                || (PathBuf::new(), 0, 0),
                |(head, file, line)| (file.clone(), *line, head.seq),
            );
            return Err(Failure {
                file,
                line,
                reason: format!(
                    "the expected head {} is not in the chain, which ends here at seq {seq}: lines after it were cut off (truncated), or the chain was replaced",
                    hex::encode(expected)
                ),
            });
        }
    }
    let Some((head, ..)) = &walk.last else {
        return Ok(walk.report);
    };
    walk.report.head = Some(*head);
    walk.report.unsigned_tail = walk.unsigned.len() as u64;
    let starts_at = options.from_seq.unwrap_or(1);
    if walk.report.first_seq != starts_at {
        let file = ordered
            .first()
            .map(|(_, path)| path.clone())
            .unwrap_or_default();
        return Err(Failure {
            file,
            line: 1,
            reason: format!(
                "the log begins at seq {}, not {starts_at}: earlier lines are missing (give \
                 --from-seq {} to verify from there on purpose)",
                walk.report.first_seq, walk.report.first_seq
            ),
        });
    }
    if walk.report.unsigned_tail > options.allow_unsigned_tail {
        let (seq, file, line) = walk.unsigned.first().cloned().unwrap_or_default();
        return Err(Failure {
            file,
            line,
            reason: format!(
                "{} lines from seq {seq} on are not covered by a checkpoint whose signature \
                 verified{}: anyone who can write the files could have rewritten them and their \
                 chain. A log closed cleanly ends with a signed checkpoint; for a live log or one \
                 a crash ended, --allow-unsigned-tail {} accepts them on purpose",
                walk.report.unsigned_tail,
                if options.public_key.is_none() {
                    " (no public key was given to verify signatures)"
                } else {
                    ""
                },
                walk.report.unsigned_tail
            ),
        });
    }
    Ok(walk.report)
}

fn open(path: &Path) -> Result<std::io::BufReader<std::fs::File>, Failure> {
    std::fs::File::open(path)
        .map(std::io::BufReader::new)
        .map_err(|e| Failure {
            file: path.to_owned(),
            line: 0,
            reason: format!("cannot read: {e}"),
        })
}

fn first_seq(path: &Path) -> Result<Option<u64>, Failure> {
    let mut line = Vec::new();
    open(path)?
        .read_until(b'\n', &mut line)
        .map_err(|e| Failure {
            file: path.to_owned(),
            line: 1,
            reason: format!("cannot read: {e}"),
        })?;
    if line.is_empty() {
        return Ok(None);
    }
    let trimmed = line.strip_suffix(b"\n").unwrap_or(&line);
    serde_json::from_slice::<Parsed>(trimmed)
        .map(|p| Some(p.seq))
        .map_err(|_| Failure {
            file: path.to_owned(),
            line: 1,
            reason: "not an audit line (altered, or not an audit file)".into(),
        })
}

impl Walk<'_> {
    fn file(&mut self, path: &Path) -> Result<(), Failure> {
        let mut reader = open(path)?;
        let mut number = 0u64;
        let mut buffer = Vec::new();
        loop {
            buffer.clear();
            let read = reader.read_until(b'\n', &mut buffer).map_err(|e| Failure {
                file: path.to_owned(),
                line: number + 1,
                reason: format!("cannot read: {e}"),
            })?;
            if read == 0 {
                return Ok(());
            }
            number += 1;
            let fail = |reason: String| Failure {
                file: path.to_owned(),
                line: number,
                reason,
            };
            let Some(line) = buffer.strip_suffix(b"\n") else {
                return Err(fail(
                    "the line has no newline: the file was cut off in the middle of a line".into(),
                ));
            };
            let parsed: Parsed = serde_json::from_slice(line)
                .map_err(|_| fail("not an audit line: it was altered".into()))?;
            let hash = chain::line_hash(line);
            self.link(&parsed, path, number)?;
            self.report.lines += 1;
            if self.options.expect_head == Some(hash) {
                self.expected_found = true;
            }
            self.recent.insert(parsed.seq, hash);
            if parsed.kind == "checkpoint" {
                self.checkpoint(&parsed).map_err(fail)?;
            } else {
                self.unsigned.push((parsed.seq, path.to_owned(), number));
            }
            self.last = Some((
                ChainHead {
                    seq: parsed.seq,
                    hash,
                },
                path.to_owned(),
                number,
            ));
        }
    }

    /// Checks that the line follows the one before it.
    fn link(&mut self, parsed: &Parsed, path: &Path, number: u64) -> Result<(), Failure> {
        let here = |reason: String| Failure {
            file: path.to_owned(),
            line: number,
            reason,
        };
        let prev = decode_hash(&parsed.prev).ok_or_else(|| here("prev is not a hash".into()))?;
        let Some((last, last_file, last_line)) = &self.last else {
            self.report.first_seq = parsed.seq;
            if parsed.seq == 1 && prev != chain::GENESIS {
                return Err(here(
                    "the first line of the log does not start the chain".into(),
                ));
            }
            return Ok(());
        };
        if parsed.seq != last.seq + 1 {
            let what = if parsed.seq > last.seq + 1 {
                "lines are missing (dropped) before this one, or lines were reordered"
            } else {
                "lines were reordered or repeated"
            };
            return Err(here(format!(
                "sequence jumps from {} to {}: {what}",
                last.seq, parsed.seq
            )));
        }
        if prev != last.hash {
            return Err(Failure {
                file: last_file.clone(),
                line: *last_line,
                reason: format!(
                    "line (seq {}) was altered: its hash is not the prev of the next line{}",
                    last.seq,
                    if last_file == path {
                        String::new()
                    } else {
                        format!(" ({}:{number})", path.display())
                    }
                ),
            });
        }
        Ok(())
    }

    fn checkpoint(&mut self, parsed: &Parsed) -> Result<(), String> {
        let (Some(seq), Some(signed), Some(signature)) = (
            parsed.signed_seq,
            parsed.signed_hash.as_deref().and_then(decode_hash),
            parsed
                .signature
                .as_deref()
                .and_then(|s| hex::decode(s).ok()),
        ) else {
            return Err("a checkpoint without its signed position or signature".into());
        };
        let head = ChainHead { seq, hash: signed };
        match self.recent.get(&seq) {
            Some(hash) if *hash == signed => {}
            Some(_) => {
                return Err(format!(
                    "the checkpoint signs a line seq {seq} whose hash differs from the one in the log"
                ));
            }
            None if seq < self.report.first_seq => {}
            None => {
                return Err(format!(
                    "the checkpoint signs seq {seq}, which is not among the lines since the previous checkpoint"
                ));
            }
        }
        match &self.options.public_key {
            Some(key) => {
                if parsed.key_id.as_deref() != Some(chain::key_id(&key.to_bytes()).as_str()) {
                    return Err("the checkpoint was signed by another key".into());
                }
                if !key.verifies(&parsed.node, &head, &signature) {
                    return Err("the checkpoint's signature does not verify".into());
                }
                self.report.checkpoints_verified += 1;
            }
            // Unchecked, it covers nothing.
            None => {
                self.report.checkpoints_unchecked += 1;
                self.recent.retain(|s, _| *s >= seq);
                return Ok(());
            }
        }
        self.last_signed = seq;
        self.recent.retain(|s, _| *s >= seq);
        self.unsigned.retain(|(s, ..)| *s > seq);
        Ok(())
    }
}

fn decode_hash(text: &str) -> Option<[u8; 32]> {
    hex::decode(text).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::audit::{Anchor, AuditLog, CheckpointPolicy, SystemRecord};
    use crate::hsm::Hsm;

    struct TestAnchor(crate::hsm::memory::MemoryHsm);

    impl Anchor for TestAnchor {
        fn sign_checkpoint(&self, message: &[u8]) -> Result<Vec<u8>, String> {
            self.0.sign(message).map_err(|e| e.to_string())
        }
        fn audit_public_key(&self) -> Vec<u8> {
            self.0.audit_public_key()
        }
        fn stored_head(&self, _: &str) -> Result<Option<ChainHead>, String> {
            Ok(None)
        }
        fn store_head(&self, _: &str, _: &ChainHead) -> Result<(), String> {
            Ok(())
        }
    }

    fn write_log(dir: &Path, lines: usize) -> (PathBuf, PublicKey) {
        let path = dir.join("audit.log");
        let log = AuditLog::open(
            &path,
            "n1",
            Arc::new(crate::clock::SystemClock::new()),
            CheckpointPolicy::default(),
        )
        .expect("open");
        let anchor = TestAnchor(crate::hsm::memory::MemoryHsm::new());
        for i in 0..lines {
            log.system(&SystemRecord {
                actor: "system:test",
                action: "write",
                outcome: "OK".into(),
                version: Some(u32::try_from(i).expect("small")),
                ..SystemRecord::default()
            })
            .expect("write");
            if i % 4 == 3 {
                log.checkpoint(&anchor).expect("checkpoint");
            }
        }
        let key = PublicKey::from_bytes(&anchor.audit_public_key()).expect("key");
        (path, key)
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .expect("read")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn save(path: &Path, lines: &[String]) {
        std::fs::write(path, lines.join("\n") + "\n").expect("write");
    }

    #[test]
    fn a_clean_log_verifies_and_a_reopened_log_continues_the_chain() {
        let dir = tempfile::tempdir().expect("dir");
        let (path, key) = write_log(dir.path(), 10);
        // 10 lines, a checkpoint after every fourth: the last two are covered by the chain
        // only, accepted here on purpose.
        let options = Options {
            public_key: Some(key),
            allow_unsigned_tail: 3,
            ..Options::default()
        };
        let report = verify(std::slice::from_ref(&path), &options).expect("clean");
        assert_eq!(report.lines, 12, "10 lines and 2 checkpoints");
        assert_eq!(report.unsigned_tail, 2);
        assert_eq!(report.checkpoints_verified, 2);
        // Reopening continues the chain from the last line.
        let log = AuditLog::open(
            &path,
            "n1",
            Arc::new(crate::clock::SystemClock::new()),
            CheckpointPolicy::default(),
        )
        .expect("reopen");
        log.system(&SystemRecord::default()).expect("write");
        assert_eq!(verify(&[path], &options).expect("clean").lines, 13);
    }

    #[test]
    fn each_kind_of_tampering_is_found_and_named() {
        let dir = tempfile::tempdir().expect("dir");
        let (path, key) = write_log(dir.path(), 10);
        let original = lines(&path);
        let head = chain::line_hash(original.last().expect("lines").as_bytes());
        let check = |edited: Vec<String>, expect_head: bool| {
            save(&path, &edited);
            let options = Options {
                public_key: PublicKey::from_bytes(&key.to_bytes()).ok(),
                expect_head: expect_head.then_some(head),
                allow_unsigned_tail: 4,
                ..Options::default()
            };
            verify(std::slice::from_ref(&path), &options).expect_err("tampering must be found")
        };
        // One byte of line 3 (a digit of its version).
        let mut altered = original.clone();
        altered[2] = altered[2].replace("\"version\":2", "\"version\":3");
        let failure = check(altered, false);
        assert_eq!(failure.line, 3, "{failure}");
        assert!(failure.reason.contains("altered"), "{failure}");
        // A deleted line.
        let mut dropped = original.clone();
        dropped.remove(4);
        let failure = check(dropped, false);
        assert_eq!(failure.line, 5, "{failure}");
        assert!(failure.reason.contains("missing"), "{failure}");
        // Two swapped lines.
        let mut swapped = original.clone();
        swapped.swap(6, 7);
        let failure = check(swapped, false);
        assert_eq!(failure.line, 7, "{failure}");
        assert!(failure.reason.contains("reordered"), "{failure}");
        // A truncated tail, found with the head recorded before.
        let mut truncated = original.clone();
        truncated.truncate(9);
        let failure = check(truncated.clone(), true);
        assert!(failure.reason.contains("truncated"), "{failure}");
        // Without it, a log cut at a line boundary looks whole (given an allowance for its
        // unsigned tail): why the head is kept.
        save(&path, &truncated);
        let lenient = Options {
            public_key: PublicKey::from_bytes(&key.to_bytes()).ok(),
            allow_unsigned_tail: 4,
            ..Options::default()
        };
        assert!(verify(std::slice::from_ref(&path), &lenient).is_ok());
        // A line cut in the middle.
        save(&path, &original);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes.truncate(bytes.len() - 5);
        std::fs::write(&path, bytes).expect("write");
        let failure = verify(std::slice::from_ref(&path), &Options::default()).expect_err("torn");
        assert!(failure.reason.contains("cut off"), "{failure}");
        // A signature made by another key.
        save(&path, &original);
        let other = TestAnchor(crate::hsm::memory::MemoryHsm::new());
        let options = Options {
            public_key: PublicKey::from_bytes(&other.audit_public_key()).ok(),
            ..Options::default()
        };
        let failure = verify(std::slice::from_ref(&path), &options).expect_err("other key");
        assert!(failure.reason.contains("another key"), "{failure}");
    }

    /// Rewrites `lines` as a writer of the files would: keeps the first `from` as they are,
    /// then changes what `edit` changes, drops what it drops, and computes the chain again
    /// (sequence and prev) from there.
    fn recompute(
        lines: &[String],
        from: usize,
        mut edit: impl FnMut(&mut serde_json::Value) -> bool,
    ) -> Vec<String> {
        let mut out: Vec<String> = lines[..from].to_vec();
        let mut prev = out
            .last()
            .map_or(chain::GENESIS, |l| chain::line_hash(l.as_bytes()));
        let mut seq = from as u64;
        for line in &lines[from..] {
            let mut value: serde_json::Value = serde_json::from_str(line).expect("json");
            if !edit(&mut value) {
                continue;
            }
            seq += 1;
            value["seq"] = seq.into();
            value["prev"] = hex::encode(prev).into();
            let text = serde_json::to_string(&value).expect("json");
            prev = chain::line_hash(text.as_bytes());
            out.push(text);
        }
        out
    }

    /// Issue 25, finding 3: the chain alone is no proof. A log whose checkpoints were dropped
    /// and whose lines were edited, with the chain computed again, verified with exit 0; so
    /// did a log that never had a checkpoint, and one that did not start at seq 1.
    #[test]
    fn a_rewritten_chain_does_not_verify_without_signatures_covering_it() {
        let dir = tempfile::tempdir().expect("dir");
        let (path, key) = write_log(dir.path(), 10);
        let strict = || Options {
            public_key: PublicKey::from_bytes(&key.to_bytes()).ok(),
            ..Options::default()
        };
        let original = lines(&path);
        // Every checkpoint dropped, a line edited, the chain recomputed: well-linked, unsigned.
        let rewritten = recompute(&original, 0, |value| {
            if value["kind"] == "checkpoint" {
                return false;
            }
            if value["version"] == 2 {
                value["version"] = 3.into();
            }
            true
        });
        save(&path, &rewritten);
        let failure = verify(std::slice::from_ref(&path), &strict()).expect_err("unsigned");
        assert_eq!(failure.line, 1, "{failure}");
        assert!(
            failure.reason.contains("not covered by a checkpoint"),
            "{failure}"
        );
        // A line after the last checkpoint deleted and the chain recomputed from there.
        let last_checkpoint = original
            .iter()
            .rposition(|l| l.contains("\"kind\":\"checkpoint\""))
            .expect("a checkpoint");
        let mut first = true;
        let tail_edited = recompute(&original, last_checkpoint + 1, |_| {
            // The line right after the last checkpoint goes.
            !std::mem::replace(&mut first, false)
        });
        save(&path, &tail_edited);
        let failure = verify(std::slice::from_ref(&path), &strict()).expect_err("unsigned tail");
        assert!(
            failure.reason.contains("not covered by a checkpoint"),
            "{failure}"
        );
        // The lines before seq 5 cut away: not from the start.
        save(&path, &original[4..]);
        let failure = verify(
            std::slice::from_ref(&path),
            &Options {
                allow_unsigned_tail: 3,
                ..strict()
            },
        )
        .expect_err("not from seq 1");
        assert!(failure.reason.contains("--from-seq 5"), "{failure}");
        let from_five = Options {
            allow_unsigned_tail: 3,
            from_seq: Some(5),
            ..strict()
        };
        assert!(verify(std::slice::from_ref(&path), &from_five).is_ok());
        // Without the public key nothing is covered.
        save(&path, &original);
        let failure = verify(
            std::slice::from_ref(&path),
            &Options {
                public_key: None,
                ..Options::default()
            },
        )
        .expect_err("no key");
        assert!(failure.reason.contains("no public key"), "{failure}");
    }

    /// A log closed cleanly ends with a signed checkpoint and verifies to its last line with
    /// no allowance; the log then goes on after a restart.
    #[test]
    fn a_log_closed_cleanly_verifies_to_its_last_line() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("audit.log");
        let hsm = crate::hsm::memory::MemoryHsm::new();
        let key = PublicKey::from_bytes(&hsm.audit_public_key()).expect("key");
        let anchor: Arc<dyn Anchor> = Arc::new(TestAnchor(hsm));
        for run in 0..2 {
            let log = Arc::new(
                AuditLog::open(
                    &path,
                    "n1",
                    Arc::new(crate::clock::SystemClock::new()),
                    CheckpointPolicy::default(),
                )
                .expect("open"),
            );
            log.attach(Arc::downgrade(&anchor));
            for _ in 0..3 {
                log.system(&SystemRecord::default()).expect("write");
            }
            log.close().expect("final checkpoint");
            let report = verify(
                std::slice::from_ref(&path),
                &Options {
                    public_key: PublicKey::from_bytes(&key.to_bytes()).ok(),
                    ..Options::default()
                },
            )
            .expect("clean");
            assert_eq!(report.unsigned_tail, 0, "run {run}");
            assert_eq!(report.checkpoints_verified, run + 1);
        }
    }

    /// An anchor during whose signature another request writes its line, as happens when the
    /// checkpoint thread signs while requests go on.
    struct BusyAnchor {
        hsm: crate::hsm::memory::MemoryHsm,
        log: std::sync::Mutex<Option<Arc<AuditLog>>>,
    }

    impl Anchor for BusyAnchor {
        fn sign_checkpoint(&self, message: &[u8]) -> Result<Vec<u8>, String> {
            if let Some(log) = self.log.lock().expect("lock").take() {
                log.system(&SystemRecord::default()).expect("write");
            }
            self.hsm.sign(message).map_err(|e| e.to_string())
        }
        fn audit_public_key(&self) -> Vec<u8> {
            self.hsm.audit_public_key()
        }
        fn stored_head(&self, _: &str) -> Result<Option<ChainHead>, String> {
            Ok(None)
        }
        fn store_head(&self, _: &str, _: &ChainHead) -> Result<(), String> {
            Ok(())
        }
    }

    /// A line written while a checkpoint was being signed is not covered by it: the last
    /// checkpoint of a graceful stop still signs it (it used to count as covered, and a log
    /// closed cleanly could end with an unsigned line).
    #[test]
    fn a_line_written_while_a_checkpoint_is_signed_is_signed_by_the_next() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("audit.log");
        let log = Arc::new(
            AuditLog::open(
                &path,
                "n1",
                Arc::new(crate::clock::SystemClock::new()),
                CheckpointPolicy::default(),
            )
            .expect("open"),
        );
        let hsm = crate::hsm::memory::MemoryHsm::new();
        let key = hsm.audit_public_key();
        let anchor = Arc::new(BusyAnchor {
            hsm,
            log: std::sync::Mutex::new(None),
        });
        let as_anchor: Arc<dyn Anchor> = anchor.clone();
        log.attach(Arc::downgrade(&as_anchor));
        log.system(&SystemRecord::default()).expect("write");
        *anchor.log.lock().expect("lock") = Some(Arc::clone(&log));
        log.checkpoint(anchor.as_ref()).expect("checkpoint");
        log.close().expect("final checkpoint");
        let report = verify(
            std::slice::from_ref(&path),
            &Options {
                public_key: PublicKey::from_bytes(&key).ok(),
                ..Options::default()
            },
        )
        .expect("every line is signed");
        assert_eq!(report.checkpoints_verified, 2);
        assert_eq!(report.unsigned_tail, 0);
    }

    /// An anchor that keeps the stored head, as the system database does.
    struct StoringAnchor {
        hsm: crate::hsm::memory::MemoryHsm,
        head: std::sync::Mutex<Option<ChainHead>>,
    }

    impl Anchor for StoringAnchor {
        fn sign_checkpoint(&self, message: &[u8]) -> Result<Vec<u8>, String> {
            self.hsm.sign(message).map_err(|e| e.to_string())
        }
        fn audit_public_key(&self) -> Vec<u8> {
            self.hsm.audit_public_key()
        }
        fn stored_head(&self, _: &str) -> Result<Option<ChainHead>, String> {
            Ok(*self.head.lock().expect("lock"))
        }
        fn store_head(&self, _: &str, head: &ChainHead) -> Result<(), String> {
            *self.head.lock().expect("lock") = Some(*head);
            Ok(())
        }
    }

    /// Issue 25, finding 3: at start the server compared only the stored head's sequence. A
    /// log rewritten with its chain recomputed, as long as it is not shorter, passed; now the
    /// line at the stored sequence must be the one signed.
    #[test]
    fn a_rewritten_log_is_reported_at_start() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("audit.log");
        let anchor: Arc<dyn Anchor> = Arc::new(StoringAnchor {
            hsm: crate::hsm::memory::MemoryHsm::new(),
            head: std::sync::Mutex::new(None),
        });
        let open = || {
            let log = Arc::new(
                AuditLog::open(
                    &path,
                    "n1",
                    Arc::new(crate::clock::SystemClock::new()),
                    CheckpointPolicy::default(),
                )
                .expect("open"),
            );
            log.attach(Arc::downgrade(&anchor));
            log
        };
        let log = open();
        for i in 0..5 {
            log.system(&SystemRecord {
                version: Some(i),
                ..SystemRecord::default()
            })
            .expect("write");
        }
        log.close().expect("checkpoint");
        drop(log);
        let alerts = |path: &Path| {
            lines(path)
                .iter()
                .filter(|l| l.contains("LOG_DIFFERS_FROM_STORED_HEAD"))
                .count()
        };
        drop(open());
        assert_eq!(alerts(&path), 0, "an untouched log is not reported");
        // Line 2 edited, the chain (and the checkpoint line, re-serialized) recomputed.
        let original = lines(&path);
        save(
            &path,
            &recompute(&original, 1, |value| {
                if value["version"] == 1 {
                    value["version"] = 9.into();
                }
                true
            }),
        );
        drop(open());
        assert_eq!(alerts(&path), 1, "the rewritten log is reported");
    }
}
