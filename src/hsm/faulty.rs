//! A fault-injecting, call-counting wrapper around any [`Hsm`], for tests.
//!
//! It lets tests prove that a request was refused *before* any HSM call (the counters stay at
//! zero) and drive the outage paths (every call fails as if the device were removed).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use cryptoki::error::RvError;

use super::{
    Error, GcmSealed, HmacKey, Hsm, IV_LEN, ImportTarget, ImportWrapping, Imported, Kek,
    MacAlgorithm, MwkGeneration, SignAlgorithm, WrappedKek,
};
use crate::crypto::Plaintext;

/// The operations of the [`Hsm`] trait that cost an HSM call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// [`Hsm::generate_kek`]
    GenerateKek,
    /// [`Hsm::unwrap_kek`]
    UnwrapKek,
    /// [`Hsm::encrypt`]
    Encrypt,
    /// [`Hsm::decrypt`]
    Decrypt,
    /// [`Hsm::random`]
    Random,
    /// [`Hsm::hmac`]
    Hmac,
    /// [`Hsm::sign`]
    Sign,
    /// [`Hsm::probe`]
    Probe,
    /// [`Hsm::generate_mac_key`]
    GenerateMacKey,
    /// [`Hsm::mac`]
    Mac,
    /// [`Hsm::generate_signing_key`]
    GenerateSigningKey,
    /// [`Hsm::sign_digest`]
    SignDigest,
    /// [`Hsm::generate_import_key`].
    GenerateImportKey,
    /// [`Hsm::import_key`].
    ImportKey,
}

// One counter per operation: the last variant's index plus one.
const OPS: usize = Op::ImportKey as usize + 1;

/// Wraps an [`Hsm`], counting calls per operation and failing them on request.
pub struct FaultyHsm<H> {
    inner: H,
    calls: [AtomicU64; OPS],
    down: AtomicBool,
    delay_ms: AtomicU64,
    queued: Mutex<Vec<(Op, Error)>>,
}

impl<H: Hsm> FaultyHsm<H> {
    /// Wraps `inner`; nothing fails until asked.
    pub fn new(inner: H) -> Self {
        Self {
            inner,
            calls: Default::default(),
            down: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            queued: Mutex::new(Vec::new()),
        }
    }

    /// The wrapped HSM.
    pub fn inner(&self) -> &H {
        &self.inner
    }

    /// Calls of `op` so far (failed ones included).
    pub fn calls(&self, op: Op) -> u64 {
        self.calls[op as usize].load(Ordering::SeqCst)
    }

    /// Calls of every operation so far.
    pub fn total_calls(&self) -> u64 {
        self.calls.iter().map(|c| c.load(Ordering::SeqCst)).sum()
    }

    /// While `true`, every call fails with [`Error::Unavailable`] (`DeviceRemoved`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Every call first sleeps this long (a slow HSM), for deadline and load tests.
    pub fn set_delay(&self, delay: std::time::Duration) {
        let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(millis, Ordering::SeqCst);
    }

    /// The next call of `op` fails with `error`.
    pub fn fail_next(&self, op: Op, error: Error) {
        self.queued
            .lock()
            .expect("fault queue lock poisoned")
            .push((op, error));
    }

    fn enter(&self, op: Op) -> Result<(), Error> {
        self.calls[op as usize].fetch_add(1, Ordering::SeqCst);
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 && op != Op::Probe {
            std::thread::sleep(std::time::Duration::from_millis(delay));
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::Unavailable {
                rv: RvError::DeviceRemoved,
                function: "injected",
            });
        }
        let mut queued = self.queued.lock().expect("fault queue lock poisoned");
        match queued.iter().position(|(queued_op, _)| *queued_op == op) {
            Some(index) => Err(queued.remove(index).1),
            None => Ok(()),
        }
    }
}

impl<H: Hsm> Hsm for FaultyHsm<H> {
    fn mwk_generation(&self) -> MwkGeneration {
        self.inner.mwk_generation()
    }

    fn generate_kek(&self) -> Result<WrappedKek, Error> {
        self.enter(Op::GenerateKek)?;
        self.inner.generate_kek()
    }

    fn unwrap_kek(&self, wrapped: &WrappedKek) -> Result<Kek, Error> {
        self.enter(Op::UnwrapKek)?;
        self.inner.unwrap_kek(wrapped)
    }

