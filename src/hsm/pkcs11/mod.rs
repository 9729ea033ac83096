//! The PKCS#11 implementation of [`Hsm`] (cryptoki), and the `keyfront init` ceremony.
//!
//! Runtime shape (see `../shared/notes/pkcs11-softhsm.md` for the measurements behind it):
//! one `Pkcs11` context per process, initialized once with `OS_LOCKING_OK` (without it SoftHSM
//! turns its own mutexes off); a logged-in anchor session kept for the life of the instance,
//! because closing a token's last session logs it out; a small fixed pool of sessions that are
//! never closed while in use; token objects looked up only when opening, never per request.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::types::AuthPin;
use sha2::{Digest, Sha256};

use super::{
    Error, GcmSealed, HmacKey, Hsm, IMPORT_KEY_BITS, IMPORT_KEY_ONLY, IMPORT_OAEP_LEN, IV_LEN,
    ImportTarget, ImportWrapping, Imported, KCV_MESSAGE, Kek, KeyCheckValue, MacAlgorithm,
    MwkGeneration, NOT_AN_IMPORT_KEY, SignAlgorithm, WrappedKek, WrappedKind, function_name,
    signing,
};
use crate::crypto::Plaintext;

mod canary;
mod ceremony;
mod errors;
mod import;
mod mechanisms;
mod public_keys;
mod sessions;
mod templates;

use canary::{CANARY_AAD, CANARY_PLAINTEXT, Canary};
pub use ceremony::{InitReport, init_token};
pub use errors::to_error;
use import::{oaep_params, oaep_refused, secret_len, unwraps_oaep_sha256, value_len};
use public_keys::{P256_POINT_LEN, ec_point, public_spki, rsa_public_spki};
use sessions::{KekObject, SessionPool, find_mwk, find_one, login};
pub use sessions::{context, find_token, open_logged_in, reinitialize};
use templates::{
    P256_OID_DER, ephemeral_key_template, hmac_key_template, import_key_templates,
    import_private_template, kek_generate_template, kek_rewrap_template, mac_key_generate_template,
    mac_key_rewrap_template, mac_key_unwrap_template, mwk_template, private_key_template,
    signing_key_templates,
};
pub use templates::{kek_unwrap_template, mwk_label};

pub use mechanisms::{Capabilities, KwpCode};

/// Label prefix of MWK token objects; the generation follows (`keyfront-mwk-1`).
pub const MWK_LABEL_PREFIX: &str = "keyfront-mwk-";
/// Label (and CKA_ID) of the storage MAC root key.
pub const STORAGE_ROOT_LABEL: &str = "keyfront-storage-mac";
/// Label (and CKA_ID) of the password pepper key.
pub const PEPPER_LABEL: &str = "keyfront-pepper-1";
/// Label (and CKA_ID) of the key that makes lookup digests of API tokens.
pub const LOOKUP_LABEL: &str = "keyfront-lookup-1";
/// Label (and CKA_ID) of the audit signing key pair.
pub const AUDIT_LABEL: &str = "keyfront-audit-1";

/// Highest MWK generation probed when opening (rotation adds one at a time).
const MAX_MWK_GENERATIONS: u32 = 1024;

/// How to reach the token. The PIN comes from the environment or a file, never the config file.
#[derive(Debug, Clone)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// The token's label; slot ids are not stable, labels are.
    pub token_label: String,
    /// The user PIN (a `SecretString`: redacted in `Debug`, zeroized on drop).
    pub pin: AuthPin,
    /// Sessions in the pool; SoftHSM is effectively single-core, so 2 is plenty.
    pub sessions: NonZeroUsize,
    /// How many unwrapped KEK handles stay cached in the HSM.
    pub kek_cache_capacity: NonZeroUsize,
}

