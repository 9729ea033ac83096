//! Public keys read out of the token: EC points (DER or bare, told apart by the curve's
//! length) and RSA moduli, as SubjectPublicKeyInfo DER.

use cryptoki::error::Error as CkError;
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;

use super::to_error;
use super::{Error, SignAlgorithm, signing};

/// Length of an uncompressed P-256 point (0x04, X, Y).
pub(super) const P256_POINT_LEN: usize = 65;

/// Length of an uncompressed P-384 point.
pub(super) const P384_POINT_LEN: usize = 97;

/// The public key's point as SEC1 uncompressed bytes (`len` of them for its curve). PKCS#11
/// v2.40 stores CKA_EC_POINT as a DER OCTET STRING around them (SoftHSM does); some tokens
/// store the bare point. Which it is follows from the length, not from the first bytes: a
/// bare point whose X begins with the byte that equals its length would look like DER.
pub(super) fn ec_point(
    session: &Session,
    public: ObjectHandle,
    len: usize,
) -> Result<Vec<u8>, Error> {
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
pub(super) fn point_from_attribute(attribute: &[u8], len: usize) -> Option<Vec<u8>> {
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
pub(super) fn public_spki(
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
pub(super) fn rsa_public_spki(
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
}
