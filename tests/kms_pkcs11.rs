//! The domain API against a real token (SoftHSM and Kryoptic in the test command): every operation, rotation, tenant isolation, tampering,
//! type confusion, purposes, re-created tenants, and a reopened store.

mod common;

use std::sync::Arc;

use keyfront::Error;
use keyfront::crypto::{EncryptionContext, Plaintext};
use keyfront::hsm::Hsm;
use keyfront::hsm::faulty::FaultyHsm;
use keyfront::ids::{KeyVersion, Name, TenantId};
use keyfront::keystore::Purpose;
use keyfront::kms::{Kms, KmsOptions};

fn name(s: &str) -> Name {
    s.parse().expect("valid name")
}

fn context(pairs: &[(&str, &str)]) -> EncryptionContext {
    pairs.iter().copied().collect()
}

/// A tenant with a DATA key `default` and a SECRETS key `secrets`.
fn tenant(kms: &Kms, tenant_name: &str) -> TenantId {
    let tenant = kms.create_tenant(&name(tenant_name)).expect("tenant").id;
    kms.create_key(tenant, &name("default"), Purpose::Data)
        .expect("data key");
    kms.create_key(tenant, &name("secrets"), Purpose::Secrets)
        .expect("secrets key");
    tenant
}

struct Blobs {
    ciphertext: Vec<u8>,
    data_key: Vec<u8>,
    sealed: Vec<u8>,
}

/// One blob of each kind a caller receives: a CIPHERTEXT, a DATA_KEY and a SECRET.
fn blobs(
    kms: &Kms,
    tenant: TenantId,
    ctx: &EncryptionContext,
    data: &[u8],
    secret: &[u8],
) -> Blobs {
    Blobs {
        ciphertext: kms
            .encrypt(tenant, &name("default"), &Plaintext::copy_from(data), ctx)
            .expect("encrypt")
            .ciphertext,
        data_key: kms
            .generate_data_key(tenant, &name("default"), ctx)
            .expect("data key")
            .wrapped,
        sealed: kms
            .seal_secret(tenant, &name("secrets"), &Plaintext::copy_from(secret), ctx)
            .expect("seal")
            .sealed,
    }
}

#[test]
fn every_operation_round_trips() {
    let (kms, _dir, _) = common::token_kms("roundtrip");
    let acme = tenant(&kms, "acme");
    let ctx = context(&[("table", "invoices"), ("row", "42")]);
    for size in [0usize, 1, 1024, 64 * 1024] {
        let plaintext = Plaintext::new(vec![0xA5; size]);
        let encrypted = kms
            .encrypt(acme, &name("default"), &plaintext, &ctx)
            .expect("encrypt");
        assert_eq!(encrypted.version, KeyVersion(1));
        let decrypted = kms
            .decrypt(acme, &encrypted.ciphertext, &ctx, None)
            .expect("decrypt");
        assert_eq!(
            decrypted.plaintext.expose_secret(),
            plaintext.expose_secret()
        );
        assert_eq!(decrypted.key_id, encrypted.key_id);
        kms.decrypt(acme, &encrypted.ciphertext, &ctx, Some(&name("default")))
            .expect("decrypt naming the key");
        assert!(matches!(
            kms.decrypt(acme, &encrypted.ciphertext, &ctx, Some(&name("secrets"))),
            Err(Error::Decrypt)
        ));
    }
    let data_key = kms
        .generate_data_key(acme, &name("default"), &ctx)
        .expect("data key");
    assert_eq!(data_key.plaintext.len(), 32);
    let again = kms
        .decrypt_data_key(acme, &data_key.wrapped, &ctx)
        .expect("decrypt data key");
    assert_eq!(
        again.plaintext.expose_secret(),
        data_key.plaintext.expose_secret()
    );

    let secret = Plaintext::copy_from(b"sk_live_0123456789");
    let sealed = kms
        .seal_secret(acme, &name("secrets"), &secret, &ctx)
        .expect("seal");
    let unsealed = kms
        .unseal_secret(acme, &sealed.sealed, &ctx)
        .expect("unseal");
    assert_eq!(unsealed.plaintext.expose_secret(), secret.expose_secret());
}

#[test]
fn rotation_keeps_every_older_version_decryptable() {
    let (kms, _dir, _) = common::token_kms("rotation");
    let acme = tenant(&kms, "acme");
    let ctx = context(&[("app", "billing")]);
    let mut ciphertexts = Vec::new();
    let mut data_keys = Vec::new();
    let mut secrets = Vec::new();
    for round in 1..=4u32 {
        let plaintext = Plaintext::copy_from(format!("message {round}").as_bytes());
        let encrypted = kms
            .encrypt(acme, &name("default"), &plaintext, &ctx)
            .expect("encrypt");
        assert_eq!(encrypted.version, KeyVersion(round));
        ciphertexts.push((encrypted, plaintext));
        data_keys.push(
            kms.generate_data_key(acme, &name("default"), &ctx)
                .expect("data key"),
        );
        let secret = Plaintext::copy_from(format!("secret {round}").as_bytes());
        secrets.push((
            kms.seal_secret(acme, &name("secrets"), &secret, &ctx)
                .expect("seal"),
            secret,
        ));
        let rotated = kms.rotate_key(acme, &name("default")).expect("rotate");
        assert_eq!(rotated.primary, KeyVersion(round + 1));
        kms.rotate_key(acme, &name("secrets"))
            .expect("rotate secrets");
    }
    for (encrypted, plaintext) in &ciphertexts {
        let decrypted = kms
            .decrypt(acme, &encrypted.ciphertext, &ctx, None)
            .expect("old version");
        assert_eq!(decrypted.version, encrypted.version);
        assert_eq!(
            decrypted.plaintext.expose_secret(),
            plaintext.expose_secret()
        );
    }
    for data_key in &data_keys {
        let again = kms
            .decrypt_data_key(acme, &data_key.wrapped, &ctx)
            .expect("old data key");
        assert_eq!(
            again.plaintext.expose_secret(),
            data_key.plaintext.expose_secret()
        );
    }
    for (sealed, secret) in &secrets {
        let again = kms
            .unseal_secret(acme, &sealed.sealed, &ctx)
            .expect("old secret");
        assert_eq!(again.plaintext.expose_secret(), secret.expose_secret());
    }
    let key = kms.key(acme, &name("default")).expect("key");
    assert_eq!((key.primary, key.latest), (KeyVersion(5), KeyVersion(5)));
}

#[test]
fn another_tenants_blobs_fail_with_one_opaque_error() {
    let (kms, _dir, _) = common::token_kms("isolation");
    let acme = tenant(&kms, "acme");
    let globex = tenant(&kms, "globex");
    let ctx = context(&[("k", "v")]);
    let Blobs {
        ciphertext,
        data_key,
        sealed,
    } = blobs(&kms, acme, &ctx, b"acme data", b"tok");
    // globex has keys with the same names, but other ids: nothing of acme's opens there.
    for key in [None, Some(name("default"))] {
        let result = kms.decrypt(globex, &ciphertext, &ctx, key.as_ref());
        assert!(matches!(result, Err(Error::Decrypt)), "{result:?}");
    }
    assert!(matches!(
        kms.decrypt_data_key(globex, &data_key, &ctx),
        Err(Error::Decrypt)
    ));
    assert!(matches!(
        kms.unseal_secret(globex, &sealed, &ctx),
        Err(Error::Decrypt)
    ));
    // The message is the same whatever failed.
    assert_eq!(Error::Decrypt.to_string(), "decryption failed");
}

