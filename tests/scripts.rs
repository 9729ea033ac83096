//! The project's shell scripts as a new user runs them, where they once failed for reasons of
//! their surroundings rather than keyfront's.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn script(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// Issue 24, defect 4: as root in a checkout under a home directory of mode 700, the test
/// PostgreSQL (run as the user `postgres`) could not enter its data directory, and
/// `scripts/test.sh` and `scripts/dev-cluster.sh` failed at once with initdb's "Permission
/// denied". The server now lives where that user can reach, and answers on its port.
#[test]
fn the_private_postgres_starts_from_a_directory_its_user_cannot_enter() {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    if !std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        eprintln!("skipped: only root runs PostgreSQL as another user");
        return;
    }
    if std::env::var_os("KEYFRONT_TEST_POSTGRES_URL").is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "needs PostgreSQL installed: run scripts/test.sh"
        );
        eprintln!("skipped: KEYFRONT_TEST_POSTGRES_URL is not set (scripts/test.sh sets it)");
        return;
    }
    let home = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).expect("700");
    let dir = home.path().join("checkout/target/postgres-test");
    // A free port: the OS picks one, and the script binds it right after.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let run = |action: &str| {
        let output = Command::new("bash")
            .arg(script("postgres.sh"))
            .arg(action)
            .arg(&dir)
            .arg(port.to_string())
            .output()
            .expect("postgres.sh runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, url, stderr) = run("start");
    struct Stop<'a>(&'a dyn Fn(&str) -> (bool, String, String));
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            (self.0)("stop");
        }
    }
    let _stop = Stop(&run);
    assert!(ok, "postgres.sh start failed: {stderr}");
    assert!(
        stderr.contains("cannot enter"),
        "says where the cluster went: {stderr}"
    );
    assert!(
        dir.join("data/PG_VERSION").exists(),
        "DIR/data leads to the cluster"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let answer: i32 = runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url.trim(), tokio_postgres::NoTls)
            .await
            .expect("connect to the private server");
        tokio::spawn(connection);
        client
            .query_one("SELECT 1", &[])
            .await
            .expect("query")
            .get(0)
    });
    assert_eq!(answer, 1);
    let (ok, _, stderr) = run("stop");
    assert!(ok, "postgres.sh stop failed: {stderr}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "stopped"
    );
}
