//! Sequences of requests, built with `arbitrary`, through the real handlers of all three
//! services: authorization, conversion, the domain, the store and the audit log, over an
//! in-memory HSM and sled files in a temporary directory. What TLS would add (the caller's
//! identity) comes from a small cast of principals.
//!
//! Properties, on every call:
//! - no panic, and never UNKNOWN or INTERNAL: every refusal is a clear status;
//! - no error message holds a secret (plaintext, secret, password) the request carried;
//! - a ciphertext, sealed secret, wrapped data key or MAC with one byte changed never opens
//!   (or verifies);
//! - an untouched one that opens gives back exactly what was sealed.
//!
//! To reach past the name checks, a step may aim its tenant and key fields at the names that
//! exist (tenants `t0`, `t1`; keys `k0` for data, `k1` for secrets, `k2` for MACs) and hand on a blob an earlier step produced, changed or not.
#![no_main]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use keyfront::audit::{AuditLog, CheckpointPolicy};
use keyfront::clock::{Clock, SystemClock};
use keyfront::config::{DualControl, DualOperation, PrincipalConfig, Role, TenantScope};
use keyfront::hsm::memory::MemoryHsm;
use keyfront::ids::Name;
use keyfront::kms::{Kms, KmsOptions, PasswordParams};
use keyfront::service::InProcess;
use keyfront::service::auth::{IdentityError, PeerInfo};
use keyfront::service::pb;
use pb::access_service_server::AccessService as _;
use pb::admin_service_server::AdminService as _;
use pb::key_service_server::KeyService as _;
use tonic::{Code, Request, Status};

/// Put before every secret the fuzzer sends, so a leak is recognizable in a message.
const MARK: &[u8] = b"\x01kf-secret\x02";
const TENANTS: [&str; 3] = ["t0", "t1", "t2"];
const KEYS: [&str; 4] = ["k0", "k1", "k2", "k3"];

/// Who calls: the index picks one of these, or a caller without a usable identity.
const CALLERS: [&str; 8] = [
    "app",
    "app-k1",
    "officer-a",
    "officer-b",
    "support",
    "tenant-admin",
    "auditor",
    "nobody",
];

#[derive(Arbitrary, Debug)]
enum Call {
    Encrypt(pb::EncryptRequest),
    Decrypt(pb::DecryptRequest),
    BatchEncrypt(pb::BatchEncryptRequest),
    BatchDecrypt(pb::BatchDecryptRequest),
    GenerateDataKey(pb::GenerateDataKeyRequest),
    DecryptDataKey(pb::DecryptDataKeyRequest),
    SealSecret(pb::SealSecretRequest),
    UnsealSecret(pb::UnsealSecretRequest),
    ReEncrypt(pb::ReEncryptRequest),
    ReEncryptDataKey(pb::ReEncryptDataKeyRequest),
    HashPassword(pb::HashPasswordRequest),
    LookupDigest(pb::LookupDigestRequest),
    VerifyPassword(pb::VerifyPasswordRequest),
    GenerateMac(pb::GenerateMacRequest),
    VerifyMac(pb::VerifyMacRequest),
    Sign(pb::SignRequest),
    Verify(pb::VerifyRequest),
    GetPublicKey(pb::GetPublicKeyRequest),
    CreateTenant(pb::CreateTenantRequest),
    ListTenants(pb::ListTenantsRequest),
    DestroyTenant(pb::DestroyTenantRequest),
    CancelTenantDestruction(pb::CancelTenantDestructionRequest),
    CreateKey(pb::CreateKeyRequest),
    GetKey(pb::GetKeyRequest),
    ListKeys(pb::ListKeysRequest),
    RotateKey(pb::RotateKeyRequest),
    UpdateKeyPolicy(pb::UpdateKeyPolicyRequest),
    DisableKeyVersion(pb::KeyVersionRequest),
    EnableKeyVersion(pb::KeyVersionRequest),
    ScheduleKeyVersionDestruction(pb::KeyVersionRequest),
    CancelKeyVersionDestruction(pb::KeyVersionRequest),
    ApproveOperation(pb::ApproveOperationRequest),
    RotateMasterKey(pb::RotateMasterKeyRequest),
    GetMasterKeyStatus(pb::GetMasterKeyStatusRequest),
    ListApprovals(pb::ListApprovalsRequest),
    CreateBackup(pb::CreateBackupRequest),
    GetBackupStatus(pb::GetBackupStatusRequest),
    // GetImportParameters is left out: each makes an RSA-3072 key pair (up to seconds).
    ImportKeyMaterial(pb::ImportKeyMaterialRequest),
    RequestSupportAccess(pb::RequestSupportAccessRequest),
    ApproveSupportAccess(pb::DecideSupportAccessRequest),
    DenySupportAccess(pb::DecideSupportAccessRequest),
    RevokeGrant(pb::RevokeGrantRequest),
    ListGrants(pb::ListGrantsRequest),
    ReviewAccess(pb::ReviewAccessRequest),
}

