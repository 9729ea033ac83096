//! `keyfront encrypt` / `keyfront decrypt`: stdin to stdout over mutual TLS, with defaults that
//! find a `keyfront dev` directory, so `echo hi | keyfront encrypt --key default | keyfront
//! decrypt` prints `hi`.

use std::io::{Read, Write};
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::service::pb;
use crate::service::pb::key_service_client::KeyServiceClient;

/// How to reach keyfront and as whom (shared by the data and admin commands).
#[derive(Debug, Clone, clap::Args)]
pub struct Endpoint {
    /// The server (`https://HOST:PORT`; keyfront serves TLS only).
    #[arg(
        long,
        global = true,
        env = "KEYFRONT_ENDPOINT",
        default_value = "https://localhost:7443"
    )]
    pub endpoint: String,
    /// A `keyfront dev` directory to take certificates from.
    #[arg(
        long,
        global = true,
        env = "KEYFRONT_DEV_DIR",
        default_value = ".keyfront-dev"
    )]
    pub dir: PathBuf,
    /// Which dev principal's certificate to use (from DIR/certs); default acme-app for data
    /// commands, officer for `keyfront admin`.
    #[arg(long, global = true)]
    pub principal: Option<String>,
    /// Client certificate (PEM); default $KEYFRONT_CERT_FILE (unless --principal), else
    /// DIR/certs/PRINCIPAL.crt.
    #[arg(long, global = true)]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM); default $KEYFRONT_KEY_FILE with a certificate from the
    /// environment, the certificate's path with .key, else DIR/certs/PRINCIPAL.key.
    #[arg(long, global = true)]
    pub client_key: Option<PathBuf>,
    /// CA of the server's certificate (PEM); default $KEYFRONT_CA_FILE, else DIR/certs/ca.crt.
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
}

/// The data commands' options: where, as whom, which tenant, which context.
#[derive(Debug, clap::Args)]
pub struct Connection {
    #[command(flatten)]
    /// Server and identity.
    pub endpoint: Endpoint,
    /// Tenant, for principals with several.
    #[arg(long, default_value = "")]
    pub tenant: String,
    /// Context pairs NAME=VALUE bound to the ciphertext (repeatable).
    #[arg(long = "context", value_parser = parse_pair)]
    pub context: Vec<(String, String)>,
    /// Support principals: the approved grant to act under (the tenant comes from it).
    #[arg(long = "grant", default_value = "")]
    pub grant_id: String,
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| "expected NAME=VALUE".to_owned())
}

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A local file or stream failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// Could not connect: the endpoint and what went wrong, in words that say what to check.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    /// The endpoint is not an `https://` URL.
    #[error(
        "the endpoint {0:?} must be an https:// URL (keyfront serves TLS only), e.g. https://localhost:7443"
    )]
    Endpoint(String),
    /// The server answered with an error (or the connection failed during the call).
    #[error("{}", status_line(.0))]
    Status(#[from] tonic::Status),
    /// stdin was not base64.
    #[error("stdin is not a base64 ciphertext")]
    Base64,
    /// The MAC argument is not `VERSION:BASE64MAC`.
    #[error("the MAC is not VERSION:BASE64 (as `keyfront mac` prints it)")]
    MacFormat,
    /// VerifyMac answered that the MAC does not match.
    #[error("the MAC does not match")]
    InvalidMac,
    /// The signature argument is not `VERSION:BASE64SIGNATURE`.
    #[error("the signature is not VERSION:BASE64 (as `keyfront sign` prints it)")]
    SignatureFormat,
    /// Verify answered that the signature is not valid.
    #[error("the signature is not valid")]
    InvalidSignature,
    /// `keyfront selfcheck` found a failure, or could check nothing.
    #[error("selfcheck failed: {0}")]
    Selfcheck(String),
    /// The server refused an admin request: who, why, and what to do next.
    #[error("{code} as {who}: {message}\n  next: {next}")]
    Refused {
        /// The principal (or certificate file) used.
        who: String,
        /// The gRPC status code.
        code: String,
        /// The server's message and ErrorInfo reason.
        message: String,
        /// What to do about it.
        next: &'static str,
    },
}

/// The identity files the client library reads from the environment; the CLI takes them too,
/// after its flags: `--cert`/`--client-key`, then `--principal`, then these, then the default
/// dev principal.
const CERT_FILE_ENV: &str = "KEYFRONT_CERT_FILE";
const KEY_FILE_ENV: &str = "KEYFRONT_KEY_FILE";
const CA_FILE_ENV: &str = "KEYFRONT_CA_FILE";