#[test]
fn a_wrong_context_fails() {
    let (kms, _dir, _) = common::token_kms("context");
    let acme = tenant(&kms, "acme");
    let ctx = context(&[("order", "1001"), ("user", "7")]);
    let Blobs {
        ciphertext,
        data_key,
        sealed,
    } = blobs(&kms, acme, &ctx, b"x", b"y");
    let wrong_contexts = [
        context(&[]),
        context(&[("order", "1001")]),
        context(&[("order", "1002"), ("user", "7")]),
        context(&[("order", "1001"), ("user", "7"), ("extra", "")]),
        context(&[("Order", "1001"), ("user", "7")]),
        context(&[("order", "1001"), ("user", "7 ")]),
    ];
    for wrong in &wrong_contexts {
        assert!(matches!(
            kms.decrypt(acme, &ciphertext, wrong, None),
            Err(Error::Decrypt)
        ));
        assert!(matches!(
            kms.decrypt_data_key(acme, &data_key, wrong),
            Err(Error::Decrypt)
        ));
        assert!(matches!(
            kms.unseal_secret(acme, &sealed, wrong),
            Err(Error::Decrypt)
        ));
    }
}

#[test]
fn flipping_any_bit_fails_cleanly() {
    let (kms, _dir, _) = common::token_kms("bitflip");
    let acme = tenant(&kms, "acme");
    let ctx = context(&[("k", "v")]);
    let Blobs {
        ciphertext,
        data_key,
        sealed,
    } = blobs(&kms, acme, &ctx, b"sixteen byte msg", b"token");
    let flips = |blob: &[u8], open: &dyn Fn(&[u8]) -> Result<(), Error>| {
        for bit in 0..blob.len() * 8 {
            let mut bad = blob.to_vec();
            bad[bit / 8] ^= 1 << (bit % 8);
            let result = open(&bad);
            assert!(
                matches!(result, Err(Error::Decrypt)),
                "bit {bit}: {result:?}"
            );
        }
        for len in [0, 1, 21, 22, 33, blob.len() - 1] {
            assert!(
                matches!(open(&blob[..len]), Err(Error::Decrypt)),
                "truncated to {len}"
            );
        }
        let mut longer = blob.to_vec();
        longer.push(0);
        assert!(matches!(open(&longer), Err(Error::Decrypt)), "extended");
    };
    flips(&ciphertext, &|b| kms.decrypt(acme, b, &ctx, None).map(drop));
    flips(&data_key, &|b| {
        kms.decrypt_data_key(acme, b, &ctx).map(drop)
    });
    flips(&sealed, &|b| kms.unseal_secret(acme, b, &ctx).map(drop));
    // The originals still open: nothing was corrupted by the failures.
    kms.decrypt(acme, &ciphertext, &ctx, None)
        .expect("original ciphertext");
    kms.decrypt_data_key(acme, &data_key, &ctx)
        .expect("original data key");
    kms.unseal_secret(acme, &sealed, &ctx)
        .expect("original secret");
}

#[test]
fn blobs_of_another_type_are_refused_before_any_hsm_call() {
    let config = common::initialized_token("types");
    let hsm = Arc::new(FaultyHsm::new(common::open_hsm(&config)));
    let dir = tempfile::tempdir().expect("tempdir");
    let kms = Kms::open(
        Arc::clone(&hsm) as Arc<dyn Hsm>,
        dir.path(),
        KmsOptions::default(),
    )
    .expect("kms");
    let acme = tenant(&kms, "acme");
    let ctx = context(&[("k", "v")]);
    let key = kms.key(acme, &name("default")).expect("key");
    let bulk_key = kms
        .store()
        .tenant(acme)
        .expect("tenant db")
        .version(&key.id, KeyVersion(1))
        .expect("read")
        .expect("version 1")
        .bulk_key;
    let sealed = kms
        .seal_secret(acme, &name("secrets"), &Plaintext::copy_from(b"t"), &ctx)
        .expect("seal")
        .sealed;
    let data_key = kms
        .generate_data_key(acme, &name("default"), &ctx)
        .expect("dk")
        .wrapped;
    let ciphertext = kms
        .encrypt(acme, &name("default"), &Plaintext::copy_from(b"c"), &ctx)
        .expect("encrypt")
        .ciphertext;

    let before = hsm.total_calls();
    for wrong in [&bulk_key, &sealed, &ciphertext] {
        assert!(matches!(
            kms.decrypt_data_key(acme, wrong, &ctx),
            Err(Error::Decrypt)
        ));
    }
    for wrong in [&bulk_key, &data_key, &ciphertext] {
        assert!(matches!(
            kms.unseal_secret(acme, wrong, &ctx),
            Err(Error::Decrypt)
        ));
    }
    for wrong in [&bulk_key, &data_key, &sealed] {
        assert!(matches!(
            kms.decrypt(acme, wrong, &ctx, None),
            Err(Error::Decrypt)
        ));
    }
    assert_eq!(
        hsm.total_calls(),
        before,
        "no HSM call for a blob of the wrong type"
    );
}

#[test]
fn purposes_are_enforced() {
    let (kms, _dir, _) = common::token_kms("purpose");
    let acme = tenant(&kms, "acme");
    let ctx = EncryptionContext::new();
    let plaintext = Plaintext::copy_from(b"p");
    assert!(matches!(
        kms.encrypt(acme, &name("secrets"), &plaintext, &ctx),
        Err(Error::PurposeMismatch {
            purpose: Purpose::Secrets,
            ..
        })
    ));
    assert!(matches!(
        kms.generate_data_key(acme, &name("secrets"), &ctx),
        Err(Error::PurposeMismatch { .. })
    ));
    assert!(matches!(
        kms.seal_secret(acme, &name("default"), &plaintext, &ctx),
        Err(Error::PurposeMismatch {
            purpose: Purpose::Data,
            ..
        })
    ));
    assert!(matches!(
        kms.encrypt(acme, &name("missing"), &plaintext, &ctx),
        Err(Error::KeyNotFound(_))
    ));
}

#[test]
fn a_recreated_tenant_cannot_decrypt_the_old_tenants_data() {
    let (kms, _dir, _) = common::token_kms("recreate");
    let ctx = context(&[("k", "v")]);
    let old = tenant(&kms, "acme");
    let Blobs {
        ciphertext,
        data_key,
        sealed,
    } = blobs(&kms, old, &ctx, b"old data", b"old token");
    kms.destroy_tenant(old).expect("destroy");
    assert!(
        kms.decrypt(old, &ciphertext, &ctx, None).is_err(),
        "destroyed tenant is gone"
    );

    let new = tenant(&kms, "acme");
    assert_ne!(new, old);
    assert_eq!(kms.tenant(&name("acme")).expect("lookup").id, new);
    assert!(matches!(
        kms.decrypt(new, &ciphertext, &ctx, None),
        Err(Error::Decrypt)
    ));
    assert!(matches!(
        kms.decrypt_data_key(new, &data_key, &ctx),
        Err(Error::Decrypt)
    ));
    assert!(matches!(
        kms.unseal_secret(new, &sealed, &ctx),
        Err(Error::Decrypt)
    ));
    assert!(kms.store().is_destroyed(old).expect("tombstone"));
}

