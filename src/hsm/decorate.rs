//! One forwarding of the [`Hsm`] trait for every decorator. Metering, fault injection and
//! reconnection differ only in where a call goes and what happens around it, so each
//! implements [`Decorator`] (those two things), and every such type is an [`Hsm`] by the one
//! blanket implementation here. A new `Hsm` method is forwarded here once, not once per
//! decorator.

use super::{
    Error, GcmSealed, HmacKey, Hsm, IV_LEN, ImportTarget, ImportWrapping, Imported, Kek,
    MacAlgorithm, MwkGeneration, SignAlgorithm, WrappedKek,
};
use crate::crypto::Plaintext;

/// A fallible method of [`Hsm`], as decorators see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// [`Hsm::generate_kek`]
    GenerateKek,
    /// [`Hsm::unwrap_kek`]
    UnwrapKek,
    /// [`Hsm::encrypt`]
    Encrypt,
    /// [`Hsm::decrypt`]
    Decrypt,
    /// [`Hsm::generate_mac_key`]
    GenerateMacKey,
    /// [`Hsm::mac`]
    Mac,
    /// [`Hsm::generate_signing_key`]
    GenerateSigningKey,
    /// [`Hsm::sign_digest`]
    SignDigest,
    /// [`Hsm::generate_import_key`]
    GenerateImportKey,
    /// [`Hsm::import_key`]
    ImportKey,
    /// [`Hsm::random`]
    Random,
    /// [`Hsm::hmac`]
    Hmac,
    /// [`Hsm::sign`]
    Sign,
    /// [`Hsm::probe`]
    Probe,
    /// [`Hsm::create_mwk`]
    CreateMwk,
    /// [`Hsm::rewrap_kek`]
    RewrapKek,
    /// [`Hsm::destroy_mwk`]
    DestroyMwk,
}

impl Call {
    /// The method's name (metric labels).
    pub fn name(self) -> &'static str {
        match self {
            Self::GenerateKek => "generate_kek",
            Self::UnwrapKek => "unwrap_kek",
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::GenerateMacKey => "generate_mac_key",
            Self::Mac => "mac",
            Self::GenerateSigningKey => "generate_signing_key",
            Self::SignDigest => "sign_digest",
            Self::GenerateImportKey => "generate_import_key",
            Self::ImportKey => "import_key",
            Self::Random => "random",
            Self::Hmac => "hmac",
            Self::Sign => "sign",
            Self::Probe => "probe",
            Self::CreateMwk => "create_mwk",
            Self::RewrapKek => "rewrap_kek",
            Self::DestroyMwk => "destroy_mwk",
        }
    }
}

/// An HSM in front of another: where calls go, and what happens around the fallible ones.
pub trait Decorator: Send + Sync {
    /// Runs `run` on the HSM behind this one.
    fn forward<R>(&self, run: impl FnOnce(&dyn Hsm) -> R) -> R;

    /// Runs the fallible `call` (`run`); by default it is only forwarded.
    ///
    /// # Errors
    /// Whatever the decorator or the HSM behind it fails with.
    fn around<T>(
        &self,
        call: Call,
        run: impl FnOnce(&dyn Hsm) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let _ = call;
        self.forward(run)
    }
}

impl<D: Decorator> Hsm for D {
    fn mwk_generation(&self) -> MwkGeneration {
        self.forward(|hsm| hsm.mwk_generation())
    }

    fn generate_kek(&self) -> Result<WrappedKek, Error> {
        self.around(Call::GenerateKek, |hsm| hsm.generate_kek())
    }

    fn unwrap_kek(&self, wrapped: &WrappedKek) -> Result<Kek, Error> {
        self.around(Call::UnwrapKek, |hsm| hsm.unwrap_kek(wrapped))
    }

    fn encrypt(&self, kek: &Kek, aad: &[u8], plaintext: &[u8]) -> Result<GcmSealed, Error> {
        self.around(Call::Encrypt, |hsm| hsm.encrypt(kek, aad, plaintext))
    }

    fn decrypt(
        &self,
        kek: &Kek,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Plaintext, Error> {
        self.around(Call::Decrypt, |hsm| hsm.decrypt(kek, iv, aad, sealed))
    }

    fn generate_mac_key(&self, algorithm: MacAlgorithm) -> Result<WrappedKek, Error> {
        self.around(Call::GenerateMacKey, |hsm| hsm.generate_mac_key(algorithm))
    }

    fn mac(&self, key: &Kek, algorithm: MacAlgorithm, data: &[u8]) -> Result<Vec<u8>, Error> {
        self.around(Call::Mac, |hsm| hsm.mac(key, algorithm, data))
    }

    fn generate_signing_key(
        &self,
        algorithm: SignAlgorithm,
    ) -> Result<(WrappedKek, Vec<u8>), Error> {
        self.around(Call::GenerateSigningKey, |hsm| {
            hsm.generate_signing_key(algorithm)
        })
    }

    fn sign_digest(
        &self,
        key: &Kek,
        algorithm: SignAlgorithm,
        digest: &[u8],
    ) -> Result<Vec<u8>, Error> {
        self.around(Call::SignDigest, |hsm| {
            hsm.sign_digest(key, algorithm, digest)
        })
    }

    fn generate_import_key(
        &self,
        wrapping: ImportWrapping,
    ) -> Result<(WrappedKek, Vec<u8>), Error> {
        self.around(Call::GenerateImportKey, |hsm| {
            hsm.generate_import_key(wrapping)
        })
    }

    fn import_key(
        &self,
        import_key: &WrappedKek,
        wrapping: ImportWrapping,
        material: &[u8],
        target: ImportTarget,
    ) -> Result<Imported, Error> {
        self.around(Call::ImportKey, |hsm| {
            hsm.import_key(import_key, wrapping, material, target)
        })
    }

    fn random(&self, out: &mut [u8]) -> Result<(), Error> {
        self.around(Call::Random, |hsm| hsm.random(out))
    }

    fn hmac(&self, key: HmacKey, data: &[u8]) -> Result<[u8; 32], Error> {
        self.around(Call::Hmac, |hsm| hsm.hmac(key, data))
    }

    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, Error> {
        self.around(Call::Sign, |hsm| hsm.sign(data))
    }

    fn audit_public_key(&self) -> Vec<u8> {
        self.forward(|hsm| hsm.audit_public_key())
    }

    fn create_mwk(&self) -> Result<MwkGeneration, Error> {
        self.around(Call::CreateMwk, |hsm| hsm.create_mwk())
    }

    fn rewrap_kek(&self, wrapped: &WrappedKek) -> Result<WrappedKek, Error> {
        self.around(Call::RewrapKek, |hsm| hsm.rewrap_kek(wrapped))
    }

    fn destroy_mwk(&self, generation: MwkGeneration) -> Result<(), Error> {
        self.around(Call::DestroyMwk, |hsm| hsm.destroy_mwk(generation))
    }

    fn mwk_generations(&self) -> Vec<MwkGeneration> {
        self.forward(|hsm| hsm.mwk_generations())
    }

    fn probe(&self) -> Result<(), Error> {
        self.around(Call::Probe, |hsm| hsm.probe())
    }
}
