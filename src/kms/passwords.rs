//! HashPassword and VerifyPassword: Argon2id over a pepper HMAC made inside the HSM.
//!
//! The Argon2id input is HMAC-SHA256 under the HSM's pepper key (it never leaves the HSM) of
//! `"keyfront/v1/password" ‖ tenant id ‖ key id ‖ password`. So a stolen hash database is
//! useless without the HSM, and a hash made for one tenant or key does not verify for another.
//! The stored string is PHC format:
//! `$argon2id$v=19$m=<KiB>,t=<passes>,p=<lanes>,pv=<pepper version>$<salt>$<hash>` (base64
//! without padding). It carries its parameters and pepper version, so both can be raised
//! later; VerifyPassword then says a rehash is due.

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::Error;
use super::Kms;
use crate::crypto::Plaintext;
use crate::hsm::HmacKey;
use crate::ids::{Name, TenantId};
use crate::keystore::{KeyRecord, Purpose};

/// The pepper key generation the HSM holds (`keyfront-pepper-1`).
pub const PEPPER_VERSION: u32 = 1;
const DOMAIN: &[u8] = b"keyfront/v1/password";
const LOOKUP_DOMAIN: &[u8] = b"keyfront/v1/lookup";
const SALT_LEN: usize = 16;
const HASH_LEN: usize = 32;
/// Longest password accepted (bytes): Argon2 takes any length, but a bound stops abuse.
pub const MAX_PASSWORD_LEN: usize = 4096;

/// Argon2id cost parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasswordParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for PasswordParams {
    /// OWASP's minimum for Argon2id: 19 MiB, 2 passes, 1 lane.
    fn default() -> Self {
        Self {
            memory_kib: 19_456,
            iterations: 2,
            parallelism: 1,
        }
    }
}

/// VerifyPassword's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Whether the password matches.
    pub matches: bool,
    /// It matched, and the hash uses older parameters or pepper: store a new one.
    pub rehash_needed: bool,
}

struct Parsed {
    params: PasswordParams,
    pepper_version: u32,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

impl Kms {
    /// Hashes a password for a SECRETS key of the tenant.
    ///
    /// # Errors
    /// [`Error::KeyNotFound`], [`Error::PurposeMismatch`], the primary's state
    /// ([`Error::KeyState`]), [`Error::InvalidArgument`] for an empty or oversized password,
    /// HSM errors.
    pub fn hash_password(
        &self,
        tenant: TenantId,
        key: &Name,
        password: &Plaintext,
    ) -> Result<String, Error> {
        let snapshot = self.primary(tenant, key, Purpose::Secrets)?;
        let params = self.password_params;
        let salt: [u8; SALT_LEN] = rand::random();
        let hash = self.argon2(tenant, &snapshot.record, password, &salt, params)?;
        Ok(format!(
            "$argon2id$v=19$m={},t={},p={},pv={PEPPER_VERSION}${}${}",
            params.memory_kib,
            params.iterations,
            params.parallelism,
            STANDARD_NO_PAD.encode(salt),
            STANDARD_NO_PAD.encode(hash.as_slice()),
        ))
    }

    /// Verifies a password against a stored hash in constant time.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a string that is not a keyfront password hash, or one of
    /// costs this server neither makes nor accepts;
    /// [`Error::KeyNotFound`], [`Error::PurposeMismatch`], HSM errors.
    pub fn verify_password(
        &self,
        tenant: TenantId,
        key: &Name,
        password: &Plaintext,
        stored: &str,
    ) -> Result<Verified, Error> {
        let parsed = parse(stored).ok_or_else(|| {
            Error::InvalidArgument("hash: not a password hash made by HashPassword".into())
        })?;
        // Only costs this server makes, or lists as accepted: a caller's hash string chooses
        // the Argon2 work, and a crafted one (1 GiB, 16 passes) held every password slot and
        // the server's memory for minutes.
        if parsed.params != self.password_params
            && !self.accepted_password_params.contains(&parsed.params)
        {
            return Err(Error::InvalidArgument(format!(
                "hash: its Argon2 costs (m={}, t={}, p={}) are not ones this server makes or \
                 accepts ([passwords] accepted)",
                parsed.params.memory_kib, parsed.params.iterations, parsed.params.parallelism
            )));
        }
        let record = self.key(tenant, key)?;
        Self::check_purpose(&record, Purpose::Secrets)?;
        if parsed.pepper_version != PEPPER_VERSION {
            // A pepper this HSM does not hold cannot verify.
            return Ok(Verified {
                matches: false,
                rehash_needed: false,
            });
        }
        let computed = self.argon2(tenant, &record, password, &parsed.salt, parsed.params)?;
        let matches = bool::from(computed.as_slice().ct_eq(&parsed.hash));
        Ok(Verified {
            matches,
            rehash_needed: matches && parsed.params != self.password_params,
        })
    }