#[test]
fn a_reopened_store_on_the_same_token_finds_every_tenant_and_key() {
    let config = common::initialized_token("reopen");
    let dir = tempfile::tempdir().expect("tempdir");
    let ctx = context(&[("k", "v")]);
    let (acme, ciphertext, data_key, sealed) = {
        let hsm: Arc<dyn Hsm> = Arc::new(common::open_hsm(&config));
        let kms = Kms::open(hsm, dir.path(), KmsOptions::default()).expect("kms");
        let acme = tenant(&kms, "acme");
        tenant(&kms, "globex");
        kms.rotate_key(acme, &name("default")).expect("rotate");
        let ciphertext = kms
            .encrypt(
                acme,
                &name("default"),
                &Plaintext::copy_from(b"persisted"),
                &ctx,
            )
            .expect("encrypt")
            .ciphertext;
        let data_key = kms
            .generate_data_key(acme, &name("default"), &ctx)
            .expect("dk");
        let sealed = kms
            .seal_secret(acme, &name("secrets"), &Plaintext::copy_from(b"tok"), &ctx)
            .expect("seal")
            .sealed;
        (acme, ciphertext, data_key, sealed)
    };
    // A new HSM instance (new sessions, new login) and a new store on the same directory.
    let hsm: Arc<dyn Hsm> = Arc::new(common::open_hsm(&config));
    let kms = Kms::open(hsm, dir.path(), KmsOptions::default()).expect("reopen");
    let names: Vec<_> = kms
        .store()
        .tenants()
        .expect("tenants")
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names.len(), 2);
    assert_eq!(kms.tenant(&name("acme")).expect("acme").id, acme);
    let decrypted = kms
        .decrypt(acme, &ciphertext, &ctx, None)
        .expect("decrypt after reopen");
    assert_eq!(decrypted.plaintext.expose_secret(), b"persisted");
    assert_eq!(decrypted.version, KeyVersion(2));
    let again = kms
        .decrypt_data_key(acme, &data_key.wrapped, &ctx)
        .expect("data key");
    assert_eq!(
        again.plaintext.expose_secret(),
        data_key.plaintext.expose_secret()
    );
    kms.unseal_secret(acme, &sealed, &ctx).expect("secret");
    assert_eq!(
        kms.rotate_key(acme, &name("default"))
            .expect("rotate")
            .primary,
        KeyVersion(3)
    );
}

#[test]
fn cached_bulk_keys_keep_encrypt_working_while_the_hsm_is_down() {
    let config = common::initialized_token("outage");
    let hsm = Arc::new(FaultyHsm::new(common::open_hsm(&config)));
    let dir = tempfile::tempdir().expect("tempdir");
    let kms = Kms::open(
        Arc::clone(&hsm) as Arc<dyn Hsm>,
        dir.path(),
        KmsOptions::default(),
    )
    .expect("kms");
    let acme = tenant(&kms, "acme");
    let ctx = EncryptionContext::new();
    let ciphertext = kms
        .encrypt(acme, &name("default"), &Plaintext::copy_from(b"warm"), &ctx)
        .expect("encrypt")
        .ciphertext;
    hsm.set_down(true);
    let calls = hsm.total_calls();
    let during = kms
        .encrypt(
            acme,
            &name("default"),
            &Plaintext::copy_from(b"during outage"),
            &ctx,
        )
        .expect("encrypt with a cached bulk key");
    kms.decrypt(acme, &ciphertext, &ctx, None)
        .expect("decrypt with a cached bulk key");
    assert_eq!(hsm.total_calls(), calls, "served from memory");
    let result = kms.generate_data_key(acme, &name("default"), &ctx);
    assert!(
        matches!(&result, Err(Error::Hsm(e)) if e.is_unavailable()),
        "{result:?}"
    );
    hsm.set_down(false);
    kms.generate_data_key(acme, &name("default"), &ctx)
        .expect("recovered without restart");
    kms.decrypt(acme, &during.ciphertext, &ctx, None)
        .expect("decrypt");
}

#[test]
fn concurrent_operations_and_rotation_agree() {
    let (kms, _dir, _) = common::token_kms("concurrent");
    let acme = tenant(&kms, "acme");
    let kms = Arc::new(kms);
    let workers: Vec<_> = (0..4)
        .map(|worker| {
            let kms = Arc::clone(&kms);
            std::thread::spawn(move || {
                let ctx = context(&[("worker", &worker.to_string())]);
                for i in 0..50 {
                    let plaintext = Plaintext::copy_from(format!("{worker}/{i}").as_bytes());
                    let encrypted = kms
                        .encrypt(acme, &name("default"), &plaintext, &ctx)
                        .expect("encrypt");
                    let decrypted = kms
                        .decrypt(acme, &encrypted.ciphertext, &ctx, None)
                        .expect("decrypt");
                    assert_eq!(
                        decrypted.plaintext.expose_secret(),
                        plaintext.expose_secret()
                    );
                    if i % 10 == 0 {
                        let dk = kms
                            .generate_data_key(acme, &name("default"), &ctx)
                            .expect("dk");
                        kms.decrypt_data_key(acme, &dk.wrapped, &ctx)
                            .expect("decrypt dk");
                    }
                }
            })
        })
        .collect();
    for _ in 0..5 {
        kms.rotate_key(acme, &name("default")).expect("rotate");
    }
    for worker in workers {
        worker.join().expect("worker");
    }
    assert_eq!(
        kms.key(acme, &name("default")).expect("key").latest,
        KeyVersion(6)
    );
}

#[test]
fn unknown_tenants_and_names_are_reported() {
    let (kms, _dir, _) = common::token_kms("unknown");
    assert!(matches!(
        kms.tenant(&name("nobody")),
        Err(Error::TenantNotFound(_))
    ));
    let acme = tenant(&kms, "acme");
    assert!(matches!(
        kms.create_tenant(&name("acme")),
        Err(Error::Store(keyfront::keystore::Error::AlreadyExists(
            "tenant"
        )))
    ));
    assert!(matches!(
        kms.create_key(acme, &name("default"), Purpose::Data),
        Err(Error::Store(keyfront::keystore::Error::AlreadyExists(
            "key"
        )))
    ));
    assert!(matches!(
        kms.encrypt(
            TenantId::random(),
            &name("default"),
            &Plaintext::copy_from(b""),
            &EncryptionContext::new()
        ),
        Err(Error::Store(keyfront::keystore::Error::TenantNotFound(_)))
    ));
}

