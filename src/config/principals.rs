//! `[[principals]]`: roles, tenant scopes, and the checks on each principal (identities unique
//! and well formed, roles that do not undo each other).

use std::collections::BTreeSet;

use serde::Deserialize;

use crate::ids::Name;

use super::ConfigProblem;

/// A role a principal may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Encrypt, Decrypt, BatchEncrypt, BatchDecrypt.
    App,
    /// GenerateDataKey, DecryptDataKey, for every tenant in its list.
    Backup,
    /// SealSecret, UnsealSecret.
    Secrets,
    /// AdminService; never data.
    Officer,
    /// RequestSupportAccess; KeyService calls only under an approved grant of a tenant-admin.
    Support,
    /// ApproveSupportAccess and DenySupportAccess for its own tenants; never data.
    TenantAdmin,
    /// ReviewAccess and ListGrants; never data.
    Auditor,
}

impl Role {
    /// The name the config uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::App => "app",
            Self::Backup => "backup",
            Self::Secrets => "secrets",
            Self::Officer => "officer",
            Self::Support => "support",
            Self::TenantAdmin => "tenant-admin",
            Self::Auditor => "auditor",
        }
    }

    /// Whether `tenants = ["*"]` is allowed with it: roles that never touch data directly.
    pub(super) fn may_have_every_tenant(self) -> bool {
        matches!(self, Self::Officer | Self::Support | Self::Auditor)
    }

    pub(super) fn is_data(self) -> bool {
        matches!(self, Self::App | Self::Backup | Self::Secrets)
    }
}

/// Two roles one principal may not hold together, and why: together they would undo a
/// promise that each keeps alone. Authorization passes if any role of a principal allows a
/// call, so a principal with both has both powers at once.
pub fn conflicting_roles(roles: &[Role]) -> Option<(Role, Role, &'static str)> {
    for &a in roles {
        for &b in roles {
            let why = match (a, b) {
                (data, Role::Officer) if data.is_data() => {
                    "officers administer keys and never see data"
                }
                (data, Role::Auditor) if data.is_data() => "auditors review and never see data",
                (data, Role::TenantAdmin) if data.is_data() => {
                    "a tenant's administrator consents and never sees data"
                }
                (data, Role::Support) if data.is_data() => {
                    "support reaches data only under a grant the customer approved"
                }
                (Role::Support, Role::TenantAdmin) => {
                    "support would approve its own access: consent must be the customer's"
                }
                (Role::Officer, Role::TenantAdmin) => {
                    "an officer would consent to support access for the customer"
                }
                (Role::Officer, Role::Support) => {
                    "an officer would request support access and revoke its traces"
                }
                _ => continue,
            };
            return Some((a, b, why));
        }
    }
    None
}

/// Which tenants a principal may act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantScope {
    /// Every tenant (`tenants = ["*"]`); only for principals whose roles are all officer,
    /// support or auditor (support reaches data only under a grant for one tenant).
    All,
    /// Exactly these (a set: a principal of a multi-tenant service may list many thousands).
    Only(BTreeSet<Name>),
}

/// One entry of `[[principals]]`.
#[derive(Debug, Clone)]
pub struct PrincipalConfig {
    /// The identity: the certificate's URI SAN (or CN with `allow_cn_identity`).
    pub identity: String,
    /// Tenants it may act on.
    pub tenants: TenantScope,
    /// Its roles.
    pub roles: Vec<Role>,
    /// If set, the only keys it may use.
    pub keys: Option<Vec<Name>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrincipal {
    pub(super) identity: String,
    pub(super) tenants: Vec<String>,
    pub(super) roles: Vec<Role>,
    pub(super) keys: Option<Vec<String>>,
    // Roles that exclude each other, allowed anyway (logged and audited at every load).
    #[serde(default)]
    pub(super) dangerous_allow_role_combination: bool,
}

pub(super) fn validate_principals(
    raw: Vec<RawPrincipal>,
    problems: &mut Vec<ConfigProblem>,
) -> Vec<PrincipalConfig> {
    let mut seen = std::collections::HashSet::new();
    let mut principals = Vec::with_capacity(raw.len());
    for principal in raw {
        let identity = principal.identity;
        if !seen.insert(identity.clone()) {
            problems.push(ConfigProblem::PrincipalDuplicate(identity.clone()));
        }
        if identity.is_empty() || principal.roles.is_empty() || principal.tenants.is_empty() {
            problems.push(ConfigProblem::PrincipalIncomplete(identity.clone()));
            continue;
        }
        let tenants = if principal.tenants == ["*"] {
            if !principal.roles.iter().all(|r| r.may_have_every_tenant()) {
                problems.push(ConfigProblem::PrincipalWildcard(identity.clone()));
            }
            TenantScope::All
        } else {
            TenantScope::Only(parse_names(&identity, principal.tenants, problems))
        };
        let keys = principal
            .keys
            .map(|keys| parse_names(&identity, keys, problems));
        let mut roles = principal.roles;
        roles.sort();
        roles.dedup();
        if let Some((a, b, why)) = conflicting_roles(&roles) {
            if !principal.dangerous_allow_role_combination {
                problems.push(ConfigProblem::RoleCombination(
                    identity.clone(),
                    a.as_str(),
                    b.as_str(),
                    why,
                ));
            }
        }
        principals.push(PrincipalConfig {
            identity,
            tenants,
            roles,
            keys,
        });
    }
    principals
}

pub(super) fn parse_names<C: FromIterator<Name>>(
    identity: &str,
    names: Vec<String>,
    problems: &mut Vec<ConfigProblem>,
) -> C {
    names
        .into_iter()
        .filter_map(|name| match name.parse() {
            Ok(parsed) => Some(parsed),
            Err(_) => {
                problems.push(ConfigProblem::PrincipalName(identity.to_owned(), name));
                None
            }
        })
        .collect()
}
