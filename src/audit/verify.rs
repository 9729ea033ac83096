//! `keyfront audit verify`: walks audit files in chain order and reports the first line that
//! was altered, dropped, reordered or cut off, and checks every checkpoint's signature with the
//! audit public key alone (no PIN, no HSM).

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
    /// Lines after the last checkpoint's signed position: covered by the chain only.
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
    if let Some((head, ..)) = &walk.last {
        walk.report.head = Some(*head);
        walk.report.unsigned_tail = head.seq.saturating_sub(walk.last_signed);
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
            None => self.report.checkpoints_unchecked += 1,
        }
        self.last_signed = seq;
        self.recent.retain(|s, _| *s >= seq);
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
        let options = Options {
            public_key: Some(key),
            expect_head: None,
        };
        let report = verify(std::slice::from_ref(&path), &options).expect("clean");
        assert_eq!(report.lines, 12, "10 lines and 2 checkpoints");
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
        // Without it, a log cut at a line boundary looks whole: why the head is kept.
        save(&path, &truncated);
        assert!(verify(std::slice::from_ref(&path), &Options::default()).is_ok());
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
            expect_head: None,
        };
        let failure = verify(std::slice::from_ref(&path), &options).expect_err("other key");
        assert!(failure.reason.contains("another key"), "{failure}");
    }
}
