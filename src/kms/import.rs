//! Key import (BYOK), as AWS KMS does it: import parameters (an RSA-3072 wrapping key pair
//! generated in the HSM, valid for 24 hours) for a key name, then key material wrapped to their
//! public key, unwrapped inside the HSM and stored wrapped under the MWK as a new version.
//!
//! An imported key carries an [`ImportRecord`]: which versions hold imported material, with
//! the expiry each was given, and whether rotation may add generated versions (by default it
//! may not: a customer who brings a key expects every version to be theirs). Expired material
//! refuses every use, like a disabled version; its records stay, so importing new material
//! and decrypting with it goes on.

use std::time::Duration;

use super::Error;
use super::Kms;
use crate::hsm::{self, ImportTarget, ImportWrapping, Imported, KeyCheckValue, WrappedKek};
use crate::ids::{KeyId, KeyVersion, Name, TenantId};
use crate::keystore::{
    ImportParametersRecord, ImportRecord, ImportedVersion, KeyPolicy, KeyRecord, Purpose, TenantDb,
    TenantWrite,
};

/// How long import parameters stay valid (AWS KMS: 24 hours).
pub const IMPORT_PARAMETERS_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// What a caller brings to [`Kms::import_key_material`].
#[derive(Debug)]
pub struct Import<'a> {
    /// The import token of the parameters the material was wrapped for.
    pub token: &'a str,
    /// The wrapped material, as [`crate::crypto::import::wrap_for_import`] makes it.
    pub material: &'a [u8],
    /// What the key is for: needed for a new key; for an existing key it must be its purpose
    /// (`None`: the key's).
    pub purpose: Option<Purpose>,
    /// When the material expires (seconds since the Unix epoch; `None`: never).
    pub expires_at: Option<u64>,
    /// Whether RotateKey and the scheduler may add generated versions to the key.
    pub allow_generated_rotation: bool,
}

/// The expiry of a version's material, if it was imported with one.
pub(super) fn material_expiry(
    db: &TenantDb,
    record: &KeyRecord,
    version: KeyVersion,
) -> Result<Option<u64>, Error> {
    Ok(db
        .import(&record.id)?
        .and_then(|import| import.version(version).and_then(|v| v.expires_at)))
}

/// Why `record` cannot take imported material, if it cannot.
fn generated_key(record: &KeyRecord) -> Error {
    Error::KeyState {
        reason: "KEY_NOT_IMPORTED",
        message: format!(
            "key {} holds generated key material; import into a new key name (ImportKeyMaterial creates the key)",
            record.name
        ),
    }
}

impl Kms {
    /// New import parameters for the key `name` of the tenant (an imported key, or a name not
    /// taken yet), replacing any earlier ones for that name.
    ///
    /// # Errors
    /// [`Error::KeyState`] (`KEY_NOT_IMPORTED`) for a key of generated material;
    /// [`hsm::Error::Unsupported`] for a wrapping the HSM cannot unwrap; HSM or storage errors.
    pub fn get_import_parameters(
        &self,
        tenant: TenantId,
        name: &Name,
        wrapping: ImportWrapping,
    ) -> Result<ImportParametersRecord, Error> {
        // The key pair first, outside the tenant's write lock: RSA key generation takes up to
        // seconds.
        let (private_key, public_key) = self.hsm.generate_import_key(wrapping)?;
        self.writing(|| {
            let db = self.store.tenant(tenant)?;
            let _writes = db.lock_writes();
            if let Some(record) = db.key_by_name(name)? {
                if db.import(&record.id)?.is_none() {
                    return Err(generated_key(&record));
                }
            }
            let now = self.clock.now_secs();
            let parameters = ImportParametersRecord {
                token: hex::encode(rand::random::<[u8; 16]>()),
                key: name.clone(),
                wrapping,
                private_key: private_key.to_bytes(),
                public_key: public_key.clone(),
                created_at: now,
                expires_at: now.saturating_add(IMPORT_PARAMETERS_TTL.as_secs()),
            };
            db.commit(vec![TenantWrite::ImportParameters(parameters.clone())])?;
            Ok(parameters)
        })
    }

