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

use crate::config::{PrincipalConfig, Revocations, Role, Serial, TenantScope};
use crate::ids::Name;
use crate::keystore::GrantRecord;

/// What the TLS layer learned about the peer of a connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// Remote address.
    pub remote: SocketAddr,
    /// The identity, or why the certificate gives none.
    pub identity: Result<String, IdentityError>,
    /// SHA-256 of the leaf certificate (hex).
    pub fingerprint: Option<String>,
    /// The leaf certificate's serial number.
    pub serial: Option<Serial>,
    /// The leaf certificate's issuer name (DER), which revocations by serial are bound to.
    pub issuer: Vec<u8>,
    /// The leaf certificate's notAfter, seconds since the Unix epoch (0: unknown).
    pub not_after: u64,
    /// The connection's audit line could not be written: every request on it is refused.
    pub unaudited: bool,
    /// Requests in progress on the connection (an idle connection is closed only with none).
    pub active: Arc<std::sync::atomic::AtomicUsize>,
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
    /// A CN that looks like a URI: with `allow_cn_identity` it would pass for a URI identity
    /// of a certificate that has none.
    #[error("certificate's CN looks like a URI identity, and only a URI SAN may give one")]
    CnLooksLikeUri,
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
                issuer: Vec::new(),
                not_after: 0,
                unaudited: false,
                active: Arc::default(),
            };
        };
        let fingerprint = Some(hex::encode(Sha256::digest(der)));
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            return Self {
                remote,
                identity: Err(IdentityError::Unparsable),
                fingerprint,
                serial: None,
                issuer: Vec::new(),
                not_after: 0,
                unaudited: false,
                active: Arc::default(),
            };
        };
        Self {
            remote,
            identity: identity(&cert, allow_cn),
            fingerprint,
            serial: Some(Serial::from_der_content(cert.raw_serial())),
            issuer: cert.issuer().as_raw().to_vec(),
            not_after: u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0),
            unaudited: false,
            active: Arc::default(),
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
        0 if allow_cn => {
            let cn = cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .ok_or(IdentityError::NoUriSan)?;
            // Plain names only: `spiffe://…` in a CN must not stand in for a URI SAN.
            if cn.contains(':') {
                return Err(IdentityError::CnLooksLikeUri);
            }
            Ok(cn.to_owned())
        }
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
    /// KeyService/GenerateMac
    GenerateMac,
    /// KeyService/VerifyMac
    VerifyMac,
    /// KeyService/Sign
    Sign,
    /// KeyService/Verify
    Verify,
    /// KeyService/GetPublicKey
    GetPublicKey,
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
    /// AdminService/CreateBackup
    CreateBackup,
    /// AdminService/GetBackupStatus
    GetBackupStatus,
    /// AdminService/GetImportParameters
    GetImportParameters,
    /// AdminService/ImportKeyMaterial
    ImportKeyMaterial,
    /// AccessService/RequestSupportAccess
    RequestSupportAccess,
    /// AccessService/ApproveSupportAccess
    ApproveSupportAccess,
    /// AccessService/DenySupportAccess
    DenySupportAccess,
    /// AccessService/RevokeGrant
    RevokeGrant,
    /// AccessService/ListGrants
    ListGrants,
    /// AccessService/ReviewAccess
    ReviewAccess,
}

