//! Who the caller is (from its client certificate) and what it may do.
//!
//! Identity is the certificate's single URI SAN (SPIFFE style); a certificate with several URI
//! SANs has no identity; the CN counts only with `allow_cn_identity`. Authorization is decided
//! on every request, from the principal's roles, tenants and key allow-list, before anything is
//! looked up, so a refusal leaks nothing about what exists.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::Status;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::config::{PrincipalConfig, Revocations, Role, TenantScope};
use crate::ids::Name;

/// What the TLS layer learned about the peer of a connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// Remote address.
    pub remote: SocketAddr,
    /// The identity, or why the certificate gives none.
    pub identity: Result<String, IdentityError>,
    /// SHA-256 of the leaf certificate (hex).
    pub fingerprint: Option<String>,
    /// The leaf certificate's serial number (hex).
    pub serial: Option<String>,
}

/// Why a verified certificate yields no identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// No client certificate (cannot happen while certificates are required).
    #[error("no client certificate")]
    NoCertificate,
    /// The certificate could not be parsed.
    #[error("unparsable client certificate")]
    Unparsable,
    /// More than one URI SAN: ambiguous, refused.
    #[error("certificate has several URI SANs")]
    SeveralUriSans,
    /// No URI SAN, and CN identities are not allowed.
    #[error("certificate has no URI SAN")]
    NoUriSan,
}

impl PeerInfo {
    /// Reads identity, fingerprint and serial from the verified leaf certificate.
    pub fn from_certificate(remote: SocketAddr, leaf: Option<&[u8]>, allow_cn: bool) -> Self {
        let Some(der) = leaf else {
            return Self {
                remote,
                identity: Err(IdentityError::NoCertificate),
                fingerprint: None,
                serial: None,
            };
        };
        let fingerprint = Some(hex::encode(Sha256::digest(der)));
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            return Self {
                remote,
                identity: Err(IdentityError::Unparsable),
                fingerprint,
                serial: None,
            };
        };
        Self {
            remote,
            identity: identity(&cert, allow_cn),
            fingerprint,
            serial: Some(cert.raw_serial_as_string().replace(':', "")),
        }
    }
}

fn identity(cert: &X509Certificate<'_>, allow_cn: bool) -> Result<String, IdentityError> {
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                uris.push((*uri).to_owned());
            }
        }
    }
    match uris.len() {
        1 => Ok(uris.remove(0)),
        0 if allow_cn => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned)
            .ok_or(IdentityError::NoUriSan),
        0 => Err(IdentityError::NoUriSan),
        _ => Err(IdentityError::SeveralUriSans),
    }
}

/// Every RPC keyfront serves that needs a role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rpc {
    /// KeyService/Encrypt
    Encrypt,
    /// KeyService/Decrypt
    Decrypt,
    /// KeyService/BatchEncrypt
    BatchEncrypt,
    /// KeyService/BatchDecrypt
    BatchDecrypt,
    /// KeyService/GenerateDataKey
    GenerateDataKey,
    /// KeyService/DecryptDataKey
    DecryptDataKey,
    /// KeyService/SealSecret
    SealSecret,
    /// KeyService/UnsealSecret
    UnsealSecret,
    /// KeyService/ReEncrypt
    ReEncrypt,
    /// KeyService/HashPassword
    HashPassword,
    /// KeyService/LookupDigest
    LookupDigest,
    /// KeyService/VerifyPassword
    VerifyPassword,
    /// KeyService/ReEncryptDataKey
    ReEncryptDataKey,
    /// AdminService/CreateTenant
    CreateTenant,
    /// AdminService/ListTenants
    ListTenants,
    /// AdminService/DestroyTenant
    DestroyTenant,
    /// AdminService/CancelTenantDestruction
    CancelTenantDestruction,
    /// AdminService/CreateKey
    CreateKey,
    /// AdminService/GetKey
    GetKey,
    /// AdminService/ListKeys
    ListKeys,
    /// AdminService/RotateKey
    RotateKey,
    /// AdminService/UpdateKeyPolicy
    UpdateKeyPolicy,
    /// AdminService/DisableKeyVersion
    DisableKeyVersion,
    /// AdminService/EnableKeyVersion
    EnableKeyVersion,
    /// AdminService/ScheduleKeyVersionDestruction
    ScheduleKeyVersionDestruction,
    /// AdminService/CancelKeyVersionDestruction
    CancelKeyVersionDestruction,
    /// AdminService/ApproveOperation
    ApproveOperation,
    /// AdminService/RotateMasterKey
    RotateMasterKey,
    /// AdminService/GetMasterKeyStatus
    GetMasterKeyStatus,
    /// AdminService/ListApprovals
    ListApprovals,
}

