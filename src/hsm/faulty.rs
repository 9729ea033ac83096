//! A fault-injecting, call-counting wrapper around any [`Hsm`], for tests.
//!
//! It lets tests prove that a request was refused *before* any HSM call (the counters stay at
//! zero) and drive the outage paths (every call fails as if the device were removed).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use cryptoki::error::RvError;

use super::decorate::{Call, Decorator};
use super::{Error, Hsm};

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

impl<H: Hsm> Decorator for FaultyHsm<H> {
    fn forward<R>(&self, run: impl FnOnce(&dyn Hsm) -> R) -> R {
        run(&self.inner)
    }

    fn around<T>(
        &self,
        call: Call,
        run: impl FnOnce(&dyn Hsm) -> Result<T, Error>,
    ) -> Result<T, Error> {
        if let Some(op) = counted_as(call) {
            self.enter(op)?;
        }
        run(&self.inner)
    }
}

/// The counter a call is counted under: a new MWK costs what a new KEK does, a re-wrap what
/// an unwrap does; destroying an MWK is neither counted nor failed.
fn counted_as(call: Call) -> Option<Op> {
    Some(match call {
        Call::GenerateKek | Call::CreateMwk => Op::GenerateKek,
        Call::UnwrapKek | Call::RewrapKek => Op::UnwrapKek,
        Call::Encrypt => Op::Encrypt,
        Call::Decrypt => Op::Decrypt,
        Call::GenerateMacKey => Op::GenerateMacKey,
        Call::Mac => Op::Mac,
        Call::GenerateSigningKey => Op::GenerateSigningKey,
        Call::SignDigest => Op::SignDigest,
        Call::GenerateImportKey => Op::GenerateImportKey,
        Call::ImportKey => Op::ImportKey,
        Call::Random => Op::Random,
        Call::Hmac => Op::Hmac,
        Call::Sign => Op::Sign,
        Call::Probe => Op::Probe,
        Call::DestroyMwk => return None,
    })
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
