//! An [`Hsm`] that records every operation's outcome and latency in the metrics.

use std::sync::Arc;
use std::time::Instant;

use super::{
    Error, GcmSealed, HmacKey, Hsm, IV_LEN, ImportTarget, ImportWrapping, Imported, Kek,
    MacAlgorithm, MwkGeneration, SignAlgorithm, WrappedKek,
};
use crate::crypto::Plaintext;

/// Wraps an HSM with metrics.
pub struct MeteredHsm {
    inner: Arc<dyn Hsm>,
}

impl MeteredHsm {
    /// Meters `inner`.
    pub fn new(inner: Arc<dyn Hsm>) -> Self {
        Self { inner }
    }
}

fn timed<T>(op: &'static str, f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    let started = Instant::now();
    let result = f();
    crate::metrics::global().hsm(op, result.is_ok(), started.elapsed());
    result
}

impl Hsm for MeteredHsm {
    fn mwk_generation(&self) -> MwkGeneration {
        self.inner.mwk_generation()
    }

    fn generate_kek(&self) -> Result<WrappedKek, Error> {
        timed("generate_kek", || self.inner.generate_kek())
    }

    fn unwrap_kek(&self, wrapped: &WrappedKek) -> Result<Kek, Error> {
        timed("unwrap_kek", || self.inner.unwrap_kek(wrapped))
    }

    fn encrypt(&self, kek: &Kek, aad: &[u8], plaintext: &[u8]) -> Result<GcmSealed, Error> {
        timed("encrypt", || self.inner.encrypt(kek, aad, plaintext))
    }

    fn decrypt(
        &self,
        kek: &Kek,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Plaintext, Error> {
        timed("decrypt", || self.inner.decrypt(kek, iv, aad, sealed))
    }

    fn generate_mac_key(&self, algorithm: MacAlgorithm) -> Result<WrappedKek, Error> {
        timed("generate_mac_key", || {
            self.inner.generate_mac_key(algorithm)
        })
    }

    fn mac(&self, key: &Kek, algorithm: MacAlgorithm, data: &[u8]) -> Result<Vec<u8>, Error> {
        timed("mac", || self.inner.mac(key, algorithm, data))
    }

    fn generate_signing_key(
        &self,
        algorithm: SignAlgorithm,
    ) -> Result<(WrappedKek, Vec<u8>), Error> {
        timed("generate_signing_key", || {
            self.inner.generate_signing_key(algorithm)
        })
    }

    fn sign_digest(
        &self,
        key: &Kek,
        algorithm: SignAlgorithm,
        digest: &[u8],
    ) -> Result<Vec<u8>, Error> {
        timed("sign_digest", || {
            self.inner.sign_digest(key, algorithm, digest)
        })
    }

    fn generate_import_key(
        &self,
        wrapping: ImportWrapping,
    ) -> Result<(WrappedKek, Vec<u8>), Error> {
        timed("generate_import_key", || {
            self.inner.generate_import_key(wrapping)
        })
    }

    fn import_key(
        &self,
        import_key: &WrappedKek,
        wrapping: ImportWrapping,
        material: &[u8],
        target: ImportTarget,
    ) -> Result<Imported, Error> {
        timed("import_key", || {
            self.inner
                .import_key(import_key, wrapping, material, target)
        })
    }

    fn random(&self, out: &mut [u8]) -> Result<(), Error> {
        timed("random", || self.inner.random(out))
    }

    fn hmac(&self, key: HmacKey, data: &[u8]) -> Result<[u8; 32], Error> {
        timed("hmac", || self.inner.hmac(key, data))
    }

    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, Error> {
        timed("sign", || self.inner.sign(data))
    }

    fn audit_public_key(&self) -> Vec<u8> {
        self.inner.audit_public_key()
    }

    fn probe(&self) -> Result<(), Error> {
        timed("probe", || self.inner.probe())
    }

    fn create_mwk(&self) -> Result<MwkGeneration, Error> {
        timed("create_mwk", || self.inner.create_mwk())
    }

    fn rewrap_kek(&self, wrapped: &WrappedKek) -> Result<WrappedKek, Error> {
        timed("rewrap_kek", || self.inner.rewrap_kek(wrapped))
    }

    fn destroy_mwk(&self, generation: MwkGeneration) -> Result<(), Error> {
        timed("destroy_mwk", || self.inner.destroy_mwk(generation))
    }

    fn mwk_generations(&self) -> Vec<MwkGeneration> {
        self.inner.mwk_generations()
    }
}
