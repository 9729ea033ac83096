//! The `keyfront` binary as an operator runs it: token made by the softhsm/ scripts, `init`
//! once, `selfcheck` in two separate processes, and clear failures for a wrong PIN or config.

mod common;

use std::path::{Path, PathBuf};

use common::dev_server::{DevServer, text};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_keyfront");

struct Deployment {
    dir: tempfile::TempDir,
}

impl Deployment {
    /// A token of its own (own SOFTHSM2_CONF) made by softhsm/create-token.sh, and a config.
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let output = Command::new("softhsm/create-token.sh")
            .arg(dir.path().join("hsm"))
            .arg("cli-test")
            .output()
            .expect("create-token.sh runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "created");
        std::fs::write(
            dir.path().join("keyfront.toml"),
            "[hsm]\ntoken_label = \"cli-test\"\npin_file = \"hsm/pin\"\n\n[storage]\ndata_dir = \"data\"\n",
        )
        .expect("write config");
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn keyfront(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("SOFTHSM2_CONF", self.path("hsm/softhsm2.conf"))
            .env("RUST_LOG", "warn")
            .output()
            .expect("keyfront runs")
    }
}

#[test]
fn init_once_then_selfcheck_in_two_processes() {
    let deployment = Deployment::new();
    let config = deployment.path("keyfront.toml");
    let config = config.to_str().expect("utf-8 path");

    let init = deployment.keyfront(&["init", "--config", config]);
    assert!(init.status.success(), "{}", text(&init.stderr));
    assert!(text(&init.stdout).contains("MWK generation 1"));

    let again = deployment.keyfront(&["init", "--config", config]);
    assert_eq!(again.status.code(), Some(3), "{}", text(&again.stderr));
    assert!(text(&again.stderr).contains("init runs once per token"));

    // Issue 24, defect 6: selfcheck leaves nothing behind (it once left a `selfcheck-*`
    // tenant with two keys in the store at every run).
    for run in ["first", "second"] {
        let output = deployment.keyfront(&["selfcheck", "--config", config]);
        let stdout = text(&output.stdout);
        assert!(
            output.status.success(),
            "{run}: {stdout}{}",
            text(&output.stderr)
        );
        assert!(stdout.contains("selfcheck passed"), "{stdout}");
        assert!(
            stdout.contains("(0 tenants, 0 keys): every tenant database opened"),
            "{run} run: the store holds nothing of the first: {stdout}"
        );
        for done in [
            "MAC and signature",
            "data key and sealed secret",
            "a wrong context is refused",
        ] {
            assert!(stdout.contains(done), "{stdout}");
        }
    }
    assert!(
        !deployment.path("data/selfcheck.state").exists(),
        "no state file either"
    );
}

/// Issue 24, defect 6: the restore drill checks a *running* server with selfcheck. Offline,
/// selfcheck refuses a data directory the server holds and says how to check it instead;
/// online, it checks the server through its API as each dev principal, and stores nothing.
#[test]
fn selfcheck_checks_a_running_server_through_its_api() {
    let server = DevServer::start();
    let dir = server.dir.path();
    let offline = Command::new(BIN)
        .args(["selfcheck", "--config"])
        .arg(dir.join("keyfront.toml"))
        .env("SOFTHSM2_CONF", dir.join("hsm/softhsm2.conf"))
        .output()
        .expect("runs");
    assert_eq!(offline.status.code(), Some(1));
    let stderr = text(&offline.stderr);
    assert!(
        stderr.contains("is in use by a running keyfront") && stderr.contains("--endpoint"),
        "{stderr}"
    );
    assert!(!stderr.contains("WouldBlock"), "{stderr}");

    let endpoint = format!("https://localhost:{}", server.port);
    let online = Command::new(BIN)
        .args(["selfcheck", "--dir"])
        .arg(dir)
        .env("KEYFRONT_ENDPOINT", &endpoint)
        .output()
        .expect("runs");
    let stdout = text(&online.stdout);
    assert!(online.status.success(), "{stdout}{}", text(&online.stderr));
    for line in [
        "ok       health: SERVING",
        "ok       as acme-app: Encrypt and Decrypt with default: round trip; a wrong context is refused",
        "ok       as acme-backup: GenerateDataKey and DecryptDataKey with default: round trip",
        "ok       as acme-secrets: SealSecret and UnsealSecret with secrets: round trip",
        "ok       as officer: GetMasterKeyStatus: MWK generation 1",
        "selfcheck passed: 6 checks; nothing was stored",
    ] {
        assert!(stdout.contains(line), "{line}\n{stdout}");
    }
    // A principal whose role allows nothing that selfcheck does: not a pass.
    let nothing = Command::new(BIN)
        .args(["selfcheck", "--dir"])
        .arg(dir)
        .args(["--endpoint", &endpoint, "--principal", "acme-admin"])
        .output()
        .expect("runs");
    assert_eq!(nothing.status.code(), Some(1), "{}", text(&nothing.stdout));
    assert!(
        text(&nothing.stderr).contains("no operation could be checked"),
        "{}",
        text(&nothing.stderr)
    );
    // Still two tenants, and their keys as `keyfront dev` made them.
    let tenants = server.pipe(b"", "admin", &["list-tenants"]);
    let listing = text(&tenants.stdout);
    assert!(
        listing.contains("acme") && listing.contains("globex"),
        "{listing}"
    );
    assert!(!listing.contains("selfcheck"), "{listing}");
}

#[test]
fn create_token_is_idempotent_and_keeps_the_pin_private() {
    let deployment = Deployment::new();
    let output = Command::new("softhsm/create-token.sh")
        .arg(deployment.path("hsm"))
        .arg("cli-test")
        .output()
        .expect("runs");
    assert!(output.status.success());
    assert_eq!(text(&output.stdout).trim(), "exists");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(deployment.path("hsm/pin"))
        .expect("pin")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "PIN file is private");
    let conf = std::fs::read_to_string(deployment.path("hsm/softhsm2.conf")).expect("conf");
    assert!(conf.contains(&format!(
        "directories.tokendir = {}",
        deployment.path("hsm/tokens").display()
    )));
    assert!(!conf.contains("/var/lib/softhsm"));
}

