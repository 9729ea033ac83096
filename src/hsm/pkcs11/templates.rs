//! The attribute templates of every object keyfront makes or unwraps: private, sensitive and
//! non-extractable unless said otherwise, session objects except the ceremony's keys, each
//! allowed only its mechanisms.

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, KeyType, ObjectClass};

use super::MWK_LABEL_PREFIX;
use super::mechanisms::KwpCode;
use super::{IMPORT_KEY_BITS, MacAlgorithm, MwkGeneration, SignAlgorithm, WrappedKind};

/// DER of the P-256 curve OID (1.2.840.10045.3.1.7), for CKA_EC_PARAMS.
pub(super) const P256_OID_DER: [u8; 10] =
    [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];

/// DER of the OID secp384r1 (1.3.132.0.34), the CKA_EC_PARAMS of a P-384 key.
pub(super) const P384_OID_DER: [u8; 7] = [0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22];

/// The key pair templates of a signing key. The private key is a session object, sensitive,
/// extractable only so that it can be wrapped under the MWK right after (and destroyed).
pub(super) fn signing_key_templates(
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
pub(super) fn private_key_template(kind: WrappedKind, extractable: bool) -> Vec<Attribute> {
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
pub(super) fn import_key_templates() -> (Vec<Attribute>, Vec<Attribute>) {
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
pub(super) fn import_private_template(extractable: bool) -> Vec<Attribute> {
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
pub(super) fn ephemeral_key_template(kwp: KwpCode) -> Vec<Attribute> {
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

/// The MWK: a token AES-256 key that can only wrap and unwrap with AES-KWP and never leaves
/// the token (ARCHITECTURE.md, key hierarchy).
pub(super) fn mwk_template(generation: MwkGeneration, kwp: KwpCode) -> Vec<Attribute> {
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

pub(super) fn hmac_key_template(label: &str) -> Vec<Attribute> {
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
pub(super) fn kek_generate_template() -> Vec<Attribute> {
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
pub(super) fn kek_rewrap_template() -> Vec<Attribute> {
    kek_generate_template()
        .into_iter()
        .filter(|a| !matches!(a, Attribute::ValueLen(_)))
        .collect()
}

/// A new MAC key as a session object: like a new KEK, extractable only for the one
/// `C_WrapKey` under the MWK that follows, usable for nothing, destroyed right after.
pub(super) fn mac_key_generate_template(algorithm: MacAlgorithm) -> Vec<Attribute> {
    let mut template = mac_key_rewrap_template();
    template.push(Attribute::ValueLen((algorithm.key_len() as u64).into()));
    template
}

/// A MAC key while it is re-wrapped under a new MWK (the length comes from the blob).
pub(super) fn mac_key_rewrap_template() -> Vec<Attribute> {
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
pub(super) fn mac_key_unwrap_template() -> Vec<Attribute> {
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
