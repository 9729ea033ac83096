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

/// How to reach keyfront and as whom.
#[derive(Debug, clap::Args)]
pub struct Connection {
    /// The server.
    #[arg(long, default_value = "https://localhost:7443")]
    pub endpoint: String,
    /// A `keyfront dev` directory to take certificates from.
    #[arg(long, env = "KEYFRONT_DEV_DIR", default_value = ".keyfront-dev")]
    pub dir: PathBuf,
    /// Which dev principal's certificate to use (from DIR/certs).
    #[arg(long, default_value = "acme-app")]
    pub principal: String,
    /// Client certificate (PEM); default DIR/certs/PRINCIPAL.crt.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM); default DIR/certs/PRINCIPAL.key.
    #[arg(long)]
    pub client_key: Option<PathBuf>,
    /// CA of the server's certificate (PEM); default DIR/certs/ca.crt.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Tenant, for principals with several.
    #[arg(long, default_value = "")]
    pub tenant: String,
    /// Context pairs NAME=VALUE bound to the ciphertext (repeatable).
    #[arg(long = "context", value_parser = parse_pair)]
    pub context: Vec<(String, String)>,
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
    /// Could not connect.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, tonic::transport::Error),
    /// The server answered with an error.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// stdin was not base64.
    #[error("stdin is not a base64 ciphertext")]
    Base64,
}

impl Connection {
    async fn client(&self) -> Result<KeyServiceClient<Channel>, ClientError> {
        let certs = self.dir.join("certs");
        let read = |path: PathBuf| {
            std::fs::read(&path).map_err(|e| ClientError::Io(path.display().to_string(), e))
        };
        let cert = read(
            self.cert
                .clone()
                .unwrap_or_else(|| certs.join(format!("{}.crt", self.principal))),
        )?;
        let key = read(
            self.client_key
                .clone()
                .unwrap_or_else(|| certs.join(format!("{}.key", self.principal))),
        )?;
        let ca = read(self.ca.clone().unwrap_or_else(|| certs.join("ca.crt")))?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key));
        let channel = Channel::from_shared(self.endpoint.clone())
            .map_err(|e| ClientError::Io(self.endpoint.clone(), std::io::Error::other(e)))?
            .tls_config(tls)
            .map_err(|e| ClientError::Connect(self.endpoint.clone(), e))?
            .connect()
            .await
            .map_err(|e| ClientError::Connect(self.endpoint.clone(), e))?;
        Ok(KeyServiceClient::new(channel))
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
        })
        .await?
        .into_inner();
    let plaintext = zeroize::Zeroizing::new(response.plaintext);
    std::io::stdout()
        .write_all(&plaintext)
        .map_err(|e| ClientError::Io("stdout".into(), e))
}
