//! No key bytes, plaintext, PIN or secret in any `Debug` output, error message or log line.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use keyfront::Error;
use keyfront::crypto::{EncryptionContext, Plaintext, SecretKey};
use keyfront::hsm::Hsm;
use keyfront::ids::Name;
use keyfront::keystore::Purpose;
use keyfront::kms::{Kms, KmsOptions};

const PLAINTEXT: &str = "CustomerCardNumber4111111111111111";
const SECRET: &str = "sk_live_SuperSecretApiToken";
const CONTEXT_VALUE: &str = "order-ContextValue-9876";

/// Every rendering of `bytes` that a careless `Debug` or log line could produce.
fn renderings(bytes: &[u8]) -> Vec<String> {
    let mut out = vec![hex::encode(bytes), format!("{bytes:?}")];
    if let Ok(text) = std::str::from_utf8(bytes) {
        out.push(text.to_owned());
    }
    if bytes.len() >= 8 {
        out.push(hex::encode(&bytes[..8]));
        out.push(
            format!("{:?}", &bytes[..8])
                .trim_end_matches(']')
                .to_owned(),
        );
    }
    out
}

fn assert_clean(text: &str, secrets: &[Vec<u8>]) {
    for secret in secrets {
        for rendering in renderings(secret) {
            assert!(
                !text.contains(&rendering),
                "found secret rendering {rendering:?} in:\n{text}"
            );
        }
    }
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn secret_types_and_results_never_print_their_contents() {
    let key_bytes = [0x3C; 32];
    let key = SecretKey::from_slice(&key_bytes).expect("32 bytes");
    let plaintext = Plaintext::copy_from(PLAINTEXT.as_bytes());
    let context: EncryptionContext = [("order", CONTEXT_VALUE)].into_iter().collect();
    let config = common::config("redaction");
    let shown =
        format!("{key:?} {key:#?} {plaintext:?} {plaintext:#?} {context:?} {config:?} {config:#?}");
    assert_clean(
        &shown,
        &[
            key_bytes.to_vec(),
            PLAINTEXT.as_bytes().to_vec(),
            CONTEXT_VALUE.as_bytes().to_vec(),
            common::USER_PIN.as_bytes().to_vec(),
        ],
    );
}

#[test]
fn operations_their_results_errors_and_logs_never_show_secrets() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let mut shown = String::new();
    let mut secrets = vec![
        PLAINTEXT.as_bytes().to_vec(),
        SECRET.as_bytes().to_vec(),
        CONTEXT_VALUE.as_bytes().to_vec(),
        common::USER_PIN.as_bytes().to_vec(),
    ];
    tracing::subscriber::with_default(subscriber, || {
        let config = common::initialized_token("redact");
        let dir = tempfile::tempdir().expect("tempdir");
        let hsm: Arc<dyn Hsm> = Arc::new(common::open_hsm(&config));
        let kms = Kms::open(hsm, dir.path(), KmsOptions::default()).expect("kms");
        let name = |s: &str| s.parse::<Name>().expect("name");
        let tenant = kms.create_tenant(&name("acme")).expect("tenant").id;
        kms.create_key(tenant, &name("data"), Purpose::Data)
            .expect("key");
        kms.create_key(tenant, &name("secrets"), Purpose::Secrets)
            .expect("key");
        let ctx: EncryptionContext = [("order", CONTEXT_VALUE)].into_iter().collect();
        let plaintext = Plaintext::copy_from(PLAINTEXT.as_bytes());
        let encrypted = kms
            .encrypt(tenant, &name("data"), &plaintext, &ctx)
            .expect("encrypt");
        let decrypted = kms
            .decrypt(tenant, &encrypted.ciphertext, &ctx, None)
            .expect("decrypt");
        let data_key = kms
            .generate_data_key(tenant, &name("data"), &ctx)
            .expect("data key");
        secrets.push(data_key.plaintext.expose_secret().to_vec());
        let sealed = kms
            .seal_secret(
                tenant,
                &name("secrets"),
                &Plaintext::copy_from(SECRET.as_bytes()),
                &ctx,
            )
            .expect("seal");
        let unsealed = kms
            .unseal_secret(tenant, &sealed.sealed, &ctx)
            .expect("unseal");
        shown.push_str(&format!(
            "{encrypted:?} {decrypted:?} {data_key:?} {sealed:?} {unsealed:?}"
        ));

        // Errors, each as Display and Debug, from failing paths that had secrets in hand.
        let wrong: EncryptionContext = [("order", "other")].into_iter().collect();
        let errors: Vec<Error> = vec![
            kms.decrypt(tenant, &encrypted.ciphertext, &wrong, None)
                .expect_err("wrong context"),
            kms.unseal_secret(tenant, &encrypted.ciphertext, &ctx)
                .expect_err("wrong type"),
            kms.encrypt(tenant, &name("secrets"), &plaintext, &ctx)
                .expect_err("purpose"),
            kms.seal_secret(
                tenant,
                &name("data"),
                &Plaintext::copy_from(SECRET.as_bytes()),
                &ctx,
            )
            .expect_err("purpose"),
        ];
        // A token nobody in this process is logged in to: PKCS#11 login state is per
        // application, so a logged-in token would not check the PIN again.
        let fresh = common::new_token("redact-pin");
        let mut wrong_pin = common::config(&fresh.token_label);
        wrong_pin.pin = cryptoki::types::AuthPin::from(format!("{}-wrong", common::USER_PIN));
        let pin_error = {
            let _guard = common::token_lock();
            keyfront::hsm::pkcs11::Pkcs11Hsm::open(&wrong_pin)
                .err()
                .expect("wrong PIN refused")
        };
        secrets.push(format!("{}-wrong", common::USER_PIN).into_bytes());
        for error in &errors {
            shown.push_str(&format!("{error} {error:?}\n"));
        }
        shown.push_str(&format!("{pin_error} {pin_error:?} {wrong_pin:?}\n"));
        tracing::info!(?encrypted, ?data_key, ?ctx, error = %errors[0], "a careless log line");
    });
    let logs = String::from_utf8(captured.0.lock().expect("capture").clone()).expect("utf-8");
    assert!(logs.contains("a careless log line"), "the capture works");
    assert_clean(&shown, &secrets);
    assert_clean(&logs, &secrets);
}
