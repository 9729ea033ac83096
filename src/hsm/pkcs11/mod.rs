//! The PKCS#11 implementation of [`Hsm`] (cryptoki), and the `keyfront init` ceremony.
//!
//! Runtime shape (see `../shared/notes/pkcs11-softhsm.md` for the measurements behind it):
//! one `Pkcs11` context per process, initialized once with `OS_LOCKING_OK` (without it SoftHSM
//! turns its own mutexes off); a logged-in anchor session kept for the life of the instance,
//! because closing a token's last session logs it out; a small fixed pool of sessions that are
//! never closed while in use; token objects looked up only when opening, never per request.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use sha2::{Digest, Sha256};

use super::{
    Error, GcmSealed, HmacKey, Hsm, IMPORT_KEY_BITS, IMPORT_KEY_ONLY, IMPORT_OAEP_LEN, IV_LEN,
    ImportTarget, ImportWrapping, Imported, KCV_MESSAGE, Kek, KeyCheckValue, MacAlgorithm,
    MwkGeneration, NOT_AN_IMPORT_KEY, SignAlgorithm, WrappedKek, WrappedKind, function_name,
    signing,
};
use crate::crypto::Plaintext;

mod mechanisms;

pub use mechanisms::{Capabilities, KwpCode};

/// Label prefix of MWK token objects; the generation follows (`keyfront-mwk-1`).
pub const MWK_LABEL_PREFIX: &str = "keyfront-mwk-";
/// Label (and CKA_ID) of the storage MAC root key.
pub const STORAGE_ROOT_LABEL: &str = "keyfront-storage-mac";
/// Label (and CKA_ID) of the password pepper key.
pub const PEPPER_LABEL: &str = "keyfront-pepper-1";
/// Label (and CKA_ID) of the key that makes lookup digests of API tokens.
pub const LOOKUP_LABEL: &str = "keyfront-lookup-1";
/// Label (and CKA_ID) of the audit signing key pair.
pub const AUDIT_LABEL: &str = "keyfront-audit-1";

/// DER of the P-256 curve OID (1.2.840.10045.3.1.7), for CKA_EC_PARAMS.
const P256_OID_DER: [u8; 10] = [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
/// DER of the OID secp384r1 (1.3.132.0.34), the CKA_EC_PARAMS of a P-384 key.
const P384_OID_DER: [u8; 7] = [0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22];
/// Highest MWK generation probed when opening (rotation adds one at a time).
const MAX_MWK_GENERATIONS: u32 = 1024;

/// How to reach the token. The PIN comes from the environment or a file, never the config file.
#[derive(Debug, Clone)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// The token's label; slot ids are not stable, labels are.
    pub token_label: String,
    /// The user PIN (a `SecretString`: redacted in `Debug`, zeroized on drop).
    pub pin: AuthPin,
    /// Sessions in the pool; SoftHSM is effectively single-core, so 2 is plenty.
    pub sessions: NonZeroUsize,
    /// How many unwrapped KEK handles stay cached in the HSM.
    pub kek_cache_capacity: NonZeroUsize,
}

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

/// Loads and initializes the PKCS#11 module once per process, then hands out the same context.
///
/// # Errors
/// [`Error::Module`] if the module cannot be loaded, or another module is already loaded.
pub fn context(module: &Path) -> Result<Pkcs11, Error> {
    static CONTEXT: Mutex<Option<(PathBuf, Pkcs11)>> = Mutex::new(None);
    let mut loaded = CONTEXT.lock().expect("PKCS#11 context lock poisoned");
    if let Some((path, ctx)) = loaded.as_ref() {
        if path == module {
            return Ok(ctx.clone());
        }
        return Err(Error::Module(format!(
            "{} is already loaded in this process",
            path.display()
        )));
    }
    let ctx =
        Pkcs11::new(module).map_err(|e| Error::Module(format!("{}: {e}", module.display())))?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(to_error)?;
    *loaded = Some((module.to_path_buf(), ctx.clone()));
    Ok(ctx)
}

