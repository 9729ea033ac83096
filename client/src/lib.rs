//! A client for keyfront, the key management service in front of an HSM.
//!
//! What it does that the raw gRPC stubs do not:
//!
//! - **Connection** from a [`Config`] (a TOML file or the environment): endpoint, CA
//!   certificate, client certificate and key (mutual TLS; keyfront speaks TLS 1.3 only). The
//!   connection is made on first use and made again after a failure.
//! - **Retries**: a call answered UNAVAILABLE (keyfront said "nothing was written; retry", or
//!   the connection failed) is sent again, the same request, after a jittered exponential
//!   backoff ([`RetryPolicy`]). Admin calls that change state carry a `request_id`, set once
//!   before the first attempt, so that a retry of a call that did go through returns its first
//!   result instead of acting twice.
//! - **Deadlines**: every call, retries included, ends within [`Config::timeout_ms`].
//! - **CRC32C**: request checksums are filled in, keyfront's confirmation that it checked them
//!   is required, and the checksums of what it returns are verified ([`Error::Corrupted`]).
//! - **Envelope encryption** ([`Envelope`]): one data key from keyfront for many objects,
//!   encrypted here with AES-256-GCM-SIV, the wrapped key stored beside the data, and a bounded,
//!   zeroizing cache of unwrapped data keys for decryption.
//!
//! Plaintexts and keys it returns are [`Zeroizing`]; its errors never hold them.
//!
//! ```no_run
//! # async fn example() -> Result<(), keyfront_client::Error> {
//! use keyfront_client::{Client, Config};
//!
//! // KEYFRONT_ENDPOINT, KEYFRONT_CA_FILE, KEYFRONT_CERT_FILE, KEYFRONT_KEY_FILE
//! let client = Client::connect(Config::from_env()?)?;
//! let encrypted = client
//!     .encrypt("default", b"card 4111", &[("order", "42")])
//!     .await?;
//! let plaintext = client
//!     .decrypt(&encrypted.ciphertext, &[("order", "42")])
//!     .await?;
//! assert_eq!(&plaintext[..], b"card 4111");
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Status};
use zeroize::Zeroizing;

mod envelope;

pub use envelope::{Envelope, EnvelopeOptions, EnvelopeStats};

/// The generated gRPC types and client stubs (`proto/keyfront/v1/keyfront.proto`), for calls
/// this library does not wrap.
#[allow(
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    clippy::all,
    clippy::pedantic
)]
pub mod pb {
    tonic::include_proto!("keyfront.v1");
}

use pb::admin_service_client::AdminServiceClient;
use pb::key_service_client::KeyServiceClient;

/// What went wrong. Messages never hold plaintext, keys or file contents.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is incomplete or does not parse.
    #[error("configuration: {0}")]
    Config(String),
    /// A certificate or key file cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The endpoint or the TLS material is not usable.
    #[error("cannot use endpoint {endpoint}: {source}")]
    Transport {
        /// The endpoint.
        endpoint: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// keyfront's answer (after retries, for UNAVAILABLE), or DEADLINE_EXCEEDED when the
    /// call's deadline passed.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(Status),
    /// A checksum did not match: data was corrupted between here and keyfront.
    #[error("{0} was corrupted in transit (CRC32C mismatch)")]
    Corrupted(&'static str),
    /// An envelope is not in this library's format.
    #[error("not an envelope: {0}")]
    Envelope(&'static str),
    /// An envelope does not open: it was changed, or its data key or context is another's.
    #[error(
        "the envelope does not open: it was changed, or its context is not the one it was sealed with"
    )]
    Integrity,
}

impl Error {
    /// The gRPC status code, for [`Error::Status`].
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Status(status) => Some(status.code()),
            _ => None,
        }
    }
}

