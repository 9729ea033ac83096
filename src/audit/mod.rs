//! The audit log: one JSON line per request (allowed or refused), per TLS connection
//! (accepted or rejected), per mutation's intent, and per action of keyfront's own (`system:*`).
//!
//! Lines never hold plaintext, keys or secrets; context values appear only as HMACs under a key
//! derived in the HSM. Each line is handed to the operating system (`write(2)`) before the
//! response it describes is released; if that fails, the request fails (fail closed) and, until
//! a line can be written again, new requests are refused before they act.
//!
//! Integrity (`chain.rs`, `verify.rs`): every line carries its sequence number and the SHA-256
//! of the line before it; every `checkpoint_lines` lines or `checkpoint_interval` a checkpoint
//! line carries the HSM's ECDSA P-256 signature over a chain position, and that position is
//! stored in the system database. The live file rotates at the first line of each UTC day to
//! `<file>.<YYYY-MM-DD>`; the chain runs on across files and restarts.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use serde::Serialize;

use crate::clock::Clock;

pub mod chain;
pub mod verify;

pub use chain::ChainHead;

/// What the audit log needs from the HSM and the system database: checkpoint signatures and a
/// durable copy of the chain head. Implemented by the domain once the HSM is reachable.
pub trait Anchor: Send + Sync {
    /// Signs a checkpoint message with the HSM's audit key (ECDSA P-256, r ‖ s).
    ///
    /// # Errors
    /// The HSM's, as text.
    fn sign_checkpoint(&self, message: &[u8]) -> Result<Vec<u8>, String>;
    /// The audit public key (SEC1 point).
    fn audit_public_key(&self) -> Vec<u8>;
    /// The chain head last stored for `node`'s log (each node of a cluster has its own).
    ///
    /// # Errors
    /// Storage errors, as text.
    fn stored_head(&self, node: &str) -> Result<Option<ChainHead>, String>;
    /// Stores the chain head of `node`'s log (flushed).
    ///
    /// # Errors
    /// Storage errors, as text.
    fn store_head(&self, node: &str, head: &ChainHead) -> Result<(), String>;
}

/// When checkpoints are signed.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    /// After this many lines.
    pub lines: u64,
    /// Or after this long, if any line was written since the last one.
    pub interval: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            lines: 1000,
            interval: Duration::from_secs(60),
        }
    }
}

/// Where audit lines go.
pub struct AuditLog {
    node: String,
    path: PathBuf,
    clock: Arc<dyn Clock>,
    policy: CheckpointPolicy,
    writer: Mutex<Writer>,
    // False from a failed write until the next successful one: requests are refused before
    // they act while the log cannot take their lines.
    healthy: AtomicBool,
    // Tests: every write fails, as a broken disk would make it.
    fault: Arc<AtomicBool>,
    wake: Arc<(Mutex<bool>, Condvar)>,
    // The HSM and system database once attached: the final checkpoint at a graceful stop.
    anchor: Mutex<Option<Weak<dyn Anchor>>>,
}

struct Writer {
    file: File,
    // Regular files rotate and are truncated back after a partial write; devices do not.
    regular: bool,
    len: u64,
    day: String,
    head: ChainHead,
    since_checkpoint: u64,
    last_checkpoint: Duration,
}

/// A mutation about to be carried out, logged before it acts.
#[derive(Debug, Default, Serialize)]
pub struct IntentRecord {
    /// The id its outcome line will carry.
    pub request_id: String,
    /// The caller.
    pub identity: String,
    /// The RPC.
    pub rpc: String,
    /// Tenant name, if any.
    pub tenant: Option<String>,
    /// Key name, if any.
    pub key: Option<String>,
    /// The support grant used, if any.
    pub grant_id: Option<String>,
}