/// [`Hsm`] over a PKCS#11 token.
pub struct Pkcs11Hsm {
    pool: Arc<SessionPool>,
    // What the token offers (RFC 5649's code on it, above all), found when it opened.
    capabilities: Capabilities,
    // Changed only by create_mwk and destroy_mwk (master key rotation).
    mwks: std::sync::RwLock<BTreeMap<MwkGeneration, ObjectHandle>>,
    current_mwk: std::sync::atomic::AtomicU32,
    storage_root: ObjectHandle,
    pepper: ObjectHandle,
    lookup: ObjectHandle,
    audit_private: ObjectHandle,
    audit_public: Vec<u8>,
    kek_cache: quick_cache::sync::Cache<Vec<u8>, Arc<KekObject>>,
    // Rebuilt under the new MWK when the master key rotates.
    canary: std::sync::RwLock<Arc<Canary>>,
    // Whether the token unwraps RSA-OAEP with SHA-256: OAEP_UNKNOWN until the first import key
    // for a SHA-256 wrapping asks it (SoftHSM 2.6 does SHA-1 only).
    oaep_sha256: AtomicU8,
}

const OAEP_UNKNOWN: u8 = 0;
const OAEP_SUPPORTED: u8 = 1;
const OAEP_UNSUPPORTED: u8 = 2;
const OAEP_SHA256_UNSUPPORTED: Error = Error::Unsupported("RSA-OAEP with SHA-256");

impl Pkcs11Hsm {
    /// Logs in to the token and finds keyfront's keys on it (`find_objects` is called only here
    /// and when another node's newer MWK is looked for).
    ///
    /// # Errors
    /// [`Error::Pin`] for a refused PIN (never retry); [`Error::NotInitialized`] when the token
    /// has not been through `keyfront init`; [`Error::Unavailable`] when the HSM is unreachable.
    pub fn open(config: &Pkcs11Config) -> Result<Self, Error> {
        let ctx = context(&config.module)?;
        let anchor = open_logged_in(&ctx, config)?;
        let mut mwks = BTreeMap::new();
        // Retired generations are destroyed oldest first, so the ones left are contiguous,
        // possibly after a gap at the start.
        for generation in (1..=MAX_MWK_GENERATIONS).map(MwkGeneration) {
            match find_mwk(&anchor, generation)? {
                Some(handle) => {
                    mwks.insert(generation, handle);
                }
                None if mwks.is_empty() => {}
                None => break,
            }
        }
        let current_mwk = *mwks
            .keys()
            .next_back()
            .ok_or(Error::NotInitialized("master wrapping key"))?;
        let storage_root = find_one(&anchor, STORAGE_ROOT_LABEL, ObjectClass::SECRET_KEY)?
            .ok_or(Error::NotInitialized("storage MAC key"))?;
        let pepper = find_one(&anchor, PEPPER_LABEL, ObjectClass::SECRET_KEY)?
            .ok_or(Error::NotInitialized("pepper key"))?;
        // Tokens initialized before lookup digests existed get their lookup key now: an HMAC
        // key like the pepper, made inside the HSM and never extractable.
        let lookup = match find_one(&anchor, LOOKUP_LABEL, ObjectClass::SECRET_KEY)? {
            Some(handle) => handle,
            None => {
                tracing::info!(
                    label = LOOKUP_LABEL,
                    "creating the lookup-digest key on this token"
                );
                anchor
                    .generate_key(
                        &Mechanism::GenericSecretKeyGen,
                        &hmac_key_template(LOOKUP_LABEL),
                    )
                    .map_err(to_error)?
            }
        };
        let audit_private = find_one(&anchor, AUDIT_LABEL, ObjectClass::PRIVATE_KEY)?
            .ok_or(Error::NotInitialized("audit signing key"))?;
        let audit_public = match find_one(&anchor, AUDIT_LABEL, ObjectClass::PUBLIC_KEY)? {
            Some(handle) => ec_point(&anchor, handle, P256_POINT_LEN)?,
            None => return Err(Error::NotInitialized("audit public key")),
        };

        let slot = find_token(&ctx, &config.token_label)?;
        // The wrap code must be one every master key on the token allows.
        let mut allowed: Option<Vec<KwpCode>> = None;
        for handle in mwks.values() {
            let restricts = mechanisms::allowed_kwp(&anchor, *handle)?;
            if !restricts.is_empty() {
                allowed = Some(match allowed {
                    None => restricts,
                    Some(so_far) => so_far
                        .into_iter()
                        .filter(|c| restricts.contains(c))
                        .collect(),
                });
            }
        }
        let capabilities = match allowed {
            Some(allowed) if allowed.is_empty() => {
                return Err(Error::Unsuitable(
                    "its master wrapping keys allow different wrap mechanisms".into(),
                ));
            }
            allowed => mechanisms::discover(&ctx, slot, allowed.as_deref().unwrap_or_default())?,
        };
        tracing::debug!(
            kwp = capabilities.kwp.name(),
            "RFC 5649 key wrap on this token"
        );
        let mut sessions = Vec::with_capacity(config.sessions.get());
        for _ in 0..config.sessions.get() {
            let session = ctx.open_rw_session(slot).map_err(to_error)?;
            login(&session, &config.pin)?;
            sessions.push(session);
        }
        let pool = Arc::new(SessionPool::new(sessions, anchor));
        let canary = Canary::new(&pool, capabilities.kwp, mwks[&current_mwk], current_mwk)?;
        Ok(Self {
            pool,
            capabilities,
            canary: std::sync::RwLock::new(Arc::new(canary)),
            mwks: std::sync::RwLock::new(mwks),
            current_mwk: std::sync::atomic::AtomicU32::new(current_mwk.0),
            storage_root,
            pepper,
            lookup,
            audit_private,
            audit_public,
            kek_cache: quick_cache::sync::Cache::new(config.kek_cache_capacity.get()),
            oaep_sha256: AtomicU8::new(OAEP_UNKNOWN),
        })
    }