/// How UNAVAILABLE answers are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: no retry). Default 4.
    pub max_attempts: u32,
    /// Backoff before the first retry, in milliseconds; it doubles up to `max_backoff_ms`, and
    /// each wait is drawn between half of it and all of it. Default 50.
    pub initial_backoff_ms: u64,
    /// The longest backoff, in milliseconds. Default 2000.
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            initial_backoff_ms: 50,
            max_backoff_ms: 2000,
        }
    }
}

/// Where keyfront is and who this client is. From a TOML file ([`Config::from_file`]), the
/// environment ([`Config::from_env`]) or code ([`Config::new`]).
///
/// ```
/// let config: keyfront_client::Config = toml::from_str(r#"
///     endpoint = "https://keyfront.internal:8443"
///     ca_file = "/etc/keyfront/ca.crt"
///     cert_file = "/etc/keyfront/app.crt"
///     key_file = "/etc/keyfront/app.key"
///     timeout_ms = 2000
///     [retry]
///     max_attempts = 6
/// "#).unwrap();
/// assert_eq!(config.retry.max_attempts, 6);
/// assert_eq!(config.retry.initial_backoff_ms, 50);
/// ```
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `https://host:port`.
    pub endpoint: String,
    /// The CA certificate (PEM) that signed keyfront's server certificate.
    pub ca_file: PathBuf,
    /// This client's certificate (PEM); keyfront maps it to a principal and its roles.
    pub cert_file: PathBuf,
    /// This client's private key (PEM). Read once when connecting; never logged.
    pub key_file: PathBuf,
    /// Which of the principal's tenants to act for; empty when it has exactly one.
    #[serde(default)]
    pub tenant: String,
    /// The deadline of each call, retries included, in milliseconds. Default 10000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How UNAVAILABLE answers are retried.
    #[serde(default)]
    pub retry: RetryPolicy,
}

fn default_timeout_ms() -> u64 {
    10_000
}

impl Config {
    /// A configuration with the default tenant, deadline and retries.
    pub fn new(
        endpoint: impl Into<String>,
        ca_file: impl Into<PathBuf>,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        Self {
            endpoint: endpoint.into(),
            ca_file: ca_file.into(),
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            tenant: String::new(),
            timeout_ms: default_timeout_ms(),
            retry: RetryPolicy::default(),
        }
    }

    /// From `KEYFRONT_ENDPOINT`, `KEYFRONT_CA_FILE`, `KEYFRONT_CERT_FILE`, `KEYFRONT_KEY_FILE`
    /// (required), `KEYFRONT_TENANT`, `KEYFRONT_TIMEOUT_MS` and `KEYFRONT_RETRY_MAX_ATTEMPTS`
    /// (optional).
    ///
    /// # Errors
    /// [`Error::Config`] naming a missing or malformed variable.
    pub fn from_env() -> Result<Self, Error> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let required =
            |name: &str| var(name).ok_or_else(|| Error::Config(format!("{name} is not set")));
        let number = |name: &str| -> Result<Option<u64>, Error> {
            var(name)
                .map(|v| {
                    v.parse()
                        .map_err(|_| Error::Config(format!("{name} is not a number")))
                })
                .transpose()
        };
        let mut config = Self::new(
            required("KEYFRONT_ENDPOINT")?,
            required("KEYFRONT_CA_FILE")?,
            required("KEYFRONT_CERT_FILE")?,
            required("KEYFRONT_KEY_FILE")?,
        );
        config.tenant = var("KEYFRONT_TENANT").unwrap_or_default();
        if let Some(timeout) = number("KEYFRONT_TIMEOUT_MS")? {
            config.timeout_ms = timeout;
        }
        if let Some(attempts) = number("KEYFRONT_RETRY_MAX_ATTEMPTS")? {
            config.retry.max_attempts = u32::try_from(attempts)
                .map_err(|_| Error::Config("KEYFRONT_RETRY_MAX_ATTEMPTS is too large".into()))?;
        }
        Ok(config)
    }

    /// From a TOML file with the fields of [`Config`].
    ///
    /// # Errors
    /// [`Error::Io`], or [`Error::Config`] with the parser's message.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// The deadline of each call.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// Calls made and retries taken by a [`Client`] and its clones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Attempts sent, retries included.
    pub attempts: u64,
    /// Retries after UNAVAILABLE.
    pub retries: u64,
}

