//! The pipeline around every RPC: concurrency limit, deadline, and the audit line.
//!
//! It wraps the whole router, so every request that reaches HTTP/2, including those tonic
//! refuses before a handler runs (an oversized message, say), gets exactly one audit line,
//! written before the response is released. Handlers add what only they know (tenant, key,
//! version, batch items) through the [`AuditSlot`] in the request's extensions.
//!
//! A caller that goes away (it cancels, or its `grpc-timeout` passes: tonic then drops this
//! pipeline from outside) gets its line too. A read or a cryptographic operation stops there,
//! and its line says CANCELLED or DEADLINE_EXCEEDED. A mutation is never cut off half-way: it
//! runs on a task of its own to its end, and its line says what it did (`OK`, say) and that its
//! caller was gone (`caller_gone`), so a retry with the same request_id finds the first answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tonic::{Code, Status};
use tower::{Layer, Service};

use super::auth::{PeerInfo, Rpc};
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
    mutations: TaskTracker,
}

impl RequestLayer {
    /// At most `max_concurrent` requests in progress, each at most `timeout` long.
    pub fn new(audit: Arc<AuditLog>, max_concurrent: usize, timeout: Duration) -> Self {
        Self {
            audit,
            permits: Arc::new(Semaphore::new(max_concurrent)),
            timeout,
            mutations: TaskTracker::new(),
        }
    }

    /// The tasks of mutations in progress, which outlive a caller that went away: a server
    /// that stops waits for them before its last audit checkpoint.
    pub fn mutations(&self) -> TaskTracker {
        self.mutations.clone()
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
        let rpc = request.uri().path().trim_start_matches('/').to_owned();
        let mutation = Rpc::from_path(&rpc).is_some_and(Rpc::mutates);
        // The earlier of the server's bound and the caller's own (`grpc-timeout`).
        let timeout = grpc_timeout(request.headers())
            .map_or(self.layer.timeout, |caller| caller.min(self.layer.timeout));
        let deadline = tokio::time::Instant::now() + timeout;
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let active = peer.as_ref().map(|peer| Active::start(&peer.active));
        let line = Line {
            _active: active,
            audit: Arc::clone(&self.layer.audit),
            peer,
            rpc,
            slot,
            request_id,
            started,
        };
        // The ready service handles this request; a fresh clone waits for the next one.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let permits = Arc::clone(&self.layer.permits);
        if mutation {
            let mutations = self.layer.mutations.clone();
            Box::pin(mutation_to_its_end(
                inner, request, permits, mutations, line, deadline,
            ))
        } else {
            Box::pin(stopped_when_abandoned(
                inner, request, permits, line, deadline,
            ))
        }
    }
}

/// One request in progress on its connection, until it is dropped.
struct Active(Arc<std::sync::atomic::AtomicUsize>);