/// Every RPC, in the order the enum lists them.
pub const ALL: [Rpc; 45] = [
    Rpc::Encrypt,
    Rpc::Decrypt,
    Rpc::BatchEncrypt,
    Rpc::BatchDecrypt,
    Rpc::GenerateDataKey,
    Rpc::DecryptDataKey,
    Rpc::SealSecret,
    Rpc::UnsealSecret,
    Rpc::ReEncrypt,
    Rpc::HashPassword,
    Rpc::LookupDigest,
    Rpc::VerifyPassword,
    Rpc::ReEncryptDataKey,
    Rpc::GenerateMac,
    Rpc::VerifyMac,
    Rpc::Sign,
    Rpc::Verify,
    Rpc::GetPublicKey,
    Rpc::CreateTenant,
    Rpc::ListTenants,
    Rpc::DestroyTenant,
    Rpc::CancelTenantDestruction,
    Rpc::CreateKey,
    Rpc::GetKey,
    Rpc::ListKeys,
    Rpc::RotateKey,
    Rpc::UpdateKeyPolicy,
    Rpc::DisableKeyVersion,
    Rpc::EnableKeyVersion,
    Rpc::ScheduleKeyVersionDestruction,
    Rpc::CancelKeyVersionDestruction,
    Rpc::ApproveOperation,
    Rpc::RotateMasterKey,
    Rpc::GetMasterKeyStatus,
    Rpc::ListApprovals,
    Rpc::CreateBackup,
    Rpc::GetBackupStatus,
    Rpc::GetImportParameters,
    Rpc::ImportKeyMaterial,
    Rpc::RequestSupportAccess,
    Rpc::ApproveSupportAccess,
    Rpc::DenySupportAccess,
    Rpc::RevokeGrant,
    Rpc::ListGrants,
    Rpc::ReviewAccess,
];

impl Rpc {
    /// The gRPC service it belongs to, as its path names it.
    pub fn service(self) -> &'static str {
        match self {
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
            | Self::ListApprovals
            | Self::CreateBackup
            | Self::GetBackupStatus
            | Self::GetImportParameters
            | Self::ImportKeyMaterial => "keyfront.v1.AdminService",
            Self::RequestSupportAccess
            | Self::ApproveSupportAccess
            | Self::DenySupportAccess
            | Self::RevokeGrant
            | Self::ListGrants
            | Self::ReviewAccess => "keyfront.v1.AccessService",
            _ => "keyfront.v1.KeyService",
        }
    }

    /// `keyfront.v1.Service/Method`, as a request's path names it (without the `/`).
    pub fn path(self) -> String {
        format!("{}/{self}", self.service())
    }

    /// The RPC a request path names, if it is one of keyfront's.
    pub fn from_path(path: &str) -> Option<Self> {
        let path = path.trim_start_matches('/');
        ALL.into_iter().find(|rpc| {
            path.strip_prefix(rpc.service())
                .and_then(|rest| rest.strip_prefix('/'))
                .is_some_and(|method| method == rpc.to_string())
        })
    }
}

/// The KeyService RPCs, which a support grant may name.
pub const DATA_PLANE: [Rpc; 18] = [
    Rpc::Encrypt,
    Rpc::Decrypt,
    Rpc::BatchEncrypt,
    Rpc::BatchDecrypt,
    Rpc::GenerateDataKey,
    Rpc::DecryptDataKey,
    Rpc::SealSecret,
    Rpc::UnsealSecret,
    Rpc::ReEncrypt,
    Rpc::HashPassword,
    Rpc::LookupDigest,
    Rpc::VerifyPassword,
    Rpc::ReEncryptDataKey,
    Rpc::GenerateMac,
    Rpc::VerifyMac,
    Rpc::Sign,
    Rpc::Verify,
    Rpc::GetPublicKey,
];

impl Rpc {
    /// The roles that may call it. Data-plane roles are disjoint from the rest: officers,
    /// tenant-admins and auditors never see data, and support reaches it only under a grant
    /// (judged by [`Principals::authorize_grant`], not by this table).
    pub fn roles(self) -> &'static [Role] {
        match self {
            Self::Encrypt
            | Self::Decrypt
            | Self::BatchEncrypt
            | Self::BatchDecrypt
            | Self::ReEncrypt
            | Self::GenerateMac
            | Self::VerifyMac
            | Self::Sign
            | Self::Verify
            | Self::GetPublicKey => &[Role::App],
            Self::GenerateDataKey | Self::DecryptDataKey | Self::ReEncryptDataKey => {
                &[Role::Backup]
            }
            Self::SealSecret
            | Self::UnsealSecret
            | Self::HashPassword
            | Self::VerifyPassword
            | Self::LookupDigest => &[Role::Secrets],
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
            | Self::ListApprovals
            | Self::CreateBackup
            | Self::GetImportParameters
            | Self::ImportKeyMaterial => &[Role::Officer],
            Self::GetBackupStatus => &[Role::Officer, Role::Auditor],
            Self::RequestSupportAccess => &[Role::Support],
            Self::ApproveSupportAccess | Self::DenySupportAccess => &[Role::TenantAdmin],
            Self::RevokeGrant => &[Role::TenantAdmin, Role::Officer, Role::Support],
            Self::ListGrants => &[
                Role::TenantAdmin,
                Role::Support,
                Role::Officer,
                Role::Auditor,
            ],
            Self::ReviewAccess => &[Role::Officer, Role::Auditor],
        }
    }

    /// Whether it is a KeyService RPC.
    pub fn is_data_plane(self) -> bool {
        DATA_PLANE.contains(&self)
    }

    /// The KeyService RPC with this name (as a grant names it).
    pub fn data_plane(name: &str) -> Option<Self> {
        DATA_PLANE.into_iter().find(|rpc| rpc.to_string() == name)
    }

    /// Whether an empty tenant field means the principal's only tenant.
    fn defaults_to_only_tenant(self) -> bool {
        self.is_data_plane() || self == Self::ListGrants
    }
}

