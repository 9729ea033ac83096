//! A client that is not tonic: Python grpcio (tests/python/client.py) against `keyfront dev`,
//! with the dev certificates, including reflection. `scripts/test.sh` installs the packages
//! (tests/python/requirements.txt) into target/python-env and exports KEYFRONT_TEST_PYTHON.

mod common;

use std::process::Command;

use common::dev_server::{DevServer, text};

#[test]
fn a_python_grpcio_client_encrypts_decrypts_and_reflects() {
    let python = std::env::var("KEYFRONT_TEST_PYTHON").expect(
        "KEYFRONT_TEST_PYTHON is not set: run scripts/test.sh, which installs grpcio into target/python-env",
    );
    let server = DevServer::start();
    let output = Command::new(python)
        .arg("tests/python/client.py")
        .arg("--dir")
        .arg(server.dir.path())
        .args(["--port", &server.port.to_string(), "--proto", "proto"])
        .output()
        .expect("python runs");
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        text(&output.stderr)
    );
    assert!(stdout.contains("python client OK"), "{stdout}");
    assert!(
        stdout.contains("GenerateDataKey as acme-app: PERMISSION_DENIED"),
        "{stdout}"
    );
    let (dir, _, _) = server.stop();
    let audit = std::fs::read_to_string(dir.path().join("audit/audit.log")).expect("audit");
    assert!(audit.contains("\"rpc\":\"keyfront.v1.KeyService/GenerateDataKey\""));
}