    /// Imports key material wrapped for the current import parameters of `name`: creates the
    /// key at version 1 if it does not exist, else adds a version and makes it primary (as
    /// RotateKey does). The parameters stay valid until they expire or are replaced.
    ///
    /// # Errors
    /// [`Error::KeyState`] for parameters that are missing, replaced (another token) or
    /// expired, and for a key of generated material; [`Error::InvalidArgument`] for material
    /// that does not unwrap (tampered, wrapped to other parameters or with another algorithm)
    /// or has the wrong length, an expiry in the past, or a SIGN purpose;
    /// [`Error::PurposeMismatch`] for an existing key of another purpose. Nothing is stored
    /// on any error. Returns the key and its import record as committed, and the material's
    /// check value.
    pub fn import_key_material(
        &self,
        tenant: TenantId,
        name: &Name,
        import: &Import<'_>,
    ) -> Result<(KeyRecord, ImportRecord, KeyCheckValue), Error> {
        let now = self.check_import(import)?;
        self.writing(|| {
            let db = self.store.tenant(tenant)?;
            let _writes = db.lock_writes();
            let (existing, import_record, imported, purpose) =
                self.unwrap_import(tenant, &db, name, import)?;
            let check_value = imported.check_value;
            let key = imported.key;
            let (mut record, version) = match existing {
                Some(record) => {
                    let next = KeyVersion(
                        record
                            .latest
                            .0
                            .checked_add(1)
                            .ok_or(Error::VersionsExhausted)?,
                    );
                    (record, next)
                }
                None => {
                    let version = KeyVersion(1);
                    let record = KeyRecord {
                        id: KeyId::random(),
                        name: name.clone(),
                        purpose,
                        primary: version,
                        latest: version,
                        created_at: now,
                        generation: 0,
                        policy: KeyPolicy::default(),
                    };
                    (record, version)
                }
            };
            let version_record = self.new_version(
                tenant,
                record.id,
                version,
                record.purpose,
                &record.policy,
                Some(key),
            )?;
            record.primary = version;
            record.latest = version;
            record.generation += 1;
            let mut import_record = import_record.unwrap_or(ImportRecord {
                allow_generated_rotation: false,
                versions: Vec::new(),
            });
            import_record.allow_generated_rotation = import.allow_generated_rotation;
            import_record.versions.push(ImportedVersion {
                version,
                imported_at: now,
                expires_at: import.expires_at,
            });
            db.commit(vec![
                TenantWrite::Version(record.id, version_record.clone()),
                TenantWrite::Key(record.clone()),
                TenantWrite::Import(record.id, import_record.clone()),
            ])?;
            self.register_new_version(tenant, record.id, &version_record);
            if let (true, Some(period)) = (
                import.allow_generated_rotation,
                record.policy.rotation_period_secs,
            ) {
                // The scheduler drops its checks of imported keys it may not rotate.
                self.store
                    .set_rotation_check(tenant, record.id, now.saturating_add(period))?;
            }
            let epoch = self.epoch();
            self.remember_primary(
                tenant,
                record.clone(),
                version_record,
                import.expires_at,
                epoch,
            );
            Ok((record, import_record, check_value))
        })
    }

    /// What [`Kms::import_key_material`] would import, checked (parameters, purpose, the
    /// material unwrapped inside the HSM and its length) and identified by its check value,
    /// with nothing stored: what an officer's request under dual control shows the second
    /// officer.
    ///
    /// # Errors
    /// As [`Kms::import_key_material`].
    pub fn check_key_material(
        &self,
        tenant: TenantId,
        name: &Name,
        import: &Import<'_>,
    ) -> Result<KeyCheckValue, Error> {
        self.check_import(import)?;
        self.reading(tenant, |db, _| {
            Ok(self.unwrap_import(tenant, db, name, import)?.2.check_value)
        })
    }

    /// The checks of an import that need no store: no SIGN keys, no expiry in the past.
    /// Returns the time now.
    fn check_import(&self, import: &Import<'_>) -> Result<u64, Error> {
        if matches!(import.purpose, Some(Purpose::Sign(_))) {
            return Err(Error::InvalidArgument(
                "SIGN keys cannot be imported; import DATA, SECRETS or MAC keys".into(),
            ));
        }
        let now = self.clock.now_secs();
        if import.expires_at.is_some_and(|at| at <= now) {
            return Err(Error::InvalidArgument(
                "valid_to is in the past; give a later time, or 0 for material that does not expire"
                    .into(),
            ));
        }
        Ok(now)
    }