/// Finalizes and initializes the module again: the only way to see a token again after it
/// vanished and came back (SoftHSM 2.6.1 keeps its slot broken until `C_Initialize`).
///
/// Waits up to `wait` for every session pool of this process to be dropped first, and refuses
/// otherwise: closing an old session after re-initialization could close a new one that got
/// the same handle.
///
/// # Errors
/// [`Error::Unavailable`] if sessions stay in use; PKCS#11 errors of `C_Initialize`.
pub fn reinitialize(module: &Path, wait: Duration) -> Result<(), Error> {
    let deadline = Instant::now() + wait;
    while LIVE_POOLS.load(Ordering::SeqCst) > 0 {
        if Instant::now() >= deadline {
            return Err(Error::Unavailable {
                rv: RvError::SessionCount,
                function: "reinitialize",
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ctx = context(module)?;
    if let Err(error) = ctx.clone().finalize() {
        tracing::warn!(error = %to_error(error), "C_Finalize failed; initializing anyway");
    }
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
            tracing::info!(module = %module.display(), "PKCS#11 module re-initialized");
            Ok(())
        }
        Err(error) => Err(to_error(error)),
    }
}

/// The slot holding the (initialized) token with this label.
///
/// # Errors
/// [`Error::TokenNotFound`] or [`Error::TokenAmbiguous`].
pub fn find_token(ctx: &Pkcs11, label: &str) -> Result<Slot, Error> {
    let mut found = None;
    // Not `get_slots_with_initialized_token`: it fails as a whole when one slot's token info
    // cannot be read.
    for slot in ctx.get_slots_with_token().map_err(to_error)? {
        // A slot whose token went away answers GeneralError here (SoftHSM, after its token
        // directory disappeared); it is not the token being looked for, so keep looking.
        let info = match ctx.get_token_info(slot) {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(?slot, error = %to_error(error), "skipping unreadable slot");
                continue;
            }
        };
        if info.token_initialized() && info.label() == label {
            if found.is_some() {
                return Err(Error::TokenAmbiguous(label.to_owned()));
            }
            found = Some(slot);
        }
    }
    found.ok_or_else(|| Error::TokenNotFound(label.to_owned()))
}

/// Opens a read-write session on the token and logs the user in.
///
/// # Errors
/// [`Error::Pin`] if the PIN is refused; [`Error::TokenNotFound`] if there is no such token.
pub fn open_logged_in(ctx: &Pkcs11, config: &Pkcs11Config) -> Result<Session, Error> {
    let slot = find_token(ctx, &config.token_label)?;
    let session = ctx.open_rw_session(slot).map_err(to_error)?;
    login(&session, &config.pin)?;
    Ok(session)
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

fn create_ceremony_keys(
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

/// Length of an uncompressed P-256 point (0x04, X, Y).
const P256_POINT_LEN: usize = 65;
/// Length of an uncompressed P-384 point.
const P384_POINT_LEN: usize = 97;

/// The public key's point as SEC1 uncompressed bytes (`len` of them for its curve). PKCS#11
/// v2.40 stores CKA_EC_POINT as a DER OCTET STRING around them (SoftHSM does); some tokens
/// store the bare point. Which it is follows from the length, not from the first bytes: a
/// bare point whose X begins with the byte that equals its length would look like DER.
fn ec_point(session: &Session, public: ObjectHandle, len: usize) -> Result<Vec<u8>, Error> {
    let point = session
        .get_attributes(public, &[AttributeType::EcPoint])
        .map_err(to_error)?
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(p) => Some(p),
            _ => None,
        })
        .unwrap_or_default();
    point_from_attribute(&point, len).ok_or(Error::Internal {
        rv: None,
        function: "C_GetAttributeValue",
    })
}

/// [`ec_point`]'s decision, on the attribute's bytes.
fn point_from_attribute(attribute: &[u8], len: usize) -> Option<Vec<u8>> {
    let bare = |point: &[u8]| (point.len() == len && point[0] == 0x04).then(|| point.to_vec());
    match attribute {
        // DER OCTET STRING, short length form (both curves' points are under 128 bytes).
        [0x04, der_len, rest @ ..]
            if attribute.len() == len + 2 && usize::from(*der_len) == len =>
        {
            bare(rest)
        }
        point => bare(point),
    }
}

/// The public key of a key pair just generated, as SubjectPublicKeyInfo DER.
fn public_spki(
    session: &Session,
    public: ObjectHandle,
    algorithm: SignAlgorithm,
) -> Result<Vec<u8>, Error> {
    let malformed = Error::Internal {
        rv: None,
        function: "C_GetAttributeValue",
    };
    match algorithm {
        SignAlgorithm::EcdsaP256Sha256 => {
            signing::ec_spki(algorithm, &ec_point(session, public, P256_POINT_LEN)?)
                .ok_or(malformed)
        }
        SignAlgorithm::EcdsaP384Sha384 => {
            signing::ec_spki(algorithm, &ec_point(session, public, P384_POINT_LEN)?)
                .ok_or(malformed)
        }
        SignAlgorithm::RsaPss3072Sha256 => rsa_public_spki(session, public).map_err(to_error)?,
    }
}

/// An RSA public key object as SubjectPublicKeyInfo DER (the inner error: malformed).
fn rsa_public_spki(
    session: &Session,
    public: ObjectHandle,
) -> Result<Result<Vec<u8>, Error>, CkError> {
    let (mut modulus, mut exponent) = (Vec::new(), Vec::new());
    let attributes = session.get_attributes(
        public,
        &[AttributeType::Modulus, AttributeType::PublicExponent],
    )?;
    for attribute in attributes {
        match attribute {
            Attribute::Modulus(m) => modulus = m,
            Attribute::PublicExponent(e) => exponent = e,
            _ => {}
        }
    }
    Ok(
        signing::rsa_spki(&modulus, &exponent).ok_or(Error::Internal {
            rv: None,
            function: "C_GetAttributeValue",
        }),
    )
}

/// Whether the token unwraps RSA-OAEP with SHA-256 under `private` (whose public key is
/// `spki`): a random 32-byte secret is wrapped to it in software and unwrapped in the token
/// into a session object, destroyed at once. A refusal of the parameters is "no"; any other
/// failure is an error.
fn unwraps_oaep_sha256(
    session: &Session,
    private: ObjectHandle,
    spki: &[u8],
    kwp: KwpCode,
) -> Result<bool, CkError> {
    use rsa::pkcs8::DecodePublicKey;
    let unexpected = || CkError::Pkcs11(RvError::FunctionFailed, Function::UnwrapKey);
    let public = rsa::RsaPublicKey::from_public_key_der(spki).map_err(|_| unexpected())?;
    let probe: zeroize::Zeroizing<[u8; 32]> = zeroize::Zeroizing::new(rand::random());
    let block = public
        .encrypt(
            &mut rsa::rand_core::OsRng,
            rsa::Oaep::new::<Sha256>(),
            probe.as_slice(),
        )
        .map_err(|_| unexpected())?;
    let params = oaep_params(ImportWrapping::RsaesOaepSha256);
    match session.unwrap_key(
        &Mechanism::RsaPkcsOaep(params),
        private,
        &block,
        &ephemeral_key_template(kwp),
    ) {
        Ok(key) => {
            session.destroy_object(key)?;
            Ok(true)
        }
        Err(error) if oaep_refused(&error) => Ok(false),
        Err(error) => Err(error),
    }
}

/// The key pair templates of a signing key. The private key is a session object, sensitive,
/// extractable only so that it can be wrapped under the MWK right after (and destroyed).
fn signing_key_templates(
    algorithm: SignAlgorithm,
) -> (Mechanism<'static>, Vec<Attribute>, Vec<Attribute>) {
    let (mechanism, key_type, public) = match algorithm {
        SignAlgorithm::EcdsaP256Sha256 => (
            Mechanism::EccKeyPairGen,
            KeyType::EC,
            vec![Attribute::EcParams(P256_OID_DER.to_vec())],
        ),
        SignAlgorithm::EcdsaP384Sha384 => (
            Mechanism::EccKeyPairGen,
            KeyType::EC,
            vec![Attribute::EcParams(P384_OID_DER.to_vec())],
        ),
        SignAlgorithm::RsaPss3072Sha256 => (
            Mechanism::RsaPkcsKeyPairGen,
            KeyType::RSA,
            vec![
                Attribute::ModulusBits(3072.into()),
                Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
            ],
        ),
    };
    let mut public_template = vec![
        Attribute::Token(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
    ];
    public_template.extend(public);
    let private_template = vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(key_type),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ];
    (mechanism, public_template, private_template)
}

/// How a signing key exists while in use: a sensitive, non-extractable session object that
/// can only sign with its one mechanism (`extractable` only to re-wrap it under a new MWK).
fn private_key_template(kind: WrappedKind, extractable: bool) -> Vec<Attribute> {
    let (key_type, mechanism) = match kind {
        WrappedKind::RsaPrivateKey => (KeyType::RSA, MechanismType::RSA_PKCS_PSS),
        _ => (KeyType::EC, MechanismType::ECDSA),
    };
    vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(key_type),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(extractable),
        Attribute::Sign(!extractable),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![mechanism]),
    ]
}

/// The key pair templates of an import key: RSA-3072, the private key a sensitive session
/// object that can only unwrap with RSA-OAEP ([`import_private_template`]), extractable only so
/// that it can be wrapped under the MWK right after (and destroyed).
fn import_key_templates() -> (Vec<Attribute>, Vec<Attribute>) {
    let public = vec![
        Attribute::Token(false),
        Attribute::Encrypt(true),
        Attribute::Verify(false),
        Attribute::Wrap(false),
        Attribute::ModulusBits((IMPORT_KEY_BITS as u64).into()),
        Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
    ];
    (public, import_private_template(true))
}

/// An import key's private key: sensitive, RSA-OAEP unwrapping only; `extractable` only while
/// it is made, to be wrapped under the MWK. In use it is not.
fn import_private_template(extractable: bool) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(extractable),
        Attribute::Sign(false),
        Attribute::Decrypt(false),
        Attribute::Unwrap(true),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![MechanismType::RSA_PKCS_OAEP]),
    ]
}

/// The ephemeral AES key of RSA-AES key wrap: a session object that can only unwrap with KWP.
fn ephemeral_key_template(kwp: KwpCode) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(true),
        Attribute::Sign(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![kwp.mechanism_type()]),
    ]
}

/// RSA-OAEP parameters of `wrapping`: its hash, MGF1 with the same hash, no label.
fn oaep_params(wrapping: ImportWrapping) -> cryptoki::mechanism::rsa::PkcsOaepParams<'static> {
    use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
    if wrapping.sha256() {
        PkcsOaepParams::new(
            MechanismType::SHA256,
            PkcsMgfType::MGF1_SHA256,
            PkcsOaepSource::empty(),
        )
    } else {
        PkcsOaepParams::new(
            MechanismType::SHA1,
            PkcsMgfType::MGF1_SHA1,
            PkcsOaepSource::empty(),
        )
    }
}

