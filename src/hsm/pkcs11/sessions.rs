//! Loading the module, finding the token, and sessions: the pool every call checks a session
//! out of, the anchor session that keeps the login, and KEK handles that are destroyed when
//! their last user is done. Object searches (`find_mwk`, `find_one`) run only when opening.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::{Error, MwkGeneration};
use super::{Pkcs11Config, to_error};

/// Loads and initializes the PKCS#11 module once per process, then hands out the same context.
///
/// # Errors
/// [`Error::Module`] if the module cannot be loaded, or another module is already loaded.
pub fn context(module: &Path) -> Result<Pkcs11, Error> {
    static CONTEXT: Mutex<Option<(PathBuf, Pkcs11)>> = Mutex::new(None);
    let mut loaded = CONTEXT.lock().expect("PKCS#11 context lock poisoned");
    if let Some((path, ctx)) = loaded.as_ref() {
        if path == module {
            return Ok(ctx.clone());
        }
        return Err(Error::Module(format!(
            "{} is already loaded in this process",
            path.display()
        )));
    }
    let ctx =
        Pkcs11::new(module).map_err(|e| Error::Module(format!("{}: {e}", module.display())))?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(to_error)?;
    *loaded = Some((module.to_path_buf(), ctx.clone()));
    Ok(ctx)
}