    /// The parameters, the key (if it exists) and its import record, and the material
    /// unwrapped inside the HSM into a blob under the current MWK.
    fn unwrap_import(
        &self,
        tenant: TenantId,
        db: &TenantDb,
        name: &Name,
        import: &Import<'_>,
    ) -> Result<(Option<KeyRecord>, Option<ImportRecord>, Imported, Purpose), Error> {
        let parameters = self.current_parameters(db, name, import.token)?;
        let existing = db.key_by_name(name)?;
        let (purpose, import_record) = match &existing {
            Some(record) => {
                if let Some(purpose) = import.purpose {
                    Self::check_purpose(record, purpose)?;
                }
                let import_record = db
                    .import(&record.id)?
                    .ok_or_else(|| generated_key(record))?;
                (record.purpose, Some(import_record))
            }
            None => (
                import.purpose.ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "purpose: key {name} does not exist yet, and a new key needs a purpose"
                    ))
                })?,
                None,
            ),
        };
        let target = match purpose {
            Purpose::Data | Purpose::Secrets => ImportTarget::Kek,
            Purpose::Mac(algorithm) => ImportTarget::MacKey(algorithm),
            Purpose::Sign(_) => {
                return Err(Error::InvalidArgument(
                    "SIGN keys cannot be imported; import DATA, SECRETS or MAC keys".into(),
                ));
            }
        };
        let private_key = WrappedKek::from_bytes(&parameters.private_key).ok_or(Error::Store(
            crate::keystore::Error::Integrity {
                database: tenant.to_string(),
                reason: "import parameters hold no import key",
            },
        ))?;
        let imported = self
            .hsm
            .import_key(&private_key, parameters.wrapping, import.material, target)
            .map_err(|error| refusal(error, parameters.wrapping, target))?;
        Ok((existing, import_record, imported, purpose))
    }

    /// The import record of a key, if its material was ever imported.
    ///
    /// # Errors
    /// Storage errors.
    pub fn key_import(&self, tenant: TenantId, key: KeyId) -> Result<Option<ImportRecord>, Error> {
        self.reading(tenant, |db, _| Ok(db.import(&key)?))
    }

    /// Whether RotateKey and the scheduler may add a generated version to `record`: a key of
    /// generated material, or an imported one whose last import allowed it.
    ///
    /// # Errors
    /// Storage errors.
    pub(super) fn allows_generated_rotation(
        db: &TenantDb,
        record: &KeyRecord,
    ) -> Result<bool, Error> {
        Ok(db
            .import(&record.id)?
            .is_none_or(|import| import.allow_generated_rotation))
    }

    /// [`Kms::allows_generated_rotation`], as RotateKey's refusal.
    pub(super) fn check_generated_rotation(db: &TenantDb, record: &KeyRecord) -> Result<(), Error> {
        match Self::allows_generated_rotation(db, record)? {
            false => Err(Error::KeyState {
                reason: "IMPORTED_KEY",
                message: format!(
                    "key {} holds imported key material and its policy does not allow generated versions; import new material (ImportKeyMaterial) to rotate it",
                    record.name
                ),
            }),
            true => Ok(()),
        }
    }

    /// The import parameters of `name` whose token is `token`, unexpired.
    fn current_parameters(
        &self,
        db: &TenantDb,
        name: &Name,
        token: &str,
    ) -> Result<ImportParametersRecord, Error> {
        let state = |reason, message: String| Error::KeyState { reason, message };
        let parameters = db.import_parameters(name)?.ok_or_else(|| {
            state(
                "NO_IMPORT_PARAMETERS",
                format!("there are no import parameters for key {name}; call GetImportParameters"),
            )
        })?;
        // Not secret (it names parameters; the material is what is protected), so a plain
        // comparison.
        if parameters.token != token {
            return Err(state(
                "IMPORT_TOKEN_MISMATCH",
                format!(
                    "the import token is not that of the current import parameters of key {name} (replaced by newer ones?); wrap the material for the current ones"
                ),
            ));
        }
        if self.clock.now_secs() >= parameters.expires_at {
            return Err(state(
                "IMPORT_PARAMETERS_EXPIRED",
                format!(
                    "the import parameters of key {name} expired at {}; call GetImportParameters again",
                    super::rfc3339(parameters.expires_at)
                ),
            ));
        }
        Ok(parameters)
    }
}

/// What a failed unwrap of imported material tells the caller: their material is at fault
/// (INVALID_ARGUMENT, naming what is expected), unless the HSM is.
fn refusal(error: hsm::Error, wrapping: ImportWrapping, target: ImportTarget) -> Error {
    match error {
        hsm::Error::Integrity => Error::InvalidArgument(format!(
            "the key material does not unwrap under these import parameters: tampered, wrapped to another public key, or not wrapped with {}",
            wrapping.name()
        )),
        hsm::Error::InvalidInput(_) => Error::InvalidArgument(format!(
            "the key material has the wrong length: this key takes {} bytes",
            target.key_len()
        )),
        other => other.into(),
    }
}