impl Endpoint {
    /// Who the commands act as: the certificate file, or the dev principal.
    pub fn who(&self, default_principal: &str) -> String {
        match self.identity_files() {
            Some((cert, _)) => cert.display().to_string(),
            None => self
                .principal
                .clone()
                .unwrap_or_else(|| default_principal.to_owned()),
        }
    }

    /// The certificate and key named by flags, or (without `--principal`) by the environment.
    fn identity_files(&self) -> Option<(PathBuf, Option<PathBuf>)> {
        if let Some(cert) = &self.cert {
            return Some((cert.clone(), self.client_key.clone()));
        }
        if self.principal.is_some() {
            return None;
        }
        let cert = std::env::var_os(CERT_FILE_ENV).filter(|v| !v.is_empty())?;
        Some((
            PathBuf::from(cert),
            self.client_key
                .clone()
                .or_else(|| std::env::var_os(KEY_FILE_ENV).map(PathBuf::from)),
        ))
    }

    /// Whether an identity of its own (not a dev principal) was given.
    pub fn has_identity(&self) -> bool {
        self.identity_files().is_some()
    }

    /// A mutual-TLS channel to the server.
    ///
    /// # Errors
    /// [`ClientError::Io`] for unreadable certificate files, [`ClientError::Connect`].
    pub async fn channel(&self, default_principal: &str) -> Result<Channel, ClientError> {
        let certs = self.dir.join("certs");
        let principal = self.principal.as_deref().unwrap_or(default_principal);
        let read = |path: PathBuf| {
            std::fs::read(&path).map_err(|e| ClientError::Io(path.display().to_string(), e))
        };
        let (cert, key) = match self.identity_files() {
            Some((cert, key)) => {
                let key = key.unwrap_or_else(|| cert.with_extension("key"));
                (cert, key)
            }
            None => (
                certs.join(format!("{principal}.crt")),
                certs.join(format!("{principal}.key")),
            ),
        };
        let cert = read(cert)?;
        let key = read(key)?;
        let ca = self
            .ca
            .clone()
            .or_else(|| std::env::var_os(CA_FILE_ENV).map(PathBuf::from))
            .unwrap_or_else(|| certs.join("ca.crt"));
        let ca = read(ca)?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key));
        if !self.endpoint.starts_with("https://") {
            return Err(ClientError::Endpoint(self.endpoint.clone()));
        }
        let failed = |e: tonic::transport::Error| {
            ClientError::Connect(self.endpoint.clone(), connection_failure(&e))
        };
        Channel::from_shared(self.endpoint.clone())
            .map_err(|_| ClientError::Endpoint(self.endpoint.clone()))?
            .tls_config(tls)
            .map_err(failed)?
            .connect()
            .await
            .map_err(failed)
    }
}

/// A status for people: the gRPC code as gRPC names it (`INVALID_ARGUMENT`), the server's
/// message and its `ErrorInfo` reason; for a call that failed in the transport (the server
/// closed the connection, refused the client certificate), what went wrong there.
pub fn status_line(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    let code = crate::service::layer::code_name(status.code());
    if let Some(cause) = std::error::Error::source(status) {
        return format!("{code}: {}", connection_failure(cause));
    }
    match status.get_details_error_info() {
        Some(info) if !info.reason.is_empty() => {
            format!("{code}: {} ({})", status.message(), info.reason)
        }
        _ => format!("{code}: {}", status.message()),
    }
}