#[test]
fn expired_bulk_keys_leave_memory_and_come_back_through_the_hsm() {
    let config = common::initialized_token("ttl");
    let hsm = Arc::new(FaultyHsm::new(common::open_hsm(&config)));
    let dir = tempfile::tempdir().expect("tempdir");
    let options = KmsOptions {
        bulk_key_ttl: std::time::Duration::from_millis(200),
        ..KmsOptions::default()
    };
    let kms = Kms::open(Arc::clone(&hsm) as Arc<dyn Hsm>, dir.path(), options).expect("kms");
    let acme = tenant(&kms, "acme");
    let ctx = EncryptionContext::new();
    let encrypted = kms
        .encrypt(acme, &name("default"), &Plaintext::copy_from(b"x"), &ctx)
        .expect("encrypt");
    assert_eq!(kms.cached_bulk_keys(), 1);
    let decrypts = hsm.calls(keyfront::hsm::faulty::Op::Decrypt);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(kms.evict_expired_bulk_keys(), 0, "expired keys are dropped");
    kms.decrypt(acme, &encrypted.ciphertext, &ctx, None)
        .expect("decrypts after re-unwrapping");
    assert_eq!(
        hsm.calls(keyfront::hsm::faulty::Op::Decrypt),
        decrypts + 1,
        "the bulk key was decrypted by the HSM again"
    );
    assert_eq!(kms.cached_bulk_keys(), 1);
}

#[test]
fn the_in_memory_path_follows_rotation_and_destruction() {
    let (kms, _dir, _) = common::token_kms("hotpath");
    let acme = tenant(&kms, "acme");
    let (tenant_name, key) = (name("acme"), name("default"));
    let ctx = context(&[("k", "v")]);
    let plaintext = Plaintext::copy_from(b"hot");
    assert!(
        kms.encrypt_cached(&tenant_name, &key, &plaintext, &ctx)
            .is_none(),
        "nothing cached before first use"
    );
    assert_eq!(kms.tenant_id(&tenant_name).expect("id"), acme);
    let v1 = kms
        .encrypt(acme, &key, &plaintext, &ctx)
        .expect("slow path");
    let cached = kms
        .encrypt_cached(&tenant_name, &key, &plaintext, &ctx)
        .expect("now from memory")
        .expect("encrypts");
    assert_eq!(cached.version, KeyVersion(1));

    kms.rotate_key(acme, &key).expect("rotate");
    // Right after the rotation, memory never answers with the old primary.
    if let Some(result) = kms.encrypt_cached(&tenant_name, &key, &plaintext, &ctx) {
        assert_eq!(result.expect("encrypts").version, KeyVersion(2));
    }
    assert_eq!(
        kms.encrypt(acme, &key, &plaintext, &ctx)
            .expect("enc")
            .version,
        KeyVersion(2)
    );
    let hot = kms
        .encrypt_cached(&tenant_name, &key, &plaintext, &ctx)
        .expect("cached")
        .expect("encrypts");
    assert_eq!(hot.version, KeyVersion(2));

    let old = kms
        .decrypt_cached(&tenant_name, &v1.ciphertext, &ctx, None, None)
        .expect("v1 bulk key cached")
        .expect("decrypts");
    assert_eq!(old.plaintext.expose_secret(), b"hot");
    let wrong = context(&[("k", "w")]);
    assert!(matches!(
        kms.decrypt_cached(&tenant_name, &v1.ciphertext, &wrong, None, None),
        Some(Err(Error::Decrypt))
    ));
    assert!(matches!(
        kms.decrypt_cached(
            &tenant_name,
            &v1.ciphertext,
            &ctx,
            Some(&name("secrets")),
            None
        ),
        Some(Err(Error::Decrypt))
    ));
    assert!(matches!(
        kms.decrypt_cached(
            &tenant_name,
            &v1.ciphertext,
            &ctx,
            None,
            Some(&[name("other")])
        ),
        Some(Err(Error::PermissionDenied))
    ));
    assert!(matches!(
        kms.decrypt_cached(&tenant_name, b"garbage", &ctx, None, None),
        Some(Err(Error::Decrypt))
    ));
    kms.encrypt(acme, &name("secrets"), &plaintext, &ctx)
        .expect_err("purpose");

    kms.destroy_tenant(acme).expect("destroy");
    assert!(
        kms.encrypt_cached(&tenant_name, &key, &plaintext, &ctx)
            .is_none()
    );
    assert!(
        kms.decrypt_cached(&tenant_name, &v1.ciphertext, &ctx, None, None)
            .is_none()
    );
    assert!(kms.decrypt(acme, &v1.ciphertext, &ctx, None).is_err());
    let again = tenant(&kms, "acme");
    assert_ne!(again, acme);
    assert!(matches!(
        kms.decrypt_cached(&tenant_name, &v1.ciphertext, &ctx, None, None),
        None | Some(Err(Error::Decrypt))
    ));
    assert!(matches!(
        kms.decrypt(again, &v1.ciphertext, &ctx, None),
        Err(Error::Decrypt)
    ));
}

#[test]
fn a_slow_hsm_pauses_inline_calls_and_they_can_be_switched_off() {
    let config = common::initialized_token("inline");
    let hsm = Arc::new(FaultyHsm::new(common::open_hsm(&config)));
    let dir = tempfile::tempdir().expect("tempdir");
    let kms = Kms::open(
        Arc::clone(&hsm) as Arc<dyn Hsm>,
        dir.path(),
        KmsOptions::default(),
    )
    .expect("kms");
    let acme = tenant(&kms, "acme");
    let (tenant_name, key) = (name("acme"), name("default"));
    let ctx = EncryptionContext::new();
    assert_eq!(kms.tenant_id(&tenant_name).expect("id"), acme);
    kms.generate_data_key(acme, &key, &ctx)
        .expect("warms the key snapshot");
    assert!(
        kms.generate_data_key_cached(&tenant_name, &key, &ctx)
            .is_some(),
        "inline when fast"
    );

    hsm.set_delay(std::time::Duration::from_millis(60));
    let slow = kms.generate_data_key_cached(&tenant_name, &key, &ctx);
    assert!(
        slow.is_some_and(|r| r.is_ok()),
        "the slow call itself completes"
    );
    assert!(
        kms.generate_data_key_cached(&tenant_name, &key, &ctx)
            .is_none(),
        "after a slow call, HSM work goes back to blocking threads"
    );
    hsm.set_delay(std::time::Duration::ZERO);

    let dir = tempfile::tempdir().expect("tempdir");
    let options = KmsOptions {
        inline_hsm_calls: false,
        ..KmsOptions::default()
    };
    let off = Kms::open(Arc::clone(&hsm) as Arc<dyn Hsm>, dir.path(), options).expect("kms");
    let id = tenant(&off, "acme");
    off.tenant_id(&tenant_name).expect("id");
    off.generate_data_key(id, &key, &ctx).expect("warm");
    assert!(
        off.generate_data_key_cached(&tenant_name, &key, &ctx)
            .is_none()
    );
    assert!(
        off.encrypt_cached(&tenant_name, &key, &Plaintext::copy_from(b"x"), &ctx)
            .is_none_or(|r| r.is_ok()),
        "Encrypt never calls the HSM inline"
    );
}

/// The scheduler's index is written before the commit that schedules a destruction, so a crash
/// between them leaves an entry for a version that is not scheduled. The next run must drop
/// that entry and destroy nothing.
#[test]
fn a_stray_destruction_entry_destroys_nothing() {
    let (kms, _dir, _token) = common::token_kms("stray");
    let acme = tenant(&kms, "acme");
    let key = kms.key(acme, &name("default")).expect("key");
    kms.rotate_key(acme, &name("default")).expect("rotate");
    let ciphertext = kms
        .encrypt(
            acme,
            &name("default"),
            &Plaintext::new(b"kept".to_vec()),
            &context(&[]),
        )
        .expect("encrypt")
        .ciphertext;
    // As if the process died right after writing the index entry for v1 (due long ago).
    kms.store()
        .add_pending_destruction(&keyfront::keystore::PendingDestruction {
            tenant: acme,
            key_id: key.id,
            version: KeyVersion(1),
            at: 1,
        })
        .expect("index entry");
    assert!(kms.run_due_destructions().expect("run").is_empty());
    assert!(kms.store().pending_destructions().expect("list").is_empty());
    let details = kms.key_details(acme, &name("default")).expect("details");
    assert_eq!(
        details.versions[0].state,
        keyfront::keystore::VersionState::Enabled
    );
    kms.decrypt(acme, &ciphertext, &context(&[]), None)
        .expect("still decrypts");
}