#[derive(Default)]
struct Counters {
    attempts: AtomicU64,
    retries: AtomicU64,
}

/// A connection to keyfront. Cheap to clone; clones share the connection and the [`Stats`].
#[derive(Clone)]
pub struct Client {
    keys: KeyServiceClient<Channel>,
    admin: AdminServiceClient<Channel>,
    tenant: String,
    timeout: Duration,
    retry: RetryPolicy,
    counters: Arc<Counters>,
}

/// Encrypt's result.
#[derive(Clone, Debug)]
pub struct Encrypted {
    /// The ciphertext (it names its key and version).
    pub ciphertext: Vec<u8>,
    /// The version that encrypted it.
    pub key_version: u32,
}

/// A fresh data key: use `plaintext`, store `wrapped`.
pub struct DataKey {
    /// The 32-byte key, zeroized when dropped.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// The key wrapped by keyfront; [`Client::decrypt_data_key`] unwraps it.
    pub wrapped: Vec<u8>,
    /// The version of the key that wrapped it.
    pub key_version: u32,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("plaintext", &"[REDACTED]")
            .field("wrapped_len", &self.wrapped.len())
            .field("key_version", &self.key_version)
            .finish()
    }
}

/// A MAC or a signature, and the version that made it (Verify and VerifyMac need it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    /// The MAC or signature.
    pub bytes: Vec<u8>,
    /// The version that made it.
    pub key_version: u32,
}

/// A SIGN key version's public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    /// SubjectPublicKeyInfo, DER.
    pub der: Vec<u8>,
    /// The same, PEM.
    pub pem: String,
    /// The version.
    pub key_version: u32,
}

