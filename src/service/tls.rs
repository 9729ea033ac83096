//! TLS 1.3 with client certificates required, on a plain TCP listener.
//!
//! keyfront runs its own acceptor instead of tonic's `ServerTlsConfig` because that one cannot
//! be limited to TLS 1.3. Each accepted connection carries a [`PeerInfo`] (identity parsed once
//! per connection) into every request's extensions; every connection, accepted or rejected, is
//! audited.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::auth::PeerInfo;
use crate::audit::{AuditLog, ConnectionRecord};
use crate::config::{Limits, Revocations, ServerConfig};

/// The TLS configuration in force. Each new handshake takes the current one; a reload
/// (SIGHUP) replaces it, so new CRLs, or new certificate files, apply to the next connection
/// without a restart (connections already open are judged per request: `auth`).
#[derive(Clone)]
pub struct TlsConfigs(Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>);

impl TlsConfigs {
    /// Starts with `config`.
    pub fn new(config: rustls::ServerConfig) -> Self {
        Self(Arc::new(std::sync::RwLock::new(Arc::new(config))))
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.0.read().expect("TLS config lock poisoned"))
    }

    /// Puts `config` in force for the handshakes that follow.
    pub fn replace(&self, config: rustls::ServerConfig) {
        *self.0.write().expect("TLS config lock poisoned") = Arc::new(config);
    }
}

