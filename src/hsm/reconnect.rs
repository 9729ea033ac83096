//! An [`Hsm`] that can replace its underlying instance, for recovery without a restart.
//!
//! Observed with SoftHSM 2.6.1: when its token directory disappears and comes back, the open
//! sessions stay invalid, so no retry on them can succeed. Recovery therefore opens a fresh
//! instance (new sessions, new login, keys found again) and swaps it in; the domain above keeps
//! its `Arc<dyn Hsm>` and notices nothing but errors while the HSM was gone.

use std::sync::{Arc, RwLock};

use crate::crypto::Plaintext;

use super::decorate::Decorator;
use super::{
    Error, GcmSealed, HmacKey, Hsm, IV_LEN, ImportTarget, ImportWrapping, Imported, Kek,
    MacAlgorithm, MwkGeneration, SignAlgorithm, WrappedKek,
};

/// Opens a fresh HSM instance.
pub type Connect = Arc<dyn Fn() -> Result<Arc<dyn Hsm>, Error> + Send + Sync>;
/// Resets the HSM library (PKCS#11: finalize and initialize) once no instance is alive.
pub type Reset = Arc<dyn Fn() -> Result<(), Error> + Send + Sync>;

/// Delegates to the current instance; [`ReconnectingHsm::reconnect`] replaces it.
pub struct ReconnectingHsm {
    current: RwLock<Arc<dyn Hsm>>,
    connect: Connect,
    reset: Option<Reset>,
}

impl ReconnectingHsm {
    /// Opens the first instance.
    ///
    /// # Errors
    /// Whatever `connect` returns.
    pub fn new(connect: Connect) -> Result<Self, Error> {
        let first = connect()?;
        Ok(Self {
            current: RwLock::new(first),
            connect,
            reset: None,
        })
    }

    /// Also reset the library when a fresh instance cannot be opened (see [`Reset`]).
    pub fn with_reset(mut self, reset: Reset) -> Self {
        self.reset = Some(reset);
        self
    }

    /// Opens a fresh instance and swaps it in if it passes the canary. The old instance is
    /// dropped (its sessions closed) once in-flight calls on it finish.
    ///
    /// # Errors
    /// The fresh instance's open or canary error; the current instance stays.
    pub fn reconnect(&self) -> Result<(), Error> {
        let error = match (self.connect)().and_then(|fresh| fresh.probe().map(|()| fresh)) {
            Ok(fresh) => {
                *self.current.write().expect("HSM swap lock poisoned") = fresh;
                return Ok(());
            }
            Err(error) => error,
        };
        let Some(reset) = &self.reset else {
            return Err(error);
        };
        // A fresh instance could not see the HSM: release every session of the old one (it is
        // broken anyway), reset the library, and try once more. Until then calls fail as
        // unavailable.
        drop(std::mem::replace(
            &mut *self.current.write().expect("HSM swap lock poisoned"),
            Arc::new(Unreachable),
        ));
        reset()?;
        let fresh = (self.connect)()?;
        fresh.probe()?;
        *self.current.write().expect("HSM swap lock poisoned") = fresh;
        Ok(())
    }

    fn current(&self) -> Arc<dyn Hsm> {
        Arc::clone(&self.current.read().expect("HSM swap lock poisoned"))
    }
}

impl Decorator for ReconnectingHsm {
    fn forward<R>(&self, run: impl FnOnce(&dyn Hsm) -> R) -> R {
        run(self.current().as_ref())
    }
}

/// Stands in while the library is being reset: every call is unavailable.
struct Unreachable;

fn unreachable() -> Error {
    Error::Unavailable {
        rv: cryptoki::error::RvError::DeviceRemoved,
        function: "reconnecting",
    }
}

impl Hsm for Unreachable {
    fn mwk_generation(&self) -> MwkGeneration {
        MwkGeneration(0)
    }
    fn generate_kek(&self) -> Result<WrappedKek, Error> {
        Err(unreachable())
    }
    fn unwrap_kek(&self, _: &WrappedKek) -> Result<Kek, Error> {
        Err(unreachable())
    }
    fn encrypt(&self, _: &Kek, _: &[u8], _: &[u8]) -> Result<GcmSealed, Error> {
        Err(unreachable())
    }
    fn decrypt(&self, _: &Kek, _: &[u8; IV_LEN], _: &[u8], _: &[u8]) -> Result<Plaintext, Error> {
        Err(unreachable())
    }
    fn generate_mac_key(&self, _: MacAlgorithm) -> Result<WrappedKek, Error> {
        Err(unreachable())
    }
    fn mac(&self, _: &Kek, _: MacAlgorithm, _: &[u8]) -> Result<Vec<u8>, Error> {
        Err(unreachable())
    }
    fn generate_signing_key(&self, _: SignAlgorithm) -> Result<(WrappedKek, Vec<u8>), Error> {
        Err(unreachable())
    }
    fn sign_digest(&self, _: &Kek, _: SignAlgorithm, _: &[u8]) -> Result<Vec<u8>, Error> {
        Err(unreachable())
    }
    fn generate_import_key(&self, _: ImportWrapping) -> Result<(WrappedKek, Vec<u8>), Error> {
        Err(unreachable())
    }
    fn import_key(
        &self,
        _: &WrappedKek,
        _: ImportWrapping,
        _: &[u8],
        _: ImportTarget,
    ) -> Result<Imported, Error> {
        Err(unreachable())
    }
    fn random(&self, _: &mut [u8]) -> Result<(), Error> {
        Err(unreachable())
    }
    fn hmac(&self, _: HmacKey, _: &[u8]) -> Result<[u8; 32], Error> {
        Err(unreachable())
    }
    fn sign(&self, _: &[u8]) -> Result<Vec<u8>, Error> {
        Err(unreachable())
    }
    fn audit_public_key(&self) -> Vec<u8> {
        Vec::new()
    }
    fn probe(&self) -> Result<(), Error> {
        Err(unreachable())
    }
}