fn context(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Checks that keyfront confirmed the request's checksum and that `data` matches `crc`.
fn checked(
    confirmed: bool,
    what_sent: &'static str,
    data: &[u8],
    crc: u32,
    what: &'static str,
) -> Result<(), Error> {
    if !confirmed {
        return Err(Error::Corrupted(what_sent));
    }
    if crc32c::crc32c(data) != crc {
        return Err(Error::Corrupted(what));
    }
    Ok(())
}

impl Client {
    /// A client for `config`. Reads the certificate files now; the connection itself is made
    /// on the first call (and again after a failure), so this needs no running keyfront. Call
    /// it within a Tokio runtime.
    ///
    /// # Errors
    /// [`Error::Io`] for an unreadable file, [`Error::Transport`] for a malformed endpoint.
    pub fn connect(config: Config) -> Result<Self, Error> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| Error::Io {
                path: path.to_owned(),
                source,
            })
        };
        let key = Zeroizing::new(read(&config.key_file)?);
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&config.ca_file)?))
            .identity(Identity::from_pem(read(&config.cert_file)?, key.as_slice()));
        let transport = |source| Error::Transport {
            endpoint: config.endpoint.clone(),
            source,
        };
        let channel = Channel::from_shared(config.endpoint.clone())
            .map_err(|_| Error::Config(format!("endpoint {:?} is not a URI", config.endpoint)))?
            .tls_config(tls)
            .map_err(transport)?
            .connect_timeout(config.timeout())
            .connect_lazy();
        Ok(Self {
            keys: KeyServiceClient::new(channel.clone()),
            admin: AdminServiceClient::new(channel),
            timeout: config.timeout(),
            tenant: config.tenant,
            retry: config.retry,
            counters: Arc::default(),
        })
    }

    /// Attempts and retries so far.
    pub fn stats(&self) -> Stats {
        Stats {
            attempts: self.counters.attempts.load(Ordering::Relaxed),
            retries: self.counters.retries.load(Ordering::Relaxed),
        }
    }

    /// The KeyService stub on this connection, for calls this library does not wrap (no
    /// retries or checks are added).
    pub fn key_service(&self) -> KeyServiceClient<Channel> {
        self.keys.clone()
    }

    /// The AdminService stub on this connection (as [`Client::key_service`]).
    pub fn admin_service(&self) -> AdminServiceClient<Channel> {
        self.admin.clone()
    }

    async fn call<Req, Resp, F, Fut>(&self, request: Req, attempt: F) -> Result<Resp, Error>
    where
        Req: Clone,
        F: FnMut(tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        with_retries(&self.retry, self.timeout, &self.counters, request, attempt).await
    }

    /// Encrypts under the primary version of a DATA key (role app).
    ///
    /// # Errors
    /// [`Error::Status`] with keyfront's answer; [`Error::Corrupted`].
    pub async fn encrypt(
        &self,
        key: &str,
        plaintext: &[u8],
        context_pairs: &[(&str, &str)],
    ) -> Result<Encrypted, Error> {
        let request = pb::EncryptRequest {
            key: key.to_owned(),
            plaintext: plaintext.to_vec(),
            context: context(context_pairs),
            plaintext_crc32c: Some(crc32c::crc32c(plaintext)),
            tenant: self.tenant.clone(),
            grant_id: String::new(),
        };
        let keys = &self.keys;
        let response = self
            .call(request, |r| {
                let mut keys = keys.clone();
                async move { keys.encrypt(r).await }
            })
            .await?;
        checked(
            response.verified_plaintext_crc32c,
            "the plaintext",
            &response.ciphertext,
            response.ciphertext_crc32c,
            "the ciphertext",
        )?;
        Ok(Encrypted {
            ciphertext: response.ciphertext,
            key_version: response.key_version,
        })
    }

    /// Decrypts a ciphertext made by [`Client::encrypt`] with the same context.
    ///
    /// # Errors
    /// [`Error::Status`] (INVALID_ARGUMENT for a ciphertext that does not open);
    /// [`Error::Corrupted`].
    pub async fn decrypt(
        &self,
        ciphertext: &[u8],
        context_pairs: &[(&str, &str)],
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let request = pb::DecryptRequest {
            ciphertext: ciphertext.to_vec(),
            context: context(context_pairs),
            key: String::new(),
            ciphertext_crc32c: Some(crc32c::crc32c(ciphertext)),
            tenant: self.tenant.clone(),
            grant_id: String::new(),
        };
        let keys = &self.keys;
        let response = self
            .call(request, |r| {
                let mut keys = keys.clone();
                async move { keys.decrypt(r).await }
            })
            .await?;
        let plaintext = Zeroizing::new(response.plaintext);
        checked(
            response.verified_ciphertext_crc32c,
            "the ciphertext",
            &plaintext,
            response.plaintext_crc32c,
            "the plaintext",
        )?;
        Ok(plaintext)
    }

    /// A fresh 256-bit data key wrapped by a DATA key (role backup).
    ///
    /// # Errors
    /// [`Error::Status`]; [`Error::Corrupted`].
    pub async fn generate_data_key(
        &self,
        key: &str,
        context_pairs: &[(&str, &str)],
    ) -> Result<DataKey, Error> {
        let request = pb::GenerateDataKeyRequest {
            key: key.to_owned(),
            context: context(context_pairs),
            include_plaintext: true,
            tenant: self.tenant.clone(),
            grant_id: String::new(),
        };
        let keys = &self.keys;
        let response = self
            .call(request, |r| {
                let mut keys = keys.clone();
                async move { keys.generate_data_key(r).await }
            })
            .await?;
        let plaintext = Zeroizing::new(response.plaintext_key);
        if crc32c::crc32c(&response.wrapped_key) != response.wrapped_key_crc32c {
            return Err(Error::Corrupted("the wrapped data key"));
        }
        if crc32c::crc32c(&plaintext) != response.plaintext_key_crc32c {
            return Err(Error::Corrupted("the data key"));
        }
        Ok(DataKey {
            plaintext,
            wrapped: response.wrapped_key,
            key_version: response.key_version,
        })
    }

    /// Unwraps a data key made by [`Client::generate_data_key`] with the same context.
    ///
    /// # Errors
    /// [`Error::Status`]; [`Error::Corrupted`].
    pub async fn decrypt_data_key(
        &self,
        wrapped: &[u8],
        context_pairs: &[(&str, &str)],
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let request = pb::DecryptDataKeyRequest {
            wrapped_key: wrapped.to_vec(),
            context: context(context_pairs),
            wrapped_key_crc32c: Some(crc32c::crc32c(wrapped)),
            tenant: self.tenant.clone(),
            grant_id: String::new(),
        };
        let keys = &self.keys;
        let response = self
            .call(request, |r| {
                let mut keys = keys.clone();
                async move { keys.decrypt_data_key(r).await }
            })
            .await?;
        let plaintext = Zeroizing::new(response.plaintext_key);
        checked(
            response.verified_wrapped_key_crc32c,
            "the wrapped data key",
            &plaintext,
            response.plaintext_key_crc32c,
            "the data key",
        )?;
        Ok(plaintext)
    }

    /// The MAC of `data` under the primary version of a MAC key (role app).
    ///
    /// # Errors
    /// [`Error::Status`]; [`Error::Corrupted`].
    pub async fn generate_mac(&self, key: &str, data: &[u8]) -> Result<Versioned, Error> {
        let request = pb::GenerateMacRequest {
            key: key.to_owned(),
            data: data.to_vec(),
            data_crc32c: Some(crc32c::crc32c(data)),
            tenant: self.tenant.clone(),
            grant_id: String::new(),
        };
        let keys = &self.keys;
        let response = self
            .call(request, |r| {
                let mut keys = keys.clone();
                async move { keys.generate_mac(r).await }
            })
            .await?;
        if !response.verified_data_crc32c {
            return Err(Error::Corrupted("the data"));
        }
        Ok(Versioned {
            bytes: response.mac,
            key_version: response.key_version,
        })
    }

    /// Whether `mac` is the MAC of `data` under `key_version` (0: the primary).
    ///
    /// # Errors
    /// [`Error::Status`]; [`Error::Corrupted`].
    pub async fn verify_mac(
        &self,
        key: &str,
        key_version: u32,
        data: &[u8],
        mac: &[u8],
    ) -> Result<bool, Error> {
        let request = pb::VerifyMacRequest {
            key: key.to_owned(),
            data: data.to_vec(),
            mac: mac.to_vec(),
            key_version,
            data_crc32c: Some(crc32c::crc32c(data)),
            tenant: self.tenant.clone(),
            grant_id: String::new(),
        };
        let keys = &self.keys;
        let response = self
            .call(request, |r| {
                let mut keys = keys.clone();
                async move { keys.verify_mac(r).await }
            })
            .await?;
        if !response.verified_data_crc32c {
            return Err(Error::Corrupted("the data"));
        }
        Ok(response.valid)
    }

    /// The signature of `message` under the primary version of a SIGN key (role app).
    ///
    /// # Errors
    /// [`Error::Status`]; [`Error::Corrupted`].
    pub async fn sign(&self, key: &str, message: &[u8]) -> Result<Versioned, Error> {
        let request = pb::SignRequest {
            key: key.to_owned(),
            message: message.to_vec(),
            message_type: pb::MessageType::Raw as i32,
            message_crc32c: Some(crc32c::crc32c(message)),
            tenant: self.tenant.clone(),
            grant_id: String::new(),
        };
        let keys = &self.keys;
        let response = self
            .call(request, |r| {
                let mut keys = keys.clone();
                async move { keys.sign(r).await }
            })
            .await?;
        if !response.verified_message_crc32c {
            return Err(Error::Corrupted("the message"));
        }
        Ok(Versioned {
            bytes: response.signature,
            key_version: response.key_version,
        })
    }

    /// Whether `signature` is valid for `message` under `key_version` (0: the primary).
    ///
    /// # Errors
    /// [`Error::Status`]; [`Error::Corrupted`].
    pub async fn verify(
        &self,
        key: &str,
        key_version: u32,
        message: &[u8],
        signature: &[u8],
    ) -> Result<bool, Error> {
        let request = pb::VerifyRequest {
            key: key.to_owned(),
            message: message.to_vec(),
            message_type: pb::MessageType::Raw as i32,
            signature: signature.to_vec(),
            key_version,
            message_crc32c: Some(crc32c::crc32c(message)),
            tenant: self.tenant.clone(),
            grant_id: String::new(),
        };
        let keys = &self.keys;
        let response = self
            .call(request, |r| {
                let mut keys = keys.clone();
                async move { keys.verify(r).await }
            })
            .await?;
        if !response.verified_message_crc32c {
            return Err(Error::Corrupted("the message"));
        }
        Ok(response.valid)
    }

    /// The public key of `key_version` (0: the primary) of a SIGN key.
    ///
    /// # Errors
    /// [`Error::Status`].
    pub async fn public_key(&self, key: &str, key_version: u32) -> Result<PublicKey, Error> {
        let request = pb::GetPublicKeyRequest {
            key: key.to_owned(),
            key_version,
            tenant: self.tenant.clone(),
            grant_id: String::new(),
        };
        let keys = &self.keys;
        let response = self
            .call(request, |r| {
                let mut keys = keys.clone();
                async move { keys.get_public_key(r).await }
            })
            .await?;
        Ok(PublicKey {
            der: response.public_key_der,
            pem: response.public_key_pem,
            key_version: response.key_version,
        })
    }

    /// Adds a version to a key and makes it primary (role officer). The request carries a
    /// fresh `request_id`, the same on every retry: a retry after a lost answer returns the
    /// first call's result instead of rotating twice.
    ///
    /// # Errors
    /// [`Error::Status`].
    pub async fn rotate_key(&self, tenant: &str, name: &str) -> Result<pb::Key, Error> {
        let request = pb::RotateKeyRequest {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            request_id: request_id(),
        };
        let admin = &self.admin;
        self.call(request, |r| {
            let mut admin = admin.clone();
            async move { admin.rotate_key(r).await }
        })
        .await
    }

    /// Creates a key (role officer), with a `request_id` as [`Client::rotate_key`].
    ///
    /// # Errors
    /// [`Error::Status`].
    pub async fn create_key(
        &self,
        tenant: &str,
        name: &str,
        purpose: pb::KeyPurpose,
        algorithm: pb::KeyAlgorithm,
    ) -> Result<pb::Key, Error> {
        let request = pb::CreateKeyRequest {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            purpose: purpose as i32,
            algorithm: algorithm as i32,
            request_id: request_id(),
        };
        let admin = &self.admin;
        self.call(request, |r| {
            let mut admin = admin.clone();
            async move { admin.create_key(r).await }
        })
        .await
    }
}

