//! `[revocations]`: client certificates refused although they chain to the client CA, by
//! serial number (bound to the CA that issued it where several are trusted), by fingerprint,
//! or by the CA's own certificate revocation lists. Parsed and checked in full when the config
//! loads (so `kill -HUP` with a bad file keeps the running rules), and judged on every request.
//!
//! A serial is an unsigned integer. DER stores it as a signed INTEGER, so one whose top bit is
//! set carries a leading `00` byte, which `openssl x509 -noout -serial` does not print: serials
//! are compared as numbers, leading zeros stripped on both sides. (Comparing the DER content
//! bytes missed about half of real certificates.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use serde::Deserialize;

use super::ConfigProblem;

/// A certificate serial number as an unsigned integer: lowercase hex without leading zeros
/// (`0` for zero).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Serial(String);

/// The most octets RFC 5280 allows a serial (one more for DER's sign byte).
const MAX_SERIAL_OCTETS: usize = 21;

impl Serial {
    /// A serial as people copy it: hex digits, optionally with colons or spaces between octets
    /// and the `serial=` that `openssl x509 -noout -serial` prints; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let text = text.strip_prefix("serial=").unwrap_or(text);
        let digits: String = text
            .chars()
            .filter(|c| !matches!(c, ':' | ' '))
            .map(|c| c.to_ascii_lowercase())
            .collect();
        if digits.is_empty()
            || !digits.chars().all(|c| c.is_ascii_hexdigit())
            || digits.len() > 2 * MAX_SERIAL_OCTETS
        {
            return None;
        }
        Some(Self::from_hex(&digits))
    }

    /// The serial of a certificate, from its DER INTEGER content octets.
    pub fn from_der_content(octets: &[u8]) -> Self {
        Self::from_hex(&hex::encode(octets))
    }

    fn from_hex(digits: &str) -> Self {
        let trimmed = digits.trim_start_matches('0');
        Self(if trimmed.is_empty() { "0" } else { trimmed }.to_owned())
    }

    /// The hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A certificate revocation list, as read from its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crl {
    /// The file.
    pub path: PathBuf,
    /// Its DER, for the TLS handshake's verifier.
    pub der: Vec<u8>,
    /// When its issuer says the next one is due (seconds since the Unix epoch), if it says.
    pub next_update: Option<i64>,
}

/// Revoked client certificates. Reloaded with the principals on SIGHUP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    /// Serials revoked whoever issued them (allowed while the client CA file holds one CA).
    pub serials: BTreeSet<Serial>,
    /// Serials revoked for one issuer: its subject name (DER) → serials. From
    /// `[[revocations.by_issuer]]` and from the CRLs.
    pub by_issuer: BTreeMap<Vec<u8>, BTreeSet<Serial>>,
    /// SHA-256 fingerprints of revoked certificates (DER), lowercase hex.
    pub fingerprints: BTreeSet<String>,
    /// The CRLs, also checked by the TLS handshake.
    pub crls: Vec<Crl>,
}

impl Revocations {
    /// Whether a certificate with this serial, issuer name (DER) and fingerprint is revoked.
    pub fn revokes(&self, serial: &Serial, issuer: &[u8], fingerprint: &str) -> bool {
        self.serials.contains(serial)
            || self
                .by_issuer
                .get(issuer)
                .is_some_and(|serials| serials.contains(serial))
            || self.fingerprints.contains(fingerprint)
    }

