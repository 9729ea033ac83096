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

/// What a key may be used for (each a `CKA_*` flag that defaults to false here).
#[derive(Clone, Copy)]
enum Usage {
    Encrypt,
    Decrypt,
    Wrap,
    Unwrap,
    Sign,
    Verify,
}

/// An attribute template built from safe defaults: a session object, private, sensitive, not
/// extractable, allowed no usage and no derivation; each template states only what differs.
struct Template(Vec<Attribute>);

impl Template {
    /// A secret key of `key_type`; every usage flag starts false.
    fn secret(key_type: KeyType) -> Self {
        Self(vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(key_type),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
        ])
    }

    /// A private key of `key_type`; its usage flags (sign, decrypt, unwrap) start false.
    fn private(key_type: KeyType) -> Self {
        Self(vec![
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(key_type),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(false),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
        ])
    }

    /// A public key (of a pair being generated); its usage flags (verify, encrypt, wrap)
    /// start false.
    fn public() -> Self {
        Self(vec![
            Attribute::Token(false),
            Attribute::Verify(false),
            Attribute::Encrypt(false),
            Attribute::Wrap(false),
        ])
    }

    /// Sets `attribute`, replacing one of its type if there is one.
    fn set(mut self, attribute: Attribute) -> Self {
        let kind = attribute.attribute_type();
        match self.0.iter().position(|a| a.attribute_type() == kind) {
            Some(index) => self.0[index] = attribute,
            None => self.0.push(attribute),
        }
        self
    }

    /// Allows `usages`.
    fn allow(self, usages: &[Usage]) -> Self {
        usages.iter().fold(self, |template, usage| {
            template.set(match usage {
                Usage::Encrypt => Attribute::Encrypt(true),
                Usage::Decrypt => Attribute::Decrypt(true),
                Usage::Wrap => Attribute::Wrap(true),
                Usage::Unwrap => Attribute::Unwrap(true),
                Usage::Sign => Attribute::Sign(true),
                Usage::Verify => Attribute::Verify(true),
            })
        })
    }

    fn extractable(self, extractable: bool) -> Self {
        self.set(Attribute::Extractable(extractable))
    }

    fn value_len(self, bytes: u64) -> Self {
        self.set(Attribute::ValueLen(bytes.into()))
    }

    fn mechanisms(self, mechanisms: Vec<MechanismType>) -> Self {
        self.set(Attribute::AllowedMechanisms(mechanisms))
    }

    /// A token object of the ceremony: kept on the token, never modified or copied, found
    /// by its label and id.
    fn token_object(self, label: Vec<u8>, id: Vec<u8>) -> Self {
        self.set(Attribute::Token(true))
            .set(Attribute::Modifiable(false))
            .set(Attribute::Copyable(false))
            .set(Attribute::Label(label))
            .set(Attribute::Id(id))
    }

    fn build(self) -> Vec<Attribute> {
        self.0
    }
}

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
    let public_template = public
        .into_iter()
        .fold(Template::public().allow(&[Usage::Verify]), Template::set)
        .build();
    let private_template = Template::private(key_type)
        .extractable(true)
        .allow(&[Usage::Sign])
        .build();
    (mechanism, public_template, private_template)
}

/// How a signing key exists while in use: a sensitive, non-extractable session object that
/// can only sign with its one mechanism (`extractable` only to re-wrap it under a new MWK).
pub(super) fn private_key_template(kind: WrappedKind, extractable: bool) -> Vec<Attribute> {
    let (key_type, mechanism) = match kind {
        WrappedKind::RsaPrivateKey => (KeyType::RSA, MechanismType::RSA_PKCS_PSS),
        _ => (KeyType::EC, MechanismType::ECDSA),
    };
    let template = Template::private(key_type)
        .extractable(extractable)
        .mechanisms(vec![mechanism]);
    if extractable {
        template.build()
    } else {
        template.allow(&[Usage::Sign]).build()
    }
}

/// The key pair templates of an import key: RSA-3072, the private key a sensitive session
/// object that can only unwrap with RSA-OAEP ([`import_private_template`]), extractable only so
/// that it can be wrapped under the MWK right after (and destroyed).
pub(super) fn import_key_templates() -> (Vec<Attribute>, Vec<Attribute>) {
    let public = Template::public()
        .allow(&[Usage::Encrypt])
        .set(Attribute::ModulusBits((IMPORT_KEY_BITS as u64).into()))
        .set(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]))
        .build();
    (public, import_private_template(true))
}

