//! Shared helpers for the integration tests on a PKCS#11 token.
//!
//! The module is `KEYFRONT_TEST_PKCS11_MODULE` (SoftHSM's by default). The tests take tokens
//! in one of two modes (docs/TESTING.md, "Tokens"):
//! - a module whose tokens the tests may initialise: each test initialises a free slot with a
//!   token of its own (`C_InitToken`), so tests never share keys. SoftHSM always offers a free
//!   slot (`SOFTHSM2_CONF`, made by `scripts/test.sh`); Kryoptic offers the slots its
//!   `KRYOPTIC_CONF` lists (`scripts/kryoptic.sh` provisions them).
//! - one pre-made token (`KEYFRONT_TEST_TOKEN_LABEL`, its user PIN in
//!   `KEYFRONT_TEST_TOKEN_PIN`), as on a real HSM partition where an application may not
//!   initialise tokens: each test that takes it waits for the one before to end and wipes
//!   every object on it first. A test that needs two tokens is skipped.
//!
//! Token creation and opening are serialized: SoftHSM 2.6.1 has races between object creation
//! and `find_objects` on its file backend (SoftHSMv2 #573).

#![allow(dead_code, unreachable_pub)]

pub mod dev_server;
pub mod postgres;

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use keyfront::hsm::Hsm;
use keyfront::hsm::pkcs11::{self, Pkcs11Config, Pkcs11Hsm};
use keyfront::kms::{Kms, KmsOptions};

static TOKEN_LOCK: Mutex<()> = Mutex::new(());

pub const SO_PIN: &str = "so-pin-for-tests";
pub const USER_PIN: &str = "user-pin-for-tests-7f3a";

/// Serializes token-level operations (create, init, open) across the tests of one binary.
pub fn token_lock() -> MutexGuard<'static, ()> {
    TOKEN_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn module() -> PathBuf {
    std::env::var_os("KEYFRONT_TEST_PKCS11_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"))
}

/// Panics with instructions unless the SoftHSM environment is set up (for tests that run
/// `softhsm2-util` or `keyfront dev`, which make SoftHSM tokens).
pub fn require_softhsm() {
    assert!(
        std::env::var_os("SOFTHSM2_CONF").is_some() && module().exists(),
        "SoftHSM tests need SoftHSM and SOFTHSM2_CONF: run scripts/test.sh"
    );
}

/// Panics with instructions unless a token environment is set up: SoftHSM's, Kryoptic's, or a
/// pre-made token.
pub fn require_token() {
    let configured = [
        "SOFTHSM2_CONF",
        "KRYOPTIC_CONF",
        "KEYFRONT_TEST_TOKEN_LABEL",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some());
    assert!(
        configured && module().exists(),
        "token tests need a PKCS#11 module ({}) and SOFTHSM2_CONF, KRYOPTIC_CONF or \
         KEYFRONT_TEST_TOKEN_LABEL: run scripts/test.sh",
        module().display()
    );
}

/// The pre-made token, when the tests run on one: its label and user PIN.
fn premade() -> Option<(String, String)> {
    let label = std::env::var("KEYFRONT_TEST_TOKEN_LABEL").ok()?;
    let pin = std::env::var("KEYFRONT_TEST_TOKEN_PIN")
        .expect("KEYFRONT_TEST_TOKEN_PIN: the user PIN of KEYFRONT_TEST_TOKEN_LABEL");
    Some((label, pin))
}

/// Whether the tests run on one pre-made token (tests that need two skip).
pub fn on_premade_token() -> bool {
    std::env::var_os("KEYFRONT_TEST_TOKEN_LABEL").is_some()
}

/// Held by the test (thread) that uses the pre-made token, until that test ends.
static PREMADE: Mutex<()> = Mutex::new(());

thread_local! {
    static PREMADE_HELD: std::cell::RefCell<Option<MutexGuard<'static, ()>>> =
        const { std::cell::RefCell::new(None) };
}

/// The pre-made token, emptied, for this test alone: waits until no other test holds it.
fn take_premade(label: &str, pin: &str) -> Pkcs11Config {
    PREMADE_HELD.with(|held| {
        assert!(
            held.borrow().is_none(),
            "this test takes a second token, which a pre-made token cannot give"
        );
        let guard = PREMADE
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *held.borrow_mut() = Some(guard);
    });
    let _guard = token_lock();
    let ctx = pkcs11::context(&module()).expect("PKCS#11 module loads");
    let slot = pkcs11::find_token(&ctx, label).expect("the pre-made token is there");
    let session = ctx.open_rw_session(slot).expect("session");
    let pin = AuthPin::from(pin.to_owned());
    match session.login(UserType::User, Some(&pin)) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
        }
        Err(error) => panic!("login to the pre-made token: {error}"),
    }
    for object in session.find_objects(&[]).expect("objects") {
        session
            .destroy_object(object)
            .expect("wipe the pre-made token");
    }
    drop(session);
    Pkcs11Config {
        pin,
        ..config(label)
    }
}