/// An action keyfront takes on its own (scheduler, reload, audit housekeeping).
#[derive(Debug, Default, Serialize)]
pub struct SystemRecord {
    /// `system:scheduler`, `system:reload`, `system:audit`.
    pub actor: &'static str,
    /// What it does, e.g. `destroy_key_version`.
    pub action: &'static str,
    /// `intent` before acting, then `OK` or the failure.
    pub outcome: String,
    /// Tenant (id or name), if any.
    pub tenant: Option<String>,
    /// Key name, if any.
    pub key: Option<String>,
    /// Key version, if any.
    pub version: Option<u32>,
    /// Free detail for people; never secret.
    pub detail: Option<String>,
}

/// A signed checkpoint.
#[derive(Debug, Serialize)]
struct CheckpointRecord {
    signed_seq: u64,
    signed_hash: String,
    signature: String,
    key_id: String,
}

/// One request, as the audit log records it.
#[derive(Debug, Default, Serialize)]
pub struct RequestRecord {
    /// A random id for this request (also in the server's logs).
    pub request_id: String,
    /// Remote address.
    pub peer: String,
    /// The caller's identity, if its certificate gave one.
    pub identity: Option<String>,
    /// SHA-256 of the caller's certificate (hex).
    pub cert_fingerprint: Option<String>,
    /// The RPC, e.g. `keyfront.v1.KeyService/Encrypt`.
    pub rpc: String,
    /// Tenant name, once known.
    pub tenant: Option<String>,
    /// Key name, once known.
    pub key: Option<String>,
    /// Key version used, once known.
    pub version: Option<u32>,
    /// The gRPC status code name (`OK`, `PERMISSION_DENIED`, …).
    pub outcome: String,
    /// Microseconds from receipt to the response.
    pub latency_us: u64,
    /// The support grant used, if any.
    pub grant_id: Option<String>,
    /// For batches: each item's status code name, in order.
    pub items: Option<Vec<&'static str>>,
    /// Context names with HMAC'd values (hex), never the values.
    pub context: Option<std::collections::BTreeMap<String, String>>,
    /// The caller-chosen request id of mutating calls.
    pub client_request_id: Option<String>,
    /// The check value of key material imported or put up for approval (never the material).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_check_value: Option<String>,
    /// A mutation whose caller went away before it ended (`CANCELLED`, `DEADLINE_EXCEEDED`):
    /// it ran to its end all the same, and `outcome` says how that went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller_gone: Option<&'static str>,
}

/// One TLS connection, as the audit log records it.
#[derive(Debug, Serialize)]
pub struct ConnectionRecord {
    /// Remote address.
    pub peer: String,
    /// `accepted` or `rejected`.
    pub outcome: &'static str,
    /// The identity the certificate gave, if any.
    pub identity: Option<String>,
    /// SHA-256 of the client certificate (hex), if one was presented.
    pub cert_fingerprint: Option<String>,
    /// Why a connection was rejected.
    pub reason: Option<String>,
}

/// A line as one struct: what [`line_bytes`] must produce (checked by a test).
#[cfg(test)]
#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    seq: u64,
    prev: &'a str,
    time: String,
    node: &'a str,
    kind: &'static str,
    #[serde(flatten)]
    record: &'a T,
}

/// The bytes of a line (without its newline): what serializing [`Line`] gives, with the record
/// serialized beforehand as `body` (a JSON object).
fn line_bytes(
    seq: u64,
    prev: &[u8; 32],
    time: &str,
    node: &str,
    kind: &str,
    body: &[u8],
) -> std::io::Result<Vec<u8>> {
    let [b'{', fields @ .., b'}'] = body else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "an audit record must serialize to a JSON object",
        ));
    };
    let mut bytes = Vec::with_capacity(body.len() + 192);
    bytes.extend_from_slice(b"{\"seq\":");
    bytes.extend_from_slice(seq.to_string().as_bytes());
    bytes.extend_from_slice(b",\"prev\":\"");
    bytes.extend_from_slice(hex::encode(prev).as_bytes());
    bytes.extend_from_slice(b"\",\"time\":");
    serde_json::to_writer(&mut bytes, time)?;
    bytes.extend_from_slice(b",\"node\":");
    serde_json::to_writer(&mut bytes, node)?;
    bytes.extend_from_slice(b",\"kind\":");
    serde_json::to_writer(&mut bytes, kind)?;
    if !fields.is_empty() {
        bytes.push(b',');
        bytes.extend_from_slice(fields);
    }
    bytes.push(b'}');
    Ok(bytes)
}

