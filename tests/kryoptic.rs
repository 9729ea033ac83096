//! keyfront on a second, independent PKCS#11 token as its users meet it: `keyfront dev --hsm
//! kryoptic` serves from a Kryoptic token, and a token that lacks a mechanism keyfront uses is
//! refused by `init` and at start with one line naming it. Tokens here are made by OpenSC's
//! `pkcs11-tool`, not by keyfront, and mechanisms are taken away through Kryoptic's own
//! configuration (`mechanisms = ["DENY", …]`), as a token that never had them would look.
//!
//! The module comes from `KEYFRONT_TEST_KRYOPTIC_MODULE` (scripts/test.sh builds it with
//! scripts/kryoptic.sh); without it these tests say so and pass, except under CI=true.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::dev_server::{BIN, DevServer, text};

const SO_PIN: &str = "12345678";
const USER_PIN: &str = "87654321";

/// Kryoptic's module, or `None` (with a message) when this run has none.
fn module() -> Option<PathBuf> {
    match std::env::var_os("KEYFRONT_TEST_KRYOPTIC_MODULE") {
        Some(path) => Some(PathBuf::from(path)),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("KEYFRONT_TEST_KRYOPTIC_MODULE is not set: run scripts/test.sh")
        }
        None => {
            eprintln!(
                "skipped: set KEYFRONT_TEST_KRYOPTIC_MODULE=$(scripts/kryoptic.sh module) to run"
            );
            None
        }
    }
}

/// A Kryoptic configuration of one slot whose store is `store`, without `denied` mechanisms.
fn write_conf(path: &Path, store: &Path, denied: &[&str]) {
    let mut text = format!(
        "[[slots]]\nslot = 1\ndbtype = \"sqlite\"\ndbargs = \"{}\"\n",
        store.display()
    );
    if !denied.is_empty() {
        let list: Vec<String> = denied.iter().map(|m| format!("\"{m}\"")).collect();
        text.push_str(&format!("mechanisms = [\"DENY\", {}]\n", list.join(", ")));
    }
    std::fs::write(path, text).expect("write kryoptic.conf");
}