    fn encrypt(&self, kek: &Kek, aad: &[u8], plaintext: &[u8]) -> Result<GcmSealed, Error> {
        self.enter(Op::Encrypt)?;
        self.inner.encrypt(kek, aad, plaintext)
    }

    fn decrypt(
        &self,
        kek: &Kek,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Plaintext, Error> {
        self.enter(Op::Decrypt)?;
        self.inner.decrypt(kek, iv, aad, sealed)
    }

    fn generate_mac_key(&self, algorithm: MacAlgorithm) -> Result<WrappedKek, Error> {
        self.enter(Op::GenerateMacKey)?;
        self.inner.generate_mac_key(algorithm)
    }

    fn mac(&self, key: &Kek, algorithm: MacAlgorithm, data: &[u8]) -> Result<Vec<u8>, Error> {
        self.enter(Op::Mac)?;
        self.inner.mac(key, algorithm, data)
    }

    fn generate_signing_key(
        &self,
        algorithm: SignAlgorithm,
    ) -> Result<(WrappedKek, Vec<u8>), Error> {
        self.enter(Op::GenerateSigningKey)?;
        self.inner.generate_signing_key(algorithm)
    }

    fn sign_digest(
        &self,
        key: &Kek,
        algorithm: SignAlgorithm,
        digest: &[u8],
    ) -> Result<Vec<u8>, Error> {
        self.enter(Op::SignDigest)?;
        self.inner.sign_digest(key, algorithm, digest)
    }

    fn generate_import_key(
        &self,
        wrapping: ImportWrapping,
    ) -> Result<(WrappedKek, Vec<u8>), Error> {
        self.enter(Op::GenerateImportKey)?;
        self.inner.generate_import_key(wrapping)
    }

    fn import_key(
        &self,
        import_key: &WrappedKek,
        wrapping: ImportWrapping,
        material: &[u8],
        target: ImportTarget,
    ) -> Result<Imported, Error> {
        self.enter(Op::ImportKey)?;
        self.inner
            .import_key(import_key, wrapping, material, target)
    }

    fn random(&self, out: &mut [u8]) -> Result<(), Error> {
        self.enter(Op::Random)?;
        self.inner.random(out)
    }

    fn hmac(&self, key: HmacKey, data: &[u8]) -> Result<[u8; 32], Error> {
        self.enter(Op::Hmac)?;
        self.inner.hmac(key, data)
    }

    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, Error> {
        self.enter(Op::Sign)?;
        self.inner.sign(data)
    }

    fn audit_public_key(&self) -> Vec<u8> {
        self.inner.audit_public_key()
    }

    fn probe(&self) -> Result<(), Error> {
        self.enter(Op::Probe)?;
        self.inner.probe()
    }

    fn create_mwk(&self) -> Result<MwkGeneration, Error> {
        self.enter(Op::GenerateKek)?;
        self.inner.create_mwk()
    }

    fn rewrap_kek(&self, wrapped: &WrappedKek) -> Result<WrappedKek, Error> {
        self.enter(Op::UnwrapKek)?;
        self.inner.rewrap_kek(wrapped)
    }

    fn destroy_mwk(&self, generation: MwkGeneration) -> Result<(), Error> {
        self.inner.destroy_mwk(generation)
    }

    fn mwk_generations(&self) -> Vec<MwkGeneration> {
        self.inner.mwk_generations()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::memory::MemoryHsm;

    #[test]
    fn counts_calls_and_injects_failures() {
        let hsm = FaultyHsm::new(MemoryHsm::new());
        let kek = hsm.generate_kek().expect("generates");
        hsm.fail_next(Op::UnwrapKek, Error::Integrity);
        assert_eq!(hsm.unwrap_kek(&kek).err(), Some(Error::Integrity));
        assert!(hsm.unwrap_kek(&kek).is_ok());
        hsm.set_down(true);
        assert!(
            hsm.random(&mut [0; 4])
                .err()
                .is_some_and(|e| e.is_unavailable())
        );
        hsm.set_down(false);
        assert_eq!(hsm.calls(Op::UnwrapKek), 2);
        assert_eq!(hsm.total_calls(), 4);
    }
}
