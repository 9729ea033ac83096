//! What a token can do, decided from what it says: which code names RFC 5649 key wrap on it,
//! whether every mechanism keyfront uses is there, and whether the master keys already on it
//! allow the wrap mechanism chosen.
//!
//! Tokens disagree on names, not on algorithms. RFC 5649 (AES key wrap with padding, "KWP")
//! is `CKM_AES_KEY_WRAP_KWP` (0x210B) in PKCS#11 3.0 and `CKM_AES_KEY_WRAP_PAD` (0x210A) in
//! SoftHSM 2.6, which took the code before 3.0 named it; the bytes are the same under both, so
//! blobs move between tokens. keyfront uses the standard code where the token offers it and
//! SoftHSM's otherwise, and a token initialised before this choice existed keeps the code its
//! master key allows (docs/DESIGN.md, "Any PKCS#11 token").

use cryptoki::context::Pkcs11;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;

use super::to_error;
use crate::hsm::Error;

/// The PKCS#11 code under which the token does RFC 5649 key wrap with padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KwpCode {
    /// `CKM_AES_KEY_WRAP_KWP` (0x210B): PKCS#11 3.0 (Kryoptic, and most HSMs that list it).
    Kwp,
    /// `CKM_AES_KEY_WRAP_PAD` (0x210A): the pre-3.0 code SoftHSM 2.6 uses for RFC 5649.
    Pad,
}

impl KwpCode {
    /// Both codes, the standard one first (the preference for a new ceremony).
    const ALL: [Self; 2] = [Self::Kwp, Self::Pad];

    /// The mechanism, which takes no parameter under either code.
    pub fn mechanism(self) -> Mechanism<'static> {
        match self {
            Self::Kwp => Mechanism::AesKeyWrapKwp,
            Self::Pad => Mechanism::AesKeyWrapPad,
        }
    }

    /// The mechanism type, for `CKA_ALLOWED_MECHANISMS`.
    pub fn mechanism_type(self) -> MechanismType {
        match self {
            Self::Kwp => MechanismType::AES_KEY_WRAP_KWP,
            Self::Pad => MechanismType::AES_KEY_WRAP_PAD,
        }
    }

    /// The PKCS#11 name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kwp => "CKM_AES_KEY_WRAP_KWP",
            Self::Pad => "CKM_AES_KEY_WRAP_PAD",
        }
    }
}

/// Mechanisms every keyfront feature needs, with their PKCS#11 names for the message that
/// says which are missing. RFC 5649 wrap is checked apart (either code does).
const REQUIRED: [(MechanismType, &str); 10] = [
    (MechanismType::AES_KEY_GEN, "CKM_AES_KEY_GEN"),
    (MechanismType::AES_GCM, "CKM_AES_GCM"),
    (
        MechanismType::GENERIC_SECRET_KEY_GEN,
        "CKM_GENERIC_SECRET_KEY_GEN",
    ),
    (MechanismType::SHA256_HMAC, "CKM_SHA256_HMAC"),
    (MechanismType::SHA512_HMAC, "CKM_SHA512_HMAC"),
    (MechanismType::ECC_KEY_PAIR_GEN, "CKM_EC_KEY_PAIR_GEN"),
    (MechanismType::ECDSA, "CKM_ECDSA"),
    (
        MechanismType::RSA_PKCS_KEY_PAIR_GEN,
        "CKM_RSA_PKCS_KEY_PAIR_GEN",
    ),
    (MechanismType::RSA_PKCS_PSS, "CKM_RSA_PKCS_PSS"),
    (MechanismType::RSA_PKCS_OAEP, "CKM_RSA_PKCS_OAEP"),
];

/// What keyfront found out about a token when it opened it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// The code of RFC 5649 key wrap on this token.
    pub kwp: KwpCode,
    /// Whether the token offers `CKM_AES_KEY_WRAP` (RFC 3394), with which an imported secret
    /// whose token does not report its length is measured (docs/DESIGN.md, key import).
    pub aes_key_wrap: bool,
}