fn pkcs11_tool(module: &Path, conf: &Path, args: &[&str]) -> Output {
    let output = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(module)
        .args(["--slot", "1"])
        .args(args)
        .env("KRYOPTIC_CONF", conf)
        .output()
        .expect("pkcs11-tool runs (softhsm/install.sh installs opensc)");
    assert!(
        output.status.success(),
        "pkcs11-tool {args:?}: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    output
}

/// A token labelled `label` in slot 1 of `conf`, made with pkcs11-tool, and a keyfront config
/// for it (PIN in the environment) in `dir`.
fn token_and_config(module: &Path, dir: &Path, conf: &Path, label: &str) -> PathBuf {
    pkcs11_tool(
        module,
        conf,
        &["--init-token", "--label", label, "--so-pin", SO_PIN],
    );
    pkcs11_tool(
        module,
        conf,
        &[
            "--login",
            "--login-type",
            "so",
            "--so-pin",
            SO_PIN,
            "--init-pin",
            "--pin",
            USER_PIN,
        ],
    );
    let config = dir.join("keyfront.toml");
    std::fs::write(
        &config,
        format!(
            "[hsm]\nmodule = \"{}\"\ntoken_label = \"{label}\"\npin_env = \"KEYFRONT_TEST_PIN\"\n\n[storage]\ndata_dir = \"data\"\n",
            module.display()
        ),
    )
    .expect("write config");
    config
}

fn keyfront(conf: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("SOFTHSM2_CONF")
        .env("KRYOPTIC_CONF", conf)
        .env("KEYFRONT_TEST_PIN", USER_PIN)
        .env("RUST_LOG", "warn")
        .output()
        .expect("keyfront runs")
}

/// What the token holds, as pkcs11-tool lists it after logging in.
fn objects(module: &Path, conf: &Path) -> String {
    text(
        &pkcs11_tool(
            module,
            conf,
            &["--login", "--pin", USER_PIN, "--list-objects"],
        )
        .stdout,
    )
}

/// Issue 26: `keyfront init` once succeeded on a token that `serve` could not use. A token
/// without AES-GCM is refused before anything is made on it, in one line that names it.
#[test]
fn init_refuses_a_token_without_a_mechanism_and_names_it() {
    let Some(module) = module() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("kryoptic.conf");
    write_conf(&conf, &dir.path().join("token.sql"), &["CKM_AES_GCM"]);
    let config = token_and_config(&module, dir.path(), &conf, "no-gcm");

    let init = keyfront(
        &conf,
        &["init", "--config", config.to_str().expect("utf-8")],
    );
    let stderr = text(&init.stderr);
    assert!(!init.status.success(), "init must refuse: {stderr}");
    assert!(
        stderr.contains("the token cannot serve keyfront")
            && stderr.contains("lacks mechanisms keyfront needs: CKM_AES_GCM"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        !objects(&module, &conf).contains("keyfront-"),
        "nothing made on the token"
    );

    // The same token with AES-GCM back: init succeeds, then selfcheck passes.
    let conf = dir.path().join("kryoptic-all.conf");
    write_conf(&conf, &dir.path().join("token.sql"), &[]);
    let init = keyfront(
        &conf,
        &["init", "--config", config.to_str().expect("utf-8")],
    );
    assert!(init.status.success(), "{}", text(&init.stderr));
    assert!(text(&init.stdout).contains("MWK generation 1"));
}

/// A token initialised while it offered RFC 5649 wrap (CKM_AES_KEY_WRAP_KWP on Kryoptic), then
/// started where it no longer does: selfcheck and serve stop with one line naming it, and the
/// same token with the mechanism back serves again (nothing was changed on it).
#[test]
fn start_refuses_a_token_that_no_longer_offers_the_wrap_mechanism() {
    let Some(module) = module() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("token.sql");
    let conf = dir.path().join("kryoptic.conf");
    write_conf(&conf, &store, &[]);
    let config = token_and_config(&module, dir.path(), &conf, "wraps");
    let config = config.to_str().expect("utf-8");
    let init = keyfront(&conf, &["init", "--config", config]);
    assert!(init.status.success(), "{}", text(&init.stderr));

    let denied = dir.path().join("kryoptic-no-kwp.conf");
    write_conf(&denied, &store, &["CKM_AES_KEY_WRAP_KWP"]);
    let check = keyfront(&denied, &["selfcheck", "--config", config]);
    let stderr = text(&check.stderr);
    assert!(!check.status.success(), "selfcheck must refuse: {stderr}");
    assert!(
        stderr.contains("lacks mechanisms keyfront needs: CKM_AES_KEY_WRAP_KWP"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

    let check = keyfront(&conf, &["selfcheck", "--config", config]);
    assert!(
        check.status.success(),
        "{}{}",
        text(&check.stdout),
        text(&check.stderr)
    );
    assert!(text(&check.stdout).contains("selfcheck passed"));
}

/// `keyfront dev --hsm kryoptic`: a Kryoptic token of its own, the ceremony, and a server that
/// encrypts and decrypts; run again, it reuses the directory without being told the token
/// again, refuses to mix tokens, and `keyfront serve` of its config on a token that lost the
/// wrap mechanism exits naming it.
#[test]
fn dev_serves_from_a_kryoptic_token() {
    let Some(module) = module() else { return };
    let module = module.to_str().expect("utf-8").to_owned();
    let dir = tempfile::tempdir().expect("tempdir");
    let server =
        DevServer::start_in_with_args(dir, &["--hsm", "kryoptic", "--hsm-module", &module]);
    let ciphertext = server.pipe(b"hello kryoptic", "encrypt", &["--key", "default"]);
    assert!(ciphertext.status.success(), "{}", text(&ciphertext.stderr));
    let plaintext = server.pipe(&ciphertext.stdout, "decrypt", &[]);
    assert!(plaintext.status.success(), "{}", text(&plaintext.stderr));
    assert_eq!(plaintext.stdout, b"hello kryoptic");
    let (dir, log, _) = server.stop();
    assert!(
        log.contains("created Kryoptic token \"keyfront-dev\""),
        "{log}"
    );
    // Nothing the token says is an ERROR for operators (cryptoki once logged one for every
    // mechanism code it could not name).
    assert!(!log.contains(" ERROR "), "{log}");
    let config = std::fs::read_to_string(dir.path().join("keyfront.toml")).expect("config");
    assert!(
        config.contains(&format!("module = \"{module}\"")),
        "{config}"
    );

    // Mixing tokens in one directory is refused before anything is touched.
    let mixed = Command::new(BIN)
        .args(["dev", "--hsm", "softhsm", "--dir"])
        .arg(dir.path())
        .output()
        .expect("keyfront runs");
    assert!(!mixed.status.success());
    assert!(
        text(&mixed.stderr).contains("holds a Kryoptic dev token"),
        "{}",
        text(&mixed.stderr)
    );

    // Again, without --hsm: the directory says which token it has; the old ciphertext still
    // decrypts.
    let server = DevServer::start_in_with_args(dir, &[]);
    let again = server.pipe(&ciphertext.stdout, "decrypt", &[]);
    assert_eq!(again.stdout, b"hello kryoptic", "{}", text(&again.stderr));
    let (dir, _, _) = server.stop();

    let hsm = dir.path().join("hsm");
    let denied = hsm.join("kryoptic-no-kwp.conf");
    write_conf(&denied, &hsm.join("token.sql"), &["CKM_AES_KEY_WRAP_KWP"]);
    let serve = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(dir.path().join("keyfront.toml"))
        .env("KRYOPTIC_CONF", &denied)
        .env("RUST_LOG", "warn")
        .output()
        .expect("keyfront serve runs");
    assert_eq!(serve.status.code(), Some(2), "{}", text(&serve.stderr));
    assert!(
        text(&serve.stderr).contains(
            "cannot start: the token cannot serve keyfront: it lacks mechanisms keyfront needs: CKM_AES_KEY_WRAP_KWP"
        ),
        "{}",
        text(&serve.stderr)
    );
}

/// `--hsm kryoptic` without a module, or with a cluster, is refused before anything is made,
/// saying what to pass instead (no Kryoptic needed).
#[test]
fn dev_on_kryoptic_says_what_it_needs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let no_module = Command::new(BIN)
        .args(["dev", "--hsm", "kryoptic", "--dir"])
        .arg(dir.path())
        .env_remove("KRYOPTIC_CONF")
        .output()
        .expect("keyfront runs");
    assert!(!no_module.status.success());
    let stderr = text(&no_module.stderr);
    assert!(
        stderr.contains("--hsm kryoptic needs --hsm-module PATH")
            && stderr.contains("scripts/kryoptic.sh module"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("hsm").exists() && !dir.path().join("keyfront.toml").exists(),
        "nothing made"
    );

    let cluster = Command::new(BIN)
        .args(["dev", "--nodes", "2", "--hsm", "kryoptic", "--dir"])
        .arg(dir.path())
        .env("KEYFRONT_DEV_POSTGRES_URL", "host=127.0.0.1 port=1")
        .output()
        .expect("keyfront runs");
    assert!(!cluster.status.success());
    assert!(
        text(&cluster.stderr).contains("--hsm kryoptic runs one node"),
        "{}",
        text(&cluster.stderr)
    );
}