#[test]
fn a_wrong_pin_stops_with_a_clear_message_and_no_pin_in_it() {
    let deployment = Deployment::new();
    let config = deployment.path("keyfront.toml");
    let init = deployment.keyfront(&["init", "--config", config.to_str().expect("utf-8")]);
    assert!(init.status.success(), "{}", text(&init.stderr));
    let wrong = deployment.path("wrong.toml");
    std::fs::write(
        &wrong,
        "[hsm]\ntoken_label = \"cli-test\"\npin_env = \"KF_WRONG_PIN\"\n[storage]\ndata_dir = \"data\"\n",
    )
    .expect("write");
    let output = Command::new(BIN)
        .args(["selfcheck", "--config", wrong.to_str().expect("utf-8")])
        .env("SOFTHSM2_CONF", deployment.path("hsm/softhsm2.conf"))
        .env("KF_WRONG_PIN", "0000-not-the-pin")
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("refused the PIN"), "{stderr}");
    assert!(!stderr.contains("0000-not-the-pin"), "{stderr}");
}

#[test]
fn an_invalid_config_lists_every_problem() {
    let deployment = Deployment::new();
    let bad = deployment.path("bad.toml");
    std::fs::write(
        &bad,
        "[hsm]\nmodule = \"/nope.so\"\ntoken_label = \"\"\n[storage]\ndata_dir = \"data\"\n",
    )
    .expect("write");
    let output = deployment.keyfront(&["init", "--config", bad.to_str().expect("utf-8")]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    for expected in ["hsm.module", "hsm.token_label", "pin_env and pin_file"] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in {stderr}"
        );
    }
    assert!(
        !Path::new(&deployment.path("data")).exists(),
        "nothing was created"
    );
}