/// What a failed connection means, in words that say what to check: the causes that have a
/// remedy (nobody listening, a server certificate from another CA, a client certificate the
/// server refused) are named; anything else is the whole chain of causes, not just its first
/// line ("transport error").
pub fn connection_failure(error: &(dyn std::error::Error + 'static)) -> String {
    use rustls::{AlertDescription, CertificateError};
    let mut chain = Vec::new();
    let mut cause = Some(error);
    while let Some(error) = cause {
        // An I/O error may carry rustls's error inside. (A TLS alert that arrives during a call
        // reaches it as text only: the whole chain is then shown, with a hint, below.)
        let io = error.downcast_ref::<std::io::Error>();
        let tls = error.downcast_ref::<rustls::Error>().or_else(|| {
            io.and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        match tls {
            Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
                return "the server's certificate is not signed by the CA given (--ca, or the dev \
                        directory's certs/ca.crt): unknown CA"
                    .into();
            }
            Some(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {
                return "the server's certificate does not name this host: use the host name \
                        it was issued for in the endpoint (localhost for keyfront dev)"
                    .into();
            }
            Some(rustls::Error::InvalidCertificate(other)) => {
                return format!("the server's certificate was rejected: {other}");
            }
            Some(rustls::Error::AlertReceived(
                alert @ (AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateRequired
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied),
            )) => {
                return format!(
                    "the server rejected this client certificate ({alert:?}): it must be signed by \
                     the server's client CA, valid now, and not revoked"
                );
            }
            Some(other) => return format!("TLS failed: {other}"),
            None => {}
        }
        if let Some(io) = io {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    return "connection refused: nothing listens there (is keyfront running, \
                            on that port?)"
                        .into();
                }
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => {
                    return "the server closed the connection during the TLS handshake (a \
                            client certificate it does not accept, or a server that is not \
                            keyfront)"
                        .into();
                }
                _ => {}
            }
        }
        chain.push(error.to_string());
        cause = error.source();
    }
    chain.dedup();
    let text = chain.join(": ");
    if error.is::<tonic::Status>() || chain.len() > 1 {
        // The connection ended under the call without a reason of its own: in TLS 1.3 a
        // server's refusal of the client certificate can arrive after the handshake, and be
        // lost to the connection's own task.
        format!(
            "{text} (the connection closed during the call: the server may have rejected this \
             client certificate, or stopped)"
        )
    } else {
        text
    }
}

impl Connection {
    async fn client(&self) -> Result<KeyServiceClient<Channel>, ClientError> {
        Ok(KeyServiceClient::new(
            self.endpoint.channel("acme-app").await?,
        ))
    }
}

fn stdin() -> Result<Vec<u8>, ClientError> {
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .map_err(|e| ClientError::Io("stdin".into(), e))?;
    Ok(input)
}

/// Encrypts stdin under `key`; prints the ciphertext in base64.
///
/// # Errors
/// [`ClientError`].
pub async fn encrypt(connection: &Connection, key: &str) -> Result<(), ClientError> {
    let plaintext = zeroize::Zeroizing::new(stdin()?);
    let mut client = connection.client().await?;
    let response = client
        .encrypt(pb::EncryptRequest {
            key: key.to_owned(),
            plaintext_crc32c: Some(crc32c::crc32c(&plaintext)),
            plaintext: plaintext.to_vec(),
            context: connection.context.iter().cloned().collect(),
            tenant: connection.tenant.clone(),
            grant_id: connection.grant_id.clone(),
        })
        .await?
        .into_inner();
    println!("{}", STANDARD.encode(response.ciphertext));
    Ok(())
}

/// Decrypts a base64 ciphertext from stdin; writes the plaintext to stdout.
///
/// # Errors
/// [`ClientError`].
pub async fn decrypt(connection: &Connection, key: Option<&str>) -> Result<(), ClientError> {
    let input = stdin()?;
    let text = String::from_utf8(input).map_err(|_| ClientError::Base64)?;
    let ciphertext = STANDARD
        .decode(text.trim())
        .map_err(|_| ClientError::Base64)?;
    let mut client = connection.client().await?;
    let response = client
        .decrypt(pb::DecryptRequest {
            ciphertext_crc32c: Some(crc32c::crc32c(&ciphertext)),
            ciphertext,
            context: connection.context.iter().cloned().collect(),
            key: key.unwrap_or_default().to_owned(),
            tenant: connection.tenant.clone(),
            grant_id: connection.grant_id.clone(),
        })
        .await?
        .into_inner();
    let plaintext = zeroize::Zeroizing::new(response.plaintext);
    std::io::stdout()
        .write_all(&plaintext)
        .map_err(|e| ClientError::Io("stdout".into(), e))
}

/// The MAC of stdin under a MAC key; prints `VERSION:BASE64MAC` (what `verify-mac` takes).
///
/// # Errors
/// [`ClientError`].
pub async fn mac(connection: &Connection, key: &str) -> Result<(), ClientError> {
    let data = zeroize::Zeroizing::new(stdin()?);
    let mut client = connection.client().await?;
    let response = client
        .generate_mac(pb::GenerateMacRequest {
            key: key.to_owned(),
            data_crc32c: Some(crc32c::crc32c(&data)),
            data: data.to_vec(),
            tenant: connection.tenant.clone(),
            grant_id: connection.grant_id.clone(),
        })
        .await?
        .into_inner();
    println!("{}:{}", response.key_version, STANDARD.encode(response.mac));
    Ok(())
}

/// Checks `mac` (`VERSION:BASE64MAC`, as `mac` prints it) against stdin; prints `valid` or
/// `invalid`, and fails for an invalid MAC.
///
/// # Errors
/// [`ClientError`]; [`ClientError::InvalidMac`] when the MAC does not match.
pub async fn verify_mac(connection: &Connection, key: &str, mac: &str) -> Result<(), ClientError> {
    let (key_version, mac) = versioned(mac).ok_or(ClientError::MacFormat)?;
    let data = zeroize::Zeroizing::new(stdin()?);
    let mut client = connection.client().await?;
    let response = client
        .verify_mac(pb::VerifyMacRequest {
            key: key.to_owned(),
            data_crc32c: Some(crc32c::crc32c(&data)),
            data: data.to_vec(),
            mac,
            key_version,
            tenant: connection.tenant.clone(),
            grant_id: connection.grant_id.clone(),
        })
        .await?
        .into_inner();
    verdict(response.valid, ClientError::InvalidMac)
}

/// The signature of stdin (the message, or with `digest` its digest) under a SIGN key; prints
/// `VERSION:BASE64SIGNATURE` (what `verify` takes).
///
/// # Errors
/// [`ClientError`].
pub async fn sign(connection: &Connection, key: &str, digest: bool) -> Result<(), ClientError> {
    let message = zeroize::Zeroizing::new(stdin()?);
    let mut client = connection.client().await?;
    let response = client
        .sign(pb::SignRequest {
            key: key.to_owned(),
            message_crc32c: Some(crc32c::crc32c(&message)),
            message: message.to_vec(),
            message_type: message_type(digest),
            tenant: connection.tenant.clone(),
            grant_id: connection.grant_id.clone(),
        })
        .await?
        .into_inner();
    println!(
        "{}:{}",
        response.key_version,
        STANDARD.encode(response.signature)
    );
    Ok(())
}

/// Checks `signature` (`VERSION:BASE64SIGNATURE`, as `sign` prints it) against stdin; prints
/// `valid` or `invalid`, and fails for an invalid signature.
///
/// # Errors
/// [`ClientError`]; [`ClientError::InvalidSignature`] when it is not valid.
pub async fn verify(
    connection: &Connection,
    key: &str,
    signature: &str,
    digest: bool,
) -> Result<(), ClientError> {
    let (key_version, signature) = versioned(signature).ok_or(ClientError::SignatureFormat)?;
    let message = zeroize::Zeroizing::new(stdin()?);
    let mut client = connection.client().await?;
    let response = client
        .verify(pb::VerifyRequest {
            key: key.to_owned(),
            message_crc32c: Some(crc32c::crc32c(&message)),
            message: message.to_vec(),
            message_type: message_type(digest),
            signature,
            key_version,
            tenant: connection.tenant.clone(),
            grant_id: connection.grant_id.clone(),
        })
        .await?
        .into_inner();
    verdict(response.valid, ClientError::InvalidSignature)
}

/// Prints `valid` or `invalid`; an invalid answer is `invalid` as the error (exit status 1).
fn verdict(valid: bool, invalid: ClientError) -> Result<(), ClientError> {
    println!("{}", if valid { "valid" } else { "invalid" });
    if valid { Ok(()) } else { Err(invalid) }
}

/// Prints the PEM public key of a version of a SIGN key (0: the primary).
///
/// # Errors
/// [`ClientError`].
pub async fn public_key(
    connection: &Connection,
    key: &str,
    version: u32,
) -> Result<(), ClientError> {
    let mut client = connection.client().await?;
    let response = client
        .get_public_key(pb::GetPublicKeyRequest {
            key: key.to_owned(),
            key_version: version,
            tenant: connection.tenant.clone(),
            grant_id: connection.grant_id.clone(),
        })
        .await?
        .into_inner();
    print!("{}", response.public_key_pem);
    Ok(())
}

fn message_type(digest: bool) -> i32 {
    match digest {
        true => pb::MessageType::Digest as i32,
        false => pb::MessageType::Raw as i32,
    }
}

/// `VERSION:BASE64` (as `mac` and `sign` print a MAC or a signature) as its two parts.
fn versioned(text: &str) -> Option<(u32, Vec<u8>)> {
    let (version, encoded) = text.trim().split_once(':')?;
    Some((version.parse().ok()?, STANDARD.decode(encoded).ok()?))
}
