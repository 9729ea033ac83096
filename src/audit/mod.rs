//! The audit log: one JSON line per request (allowed or refused) and per TLS connection
//! (accepted or rejected).
//!
//! Lines never hold plaintext, keys or secrets; context values appear only as HMACs under a key
//! derived in the HSM. Each line is handed to the operating system (`write(2)`) before the
//! response it describes is released; if that fails, the request fails (fail closed).
//! Hash-chaining, signed checkpoints and daily rotation come with the audit-integrity work, and
//! the `prev` field is reserved for the chain.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

/// Where audit lines go.
pub struct AuditLog {
    node: String,
    file: Mutex<File>,
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

#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    time: String,
    node: &'a str,
    kind: &'static str,
    #[serde(flatten)]
    record: &'a T,
}

impl AuditLog {
    /// Opens (creating if needed) the audit file for appending; the directory is created too.
    ///
    /// # Errors
    /// I/O errors.
    pub fn open(path: &Path, node: &str) -> std::io::Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            node: node.to_owned(),
            file: Mutex::new(file),
        })
    }

    /// Writes a request line.
    ///
    /// # Errors
    /// I/O errors; the caller fails the request.
    pub fn request(&self, record: &RequestRecord) -> std::io::Result<()> {
        self.write("request", record)
    }

    /// Writes a connection line.
    ///
    /// # Errors
    /// I/O errors.
    pub fn connection(&self, record: &ConnectionRecord) -> std::io::Result<()> {
        self.write("connection", record)
    }

    fn write<T: Serialize>(&self, kind: &'static str, record: &T) -> std::io::Result<()> {
        let line = Line {
            time: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            node: &self.node,
            kind,
            record,
        };
        let mut bytes = serde_json::to_vec(&line)?;
        bytes.push(b'\n');
        // One write per line on an O_APPEND file: lines never interleave, and the line is in
        // the kernel before the response is released.
        self.file
            .lock()
            .expect("audit file lock poisoned")
            .write_all(&bytes)
    }
}