    /// What the token offers, as found when it opened.
    pub fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    /// RFC 5649 key wrap under this token's code.
    fn kwp(&self) -> Mechanism<'static> {
        self.capabilities.kwp.mechanism()
    }

    /// How many KEK handles are cached now (for tests and metrics).
    pub fn cached_keks(&self) -> usize {
        self.kek_cache.len()
    }
}

impl Hsm for Pkcs11Hsm {
    fn mwk_generation(&self) -> MwkGeneration {
        MwkGeneration(self.current_mwk.load(Ordering::Acquire))
    }

    fn generate_kek(&self) -> Result<WrappedKek, Error> {
        // A KEK is wrapped under the newest MWK on the token, even one another node made: one
        // wrapped under a generation being retired would be lost with it.
        self.refresh_mwks()?;
        let current = self.mwk_generation();
        let mwk = self.mwk(current)?;
        let wrapped = self
            .pool
            .with(|s| {
                let kek = s.generate_key(&Mechanism::AesKeyGen, &kek_generate_template())?;
                let wrapped = s.wrap_key(&self.kwp(), mwk, kek);
                // Destroy before looking at the wrap's result: the clear-capable object must
                // not outlive this call either way.
                let destroyed = s.destroy_object(kek);
                let wrapped = wrapped?;
                destroyed?;
                Ok(wrapped)
            })
            .map_err(to_error)?;
        Ok(WrappedKek::new(current, wrapped))
    }

    fn unwrap_kek(&self, wrapped: &WrappedKek) -> Result<Kek, Error> {
        let cache_key = wrapped.to_bytes();
        if let Some(object) = self.kek_cache.get(&cache_key) {
            crate::metrics::global().cache("kek", true);
            return Ok(Kek::new(object));
        }
        crate::metrics::global().cache("kek", false);
        let mwk = self.mwk(wrapped.generation())?;
        let template = match wrapped.kind() {
            WrappedKind::Kek => kek_unwrap_template(),
            WrappedKind::MacKey => mac_key_unwrap_template(),
            kind @ (WrappedKind::EcPrivateKey | WrappedKind::RsaPrivateKey) => {
                private_key_template(kind, false)
            }
            WrappedKind::ImportKey => return Err(IMPORT_KEY_ONLY),
        };
        // A blob comes from the store, MAC'd, but a token may answer a blob that fails KWP's
        // check as a device error: the canary decides.
        let handle = self
            .pool
            .with(|s| s.unwrap_key(&self.kwp(), mwk, wrapped.wrapped(), &template))
            .map_err(|error| self.caller_data_error(error))?;
        let object = Arc::new(KekObject {
            handle,
            pool: Arc::clone(&self.pool),
        });
        // Outside `pool.with`: an evicted entry may be destroyed here, which needs a session.
        self.kek_cache.insert(cache_key, Arc::clone(&object));
        Ok(Kek::new(object))
    }