/// A fresh, empty token with a unique label (on a pre-made token: that token, wiped).
pub fn new_token(prefix: &str) -> Pkcs11Config {
    require_token();
    if let Some((label, pin)) = premade() {
        return take_premade(&label, &pin);
    }
    let _guard = token_lock();
    let ctx = pkcs11::context(&module()).expect("PKCS#11 module loads");
    let slot = ctx
        .get_all_slots()
        .expect("slots")
        .into_iter()
        .find(|slot| {
            ctx.get_token_info(*slot)
                .map(|info| !info.token_initialized())
                .unwrap_or(false)
        })
        .expect("a free slot (SoftHSM always has one; Kryoptic has the ones KRYOPTIC_CONF lists)");
    let label = format!("{prefix}-{:08x}", rand::random::<u32>());
    let so_pin = AuthPin::from(SO_PIN.to_owned());
    ctx.init_token(slot, &so_pin, &label).expect("init token");
    let session = ctx.open_rw_session(slot).expect("session");
    session
        .login(UserType::So, Some(&so_pin))
        .expect("SO login");
    session
        .init_pin(&AuthPin::from(USER_PIN.to_owned()))
        .expect("init user PIN");
    session.logout().expect("logout");
    drop(session);
    config(&label)
}

pub fn config(label: &str) -> Pkcs11Config {
    Pkcs11Config {
        module: module(),
        token_label: label.to_owned(),
        pin: AuthPin::from(USER_PIN.to_owned()),
        sessions: NonZeroUsize::new(2).expect("2 > 0"),
        kek_cache_capacity: NonZeroUsize::new(64).expect("64 > 0"),
    }
}

/// A second fresh token for a test that needs two; `None` on a pre-made token (the test says
/// it skipped).
pub fn second_token(prefix: &str) -> Option<Pkcs11Config> {
    if on_premade_token() {
        eprintln!("skipped: this test needs two tokens and runs on one pre-made token");
        return None;
    }
    Some(new_token(prefix))
}

/// A fresh token that went through the `keyfront init` ceremony.
pub fn initialized_token(prefix: &str) -> Pkcs11Config {
    let config = new_token(prefix);
    let _guard = token_lock();
    pkcs11::init_token(&config).expect("init ceremony");
    config
}

/// A second initialized token for a test that needs two (`None` on a pre-made token).
pub fn second_initialized_token(prefix: &str) -> Option<Pkcs11Config> {
    let config = second_token(prefix)?;
    let _guard = token_lock();
    pkcs11::init_token(&config).expect("init ceremony");
    Some(config)
}

pub fn open_hsm(config: &Pkcs11Config) -> Pkcs11Hsm {
    let _guard = token_lock();
    Pkcs11Hsm::open(config).expect("open HSM")
}

/// A domain over a fresh initialized token and a fresh data directory.
pub fn token_kms(prefix: &str) -> (Kms, tempfile::TempDir, Pkcs11Config) {
    let config = initialized_token(prefix);
    let dir = tempfile::tempdir().expect("tempdir");
    let hsm: Arc<dyn Hsm> = Arc::new(open_hsm(&config));
    let kms = Kms::open(hsm, dir.path(), KmsOptions::default()).expect("open kms");
    (kms, dir, config)
}

