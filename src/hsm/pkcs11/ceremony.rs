//! The key ceremony (`keyfront init`): the token checked first, then the first master
//! wrapping key, the storage root, pepper, lookup and audit keys, made once; a failure part way
//! destroys what it made.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;

use super::mechanisms::{self, KwpCode};
use super::{
    AUDIT_LABEL, LOOKUP_LABEL, P256_OID_DER, P256_POINT_LEN, PEPPER_LABEL, Pkcs11Config,
    STORAGE_ROOT_LABEL, context, ec_point, find_token, hmac_key_template, mwk_label, mwk_template,
    open_logged_in, to_error,
};
use super::{Error, MwkGeneration};

/// What the init ceremony created.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// The MWK generation created (always 1 for a new token).
    pub mwk_generation: MwkGeneration,
    /// Labels of the token objects created.
    pub labels: Vec<String>,
    /// The audit public key: the SEC1 uncompressed P-256 point (what `audit verify` takes).
    pub audit_public_key: Vec<u8>,
}

/// The `keyfront init` ceremony: creates the MWK (generation 1), the storage MAC root key, the
/// password pepper key and the audit signing key pair on the token.
///
/// Refuses to run on a token that already has any of them. If a step fails, the objects
/// already created are destroyed, so the ceremony can be run again.
///
/// # Errors
/// [`Error::AlreadyInitialized`] on a second run; PKCS#11 errors otherwise.
pub fn init_token(config: &Pkcs11Config) -> Result<InitReport, Error> {
    let ctx = context(&config.module)?;
    let slot = find_token(&ctx, &config.token_label)?;
    // Before anything is made: a token that `serve` could not use is refused here, naming
    // what it lacks.
    let capabilities = mechanisms::discover(&ctx, slot, &[])?;
    let session = open_logged_in(&ctx, config)?;
    let generation = MwkGeneration(1);
    let labels = [
        mwk_label(generation),
        STORAGE_ROOT_LABEL.to_owned(),
        PEPPER_LABEL.to_owned(),
        LOOKUP_LABEL.to_owned(),
        AUDIT_LABEL.to_owned(),
    ];
    for label in &labels {
        let existing = session
            .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
            .map_err(to_error)?;
        if !existing.is_empty() {
            return Err(Error::AlreadyInitialized);
        }
    }

    let mut created = Vec::new();
    let result = create_ceremony_keys(&session, generation, capabilities.kwp, &mut created);
    if result.is_err() {
        for handle in created {
            if let Err(error) = session.destroy_object(handle) {
                tracing::warn!(%error, "could not remove a key of a failed init ceremony");
            }
        }
    }
    let audit_public_key = result?;
    Ok(InitReport {
        mwk_generation: generation,
        labels: labels.to_vec(),
        audit_public_key,
    })
}

pub(super) fn create_ceremony_keys(
    session: &Session,
    generation: MwkGeneration,
    kwp: KwpCode,
    created: &mut Vec<ObjectHandle>,
) -> Result<Vec<u8>, Error> {
    let mwk = session
        .generate_key(&Mechanism::AesKeyGen, &mwk_template(generation, kwp))
        .map_err(to_error)?;
    created.push(mwk);
    for label in [STORAGE_ROOT_LABEL, PEPPER_LABEL, LOOKUP_LABEL] {
        let key = session
            .generate_key(&Mechanism::GenericSecretKeyGen, &hmac_key_template(label))
            .map_err(to_error)?;
        created.push(key);
    }
    let (public, private) = session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Verify(true),
                Attribute::EcParams(P256_OID_DER.to_vec()),
                Attribute::Label(AUDIT_LABEL.as_bytes().to_vec()),
                Attribute::Id(AUDIT_LABEL.as_bytes().to_vec()),
            ],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Modifiable(false),
                Attribute::Sign(true),
                Attribute::Label(AUDIT_LABEL.as_bytes().to_vec()),
                Attribute::Id(AUDIT_LABEL.as_bytes().to_vec()),
            ],
        )
        .map_err(to_error)?;
    created.push(public);
    created.push(private);
    ec_point(session, public, P256_POINT_LEN)
}