/// Finalizes and initializes the module again: the only way to see a token again after it
/// vanished and came back (SoftHSM 2.6.1 keeps its slot broken until `C_Initialize`).
///
/// Waits up to `wait` for every session pool of this process to be dropped first, and refuses
/// otherwise: closing an old session after re-initialization could close a new one that got
/// the same handle.
///
/// # Errors
/// [`Error::Unavailable`] if sessions stay in use; PKCS#11 errors of `C_Initialize`.
pub fn reinitialize(module: &Path, wait: Duration) -> Result<(), Error> {
    let deadline = Instant::now() + wait;
    while LIVE_POOLS.load(Ordering::SeqCst) > 0 {
        if Instant::now() >= deadline {
            return Err(Error::Unavailable {
                rv: RvError::SessionCount,
                function: "reinitialize",
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ctx = context(module)?;
    if let Err(error) = ctx.clone().finalize() {
        tracing::warn!(error = %to_error(error), "C_Finalize failed; initializing anyway");
    }
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
            tracing::info!(module = %module.display(), "PKCS#11 module re-initialized");
            Ok(())
        }
        Err(error) => Err(to_error(error)),
    }
}

/// The slot holding the (initialized) token with this label.
///
/// # Errors
/// [`Error::TokenNotFound`] or [`Error::TokenAmbiguous`].
pub fn find_token(ctx: &Pkcs11, label: &str) -> Result<Slot, Error> {
    let mut found = None;
    // Not `get_slots_with_initialized_token`: it fails as a whole when one slot's token info
    // cannot be read.
    for slot in ctx.get_slots_with_token().map_err(to_error)? {
        // A slot whose token went away answers GeneralError here (SoftHSM, after its token
        // directory disappeared); it is not the token being looked for, so keep looking.
        let info = match ctx.get_token_info(slot) {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(?slot, error = %to_error(error), "skipping unreadable slot");
                continue;
            }
        };
        if info.token_initialized() && info.label() == label {
            if found.is_some() {
                return Err(Error::TokenAmbiguous(label.to_owned()));
            }
            found = Some(slot);
        }
    }
    found.ok_or_else(|| Error::TokenNotFound(label.to_owned()))
}

/// Opens a read-write session on the token and logs the user in.
///
/// # Errors
/// [`Error::Pin`] if the PIN is refused; [`Error::TokenNotFound`] if there is no such token.
pub fn open_logged_in(ctx: &Pkcs11, config: &Pkcs11Config) -> Result<Session, Error> {
    let slot = find_token(ctx, &config.token_label)?;
    let session = ctx.open_rw_session(slot).map_err(to_error)?;
    login(&session, &config.pin)?;
    Ok(session)
}

/// A KEK unwrapped into the HSM; destroyed when the last user and the cache let go of it.
pub(super) struct KekObject {
    pub(super) handle: ObjectHandle,
    pub(super) pool: Arc<SessionPool>,
}

impl Drop for KekObject {
    fn drop(&mut self) {
        if let Err(error) = self.pool.with(|s| s.destroy_object(self.handle)) {
            // The object dies with its session anyway; a failure here only delays that.
            tracing::warn!(error = %to_error(error), "could not destroy a KEK session object");
        }
    }
}

/// Session pools alive in this process: [`reinitialize`] waits until none is left, because a
/// session closed after `C_Finalize` + `C_Initialize` could close a new session with a reused
/// handle.
pub(super) static LIVE_POOLS: AtomicUsize = AtomicUsize::new(0);

/// A fixed set of logged-in sessions, checked out by value (a `Session` is `Send` but not
/// `Sync`) and always returned: sessions are never closed while the pool lives. It also holds
/// the anchor session, which keeps the token logged in while every other one is checked out.
pub(super) struct SessionPool {
    idle: Mutex<Vec<Session>>,
    returned: Condvar,
    _anchor: Mutex<Session>,
}

impl SessionPool {
    pub(super) fn new(sessions: Vec<Session>, anchor: Session) -> Self {
        LIVE_POOLS.fetch_add(1, Ordering::SeqCst);
        Self {
            idle: Mutex::new(sessions),
            returned: Condvar::new(),
            _anchor: Mutex::new(anchor),
        }
    }

    /// Runs `f` with a session, waiting for one if all are in use.
    pub(super) fn with<R>(&self, f: impl FnOnce(&Session) -> R) -> R {
        let session = {
            let mut idle = self.idle.lock().expect("session pool lock poisoned");
            loop {
                if let Some(session) = idle.pop() {
                    break session;
                }
                idle = self
                    .returned
                    .wait(idle)
                    .expect("session pool lock poisoned");
            }
        };
        let checkout = Checkout {
            pool: self,
            session: Some(session),
        };
        f(checkout.session())
    }
}

impl Drop for SessionPool {
    fn drop(&mut self) {
        // The sessions themselves close as the fields drop, right after this.
        LIVE_POOLS.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(super) struct Checkout<'a> {
    pool: &'a SessionPool,
    session: Option<Session>,
}

impl Checkout<'_> {
    pub(super) fn session(&self) -> &Session {
        // Invariant: `session` is Some from construction until `drop` takes it.
        self.session.as_ref().expect("checked-out session present")
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            self.pool
                .idle
                .lock()
                .expect("session pool lock poisoned")
                .push(session);
            self.pool.returned.notify_one();
        }
    }
}

pub(super) fn login(session: &Session, pin: &AuthPin) -> Result<(), Error> {
    match session.login(UserType::User, Some(pin)) {
        // Login state is per token per process: every session after the first gets this.
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(error) => Err(to_error(error)),
    }
}

/// The MWK of a generation, found by its CKA_ID (the generation, u32 BE).
pub(super) fn find_mwk(
    session: &Session,
    generation: MwkGeneration,
) -> Result<Option<ObjectHandle>, Error> {
    let found = session
        .find_objects(&[
            Attribute::Token(true),
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Id(generation.0.to_be_bytes().to_vec()),
        ])
        .map_err(to_error)?;
    match found.as_slice() {
        [] => Ok(None),
        [handle] => Ok(Some(*handle)),
        // Two AES keys with one generation's id: refuse rather than guess which wraps.
        _ => Err(Error::NotInitialized("unique MWK for each generation")),
    }
}

pub(super) fn find_one(
    session: &Session,
    label: &str,
    class: ObjectClass,
) -> Result<Option<ObjectHandle>, Error> {
    let found = session
        .find_objects(&[
            Attribute::Token(true),
            Attribute::Class(class),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(to_error)?;
    Ok(found.first().copied())
}