#[derive(Arbitrary, Debug)]
struct Step {
    caller: u8,
    /// Replace the tenant and key fields with existing names (indexes into TENANTS, KEYS).
    aim: Option<(u8, u8)>,
    /// Replace the blob with one an earlier step produced; flip a byte if the mask is not 0.
    reuse: Option<(u8, u16, u8)>,
    call: Call,
}

/// How deep the run gets, printed every 4,096 inputs when `KEYFRONT_FUZZ_STATS` is set: calls
/// made, calls answered OK, reused blobs that opened, and changed blobs refused.
static CALLS: AtomicU64 = AtomicU64::new(0);
static ANSWERED: AtomicU64 = AtomicU64::new(0);
static PRODUCED: AtomicU64 = AtomicU64::new(0);
static OPENED: AtomicU64 = AtomicU64::new(0);
static REFUSED_CHANGED: AtomicU64 = AtomicU64::new(0);

/// A blob a step produced, and what it holds.
#[derive(Clone)]
struct Sealed {
    blob: Vec<u8>,
    inner: Vec<u8>,
}

struct State {
    runtime: tokio::runtime::Runtime,
    services: InProcess,
    /// Blobs of every kind made at setup, in t0, which every input starts with: a step can
    /// reuse (and change) one without having to make it first.
    seed: Produced,
    _dir: tempfile::TempDir,
}

fn principal(identity: &str, tenants: Option<&[&str]>, roles: &[Role]) -> PrincipalConfig {
    PrincipalConfig {
        identity: identity.to_owned(),
        tenants: match tenants {
            None => TenantScope::All,
            Some(names) => TenantScope::Only(names.iter().map(|n| name(n)).collect()),
        },
        roles: roles.to_vec(),
        keys: (identity == "app-k1").then(|| vec![name("k1")]),
    }
}

fn name(text: &str) -> Name {
    text.parse().expect("a valid name")
}

fn peer(caller: u8) -> PeerInfo {
    let index = usize::from(caller) % (CALLERS.len() + 1);
    PeerInfo {
        remote: SocketAddr::from(([127, 0, 0, 1], 4000)),
        identity: CALLERS
            .get(index)
            .map(|c| (*c).to_owned())
            .ok_or(IdentityError::NoCertificate),
        fingerprint: Some("00".repeat(32)),
        serial: keyfront::config::Serial::parse("01"),
        issuer: Vec::new(),
        not_after: 4_000_000_000,
        unaudited: false,
        active: Default::default(),
    }
}

fn request<T>(caller: u8, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(peer(caller));
    request
}