/// The parts of a line that the writer reads back when it reopens a log.
#[derive(serde::Deserialize)]
struct LineHead {
    seq: u64,
    time: String,
}

impl AuditLog {
    /// Opens (creating if needed) the live audit file for appending, and finds where the chain
    /// stands: the last line of the live file, else of the newest rotated file, else the start.
    /// A torn last line (a crash in the middle of a write) is cut off.
    ///
    /// # Errors
    /// I/O errors, or a last line that is not an audit line.
    pub fn open(
        path: &Path,
        node: &str,
        clock: Arc<dyn Clock>,
        policy: CheckpointPolicy,
    ) -> std::io::Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)?;
        let metadata = file.metadata()?;
        let regular = metadata.is_file();
        let today = utc_day(&clock.now());
        let (mut head, mut day, mut len) = (ChainHead::START, today, 0);
        if regular {
            len = cut_torn_tail(&mut file, metadata.len())?;
            match last_line(&mut file, len)? {
                Some(line) => {
                    let (found, found_day) = parse_head(&line)?;
                    (head, day) = (found, found_day);
                }
                None => {
                    if let Some(line) = newest_rotated_line(path)? {
                        head = parse_head(&line)?.0;
                    }
                }
            }
        }
        Ok(Self {
            node: node.to_owned(),
            path: path.to_owned(),
            policy,
            writer: Mutex::new(Writer {
                file,
                regular,
                len,
                day,
                head,
                since_checkpoint: head.seq.min(1),
                last_checkpoint: clock.monotonic(),
            }),
            clock,
            healthy: AtomicBool::new(true),
            fault: Arc::new(AtomicBool::new(false)),
            wake: Arc::new((Mutex::new(false), Condvar::new())),
            anchor: Mutex::new(None),
        })
    }

    /// Connects the log to the HSM and the system database: reports a log that ends before the
    /// stored chain head (truncated or replaced), then signs checkpoints on a thread of its own
    /// until the log or the anchor is dropped.
    pub fn attach(self: &Arc<Self>, anchor: Weak<dyn Anchor>) {
        if let Some(strong) = anchor.upgrade() {
            let head = self.head();
            match strong.stored_head(&self.node) {
                Ok(Some(stored)) if stored.seq > head.seq => {
                    self.alert_stored_head(
                        "audit_truncated",
                        "LOG_BEHIND_STORED_HEAD",
                        &stored,
                        format!("the log ended at seq {}", head.seq),
                        "ALERT: the audit log ends before the chain head stored in the system database; it was truncated or replaced",
                    );
                }
                // The stored head's line must be in the log as it was signed: a log rewritten
                // from an earlier line on (the chain recomputed) has another line there.
                Ok(Some(stored)) => match line_hash_at(&self.path, stored.seq) {
                    Ok(Some(hash)) if hash == stored.hash => {}
                    Ok(Some(hash)) => self.alert_stored_head(
                        "audit_rewritten",
                        "LOG_DIFFERS_FROM_STORED_HEAD",
                        &stored,
                        format!("the log's line at that seq has hash {}", hex::encode(hash)),
                        "ALERT: the audit log's line at the stored chain head differs from the one signed; the log was rewritten",
                    ),
                    Ok(None) => tracing::warn!(
                        stored_seq = stored.seq,
                        "the stored audit chain head is too far back in the log to check at start; `keyfront audit verify` checks it"
                    ),
                    Err(error) => {
                        tracing::warn!(%error, "cannot read the audit log to check the stored chain head")
                    }
                },
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "cannot read the stored audit chain head"),
            }
        }
        *self.anchor.lock().expect("audit anchor lock poisoned") = Some(anchor.clone());
        let log = Arc::downgrade(self);
        let wake = Arc::clone(&self.wake);
        let spawned = std::thread::Builder::new()
            .name("audit-checkpoints".into())
            .spawn(move || checkpoint_loop(&log, &anchor, &wake));
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the audit checkpoint thread");
        }
    }

    /// An alert line and log entry about the stored chain head.
    fn alert_stored_head(
        &self,
        alert: &'static str,
        outcome: &str,
        stored: &ChainHead,
        found: String,
        message: &'static str,
    ) {
        tracing::error!(alert, stored_seq = stored.seq, %found, "{message}");
        let _ = self.system(&SystemRecord {
            actor: "system:audit",
            action: "check_chain_head",
            outcome: outcome.into(),
            detail: Some(format!(
                "stored head seq {} hash {}; {found}",
                stored.seq,
                hex::encode(stored.hash)
            )),
            ..SystemRecord::default()
        });
    }

    /// At a graceful stop: signs a last checkpoint over the lines written since the previous
    /// one, so that a log closed cleanly verifies to its last line.
    ///
    /// # Errors
    /// The HSM's or the disk's, as text.
    pub fn close(&self) -> Result<(), String> {
        let anchor = self
            .anchor
            .lock()
            .expect("audit anchor lock poisoned")
            .as_ref()
            .and_then(Weak::upgrade);
        match anchor {
            Some(anchor) => self.checkpoint(anchor.as_ref()).map(drop),
            None => Ok(()),
        }
    }

    /// Whether the last write succeeded. When it did not, requests are refused before acting.
    pub fn writable(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Every write fails while `switch` is on (tests: an audit sink that breaks).
    #[cfg(feature = "test-hooks")]
    pub fn with_failure_switch(mut self, switch: Arc<AtomicBool>) -> Self {
        self.fault = switch;
        self
    }

    /// The chain's current head.
    /// The node this log belongs to (its lines name it).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The chain head now.
    pub fn head(&self) -> ChainHead {
        self.writer.lock().expect("audit writer lock poisoned").head
    }

    /// Writes a request's outcome line.
    ///
    /// # Errors
    /// I/O errors; the caller fails the request.
    pub fn request(&self, record: &RequestRecord) -> std::io::Result<()> {
        self.write("request", record, None).map(drop)
    }

    /// Writes a mutation's intent line, before it acts.
    ///
    /// # Errors
    /// I/O errors; the caller refuses the mutation.
    pub fn intent(&self, record: &IntentRecord) -> std::io::Result<()> {
        self.write("intent", record, None).map(drop)
    }

    /// Writes a connection line.
    ///
    /// # Errors
    /// I/O errors.
    pub fn connection(&self, record: &ConnectionRecord) -> std::io::Result<()> {
        self.write("connection", record, None).map(drop)
    }

    /// Writes a line about an action of keyfront's own.
    ///
    /// # Errors
    /// I/O errors; an intent that cannot be logged is not carried out.
    pub fn system(&self, record: &SystemRecord) -> std::io::Result<()> {
        self.write("system", record, None).map(drop)
    }

    /// Signs the current chain head with the HSM and writes the checkpoint line, syncs the
    /// file, then stores the checkpoint line's position in the system database. Nothing to do if no line was
    /// written since the last checkpoint.
    ///
    /// # Errors
    /// The HSM's or the disk's, as text.
    pub fn checkpoint(&self, anchor: &dyn Anchor) -> Result<Option<ChainHead>, String> {
        let head = {
            let writer = self.writer.lock().expect("audit writer lock poisoned");
            if writer.since_checkpoint == 0 {
                return Ok(None);
            }
            writer.head
        };
        // Signed outside the lock: lines keep flowing while the HSM works; the checkpoint
        // names the position it signs.
        let message = chain::checkpoint_message(&self.node, &head);
        let signature = anchor.sign_checkpoint(&message)?;
        let record = CheckpointRecord {
            signed_seq: head.seq,
            signed_hash: hex::encode(head.hash),
            signature: hex::encode(signature),
            key_id: chain::key_id(&anchor.audit_public_key()),
        };
        let written = self
            .write("checkpoint", &record, Some(head.seq))
            .map_err(|e| e.to_string())?;
        // On disk before the system database says the chain reached it: a power cut must not
        // leave the stored head ahead of the log. Synced outside the lock, on a second handle.
        let file = {
            let writer = self.writer.lock().expect("audit writer lock poisoned");
            writer
                .regular
                .then(|| writer.file.try_clone())
                .transpose()
                .map_err(|e| e.to_string())?
        };
        if let Some(file) = file {
            file.sync_data().map_err(|e| e.to_string())?;
        }
        anchor.store_head(&self.node, &written)?;
        Ok(Some(written))
    }

    fn checkpoint_due(&self) -> bool {
        let writer = self.writer.lock().expect("audit writer lock poisoned");
        writer.since_checkpoint >= self.policy.lines
            || (writer.since_checkpoint > 0
                && self
                    .clock
                    .monotonic()
                    .saturating_sub(writer.last_checkpoint)
                    >= self.policy.interval)
    }

    fn write<T: Serialize>(
        &self,
        kind: &'static str,
        record: &T,
        signs: Option<u64>,
    ) -> std::io::Result<ChainHead> {
        let result = self.append(kind, record, signs);
        self.healthy.store(result.is_ok(), Ordering::Release);
        result
    }

    fn append<T: Serialize>(
        &self,
        kind: &'static str,
        record: &T,
        signs: Option<u64>,
    ) -> std::io::Result<ChainHead> {
        let now = self.clock.now();
        // Everything but the chain fields is serialized before the lock: writers queue only
        // for the hash, the header and the write.
        let time = humantime::format_rfc3339_micros(now).to_string();
        let body = serde_json::to_vec(record)?;
        let mut writer = self.writer.lock().expect("audit writer lock poisoned");
        let day = utc_day(&now);
        if writer.regular && day != writer.day {
            self.rotate(&mut writer, day)?;
        }
        let seq = writer.head.seq + 1;
        let mut bytes = line_bytes(seq, &writer.head.hash, &time, &self.node, kind, &body)?;
        let head = ChainHead {
            seq,
            hash: chain::line_hash(&bytes),
        };
        bytes.push(b'\n');
        if self.fault.load(Ordering::Acquire) {
            return Err(std::io::Error::other("injected audit failure"));
        }
        // One write per line on an O_APPEND file: the line is in the kernel before the
        // response is released. A partial write is cut off again so the chain stays whole.
        if let Err(error) = writer.file.write_all(&bytes) {
            if writer.regular {
                let len = writer.len;
                let _ = writer.file.set_len(len);
            }
            return Err(error);
        }
        writer.len += bytes.len() as u64;
        writer.head = head;
        if let Some(signed) = signs {
            // Lines written while the HSM signed are not covered by this checkpoint: they
            // still count towards the next one (and a graceful stop's last one signs them).
            writer.since_checkpoint = (seq - 1).saturating_sub(signed);
            writer.last_checkpoint = self.clock.monotonic();
        } else {
            writer.since_checkpoint += 1;
            if writer.since_checkpoint == self.policy.lines {
                let (flag, condvar) = &*self.wake;
                *flag.lock().expect("audit wake lock poisoned") = true;
                condvar.notify_one();
            }
        }
        Ok(head)
    }

    /// Renames the live file to `<file>.<day it holds>` and starts a new one; the chain goes on.
    fn rotate(&self, writer: &mut Writer, day: String) -> std::io::Result<()> {
        if writer.len > 0 {
            let mut target = rotated_name(&self.path, &writer.day, 0);
            let mut n = 0;
            while target.exists() {
                n += 1;
                target = rotated_name(&self.path, &writer.day, n);
            }
            writer.file.sync_all()?;
            std::fs::rename(&self.path, &target)?;
            writer.file = OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(&self.path)?;
            writer.len = 0;
            tracing::info!(rotated = %target.display(), "audit log rotated");
        }
        writer.day = day;
        Ok(())
    }
}