/// A scheduled destruction is not executed before its window ends, and the index keeps the
/// real date when a scheduled version is scheduled again.
#[test]
fn destruction_waits_for_its_window() {
    let (kms, _dir, _token) = common::token_kms("window");
    let acme = tenant(&kms, "acme");
    kms.rotate_key(acme, &name("default")).expect("rotate");
    let first = kms
        .schedule_destruction(acme, &name("default"), KeyVersion(1))
        .expect("schedule");
    let again = kms
        .schedule_destruction(acme, &name("default"), KeyVersion(1))
        .expect("schedule again");
    assert_eq!(first.state, again.state, "rescheduling keeps the date");
    let entries = kms.store().pending_destructions().expect("list");
    let keyfront::keystore::VersionState::DestroyScheduled { at, .. } = first.state else {
        panic!("scheduled: {:?}", first.state);
    };
    assert_eq!(entries.iter().map(|e| e.at).collect::<Vec<_>>(), vec![at]);
    assert!(kms.run_due_destructions().expect("run").is_empty());
    // Cancelling removes the entry.
    kms.cancel_destruction(acme, &name("default"), KeyVersion(1))
        .expect("cancel");
    assert!(kms.store().pending_destructions().expect("list").is_empty());
    // The primary cannot be scheduled, and leaves no entry behind.
    let err = kms
        .schedule_destruction(acme, &name("default"), KeyVersion(2))
        .expect_err("primary");
    assert!(matches!(
        err,
        Error::KeyState {
            reason: "PRIMARY_VERSION",
            ..
        }
    ));
    assert!(kms.store().pending_destructions().expect("list").is_empty());
}

/// Usage limits: a version refuses to encrypt past its limit; the scheduler's rotation gives
/// the key a fresh version; counts survive a reopen (reserved uses count as used).
#[test]
fn usage_limits_refuse_then_rotation_renews() {
    let (kms, dir, token) = common::token_kms("usage");
    let acme = tenant(&kms, "acme");
    let update = keyfront::kms::PolicyUpdate {
        max_bulk_uses: Some(20),
        ..Default::default()
    };
    kms.update_policy(acme, &name("default"), &update)
        .expect("policy");
    let plaintext = Plaintext::new(b"counted".to_vec());
    for _ in 0..20 {
        kms.encrypt(acme, &name("default"), &plaintext, &context(&[]))
            .expect("within the limit");
    }
    let err = kms
        .encrypt(acme, &name("default"), &plaintext, &context(&[]))
        .expect_err("limit reached");
    assert!(matches!(
        err,
        Error::KeyState {
            reason: "USAGE_LIMIT_REACHED",
            ..
        }
    ));
    let rotated = kms.run_due_rotations().expect("rotations");
    assert_eq!(rotated.len(), 1, "{rotated:?}");
    assert_eq!(rotated[0].2, KeyVersion(2));
    let fresh = kms
        .encrypt(acme, &name("default"), &plaintext, &context(&[]))
        .expect("v2 encrypts");
    assert_eq!(fresh.version, KeyVersion(2));

    // KEK uses (HSM encryptions) have their own counter.
    let update = keyfront::kms::PolicyUpdate {
        max_kek_uses: Some(3),
        ..Default::default()
    };
    kms.update_policy(acme, &name("secrets"), &update)
        .expect("policy");
    // The version's bulk key was encrypted under its KEK once already: two uses are left.
    for _ in 0..2 {
        kms.seal_secret(acme, &name("secrets"), &plaintext, &context(&[]))
            .expect("within the limit");
    }
    assert!(matches!(
        kms.seal_secret(acme, &name("secrets"), &plaintext, &context(&[])),
        Err(Error::KeyState {
            reason: "USAGE_LIMIT_REACHED",
            ..
        })
    ));

    // After a reopen, what was reserved counts as used: v1 of secrets stays at its limit.
    drop(kms);
    let hsm: Arc<dyn Hsm> = Arc::new(common::open_hsm(&token));
    let kms = Kms::open(hsm, dir.path(), KmsOptions::default()).expect("reopen");
    assert!(matches!(
        kms.seal_secret(acme, &name("secrets"), &plaintext, &context(&[])),
        Err(Error::KeyState {
            reason: "USAGE_LIMIT_REACHED",
            ..
        })
    ));
}

fn fast_passwords() -> KmsOptions {
    KmsOptions {
        // Small Argon2 costs: these tests run in a debug build.
        password_params: keyfront::kms::PasswordParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        },
        ..KmsOptions::default()
    }
}

/// HashPassword/VerifyPassword (issue 6, story 1): the right password verifies, a wrong one does
/// not; a hash made for acme does not verify for globex; another token's pepper differs;
/// raised parameters ask for a rehash; malformed hashes and DATA keys are refused.
#[test]
fn passwords_verify_only_where_they_were_made() {
    let token = common::initialized_token("passwords");
    let dir = tempfile::tempdir().expect("tempdir");
    let hsm: Arc<dyn Hsm> = Arc::new(common::open_hsm(&token));
    let kms = Kms::open(Arc::clone(&hsm), dir.path(), fast_passwords()).expect("kms");
    let acme = tenant(&kms, "acme");
    let globex = tenant(&kms, "globex");
    let secrets = name("secrets");
    let right = Plaintext::new(b"correct horse battery staple".to_vec());
    let wrong = Plaintext::new(b"correct horse battery stapler".to_vec());
    let hash = kms.hash_password(acme, &secrets, &right).expect("hash");
    assert!(
        hash.starts_with("$argon2id$v=19$m=64,t=1,p=1,pv=1$"),
        "{hash}"
    );
    assert!(!hash.contains("correct"), "no password in the hash");
    let other = kms.hash_password(acme, &secrets, &right).expect("hash");
    assert_ne!(hash, other, "salted");

    let ok = kms
        .verify_password(acme, &secrets, &right, &hash)
        .expect("verify");
    assert!(ok.matches && !ok.rehash_needed);
    assert!(
        !kms.verify_password(acme, &secrets, &wrong, &hash)
            .expect("verify")
            .matches
    );
    assert!(
        !kms.verify_password(globex, &secrets, &right, &hash)
            .expect("verify")
            .matches,
        "a hash made for acme does not verify for globex"
    );
    assert!(matches!(
        kms.hash_password(acme, &name("default"), &right),
        Err(Error::PurposeMismatch { .. })
    ));
    for bad in [
        "",
        "$argon2id$v=19$m=64",
        "plain text",
        &hash.replace("pv=1", "pv=1,x=2"),
    ] {
        assert!(
            matches!(
                kms.verify_password(acme, &secrets, &right, bad),
                Err(Error::InvalidArgument(_))
            ),
            "{bad}"
        );
    }

    // Lookup digests are stable for a tenant and differ between tenants.
    let token_secret = Plaintext::new(b"api-token-123".to_vec());
    let digest = kms.lookup_digest(acme, &token_secret).expect("digest");
    assert_eq!(
        digest,
        kms.lookup_digest(acme, &token_secret).expect("digest")
    );
    assert_ne!(
        digest,
        kms.lookup_digest(globex, &token_secret).expect("digest")
    );
    kms.rotate_key(acme, &secrets).expect("rotate");
    assert_eq!(
        digest,
        kms.lookup_digest(acme, &token_secret).expect("digest"),
        "rotation does not change it"
    );

    // Raised costs: old hashes verify and ask for a rehash once their costs are listed as
    // accepted; until then they are refused, like any cost this server does not make (issue
    // 25, finding 2: a caller's hash string chose the Argon2 work).
    drop(kms);
    let mut stronger = fast_passwords();
    stronger.password_params.iterations = 2;
    let kms = Kms::open(Arc::clone(&hsm), dir.path(), stronger.clone()).expect("kms");
    assert!(matches!(
        kms.verify_password(acme, &secrets, &right, &hash),
        Err(Error::InvalidArgument(message)) if message.contains("accepted")
    ));
    drop(kms);
    stronger
        .accepted_password_params
        .push(fast_passwords().password_params);
    let kms = Kms::open(Arc::clone(&hsm), dir.path(), stronger).expect("kms");
    let raised = kms
        .verify_password(acme, &secrets, &right, &hash)
        .expect("verify");
    assert!(raised.matches && raised.rehash_needed);

    // Another token has another pepper: the same input gives another HMAC there.
    let Some(other_token) = common::second_initialized_token("passwords-other") else {
        return;
    };
    let other_hsm = common::open_hsm(&other_token);
    assert_ne!(
        hsm.hmac(keyfront::hsm::HmacKey::Pepper, b"same input")
            .expect("hmac"),
        other_hsm
            .hmac(keyfront::hsm::HmacKey::Pepper, b"same input")
            .expect("hmac")
    );
}

