//! Reaching PostgreSQL: TLS to the server, descriptions of a connection string that leave out
//! user and password, and the one mapping of PostgreSQL's errors (SQLSTATE and message kept;
//! refused logins and privileges are outages of the store).

use std::sync::Arc;

use deadpool_postgres::PoolError;
use tokio_postgres::error::SqlState;

use super::Error;

/// Host, port and database of a connection string, without user or password.
pub(super) fn describe(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map_or_else(String::new, |host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        });
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let dbname = config.get_dbname().unwrap_or("(default)");
    format!("postgresql://{host}:{port}/{dbname}")
}

pub(super) fn tls_connector(
    ca_file: &std::path::Path,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, Error> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let certificates = CertificateDer::pem_file_iter(ca_file)
        .map_err(|_| Error::Config("storage.postgres.ca_file cannot be read as PEM"))?;
    for certificate in certificates {
        let certificate = certificate
            .map_err(|_| Error::Config("storage.postgres.ca_file cannot be read as PEM"))?;
        roots
            .add(certificate)
            .map_err(|_| Error::Config("storage.postgres.ca_file holds an invalid certificate"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|_| Error::Config("TLS 1.3 is not available"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The one mapping of PostgreSQL errors.
///
/// Policy: whatever keeps this node from using the store now, and may pass without a change to
/// the request, is `Unavailable` (the caller retries; cached keys go on serving): a server
/// that cannot be reached, is shutting down or ran out of connections (classes 08, 53, 57), a
/// conflict that a retry resolves (serialization failure, deadlock, a session ended idle in a
/// transaction), and the server refusing this node's login or a privilege (class 28, 42501):
/// for the caller that is an outage of the store, and an operator fixes it on the server, as
/// after a password rotation. Anything else is a store error (a bug, or a schema that is not
/// keyfront's), INTERNAL for the caller.
///
/// The text keeps what tokio-postgres's `Display` drops for server errors ("db error"): the
/// SQLSTATE and the server's message. Neither holds a connection string or a record value.
pub(super) fn pg_error(error: tokio_postgres::Error) -> Error {
    let unavailable = match error.code() {
        None => true,
        Some(code) => {
            let class = code.code().get(..2).unwrap_or("");
            class == "08"
                || class == "28"
                || class == "53"
                || class == "57"
                || *code == SqlState::INSUFFICIENT_PRIVILEGE
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
        }
    };
    let text = error_text(&error);
    if unavailable {
        Error::Unavailable(text)
    } else {
        Error::Postgres(text)
    }
}

/// A PostgreSQL error for the log: the server's SQLSTATE and message when the server answered,
/// else tokio-postgres's description (which names the cause: refused, timed out, closed).
pub(super) fn error_text(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!(
            "PostgreSQL refused: SQLSTATE {} ({}): {}",
            db.code().code(),
            db.severity(),
            db.message()
        ),
        None => {
            use std::error::Error as _;
            match error.source() {
                Some(source) => format!("{error}: {source}"),
                None => error.to_string(),
            }
        }
    }
}

pub(super) fn pool_error(error: PoolError) -> Error {
    match error {
        PoolError::Backend(error) => pg_error(error),
        other => Error::Unavailable(other.to_string()),
    }
}