    /// The lookup digest of an API token: HMAC-SHA256 inside the HSM under the lookup key, of
    /// `"keyfront/v1/lookup" ‖ tenant id ‖ secret`. Bound to the tenant, not to a key, so key
    /// rotation does not change it.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty secret; HSM errors.
    pub fn lookup_digest(&self, tenant: TenantId, secret: &Plaintext) -> Result<[u8; 32], Error> {
        if secret.is_empty() {
            return Err(Error::InvalidArgument("secret: must not be empty".into()));
        }
        let mut input = Zeroizing::new(Vec::with_capacity(LOOKUP_DOMAIN.len() + 16 + secret.len()));
        input.extend_from_slice(LOOKUP_DOMAIN);
        input.extend_from_slice(tenant.as_bytes());
        input.extend_from_slice(secret.expose_secret());
        Ok(self.hsm.hmac(HmacKey::Lookup, &input)?)
    }

    fn argon2(
        &self,
        tenant: TenantId,
        record: &KeyRecord,
        password: &Plaintext,
        salt: &[u8],
        params: PasswordParams,
    ) -> Result<Zeroizing<[u8; HASH_LEN]>, Error> {
        let secret = password.expose_secret();
        if secret.is_empty() || secret.len() > MAX_PASSWORD_LEN {
            return Err(Error::InvalidArgument(format!(
                "password: 1 to {MAX_PASSWORD_LEN} bytes"
            )));
        }
        let mut input = Zeroizing::new(Vec::with_capacity(DOMAIN.len() + 32 + secret.len()));
        input.extend_from_slice(DOMAIN);
        input.extend_from_slice(tenant.as_bytes());
        input.extend_from_slice(record.id.as_bytes());
        input.extend_from_slice(secret);
        let peppered = Zeroizing::new(self.hsm.hmac(HmacKey::Pepper, &input)?);
        let argon = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(
                params.memory_kib,
                params.iterations,
                params.parallelism,
                Some(HASH_LEN),
            )
            .map_err(|_| Error::InvalidArgument("hash: invalid Argon2 parameters".into()))?,
        );
        let mut out = Zeroizing::new([0u8; HASH_LEN]);
        argon
            .hash_password_into(peppered.as_slice(), salt, out.as_mut_slice())
            .map_err(|_| Error::InvalidArgument("hash: invalid Argon2 input".into()))?;
        Ok(out)
    }
}

/// The Argon2 costs of a stored PHC string, if it is one this server would verify at all
/// (its own format, bounded costs); `None` for anything else. VerifyPassword reads a caller's
/// hash with exactly this parser (fuzzed: fuzz/fuzz_targets/phc.rs).
pub fn password_hash_costs(stored: &str) -> Option<PasswordParams> {
    parse(stored).map(|parsed| parsed.params)
}

/// Parses a PHC string made by [`Kms::hash_password`]; `None` for anything else, including
/// costs beyond what this server would ever use (a crafted hash must not make it allocate
/// gigabytes).
fn parse(stored: &str) -> Option<Parsed> {
    let mut parts = stored.split('$');
    if !parts.next()?.is_empty() || parts.next()? != "argon2id" || parts.next()? != "v=19" {
        return None;
    }
    let (mut m, mut t, mut p, mut pv) = (None, None, None, None);
    for pair in parts.next()?.split(',') {
        let (name, value) = pair.split_once('=')?;
        let value: u32 = value.parse().ok()?;
        let slot = match name {
            "m" => &mut m,
            "t" => &mut t,
            "p" => &mut p,
            "pv" => &mut pv,
            _ => return None,
        };
        if slot.replace(value).is_some() {
            return None;
        }
    }
    let salt = STANDARD_NO_PAD.decode(parts.next()?).ok()?;
    let hash = STANDARD_NO_PAD.decode(parts.next()?).ok()?;
    if parts.next().is_some() || salt.len() != SALT_LEN || hash.len() != HASH_LEN {
        return None;
    }
    let params = PasswordParams {
        memory_kib: m?,
        iterations: t?,
        parallelism: p?,
    };
    let sane = (8..=1 << 20).contains(&params.memory_kib)
        && (1..=16).contains(&params.iterations)
        && (1..=16).contains(&params.parallelism);
    sane.then_some(Parsed {
        params,
        pepper_version: pv?,
        salt,
        hash,
    })
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn only_well_formed_bounded_hashes_parse() {
        let salt = "AAAAAAAAAAAAAAAAAAAAAA";
        let hash = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let good = format!("$argon2id$v=19$m=19456,t=2,p=1,pv=1${salt}${hash}");
        assert!(parse(&good).is_some());
        for bad in [
            String::new(),
            "$argon2i$v=19$m=19456,t=2,p=1,pv=1$x$y".to_owned(),
            format!("$argon2id$v=19$m=19456,t=2,p=1${salt}${hash}"),
            format!("$argon2id$v=19$m=4294967295,t=2,p=1,pv=1${salt}${hash}"),
            format!("$argon2id$v=19$m=19456,t=2,p=1,pv=1,pv=2${salt}${hash}"),
            format!("$argon2id$v=19$m=19456,t=2,p=1,pv=1${salt}${hash}$extra"),
            format!("$argon2id$v=19$m=19456,t=2,p=1,pv=1${salt}$short"),
        ] {
            assert!(parse(&bad).is_none(), "{bad}");
        }
    }
}
