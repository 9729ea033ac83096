//! LISTEN/NOTIFY: one connection per node that hears every commit of the namespace, so that
//! caches are dropped when another node changes a tenant, and that says how recently it was
//! heard from (the bound on how stale a node's caches may be).

use std::sync::Arc;
use std::time::Duration;

use crate::ids::TenantId;
use crate::keystore::changes::Changes;

use super::Error;
use super::pg_error;

/// The notification channel of a namespace.
pub(super) fn channel(namespace: &str) -> String {
    format!("{namespace}_changes")
}

/// This node's change listener: one connection of its own that `LISTEN`s on the namespace's
/// channel and sends a heartbeat every quarter of the bound, recording announced tenants in
/// [`Changes`] and confirming after each answered heartbeat. A lost connection is opened again
/// (with a short backoff); once it listens again, everything counts as changed, since
/// announcements in between were missed.
pub(super) struct Listener {
    pub(super) config: tokio_postgres::Config,
    pub(super) channel: String,
    pub(super) node: String,
    pub(super) changes: Arc<Changes>,
    pub(super) bound: Duration,
}

impl Listener {
    pub(super) async fn run<T>(self, tls: T)
    where
        T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> + Clone + Send + 'static,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as tokio_postgres::tls::TlsConnect<tokio_postgres::Socket>>::Future: Send,
    {
        const FIRST_RETRY: Duration = Duration::from_millis(50);
        let mut backoff = FIRST_RETRY;
        loop {
            let started = tokio::time::Instant::now();
            let error = self.listen(tls.clone()).await;
            if !self.changes.unreachable() {
                tracing::warn!(%error, "PostgreSQL change listener lost; reconnecting");
            }
            self.changes.lost();
            if started.elapsed() > self.bound {
                backoff = FIRST_RETRY;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.bound / 2);
        }
    }

    /// One connection's life: returns why it ended.
    pub(super) async fn listen<T>(&self, tls: T) -> Error
    where
        T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> + Send + 'static,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as tokio_postgres::tls::TlsConnect<tokio_postgres::Socket>>::Future: Send,
    {
        let (client, mut connection) =
            match tokio::time::timeout(self.bound, self.config.connect(tls)).await {
                Ok(Ok(connected)) => connected,
                Ok(Err(error)) => return pg_error(error),
                Err(_) => return Error::Unavailable("connecting timed out".into()),
            };
        // The connection delivers notifications in the order the server sent them, before
        // the answer of any later query; they are queued here in that order.
        let (sender, mut received) = tokio::sync::mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(notification)) => {
                        if sender.send(notification.payload().to_owned()).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        let result: Result<std::convert::Infallible, Error> = async {
            let heartbeat = |sql: String| {
                let client = &client;
                async move {
                    tokio::time::timeout(self.bound, client.batch_execute(&sql))
                        .await
                        .map_err(|_| Error::Unavailable("heartbeat timed out".into()))?
                        .map_err(pg_error)
                }
            };
            heartbeat(format!("LISTEN {}", self.channel)).await?;
            self.changes.everything_changed();
            loop {
                let sent = self.changes.now_ms();
                heartbeat("SELECT 1".into()).await?;
                while let Ok(payload) = received.try_recv() {
                    self.record(&payload);
                }
                self.changes.confirm(sent);
                // Announcements are recorded as they arrive, not at the next heartbeat: the
                // usual stale window is the notification's latency, not the heartbeat period.
                let next = tokio::time::sleep(self.bound / 4);
                tokio::pin!(next);
                loop {
                    tokio::select! {
                        () = &mut next => break,
                        payload = received.recv() => match payload {
                            Some(payload) => self.record(&payload),
                            None => return Err(Error::Unavailable("listener connection closed".into())),
                        },
                    }
                }
            }
        }
        .await;
        driver.abort();
        match result {
            Err(error) => error,
        }
    }

    /// Records one announcement (`<node> <tenant-id>`) unless this node made it.
    pub(super) fn record(&self, payload: &str) {
        match payload.split_once(' ') {
            Some((node, _)) if node == self.node => {}
            Some((_, tenant)) => match tenant.parse::<TenantId>() {
                Ok(tenant) => self.changes.tenant_changed(tenant),
                Err(_) => self.changes.everything_changed(),
            },
            // Not ours to parse: safest to drop every cache.
            None => self.changes.everything_changed(),
        }
    }
}