/// Whether the token refused RSA-OAEP's parameters (not the data): the hash it cannot do.
fn oaep_refused(error: &CkError) -> bool {
    matches!(
        error,
        CkError::Pkcs11(
            RvError::ArgumentsBad | RvError::MechanismParamInvalid | RvError::MechanismInvalid,
            Function::UnwrapKey
        )
    )
}

/// Bounds on the length of a secret key that was unwrapped (`None`: unknown, which the caller
/// takes as a wrong length). A token should set CKA_VALUE_LEN itself, and then the bounds are
/// exact. SoftHSM 2.6 sets none on an unwrapped generic secret and refuses one in the
/// template; the key is then wrapped with AES-KW under a throwaway session key, destroyed at
/// once (the key is never in clear outside the token). SoftHSM zero-pads AES-KW input to 8
/// bytes, so the output of 8·⌈n/8⌉ + 8 bytes bounds n to 8 values. (It does not wrap with
/// AES-CBC-PAD, which would pin n down, and has no CKM_CONCATENATE_* derivations.) A token
/// that says no length and has no AES-KW (`can_measure` false) gives `None`.
fn secret_len(
    session: &Session,
    key: ObjectHandle,
    can_measure: bool,
) -> Result<Option<(usize, usize)>, CkError> {
    if let len @ 1.. = value_len(session, key)? {
        return Ok(Some((len, len)));
    }
    if !can_measure {
        return Ok(None);
    }
    let measure = session.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Wrap(true),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Derive(false),
            Attribute::AllowedMechanisms(vec![MechanismType::AES_KEY_WRAP]),
        ],
    )?;
    let wrapped = session.wrap_key(&Mechanism::AesKeyWrap, measure, key);
    session.destroy_object(measure)?;
    match wrapped {
        Ok(wrapped) if wrapped.len() >= 16 => Ok(Some((wrapped.len() - 15, wrapped.len() - 8))),
        Ok(_) => Ok(None),
        Err(CkError::Pkcs11(rv, function))
            if !to_error(CkError::Pkcs11(rv, function)).is_unavailable() =>
        {
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// A secret key's CKA_VALUE_LEN (0 when the token does not say).
fn value_len(session: &Session, key: ObjectHandle) -> Result<usize, CkError> {
    Ok(session
        .get_attributes(key, &[AttributeType::ValueLen])?
        .into_iter()
        .find_map(|a| match a {
            Attribute::ValueLen(len) => usize::try_from(u64::from(len)).ok(),
            _ => None,
        })
        .unwrap_or(0))
}

/// The MWK: a token AES-256 key that can only wrap and unwrap with AES-KWP and never leaves
/// the token (ARCHITECTURE.md, key hierarchy).
fn mwk_template(generation: MwkGeneration, kwp: KwpCode) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![kwp.mechanism_type()]),
        Attribute::Label(mwk_label(generation).into_bytes()),
        Attribute::Id(generation.0.to_be_bytes().to_vec()),
    ]
}

fn hmac_key_template(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Sign(true),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![MechanismType::SHA256_HMAC]),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(label.as_bytes().to_vec()),
    ]
}

/// A new KEK as a session object. It must be extractable for the one `C_WrapKey` under the
/// MWK that follows; the object is destroyed right after, and only ever comes back through
/// [`kek_unwrap_template`], which is not extractable.
fn kek_generate_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Derive(false),
    ]
}

/// How a KEK exists while in use: a sensitive, non-extractable session object that can only
/// do AES-GCM encrypt and decrypt.
pub fn kek_unwrap_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]),
    ]
}

/// A KEK while it is re-wrapped under a new MWK: the generation template (sensitive,
/// extractable only by wrapping, usable for nothing else) without the length, which an unwrap
/// takes from the blob.
fn kek_rewrap_template() -> Vec<Attribute> {
    kek_generate_template()
        .into_iter()
        .filter(|a| !matches!(a, Attribute::ValueLen(_)))
        .collect()
}

/// A new MAC key as a session object: like a new KEK, extractable only for the one
/// `C_WrapKey` under the MWK that follows, usable for nothing, destroyed right after.
fn mac_key_generate_template(algorithm: MacAlgorithm) -> Vec<Attribute> {
    let mut template = mac_key_rewrap_template();
    template.push(Attribute::ValueLen((algorithm.key_len() as u64).into()));
    template
}

/// A MAC key while it is re-wrapped under a new MWK (the length comes from the blob).
fn mac_key_rewrap_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ]
}

/// How a MAC key exists while in use: a sensitive, non-extractable session object that can
/// only compute HMACs.
fn mac_key_unwrap_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(true),
        Attribute::Verify(true),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![MechanismType::SHA256_HMAC, MechanismType::SHA512_HMAC]),
    ]
}

/// The label of an MWK generation.
pub fn mwk_label(generation: MwkGeneration) -> String {
    format!("{MWK_LABEL_PREFIX}{}", generation.0)
}

/// [`Hsm`] over a PKCS#11 token.
pub struct Pkcs11Hsm {
    pool: Arc<SessionPool>,
    // What the token offers (RFC 5649's code on it, above all), found when it opened.
    capabilities: Capabilities,
    // Changed only by create_mwk and destroy_mwk (master key rotation).
    mwks: std::sync::RwLock<BTreeMap<MwkGeneration, ObjectHandle>>,
    current_mwk: std::sync::atomic::AtomicU32,
    storage_root: ObjectHandle,
    pepper: ObjectHandle,
    lookup: ObjectHandle,
    audit_private: ObjectHandle,
    audit_public: Vec<u8>,
    kek_cache: quick_cache::sync::Cache<Vec<u8>, Arc<KekObject>>,
    // Rebuilt under the new MWK when the master key rotates.
    canary: std::sync::RwLock<Arc<Canary>>,
    // Whether the token unwraps RSA-OAEP with SHA-256: OAEP_UNKNOWN until the first import key
    // for a SHA-256 wrapping asks it (SoftHSM 2.6 does SHA-1 only).
    oaep_sha256: AtomicU8,
}

const OAEP_UNKNOWN: u8 = 0;
const OAEP_SUPPORTED: u8 = 1;
const OAEP_UNSUPPORTED: u8 = 2;
const OAEP_SHA256_UNSUPPORTED: Error = Error::Unsupported("RSA-OAEP with SHA-256");