/// Issue 24, defect 1, on whichever store `open` opens (each call a new node on the same
/// store): rotation checks and remembered request_ids once shared the `r/` prefix, so a single
/// stored request_id stopped scheduled rotation for every tenant and request_ids were never
/// pruned. A store left by that layout is migrated at open: both work again, on the records it
/// holds.
#[cfg(feature = "test-hooks")]
pub fn check_key_layout_migration(open: impl Fn() -> Kms) {
    use keyfront::kms::PolicyUpdate;
    let name = |s: &str| -> keyfront::ids::Name { s.parse().expect("name") };
    let kms = open();
    let tenant = kms.create_tenant(&name("acme")).expect("tenant").id;
    kms.create_key(tenant, &name("default"), keyfront::keystore::Purpose::Data)
        .expect("key");
    kms.update_policy(
        tenant,
        &name("default"),
        &PolicyUpdate {
            rotation_period_secs: Some(60),
            ..PolicyUpdate::default()
        },
    )
    .expect("period");
    let done = keyfront::keystore::DoneRequest {
        rpc: "RotateKey".into(),
        response: vec![1, 2, 3],
        at: 1,
    };
    kms.store()
        .put_done_request("acme", "spiffe://x/officer", "rid-1", &done)
        .expect("remember");
    // Both owners read their own records only.
    assert_eq!(kms.store().rotation_checks().expect("checks").len(), 1);
    assert_eq!(
        kms.store().prune_done_requests(2, 100).expect("prune"),
        1,
        "the old response is pruned"
    );
    kms.store()
        .put_done_request("acme", "spiffe://x/officer", "rid-2", &done)
        .expect("remember");

    // What layout 1 left behind: the two owners' records under one prefix.
    kms.store()
        .dangerous_rewrite_as_layout1()
        .expect("rewrite as layout 1");
    assert!(
        kms.store().rotation_checks().is_err(),
        "layout 1 is what stopped scheduled rotation"
    );
    drop(kms);

    let kms = open();
    let checks = kms
        .store()
        .rotation_checks()
        .expect("rotation checks read again");
    assert_eq!(checks.len(), 1, "{checks:?}");
    assert_eq!(checks[0].0, tenant);
    assert_eq!(
        kms.store()
            .done_request("acme", "spiffe://x/officer", "rid-2")
            .expect("read"),
        Some(done),
        "the remembered response moved with the migration"
    );
    assert_eq!(
        kms.store().prune_done_requests(2, 100).expect("prune"),
        1,
        "and is pruned like any other"
    );
    assert_eq!(kms.store().rotation_checks().expect("checks").len(), 1);
    drop(kms);
    // A second open finds nothing to migrate.
    let kms = open();
    assert_eq!(kms.store().rotation_checks().expect("checks").len(), 1);
}

/// Issue 25, finding 4: approve and revoke each read a grant and wrote it back, with no
/// compare-and-set, so a revoker could be told REVOKED while the grant ended APPROVED. Races
/// `pairs` approvals against revocations, one on `approver` and one on `revoker` (the same
/// domain, or two nodes of a cluster): whenever the revocation answered REVOKED, the grant
/// stays revoked; a grant is never left approved after a revocation that succeeded.
pub fn check_grant_races(approver: &Kms, revoker: &Kms, pairs: usize) {
    use keyfront::keystore::GrantState;
    use keyfront::kms::GrantRequest;
    let name = |s: &str| -> keyfront::ids::Name { s.parse().expect("name") };
    let tenant = name("acme");
    if approver
        .store()
        .tenant_by_name(&tenant)
        .expect("read")
        .is_none()
    {
        approver.create_tenant(&tenant).expect("tenant");
    }
    let (mut approved_then_revoked, mut revoked_first) = (0, 0);
    for i in 0..pairs {
        let grant = revoker
            .request_grant(
                GrantRequest {
                    tenant: tenant.clone(),
                    reason: format!("race {i}"),
                    operations: vec!["Decrypt".into()],
                    keys: vec![name("default")],
                    duration: std::time::Duration::from_secs(3600),
                },
                "spiffe://x/support",
                std::time::Duration::from_secs(3600),
            )
            .expect("request");
        let barrier = std::sync::Barrier::new(2);
        let (approve, revoke) = std::thread::scope(|scope| {
            let approve = scope.spawn(|| {
                barrier.wait();
                approver.decide_grant(&grant.id, "spiffe://x/admin", true, |_| true)
            });
            let revoke = scope.spawn(|| {
                barrier.wait();
                revoker.revoke_grant(&grant.id, "spiffe://x/officer", |_| true)
            });
            (
                approve.join().expect("approve"),
                revoke.join().expect("revoke"),
            )
        });
        let revoke = revoke.expect("a revocation always answers");
        assert_eq!(revoke.state, GrantState::Revoked, "pair {i}: {revoke:?}");
        let stored = approver
            .store()
            .grant(&grant.id)
            .expect("read")
            .expect("grant");
        assert_eq!(
            stored.state,
            GrantState::Revoked,
            "pair {i}: the revoker was told REVOKED, the grant is {:?} (approve: {approve:?})",
            stored.state
        );
        match approve {
            Ok(_) => approved_then_revoked += 1,
            Err(_) => revoked_first += 1,
        }
    }
    eprintln!(
        "grant races: {approved_then_revoked} approved then revoked, {revoked_first} revoked before the approval"
    );
}