fn checkpoint_loop(log: &Weak<AuditLog>, anchor: &Weak<dyn Anchor>, wake: &(Mutex<bool>, Condvar)) {
    let (flag, condvar) = wake;
    loop {
        {
            let woken = flag.lock().expect("audit wake lock poisoned");
            let (mut woken, _) = condvar
                .wait_timeout(woken, Duration::from_secs(1))
                .expect("audit wake lock poisoned");
            *woken = false;
        }
        let (Some(log), Some(anchor)) = (log.upgrade(), anchor.upgrade()) else {
            return;
        };
        if log.checkpoint_due() {
            if let Err(error) = log.checkpoint(anchor.as_ref()) {
                tracing::warn!(%error, "audit checkpoint failed; retrying");
            }
        }
    }
}

fn rotated_name(path: &Path, day: &str, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{day}"));
    if n > 0 {
        name.push(format!(".{n}"));
    }
    PathBuf::from(name)
}

/// `YYYY-MM-DD` in UTC.
fn utc_day(time: &std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(*time).to_string()[..10].to_owned()
}

fn parse_head(line: &[u8]) -> std::io::Result<(ChainHead, String)> {
    let parsed: LineHead = serde_json::from_slice(line).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the audit log's last line is not an audit line: {e}"),
        )
    })?;
    let day = parsed.time.get(..10).unwrap_or_default().to_owned();
    Ok((
        ChainHead {
            seq: parsed.seq,
            hash: chain::line_hash(line),
        },
        day,
    ))
}