impl Pkcs11Hsm {
    /// Logs in to the token and finds keyfront's keys on it (`find_objects` is called only here
    /// and when another node's newer MWK is looked for).
    ///
    /// # Errors
    /// [`Error::Pin`] for a refused PIN (never retry); [`Error::NotInitialized`] when the token
    /// has not been through `keyfront init`; [`Error::Unavailable`] when the HSM is unreachable.
    pub fn open(config: &Pkcs11Config) -> Result<Self, Error> {
        let ctx = context(&config.module)?;
        let anchor = open_logged_in(&ctx, config)?;
        let mut mwks = BTreeMap::new();
        // Retired generations are destroyed oldest first, so the ones left are contiguous,
        // possibly after a gap at the start.
        for generation in (1..=MAX_MWK_GENERATIONS).map(MwkGeneration) {
            match find_mwk(&anchor, generation)? {
                Some(handle) => {
                    mwks.insert(generation, handle);
                }
                None if mwks.is_empty() => {}
                None => break,
            }
        }
        let current_mwk = *mwks
            .keys()
            .next_back()
            .ok_or(Error::NotInitialized("master wrapping key"))?;
        let storage_root = find_one(&anchor, STORAGE_ROOT_LABEL, ObjectClass::SECRET_KEY)?
            .ok_or(Error::NotInitialized("storage MAC key"))?;
        let pepper = find_one(&anchor, PEPPER_LABEL, ObjectClass::SECRET_KEY)?
            .ok_or(Error::NotInitialized("pepper key"))?;
        // Tokens initialized before lookup digests existed get their lookup key now: an HMAC
        // key like the pepper, made inside the HSM and never extractable.
        let lookup = match find_one(&anchor, LOOKUP_LABEL, ObjectClass::SECRET_KEY)? {
            Some(handle) => handle,
            None => {
                tracing::info!(
                    label = LOOKUP_LABEL,
                    "creating the lookup-digest key on this token"
                );
                anchor
                    .generate_key(
                        &Mechanism::GenericSecretKeyGen,
                        &hmac_key_template(LOOKUP_LABEL),
                    )
                    .map_err(to_error)?
            }
        };
        let audit_private = find_one(&anchor, AUDIT_LABEL, ObjectClass::PRIVATE_KEY)?
            .ok_or(Error::NotInitialized("audit signing key"))?;
        let audit_public = match find_one(&anchor, AUDIT_LABEL, ObjectClass::PUBLIC_KEY)? {
            Some(handle) => ec_point(&anchor, handle, P256_POINT_LEN)?,
            None => return Err(Error::NotInitialized("audit public key")),
        };

        let slot = find_token(&ctx, &config.token_label)?;
        // The wrap code must be one every master key on the token allows.
        let mut allowed: Option<Vec<KwpCode>> = None;
        for handle in mwks.values() {
            let restricts = mechanisms::allowed_kwp(&anchor, *handle)?;
            if !restricts.is_empty() {
                allowed = Some(match allowed {
                    None => restricts,
                    Some(so_far) => so_far
                        .into_iter()
                        .filter(|c| restricts.contains(c))
                        .collect(),
                });
            }
        }
        let capabilities = match allowed {
            Some(allowed) if allowed.is_empty() => {
                return Err(Error::Unsuitable(
                    "its master wrapping keys allow different wrap mechanisms".into(),
                ));
            }
            allowed => mechanisms::discover(&ctx, slot, allowed.as_deref().unwrap_or_default())?,
        };
        tracing::debug!(
            kwp = capabilities.kwp.name(),
            "RFC 5649 key wrap on this token"
        );
        let mut sessions = Vec::with_capacity(config.sessions.get());
        for _ in 0..config.sessions.get() {
            let session = ctx.open_rw_session(slot).map_err(to_error)?;
            login(&session, &config.pin)?;
            sessions.push(session);
        }
        let pool = Arc::new(SessionPool::new(sessions, anchor));
        let canary = Canary::new(&pool, capabilities.kwp, mwks[&current_mwk], current_mwk)?;
        Ok(Self {
            pool,
            capabilities,
            canary: std::sync::RwLock::new(Arc::new(canary)),
            mwks: std::sync::RwLock::new(mwks),
            current_mwk: std::sync::atomic::AtomicU32::new(current_mwk.0),
            storage_root,
            pepper,
            lookup,
            audit_private,
            audit_public,
            kek_cache: quick_cache::sync::Cache::new(config.kek_cache_capacity.get()),
            oaep_sha256: AtomicU8::new(OAEP_UNKNOWN),
        })
    }

    /// What the token offers, as found when it opened.
    pub fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    /// RFC 5649 key wrap under this token's code.
    fn kwp(&self) -> Mechanism<'static> {
        self.capabilities.kwp.mechanism()
    }

    /// How many KEK handles are cached now (for tests and metrics).
    pub fn cached_keks(&self) -> usize {
        self.kek_cache.len()
    }
}

impl Hsm for Pkcs11Hsm {
    fn mwk_generation(&self) -> MwkGeneration {
        MwkGeneration(self.current_mwk.load(Ordering::Acquire))
    }

    fn generate_kek(&self) -> Result<WrappedKek, Error> {
        // A KEK is wrapped under the newest MWK on the token, even one another node made: one
        // wrapped under a generation being retired would be lost with it.
        self.refresh_mwks()?;
        let current = self.mwk_generation();
        let mwk = self.mwk(current)?;
        let wrapped = self
            .pool
            .with(|s| {
                let kek = s.generate_key(&Mechanism::AesKeyGen, &kek_generate_template())?;
                let wrapped = s.wrap_key(&self.kwp(), mwk, kek);
                // Destroy before looking at the wrap's result: the clear-capable object must
                // not outlive this call either way.
                let destroyed = s.destroy_object(kek);
                let wrapped = wrapped?;
                destroyed?;
                Ok(wrapped)
            })
            .map_err(to_error)?;
        Ok(WrappedKek::new(current, wrapped))
    }

    fn unwrap_kek(&self, wrapped: &WrappedKek) -> Result<Kek, Error> {
        let cache_key = wrapped.to_bytes();
        if let Some(object) = self.kek_cache.get(&cache_key) {
            crate::metrics::global().cache("kek", true);
            return Ok(Kek::new(object));
        }
        crate::metrics::global().cache("kek", false);
        let mwk = self.mwk(wrapped.generation())?;
        let template = match wrapped.kind() {
            WrappedKind::Kek => kek_unwrap_template(),
            WrappedKind::MacKey => mac_key_unwrap_template(),
            kind @ (WrappedKind::EcPrivateKey | WrappedKind::RsaPrivateKey) => {
                private_key_template(kind, false)
            }
            WrappedKind::ImportKey => return Err(IMPORT_KEY_ONLY),
        };
        // A blob comes from the store, MAC'd, but a token may answer a blob that fails KWP's
        // check as a device error: the canary decides.
        let handle = self
            .pool
            .with(|s| s.unwrap_key(&self.kwp(), mwk, wrapped.wrapped(), &template))
            .map_err(|error| self.caller_data_error(error))?;
        let object = Arc::new(KekObject {
            handle,
            pool: Arc::clone(&self.pool),
        });
        // Outside `pool.with`: an evicted entry may be destroyed here, which needs a session.
        self.kek_cache.insert(cache_key, Arc::clone(&object));
        Ok(Kek::new(object))
    }

    fn encrypt(&self, kek: &Kek, aad: &[u8], plaintext: &[u8]) -> Result<GcmSealed, Error> {
        if aad.is_empty() {
            // Empty AAD trips an assertion in some SoftHSM builds (SoftHSMv2 #605).
            return Err(Error::InvalidInput(
                "AES-GCM in the HSM needs non-empty AAD",
            ));
        }
        let object = kek.downcast::<KekObject>()?;
        let iv: [u8; IV_LEN] = rand::random();
        let mut iv_param = iv;
        let sealed = self
            .pool
            .with(|s| {
                let params = GcmParams::new(&mut iv_param, aad, 128.into())?;
                s.encrypt(&Mechanism::AesGcm(params), object.handle, plaintext)
            })
            .map_err(to_error)?;
        Ok(GcmSealed { iv, sealed })
    }