fn state() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        let options = KmsOptions {
            // Cheap hashes: the fuzzer is after the handlers, not Argon2.
            password_params: PasswordParams {
                memory_kib: 64,
                iterations: 1,
                parallelism: 1,
            },
            ..KmsOptions::default()
        };
        let kms = Kms::open_with_clock(
            Arc::new(MemoryHsm::new()),
            &dir.path().join("data"),
            options,
            Arc::clone(&clock),
        )
        .expect("open the domain");
        let audit = AuditLog::open(
            &dir.path().join("audit/audit.log"),
            "fuzz",
            clock,
            CheckpointPolicy::default(),
        )
        .expect("open the audit log");
        let tenants = &["t0", "t1", "t2"][..];
        let principals = [
            principal(
                "app",
                Some(tenants),
                &[Role::App, Role::Backup, Role::Secrets],
            ),
            principal("app-k1", Some(&["t0"]), &[Role::App]),
            principal("officer-a", None, &[Role::Officer]),
            principal("officer-b", None, &[Role::Officer]),
            principal("support", None, &[Role::Support]),
            principal("tenant-admin", Some(&["t0"]), &[Role::TenantAdmin]),
            principal("auditor", None, &[Role::Auditor]),
        ];
        let dual_control = DualControl {
            operations: [DualOperation::DestroyTenant, DualOperation::RotateMasterKey]
                .into_iter()
                .collect(),
            ..DualControl::default()
        };
        let services = InProcess::new(Arc::new(kms), Arc::new(audit), &principals, dual_control);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            for tenant in ["t0", "t1"] {
                let create = pb::CreateTenantRequest {
                    name: tenant.to_owned(),
                    ..Default::default()
                };
                services
                    .admin
                    .create_tenant(request(2, create))
                    .await
                    .expect("create tenant");
                for (key, purpose, algorithm) in [
                    ("k0", pb::KeyPurpose::Data, pb::KeyAlgorithm::Unspecified),
                    ("k1", pb::KeyPurpose::Secrets, pb::KeyAlgorithm::Unspecified),
                    ("k2", pb::KeyPurpose::Mac, pb::KeyAlgorithm::HmacSha256),
                    (
                        "k3",
                        pb::KeyPurpose::Sign,
                        pb::KeyAlgorithm::EcdsaP256Sha256,
                    ),
                ] {
                    let create = pb::CreateKeyRequest {
                        tenant: tenant.to_owned(),
                        name: key.to_owned(),
                        purpose: purpose.into(),
                        algorithm: algorithm.into(),
                        ..Default::default()
                    };
                    services
                        .admin
                        .create_key(request(2, create))
                        .await
                        .expect("create key");
                }
            }
        });
        let mut seed = Produced::default();
        runtime.block_on(async {
            let plain = |call| Step {
                caller: 0,
                aim: None,
                reuse: None,
                call,
            };
            let made = &mut seed;
            for i in 0u8..2 {
                let data = vec![i; 3 + usize::from(i) * 40];
                let steps = [
                    Call::Encrypt(pb::EncryptRequest {
                        tenant: "t0".into(),
                        key: "k0".into(),
                        plaintext: data.clone(),
                        ..Default::default()
                    }),
                    Call::GenerateDataKey(pb::GenerateDataKeyRequest {
                        tenant: "t0".into(),
                        key: "k0".into(),
                        ..Default::default()
                    }),
                    Call::SealSecret(pb::SealSecretRequest {
                        tenant: "t0".into(),
                        key: "k1".into(),
                        secret: data.clone(),
                        ..Default::default()
                    }),
                    Call::GenerateMac(pb::GenerateMacRequest {
                        tenant: "t0".into(),
                        key: "k2".into(),
                        data: data.clone(),
                        ..Default::default()
                    }),
                    Call::Sign(pb::SignRequest {
                        tenant: "t0".into(),
                        key: "k3".into(),
                        message: data,
                        ..Default::default()
                    }),
                ];
                for call in steps {
                    step(&services, made, plain(call)).await;
                }
            }
        });
        assert_eq!(
            (
                seed.ciphertexts.len(),
                seed.data_keys.len(),
                seed.secrets.len(),
                seed.macs.len(),
                seed.signatures.len()
            ),
            (2, 2, 2, 2, 2),
            "the seed blobs"
        );
        State {
            runtime,
            services,
            seed,
            _dir: dir,
        }
    })
}

/// A clear refusal: never UNKNOWN or INTERNAL, and no secret in the message.
fn clear(status: &Status, secret_in: Option<&str>) {
    assert!(
        !matches!(status.code(), Code::Unknown | Code::Internal),
        "unclear status: {status:?}"
    );
    assert!(!status.message().is_empty(), "no message: {status:?}");
    // The request's (redacting) Debug text: a mark there came in a name, not in a secret.
    if secret_in.is_none_or(|debug| !debug.contains("kf-secret")) {
        assert!(
            !status.message().contains("kf-secret"),
            "a secret in the message: {status:?}"
        );
    }
}

fn marked(secret: &mut Vec<u8>) -> Vec<u8> {
    let mut marked = MARK.to_vec();
    marked.append(secret);
    *secret = marked.clone();
    marked
}

/// Points the request's tenant and key fields at existing names.
trait Aim {
    fn aim(&mut self, tenant: &str, key: &str);
}