/// A random request id (128 bits, hex).
fn request_id() -> String {
    format!("kfc-{:032x}", rand::random::<u128>())
}

/// Sends `request` through `attempt` until it is answered with anything but UNAVAILABLE, the
/// attempts run out, or the deadline (`timeout` from now) would pass during the next backoff.
/// Every attempt carries the time left as its gRPC deadline and is cut off locally at it.
async fn with_retries<Req, Resp, F, Fut>(
    policy: &RetryPolicy,
    timeout: Duration,
    counters: &Counters,
    request: Req,
    mut attempt: F,
) -> Result<Resp, Error>
where
    Req: Clone,
    F: FnMut(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(policy.initial_backoff_ms);
    let mut attempts = 0u32;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Status(Status::deadline_exceeded(
                "the call's deadline passed",
            )));
        }
        let mut one = tonic::Request::new(request.clone());
        one.set_timeout(left);
        attempts += 1;
        counters.attempts.fetch_add(1, Ordering::Relaxed);
        let answer = match tokio::time::timeout(left, attempt(one)).await {
            Ok(answer) => answer,
            Err(_) => Err(Status::deadline_exceeded("the call's deadline passed")),
        };
        match answer {
            Ok(response) => return Ok(response.into_inner()),
            Err(status)
                if status.code() == Code::Unavailable && attempts < policy.max_attempts.max(1) =>
            {
                // Full jitter over the upper half: clients that failed together do not all
                // come back together.
                let millis = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
                let wait = Duration::from_millis(rand::random_range(millis / 2..=millis));
                if Instant::now() + wait >= deadline {
                    return Err(Error::Status(status));
                }
                counters.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_millis(policy.max_backoff_ms));
            }
            Err(status) => return Err(Error::Status(status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff_ms: 10,
            max_backoff_ms: 40,
        }
    }

    /// UNAVAILABLE is retried with the very same request (its request_id included), and the
    /// retries stop at the first other answer.
    #[tokio::test]
    async fn unavailable_is_retried_with_the_same_request() {
        let seen = Mutex::new(Vec::new());
        let counters = Counters::default();
        let request = pb::RotateKeyRequest {
            tenant: "acme".into(),
            name: "default".into(),
            request_id: request_id(),
        };
        let answer = with_retries(
            &policy(5),
            Duration::from_secs(5),
            &counters,
            request.clone(),
            |r| {
                let mut seen = seen.lock().expect("seen");
                seen.push(r.get_ref().clone());
                let n = seen.len();
                async move {
                    match n {
                        1 | 2 => Err(Status::unavailable("nothing was written; retry")),
                        _ => Ok(tonic::Response::new(n)),
                    }
                }
            },
        )
        .await
        .expect("the third attempt answers");
        assert_eq!(answer, 3);
        let seen = seen.into_inner().expect("seen");
        assert_eq!(seen, vec![request.clone(); 3]);
        assert_eq!(counters.retries.load(Ordering::Relaxed), 2);

        // Another code is final at once.
        let attempts = AtomicU64::new(0);
        let refused = with_retries(
            &policy(5),
            Duration::from_secs(5),
            &counters,
            request.clone(),
            |_| {
                attempts.fetch_add(1, Ordering::Relaxed);
                async { Err::<tonic::Response<()>, _>(Status::failed_precondition("disabled")) }
            },
        )
        .await
        .expect_err("refused");
        assert_eq!(refused.code(), Some(Code::FailedPrecondition));
        assert_eq!(attempts.load(Ordering::Relaxed), 1);
    }

    /// The attempts run out, and the deadline holds even against an answer that never comes.
    #[tokio::test]
    async fn attempts_and_the_deadline_bound_a_call() {
        let counters = Counters::default();
        let attempts = AtomicU64::new(0);
        let gave_up = with_retries(&policy(3), Duration::from_secs(5), &counters, (), |_| {
            attempts.fetch_add(1, Ordering::Relaxed);
            async { Err::<tonic::Response<()>, _>(Status::unavailable("down")) }
        })
        .await
        .expect_err("down");
        assert_eq!(gave_up.code(), Some(Code::Unavailable));
        assert_eq!(attempts.load(Ordering::Relaxed), 3);

        // Without the deadline this would wait forever.
        let hung = with_retries(
            &policy(3),
            Duration::from_millis(200),
            &counters,
            (),
            |_| async { std::future::pending::<Result<tonic::Response<()>, Status>>().await },
        )
        .await
        .expect_err("deadline");
        assert_eq!(hung.code(), Some(Code::DeadlineExceeded));
    }
}