    fn decrypt(
        &self,
        kek: &Kek,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Plaintext, Error> {
        if aad.is_empty() {
            return Err(Error::InvalidInput(
                "AES-GCM in the HSM needs non-empty AAD",
            ));
        }
        let object = kek.downcast::<KekObject>()?;
        let mut iv_param = *iv;
        let plaintext = self
            .pool
            .with(|s| {
                let params = GcmParams::new(&mut iv_param, aad, 128.into())?;
                s.decrypt(&Mechanism::AesGcm(params), object.handle, sealed)
            })
            .map_err(|error| self.caller_data_error(error))?;
        Ok(Plaintext::new(plaintext))
    }

    fn generate_mac_key(&self, algorithm: MacAlgorithm) -> Result<WrappedKek, Error> {
        // As generate_kek: under the newest MWK on the token.
        self.refresh_mwks()?;
        let current = self.mwk_generation();
        let mwk = self.mwk(current)?;
        let wrapped = self
            .pool
            .with(|s| {
                let key = s.generate_key(
                    &Mechanism::GenericSecretKeyGen,
                    &mac_key_generate_template(algorithm),
                )?;
                let wrapped = s.wrap_key(&self.kwp(), mwk, key);
                let destroyed = s.destroy_object(key);
                let wrapped = wrapped?;
                destroyed?;
                Ok(wrapped)
            })
            .map_err(to_error)?;
        Ok(WrappedKek::of_kind(WrappedKind::MacKey, current, wrapped))
    }

    fn mac(&self, key: &Kek, algorithm: MacAlgorithm, data: &[u8]) -> Result<Vec<u8>, Error> {
        let object = key.downcast::<KekObject>()?;
        let mechanism = match algorithm {
            MacAlgorithm::HmacSha256 => Mechanism::Sha256Hmac,
            MacAlgorithm::HmacSha512 => Mechanism::Sha512Hmac,
        };
        let mac = self
            .pool
            .with(|s| s.sign(&mechanism, object.handle, data))
            .map_err(to_error)?;
        if mac.len() != algorithm.mac_len() {
            return Err(Error::Internal {
                rv: None,
                function: "C_Sign",
            });
        }
        Ok(mac)
    }

    fn generate_signing_key(
        &self,
        algorithm: SignAlgorithm,
    ) -> Result<(WrappedKek, Vec<u8>), Error> {
        // As generate_kek: under the newest MWK on the token.
        self.refresh_mwks()?;
        let current = self.mwk_generation();
        let mwk = self.mwk(current)?;
        let (mechanism, public_template, private_template) = signing_key_templates(algorithm);
        let (wrapped, spki) = self
            .pool
            .with(|s| {
                let (public, private) =
                    s.generate_key_pair(&mechanism, &public_template, &private_template)?;
                let wrapped = s.wrap_key(&self.kwp(), mwk, private);
                let spki = public_spki(s, public, algorithm);
                // Both destroyed before looking at the results: the wrappable private key must
                // not outlive this call either way.
                let destroyed = (s.destroy_object(private), s.destroy_object(public));
                let wrapped = wrapped?;
                destroyed.0?;
                destroyed.1?;
                Ok((wrapped, spki))
            })
            .map_err(to_error)?;
        Ok((
            WrappedKek::of_kind(algorithm.wrapped_kind(), current, wrapped),
            spki?,
        ))
    }

    fn sign_digest(
        &self,
        key: &Kek,
        algorithm: SignAlgorithm,
        digest: &[u8],
    ) -> Result<Vec<u8>, Error> {
        if digest.len() != algorithm.digest_len() {
            return Err(Error::InvalidInput("a digest of the wrong length"));
        }
        let object = key.downcast::<KekObject>()?;
        let internal = Error::Internal {
            rv: None,
            function: "C_Sign",
        };
        match algorithm {
            SignAlgorithm::EcdsaP256Sha256 | SignAlgorithm::EcdsaP384Sha384 => {
                let raw = self
                    .pool
                    .with(|s| s.sign(&Mechanism::Ecdsa, object.handle, digest))
                    .map_err(to_error)?;
                signing::ecdsa_der(algorithm, &raw).ok_or(internal)
            }
            SignAlgorithm::RsaPss3072Sha256 => {
                let params = cryptoki::mechanism::rsa::PkcsPssParams {
                    hash_alg: MechanismType::SHA256,
                    mgf: cryptoki::mechanism::rsa::PkcsMgfType::MGF1_SHA256,
                    s_len: 32.into(),
                };
                self.pool
                    .with(|s| s.sign(&Mechanism::RsaPkcsPss(params), object.handle, digest))
                    .map_err(to_error)
            }
        }
    }

    fn generate_import_key(
        &self,
        wrapping: ImportWrapping,
    ) -> Result<(WrappedKek, Vec<u8>), Error> {
        if wrapping.sha256() && self.oaep_sha256.load(Ordering::Relaxed) == OAEP_UNSUPPORTED {
            return Err(OAEP_SHA256_UNSUPPORTED);
        }
        // As generate_kek: under the newest MWK on the token.
        self.refresh_mwks()?;
        let current = self.mwk_generation();
        let mwk = self.mwk(current)?;
        let (public_template, private_template) = import_key_templates();
        let ask_sha256 =
            wrapping.sha256() && self.oaep_sha256.load(Ordering::Relaxed) == OAEP_UNKNOWN;
        let (wrapped, spki, sha256) = self
            .pool
            .with(|s| {
                let (public, private) = s.generate_key_pair(
                    &Mechanism::RsaPkcsKeyPairGen,
                    &public_template,
                    &private_template,
                )?;
                let wrapped = s.wrap_key(&self.kwp(), mwk, private);
                let spki = rsa_public_spki(s, public);
                // The token is asked once whether it unwraps OAEP with SHA-256: a random key
                // wrapped to this public key in software must come back through C_UnwrapKey.
                let sha256 = match (&spki, ask_sha256) {
                    (Ok(Ok(spki)), true) => {
                        Some(unwraps_oaep_sha256(s, private, spki, self.capabilities.kwp))
                    }
                    _ => None,
                };
                let destroyed = (s.destroy_object(private), s.destroy_object(public));
                let wrapped = wrapped?;
                destroyed.0?;
                destroyed.1?;
                Ok((wrapped, spki?, sha256.transpose()?))
            })
            .map_err(to_error)?;
        if let Some(supported) = sha256 {
            let answer = if supported {
                OAEP_SUPPORTED
            } else {
                OAEP_UNSUPPORTED
            };
            self.oaep_sha256.store(answer, Ordering::Relaxed);
            if !supported {
                return Err(OAEP_SHA256_UNSUPPORTED);
            }
        }
        Ok((
            WrappedKek::of_kind(WrappedKind::ImportKey, current, wrapped),
            spki?,
        ))
    }

    fn import_key(
        &self,
        import_key: &WrappedKek,
        wrapping: ImportWrapping,
        material: &[u8],
        target: ImportTarget,
    ) -> Result<Imported, Error> {
        if import_key.kind() != WrappedKind::ImportKey {
            return Err(NOT_AN_IMPORT_KEY);
        }
        if wrapping.sha256() && self.oaep_sha256.load(Ordering::Relaxed) == OAEP_UNSUPPORTED {
            return Err(OAEP_SHA256_UNSUPPORTED);
        }
        let (block, wrapped_material) = if wrapping.aes_key_wrap() {
            material
                .split_at_checked(IMPORT_OAEP_LEN)
                .filter(|(_, kwp)| !kwp.is_empty())
                .ok_or(Error::Integrity)?
        } else if material.len() == IMPORT_OAEP_LEN {
            (material, &[][..])
        } else {
            return Err(Error::Integrity);
        };
        self.refresh_mwks()?;
        let current = self.mwk_generation();
        let mwk = self.mwk(current)?;
        let import_mwk = self.mwk(import_key.generation())?;
        // Whichever the target, the material is unwrapped as a generic secret: its length can
        // then be checked (an AES unwrap would refuse a wrong length with the same codes as
        // tampering), and a KWP blob holds only the bytes, which `unwrap_kek` later brings
        // back as the kind the blob names.
        // A generic secret that may also HMAC, once: its check value (KCV_MESSAGE), computed
        // here while the material is unwrapped; the object is destroyed right after.
        let mut template = mac_key_rewrap_template();
        for attribute in &mut template {
            if let Attribute::Sign(sign) = attribute {
                *sign = true;
            }
        }
        let params = oaep_params(wrapping);
        let result = self.pool.with(|s| {
            let private = s.unwrap_key(
                &self.kwp(),
                import_mwk,
                import_key.wrapped(),
                &import_private_template(false),
            )?;
            let key = if wrapping.aes_key_wrap() {
                s.unwrap_key(
                    &Mechanism::RsaPkcsOaep(params),
                    private,
                    block,
                    &ephemeral_key_template(self.capabilities.kwp),
                )
                .and_then(|ephemeral| {
                    let length = value_len(s, ephemeral);
                    // 0: the token does not say (SoftHSM 2.6), and the ephemeral key is not
                    // extractable to be measured; KWP then runs with the key it has.
                    let key = match length {
                        Ok(32 | 0) => s
                            .unwrap_key(&self.kwp(), ephemeral, wrapped_material, &template)
                            .map(Some),
                        Ok(_) => Ok(None),
                        Err(error) => Err(error),
                    };
                    s.destroy_object(ephemeral)?;
                    key
                })
            } else {
                s.unwrap_key(&Mechanism::RsaPkcsOaep(params), private, block, &template)
                    .map(Some)
            };
            let destroyed = s.destroy_object(private);
            let Some(key) = key? else {
                destroyed?;
                return Ok(Err(Error::InvalidInput(
                    "the ephemeral AES key is not 256 bits",
                )));
            };
            // Where the token does not report the length (SoftHSM 2.6), it is known to within
            // 8 bytes (docs/DESIGN.md, key import).
            let wrapped = match secret_len(s, key, self.capabilities.aes_key_wrap) {
                Ok(Some((low, high))) if (low..=high).contains(&target.key_len()) => s
                    .sign(&Mechanism::Sha256Hmac, key, KCV_MESSAGE)
                    .and_then(|mac| {
                        let wrapped = s.wrap_key(&self.kwp(), mwk, key)?;
                        Ok(Ok((wrapped, KeyCheckValue::from_mac(&mac))))
                    }),
                Ok(_) => Ok(Err(Error::InvalidInput("key material of the wrong length"))),
                Err(error) => Err(error),
            };
            // Destroyed before looking at the wrap's result: the wrappable object must not
            // outlive this call either way.
            let destroyed_key = s.destroy_object(key);
            let wrapped = wrapped?;
            destroyed?;
            destroyed_key?;
            Ok(wrapped)
        });
        let (wrapped, check_value) = match result {
            Ok(wrapped) => wrapped?,
            Err(error) if wrapping.sha256() && oaep_refused(&error) => {
                self.oaep_sha256.store(OAEP_UNSUPPORTED, Ordering::Relaxed);
                return Err(OAEP_SHA256_UNSUPPORTED);
            }
            Err(error) => return Err(self.caller_data_error(error)),
        };
        Ok(Imported {
            key: WrappedKek::of_kind(target.kind(), current, wrapped),
            check_value,
        })
    }

    fn random(&self, out: &mut [u8]) -> Result<(), Error> {
        self.pool
            .with(|s| s.generate_random_slice(out))
            .map_err(to_error)
    }

    fn hmac(&self, key: HmacKey, data: &[u8]) -> Result<[u8; 32], Error> {
        let handle = match key {
            HmacKey::StorageRoot => self.storage_root,
            HmacKey::Pepper => self.pepper,
            HmacKey::Lookup => self.lookup,
        };
        let mac = self
            .pool
            .with(|s| s.sign(&Mechanism::Sha256Hmac, handle, data))
            .map_err(to_error)?;
        mac.try_into().map_err(|_| Error::Internal {
            rv: None,
            function: "C_Sign",
        })
    }

    fn probe(&self) -> Result<(), Error> {
        let canary = Arc::clone(&self.canary.read().expect("canary lock poisoned"));
        let mwk = self.mwk(canary.kek.generation())?;
        let plaintext = self
            .pool
            .with(|s| {
                // A fresh unwrap, not the handle cache: the point is to exercise the MWK.
                let kek = s.unwrap_key(
                    &self.kwp(),
                    mwk,
                    canary.kek.wrapped(),
                    &kek_unwrap_template(),
                )?;
                let mut iv = canary.iv;
                let result = GcmParams::new(&mut iv, CANARY_AAD, 128.into())
                    .and_then(|params| s.decrypt(&Mechanism::AesGcm(params), kek, &canary.sealed));
                let destroyed = s.destroy_object(kek);
                let plaintext = result?;
                destroyed?;
                Ok(plaintext)
            })
            .map_err(|e| match to_error(e) {
                // The canary is known good: an integrity failure here means the HSM is at fault.
                Error::Integrity => Error::Unavailable {
                    rv: RvError::GeneralError,
                    function: "canary",
                },
                other => other,
            })?;
        if plaintext.as_slice() == CANARY_PLAINTEXT {
            Ok(())
        } else {
            Err(Error::Unavailable {
                rv: RvError::GeneralError,
                function: "canary",
            })
        }
    }

    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, Error> {
        let digest = Sha256::digest(data);
        self.pool
            .with(|s| s.sign(&Mechanism::Ecdsa, self.audit_private, &digest))
            .map_err(to_error)
    }

    fn audit_public_key(&self) -> Vec<u8> {
        self.audit_public.clone()
    }

    fn create_mwk(&self) -> Result<MwkGeneration, Error> {
        let mut mwks = self.mwks.write().expect("MWK lock poisoned");
        let current = self.mwk_generation();
        let next = MwkGeneration(
            current
                .0
                .checked_add(1)
                .ok_or(Error::InvalidInput("no more MWK generations"))?,
        );
        let handle = self
            .pool
            .with(|s| {
                s.generate_key(
                    &Mechanism::AesKeyGen,
                    &mwk_template(next, self.capabilities.kwp),
                )
            })
            .map_err(to_error)?;
        mwks.insert(next, handle);
        // The canary moves to the new generation, so the old one can be destroyed later.
        let canary = Canary::new(&self.pool, self.capabilities.kwp, handle, next)?;
        *self.canary.write().expect("canary lock poisoned") = Arc::new(canary);
        self.current_mwk.store(next.0, Ordering::Release);
        Ok(next)
    }

    fn rewrap_kek(&self, wrapped: &WrappedKek) -> Result<WrappedKek, Error> {
        let current = self.mwk_generation();
        if wrapped.generation() == current {
            return Ok(wrapped.clone());
        }
        let old = self.mwk(wrapped.generation())?;
        let new = self.mwk(current)?;
        let template = match wrapped.kind() {
            WrappedKind::Kek => kek_rewrap_template(),
            WrappedKind::MacKey => mac_key_rewrap_template(),
            kind @ (WrappedKind::EcPrivateKey | WrappedKind::RsaPrivateKey) => {
                private_key_template(kind, true)
            }
            // Import parameters expire long before a retired MWK is destroyed (24 hours
            // against the backup retention), so they are never re-wrapped.
            WrappedKind::ImportKey => return Err(IMPORT_KEY_ONLY),
        };
        let rewrapped = self
            .pool
            .with(|s| {
                // Extractable only so that it can be wrapped again, under the new MWK; a
                // session object destroyed before this returns.
                let kek = s.unwrap_key(&self.kwp(), old, wrapped.wrapped(), &template)?;
                let result = s.wrap_key(&self.kwp(), new, kek);
                let destroyed = s.destroy_object(kek);
                let result = result?;
                destroyed?;
                Ok(result)
            })
            .map_err(to_error)?;
        Ok(WrappedKek::of_kind(wrapped.kind(), current, rewrapped))
    }

    fn destroy_mwk(&self, generation: MwkGeneration) -> Result<(), Error> {
        if generation == self.mwk_generation() {
            return Err(Error::InvalidInput("the current MWK cannot be destroyed"));
        }
        let mut mwks = self.mwks.write().expect("MWK lock poisoned");
        let Some(handle) = mwks.get(&generation).copied() else {
            return Ok(());
        };
        self.pool
            .with(|s| s.destroy_object(handle))
            .map_err(to_error)?;
        mwks.remove(&generation);
        Ok(())
    }

    fn mwk_generations(&self) -> Vec<MwkGeneration> {
        self.mwks
            .read()
            .expect("MWK lock poisoned")
            .keys()
            .copied()
            .collect()
    }
}

impl Pkcs11Hsm {
    /// The error of a decrypt or unwrap of bytes a caller supplied. Some tokens answer input
    /// that fails its check with `CKR_DEVICE_ERROR` or `CKR_FUNCTION_FAILED` (Kryoptic does, for
    /// a failed KWP unwrap or OAEP decode) where PKCS#11 wants `*_INVALID`, which would tell a
    /// client with tampered data that the HSM is down. The canary decides: when the HSM still
    /// decrypts what it encrypted, the input was at fault.
    fn caller_data_error(&self, error: CkError) -> Error {
        let ambiguous = matches!(
            error,
            CkError::Pkcs11(
                RvError::DeviceError | RvError::FunctionFailed,
                Function::Decrypt | Function::UnwrapKey
            )
        );
        let mapped = to_error(error);
        if ambiguous && self.probe().is_ok() {
            Error::Integrity
        } else {
            mapped
        }
    }