/// Cuts a last line without its newline (a write torn by a crash); returns the new length.
fn cut_torn_tail(file: &mut File, len: u64) -> std::io::Result<u64> {
    if len == 0 {
        return Ok(0);
    }
    let keep = match last_newline(file, len)? {
        Some(at) => at + 1,
        None => 0,
    };
    if keep < len {
        tracing::warn!(
            cut_bytes = len - keep,
            "the audit log ended in a torn line (a crash mid-write); cutting it off"
        );
        file.set_len(keep)?;
    }
    Ok(keep)
}

/// The offset of the last `\n` before `end`.
fn last_newline(file: &mut File, end: u64) -> std::io::Result<Option<u64>> {
    const CHUNK: u64 = 64 * 1024;
    let mut high = end;
    let mut buffer = vec![0; CHUNK as usize];
    while high > 0 {
        let low = high.saturating_sub(CHUNK);
        let chunk = &mut buffer[..(high - low) as usize];
        file.seek(SeekFrom::Start(low))?;
        file.read_exact(chunk)?;
        if let Some(at) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(low + at as u64));
        }
        high = low;
    }
    Ok(None)
}

/// The last complete line of a file that ends in `\n` (`len` bytes), without its newline.
fn last_line(file: &mut File, len: u64) -> std::io::Result<Option<Vec<u8>>> {
    if len == 0 {
        return Ok(None);
    }
    let start = last_newline(file, len - 1)?.map_or(0, |at| at + 1);
    let mut line = vec![0; (len - 1 - start) as usize];
    file.seek(SeekFrom::Start(start))?;
    file.read_exact(&mut line)?;
    Ok(Some(line))
}

