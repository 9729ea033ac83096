//! The pipeline around every RPC: concurrency limit, deadline, and the audit line.
//!
//! It wraps the whole router, so every request that reaches HTTP/2, including those tonic
//! refuses before a handler runs (an oversized message, say), gets exactly one audit line,
//! written before the response is released. Handlers add what only they know (tenant, key,
//! version, batch items) through the [`AuditSlot`] in the request's extensions.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tonic::{Code, Status};
use tower::{Layer, Service};

use super::auth::PeerInfo;
use crate::audit::{AuditLog, RequestRecord};

/// What a handler learned about a request, for its audit line.
#[derive(Debug, Default)]
pub struct AuditDetails {
    /// Tenant name.
    pub tenant: Option<String>,
    /// Key name.
    pub key: Option<String>,
    /// Key version used.
    pub version: Option<u32>,
    /// Batch items' status code names.
    pub items: Option<Vec<&'static str>>,
    /// Context names with HMAC'd values.
    pub context: Option<std::collections::BTreeMap<String, String>>,
    /// The caller's request_id on mutations.
    pub client_request_id: Option<String>,
    /// keyfront's id of this request: on its intent line and its outcome line.
    pub request_id: String,
    /// The support grant the request acts under.
    pub grant_id: Option<String>,
    /// Imported key material's check value (never the material).
    pub key_check_value: Option<String>,
}

/// Shared between the pipeline and the handler of one request.
#[derive(Clone, Debug, Default)]
pub struct AuditSlot(Arc<Mutex<AuditDetails>>);

impl AuditSlot {
    /// Records details for the audit line.
    pub fn update(&self, f: impl FnOnce(&mut AuditDetails)) {
        f(&mut self.0.lock().expect("audit slot lock poisoned"));
    }

    /// keyfront's id of this request.
    pub fn request_id(&self) -> String {
        self.0
            .lock()
            .expect("audit slot lock poisoned")
            .request_id
            .clone()
    }

    /// The support grant the request names, if any.
    pub fn grant_id(&self) -> Option<String> {
        self.0
            .lock()
            .expect("audit slot lock poisoned")
            .grant_id
            .clone()
    }

    fn take(&self) -> AuditDetails {
        std::mem::take(&mut self.0.lock().expect("audit slot lock poisoned"))
    }
}

/// Builds [`RequestService`]s.
#[derive(Clone)]
pub struct RequestLayer {
    audit: Arc<AuditLog>,
    permits: Arc<Semaphore>,
    timeout: Duration,
}

impl RequestLayer {
    /// At most `max_concurrent` requests in progress, each at most `timeout` long.
    pub fn new(audit: Arc<AuditLog>, max_concurrent: usize, timeout: Duration) -> Self {
        Self {
            audit,
            permits: Arc::new(Semaphore::new(max_concurrent)),
            timeout,
        }
    }
}

impl<S> Layer<S> for RequestLayer {
    type Service = RequestService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestService {
            inner,
            layer: self.clone(),
        }
    }
}

/// One request's trip through the limits and the audit log.
#[derive(Clone)]
pub struct RequestService<S> {
    inner: S,
    layer: RequestLayer,
}

type Response = http::Response<tonic::body::Body>;

impl<S, B> Service<http::Request<B>> for RequestService<S>
where
    S: Service<http::Request<B>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let slot = AuditSlot::default();
        let request_id = hex::encode(rand::random::<[u8; 8]>());
        slot.update(|d| d.request_id.clone_from(&request_id));
        request.extensions_mut().insert(slot.clone());
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let rpc = request.uri().path().trim_start_matches('/').to_owned();
        // The ready service handles this request; a fresh clone waits for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let response = match Arc::clone(&layer.permits).try_acquire_owned() {
                // Fail closed before acting: the last line could not be written. This
                // request's own line below tells whether the log works again.
                _ if !layer.audit.writable() || peer.as_ref().is_some_and(|p| p.unaudited) => {
                    Status::unavailable("audit log unavailable; nothing was done").into_http()
                }
                Err(_) => Status::resource_exhausted("too many requests in progress; retry later")
                    .into_http(),
                Ok(_permit) => match tokio::time::timeout(layer.timeout, inner.call(request)).await
                {
                    Ok(result) => result?,
                    Err(_) => Status::deadline_exceeded("the server's request deadline passed")
                        .into_http(),
                },
            };
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map_or(Code::Ok, Code::from_i32);
            let details = slot.take();
            let record = RequestRecord {
                request_id: request_id.clone(),
                peer: peer
                    .as_ref()
                    .map(|p| p.remote.to_string())
                    .unwrap_or_default(),
                identity: peer
                    .as_ref()
                    .and_then(|p| p.identity.as_ref().ok().cloned()),
                cert_fingerprint: peer.as_ref().and_then(|p| p.fingerprint.clone()),
                rpc,
                tenant: details.tenant,
                key: details.key,
                version: details.version,
                outcome: code_name(code).to_owned(),
                latency_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                grant_id: details.grant_id,
                items: details.items,
                context: details.context,
                client_request_id: details.client_request_id,
                key_check_value: details.key_check_value,
            };
            let metrics = crate::metrics::global();
            metrics.request(&record.rpc, code_name(code), started.elapsed());
            let writing = Instant::now();
            let written = layer.audit.request(&record);
            metrics.audit_write(writing.elapsed());
            if let Err(error) = written {
                // Fail closed: what cannot be audited is not answered.
                tracing::error!(%error, %request_id, "audit write failed; refusing the response");
                return Ok(Status::unavailable("audit log unavailable").into_http());
            }
            Ok(response)
        })
    }
}

/// The canonical gRPC name of a status code (`PERMISSION_DENIED`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