    /// Serials revoked in all (for the reload's log line).
    pub fn serial_count(&self) -> usize {
        self.serials.len() + self.by_issuer.values().map(BTreeSet::len).sum::<usize>()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRevocations {
    #[serde(default)]
    serials: Vec<String>,
    #[serde(default)]
    fingerprints: Vec<String>,
    #[serde(default)]
    crl_files: Vec<PathBuf>,
    #[serde(default)]
    by_issuer: Vec<RawIssuerRevocations>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIssuerRevocations {
    /// The issuing CA's certificate (PEM).
    issuer: PathBuf,
    serials: Vec<String>,
}

const SERIAL_FORM: &str = "a certificate serial: hex digits as `openssl x509 -noout -serial` prints them (colons allowed), at most 20 octets";
const FINGERPRINT_FORM: &str = "a SHA-256 fingerprint: 64 hex digits as `openssl x509 -noout -fingerprint -sha256` prints them (colons allowed)";

impl RawRevocations {
    /// Checks every entry and reads every file; `client_ca` is the server's client CA file,
    /// when there is a server section and the file can be read.
    pub(super) fn validate(
        self,
        base: &Path,
        client_ca: Option<&Path>,
        problems: &mut Vec<ConfigProblem>,
    ) -> Revocations {
        let mut serials = |values: Vec<String>, field: &'static str| {
            values
                .into_iter()
                .filter_map(|v| {
                    let serial = Serial::parse(&v);
                    if serial.is_none() {
                        problems.push(ConfigProblem::Revocation(field, v, SERIAL_FORM));
                    }
                    serial
                })
                .collect::<BTreeSet<_>>()
        };
        let bare = serials(self.serials, "revocations.serials");
        let mut by_issuer: BTreeMap<Vec<u8>, BTreeSet<Serial>> = BTreeMap::new();
        let mut issued = Vec::new();
        for entry in self.by_issuer {
            issued.push((
                base.join(&entry.issuer),
                serials(entry.serials, "revocations.by_issuer.serials"),
            ));
        }
        let mut fingerprints = BTreeSet::new();
        for value in self.fingerprints {
            let digits: String = value
                .trim()
                .chars()
                .filter(|c| !matches!(c, ':' | ' '))
                .map(|c| c.to_ascii_lowercase())
                .collect();
            if digits.len() == 64 && digits.chars().all(|c| c.is_ascii_hexdigit()) {
                fingerprints.insert(digits);
            } else {
                problems.push(ConfigProblem::Revocation(
                    "revocations.fingerprints",
                    value,
                    FINGERPRINT_FORM,
                ));
            }
        }
        // The trusted CAs, by subject name: the issuers serials are bound to and CRLs are
        // checked against. Unreadable here: `serve` reports the file; nothing to check against.
        let cas: Vec<CertificateDer<'static>> = client_ca
            .and_then(|path| CertificateDer::pem_file_iter(path).ok())
            .map(|certs| certs.filter_map(Result::ok).collect())
            .unwrap_or_default();
        if cas.len() > 1 && !bare.is_empty() {
            problems.push(ConfigProblem::AmbiguousSerials(cas.len()));
        }
        for (path, serials) in issued {
            match subject_of(&path) {
                Ok(subject) => by_issuer.entry(subject).or_default().extend(serials),
                Err(why) => problems.push(ConfigProblem::RevocationFile(
                    "revocations.by_issuer.issuer",
                    path,
                    why,
                )),
            }
        }
        let mut crls = Vec::new();
        for path in self.crl_files {
            let path = base.join(path);
            match read_crl(&path, &cas) {
                Ok((crl, issuer, revoked)) => {
                    by_issuer.entry(issuer).or_default().extend(revoked);
                    crls.push(crl);
                }
                Err(why) => problems.push(ConfigProblem::RevocationFile(
                    "revocations.crl_files",
                    path,
                    why,
                )),
            }
        }
        Revocations {
            serials: bare,
            by_issuer,
            fingerprints,
            crls,
        }
    }
}

/// The subject name (DER) of the first certificate in a PEM file.
fn subject_of(path: &Path) -> Result<Vec<u8>, String> {
    let der = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read a PEM certificate: {e}"))?
        .next()
        .ok_or("no certificate in the file")?
        .map_err(|e| format!("cannot read a PEM certificate: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("not a certificate: {e}"))?;
    Ok(cert.subject().as_raw().to_vec())
}

/// Reads a CRL (PEM or DER), checks that one of the trusted CAs (`cas`) issued and signed it,
/// and returns it with its issuer's name and its revoked serials.
fn read_crl(
    path: &Path,
    cas: &[CertificateDer<'static>],
) -> Result<(Crl, Vec<u8>, BTreeSet<Serial>), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let der = match CertificateRevocationListDer::pem_slice_iter(&bytes).next() {
        Some(pem) => pem.map_err(|e| format!("not a PEM CRL: {e}"))?.to_vec(),
        None => bytes,
    };
    let (_, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| format!("not a CRL: {e}"))?;
    let issuer = crl.issuer().as_raw().to_vec();
    let signed = cas.iter().any(|ca| {
        x509_parser::parse_x509_certificate(ca.as_ref()).is_ok_and(|(_, ca)| {
            ca.subject().as_raw() == issuer.as_slice()
                && crl.verify_signature(ca.public_key()).is_ok()
        })
    });
    if !signed {
        return Err(
            "not issued and signed by a CA of server.client_ca (a CRL of another CA revokes nothing here)"
                .into(),
        );
    }
    let revoked = crl
        .iter_revoked_certificates()
        .map(|entry| Serial::from_der_content(entry.raw_serial()))
        .collect();
    let next_update = crl.next_update().map(|t| t.timestamp());
    Ok((
        Crl {
            path: path.to_path_buf(),
            der,
            next_update,
        },
        issuer,
        revoked,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_compare_as_numbers() {
        // As openssl prints a serial with the top bit set, and as DER stores it.
        let printed = Serial::parse("serial=8A1B2C3D4E5F60718293A4B5C6D7E8F9").expect("valid");
        let stored = Serial::from_der_content(&[
            0x00, 0x8a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f, 0x60, 0x71, 0x82, 0x93, 0xa4, 0xb5, 0xc6,
            0xd7, 0xe8, 0xf9,
        ]);
        assert_eq!(printed, stored);
        for same in [
            "8a:1b:2c:3d:4e:5f:60:71:82:93:a4:b5:c6:d7:e8:f9",
            "00:8A:1B:2C:3D:4E:5F:60:71:82:93:A4:B5:C6:D7:E8:F9",
            " 008a1b2c3d4e5f60718293a4b5c6d7e8f9 ",
        ] {
            assert_eq!(Serial::parse(same), Some(printed.clone()), "{same}");
        }
        assert_eq!(Serial::parse("00"), Serial::parse("0"));
        assert_eq!(Serial::from_der_content(&[0]).as_str(), "0");
        assert_ne!(Serial::parse("0100"), Serial::parse("01"));
    }

    #[test]
    fn what_is_not_a_serial_is_refused() {
        for bad in [
            "",
            "serial=",
            "xyz",
            "12-34",
            "0x1234",
            &"ab".repeat(22),
            "CN=client",
        ] {
            assert_eq!(Serial::parse(bad), None, "{bad:?}");
        }
        assert!(
            Serial::parse(&"ab".repeat(21)).is_some(),
            "21 octets with the sign byte"
        );
    }
}