/// How far back from the end of a file the start-up check of the stored head reads.
const HEAD_CHECK_WINDOW: u64 = 16 * 1024 * 1024;

/// The hash of the line with sequence `seq`, in the current file or, if that begins after it,
/// the newest rotated one; `None` when it is not within the last [`HEAD_CHECK_WINDOW`] bytes of
/// either (or not there at all).
fn line_hash_at(path: &Path, seq: u64) -> std::io::Result<Option<[u8; 32]>> {
    let mut files = vec![path.to_path_buf()];
    files.extend(newest_rotated(path)?);
    for file in files {
        let mut handle = File::open(&file)?;
        let len = handle.metadata()?.len();
        let start = len.saturating_sub(HEAD_CHECK_WINDOW);
        let mut bytes = vec![0; usize::try_from(len - start).unwrap_or(0)];
        handle.seek(SeekFrom::Start(start))?;
        handle.read_exact(&mut bytes)?;
        let mut lines = bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty());
        if start > 0 {
            lines.next(); // the window began inside a line
        }
        let mut first = None;
        for line in lines {
            let Ok(head) = serde_json::from_slice::<SeqOnly>(line) else {
                continue;
            };
            first.get_or_insert(head.seq);
            if head.seq == seq {
                return Ok(Some(chain::line_hash(line)));
            }
        }
        // This file begins after `seq` (from its start): an older file may hold it.
        if start > 0 || first.is_none_or(|first| first <= seq) {
            return Ok(None);
        }
    }
    Ok(None)
}