/// `keyfront dev` makes a MAC key `mac`; `keyfront mac` prints VERSION:BASE64 and
/// `keyfront verify-mac` checks it (exit status 1 for a MAC that does not match).
#[test]
fn mac_then_verify_mac_on_the_dev_server() {
    let server = DevServer::start();
    let made = server.pipe(b"invoice 42", "mac", &["--key", "mac"]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    let mac = text(&made.stdout).trim().to_owned();
    assert!(mac.starts_with("1:"), "{mac}");
    let ok = server.pipe(b"invoice 42", "verify-mac", &["--key", "mac", &mac]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert_eq!(text(&ok.stdout).trim(), "valid");
    let bad = server.pipe(b"invoice 43", "verify-mac", &["--key", "mac", &mac]);
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(text(&bad.stdout).trim(), "invalid");
    let garbled = server.pipe(b"x", "verify-mac", &["--key", "mac", "no-version"]);
    assert_eq!(garbled.status.code(), Some(1));
    assert!(
        text(&garbled.stderr).contains("VERSION:BASE64"),
        "{}",
        text(&garbled.stderr)
    );
    let wrong_purpose = server.pipe(b"x", "mac", &["--key", "default"]);
    assert!(
        text(&wrong_purpose.stderr).contains("purpose DATA"),
        "{}",
        text(&wrong_purpose.stderr)
    );
    server.stop();
}

/// `keyfront dev` makes a SIGN key `signing` (ECDSA P-256); `keyfront sign` prints
/// VERSION:BASE64, `keyfront verify` checks it (exit status 1 when invalid), and the PEM that
/// `keyfront public-key` prints verifies the signature with openssl.
#[test]
fn sign_verify_and_public_key_on_the_dev_server() {
    use base64::Engine;
    let server = DevServer::start();
    let signed = server.pipe(b"release 1.0", "sign", &["--key", "signing"]);
    assert!(signed.status.success(), "{}", text(&signed.stderr));
    let signature = text(&signed.stdout).trim().to_owned();
    assert!(signature.starts_with("1:"), "{signature}");
    let ok = server.pipe(b"release 1.0", "verify", &["--key", "signing", &signature]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert_eq!(text(&ok.stdout).trim(), "valid");
    let bad = server.pipe(b"release 1.1", "verify", &["--key", "signing", &signature]);
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(text(&bad.stdout).trim(), "invalid");
    let garbled = server.pipe(b"x", "verify", &["--key", "signing", "no-version"]);
    assert_eq!(garbled.status.code(), Some(1));
    assert!(
        text(&garbled.stderr).contains("VERSION:BASE64"),
        "{}",
        text(&garbled.stderr)
    );
    // A digest made elsewhere signs and verifies as the message does.
    use sha2::Digest;
    let digest = sha2::Sha256::digest(b"release 1.0");
    let by_digest = server.pipe(
        &digest,
        "verify",
        &["--key", "signing", "--digest", &signature],
    );
    assert!(by_digest.status.success(), "{}", text(&by_digest.stderr));
    let short = server.pipe(&digest[1..], "sign", &["--key", "signing", "--digest"]);
    assert_eq!(short.status.code(), Some(1));
    assert!(
        text(&short.stderr).contains("digest"),
        "{}",
        text(&short.stderr)
    );

    let public = server.pipe(b"", "public-key", &["--key", "signing"]);
    assert!(public.status.success(), "{}", text(&public.stderr));
    let pem = text(&public.stdout);
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("key.pem"), &pem).expect("pem");
    std::fs::write(dir.path().join("message"), b"release 1.0").expect("message");
    let (_, encoded) = signature.split_once(':').expect("VERSION:BASE64");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("base64");
    std::fs::write(dir.path().join("signature"), raw).expect("signature");
    let openssl = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(dir.path().join("key.pem"))
        .arg("-signature")
        .arg(dir.path().join("signature"))
        .arg(dir.path().join("message"))
        .output()
        .expect("openssl runs");
    assert!(openssl.status.success(), "{}", text(&openssl.stdout));

    let wrong_purpose = server.pipe(b"x", "sign", &["--key", "default"]);
    assert!(
        text(&wrong_purpose.stderr).contains("purpose DATA"),
        "{}",
        text(&wrong_purpose.stderr)
    );
    server.stop();
}

/// Key import through the CLI, both ways a key owner does it: material wrapped elsewhere with
/// `openssl pkeyutl` for the PEM `admin import-parameters` wrote (RSAES-OAEP-SHA-1, as AWS KMS
/// documents it), and `admin import-key --material` wrapping here (RSA-AES key wrap). The
/// imported HMAC key MACs as `openssl dgst -hmac` does with the same bytes; the imported DATA
/// key encrypts and decrypts; RotateKey is refused; GetKey shows the origin.
#[test]
fn key_import_with_openssl_and_with_the_cli() {
    let server = DevServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let admin = |args: &[&str]| {
        let out = server.pipe(b"", "admin", args);
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };

    let (code, json, stderr) = admin(&[
        "import-parameters",
        "acme",
        "webhooks",
        "--wrapping",
        "rsaes-oaep-sha1",
        "--public-key-out",
        &path("import.pem"),
        "--json",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let parameters: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let token = parameters["import_token"]
        .as_str()
        .expect("token")
        .to_owned();
    assert_eq!(parameters["wrapping_algorithm"], "RSAES_OAEP_SHA_1");
    let material: [u8; 32] = rand::random();
    std::fs::write(path("material"), material).expect("material");
    let openssl = Command::new("openssl")
        .args([
            "pkeyutl",
            "-encrypt",
            "-pubin",
            "-inkey",
            &path("import.pem"),
        ])
        .args(["-in", &path("material"), "-out", &path("wrapped")])
        .args(["-pkeyopt", "rsa_padding_mode:oaep"])
        .args([
            "-pkeyopt",
            "rsa_oaep_md:sha1",
            "-pkeyopt",
            "rsa_mgf1_md:sha1",
        ])
        .output()
        .expect("openssl runs");
    assert!(openssl.status.success(), "{}", text(&openssl.stderr));
    let (code, json, stderr) = admin(&[
        "import-key",
        "acme",
        "webhooks",
        "--purpose",
        "hmac-sha256",
        "--wrapped",
        &path("wrapped"),
        "--token",
        &token,
        "--json",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let key: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(key["origin"], "EXTERNAL");
    assert_eq!(key["primary_version"], 1);

    let made = server.pipe(b"event 7", "mac", &["--key", "webhooks"]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    let (_, encoded) = text(&made.stdout)
        .trim()
        .split_once(':')
        .map(|(v, m)| (v.to_owned(), m.to_owned()))
        .expect("VERSION:BASE64");
    std::fs::write(path("event"), b"event 7").expect("event");
    let reference = Command::new("openssl")
        .args(["dgst", "-sha256", "-binary", "-mac", "HMAC"])
        .args(["-macopt", &format!("hexkey:{}", hex::encode(material))])
        .arg(path("event"))
        .output()
        .expect("openssl runs");
    assert!(reference.status.success(), "{}", text(&reference.stderr));
    use base64::Engine;
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("base64"),
        reference.stdout,
        "the imported key MACs as openssl does with the same bytes"
    );

    // Wrapped here: RSA-AES key wrap, with an expiry, into a DATA key.
    let data_material: [u8; 32] = rand::random();
    std::fs::write(path("data-material"), data_material).expect("material");
    let (code, _, stderr) = admin(&[
        "import-key",
        "acme",
        "byok",
        "--purpose",
        "data",
        "--material",
        &path("data-material"),
        "--valid-for",
        "365d",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let sealed = server.pipe(b"customer data", "encrypt", &["--key", "byok"]);
    assert!(sealed.status.success(), "{}", text(&sealed.stderr));
    let opened = server.pipe(&sealed.stdout, "decrypt", &[]);
    assert!(opened.status.success(), "{}", text(&opened.stderr));
    assert_eq!(opened.stdout, b"customer data");
    let (code, json, stderr) = admin(&["get-key", "acme", "byok", "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let key: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(key["origin"], "EXTERNAL");
    assert_eq!(key["versions"][0]["origin"], "EXTERNAL");
    assert!(
        key["versions"][0]["expire_time"].as_i64().is_some(),
        "{json}"
    );

    // Refusals name what to do.
    let (code, _, stderr) = admin(&["rotate-key", "acme", "byok"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("FAILED_PRECONDITION") && stderr.contains("ImportKeyMaterial"),
        "{stderr}"
    );
    let (code, _, stderr) = admin(&["import-parameters", "acme", "default"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("KEY_NOT_IMPORTED"), "{stderr}");
    let (code, _, stderr) = admin(&[
        "import-key",
        "acme",
        "webhooks",
        "--wrapped",
        &path("wrapped"),
        "--token",
        "0123",
    ]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("IMPORT_TOKEN_MISMATCH"), "{stderr}");
    let (code, _, stderr) = admin(&[
        "import-parameters",
        "acme",
        "webhooks",
        "--wrapping",
        "rsaes-oaep-sha256",
    ]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("FAILED_PRECONDITION") && stderr.contains("SHA-256"),
        "SoftHSM 2.6 has no RSA-OAEP with SHA-256: {stderr}"
    );
    server.stop();
}

#[test]
fn dev_then_encrypt_pipe_decrypt_prints_hi_and_leaks_nothing() {
    let server = DevServer::start();
    let encrypted = server.pipe(b"hi\n", "encrypt", &["--key", "default"]);
    assert!(encrypted.status.success(), "{}", text(&encrypted.stderr));
    let decrypted = server.pipe(&encrypted.stdout, "decrypt", &[]);
    assert!(decrypted.status.success(), "{}", text(&decrypted.stderr));
    assert_eq!(text(&decrypted.stdout), "hi\n");

    // Markers through every data path, then search the audit log and the server's logs.
    let marker = "MARKER-cli-plaintext-5e3a";
    let context = "row=MARKER-cli-context-1b7c";
    let out = server.pipe(
        marker.as_bytes(),
        "encrypt",
        &["--key", "default", "--context", context],
    );
    assert!(out.status.success());
    let back = server.pipe(&out.stdout, "decrypt", &["--context", context]);
    assert_eq!(text(&back.stdout), marker);
    let wrong = server.pipe(&out.stdout, "decrypt", &["--context", "row=other"]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        text(&wrong.stderr).contains("decryption failed"),
        "{}",
        text(&wrong.stderr)
    );
    let globex = server.pipe(
        &out.stdout,
        "decrypt",
        &["--principal", "globex-app", "--context", context],
    );
    assert!(!globex.status.success(), "another tenant cannot decrypt");

    let (dir, logs, status) = server.stop();
    assert_eq!(status, 0, "SIGTERM is a clean shutdown:\n{logs}");
    assert!(logs.contains("shutting down"), "{logs}");
    let audit = std::fs::read_to_string(dir.path().join("audit/audit.log")).expect("audit");
    for secret in [marker, "MARKER-cli-context-1b7c"] {
        assert!(!audit.contains(secret), "{secret} in the audit log");
        assert!(!logs.contains(secret), "{secret} in the server's logs");
    }
    let pin = std::fs::read_to_string(dir.path().join("hsm/pin")).expect("pin");
    assert!(!logs.contains(pin.trim()) && !audit.contains(pin.trim()));
    assert!(
        audit
            .lines()
            .filter(|l| l.contains("\"kind\":\"request\""))
            .count()
            >= 6
    );
}

#[test]
fn dev_reuses_what_exists_and_serve_with_a_wrong_pin_exits_naming_the_pin() {
    let server = DevServer::start();
    let ciphertext = server
        .pipe(b"kept", "encrypt", &["--key", "default"])
        .stdout;
    let (dir, _, _) = server.stop();
    let ca = std::fs::read(dir.path().join("certs/ca.crt")).expect("ca");

    // Same directory again: same CA, same token, the old ciphertext still decrypts.
    let again = DevServer::start_in(dir);
    let decrypted = again.pipe(&ciphertext, "decrypt", &[]);
    assert!(decrypted.status.success(), "{}", text(&decrypted.stderr));
    assert_eq!(decrypted.stdout, b"kept");
    let (dir, logs, _) = again.stop();
    assert_eq!(
        std::fs::read(dir.path().join("certs/ca.crt")).expect("ca"),
        ca,
        "CA reused"
    );
    assert!(!logs.contains("created tenant"), "tenants reused:\n{logs}");

    // serve with a wrong PIN: exits non-zero, names the PIN, does not retry.
    let config = std::fs::read_to_string(dir.path().join("keyfront.toml")).expect("config");
    let wrong = config.replace("pin_file = \"hsm/pin\"", "pin_env = \"KF_WRONG\"");
    std::fs::write(dir.path().join("wrong.toml"), wrong).expect("write");
    let started = std::time::Instant::now();
    let output = Command::new(BIN)
        .args(["--log-format", "json", "serve", "--config"])
        .arg(dir.path().join("wrong.toml"))
        .env("SOFTHSM2_CONF", dir.path().join("hsm/softhsm2.conf"))
        .env("KF_WRONG", "not-the-pin-000")
        .output()
        .expect("serve runs");
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    assert!(
        text(&output.stderr).contains("refused the PIN"),
        "{}",
        text(&output.stderr)
    );
    assert!(!text(&output.stderr).contains("not-the-pin-000"));
    let logs: Vec<serde_json::Value> = text(&output.stderr)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("log lines are JSON"))
        .collect();
    assert!(
        logs.iter().any(|l| l["level"] == "ERROR"),
        "an ERROR line in JSON: {logs:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "no retry loop"
    );
}

/// `keyfront admin`: a table by default, JSON with --json, and a refusal that names the
/// principal, the status and the next step.
#[test]
fn admin_commands_print_tables_json_and_clear_errors() {
    let server = DevServer::start();
    let admin = |args: &[&str]| {
        let out = server.pipe(b"", "admin", args);
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let (code, table, stderr) = admin(&["list-tenants"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(table.starts_with("TENANT"), "{table}");
    assert!(
        table.contains("acme") && table.contains("globex"),
        "{table}"
    );

    let (code, _, stderr) = admin(&["rotate-key", "acme", "default"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, _, stderr) = admin(&["schedule-destruction", "acme", "default", "1"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, json, stderr) = admin(&["get-key", "acme", "default", "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let key: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(key["primary_version"], 2);
    assert_eq!(key["versions"][0]["state"], "DESTROY_SCHEDULED");
    assert_eq!(key["versions"][1]["state"], "ENABLED");
    let (code, _, stderr) = admin(&["cancel-destruction", "acme", "default", "1"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, table, _) = admin(&[
        "update-key-policy",
        "acme",
        "default",
        "--rotation-period",
        "90d",
    ]);
    assert_eq!(code, Some(0));
    assert!(table.contains("90d"), "{table}");

    // Refusals: who, which status, what next.
    let (code, _, stderr) = admin(&["--principal", "acme-app", "list-tenants"]);
    assert_eq!(code, Some(1));
    for expected in [
        "PERMISSION_DENIED",
        "acme-app",
        "next:",
        "--principal officer",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in {stderr}"
        );
    }
    let (code, _, stderr) = admin(&["schedule-destruction", "acme", "default", "2"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("FAILED_PRECONDITION") && stderr.contains("PRIMARY_VERSION"),
        "{stderr}"
    );
    let (code, _, stderr) = admin(&["get-key", "acme", "nope"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("NOT_FOUND") && stderr.contains("list-keys"),
        "{stderr}"
    );
}

/// RotateMasterKey killed at each of its steps (an abort at a failpoint, as `kill -9` would),
/// and once with a real SIGKILL mid-rotation, resumes on the next start and loses nothing
/// (issue 5, story 3).
#[cfg(feature = "test-hooks")]
#[test]
fn master_key_rotation_resumes_after_a_crash_at_every_step() {
    let crashes: [(&str, bool); 6] = [
        ("mwk:journal-written", false),
        ("mwk:created", false),
        ("mwk:tenant-committed", false),
        ("mwk:cursor-moved", false),
        ("mwk:finished", false),
        ("pause:mwk:tenant-committed", true),
    ];
    for (failpoint, sigkill) in crashes {
        let server = DevServer::start_in_with_env(
            tempfile::tempdir().expect("tempdir"),
            &[("KEYFRONT_FAILPOINT", failpoint)],
        );
        let acme = server.pipe(b"acme secret", "encrypt", &["--key", "default"]);
        assert!(acme.status.success(), "{}", text(&acme.stderr));
        let globex = server.pipe(
            b"globex secret",
            "encrypt",
            &["--key", "default", "--principal", "globex-app"],
        );
        assert!(globex.status.success(), "{}", text(&globex.stderr));
        let (dir, logs) = if sigkill {
            // The rotation stops inside the step; the client waits, so send it off and kill.
            let endpoint = format!("https://localhost:{}", server.port);
            let dir_path = server.dir.path().to_path_buf();
            let client = std::thread::spawn(move || {
                Command::new(BIN)
                    .args(["admin", "rotate-master-key", "--dir"])
                    .arg(&dir_path)
                    .args(["--endpoint", &endpoint])
                    .output()
                    .expect("client")
            });
            std::thread::sleep(std::time::Duration::from_millis(1500));
            let killed = server.kill9();
            let _ = client.join();
            killed
        } else {
            let out = server.pipe(b"", "admin", &["rotate-master-key"]);
            assert!(!out.status.success(), "the server died at {failpoint}");
            let (dir, logs, _) = server.stop();
            (dir, logs)
        };
        assert!(
            logs.contains(&format!(
                "failpoint {}",
                failpoint.trim_start_matches("pause:")
            )),
            "{failpoint}: {logs}"
        );

        let server = DevServer::start_in(dir);
        let mut status = serde_json::Value::Null;
        for _ in 0..100 {
            let out = server.pipe(b"", "admin", &["master-key-status", "--json"]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            status = serde_json::from_str(&text(&out.stdout)).expect("JSON");
            if status["current_generation"] == 2 && status["rotating_to"].is_null() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if failpoint == "mwk:journal-written" && status["current_generation"] == 1 {
            panic!("{failpoint}: the journal was not resumed: {status}");
        }
        assert_eq!(status["current_generation"], 2, "{failpoint}: {status}");
        assert!(status["rotating_to"].is_null(), "{failpoint}: {status}");
        assert_eq!(
            status["generations"][0]["state"], "RETIRED",
            "{failpoint}: {status}"
        );
        let back = server.pipe(&acme.stdout, "decrypt", &[]);
        assert_eq!(
            text(&back.stdout),
            "acme secret",
            "{failpoint}: {}",
            text(&back.stderr)
        );
        let back = server.pipe(&globex.stdout, "decrypt", &["--principal", "globex-app"]);
        assert_eq!(
            text(&back.stdout),
            "globex secret",
            "{failpoint}: {}",
            text(&back.stderr)
        );
        let fresh = server.pipe(b"after", "encrypt", &["--key", "default"]);
        assert!(fresh.status.success(), "{failpoint}");
        server.stop();
    }
}

/// RotateKey and DestroyTenant killed at each step: after a restart the state is the one
/// before or the one after, never a mix, and nothing is lost (issue 5, crash safety).
#[cfg(feature = "test-hooks")]
#[test]
fn rotate_key_and_destroy_tenant_survive_a_crash_at_every_step() {
    for failpoint in ["rotate-key:version-made", "rotate-key:committed"] {
        let server = DevServer::start_in_with_env(
            tempfile::tempdir().expect("tempdir"),
            &[("KEYFRONT_FAILPOINT", failpoint)],
        );
        let before = server.pipe(b"before", "encrypt", &["--key", "default"]);
        assert!(before.status.success());
        let out = server.pipe(b"", "admin", &["rotate-key", "acme", "default"]);
        assert!(!out.status.success(), "the server died at {failpoint}");
        let (dir, logs, _) = server.stop();
        assert!(logs.contains(&format!("failpoint {failpoint}")), "{logs}");
        let server = DevServer::start_in(dir);
        let key = server.pipe(b"", "admin", &["get-key", "acme", "default", "--json"]);
        let key: serde_json::Value = serde_json::from_str(&text(&key.stdout)).expect("JSON");
        let expected = if failpoint == "rotate-key:committed" {
            2
        } else {
            1
        };
        assert_eq!(key["primary_version"], expected, "{failpoint}: {key}");
        assert_eq!(key["latest_version"], expected, "{failpoint}: {key}");
        let back = server.pipe(&before.stdout, "decrypt", &[]);
        assert_eq!(text(&back.stdout), "before", "{failpoint}");
        let after = server.pipe(b"after", "encrypt", &["--key", "default"]);
        assert!(after.status.success(), "{failpoint}");
        server.stop();
    }

    // DestroyTenant with a zero window (no backups kept in this test), so the scheduler
    // destroys at its next tick.
    for failpoint in ["destroy-tenant:scheduled", "destroy-tenant:committed"] {
        let server = DevServer::start();
        let (dir, _, _) = server.stop();
        let config = dir.path().join("keyfront.toml");
        let mut text_config = std::fs::read_to_string(&config).expect("config");
        text_config.push_str(
            "\n[keys]\ndestruction_window_days = 0\nscheduler_interval_secs = 1\n\n[backup]\nretention_days = 0\n",
        );
        std::fs::write(&config, text_config).expect("write config");
        let server = DevServer::start_in_with_env(dir, &[("KEYFRONT_FAILPOINT", failpoint)]);
        let globex_id = {
            let out = server.pipe(b"", "admin", &["list-tenants", "--json"]);
            let tenants: serde_json::Value =
                serde_json::from_str(&text(&out.stdout)).expect("JSON");
            tenants
                .as_array()
                .expect("array")
                .iter()
                .find(|t| t["name"] == "globex")
                .expect("globex")["id"]
                .as_str()
                .expect("id")
                .to_owned()
        };
        let acme = server.pipe(b"acme stays", "encrypt", &["--key", "default"]);
        let _ = server.pipe(b"", "admin", &["destroy-tenant", "globex"]);
        // The server dies at the failpoint (in the request, or at the scheduler's next tick).
        let mut died = false;
        for _ in 0..50 {
            if std::net::TcpStream::connect(("127.0.0.1", server.port)).is_err() {
                died = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(died, "{failpoint}: the server should have died");
        let (dir, logs, _) = server.stop();
        assert!(logs.contains(&format!("failpoint {failpoint}")), "{logs}");
        let tenant_dir = dir.path().join("data/tenants").join(&globex_id);

        let server = DevServer::start_in(dir);
        // Scheduled before the crash: destroyed by the scheduler now. Committed before the
        // crash: the orphan collector removed the directory at start.
        let mut gone = false;
        for _ in 0..50 {
            let out = server.pipe(b"", "admin", &["list-tenants", "--json"]);
            let tenants: serde_json::Value =
                serde_json::from_str(&text(&out.stdout)).expect("JSON");
            // By id: `keyfront dev` re-creates a tenant named globex (a new id) at start.
            let listed = tenants
                .as_array()
                .expect("array")
                .iter()
                .any(|t| t["id"] == globex_id.as_str());
            if !listed && !tenant_dir.exists() {
                gone = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        assert!(
            gone,
            "{failpoint}: globex is destroyed and its directory gone"
        );
        let back = server.pipe(&acme.stdout, "decrypt", &[]);
        assert_eq!(text(&back.stdout), "acme stays", "{failpoint}");
        server.stop();
    }
}

/// SIGHUP reloads principals and revocations: the next request on a connection that is
/// already open is judged by the new rules; an invalid file changes nothing (issue 6).
#[test]
fn sighup_revokes_a_certificate_for_open_connections() {
    use base64::Engine;
    use sha2::Digest;
    let server = DevServer::start();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let encrypt = |client: &mut keyfront::service::pb::key_service_client::KeyServiceClient<
        tonic::transport::Channel,
    >| {
        runtime.block_on(client.encrypt(keyfront::service::pb::EncryptRequest {
            key: "default".into(),
            plaintext: b"x".to_vec(),
            ..Default::default()
        }))
    };
    let mut globex = keyfront::service::pb::key_service_client::KeyServiceClient::new(
        runtime.block_on(server.channel("globex-app")),
    );
    let mut acme = keyfront::service::pb::key_service_client::KeyServiceClient::new(
        runtime.block_on(server.channel("acme-app")),
    );
    encrypt(&mut globex).expect("before the reload");

    let pem = std::fs::read_to_string(server.dir.path().join("certs/globex-app.crt")).expect("pem");
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("der");
    let fingerprint = hex::encode(sha2::Sha256::digest(&der));
    let config = server.dir.path().join("keyfront.toml");
    let original = std::fs::read_to_string(&config).expect("config");
    let hup = || {
        Command::new("kill")
            .args(["-HUP", &server.pid().to_string()])
            .status()
            .expect("kill -HUP");
    };

    // An invalid file first: nothing changes.
    std::fs::write(
        &config,
        format!("{original}\n[revocations]\nfingerprints = [\"not hex\"]\n"),
    )
    .expect("write");
    hup();
    std::thread::sleep(std::time::Duration::from_millis(500));
    encrypt(&mut globex).expect("an invalid config changes nothing");

    std::fs::write(
        &config,
        format!("{original}\n[revocations]\nfingerprints = [\"{fingerprint}\"]\n"),
    )
    .expect("write");
    hup();
    let mut refused = None;
    for _ in 0..50 {
        match encrypt(&mut globex) {
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let status = refused.expect("the open connection is judged by the new rules");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
    encrypt(&mut acme).expect("others are untouched");
    let (_, logs, _) = server.stop();
    assert!(
        logs.contains("SIGHUP: principals and revocations reloaded"),
        "{logs}"
    );
    assert!(logs.contains("SIGHUP: the config is invalid"), "{logs}");
}

/// `keyfront dev` makes the governance principals; support gets access to acme only through
/// acme-admin; `keyfront admin access-review` lists every principal with its last use; the
/// dev server's audit log verifies with the public key `keyfront dev` wrote.
#[test]
fn dev_consent_review_and_audit_verify_through_the_cli() {
    let server = DevServer::start();
    let run = |args: &[&str], input: &[u8], command: &str| {
        let out = server.pipe(input, command, args);
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let (code, ciphertext, stderr) = run(&["--key", "default"], b"for support", "encrypt");
    assert_eq!(code, Some(0), "{stderr}");
    let (code, _, stderr) = run(
        &["--principal", "support"],
        ciphertext.as_bytes(),
        "decrypt",
    );
    assert_eq!(code, Some(1));
    assert!(stderr.contains("grant"), "{stderr}");
    let (code, json, stderr) = run(
        &[
            "--principal",
            "support",
            "--json",
            "request-access",
            "acme",
            "--reason",
            "ticket 4711",
            "--operation",
            "Decrypt",
            "--key",
            "default",
            "--duration",
            "30m",
        ],
        b"",
        "admin",
    );
    assert_eq!(code, Some(0), "{stderr}");
    let grant: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let id = grant[0]["id"].as_str().expect("id").to_owned();
    assert_eq!(grant[0]["state"], "PENDING");
    let (code, _, stderr) = run(
        &["--principal", "globex-admin", "approve-access", &id],
        b"",
        "admin",
    );
    assert_eq!(code, Some(1), "globex-admin cannot approve acme's grant");
    assert!(stderr.contains("PERMISSION_DENIED"), "{stderr}");
    let (code, table, stderr) = run(
        &["--principal", "acme-admin", "approve-access", &id],
        b"",
        "admin",
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(table.contains("APPROVED"), "{table}");
    let (code, plain, stderr) = run(
        &["--principal", "support", "--grant", &id],
        ciphertext.as_bytes(),
        "decrypt",
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(plain, "for support");

    let (code, review, stderr) = run(&["access-review"], b"", "admin");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(review.starts_with("PRINCIPAL"), "{review}");
    for (name, path, _, _) in keyfront::cli::dev::PRINCIPALS {
        let line = review
            .lines()
            .find(|l| l.starts_with(&format!("{}/{path} ", keyfront::cli::dev::TRUST_DOMAIN)))
            .unwrap_or_else(|| panic!("{name} is in the review: {review}"));
        let used = [
            "acme-app",
            "support",
            "acme-admin",
            "globex-admin",
            "officer",
        ]
        .contains(name);
        assert_eq!(!line.contains("never"), used, "{name}'s last use: {line}");
    }
    assert!(
        review.contains(&id),
        "support's active grant is listed: {review}"
    );

    let (dir, _, _) = server.stop();
    let key = format!("@{}", dir.path().join("audit-public-key.hex").display());
    let out = Command::new(BIN)
        .args(["audit", "verify", "--public-key", &key])
        .arg(dir.path().join("audit/audit.log"))
        .output()
        .expect("verify runs");
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).starts_with("OK"), "{}", text(&out.stdout));
}

/// Issue 7 through the binary: `keyfront backup create` against `keyfront dev`,
/// `admin backup-status`, `backup verify` with the key file `keyfront dev` writes, then the
/// drill: the server stops, `backup restore` (journal from the config) into a new directory,
/// and `keyfront dev` serves on it and decrypts what was made before and after the snapshot.
#[test]
fn dev_backup_create_status_verify_and_restore_through_the_cli() {
    let server = DevServer::start();
    let before = server.pipe(b"before the snapshot", "encrypt", &["--key", "default"]);
    assert!(before.status.success());
    let out = server.pipe(b"", "backup", &["create", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let created: serde_json::Value = serde_json::from_str(&text(&out.stdout)).expect("JSON");
    assert_eq!(created["verified"], true);
    let archive = created["path"].as_str().expect("path").to_owned();
    assert!(archive.contains("/backups/keyfront-"), "{archive}");
    let out = server.pipe(b"", "admin", &["backup-status", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_str(&text(&out.stdout)).expect("JSON");
    assert_eq!(status["verified"], true, "{status}");
    assert_eq!(status["archives"], 1);
    assert_eq!(status["newest"]["path"], archive.as_str());
    assert!(status["next_due_time"].as_i64().is_some_and(|t| t > 0));
    let table = server.pipe(b"", "admin", &["backup-status"]);
    assert!(
        text(&table.stdout).contains("NEWEST SNAPSHOT"),
        "{}",
        text(&table.stdout)
    );
    let after = server.pipe(b"after the snapshot", "encrypt", &["--key", "default"]);
    assert!(after.status.success());
    let rotated = server.pipe(b"", "admin", &["rotate-key", "acme", "default"]);
    assert!(rotated.status.success());
    let rotated_after = server.pipe(b"after the rotation", "encrypt", &["--key", "default"]);
    assert!(rotated_after.status.success());
    let (dir, _, _) = server.stop();

    let key_file = format!("@{}", dir.path().join("audit-public-key.hex").display());
    let verify = Command::new(BIN)
        .args(["backup", "verify", &archive, "--public-key", &key_file])
        .output()
        .expect("verify");
    assert!(verify.status.success(), "{}", text(&verify.stdout));
    assert!(text(&verify.stdout).starts_with("OK: snapshot of"));

    let restore = |target: &Path, extra: &[&str]| {
        Command::new(BIN)
            .args(["backup", "restore", &archive, "--data-dir"])
            .arg(target)
            .arg("--config")
            .arg(dir.path().join("keyfront.toml"))
            .args(extra)
            .env("SOFTHSM2_CONF", dir.path().join("hsm/softhsm2.conf"))
            .output()
            .expect("restore")
    };
    // Into a directory that is not empty: refused.
    let occupied = restore(&dir.path().join("data"), &[]);
    assert!(!occupied.status.success());
    assert!(
        text(&occupied.stderr).contains("not empty"),
        "{}",
        text(&occupied.stderr)
    );
    let restored_dir = dir.path().join("data-restored");
    let out = restore(&restored_dir, &[]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let printed = text(&out.stdout);
    assert!(
        printed.contains("journal: ") && !printed.contains("journal: 0 commits"),
        "the rotation is replayed: {printed}"
    );
    assert!(
        printed.contains(&format!(
            "storage.data_dir = \"{}\"",
            restored_dir.display()
        )),
        "{printed}"
    );
    std::fs::rename(dir.path().join("data"), dir.path().join("data-lost")).expect("move");
    std::fs::rename(&restored_dir, dir.path().join("data")).expect("move");

    let server = DevServer::start_in(dir);
    for (blob, plaintext) in [
        (&before.stdout, "before the snapshot"),
        (&after.stdout, "after the snapshot"),
        (&rotated_after.stdout, "after the rotation"),
    ] {
        let back = server.pipe(blob, "decrypt", &[]);
        assert_eq!(text(&back.stdout), plaintext, "{}", text(&back.stderr));
    }
    let key = server.pipe(b"", "admin", &["get-key", "acme", "default", "--json"]);
    let key: serde_json::Value = serde_json::from_str(&text(&key.stdout)).expect("JSON");
    assert_eq!(key["primary_version"], 2);
    server.stop();
}

/// Issue 24, defect 7: a second keyfront on the same data directory says that one is running
/// (not sled's `Os { code: 11, kind: WouldBlock … }`), and a server that cannot start never
/// logs that it is serving.
#[test]
fn a_second_keyfront_on_one_directory_says_the_first_holds_it() {
    let server = DevServer::start();
    let dir = server.dir.path();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let dev = Command::new(BIN)
        .args(["dev", "--dir"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env_remove("SOFTHSM2_CONF")
        .output()
        .expect("runs");
    let stderr = text(&dev.stderr);
    assert_eq!(dev.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is keyfront already running"), "{stderr}");
    assert!(
        !stderr.contains("WouldBlock") && !stderr.contains("Os {"),
        "{stderr}"
    );

    // `serve` on a copy of the config that listens elsewhere: it listens, then cannot open the
    // store, and says why; it never claims to serve.
    let config = std::fs::read_to_string(dir.join("keyfront.toml")).expect("config");
    let other = config.replace(
        &format!("listen = \"127.0.0.1:{}\"", server.port),
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    assert_ne!(other, config);
    std::fs::write(dir.join("second.toml"), other).expect("write");
    let serve = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(dir.join("second.toml"))
        .env("SOFTHSM2_CONF", dir.join("hsm/softhsm2.conf"))
        .env("RUST_LOG", "info")
        .output()
        .expect("runs");
    let stderr = text(&serve.stderr);
    assert_eq!(serve.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is keyfront already running"), "{stderr}");
    assert!(!stderr.contains("serving"), "{stderr}");
}

/// Issue 24, defect 7: `keyfront dev` with a data directory whose token is gone refuses, and
/// says why, instead of running a second key ceremony and failing on "storage key mismatch".
#[test]
fn keyfront_dev_refuses_a_data_directory_whose_token_is_gone() {
    let server = DevServer::start();
    let (dir, _logs, _) = server.stop();
    std::fs::remove_dir_all(dir.path().join("hsm/tokens")).expect("lose the token");
    let output = Command::new(BIN)
        .args(["dev", "--dir"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:1"])
        .env_remove("SOFTHSM2_CONF")
        .output()
        .expect("runs");
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the token is gone") && stderr.contains("Restore"),
        "{stderr}"
    );
    assert!(!stderr.contains("mismatch"), "{stderr}");
    assert!(
        !text(&output.stdout).contains("ran the key ceremony"),
        "no second ceremony"
    );
}

/// Issue 24, defect 7: connection failures name their cause, data commands print gRPC's code
/// names, the CLI takes `KEYFRONT_ENDPOINT` as the client library does, and `keyfront dev`'s
/// hints carry the flags its --listen and --dir make necessary.
#[test]
fn client_errors_say_what_to_check() {
    let server = DevServer::start();
    let dir = server.dir.path().to_path_buf();
    let dir = dir.as_path();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut child = Command::new(BIN)
            .args(args)
            .args(["--dir"])
            .arg(dir)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("runs");
        use std::io::Write;
        let _ = child.stdin.take().expect("stdin").write_all(b"hi");
        let output = child.wait_with_output().expect("output");
        (
            output.status.code(),
            text(&output.stdout),
            text(&output.stderr),
        )
    };
    let endpoint = format!("https://localhost:{}", server.port);
    // KEYFRONT_ENDPOINT reaches the server; a wrong context reads as gRPC names it.
    let (code, ciphertext, stderr) = run(
        &["encrypt", "--key", "default", "--context", "order=42"],
        &[("KEYFRONT_ENDPOINT", &endpoint)],
    );
    assert_eq!(code, Some(0), "{stderr}");
    let mut child = Command::new(BIN)
        .args(["decrypt", "--context", "order=41", "--dir"])
        .arg(dir)
        .env("KEYFRONT_ENDPOINT", &endpoint)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(ciphertext.as_bytes())
        .expect("write");
    let refused = child.wait_with_output().expect("output");
    assert_eq!(
        text(&refused.stderr).trim(),
        "keyfront: INVALID_ARGUMENT: decryption failed"
    );
    let (_, _, stderr) = run(
        &["encrypt", "--key", "default", "--principal", "officer"],
        &[("KEYFRONT_ENDPOINT", &endpoint)],
    );
    assert!(
        stderr.starts_with("keyfront: PERMISSION_DENIED: "),
        "{stderr}"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let (_, _, stderr) = run(
        &[
            "encrypt",
            "--key",
            "default",
            "--endpoint",
            &format!("https://localhost:{closed}"),
        ],
        &[],
    );
    assert!(stderr.contains("connection refused"), "{stderr}");
    let (_, _, stderr) = run(
        &[
            "encrypt",
            "--key",
            "default",
            "--endpoint",
            &format!("localhost:{}", server.port),
        ],
        &[],
    );
    assert!(stderr.contains("must be an https:// URL"), "{stderr}");
    // A server certificate from another CA: an openssl CA, not the dev one.
    let other = tempfile::tempdir().expect("tempdir");
    let ca = other.path().join("ca.crt");
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=another CA", "-keyout"])
        .arg(other.path().join("ca.key"))
        .arg("-out")
        .arg(&ca)
        .output()
        .expect("openssl runs");
    assert!(made.status.success(), "{}", text(&made.stderr));
    let (_, _, stderr) = run(
        &[
            "encrypt",
            "--key",
            "default",
            "--endpoint",
            &endpoint,
            "--ca",
            ca.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert!(stderr.contains("unknown CA"), "{stderr}");
    assert!(!stderr.ends_with("transport error\n"), "{stderr}");

    // The hints of a dev server on another port and directory work as printed.
    let (_, logs, _) = server.stop();
    let hint = logs
        .lines()
        .find(|l| l.trim_start().starts_with("try:"))
        .expect("a try: line");
    assert!(
        hint.contains(&format!("--endpoint {endpoint}"))
            && hint.contains(&format!("--dir {}", dir.display())),
        "{hint}"
    );
    assert!(
        !logs.contains("Mac(") && !logs.contains("Sign("),
        "no Debug text in dev's output: {logs}"
    );
}

/// Issue 24, defect 7: `keyfront init` runs before the server's certificates exist.
#[test]
fn init_does_not_need_the_servers_certificates() {
    let deployment = Deployment::new();
    let config = deployment.path("keyfront.toml");
    let mut text_config = std::fs::read_to_string(&config).expect("config");
    text_config.push_str(
        "\n[server]\nlisten = \"127.0.0.1:7443\"\ncert = \"not-yet/server.crt\"\nkey = \"not-yet/server.key\"\nclient_ca = \"not-yet/ca.crt\"\naudit_path = \"audit/audit.log\"\n",
    );
    std::fs::write(&config, text_config).expect("write");
    let init = deployment.keyfront(&["init", "--config", config.to_str().expect("utf-8")]);
    assert!(init.status.success(), "{}", text(&init.stderr));
    // `serve` still checks them, all at once.
    let serve = deployment.keyfront(&["serve", "--config", config.to_str().expect("utf-8")]);
    let stderr = text(&serve.stderr);
    assert_eq!(serve.status.code(), Some(1), "{stderr}");
    for file in ["server.cert", "server.key", "server.client_ca"] {
        assert!(stderr.contains(file), "{file}: {stderr}");
    }
}

/// Issue 24, defect 8: a new tenant is no dead end. `keyfront dev add-principal` issues a
/// certificate, adds the principal and reloads the running server, which knows it when the
/// command returns; a name in use or an invalid role changes nothing.
#[test]
fn dev_add_principal_gives_a_new_tenant_a_working_identity() {
    let server = DevServer::start();
    let dir = server.dir.path().to_path_buf();
    for args in [
        &["create-tenant", "initech"][..],
        &["create-key", "initech", "default"][..],
    ] {
        let made = server.pipe(b"", "admin", args);
        assert!(made.status.success(), "{}", text(&made.stderr));
    }
    let add = |args: &[&str]| {
        Command::new(BIN)
            .args(["dev", "add-principal"])
            .args(args)
            .arg("--dir")
            .arg(&dir)
            .output()
            .expect("runs")
    };
    let added = add(&["initech-app", "--tenant", "initech", "--role", "app"]);
    let stdout = text(&added.stdout);
    assert!(added.status.success(), "{stdout}{}", text(&added.stderr));
    assert!(
        stdout.contains("spiffe://keyfront.dev/tenant/initech/initech-app")
            && stdout.contains("reloaded the running keyfront dev"),
        "{stdout}"
    );
    // Right away, without a restart.
    let sealed = server.pipe(
        b"tps report",
        "encrypt",
        &["--key", "default", "--principal", "initech-app"],
    );
    assert!(sealed.status.success(), "{}", text(&sealed.stderr));
    let opened = server.pipe(&sealed.stdout, "decrypt", &["--principal", "initech-app"]);
    assert_eq!(
        text(&opened.stdout),
        "tps report",
        "{}",
        text(&opened.stderr)
    );
    // Its tenant only.
    let other = server.pipe(&sealed.stdout, "decrypt", &["--principal", "acme-app"]);
    assert!(
        text(&other.stderr).contains("INVALID_ARGUMENT"),
        "{}",
        text(&other.stderr)
    );

    let config = std::fs::read_to_string(dir.join("keyfront.toml")).expect("config");
    for refused in [
        &["initech-app", "--tenant", "initech", "--role", "app"][..],
        &["initech-x", "--tenant", "initech", "--role", "nope"][..],
        &["Bad Name", "--role", "app"][..],
    ] {
        let output = add(refused);
        assert_eq!(output.status.code(), Some(1), "{refused:?}");
        assert!(!text(&output.stderr).is_empty());
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("keyfront.toml")).expect("config"),
        config,
        "refusals change nothing"
    );
    assert!(!dir.join("certs/initech-x.crt").exists());
}

/// Issue 25, finding 5: a principal allowed roles that exclude each other on purpose
/// (`dangerous_allow_role_combination`) is audited at every start.
#[test]
fn a_dangerous_role_combination_is_audited() {
    let server = DevServer::start();
    let (dir, _, _) = server.stop();
    let config = dir.path().join("keyfront.toml");
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str(
        "\n[[principals]]\nidentity = \"spiffe://keyfront.dev/tenant/acme/both\"\ntenants = [\"acme\"]\nroles = [\"app\", \"auditor\"]\ndangerous_allow_role_combination = true\n",
    );
    std::fs::write(&config, text).expect("write");
    let server = DevServer::start_in(dir);
    let (dir, logs, _) = server.stop();
    let audit = std::fs::read_to_string(dir.path().join("audit/audit.log")).expect("audit");
    assert!(
        audit.contains("dangerous_role_combination")
            && audit.contains("spiffe://keyfront.dev/tenant/acme/both holds app and auditor"),
        "{audit}"
    );
    assert!(logs.contains("dangerous_allow_role_combination"), "{logs}");
}
