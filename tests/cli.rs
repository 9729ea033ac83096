//! The `keyfront` binary as an operator runs it: token made by the softhsm/ scripts, `init`
//! once, `selfcheck` in two separate processes, and clear failures for a wrong PIN or config.

use std::path::{Path, PathBuf};
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

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
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

    let first = deployment.keyfront(&["selfcheck", "--config", config]);
    assert!(
        first.status.success(),
        "{}{}",
        text(&first.stdout),
        text(&first.stderr)
    );
    assert!(text(&first.stdout).contains("selfcheck passed"));
    assert!(!text(&first.stdout).contains("previous run"));

    // A second process on the same data directory and token decrypts the first one's output.
    let second = deployment.keyfront(&["selfcheck", "--config", config]);
    assert!(
        second.status.success(),
        "{}{}",
        text(&second.stdout),
        text(&second.stderr)
    );
    assert!(
        text(&second.stdout).contains("previous run: 4 ciphertexts"),
        "{}",
        text(&second.stdout)
    );
    assert!(
        text(&second.stdout).contains("(2 tenants)")
            || text(&second.stdout).contains("(1 tenants)")
    );
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