impl Rpc {
    /// The one role that may call it (roles are disjoint by design: officers never see data).
    pub fn role(self) -> Role {
        match self {
            Self::Encrypt
            | Self::Decrypt
            | Self::BatchEncrypt
            | Self::BatchDecrypt
            | Self::ReEncrypt => Role::App,
            Self::GenerateDataKey | Self::DecryptDataKey | Self::ReEncryptDataKey => Role::Backup,
            Self::SealSecret
            | Self::UnsealSecret
            | Self::HashPassword
            | Self::VerifyPassword
            | Self::LookupDigest => Role::Secrets,
            Self::CreateTenant
            | Self::ListTenants
            | Self::DestroyTenant
            | Self::CancelTenantDestruction
            | Self::CreateKey
            | Self::GetKey
            | Self::ListKeys
            | Self::RotateKey
            | Self::UpdateKeyPolicy
            | Self::DisableKeyVersion
            | Self::EnableKeyVersion
            | Self::ScheduleKeyVersionDestruction
            | Self::CancelKeyVersionDestruction
            | Self::ApproveOperation
            | Self::RotateMasterKey
            | Self::GetMasterKeyStatus
            | Self::ListApprovals => Role::Officer,
        }
    }
}

impl fmt::Display for Rpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The configured principals, by identity.
#[derive(Debug, Default)]
pub struct Principals {
    by_identity: HashMap<String, Arc<PrincipalConfig>>,
    revocations: Revocations,
}

/// What an authorized request may act on.
#[derive(Debug, Clone)]
pub struct Authorized {
    /// The tenant, for tenant-scoped RPCs.
    pub tenant: Option<Name>,
    /// The principal: its key allow-list and tenant scope. Shared, not copied: a principal of
    /// a multi-tenant service may list 100,000 tenants.
    pub principal: Arc<PrincipalConfig>,
}

impl Principals {
    /// Indexes the configured principals, with the revoked certificates.
    pub fn new(principals: &[PrincipalConfig], revocations: &Revocations) -> Self {
        Self {
            by_identity: principals
                .iter()
                .map(|p| (p.identity.clone(), Arc::new(p.clone())))
                .collect(),
            revocations: revocations.clone(),
        }
    }

    /// Decides whether `peer` may call `rpc` on `tenant` (the request's field, empty if unset)
    /// with `key` (the request's key name, if it names one).
    ///
    /// # Errors
    /// UNAUTHENTICATED for a missing or unknown identity; PERMISSION_DENIED for a role, tenant
    /// or key outside the principal's grants. Messages name the rule, never what exists.
    pub fn authorize(
        &self,
        peer: &PeerInfo,
        rpc: Rpc,
        tenant: &str,
        key: Option<&str>,
    ) -> Result<Authorized, Status> {
        let revoked = |value: &Option<String>, set: &std::collections::BTreeSet<String>| {
            value.as_ref().is_some_and(|v| set.contains(v))
        };
        if revoked(&peer.serial, &self.revocations.serials)
            || revoked(&peer.fingerprint, &self.revocations.fingerprints)
        {
            return Err(Status::unauthenticated("the client certificate is revoked"));
        }
        let identity = peer
            .identity
            .as_ref()
            .map_err(|e| Status::unauthenticated(format!("no usable identity: {e}")))?;
        let principal = self
            .by_identity
            .get(identity)
            .ok_or_else(|| Status::unauthenticated("identity is not a configured principal"))?;
        if !principal.roles.contains(&rpc.role()) {
            return Err(Status::permission_denied(format!(
                "{rpc} needs role {:?}, which this principal does not have",
                rpc.role()
            )));
        }
        let tenant = match (&principal.tenants, tenant, rpc) {
            // Not tied to one tenant: checked against the scope by the handler.
            (
                _,
                "",
                Rpc::ListTenants
                | Rpc::ApproveOperation
                | Rpc::ListApprovals
                | Rpc::RotateMasterKey
                | Rpc::GetMasterKeyStatus,
            ) => None,
            (TenantScope::Only(tenants), "", _) if rpc.role() != Role::Officer => {
                match (tenants.len(), tenants.first()) {
                    (1, Some(only)) => Some(only.clone()),
                    _ => {
                        return Err(Status::permission_denied(
                            "this principal has several tenants: name one in the tenant field",
                        ));
                    }
                }
            }
            (_, "", _) => return Err(Status::invalid_argument("tenant is required")),
            (TenantScope::All, named, _) => Some(parse_name(named, "tenant")?),
            (TenantScope::Only(tenants), named, _) => {
                match named.parse::<Name>().ok().and_then(|n| tenants.get(&n)) {
                    Some(allowed) => Some(allowed.clone()),
                    None => {
                        return Err(Status::permission_denied(
                            "tenant is not among this principal's tenants",
                        ));
                    }
                }
            }
        };
        if let (Some(allowed), Some(key)) = (&principal.keys, key) {
            if !key.is_empty() && !allowed.iter().any(|k| k.as_str() == key) {
                return Err(Status::permission_denied(
                    "key is not among this principal's keys",
                ));
            }
        }
        Ok(Authorized {
            tenant,
            principal: Arc::clone(principal),
        })
    }
}

/// Parses a name from a request field.
///
/// # Errors
/// INVALID_ARGUMENT naming the field.
pub fn parse_name(value: &str, field: &'static str) -> Result<Name, Status> {
    value.parse().map_err(|_| {
        Status::invalid_argument(format!(
            "{field}: names are 1 to 63 characters of a-z, 0-9 and '-', starting with a letter or digit"
        ))
    })
}