/// MAC keys on the token: both algorithms, MACs of older versions verify after a rotation and
/// a master key rotation, disabled and below-minimum versions refuse, a wrong MAC is simply
/// invalid, and purposes hold in both directions.
#[test]
fn mac_keys_generate_verify_rotate_and_refuse() {
    use keyfront::hsm::MacAlgorithm;
    use keyfront::kms::PolicyUpdate;

    let (kms, _dir, _) = common::token_kms("mackeys");
    let acme = tenant(&kms, "acme");
    for (key, algorithm) in [
        ("mac256", MacAlgorithm::HmacSha256),
        ("mac512", MacAlgorithm::HmacSha512),
    ] {
        let key = name(key);
        kms.create_key(acme, &key, Purpose::Mac(algorithm))
            .expect("MAC key");
        let first = kms.generate_mac(acme, &key, b"invoice 42").expect("mac");
        assert_eq!(first.version, KeyVersion(1));
        assert_eq!(first.mac.len(), algorithm.mac_len());
        let check = |version: Option<KeyVersion>, data: &[u8], mac: &[u8]| {
            kms.verify_mac(acme, &key, version, data, mac)
                .map(|out| (out.valid, out.version))
        };
        assert_eq!(
            check(None, b"invoice 42", &first.mac).ok(),
            Some((true, KeyVersion(1)))
        );
        assert_eq!(
            check(None, b"invoice 43", &first.mac).ok(),
            Some((false, KeyVersion(1)))
        );
        assert_eq!(
            check(None, b"invoice 42", &first.mac[1..]).ok(),
            Some((false, KeyVersion(1)))
        );
        assert_eq!(
            check(None, b"invoice 42", b"").ok(),
            Some((false, KeyVersion(1)))
        );

        kms.rotate_key(acme, &key).expect("rotate");
        let second = kms.generate_mac(acme, &key, b"invoice 42").expect("mac");
        assert_eq!(second.version, KeyVersion(2));
        assert_ne!(second.mac, first.mac);
        // The old MAC verifies under the version it names, not under the new primary.
        assert_eq!(
            check(Some(KeyVersion(1)), b"invoice 42", &first.mac).ok(),
            Some((true, KeyVersion(1)))
        );
        assert_eq!(
            check(None, b"invoice 42", &first.mac).ok(),
            Some((false, KeyVersion(2)))
        );
        assert!(matches!(
            check(Some(KeyVersion(3)), b"invoice 42", &first.mac),
            Err(Error::VersionNotFound { version: 3, .. })
        ));

        kms.disable_version(acme, &key, KeyVersion(1))
            .expect("disable");
        assert!(matches!(
            check(Some(KeyVersion(1)), b"invoice 42", &first.mac),
            Err(Error::KeyState {
                reason: "VERSION_DISABLED",
                ..
            })
        ));
        kms.enable_version(acme, &key, KeyVersion(1))
            .expect("enable");
        assert_eq!(
            check(Some(KeyVersion(1)), b"invoice 42", &first.mac).ok(),
            Some((true, KeyVersion(1)))
        );
        kms.update_policy(
            acme,
            &key,
            &PolicyUpdate {
                min_decryption_version: Some(2),
                ..PolicyUpdate::default()
            },
        )
        .expect("min version");
        assert!(matches!(
            check(Some(KeyVersion(1)), b"invoice 42", &first.mac),
            Err(Error::KeyState {
                reason: "BELOW_MIN_DECRYPTION_VERSION",
                ..
            })
        ));
        kms.disable_version(acme, &key, KeyVersion(2))
            .expect("disable primary");
        assert!(matches!(
            kms.generate_mac(acme, &key, b"x"),
            Err(Error::KeyState {
                reason: "VERSION_DISABLED",
                ..
            })
        ));
        kms.enable_version(acme, &key, KeyVersion(2))
            .expect("enable primary");
    }

    // A master key rotation re-wraps MAC keys; MACs made before it still verify.
    let before = kms.generate_mac(acme, &name("mac256"), b"m").expect("mac");
    kms.rotate_master_key().expect("rotate the master key");
    assert!(
        kms.verify_mac(
            acme,
            &name("mac256"),
            Some(before.version),
            b"m",
            &before.mac
        )
        .expect("verify")
        .valid
    );

    // Purposes, both ways.
    let ctx = EncryptionContext::new();
    assert!(matches!(
        kms.encrypt(acme, &name("mac256"), &Plaintext::copy_from(b"p"), &ctx),
        Err(Error::PurposeMismatch {
            purpose: Purpose::Mac(_),
            ..
        })
    ));
    assert!(matches!(
        kms.generate_data_key(acme, &name("mac256"), &ctx),
        Err(Error::PurposeMismatch { .. })
    ));
    assert!(matches!(
        kms.seal_secret(acme, &name("mac512"), &Plaintext::copy_from(b"s"), &ctx),
        Err(Error::PurposeMismatch { .. })
    ));
    for data_key in ["default", "secrets"] {
        assert!(matches!(
            kms.generate_mac(acme, &name(data_key), b"m"),
            Err(Error::PurposeMismatch { .. })
        ));
        assert!(matches!(
            kms.verify_mac(acme, &name(data_key), None, b"m", &before.mac),
            Err(Error::PurposeMismatch { .. })
        ));
    }
    // A ciphertext cannot be made to name a MAC key: its header names the key by id, and the
    // purpose is checked before anything is opened.
    let encrypted = kms
        .encrypt(acme, &name("default"), &Plaintext::copy_from(b"p"), &ctx)
        .expect("encrypt");
    let mac_id = kms.key(acme, &name("mac256")).expect("key").id;
    let mut forged = encrypted.ciphertext;
    forged[2..18].copy_from_slice(mac_id.as_bytes());
    assert!(matches!(
        kms.decrypt(acme, &forged, &ctx, None),
        Err(Error::Decrypt)
    ));
}