/// Why the TLS setup failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {message}")]
    Pem {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA could not be used.
    #[error("client CA: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The rustls configuration: TLS 1.3 only, client certificates required and verified against
/// the configured CA (and its CRLs, `[revocations] crl_files`), HTTP/2 by ALPN.
///
/// With CRLs, the handshake refuses a client certificate that a CRL of its issuer lists; a
/// certificate of a CA without a CRL is not refused for that (`allow_unknown_revocation_status`),
/// and only the client's own certificate is checked, not its intermediates. A CRL past its
/// next update still counts (a warning says so): refusing every client because the CA was
/// late would be an outage of keyfront's making.
///
/// # Errors
/// [`TlsError`] for unreadable files or a configuration rustls refuses.
pub fn server_config(
    server: &ServerConfig,
    revocations: &Revocations,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in certificates(&server.client_ca)? {
        roots.add(ca)?;
    }
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
    if !revocations.crls.is_empty() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        for crl in &revocations.crls {
            if crl.next_update.is_some_and(|next| next < now) {
                tracing::warn!(crl = %crl.path.display(), "the CRL is past its next update: fetch a new one from the CA");
            }
        }
        builder = builder
            .with_crls(
                revocations
                    .crls
                    .iter()
                    .map(|crl| CertificateRevocationListDer::from(crl.der.clone())),
            )
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    let verifier = builder.build()?;
    let key = PrivateKeyDer::from_pem_file(&server.key).map_err(|e| TlsError::Pem {
        path: server.key.display().to_string(),
        message: e.to_string(),
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates(&server.cert)?, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |message: String| TlsError::Pem {
        path: path.display().to_string(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error("no certificate in file".into()));
    }
    Ok(certs)
}

/// The listen backlog asked of the kernel (it caps it at `net.core.somaxconn`). The runtime's
/// default was 128 here: a burst of a few hundred connects overflowed it, and with SYN cookies
/// a client whose final ACK was dropped believed itself connected while the server never saw
/// it (tests/connections.rs).
const LISTEN_BACKLOG: u32 = 4096;

/// A TCP listener on `addr` with a backlog deep enough for connection bursts.
///
/// # Errors
/// The address cannot be bound.
pub fn listen(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts TCP connections, runs the TLS handshake (each on its own task, bounded by
/// `limits.handshake_timeout`), audits the outcome, and yields the established connections.
///
/// At most `limits.max_connections` connections exist at once, counting those still in their
/// handshake: one more is closed at once and audited as rejected. A slot is held from the TCP
/// accept until the connection is dropped, so idle or stalled sockets cannot pile up past the
/// cap, and the handshake timeout bounds how long one that never finishes can hold its slot.
///
/// Once the stream is dropped (the server stops), no connection is accepted any more and the
/// returned task ends when the handshakes in progress have ended (each audited as rejected):
/// a server awaits it before its last audit checkpoint, so that no connection line follows it.
pub fn incoming(
    listener: TcpListener,
    configs: TlsConfigs,
    audit: Arc<AuditLog>,
    allow_cn_identity: bool,
    limits: Limits,
) -> (
    ReceiverStream<io::Result<TlsConnection>>,
    tokio::task::JoinHandle<()>,
) {
    let (sender, receiver) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let accepting = tokio::spawn(async move {
        let mut handshakes = tokio::task::JoinSet::new();
        loop {
            let accepted = tokio::select! {
                () = sender.closed() => break,
                Some(_) = handshakes.join_next(), if !handshakes.is_empty() => continue,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and the like: back off instead of spinning on the error.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                drop(tcp);
                reject(&audit, remote, "connection limit reached".into());
                continue;
            };
            let acceptor = TlsAcceptor::from(configs.current());
            let sender = sender.clone();
            let audit = Arc::clone(&audit);
            handshakes.spawn(async move {
                let _ = tcp.set_nodelay(true);
                let handshake =
                    tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await;
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        reject(&audit, remote, error.to_string());
                        return;
                    }
                    Err(_) => {
                        reject(&audit, remote, "handshake timed out".into());
                        return;
                    }
                };
                if sender.is_closed() {
                    reject(&audit, remote, "the server is stopping".into());
                    return;
                }
                let leaf = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .map(|c| c.as_ref().to_vec());
                let mut info =
                    PeerInfo::from_certificate(remote, leaf.as_deref(), allow_cn_identity);
                let record = ConnectionRecord {
                    peer: remote.to_string(),
                    outcome: "accepted",
                    identity: info.identity.as_ref().ok().cloned(),
                    cert_fingerprint: info.fingerprint.clone(),
                    reason: info.identity.as_ref().err().map(ToString::to_string),
                };
                if let Err(error) = audit.connection(&record) {
                    // Fail closed: a connection that cannot be audited serves nothing, but it
                    // is kept so its requests get a clear UNAVAILABLE instead of a reset.
                    tracing::error!(%error, "audit write failed; the connection serves nothing");
                    info.unaudited = true;
                }
                let _ = sender
                    .send(Ok(TlsConnection {
                        stream,
                        info,
                        _slot: slot,
                        idle_timeout: limits.idle_timeout,
                        idle: Box::pin(tokio::time::sleep(limits.idle_timeout)),
                    }))
                    .await;
            });
        }
        drop(listener);
        while handshakes.join_next().await.is_some() {}
    });
    (ReceiverStream::new(receiver), accepting)
}

fn reject(audit: &AuditLog, remote: std::net::SocketAddr, reason: String) {
    // Debug, not info: the audit log has every one, and a flood of bad connections must not
    // become a flood of log lines (a slow log sink blocks the worker that writes to it).
    tracing::debug!(peer = %remote, %reason, "TLS connection rejected");
    let record = ConnectionRecord {
        peer: remote.to_string(),
        outcome: "rejected",
        identity: None,
        cert_fingerprint: None,
        reason: Some(reason),
    };
    if let Err(error) = audit.connection(&record) {
        tracing::error!(%error, "audit write failed");
    }
}

/// An established TLS connection and what is known about its peer.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
    // Its place under `max_connections`, given back when the server drops the connection.
    _slot: OwnedSemaphorePermit,
    // Nothing read for this long: the connection reads as closed, and the server drops it.
    idle_timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    let next = tokio::time::Instant::now() + self.idle_timeout;
                    self.idle.as_mut().reset(next);
                }
                Poll::Ready(result)
            }
            Poll::Pending if self.idle.as_mut().poll(cx).is_ready() => {
                if self.info.active.load(std::sync::atomic::Ordering::Acquire) == 0 {
                    // Idle too long: end of stream, which closes the connection.
                    return Poll::Ready(Ok(()));
                }
                // A request is in progress (its caller waits without sending): not idle.
                let next = tokio::time::Instant::now() + self.idle_timeout;
                self.idle.as_mut().reset(next);
                let _ = self.idle.as_mut().poll(cx);
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