macro_rules! aim {
    ($($ty:ident { $($tenant:ident)? ; $($key:ident)? }),* $(,)?) => {
        $(impl Aim for pb::$ty {
            #[allow(unused_variables)]
            fn aim(&mut self, tenant: &str, key: &str) {
                $(self.$tenant = tenant.to_owned();)?
                $(self.$key = key.to_owned();)?
            }
        })*
    };
}

aim!(
    EncryptRequest { tenant; key },
    DecryptRequest { tenant; key },
    BatchEncryptRequest { tenant; key },
    BatchDecryptRequest { tenant; key },
    GenerateDataKeyRequest { tenant; key },
    DecryptDataKeyRequest { tenant; },
    SealSecretRequest { tenant; key },
    UnsealSecretRequest { tenant; },
    ReEncryptRequest { tenant; key },
    ReEncryptDataKeyRequest { tenant; },
    HashPasswordRequest { tenant; key },
    LookupDigestRequest { tenant; },
    VerifyPasswordRequest { tenant; key },
    GenerateMacRequest { tenant; key },
    VerifyMacRequest { tenant; key },
    SignRequest { tenant; key },
    VerifyRequest { tenant; key },
    GetPublicKeyRequest { tenant; key },
    CreateTenantRequest { name; },
    DestroyTenantRequest { name; },
    CancelTenantDestructionRequest { name; },
    CreateKeyRequest { tenant; name },
    GetKeyRequest { tenant; name },
    ListKeysRequest { tenant; },
    RotateKeyRequest { tenant; name },
    ImportKeyMaterialRequest { tenant; name },
    UpdateKeyPolicyRequest { tenant; name },
    KeyVersionRequest { tenant; name },
    RequestSupportAccessRequest { tenant; },
    ListGrantsRequest { tenant; },
    ListTenantsRequest { ; },
    ApproveOperationRequest { ; },
    RotateMasterKeyRequest { ; },
    GetMasterKeyStatusRequest { ; },
    ListApprovalsRequest { ; },
    CreateBackupRequest { ; },
    GetBackupStatusRequest { ; },
    DecideSupportAccessRequest { ; },
    RevokeGrantRequest { ; },
    ReviewAccessRequest { ; },
);

/// What a step hands on to later ones.
#[derive(Clone, Default)]
struct Produced {
    ciphertexts: Vec<Sealed>,
    secrets: Vec<Sealed>,
    data_keys: Vec<Sealed>,
    /// MACs, with the data they are of (in `inner`) and their version.
    macs: Vec<(Sealed, u32)>,
    /// Signatures, with the message they are of (in `inner`) and their version.
    signatures: Vec<(Sealed, u32)>,
}

/// The blob a step reuses: `None` to keep the fuzzer's own; `Some((blob, tampered, inner))`.
fn pick(pool: &[Sealed], reuse: Option<(u8, u16, u8)>) -> Option<(Vec<u8>, bool, Vec<u8>)> {
    let (index, position, mask) = reuse?;
    let sealed = pool.get(usize::from(index) % pool.len().max(1))?;
    let mut blob = sealed.blob.clone();
    if mask != 0 && !blob.is_empty() {
        let at = usize::from(position) % blob.len();
        blob[at] ^= mask;
    }
    Some((blob, mask != 0, sealed.inner.clone()))
}

