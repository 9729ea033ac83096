//! MAC keys (purpose MAC): GenerateMac and VerifyMac. Each version's HMAC key was generated in
//! the HSM and is stored only wrapped under the MWK; the MAC is computed inside the HSM by the
//! unwrapped, non-extractable key, and a verification compares in constant time.

use subtle::ConstantTimeEq;

use super::{Error, KeySnapshot, Kms};
use crate::hsm::MacAlgorithm;
use crate::ids::{KeyId, KeyVersion, Name, TenantId};
use crate::keystore::Purpose;

/// GenerateMac's result.
#[derive(Debug, Clone)]
pub struct MacOutput {
    /// The raw MAC.
    pub mac: Vec<u8>,
    /// The key that made it.
    pub key_id: KeyId,
    /// The version that made it: VerifyMac needs it after a rotation.
    pub version: KeyVersion,
}

/// VerifyMac's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacCheck {
    /// Whether the MAC matches.
    pub valid: bool,
    /// The key that checked it.
    pub key_id: KeyId,
    /// The version that checked it.
    pub version: KeyVersion,
}

impl Kms {
    /// The MAC of `data` under the primary version of a MAC key, computed in the HSM.
    ///
    /// # Errors
    /// [`Error::KeyNotFound`], [`Error::PurposeMismatch`] for a key of another purpose,
    /// [`Error::KeyState`] when the primary is not enabled, HSM errors.
    pub fn generate_mac(
        &self,
        tenant: TenantId,
        key: &Name,
        data: &[u8],
    ) -> Result<MacOutput, Error> {
        let snapshot = self.primary_snapshot(tenant, key)?;
        let algorithm = mac_algorithm(&snapshot)?;
        self.check_use(&snapshot, "generate a MAC")?;
        let mac = self.compute_mac(tenant, &snapshot, algorithm, data)?;
        Ok(MacOutput {
            mac,
            key_id: snapshot.record.id,
            version: snapshot.primary.version,
        })
    }

    /// Whether `mac` is the MAC of `data` under `version` of a MAC key (`None`: the primary).
    /// The version must be enabled and not below the key's min_decryption_version.
    ///
    /// # Errors
    /// As [`Kms::generate_mac`], plus [`Error::VersionNotFound`].
    pub fn verify_mac(
        &self,
        tenant: TenantId,
        key: &Name,
        version: Option<KeyVersion>,
        data: &[u8],
        mac: &[u8],
    ) -> Result<MacCheck, Error> {
        let primary = self.primary_snapshot(tenant, key)?;
        let algorithm = mac_algorithm(&primary)?;
        let snapshot = self.named_version(tenant, key, primary, version)?;
        self.check_open(&snapshot, "verify MACs")?;
        let expected = self.compute_mac(tenant, &snapshot, algorithm, data)?;
        // A MAC of the wrong length is simply not the MAC; the comparison is constant-time
        // over the expected length.
        let valid = mac.len() == expected.len() && bool::from(expected.ct_eq(mac));
        Ok(MacCheck {
            valid,
            key_id: snapshot.record.id,
            version: snapshot.primary.version,
        })
    }

    /// GenerateMac with the HSM called on this thread, when the key is in memory and inline HSM
    /// calls are allowed; `None` otherwise (then [`Kms::generate_mac`] on a blocking thread).
    pub fn generate_mac_cached(
        &self,
        tenant: &Name,
        key: &Name,
        data: &[u8],
    ) -> Option<Result<MacOutput, Error>> {
        let tenant = self.inline_tenant(tenant)?;
        self.cached_primary(tenant, key)?;
        Some(self.timed_inline(|| self.generate_mac(tenant, key, data)))
    }

    /// VerifyMac with the HSM called on this thread, when the key's primary and the named
    /// version are in memory; see [`Kms::generate_mac_cached`].
    pub fn verify_mac_cached(
        &self,
        tenant: &Name,
        key: &Name,
        version: Option<KeyVersion>,
        data: &[u8],
        mac: &[u8],
    ) -> Option<Result<MacCheck, Error>> {
        let tenant = self.inline_tenant(tenant)?;
        self.cached_named_version(tenant, key, version)?;
        Some(self.timed_inline(|| self.verify_mac(tenant, key, version, data, mac)))
    }

    fn compute_mac(
        &self,
        tenant: TenantId,
        snapshot: &KeySnapshot,
        algorithm: MacAlgorithm,
        data: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let key = self.unwrap_stored_kek(tenant, &snapshot.primary.kek)?;
        Ok(self.hsm.mac(&key, algorithm, data)?)
    }
}

fn mac_algorithm(snapshot: &KeySnapshot) -> Result<MacAlgorithm, Error> {
    match snapshot.record.purpose {
        Purpose::Mac(algorithm) => Ok(algorithm),
        purpose => Err(Error::PurposeMismatch {
            key: snapshot.record.name.clone(),
            purpose,
        }),
    }
}
