//! Key import on the token: RSA-OAEP parameters, whether the token unwraps OAEP with SHA-256
//! (probed once), and the length of unwrapped material where the token does not report it.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use sha2::Sha256;

use super::ImportWrapping;
use super::mechanisms::KwpCode;
use super::{ephemeral_key_template, to_error};

/// Whether the token unwraps RSA-OAEP with SHA-256 under `private` (whose public key is
/// `spki`): a random 32-byte secret is wrapped to it in software and unwrapped in the token
/// into a session object, destroyed at once. A refusal of the parameters is "no"; any other
/// failure is an error.
pub(super) fn unwraps_oaep_sha256(
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

/// RSA-OAEP parameters of `wrapping`: its hash, MGF1 with the same hash, no label.
pub(super) fn oaep_params(
    wrapping: ImportWrapping,
) -> cryptoki::mechanism::rsa::PkcsOaepParams<'static> {
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
pub(super) fn oaep_refused(error: &CkError) -> bool {
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
pub(super) fn secret_len(
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
pub(super) fn value_len(session: &Session, key: ObjectHandle) -> Result<usize, CkError> {
    Ok(session
        .get_attributes(key, &[AttributeType::ValueLen])?
        .into_iter()
        .find_map(|a| match a {
            Attribute::ValueLen(len) => usize::try_from(u64::from(len)).ok(),
            _ => None,
        })
        .unwrap_or(0))
}