#[derive(serde::Deserialize)]
struct SeqOnly {
    seq: u64,
}

/// The newest `<file>.<day>[.<n>]` beside `path`.
fn newest_rotated(path: &Path) -> std::io::Result<Option<PathBuf>> {
    let Some(dir) = path.parent() else {
        return Ok(None);
    };
    let Some(stem) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(None);
    };
    let prefix = format!("{stem}.");
    let mut rotated: Vec<(String, u32, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix(&prefix) {
            let (day, n) = match rest.split_once('.') {
                Some((day, n)) => (day.to_owned(), n.parse().unwrap_or(0)),
                None => (rest.to_owned(), 0),
            };
            rotated.push((day, n, entry.path()));
        }
    }
    rotated.sort();
    Ok(rotated.pop().map(|(_, _, newest)| newest))
}

/// The last line of the newest `<file>.<day>[.<n>]` beside `path`.
fn newest_rotated_line(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    let Some(newest) = newest_rotated(path)? else {
        return Ok(None);
    };
    let mut file = File::open(newest)?;
    let len = file.metadata()?.len();
    let len = match last_newline(&mut file, len)? {
        Some(at) => at + 1,
        None => return Ok(None),
    };
    last_line(&mut file, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_built_around_a_serialized_record_is_the_serialized_line() {
        let record = SystemRecord {
            actor: "system:backup",
            action: "backup_create",
            outcome: "intent \"quoted\" \u{e9}".into(),
            tenant: None,
            key: Some("k".into()),
            version: Some(3),
            detail: Some("/tmp/x".into()),
        };
        let prev = [7u8; 32];
        let time = "2026-12-03T02:00:00.000001Z".to_owned();
        let whole = serde_json::to_vec(&Line {
            seq: 42,
            prev: &hex::encode(prev),
            time: time.clone(),
            node: "node-\"1\"",
            kind: "system",
            record: &record,
        })
        .expect("line");
        let body = serde_json::to_vec(&record).expect("body");
        let built = line_bytes(42, &prev, &time, "node-\"1\"", "system", &body).expect("built");
        assert_eq!(
            String::from_utf8_lossy(&built),
            String::from_utf8_lossy(&whole)
        );
        #[derive(Serialize)]
        struct Empty {}
        let empty = line_bytes(1, &prev, &time, "n", "k", b"{}").expect("empty");
        let whole = serde_json::to_vec(&Line {
            seq: 1,
            prev: &hex::encode(prev),
            time,
            node: "n",
            kind: "k",
            record: &Empty {},
        })
        .expect("line");
        assert_eq!(empty, whole);
        assert!(line_bytes(1, &prev, "t", "n", "k", b"[]").is_err());
    }
}