/// A MAC key survives a snapshot and a restore onto the same token: every version still
/// verifies the MACs it made, and the restored key still makes new ones.
#[test]
fn mac_keys_survive_backup_and_restore() {
    use keyfront::hsm::MacAlgorithm;

    let (kms, dir, config) = common::token_kms("macrestore");
    let acme = tenant(&kms, "acme");
    let key = name("mac");
    kms.create_key(acme, &key, Purpose::Mac(MacAlgorithm::HmacSha512))
        .expect("MAC key");
    let first = kms
        .generate_mac(acme, &key, b"before rotation")
        .expect("mac");
    kms.rotate_key(acme, &key).expect("rotate");
    let second = kms
        .generate_mac(acme, &key, b"after rotation")
        .expect("mac");
    let archive = keyfront::backup::create(&kms, &dir.path().join("backups"))
        .expect("snapshot")
        .path;
    drop(kms);

    let hsm: Arc<dyn Hsm> = Arc::new(common::open_hsm(&config));
    let target = dir.path().join("restored");
    keyfront::backup::restore::restore(&hsm, &archive, None, &target, Default::default())
        .expect("restore");
    let restored = Kms::open(hsm, &target, KmsOptions::default()).expect("open the restored store");
    let acme = restored
        .store()
        .tenant_by_name(&name("acme"))
        .expect("lookup")
        .expect("acme restored")
        .id;
    for (made, data) in [
        (&first, &b"before rotation"[..]),
        (&second, &b"after rotation"[..]),
    ] {
        let out = restored
            .verify_mac(acme, &key, Some(made.version), data, &made.mac)
            .expect("verify");
        assert!(out.valid, "version {} after the restore", made.version.0);
        assert_eq!(out.version, made.version);
    }
    let again = restored
        .generate_mac(acme, &key, b"after rotation")
        .expect("mac");
    assert_eq!(
        again.mac, second.mac,
        "HMAC is deterministic: the same key came back"
    );
}

/// Signing keys on the token: every algorithm signs messages and digests; signatures verify in
/// software and with openssl-free RustCrypto verifiers under the public key GetPublicKey gives;
/// older versions' signatures verify after a rotation and a master key rotation; disabled and
/// below-minimum versions refuse; a wrong signature is simply invalid; purposes hold both ways.
#[test]
fn signing_keys_sign_verify_rotate_and_refuse() {
    use keyfront::hsm::SignAlgorithm;
    use keyfront::kms::{PolicyUpdate, Signable};
    use p256::pkcs8::DecodePublicKey;

    let (kms, _dir, _) = common::token_kms("signkeys");
    let acme = tenant(&kms, "acme");
    for (key, algorithm) in [
        ("p256", SignAlgorithm::EcdsaP256Sha256),
        ("p384", SignAlgorithm::EcdsaP384Sha384),
        ("rsa", SignAlgorithm::RsaPss3072Sha256),
    ] {
        let key = name(key);
        kms.create_key(acme, &key, Purpose::Sign(algorithm))
            .expect("signing key");
        let message = b"release 1.2.3";
        let first = kms
            .sign(acme, &key, Signable::Message(message))
            .expect("sign");
        assert_eq!(first.version, KeyVersion(1));
        assert_eq!(first.algorithm, algorithm);
        let check = |version: Option<KeyVersion>, signable: Signable<'_>, signature: &[u8]| {
            kms.verify(acme, &key, version, signable, signature)
                .map(|out| (out.valid, out.version))
        };
        let valid_v1 = Some((true, KeyVersion(1)));
        let invalid_v1 = Some((false, KeyVersion(1)));
        assert_eq!(
            check(None, Signable::Message(message), &first.signature).ok(),
            valid_v1
        );
        // The digest of the message is the same thing signed.
        let digest = algorithm.digest(message);
        assert_eq!(
            check(None, Signable::Digest(&digest), &first.signature).ok(),
            valid_v1
        );
        let by_digest = kms
            .sign(acme, &key, Signable::Digest(&digest))
            .expect("sign");
        assert_eq!(
            check(None, Signable::Message(message), &by_digest.signature).ok(),
            valid_v1
        );
        assert_eq!(
            check(None, Signable::Message(b"release 1.2.4"), &first.signature).ok(),
            invalid_v1
        );
        assert_eq!(
            check(None, Signable::Message(message), &first.signature[1..]).ok(),
            invalid_v1
        );
        assert_eq!(
            check(None, Signable::Message(message), b"").ok(),
            invalid_v1
        );
        assert!(matches!(
            kms.sign(acme, &key, Signable::Digest(&digest[1..])),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            check(None, Signable::Digest(b"short"), &first.signature),
            Err(Error::InvalidArgument(_))
        ));

        // The public key verifies the signature outside keyfront too.
        let public = kms.public_key(acme, &key, None).expect("public key");
        assert_eq!(public.version, KeyVersion(1));
        assert!(public.pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        let outside = match algorithm {
            SignAlgorithm::EcdsaP256Sha256 => {
                use p256::ecdsa::signature::Verifier;
                let key = p256::ecdsa::VerifyingKey::from_public_key_der(&public.der).expect("key");
                let signature = p256::ecdsa::Signature::from_der(&first.signature).expect("DER");
                key.verify(message, &signature).is_ok()
            }
            SignAlgorithm::EcdsaP384Sha384 => {
                use p384::ecdsa::signature::Verifier;
                let key = p384::ecdsa::VerifyingKey::from_public_key_der(&public.der).expect("key");
                let signature = p384::ecdsa::Signature::from_der(&first.signature).expect("DER");
                key.verify(message, &signature).is_ok()
            }
            SignAlgorithm::RsaPss3072Sha256 => {
                use rsa::signature::Verifier;
                let key = rsa::RsaPublicKey::from_public_key_der(&public.der).expect("key");
                let signature =
                    rsa::pss::Signature::try_from(first.signature.as_slice()).expect("len");
                assert_eq!(first.signature.len(), 384);
                rsa::pss::VerifyingKey::<sha2::Sha256>::new(key)
                    .verify(message, &signature)
                    .is_ok()
            }
        };
        assert!(
            outside,
            "{algorithm:?}: the public key verifies the signature"
        );

        kms.rotate_key(acme, &key).expect("rotate");
        let second = kms
            .sign(acme, &key, Signable::Message(message))
            .expect("sign");
        assert_eq!(second.version, KeyVersion(2));
        let public2 = kms.public_key(acme, &key, None).expect("public key");
        assert_ne!(public2.der, public.der, "a new version is a new key pair");
        assert_eq!(
            kms.public_key(acme, &key, Some(KeyVersion(1)))
                .expect("v1")
                .der,
            public.der
        );
        // The old signature verifies under the version it names, not under the new primary.
        assert_eq!(
            check(
                Some(KeyVersion(1)),
                Signable::Message(message),
                &first.signature
            )
            .ok(),
            valid_v1
        );
        assert_eq!(
            check(None, Signable::Message(message), &first.signature).ok(),
            Some((false, KeyVersion(2)))
        );
        assert!(matches!(
            check(
                Some(KeyVersion(3)),
                Signable::Message(message),
                &first.signature
            ),
            Err(Error::VersionNotFound { version: 3, .. })
        ));

        kms.disable_version(acme, &key, KeyVersion(1))
            .expect("disable");
        assert!(matches!(
            check(
                Some(KeyVersion(1)),
                Signable::Message(message),
                &first.signature
            ),
            Err(Error::KeyState {
                reason: "VERSION_DISABLED",
                ..
            })
        ));
        assert!(matches!(
            kms.public_key(acme, &key, Some(KeyVersion(1))),
            Err(Error::KeyState {
                reason: "VERSION_DISABLED",
                ..
            })
        ));
        kms.enable_version(acme, &key, KeyVersion(1))
            .expect("enable");
        kms.update_policy(
            acme,
            &key,
            &PolicyUpdate {
                min_decryption_version: Some(2),
                ..PolicyUpdate::default()
            },
        )
        .expect("min version");
        assert!(matches!(
            check(
                Some(KeyVersion(1)),
                Signable::Message(message),
                &first.signature
            ),
            Err(Error::KeyState {
                reason: "BELOW_MIN_DECRYPTION_VERSION",
                ..
            })
        ));
        kms.disable_version(acme, &key, KeyVersion(2))
            .expect("disable primary");
        assert!(matches!(
            kms.sign(acme, &key, Signable::Message(b"x")),
            Err(Error::KeyState {
                reason: "VERSION_DISABLED",
                ..
            })
        ));
        kms.enable_version(acme, &key, KeyVersion(2))
            .expect("enable primary");
    }

    // A master key rotation re-wraps signing keys; the key pairs stay.
    let before = kms
        .sign(acme, &name("p256"), Signable::Message(b"m"))
        .expect("sign");
    kms.rotate_master_key().expect("rotate the master key");
    let after = kms
        .sign(acme, &name("p256"), Signable::Message(b"m"))
        .expect("sign");
    for signature in [&before.signature, &after.signature] {
        assert!(
            kms.verify(
                acme,
                &name("p256"),
                Some(before.version),
                Signable::Message(b"m"),
                signature
            )
            .expect("verify")
            .valid
        );
    }

    // Purposes, both ways.
    let ctx = EncryptionContext::new();
    assert!(matches!(
        kms.encrypt(acme, &name("p256"), &Plaintext::copy_from(b"p"), &ctx),
        Err(Error::PurposeMismatch {
            purpose: Purpose::Sign(_),
            ..
        })
    ));
    assert!(matches!(
        kms.generate_data_key(acme, &name("rsa"), &ctx),
        Err(Error::PurposeMismatch { .. })
    ));
    assert!(matches!(
        kms.seal_secret(acme, &name("p384"), &Plaintext::copy_from(b"s"), &ctx),
        Err(Error::PurposeMismatch { .. })
    ));
    assert!(matches!(
        kms.generate_mac(acme, &name("p256"), b"m"),
        Err(Error::PurposeMismatch { .. })
    ));
    kms.create_key(
        acme,
        &name("mac"),
        Purpose::Mac(keyfront::hsm::MacAlgorithm::HmacSha256),
    )
    .expect("MAC key");
    for other in ["default", "secrets", "mac"] {
        assert!(matches!(
            kms.sign(acme, &name(other), Signable::Message(b"m")),
            Err(Error::PurposeMismatch { .. })
        ));
        assert!(matches!(
            kms.verify(
                acme,
                &name(other),
                None,
                Signable::Message(b"m"),
                &before.signature
            ),
            Err(Error::PurposeMismatch { .. })
        ));
        assert!(matches!(
            kms.public_key(acme, &name(other), None),
            Err(Error::PurposeMismatch { .. })
        ));
    }
}