/// A reused blob's outcome: a changed one never opens; an untouched one opens to what it held.
fn opened(reused: &Option<(Vec<u8>, bool, Vec<u8>)>, result: Result<&[u8], &Status>) {
    let Some((_, tampered, inner)) = reused else {
        return;
    };
    match result {
        Ok(out) => {
            assert!(!tampered, "a changed blob opened");
            assert_eq!(out, inner.as_slice(), "a blob opened to something else");
            OPENED.fetch_add(1, Ordering::Relaxed);
        }
        Err(status) => {
            clear(status, None);
            if *tampered {
                REFUSED_CHANGED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The outcome of a call whose answer is of no further interest.
fn done<T>(result: Result<tonic::Response<T>, Status>, debug: Option<&str>) {
    match result {
        Ok(_) => {
            ANSWERED.fetch_add(1, Ordering::Relaxed);
        }
        Err(status) => clear(&status, debug),
    }
}

async fn step(s: &InProcess, made: &mut Produced, step: Step) {
    let Step {
        caller,
        aim,
        reuse,
        mut call,
    } = step;
    let aimed = aim.map(|(t, k)| {
        (
            TENANTS[usize::from(t) % TENANTS.len()],
            KEYS[usize::from(k) % KEYS.len()],
        )
    });
    macro_rules! aimed {
        ($r:expr) => {
            if let Some((tenant, key)) = aimed {
                $r.aim(tenant, key);
            }
        };
    }
    // New tenants and keys only under the aimed names: the store stays bounded over a long
    // run. Invalid names still go through as they came, for the refusals.
    match &mut call {
        Call::CreateTenant(r) if r.name.parse::<Name>().is_ok() => r.name = "t2".to_owned(),
        Call::CreateKey(r) if r.name.parse::<Name>().is_ok() => r.name = "k2".to_owned(),
        _ => {}
    }
    match &mut call {
        Call::Encrypt(r) => aimed!(r),
        Call::Decrypt(r) => aimed!(r),
        Call::BatchEncrypt(r) => aimed!(r),
        Call::BatchDecrypt(r) => aimed!(r),
        Call::GenerateDataKey(r) => aimed!(r),
        Call::DecryptDataKey(r) => aimed!(r),
        Call::SealSecret(r) => aimed!(r),
        Call::UnsealSecret(r) => aimed!(r),
        Call::ReEncrypt(r) => aimed!(r),
        Call::ReEncryptDataKey(r) => aimed!(r),
        Call::HashPassword(r) => aimed!(r),
        Call::LookupDigest(r) => aimed!(r),
        Call::VerifyPassword(r) => aimed!(r),
        Call::GenerateMac(r) => aimed!(r),
        Call::VerifyMac(r) => aimed!(r),
        Call::Sign(r) => aimed!(r),
        Call::Verify(r) => aimed!(r),
        Call::GetPublicKey(r) => aimed!(r),
        Call::CreateTenant(r) => aimed!(r),
        Call::DestroyTenant(r) => aimed!(r),
        Call::CancelTenantDestruction(r) => aimed!(r),
        Call::CreateKey(r) => aimed!(r),
        Call::GetKey(r) => aimed!(r),
        Call::ListKeys(r) => aimed!(r),
        Call::RotateKey(r) => aimed!(r),
        Call::UpdateKeyPolicy(r) => aimed!(r),
        Call::DisableKeyVersion(r)
        | Call::EnableKeyVersion(r)
        | Call::ScheduleKeyVersionDestruction(r)
        | Call::CancelKeyVersionDestruction(r) => aimed!(r),
        Call::RequestSupportAccess(r) => aimed!(r),
        Call::ListGrants(r) => aimed!(r),
        Call::ListTenants(r) => aimed!(r),
        Call::ApproveOperation(r) => aimed!(r),
        Call::RotateMasterKey(r) => aimed!(r),
        Call::GetMasterKeyStatus(r) => aimed!(r),
        Call::ListApprovals(r) => aimed!(r),
        Call::CreateBackup(r) => aimed!(r),
        Call::GetBackupStatus(r) => aimed!(r),
        Call::ImportKeyMaterial(r) => aimed!(r),
        Call::ApproveSupportAccess(r) | Call::DenySupportAccess(r) => aimed!(r),
        Call::RevokeGrant(r) => aimed!(r),
        Call::ReviewAccess(r) => aimed!(r),
    }
    match call {
        Call::Encrypt(mut r) => {
            let inner = marked(&mut r.plaintext);
            let debug = format!("{r:?}");
            match s.keys.encrypt(request(caller, r)).await {
                Ok(out) => made.ciphertexts.push(Sealed {
                    blob: out.into_inner().ciphertext,
                    inner,
                }),
                Err(status) => clear(&status, Some(&debug)),
            }
        }
        Call::Decrypt(mut r) => {
            let reused = pick(&made.ciphertexts, reuse);
            if let Some((blob, ..)) = &reused {
                r.ciphertext.clone_from(blob);
                r.ciphertext_crc32c = None;
            }
            let result = s.keys.decrypt(request(caller, r)).await;
            match &result {
                Ok(out) => opened(&reused, Ok(&out.get_ref().plaintext)),
                Err(status) => {
                    clear(status, None);
                    opened(&reused, Err(status));
                }
            }
        }
        Call::BatchEncrypt(mut r) => {
            for item in &mut r.items {
                marked(&mut item.plaintext);
            }
            let debug = format!("{r:?}");
            match s.keys.batch_encrypt(request(caller, r)).await {
                Ok(out) => {
                    for result in out.into_inner().results {
                        if let Some(status) = result.status {
                            let code = Code::from(status.code);
                            assert!(!matches!(code, Code::Unknown | Code::Internal), "{code:?}");
                            if !debug.contains("kf-secret") {
                                assert!(!status.message.contains("kf-secret"));
                            }
                        }
                    }
                }
                Err(status) => clear(&status, Some(&debug)),
            }
        }
        Call::BatchDecrypt(mut r) => {
            let reused = pick(&made.ciphertexts, reuse);
            if let (Some((blob, ..)), Some(item)) = (&reused, r.items.first_mut()) {
                item.ciphertext.clone_from(blob);
                item.ciphertext_crc32c = None;
            }
            match s.keys.batch_decrypt(request(caller, r)).await {
                Ok(out) => {
                    let results = out.into_inner().results;
                    for result in &results {
                        if let Some(status) = &result.status {
                            let code = Code::from(status.code);
                            assert!(!matches!(code, Code::Unknown | Code::Internal), "{code:?}");
                        }
                    }
                    if let Some(first) = results.first() {
                        let ok = first.status.as_ref().is_none_or(|s| s.code == 0);
                        if ok {
                            opened(&reused, Ok(&first.plaintext));
                        }
                    }
                }
                Err(status) => clear(&status, None),
            }
        }
        Call::GenerateDataKey(mut r) => {
            r.include_plaintext = true;
            match s.keys.generate_data_key(request(caller, r)).await {
                Ok(out) => {
                    let out = out.into_inner();
                    made.data_keys.push(Sealed {
                        blob: out.wrapped_key,
                        inner: out.plaintext_key,
                    });
                }
                Err(status) => clear(&status, None),
            }
        }
        Call::DecryptDataKey(mut r) => {
            let reused = pick(&made.data_keys, reuse);
            if let Some((blob, ..)) = &reused {
                r.wrapped_key.clone_from(blob);
                r.wrapped_key_crc32c = None;
            }
            match s.keys.decrypt_data_key(request(caller, r)).await {
                Ok(out) => opened(&reused, Ok(&out.get_ref().plaintext_key)),
                Err(status) => {
                    clear(&status, None);
                    opened(&reused, Err(&status));
                }
            }
        }
        Call::SealSecret(mut r) => {
            let inner = marked(&mut r.secret);
            let debug = format!("{r:?}");
            match s.keys.seal_secret(request(caller, r)).await {
                Ok(out) => made.secrets.push(Sealed {
                    blob: out.into_inner().sealed,
                    inner,
                }),
                Err(status) => clear(&status, Some(&debug)),
            }
        }
        Call::UnsealSecret(mut r) => {
            let reused = pick(&made.secrets, reuse);
            if let Some((blob, ..)) = &reused {
                r.sealed.clone_from(blob);
                r.sealed_crc32c = None;
            }
            match s.keys.unseal_secret(request(caller, r)).await {
                Ok(out) => opened(&reused, Ok(&out.get_ref().secret)),
                Err(status) => {
                    clear(&status, None);
                    opened(&reused, Err(&status));
                }
            }
        }
        Call::ReEncrypt(mut r) => {
            let reused = pick(&made.ciphertexts, reuse);
            if let Some((blob, ..)) = &reused {
                r.ciphertext.clone_from(blob);
                r.ciphertext_crc32c = None;
            }
            let result = s.keys.re_encrypt(request(caller, r)).await;
            if let Some((_, tampered, _)) = &reused {
                assert!(
                    !(*tampered && result.is_ok()),
                    "a changed ciphertext re-encrypted"
                );
            }
            done(result, None);
        }
        Call::ReEncryptDataKey(mut r) => {
            let reused = pick(&made.data_keys, reuse);
            if let Some((blob, ..)) = &reused {
                r.wrapped_key.clone_from(blob);
                r.wrapped_key_crc32c = None;
            }
            let result = s.keys.re_encrypt_data_key(request(caller, r)).await;
            if let Some((_, tampered, _)) = &reused {
                assert!(
                    !(*tampered && result.is_ok()),
                    "a changed data key re-encrypted"
                );
            }
            done(result, None);
        }
        Call::HashPassword(mut r) => {
            marked(&mut r.password);
            let debug = format!("{r:?}");
            done(s.keys.hash_password(request(caller, r)).await, Some(&debug));
        }
        Call::LookupDigest(mut r) => {
            marked(&mut r.secret);
            let debug = format!("{r:?}");
            done(s.keys.lookup_digest(request(caller, r)).await, Some(&debug));
        }
        Call::VerifyPassword(mut r) => {
            // The server accepts Argon2 costs up to 1 GiB in a stored hash (the `phc` target
            // checks that bound); over 64 MiB would only trip this run's allocation limit.
            if keyfront::kms::password_hash_costs(&r.hash).is_some_and(|c| c.memory_kib > 65_536) {
                return;
            }
            marked(&mut r.password);
            let debug = format!("{r:?}");
            done(
                s.keys.verify_password(request(caller, r)).await,
                Some(&debug),
            );
        }
        Call::GenerateMac(mut r) => {
            let data = marked(&mut r.data);
            let debug = format!("{r:?}");
            match s.keys.generate_mac(request(caller, r)).await {
                Ok(out) => {
                    let out = out.into_inner();
                    made.macs.push((
                        Sealed {
                            blob: out.mac,
                            inner: data,
                        },
                        out.key_version,
                    ));
                }
                Err(status) => clear(&status, Some(&debug)),
            }
        }
        Call::VerifyMac(mut r) => {
            // A MAC made earlier, with its data and version; changed or not.
            let mut tampered = false;
            if let Some((index, position, mask)) = reuse {
                if let Some((sealed, version)) =
                    made.macs.get(usize::from(index) % made.macs.len().max(1))
                {
                    r.mac.clone_from(&sealed.blob);
                    r.data.clone_from(&sealed.inner);
                    r.key_version = *version;
                    r.data_crc32c = None;
                    if mask != 0 && !r.mac.is_empty() {
                        let at = usize::from(position) % r.mac.len();
                        r.mac[at] ^= mask;
                        tampered = true;
                    }
                }
            }
            let debug = format!("{r:?}");
            match s.keys.verify_mac(request(caller, r)).await {
                Ok(out) => {
                    assert!(!(tampered && out.get_ref().valid), "a changed MAC verified");
                    if tampered {
                        REFUSED_CHANGED.fetch_add(1, Ordering::Relaxed);
                    } else if out.get_ref().valid {
                        OPENED.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(status) => clear(&status, Some(&debug)),
            }
        }
        Call::Sign(mut r) => {
            let message = marked(&mut r.message);
            let debug = format!("{r:?}");
            match s.keys.sign(request(caller, r)).await {
                Ok(out) => {
                    let out = out.into_inner();
                    made.signatures.push((
                        Sealed {
                            blob: out.signature,
                            inner: message,
                        },
                        out.key_version,
                    ));
                }
                Err(status) => clear(&status, Some(&debug)),
            }
        }
        Call::Verify(mut r) => {
            // A signature made earlier, with its message and version; changed or not.
            let mut tampered = false;
            if let Some((index, position, mask)) = reuse {
                if let Some((sealed, version)) = made
                    .signatures
                    .get(usize::from(index) % made.signatures.len().max(1))
                {
                    r.signature.clone_from(&sealed.blob);
                    r.message.clone_from(&sealed.inner);
                    r.message_type = pb::MessageType::Raw.into();
                    r.key_version = *version;
                    r.message_crc32c = None;
                    if mask != 0 && !r.signature.is_empty() {
                        let at = usize::from(position) % r.signature.len();
                        r.signature[at] ^= mask;
                        tampered = true;
                    }
                }
            }
            let debug = format!("{r:?}");
            match s.keys.verify(request(caller, r)).await {
                Ok(out) => {
                    assert!(
                        !(tampered && out.get_ref().valid),
                        "a changed signature verified"
                    );
                    if tampered {
                        REFUSED_CHANGED.fetch_add(1, Ordering::Relaxed);
                    } else if out.get_ref().valid {
                        OPENED.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(status) => clear(&status, Some(&debug)),
            }
        }
        Call::GetPublicKey(r) => done(s.keys.get_public_key(request(caller, r)).await, None),
        Call::CreateTenant(r) => done(s.admin.create_tenant(request(caller, r)).await, None),
        Call::ListTenants(r) => done(s.admin.list_tenants(request(caller, r)).await, None),
        Call::DestroyTenant(r) => done(s.admin.destroy_tenant(request(caller, r)).await, None),
        Call::CancelTenantDestruction(r) => {
            done(
                s.admin.cancel_tenant_destruction(request(caller, r)).await,
                None,
            );
        }
        Call::CreateKey(r) => done(s.admin.create_key(request(caller, r)).await, None),
        Call::GetKey(r) => done(s.admin.get_key(request(caller, r)).await, None),
        Call::ListKeys(r) => done(s.admin.list_keys(request(caller, r)).await, None),
        Call::RotateKey(r) => done(s.admin.rotate_key(request(caller, r)).await, None),
        Call::UpdateKeyPolicy(r) => done(s.admin.update_key_policy(request(caller, r)).await, None),
        Call::DisableKeyVersion(r) => {
            done(s.admin.disable_key_version(request(caller, r)).await, None)
        }
        Call::EnableKeyVersion(r) => {
            done(s.admin.enable_key_version(request(caller, r)).await, None)
        }
        Call::ScheduleKeyVersionDestruction(r) => {
            done(
                s.admin
                    .schedule_key_version_destruction(request(caller, r))
                    .await,
                None,
            );
        }
        Call::CancelKeyVersionDestruction(r) => {
            done(
                s.admin
                    .cancel_key_version_destruction(request(caller, r))
                    .await,
                None,
            );
        }
        Call::ApproveOperation(r) => {
            done(s.admin.approve_operation(request(caller, r)).await, None)
        }
        Call::RotateMasterKey(r) => done(s.admin.rotate_master_key(request(caller, r)).await, None),
        Call::GetMasterKeyStatus(r) => done(
            s.admin.get_master_key_status(request(caller, r)).await,
            None,
        ),
        Call::ListApprovals(r) => done(s.admin.list_approvals(request(caller, r)).await, None),
        Call::CreateBackup(r) => done(s.admin.create_backup(request(caller, r)).await, None),
        Call::GetBackupStatus(r) => done(s.admin.get_backup_status(request(caller, r)).await, None),
        Call::ImportKeyMaterial(r) => {
            done(s.admin.import_key_material(request(caller, r)).await, None)
        }
        Call::RequestSupportAccess(r) => {
            done(
                s.access.request_support_access(request(caller, r)).await,
                None,
            );
        }
        Call::ApproveSupportAccess(r) => {
            done(
                s.access.approve_support_access(request(caller, r)).await,
                None,
            );
        }
        Call::DenySupportAccess(r) => {
            done(s.access.deny_support_access(request(caller, r)).await, None)
        }
        Call::RevokeGrant(r) => done(s.access.revoke_grant(request(caller, r)).await, None),
        Call::ListGrants(r) => done(s.access.list_grants(request(caller, r)).await, None),
        Call::ReviewAccess(r) => done(s.access.review_access(request(caller, r)).await, None),
    }
}

libfuzzer_sys::fuzz_target!(|steps: Vec<Step>| {
    let state = state();
    state.runtime.block_on(async {
        let mut made = state.seed.clone();
        // A bounded sequence: long ones only slow the run down.
        for one in steps.into_iter().take(16) {
            CALLS.fetch_add(1, Ordering::Relaxed);
            step(&state.services, &mut made, one).await;
        }
        let count = |p: &Produced| {
            p.ciphertexts.len()
                + p.secrets.len()
                + p.data_keys.len()
                + p.macs.len()
                + p.signatures.len()
        };
        let produced = count(&made) - count(&state.seed);
        PRODUCED.fetch_add(produced as u64, Ordering::Relaxed);
    });
    static INPUTS: AtomicU64 = AtomicU64::new(0);
    let inputs = INPUTS.fetch_add(1, Ordering::Relaxed) + 1;
    if inputs % (1 << 12) == 0 && std::env::var_os("KEYFRONT_FUZZ_STATS").is_some() {
        eprintln!(
            "handlers: {inputs} inputs, {} calls, {} answered OK without a blob, {} blobs produced, {} reused blobs opened, {} changed blobs refused",
            CALLS.load(Ordering::Relaxed),
            ANSWERED.load(Ordering::Relaxed),
            PRODUCED.load(Ordering::Relaxed),
            OPENED.load(Ordering::Relaxed),
            REFUSED_CHANGED.load(Ordering::Relaxed),
        );
    }
});