    fn encrypt(&self, kek: &Kek, aad: &[u8], plaintext: &[u8]) -> Result<GcmSealed, Error> {
        if aad.is_empty() {
            // Empty AAD trips an assertion in some SoftHSM builds (SoftHSMv2 #605).
            return Err(Error::InvalidInput(
                "AES-GCM in the HSM needs non-empty AAD",
            ));
        }
        let object = kek.downcast::<KekObject>()?;
        let iv: [u8; IV_LEN] = rand::random();
        let mut iv_param = iv;
        let sealed = self
            .pool
            .with(|s| {
                let params = GcmParams::new(&mut iv_param, aad, 128.into())?;
                s.encrypt(&Mechanism::AesGcm(params), object.handle, plaintext)
            })
            .map_err(to_error)?;
        Ok(GcmSealed { iv, sealed })
    }

    fn decrypt(
        &self,
        kek: &Kek,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Plaintext, Error> {
        if aad.is_empty() {
            return Err(Error::InvalidInput(
                "AES-GCM in the HSM needs non-empty AAD",
            ));
        }
        let object = kek.downcast::<KekObject>()?;
        let mut iv_param = *iv;
        let plaintext = self
            .pool
            .with(|s| {
                let params = GcmParams::new(&mut iv_param, aad, 128.into())?;
                s.decrypt(&Mechanism::AesGcm(params), object.handle, sealed)
            })
            .map_err(|error| self.caller_data_error(error))?;
        Ok(Plaintext::new(plaintext))
    }

    fn generate_mac_key(&self, algorithm: MacAlgorithm) -> Result<WrappedKek, Error> {
        // As generate_kek: under the newest MWK on the token.
        self.refresh_mwks()?;
        let current = self.mwk_generation();
        let mwk = self.mwk(current)?;
        let wrapped = self
            .pool
            .with(|s| {
                let key = s.generate_key(
                    &Mechanism::GenericSecretKeyGen,
                    &mac_key_generate_template(algorithm),
                )?;
                let wrapped = s.wrap_key(&self.kwp(), mwk, key);
                let destroyed = s.destroy_object(key);
                let wrapped = wrapped?;
                destroyed?;
                Ok(wrapped)
            })
            .map_err(to_error)?;
        Ok(WrappedKek::of_kind(WrappedKind::MacKey, current, wrapped))
    }

    fn mac(&self, key: &Kek, algorithm: MacAlgorithm, data: &[u8]) -> Result<Vec<u8>, Error> {
        let object = key.downcast::<KekObject>()?;
        let mechanism = match algorithm {
            MacAlgorithm::HmacSha256 => Mechanism::Sha256Hmac,
            MacAlgorithm::HmacSha512 => Mechanism::Sha512Hmac,
        };
        let mac = self
            .pool
            .with(|s| s.sign(&mechanism, object.handle, data))
            .map_err(to_error)?;
        if mac.len() != algorithm.mac_len() {
            return Err(Error::Internal {
                rv: None,
                function: "C_Sign",
            });
        }
        Ok(mac)
    }

    fn generate_signing_key(
        &self,
        algorithm: SignAlgorithm,
    ) -> Result<(WrappedKek, Vec<u8>), Error> {
        // As generate_kek: under the newest MWK on the token.
        self.refresh_mwks()?;
        let current = self.mwk_generation();
        let mwk = self.mwk(current)?;
        let (mechanism, public_template, private_template) = signing_key_templates(algorithm);
        let (wrapped, spki) = self
            .pool
            .with(|s| {
                let (public, private) =
                    s.generate_key_pair(&mechanism, &public_template, &private_template)?;
                let wrapped = s.wrap_key(&self.kwp(), mwk, private);
                let spki = public_spki(s, public, algorithm);
                // Both destroyed before looking at the results: the wrappable private key must
                // not outlive this call either way.
                let destroyed = (s.destroy_object(private), s.destroy_object(public));
                let wrapped = wrapped?;
                destroyed.0?;
                destroyed.1?;
                Ok((wrapped, spki))
            })
            .map_err(to_error)?;
        Ok((
            WrappedKek::of_kind(algorithm.wrapped_kind(), current, wrapped),
            spki?,
        ))
    }

    fn sign_digest(
        &self,
        key: &Kek,
        algorithm: SignAlgorithm,
        digest: &[u8],
    ) -> Result<Vec<u8>, Error> {
        if digest.len() != algorithm.digest_len() {
            return Err(Error::InvalidInput("a digest of the wrong length"));
        }
        let object = key.downcast::<KekObject>()?;
        let internal = Error::Internal {
            rv: None,
            function: "C_Sign",
        };
        match algorithm {
            SignAlgorithm::EcdsaP256Sha256 | SignAlgorithm::EcdsaP384Sha384 => {
                let raw = self
                    .pool
                    .with(|s| s.sign(&Mechanism::Ecdsa, object.handle, digest))
                    .map_err(to_error)?;
                signing::ecdsa_der(algorithm, &raw).ok_or(internal)
            }
            SignAlgorithm::RsaPss3072Sha256 => {
                let params = cryptoki::mechanism::rsa::PkcsPssParams {
                    hash_alg: MechanismType::SHA256,
                    mgf: cryptoki::mechanism::rsa::PkcsMgfType::MGF1_SHA256,
                    s_len: 32.into(),
                };
                self.pool
                    .with(|s| s.sign(&Mechanism::RsaPkcsPss(params), object.handle, digest))
                    .map_err(to_error)
            }
        }
    }

    fn generate_import_key(
        &self,
        wrapping: ImportWrapping,
    ) -> Result<(WrappedKek, Vec<u8>), Error> {
        if wrapping.sha256() && self.oaep_sha256.load(Ordering::Relaxed) == OAEP_UNSUPPORTED {
            return Err(OAEP_SHA256_UNSUPPORTED);
        }
        // As generate_kek: under the newest MWK on the token.
        self.refresh_mwks()?;
        let current = self.mwk_generation();
        let mwk = self.mwk(current)?;
        let (public_template, private_template) = import_key_templates();
        let ask_sha256 =
            wrapping.sha256() && self.oaep_sha256.load(Ordering::Relaxed) == OAEP_UNKNOWN;
        let (wrapped, spki, sha256) = self
            .pool
            .with(|s| {
                let (public, private) = s.generate_key_pair(
                    &Mechanism::RsaPkcsKeyPairGen,
                    &public_template,
                    &private_template,
                )?;
                let wrapped = s.wrap_key(&self.kwp(), mwk, private);
                let spki = rsa_public_spki(s, public);
                // The token is asked once whether it unwraps OAEP with SHA-256: a random key
                // wrapped to this public key in software must come back through C_UnwrapKey.
                let sha256 = match (&spki, ask_sha256) {
                    (Ok(Ok(spki)), true) => {
                        Some(unwraps_oaep_sha256(s, private, spki, self.capabilities.kwp))
                    }
                    _ => None,
                };
                let destroyed = (s.destroy_object(private), s.destroy_object(public));
                let wrapped = wrapped?;
                destroyed.0?;
                destroyed.1?;
                Ok((wrapped, spki?, sha256.transpose()?))
            })
            .map_err(to_error)?;
        if let Some(supported) = sha256 {
            let answer = if supported {
                OAEP_SUPPORTED
            } else {
                OAEP_UNSUPPORTED
            };
            self.oaep_sha256.store(answer, Ordering::Relaxed);
            if !supported {
                return Err(OAEP_SHA256_UNSUPPORTED);
            }
        }
        Ok((
            WrappedKek::of_kind(WrappedKind::ImportKey, current, wrapped),
            spki?,
        ))
    }

    fn import_key(
        &self,
        import_key: &WrappedKek,
        wrapping: ImportWrapping,
        material: &[u8],
        target: ImportTarget,
    ) -> Result<Imported, Error> {
        if import_key.kind() != WrappedKind::ImportKey {
            return Err(NOT_AN_IMPORT_KEY);
        }
        if wrapping.sha256() && self.oaep_sha256.load(Ordering::Relaxed) == OAEP_UNSUPPORTED {
            return Err(OAEP_SHA256_UNSUPPORTED);
        }
        let (block, wrapped_material) = if wrapping.aes_key_wrap() {
            material
                .split_at_checked(IMPORT_OAEP_LEN)
                .filter(|(_, kwp)| !kwp.is_empty())
                .ok_or(Error::Integrity)?
        } else if material.len() == IMPORT_OAEP_LEN {
            (material, &[][..])
        } else {
            return Err(Error::Integrity);
        };
        self.refresh_mwks()?;
        let current = self.mwk_generation();
        let mwk = self.mwk(current)?;
        let import_mwk = self.mwk(import_key.generation())?;
        // Whichever the target, the material is unwrapped as a generic secret: its length can
        // then be checked (an AES unwrap would refuse a wrong length with the same codes as
        // tampering), and a KWP blob holds only the bytes, which `unwrap_kek` later brings
        // back as the kind the blob names.
        // A generic secret that may also HMAC, once: its check value (KCV_MESSAGE), computed
        // here while the material is unwrapped; the object is destroyed right after.
        let mut template = mac_key_rewrap_template();
        for attribute in &mut template {
            if let Attribute::Sign(sign) = attribute {
                *sign = true;
            }
        }
        let params = oaep_params(wrapping);
        let result = self.pool.with(|s| {
            let private = s.unwrap_key(
                &self.kwp(),
                import_mwk,
                import_key.wrapped(),
                &import_private_template(false),
            )?;
            let key = if wrapping.aes_key_wrap() {
                s.unwrap_key(
                    &Mechanism::RsaPkcsOaep(params),
                    private,
                    block,
                    &ephemeral_key_template(self.capabilities.kwp),
                )
                .and_then(|ephemeral| {
                    let length = value_len(s, ephemeral);
                    // 0: the token does not say (SoftHSM 2.6), and the ephemeral key is not
                    // extractable to be measured; KWP then runs with the key it has.
                    let key = match length {
                        Ok(32 | 0) => s
                            .unwrap_key(&self.kwp(), ephemeral, wrapped_material, &template)
                            .map(Some),
                        Ok(_) => Ok(None),
                        Err(error) => Err(error),
                    };
                    s.destroy_object(ephemeral)?;
                    key
                })
            } else {
                s.unwrap_key(&Mechanism::RsaPkcsOaep(params), private, block, &template)
                    .map(Some)
            };
            let destroyed = s.destroy_object(private);
            let Some(key) = key? else {
                destroyed?;
                return Ok(Err(Error::InvalidInput(
                    "the ephemeral AES key is not 256 bits",
                )));
            };
            // Where the token does not report the length (SoftHSM 2.6), it is known to within
            // 8 bytes (docs/DESIGN.md, key import).
            let wrapped = match secret_len(s, key, self.capabilities.aes_key_wrap) {
                Ok(Some((low, high))) if (low..=high).contains(&target.key_len()) => s
                    .sign(&Mechanism::Sha256Hmac, key, KCV_MESSAGE)
                    .and_then(|mac| {
                        let wrapped = s.wrap_key(&self.kwp(), mwk, key)?;
                        Ok(Ok((wrapped, KeyCheckValue::from_mac(&mac))))
                    }),
                Ok(_) => Ok(Err(Error::InvalidInput("key material of the wrong length"))),
                Err(error) => Err(error),
            };
            // Destroyed before looking at the wrap's result: the wrappable object must not
            // outlive this call either way.
            let destroyed_key = s.destroy_object(key);
            let wrapped = wrapped?;
            destroyed?;
            destroyed_key?;
            Ok(wrapped)
        });
        let (wrapped, check_value) = match result {
            Ok(wrapped) => wrapped?,
            Err(error) if wrapping.sha256() && oaep_refused(&error) => {
                self.oaep_sha256.store(OAEP_UNSUPPORTED, Ordering::Relaxed);
                return Err(OAEP_SHA256_UNSUPPORTED);
            }
            Err(error) => return Err(self.caller_data_error(error)),
        };
        Ok(Imported {
            key: WrappedKek::of_kind(target.kind(), current, wrapped),
            check_value,
        })
    }

    fn random(&self, out: &mut [u8]) -> Result<(), Error> {
        self.pool
            .with(|s| s.generate_random_slice(out))
            .map_err(to_error)
    }

    fn hmac(&self, key: HmacKey, data: &[u8]) -> Result<[u8; 32], Error> {
        let handle = match key {
            HmacKey::StorageRoot => self.storage_root,
            HmacKey::Pepper => self.pepper,
            HmacKey::Lookup => self.lookup,
        };
        let mac = self
            .pool
            .with(|s| s.sign(&Mechanism::Sha256Hmac, handle, data))
            .map_err(to_error)?;
        mac.try_into().map_err(|_| Error::Internal {
            rv: None,
            function: "C_Sign",
        })
    }

    fn probe(&self) -> Result<(), Error> {
        let canary = Arc::clone(&self.canary.read().expect("canary lock poisoned"));
        let mwk = self.mwk(canary.kek.generation())?;
        let plaintext = self
            .pool
            .with(|s| {
                // A fresh unwrap, not the handle cache: the point is to exercise the MWK.
                let kek = s.unwrap_key(
                    &self.kwp(),
                    mwk,
                    canary.kek.wrapped(),
                    &kek_unwrap_template(),
                )?;
                let mut iv = canary.iv;
                let result = GcmParams::new(&mut iv, CANARY_AAD, 128.into())
                    .and_then(|params| s.decrypt(&Mechanism::AesGcm(params), kek, &canary.sealed));
                let destroyed = s.destroy_object(kek);
                let plaintext = result?;
                destroyed?;
                Ok(plaintext)
            })
            .map_err(|e| match to_error(e) {
                // The canary is known good: an integrity failure here means the HSM is at fault.
                Error::Integrity => Error::Unavailable {
                    rv: RvError::GeneralError,
                    function: "canary",
                },
                other => other,
            })?;
        if plaintext.as_slice() == CANARY_PLAINTEXT {
            Ok(())
        } else {
            Err(Error::Unavailable {
                rv: RvError::GeneralError,
                function: "canary",
            })
        }
    }

    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, Error> {
        let digest = Sha256::digest(data);
        self.pool
            .with(|s| s.sign(&Mechanism::Ecdsa, self.audit_private, &digest))
            .map_err(to_error)
    }

    fn audit_public_key(&self) -> Vec<u8> {
        self.audit_public.clone()
    }

    fn create_mwk(&self) -> Result<MwkGeneration, Error> {
        let mut mwks = self.mwks.write().expect("MWK lock poisoned");
        let current = self.mwk_generation();
        let next = MwkGeneration(
            current
                .0
                .checked_add(1)
                .ok_or(Error::InvalidInput("no more MWK generations"))?,
        );
        let handle = self
            .pool
            .with(|s| {
                s.generate_key(
                    &Mechanism::AesKeyGen,
                    &mwk_template(next, self.capabilities.kwp),
                )
            })
            .map_err(to_error)?;
        mwks.insert(next, handle);
        // The canary moves to the new generation, so the old one can be destroyed later.
        let canary = Canary::new(&self.pool, self.capabilities.kwp, handle, next)?;
        *self.canary.write().expect("canary lock poisoned") = Arc::new(canary);
        self.current_mwk.store(next.0, Ordering::Release);
        Ok(next)
    }

    fn rewrap_kek(&self, wrapped: &WrappedKek) -> Result<WrappedKek, Error> {
        let current = self.mwk_generation();
        if wrapped.generation() == current {
            return Ok(wrapped.clone());
        }
        let old = self.mwk(wrapped.generation())?;
        let new = self.mwk(current)?;
        let template = match wrapped.kind() {
            WrappedKind::Kek => kek_rewrap_template(),
            WrappedKind::MacKey => mac_key_rewrap_template(),
            kind @ (WrappedKind::EcPrivateKey | WrappedKind::RsaPrivateKey) => {
                private_key_template(kind, true)
            }
            // Import parameters expire long before a retired MWK is destroyed (24 hours
            // against the backup retention), so they are never re-wrapped.
            WrappedKind::ImportKey => return Err(IMPORT_KEY_ONLY),
        };
        let rewrapped = self
            .pool
            .with(|s| {
                // Extractable only so that it can be wrapped again, under the new MWK; a
                // session object destroyed before this returns.
                let kek = s.unwrap_key(&self.kwp(), old, wrapped.wrapped(), &template)?;
                let result = s.wrap_key(&self.kwp(), new, kek);
                let destroyed = s.destroy_object(kek);
                let result = result?;
                destroyed?;
                Ok(result)
            })
            .map_err(to_error)?;
        Ok(WrappedKek::of_kind(wrapped.kind(), current, rewrapped))
    }

    fn destroy_mwk(&self, generation: MwkGeneration) -> Result<(), Error> {
        if generation == self.mwk_generation() {
            return Err(Error::InvalidInput("the current MWK cannot be destroyed"));
        }
        let mut mwks = self.mwks.write().expect("MWK lock poisoned");
        let Some(handle) = mwks.get(&generation).copied() else {
            return Ok(());
        };
        self.pool
            .with(|s| s.destroy_object(handle))
            .map_err(to_error)?;
        mwks.remove(&generation);
        Ok(())
    }

    fn mwk_generations(&self) -> Vec<MwkGeneration> {
        self.mwks
            .read()
            .expect("MWK lock poisoned")
            .keys()
            .copied()
            .collect()
    }
}

impl Pkcs11Hsm {
    /// The error of a decrypt or unwrap of bytes a caller supplied. Some tokens answer input
    /// that fails its check with `CKR_DEVICE_ERROR` or `CKR_FUNCTION_FAILED` (Kryoptic does, for
    /// a failed KWP unwrap or OAEP decode) where PKCS#11 wants `*_INVALID`, which would tell a
    /// client with tampered data that the HSM is down. The canary decides: when the HSM still
    /// decrypts what it encrypted, the input was at fault.
    fn caller_data_error(&self, error: CkError) -> Error {
        let ambiguous = matches!(
            error,
            CkError::Pkcs11(
                RvError::DeviceError | RvError::FunctionFailed,
                Function::Decrypt | Function::UnwrapKey
            )
        );
        let mapped = to_error(error);
        if ambiguous && self.probe().is_ok() {
            Error::Integrity
        } else {
            mapped
        }
    }