/// A signing key survives a snapshot and a restore onto the same token: the same key pairs
/// come back (old signatures verify, new ones verify under the old public keys).
#[test]
fn signing_keys_survive_backup_and_restore() {
    use keyfront::hsm::SignAlgorithm;
    use keyfront::kms::Signable;

    let (kms, dir, config) = common::token_kms("signrestore");
    let acme = tenant(&kms, "acme");
    let key = name("signer");
    kms.create_key(acme, &key, Purpose::Sign(SignAlgorithm::EcdsaP384Sha384))
        .expect("signing key");
    let first = kms
        .sign(acme, &key, Signable::Message(b"one"))
        .expect("sign");
    kms.rotate_key(acme, &key).expect("rotate");
    let second = kms
        .sign(acme, &key, Signable::Message(b"two"))
        .expect("sign");
    let public = kms.public_key(acme, &key, None).expect("public key");
    let archive = keyfront::backup::create(&kms, &dir.path().join("backups"))
        .expect("snapshot")
        .path;
    drop(kms);

    let hsm: Arc<dyn Hsm> = Arc::new(common::open_hsm(&config));
    let target = dir.path().join("restored");
    keyfront::backup::restore::restore(&hsm, &archive, None, &target, Default::default())
        .expect("restore");
    let restored = Kms::open(hsm, &target, KmsOptions::default()).expect("open the restored store");
    let acme = restored
        .store()
        .tenant_by_name(&name("acme"))
        .expect("lookup")
        .expect("acme restored")
        .id;
    for (made, message) in [(&first, &b"one"[..]), (&second, &b"two"[..])] {
        let out = restored
            .verify(
                acme,
                &key,
                Some(made.version),
                Signable::Message(message),
                &made.signature,
            )
            .expect("verify");
        assert!(out.valid, "version {} after the restore", made.version.0);
    }
    let again = restored
        .sign(acme, &key, Signable::Message(b"three"))
        .expect("sign");
    let digest = SignAlgorithm::EcdsaP384Sha384.digest(b"three");
    assert!(
        SignAlgorithm::EcdsaP384Sha384.verify(&public.der, &digest, &again.signature),
        "the same private key came back"
    );
}

/// Issue 24, defect 1: a store whose request_ids shared the rotation checks' prefix is
/// migrated at open, and scheduled rotation and request_id pruning work again (sled).
#[cfg(feature = "test-hooks")]
#[test]
fn a_store_of_key_layout_1_is_migrated_at_open() {
    let config = common::initialized_token("layout");
    let dir = tempfile::tempdir().expect("tempdir");
    let hsm: Arc<dyn Hsm> = Arc::new(common::open_hsm(&config));
    common::check_key_layout_migration(|| {
        Kms::open(Arc::clone(&hsm), dir.path(), KmsOptions::default()).expect("open kms")
    });
}

/// Issue 25, finding 4 on sled: approvals racing revocations never leave a grant approved
/// after a revocation that answered REVOKED.
#[test]
fn grant_decisions_racing_revocations_are_guarded() {
    let (kms, _dir, _) = common::token_kms("grant-races");
    common::check_grant_races(&kms, &kms, 200);
}