    /// The handle of an MWK generation. One newer than any known here is looked for on the
    /// token once: on a shared HSM, another node's master key rotation made it.
    fn mwk(&self, generation: MwkGeneration) -> Result<ObjectHandle, Error> {
        let known = self
            .mwks
            .read()
            .expect("MWK lock poisoned")
            .get(&generation)
            .copied();
        match known {
            Some(handle) => Ok(handle),
            None if generation > self.mwk_generation() => {
                self.refresh_mwks()?;
                self.mwks
                    .read()
                    .expect("MWK lock poisoned")
                    .get(&generation)
                    .copied()
                    .ok_or(Error::UnknownMwk(generation))
            }
            None => Err(Error::UnknownMwk(generation)),
        }
    }

    /// Adopts MWK generations newer than the current one that are on the token: another node
    /// sharing this HSM rotated the master key. The newest becomes current (new KEKs are
    /// wrapped under it) and the canary moves to it, as after [`Hsm::create_mwk`]. A few
    /// `find_objects` on a token that holds only keyfront's handful of keys: cheap, and only
    /// called before a KEK is made and on a blob of an unknown newer generation.
    fn refresh_mwks(&self) -> Result<(), Error> {
        let mut mwks = self.mwks.write().expect("MWK lock poisoned");
        let mut newest = None;
        let mut next = self.mwk_generation().0;
        while next < MAX_MWK_GENERATIONS {
            next += 1;
            let generation = MwkGeneration(next);
            match self.pool.with(|s| find_mwk(s, generation))? {
                Some(handle) => {
                    mwks.insert(generation, handle);
                    newest = Some((generation, handle));
                }
                None => break,
            }
        }
        if let Some((generation, handle)) = newest {
            let canary = Canary::new(&self.pool, self.capabilities.kwp, handle, generation)?;
            *self.canary.write().expect("canary lock poisoned") = Arc::new(canary);
            self.current_mwk.store(generation.0, Ordering::Release);
            tracing::info!(
                generation = generation.0,
                "a newer master wrapping key is on the HSM (rotated by another node); using it"
            );
        }
        Ok(())
    }
}

const CANARY_AAD: &[u8] = b"keyfront/v1/canary";
const CANARY_PLAINTEXT: &[u8] = b"keyfront canary: the HSM decrypts what it encrypted";

/// A KEK made when the instance opened and a value encrypted under it: known good, so a failure
/// to decrypt it means the HSM, not some caller's input, is at fault.
struct Canary {
    kek: WrappedKek,
    iv: [u8; IV_LEN],
    sealed: Vec<u8>,
}

impl Canary {
    fn new(
        pool: &SessionPool,
        kwp: KwpCode,
        mwk: ObjectHandle,
        generation: MwkGeneration,
    ) -> Result<Self, Error> {
        let iv: [u8; IV_LEN] = rand::random();
        pool.with(|s| {
            let kek = s.generate_key(&Mechanism::AesKeyGen, &kek_generate_template())?;
            let mut iv_param = iv;
            let result = s.wrap_key(&kwp.mechanism(), mwk, kek).and_then(|wrapped| {
                // The generated object cannot encrypt (its template forbids it); unwrap the blob
                // as keyfront always does, then encrypt the canary under that.
                let usable =
                    s.unwrap_key(&kwp.mechanism(), mwk, &wrapped, &kek_unwrap_template())?;
                let params = GcmParams::new(&mut iv_param, CANARY_AAD, 128.into())?;
                let sealed = s.encrypt(&Mechanism::AesGcm(params), usable, CANARY_PLAINTEXT);
                s.destroy_object(usable)?;
                Ok((wrapped, sealed?))
            });
            let destroyed = s.destroy_object(kek);
            let (wrapped, sealed) = result?;
            destroyed?;
            Ok(Self {
                kek: WrappedKek::new(generation, wrapped),
                iv,
                sealed,
            })
        })
        .map_err(to_error)
    }
}

/// A KEK unwrapped into the HSM; destroyed when the last user and the cache let go of it.
struct KekObject {
    handle: ObjectHandle,
    pool: Arc<SessionPool>,
}

impl Drop for KekObject {
    fn drop(&mut self) {
        if let Err(error) = self.pool.with(|s| s.destroy_object(self.handle)) {
            // The object dies with its session anyway; a failure here only delays that.
            tracing::warn!(error = %to_error(error), "could not destroy a KEK session object");
        }
    }
}

/// Session pools alive in this process: [`reinitialize`] waits until none is left, because a
/// session closed after `C_Finalize` + `C_Initialize` could close a new session with a reused
/// handle.
static LIVE_POOLS: AtomicUsize = AtomicUsize::new(0);

/// A fixed set of logged-in sessions, checked out by value (a `Session` is `Send` but not
/// `Sync`) and always returned: sessions are never closed while the pool lives. It also holds
/// the anchor session, which keeps the token logged in while every other one is checked out.
struct SessionPool {
    idle: Mutex<Vec<Session>>,
    returned: Condvar,
    _anchor: Mutex<Session>,
}

impl SessionPool {
    fn new(sessions: Vec<Session>, anchor: Session) -> Self {
        LIVE_POOLS.fetch_add(1, Ordering::SeqCst);
        Self {
            idle: Mutex::new(sessions),
            returned: Condvar::new(),
            _anchor: Mutex::new(anchor),
        }
    }