impl Active {
    fn start(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(Arc::clone(count))
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// What one request's audit line needs, however the request ends.
struct Line {
    // The request counts as in progress on its connection while its line is pending (held,
    // never read).
    _active: Option<Active>,
    audit: Arc<AuditLog>,
    peer: Option<PeerInfo>,
    rpc: String,
    slot: AuditSlot,
    request_id: String,
    started: Instant,
}

impl Line {
    /// The answer before the handler runs, if the request must not reach it: the audit log
    /// cannot take lines (fail closed), or too many requests are in progress.
    fn refusal(
        &self,
        permits: Arc<Semaphore>,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, Box<Response>> {
        // Fail closed before acting: the last line could not be written. This request's own
        // line tells whether the log works again.
        if !self.audit.writable() || self.peer.as_ref().is_some_and(|p| p.unaudited) {
            return Err(Box::new(
                Status::unavailable("audit log unavailable; nothing was done").into_http(),
            ));
        }
        permits.try_acquire_owned().map_err(|_| {
            Box::new(
                Status::resource_exhausted("too many requests in progress; retry later")
                    .into_http(),
            )
        })
    }

    /// Writes the line with the response's status (and, for a mutation that ran on after its
    /// caller left, how it left). Fail closed: a response whose line cannot be written is
    /// replaced by UNAVAILABLE.
    fn write(&self, response: Response, caller_gone: Option<Code>) -> Response {
        let code = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .map_or(Code::Ok, Code::from_i32);
        match self.write_code(code, caller_gone) {
            Ok(()) => response,
            Err(()) => Status::unavailable("audit log unavailable").into_http(),
        }
    }

    fn write_code(&self, code: Code, caller_gone: Option<Code>) -> Result<(), ()> {
        let details = self.slot.take();
        let peer = self.peer.as_ref();
        let record = RequestRecord {
            request_id: self.request_id.clone(),
            peer: peer.map(|p| p.remote.to_string()).unwrap_or_default(),
            identity: peer.and_then(|p| p.identity.as_ref().ok().cloned()),
            cert_fingerprint: peer.and_then(|p| p.fingerprint.clone()),
            rpc: self.rpc.clone(),
            tenant: details.tenant,
            key: details.key,
            version: details.version,
            outcome: code_name(code).to_owned(),
            latency_us: u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            grant_id: details.grant_id,
            items: details.items,
            context: details.context,
            client_request_id: details.client_request_id,
            key_check_value: details.key_check_value,
            caller_gone: caller_gone.map(code_name),
        };
        let metrics = crate::metrics::global();
        metrics.request(&record.rpc, code_name(code), self.started.elapsed());
        let writing = Instant::now();
        let written = self.audit.request(&record);
        metrics.audit_write(writing.elapsed());
        written.map_err(|error| {
            // Fail closed: what cannot be audited is not answered.
            tracing::error!(%error, request_id = %self.request_id, "audit write failed; refusing the response");
        })
    }
}

/// A request that changes nothing (or has not begun to): if its caller goes away or its
/// deadline passes, it stops, and the line says CANCELLED or DEADLINE_EXCEEDED.
async fn stopped_when_abandoned<S, B>(
    mut inner: S,
    request: http::Request<B>,
    permits: Arc<Semaphore>,
    line: Line,
    deadline: tokio::time::Instant,
) -> Result<Response, S::Error>
where
    S: Service<http::Request<B>, Response = Response>,
{
    let _permit = match line.refusal(permits) {
        Ok(permit) => permit,
        Err(response) => return Ok(line.write(*response, None)),
    };
    // Written on drop if the caller goes away first (tonic drops this future then).
    let mut abandoned = Abandoned {
        line: Some(line),
        deadline,
    };
    let response = match tokio::time::timeout_at(deadline, inner.call(request)).await {
        Ok(result) => result?,
        Err(_) => Status::deadline_exceeded("the request's deadline passed").into_http(),
    };
    let line = abandoned.line.take().expect("taken once, here");
    Ok(line.write(response, None))
}

/// Writes the line of a request whose caller went away before it ended.
struct Abandoned {
    line: Option<Line>,
    deadline: tokio::time::Instant,
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if let Some(line) = self.line.take() {
            let code = if tokio::time::Instant::now() >= self.deadline {
                Code::DeadlineExceeded
            } else {
                Code::Cancelled
            };
            let _ = line.write_code(code, None);
        }
    }
}

/// A mutation: it runs to its end on a task of its own whatever its caller does, and its line
/// says what it did. The caller gets the answer, or DEADLINE_EXCEEDED at its deadline while the
/// mutation goes on (a retry with its request_id then finds the first answer).
async fn mutation_to_its_end<S, B>(
    mut inner: S,
    request: http::Request<B>,
    permits: Arc<Semaphore>,
    mutations: TaskTracker,
    line: Line,
    deadline: tokio::time::Instant,
) -> Result<Response, S::Error>
where
    S: Service<http::Request<B>, Response = Response> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    let permit = match line.refusal(permits) {
        Ok(permit) => permit,
        Err(response) => return Ok(line.write(*response, None)),
    };
    let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<Code>();
    let mut task = mutations.spawn(async move {
        let _permit = permit;
        let response = inner.call(request).await?;
        // How the caller left, if it did before the end.
        let mut gone_rx = gone_rx;
        let caller_gone = gone_rx.try_recv().ok();
        Ok(line.write(response, caller_gone))
    });
    let mut gone = Some(gone_tx);
    // Told to the task if this future is dropped first (the caller cancelled).
    let guard = CallerGone {
        tx: &mut gone,
        deadline,
    };
    let result = tokio::select! {
        joined = &mut task => joined,
        () = tokio::time::sleep_until(deadline) => {
            if let Some(tx) = guard.tx.take() {
                let _ = tx.send(Code::DeadlineExceeded);
            }
            return Ok(Status::deadline_exceeded(
                "the request's deadline passed; the change goes on to its end (its request_id finds the answer)",
            )
            .into_http());
        }
    };
    // Answered in full: the caller did not go.
    guard.tx.take();
    drop(guard);
    match result {
        Ok(result) => result,
        Err(error) => {
            tracing::error!(%error, "a mutation's task failed");
            Ok(Status::internal("internal error").into_http())
        }
    }
}

/// Tells a mutation's task that its caller went away, if it did.
struct CallerGone<'a> {
    tx: &'a mut Option<tokio::sync::oneshot::Sender<Code>>,
    deadline: tokio::time::Instant,
}

impl Drop for CallerGone<'_> {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let code = if tokio::time::Instant::now() >= self.deadline {
                Code::DeadlineExceeded
            } else {
                Code::Cancelled
            };
            let _ = tx.send(code);
        }
    }
}

/// A caller's `grpc-timeout` header: digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
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