impl Rpc {
    /// Whether it changes state: such calls log an intent line before they act.
    pub fn mutates(self) -> bool {
        matches!(
            self,
            Self::CreateTenant
                | Self::DestroyTenant
                | Self::CancelTenantDestruction
                | Self::CreateKey
                | Self::RotateKey
                | Self::GetImportParameters
                | Self::ImportKeyMaterial
                | Self::UpdateKeyPolicy
                | Self::DisableKeyVersion
                | Self::EnableKeyVersion
                | Self::ScheduleKeyVersionDestruction
                | Self::CancelKeyVersionDestruction
                | Self::ApproveOperation
                | Self::RotateMasterKey
                | Self::RequestSupportAccess
                | Self::ApproveSupportAccess
                | Self::DenySupportAccess
                | Self::RevokeGrant
        )
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
        let principal = self.principal(peer)?;
        if !rpc
            .roles()
            .iter()
            .any(|role| principal.roles.contains(role))
        {
            if rpc.is_data_plane() && principal.roles.contains(&Role::Support) {
                return Err(Status::permission_denied(
                    "support acts on tenant data only under an approved grant (grant_id)",
                ));
            }
            return Err(Status::permission_denied(format!(
                "{rpc} needs role {}, which this principal does not have",
                role_names(rpc.roles())
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
                | Rpc::GetMasterKeyStatus
                | Rpc::CreateBackup
                | Rpc::GetBackupStatus
                | Rpc::ApproveSupportAccess
                | Rpc::DenySupportAccess
                | Rpc::RevokeGrant
                | Rpc::ReviewAccess,
            )
            | (TenantScope::All, "", Rpc::ListGrants) => None,
            (TenantScope::Only(tenants), "", _) if rpc.defaults_to_only_tenant() => {
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

    /// The configured principal behind `peer`, if its certificate is not revoked.
    ///
    /// # Errors
    /// UNAUTHENTICATED for a revoked certificate or a missing or unknown identity.
    pub fn principal(&self, peer: &PeerInfo) -> Result<&Arc<PrincipalConfig>, Status> {
        let revoked = match (&peer.serial, &peer.fingerprint) {
            (Some(serial), Some(fingerprint)) => {
                self.revocations.revokes(serial, &peer.issuer, fingerprint)
            }
            _ => false,
        };
        if revoked {
            return Err(Status::unauthenticated("the client certificate is revoked"));
        }
        // A connection outlives the check at its handshake: its certificate may have expired
        // since. Judged by the system clock, as the handshake is.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if peer.not_after != 0 && now > peer.not_after {
            return Err(Status::unauthenticated(
                "the client certificate expired; connect again with a valid one",
            ));
        }
        let identity = peer
            .identity
            .as_ref()
            .map_err(|e| Status::unauthenticated(format!("no usable identity: {e}")))?;
        self.by_identity
            .get(identity)
            .ok_or_else(|| Status::unauthenticated("identity is not a configured principal"))
    }

    /// Every configured principal, in identity order.
    pub fn all(&self) -> Vec<Arc<PrincipalConfig>> {
        let mut all: Vec<_> = self.by_identity.values().cloned().collect();
        all.sort_by(|a, b| a.identity.cmp(&b.identity));
        all
    }

    /// Decides whether the support principal behind `peer` may call the data-plane `rpc` under
    /// `grant` (already found active for this identity by the domain): the RPC must be one the
    /// grant names, the request's tenant empty or the grant's, and the key one it names.
    /// What it may act on is then exactly the grant: its tenant and its keys.
    ///
    /// # Errors
    /// UNAUTHENTICATED as for [`Principals::authorize`]; PERMISSION_DENIED otherwise.
    pub fn authorize_grant(
        &self,
        peer: &PeerInfo,
        rpc: Rpc,
        grant: &GrantRecord,
        tenant: &str,
        key: Option<&str>,
    ) -> Result<Authorized, Status> {
        let principal = self.principal(peer)?;
        if !principal.roles.contains(&Role::Support) || principal.identity != grant.requested_by {
            return Err(Status::permission_denied(GRANT_REFUSED));
        }
        if !grant.operations.iter().any(|op| *op == rpc.to_string()) {
            return Err(Status::permission_denied(format!(
                "the grant does not cover {rpc}"
            )));
        }
        if !tenant.is_empty() && tenant != grant.tenant.as_str() {
            return Err(Status::permission_denied(
                "tenant: leave it empty or name the grant's tenant",
            ));
        }
        if let Some(key) = key.filter(|k| !k.is_empty()) {
            if !grant.keys.iter().any(|k| k.as_str() == key) {
                return Err(Status::permission_denied(
                    "the grant does not cover this key",
                ));
            }
        }
        let scoped = PrincipalConfig {
            identity: principal.identity.clone(),
            tenants: TenantScope::Only(std::iter::once(grant.tenant.clone()).collect()),
            roles: principal.roles.clone(),
            keys: Some(grant.keys.clone()),
        };
        Ok(Authorized {
            tenant: Some(grant.tenant.clone()),
            principal: Arc::new(scoped),
        })
    }
}

/// The one answer for a grant that is unknown, not this principal's, or not active (pending,
/// denied, revoked or expired): the caller learns nothing about other grants.
pub const GRANT_REFUSED: &str = "grant_id does not name an active grant of this principal (unknown, pending, denied, revoked or expired)";

fn role_names(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(" or ")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(cn: &str, not_after: (i32, u8, u8)) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("sign").der().to_vec()
    }

    /// Issue 25, finding 8: with `allow_cn_identity`, a CN that looks like a URI identity
    /// (`spiffe://…`) is not taken as one.
    #[test]
    fn a_cn_that_looks_like_a_uri_gives_no_identity() {
        let remote = SocketAddr::from(([127, 0, 0, 1], 1));
        let plain =
            PeerInfo::from_certificate(remote, Some(&certificate("billing", (2100, 1, 1))), true);
        assert_eq!(plain.identity, Ok("billing".to_owned()));
        let uri = certificate("spiffe://keyfront.dev/officer", (2100, 1, 1));
        let peer = PeerInfo::from_certificate(remote, Some(&uri), true);
        assert_eq!(peer.identity, Err(IdentityError::CnLooksLikeUri));
    }

    /// Issue 25, finding 8: a connection's certificate that expired after its handshake is
    /// refused on its next request.
    #[test]
    fn a_certificate_that_expired_since_the_handshake_is_refused() {
        let remote = SocketAddr::from(([127, 0, 0, 1], 1));
        let principals = Principals::new(
            &[PrincipalConfig {
                identity: "old".into(),
                tenants: TenantScope::All,
                roles: vec![Role::Officer],
                keys: None,
            }],
            &Revocations::default(),
        );
        let expired =
            PeerInfo::from_certificate(remote, Some(&certificate("old", (2001, 1, 1))), true);
        let status = principals.principal(&expired).expect_err("expired");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(status.message().contains("expired"), "{status:?}");
        let valid =
            PeerInfo::from_certificate(remote, Some(&certificate("old", (2100, 1, 1))), true);
        assert!(principals.principal(&valid).is_ok());
    }
}