    /// The handle of an MWK generation. One newer than any known here is looked for on the
    /// token once: on a shared HSM, another node's master key rotation made it.
    fn mwk(&self, generation: MwkGeneration) -> Result<ObjectHandle, Error> {
        let known = self
            .mwks
            .read()
            .expect("MWK lock poisoned")
            .get(&generation)
            .copied();
        match known {
            Some(handle) => Ok(handle),
            None if generation > self.mwk_generation() => {
                self.refresh_mwks()?;
                self.mwks
                    .read()
                    .expect("MWK lock poisoned")
                    .get(&generation)
                    .copied()
                    .ok_or(Error::UnknownMwk(generation))
            }
            None => Err(Error::UnknownMwk(generation)),
        }
    }

    /// Adopts MWK generations newer than the current one that are on the token: another node
    /// sharing this HSM rotated the master key. The newest becomes current (new KEKs are
    /// wrapped under it) and the canary moves to it, as after [`Hsm::create_mwk`]. A few
    /// `find_objects` on a token that holds only keyfront's handful of keys: cheap, and only
    /// called before a KEK is made and on a blob of an unknown newer generation.
    fn refresh_mwks(&self) -> Result<(), Error> {
        let mut mwks = self.mwks.write().expect("MWK lock poisoned");
        let mut newest = None;
        let mut next = self.mwk_generation().0;
        while next < MAX_MWK_GENERATIONS {
            next += 1;
            let generation = MwkGeneration(next);
            match self.pool.with(|s| find_mwk(s, generation))? {
                Some(handle) => {
                    mwks.insert(generation, handle);
                    newest = Some((generation, handle));
                }
                None => break,
            }
        }
        if let Some((generation, handle)) = newest {
            let canary = Canary::new(&self.pool, self.capabilities.kwp, handle, generation)?;
            *self.canary.write().expect("canary lock poisoned") = Arc::new(canary);
            self.current_mwk.store(generation.0, Ordering::Release);
            tracing::info!(
                generation = generation.0,
                "a newer master wrapping key is on the HSM (rotated by another node); using it"
            );
        }
        Ok(())
    }
}
