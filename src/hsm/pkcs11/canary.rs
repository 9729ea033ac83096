//! The canary: a blob the token encrypted at open. While it still decrypts, a failed decrypt
//! of a caller's data is the data's fault, not the HSM's.

use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::ObjectHandle;

use super::mechanisms::KwpCode;
use super::{Error, IV_LEN, MwkGeneration, WrappedKek};
use super::{SessionPool, kek_generate_template, kek_unwrap_template, to_error};

pub(super) const CANARY_AAD: &[u8] = b"keyfront/v1/canary";

pub(super) const CANARY_PLAINTEXT: &[u8] = b"keyfront canary: the HSM decrypts what it encrypted";

/// A KEK made when the instance opened and a value encrypted under it: known good, so a failure
/// to decrypt it means the HSM, not some caller's input, is at fault.
pub(super) struct Canary {
    pub(super) kek: WrappedKek,
    pub(super) iv: [u8; IV_LEN],
    pub(super) sealed: Vec<u8>,
}

impl Canary {
    pub(super) fn new(
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