/// The token's mechanisms, checked against what keyfront needs; one error naming everything
/// missing. `allowed` are the RFC 5649 codes the token's master keys allow (none: a new
/// token, or master keys without a restriction).
///
/// # Errors
/// [`Error::Unsuitable`] naming the missing mechanisms, or the code the master keys allow
/// that this token does not offer; PKCS#11 errors of `C_GetMechanismInfo`.
pub(super) fn discover(
    ctx: &Pkcs11,
    slot: Slot,
    allowed: &[KwpCode],
) -> Result<Capabilities, Error> {
    // Asked one by one rather than through C_GetMechanismList: cryptoki logs an ERROR for
    // every vendor or newer code in the list that it has no name for (SoftHSM offers a
    // dozen), which operators would read as a fault.
    let info = |mechanism: MechanismType| match ctx.get_mechanism_info(slot, mechanism) {
        Ok(info) => Ok(Some(info)),
        Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::MechanismInvalid, _)) => {
            Ok(None)
        }
        Err(error) => Err(to_error(error)),
    };
    let mut missing = Vec::new();
    for (mechanism, name) in REQUIRED {
        if info(mechanism)?.is_none() {
            missing.push(name.to_owned());
        }
    }
    let mut usable = Vec::new();
    for code in KwpCode::ALL {
        if info(code.mechanism_type())?.is_some_and(|info| info.wrap() && info.unwrap()) {
            usable.push(code);
        }
    }
    let kwp = choose_kwp(&usable, allowed)?;
    if kwp.is_none() {
        missing.push("CKM_AES_KEY_WRAP_KWP (or CKM_AES_KEY_WRAP_PAD) for wrapping".into());
    }
    match kwp {
        Some(kwp) if missing.is_empty() => Ok(Capabilities {
            kwp,
            aes_key_wrap: info(MechanismType::AES_KEY_WRAP)?.is_some(),
        }),
        _ => Err(Error::Unsuitable(format!(
            "it lacks mechanisms keyfront needs: {}",
            missing.join(", ")
        ))),
    }
}

/// The RFC 5649 code to wrap with, from the codes the token offers for wrap and unwrap
/// (`usable`, in order of preference) and those its master keys allow (`allowed`; empty: no
/// restriction). `None` when the token offers neither.
///
/// # Errors
/// [`Error::Unsuitable`] when the master keys allow only codes the token does not offer: keys
/// made on another token or by another implementation.
fn choose_kwp(usable: &[KwpCode], allowed: &[KwpCode]) -> Result<Option<KwpCode>, Error> {
    let Some(first) = usable.first() else {
        return Ok(None);
    };
    if allowed.is_empty() {
        return Ok(Some(*first));
    }
    match usable.iter().find(|code| allowed.contains(code)) {
        Some(code) => Ok(Some(*code)),
        None => {
            let allowed: Vec<&str> = allowed.iter().map(|c| c.name()).collect();
            Err(Error::Unsuitable(format!(
                "its master wrapping key allows only {}, which this token does not offer for \
                 wrapping (it offers {}); the key was made on another token or by another \
                 implementation: see docs/OPERATIONS.md, \"Moving to another HSM\"",
                allowed.join(", "),
                first.name()
            )))
        }
    }
}

/// The RFC 5649 codes a master key's `CKA_ALLOWED_MECHANISMS` names (empty: no restriction,
/// or a token that does not keep the attribute).
///
/// # Errors
/// PKCS#11 errors other than the attribute being absent.
pub(super) fn allowed_kwp(session: &Session, key: ObjectHandle) -> Result<Vec<KwpCode>, Error> {
    let attributes = match session.get_attributes(key, &[AttributeType::AllowedMechanisms]) {
        Ok(attributes) => attributes,
        // Some tokens do not keep the attribute at all.
        Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::AttributeTypeInvalid, _)) => {
            return Ok(Vec::new());
        }
        Err(error) => return Err(to_error(error)),
    };
    Ok(attributes
        .into_iter()
        .find_map(|a| match a {
            Attribute::AllowedMechanisms(list) => Some(list),
            _ => None,
        })
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| KwpCode::ALL.into_iter().find(|c| c.mechanism_type() == m))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_takes_the_standard_code_where_it_is_offered() {
        assert_eq!(
            choose_kwp(&KwpCode::ALL, &[]).ok(),
            Some(Some(KwpCode::Kwp))
        );
        assert_eq!(
            choose_kwp(&[KwpCode::Pad], &[]).ok(),
            Some(Some(KwpCode::Pad))
        );
        assert_eq!(choose_kwp(&[], &[]).ok(), Some(None));
    }

    /// A token initialised by keyfront before issue 26 allows only SoftHSM's code: it keeps
    /// that code even where the token offers both.
    #[test]
    fn master_keys_keep_the_code_they_allow() {
        assert_eq!(
            choose_kwp(&KwpCode::ALL, &[KwpCode::Pad]).ok(),
            Some(Some(KwpCode::Pad))
        );
        assert_eq!(
            choose_kwp(&KwpCode::ALL, &[KwpCode::Kwp, KwpCode::Pad]).ok(),
            Some(Some(KwpCode::Kwp))
        );
    }

    /// A master key made where only SoftHSM's code existed, on a token that offers only the
    /// standard one: one line that says so and where to read on.
    #[test]
    fn a_code_the_token_does_not_offer_is_refused_with_a_clear_message() {
        let Err(Error::Unsuitable(message)) = choose_kwp(&[KwpCode::Kwp], &[KwpCode::Pad]) else {
            panic!("refused");
        };
        assert!(
            message.contains("allows only CKM_AES_KEY_WRAP_PAD")
                && message.contains("it offers CKM_AES_KEY_WRAP_KWP")
                && message.contains("Moving to another HSM"),
            "{message}"
        );
        assert!(!message.contains('\n'), "one line: {message}");
    }
}