    /// Runs `f` with a session, waiting for one if all are in use.
    fn with<R>(&self, f: impl FnOnce(&Session) -> R) -> R {
        let session = {
            let mut idle = self.idle.lock().expect("session pool lock poisoned");
            loop {
                if let Some(session) = idle.pop() {
                    break session;
                }
                idle = self
                    .returned
                    .wait(idle)
                    .expect("session pool lock poisoned");
            }
        };
        let checkout = Checkout {
            pool: self,
            session: Some(session),
        };
        f(checkout.session())
    }
}

impl Drop for SessionPool {
    fn drop(&mut self) {
        // The sessions themselves close as the fields drop, right after this.
        LIVE_POOLS.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Checkout<'a> {
    pool: &'a SessionPool,
    session: Option<Session>,
}

impl Checkout<'_> {
    fn session(&self) -> &Session {
        // Invariant: `session` is Some from construction until `drop` takes it.
        self.session.as_ref().expect("checked-out session present")
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            self.pool
                .idle
                .lock()
                .expect("session pool lock poisoned")
                .push(session);
            self.pool.returned.notify_one();
        }
    }
}

fn login(session: &Session, pin: &AuthPin) -> Result<(), Error> {
    match session.login(UserType::User, Some(pin)) {
        // Login state is per token per process: every session after the first gets this.
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(error) => Err(to_error(error)),
    }
}