/// An import key's private key: sensitive, RSA-OAEP unwrapping only; `extractable` only while
/// it is made, to be wrapped under the MWK. In use it is not.
pub(super) fn import_private_template(extractable: bool) -> Vec<Attribute> {
    Template::private(KeyType::RSA)
        .extractable(extractable)
        .allow(&[Usage::Unwrap])
        .mechanisms(vec![MechanismType::RSA_PKCS_OAEP])
        .build()
}

/// The ephemeral AES key of RSA-AES key wrap: a session object that can only unwrap with KWP.
pub(super) fn ephemeral_key_template(kwp: KwpCode) -> Vec<Attribute> {
    Template::secret(KeyType::AES)
        .allow(&[Usage::Unwrap])
        .mechanisms(vec![kwp.mechanism_type()])
        .build()
}

/// The MWK: a token AES-256 key that can only wrap and unwrap with AES-KWP and never leaves
/// the token (ARCHITECTURE.md, key hierarchy).
pub(super) fn mwk_template(generation: MwkGeneration, kwp: KwpCode) -> Vec<Attribute> {
    Template::secret(KeyType::AES)
        .value_len(32)
        .allow(&[Usage::Wrap, Usage::Unwrap])
        .mechanisms(vec![kwp.mechanism_type()])
        .token_object(
            mwk_label(generation).into_bytes(),
            generation.0.to_be_bytes().to_vec(),
        )
        .build()
}

/// A ceremony HMAC key (storage root, pepper, lookup): a 32-byte token secret that can only
/// HMAC-SHA-256, found by its label.
pub(super) fn hmac_key_template(label: &str) -> Vec<Attribute> {
    Template::secret(KeyType::GENERIC_SECRET)
        .value_len(32)
        .allow(&[Usage::Sign, Usage::Verify])
        .mechanisms(vec![MechanismType::SHA256_HMAC])
        .token_object(label.as_bytes().to_vec(), label.as_bytes().to_vec())
        .build()
}

/// A new KEK as a session object. It must be extractable for the one `C_WrapKey` under the
/// MWK that follows; the object is destroyed right after, and only ever comes back through
/// [`kek_unwrap_template`], which is not extractable.
pub(super) fn kek_generate_template() -> Vec<Attribute> {
    Template::secret(KeyType::AES)
        .value_len(32)
        .extractable(true)
        .build()
}

/// How a KEK exists while in use: a sensitive, non-extractable session object that can only
/// do AES-GCM encrypt and decrypt.
pub fn kek_unwrap_template() -> Vec<Attribute> {
    Template::secret(KeyType::AES)
        .allow(&[Usage::Encrypt, Usage::Decrypt])
        .mechanisms(vec![MechanismType::AES_GCM])
        .build()
}

/// A KEK while it is re-wrapped under a new MWK: the generation template (sensitive,
/// extractable only by wrapping, usable for nothing else) without the length, which an unwrap
/// takes from the blob.
pub(super) fn kek_rewrap_template() -> Vec<Attribute> {
    Template::secret(KeyType::AES).extractable(true).build()
}

/// A new MAC key as a session object: like a new KEK, extractable only for the one
/// `C_WrapKey` under the MWK that follows, usable for nothing, destroyed right after.
pub(super) fn mac_key_generate_template(algorithm: MacAlgorithm) -> Vec<Attribute> {
    Template::secret(KeyType::GENERIC_SECRET)
        .extractable(true)
        .value_len(algorithm.key_len() as u64)
        .build()
}

/// A MAC key while it is re-wrapped under a new MWK (the length comes from the blob).
pub(super) fn mac_key_rewrap_template() -> Vec<Attribute> {
    Template::secret(KeyType::GENERIC_SECRET)
        .extractable(true)
        .build()
}

/// How a MAC key exists while in use: a sensitive, non-extractable session object that can
/// only compute HMACs.
pub(super) fn mac_key_unwrap_template() -> Vec<Attribute> {
    Template::secret(KeyType::GENERIC_SECRET)
        .allow(&[Usage::Sign, Usage::Verify])
        .mechanisms(vec![MechanismType::SHA256_HMAC, MechanismType::SHA512_HMAC])
        .build()
}

/// The label of an MWK generation.
pub fn mwk_label(generation: MwkGeneration) -> String {
    format!("{MWK_LABEL_PREFIX}{}", generation.0)
}