/// The MWK of a generation, found by its CKA_ID (the generation, u32 BE).
fn find_mwk(session: &Session, generation: MwkGeneration) -> Result<Option<ObjectHandle>, Error> {
    let found = session
        .find_objects(&[
            Attribute::Token(true),
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Id(generation.0.to_be_bytes().to_vec()),
        ])
        .map_err(to_error)?;
    match found.as_slice() {
        [] => Ok(None),
        [handle] => Ok(Some(*handle)),
        // Two AES keys with one generation's id: refuse rather than guess which wraps.
        _ => Err(Error::NotInitialized("unique MWK for each generation")),
    }
}

fn find_one(
    session: &Session,
    label: &str,
    class: ObjectClass,
) -> Result<Option<ObjectHandle>, Error> {
    let found = session
        .find_objects(&[
            Attribute::Token(true),
            Attribute::Class(class),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(to_error)?;
    Ok(found.first().copied())
}

/// The one mapping from cryptoki errors to [`Error`].
///
/// Policy:
/// - SoftHSM reports a failed GCM tag check as `CKR_GENERAL_ERROR` from `C_Decrypt`, and a
///   failed KWP integrity check as `CKR_GENERAL_ERROR` from `C_UnwrapKey`, not as
///   `ENCRYPTED_DATA_INVALID` / `WRAPPED_KEY_INVALID`. So from those two functions, those codes
///   all mean [`Error::Integrity`]: bad input, not a broken HSM. Callers still decrypt a canary
///   before calling input "tampered" (ARCHITECTURE.md), because a sick HSM can fail the same way.
/// - PIN failures are [`Error::Pin`] and never retried: HSMs lock a PIN after a few failures.
/// - Codes that mean the device, token, session or library went away (or a handle went stale
///   with it: SoftHSM invalidates every handle when its token directory disappears) are
///   [`Error::Unavailable`]: retry later, recover without a restart.
/// - Everything else is a bug or a misconfigured token: [`Error::Internal`].
pub fn to_error(error: CkError) -> Error {
    let (rv, function) = match error {
        CkError::Pkcs11(rv, function) => (rv, function),
        CkError::LibraryLoading(error) => return Error::Module(error.to_string()),
        _ => {
            return Error::Internal {
                rv: None,
                function: "cryptoki",
            };
        }
    };
    let decrypting = matches!(function, Function::Decrypt | Function::UnwrapKey);
    let name = function_name(function);
    match rv {
        RvError::GeneralError
        | RvError::EncryptedDataInvalid
        | RvError::EncryptedDataLenRange
        | RvError::WrappedKeyInvalid
        | RvError::WrappedKeyLenRange
            if decrypting =>
        {
            Error::Integrity
        }
        RvError::PinIncorrect
        | RvError::PinInvalid
        | RvError::PinLenRange
        | RvError::PinExpired
        | RvError::PinLocked => Error::Pin(rv),
        RvError::GeneralError
        | RvError::DeviceError
        | RvError::DeviceMemory
        | RvError::DeviceRemoved
        | RvError::FunctionFailed
        | RvError::HostMemory
        | RvError::CryptokiNotInitialized
        | RvError::SessionClosed
        | RvError::SessionCount
        | RvError::SessionHandleInvalid
        | RvError::TokenNotPresent
        | RvError::TokenNotRecognized
        | RvError::UserNotLoggedIn
        | RvError::ObjectHandleInvalid
        | RvError::KeyHandleInvalid
        | RvError::UnwrappingKeyHandleInvalid
        | RvError::WrappingKeyHandleInvalid => Error::Unavailable { rv, function: name },
        _ => Error::Internal {
            rv: Some(rv),
            function: name,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bare P-256 point whose X begins with 0x3F once lost two bytes: `[0x04, 0x3F, …]`
    /// read as a DER OCTET STRING of 63 bytes... of a 65-byte point (issue 26). The length
    /// decides now.
    #[test]
    fn ec_points_are_told_apart_by_their_length() {
        let mut point = vec![0x04; P256_POINT_LEN];
        point[1] = 0x3F;
        point[2..]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = i as u8);
        assert_eq!(
            point_from_attribute(&point, P256_POINT_LEN),
            Some(point.clone())
        );
        let mut der = vec![0x04, 0x41];
        der.extend_from_slice(&point);
        assert_eq!(
            point_from_attribute(&der, P256_POINT_LEN),
            Some(point.clone())
        );
        // P-384: 97 bytes, 0x61 in DER.
        let mut long = vec![0x04; P384_POINT_LEN];
        long[1] = 0x5F;
        let mut der = vec![0x04, 0x61];
        der.extend_from_slice(&long);
        assert_eq!(
            point_from_attribute(&long, P384_POINT_LEN),
            Some(long.clone())
        );
        assert_eq!(point_from_attribute(&der, P384_POINT_LEN), Some(long));
        // Neither: a compressed point, a cut one, a P-384 point asked for as P-256.
        assert_eq!(point_from_attribute(&point[..33], P256_POINT_LEN), None);
        assert_eq!(point_from_attribute(&[], P256_POINT_LEN), None);
        assert_eq!(point_from_attribute(&der[..60], P256_POINT_LEN), None);
    }

    #[test]
    fn general_error_means_integrity_only_when_decrypting() {
        assert_eq!(
            to_error(CkError::Pkcs11(RvError::GeneralError, Function::Decrypt)),
            Error::Integrity
        );
        assert_eq!(
            to_error(CkError::Pkcs11(RvError::GeneralError, Function::UnwrapKey)),
            Error::Integrity
        );
        assert!(
            to_error(CkError::Pkcs11(RvError::GeneralError, Function::Encrypt)).is_unavailable()
        );
        assert_eq!(
            to_error(CkError::Pkcs11(RvError::PinIncorrect, Function::Login)),
            Error::Pin(RvError::PinIncorrect)
        );
        assert!(matches!(
            to_error(CkError::Pkcs11(
                RvError::MechanismInvalid,
                Function::EncryptInit
            )),
            Error::Internal { .. }
        ));
    }
}
