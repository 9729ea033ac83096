//! Configuration rules, one fixture per rule (tests/data/config/), and the shipped example.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use keyfront::config::{Config, ConfigError, ConfigProblem};

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new("tests/data/config").join(name)
}

fn problems(result: Result<Config, ConfigError>) -> Vec<ConfigProblem> {
    match result {
        Err(ConfigError::Invalid { problems, .. }) => problems,
        other => panic!("expected invalid config, got {other:?}"),
    }
}

#[test]
fn a_valid_config_resolves_paths_and_the_pin_from_the_environment() {
    let config = Config::load(
        &fixture("valid.toml"),
        &env(&[("KEYFRONT_TEST_PIN", "1234")]),
    )
    .expect("valid");
    assert_eq!(config.data_dir, fixture("data"));
    assert_eq!(config.hsm.sessions.get(), 3);
    assert_eq!(config.kms.store.max_open_tenants.get(), 10);
    assert_eq!(config.kms.bulk_key_capacity, 500);
    assert_eq!(config.kms.bulk_key_ttl.as_secs(), 60);
}

#[test]
fn an_unset_pin_variable_is_reported() {
    assert_eq!(
        problems(Config::load(&fixture("valid.toml"), &env(&[]))),
        vec![ConfigProblem::PinEnvUnset("KEYFRONT_TEST_PIN".into())]
    );
}

#[test]
fn exactly_one_pin_source_is_required() {
    let env = env(&[("KEYFRONT_TEST_PIN", "1234")]);
    assert_eq!(
        problems(Config::load(&fixture("pin-source-both.toml"), &env)),
        vec![ConfigProblem::PinSource]
    );
    assert_eq!(
        problems(Config::load(&fixture("pin-source-missing.toml"), &env)),
        vec![ConfigProblem::PinSource]
    );
}

#[test]
fn a_pin_in_the_config_file_is_refused() {
    let result = Config::load(&fixture("pin-in-config.toml"), &env(&[]));
    match result {
        Err(ConfigError::Parse { message, .. }) => assert!(message.contains("pin"), "{message}"),
        other => panic!("expected a parse error, got {other:?}"),
    }
}

#[test]
fn zero_counts_are_refused_all_at_once() {
    let found = problems(Config::load(
        &fixture("zero-values.toml"),
        &env(&[("KEYFRONT_TEST_PIN", "1")]),
    ));
    assert_eq!(
        found,
        vec![
            ConfigProblem::Zero("hsm.sessions"),
            ConfigProblem::Zero("storage.max_open_tenants"),
            ConfigProblem::Zero("cache.bulk_key_ttl_secs"),
        ]
    );
}

#[test]
fn every_problem_is_reported_before_failing() {
    let error = Config::load(&fixture("many-problems.toml"), &env(&[])).expect_err("invalid");
    let text = error.to_string();
    let found = problems(Err(error));
    assert_eq!(
        found,
        vec![
            ConfigProblem::ModuleMissing("/nonexistent/libpkcs11.so".into()),
            ConfigProblem::TokenLabel,
            ConfigProblem::PinEnvUnset("KEYFRONT_UNSET_PIN_VARIABLE".into()),
            ConfigProblem::Zero("hsm.kek_cache_capacity"),
        ]
    );
    assert_eq!(text.matches("\n  - ").count(), 4, "{text}");
}

#[test]
fn a_pin_file_must_be_private_to_its_owner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("keyfront.toml");
    std::fs::write(
        &config,
        "[hsm]\ntoken_label = \"t\"\npin_file = \"pin\"\n[storage]\ndata_dir = \"data\"\n",
    )
    .expect("write");
    let pin = dir.path().join("pin");
    std::fs::write(&pin, "1234\n").expect("write");
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    assert_eq!(
        problems(Config::load(&config, &env(&[]))),
        vec![ConfigProblem::PinFileTooOpen(pin.clone())]
    );
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    Config::load(&config, &env(&[])).expect("private PIN file accepted");
    std::fs::write(&pin, "\n").expect("write");
    assert_eq!(
        problems(Config::load(&config, &env(&[]))),
        vec![ConfigProblem::PinFileUnreadable(pin)]
    );
}

#[test]
fn the_shipped_example_config_is_valid() {
    // Beside the certificate files it names, as an operator would have it.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("keyfront.toml");
    std::fs::copy("config.example.toml", &copy).expect("copy example");
    std::fs::create_dir(dir.path().join("certs")).expect("mkdir");
    for file in ["server.crt", "server.key", "ca.crt"] {
        std::fs::write(dir.path().join("certs").join(file), "").expect("write");
    }
    let config = Config::load(&copy, &env(&[("KEYFRONT_HSM_PIN", "1234")]))
        .expect("config.example.toml stays valid");
    let server = config.server.expect("server section");
    assert_eq!(server.limits.max_batch_items, 1000);
    assert_eq!(server.limits.max_connections, 4096);
    assert_eq!(server.limits.handshake_timeout.as_millis(), 5000);
    assert_eq!(config.principals.len(), 3);
    assert_eq!(
        config.principals[2].tenants,
        keyfront::config::TenantScope::All
    );
}

#[test]
fn a_data_principal_cannot_have_every_tenant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keyfront.toml");
    std::fs::write(
        &path,
        "[hsm]\ntoken_label = \"t\"\npin_env = \"P\"\n[storage]\ndata_dir = \"d\"\n\
         [[principals]]\nidentity = \"spiffe://x/app\"\ntenants = [\"*\"]\nroles = [\"app\"]\n\
         [[principals]]\nidentity = \"spiffe://x/app\"\ntenants = [\"Bad Name\"]\nroles = [\"app\"]\n",
    )
    .expect("write");
    let found = problems(Config::load(&path, &env(&[("P", "1")])));
    assert_eq!(
        found,
        vec![
            ConfigProblem::PrincipalWildcard("spiffe://x/app".into()),
            ConfigProblem::PrincipalDuplicate("spiffe://x/app".into()),
            ConfigProblem::PrincipalName("spiffe://x/app".into(), "Bad Name".into()),
        ]
    );
}

#[test]
fn governance_roles_parse_and_only_non_data_roles_have_every_tenant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keyfront.toml");
    std::fs::write(
        &path,
        "[hsm]\ntoken_label = \"t\"\npin_env = \"P\"\n[storage]\ndata_dir = \"d\"\n\
         [access]\nmax_grant_secs = 3600\n\
         [[principals]]\nidentity = \"spiffe://x/support\"\ntenants = [\"*\"]\nroles = [\"support\"]\n\
         [[principals]]\nidentity = \"spiffe://x/auditor\"\ntenants = [\"*\"]\nroles = [\"auditor\"]\n\
         [[principals]]\nidentity = \"spiffe://x/acme-admin\"\ntenants = [\"acme\"]\nroles = [\"tenant-admin\"]\n",
    )
    .expect("write");
    let config = Config::load(&path, &env(&[("P", "1")])).expect("valid");
    assert_eq!(
        config.access.max_grant,
        std::time::Duration::from_secs(3600)
    );
    assert_eq!(
        config.access.request_ttl,
        std::time::Duration::from_secs(86_400)
    );
    assert_eq!(
        config.principals[2].roles,
        [keyfront::config::Role::TenantAdmin]
    );
    std::fs::write(
        &path,
        "[hsm]\ntoken_label = \"t\"\npin_env = \"P\"\n[storage]\ndata_dir = \"d\"\n\
         [access]\nmax_grant_secs = 0\n\
         [[principals]]\nidentity = \"spiffe://x/admin\"\ntenants = [\"*\"]\nroles = [\"tenant-admin\"]\n",
    )
    .expect("write");
    assert_eq!(
        problems(Config::load(&path, &env(&[("P", "1")]))),
        vec![
            ConfigProblem::Zero("access.max_grant_secs"),
            ConfigProblem::PrincipalWildcard("spiffe://x/admin".into()),
        ]
    );
}

#[test]
fn a_destruction_window_below_the_backup_retention_is_refused() {
    assert_eq!(
        problems(Config::load(
            &fixture("window-below-retention.toml"),
            &env(&[("KEYFRONT_TEST_PIN", "1")]),
        )),
        vec![
            ConfigProblem::Zero("keys.scheduler_interval_secs"),
            ConfigProblem::WindowBelowRetention(7, 30),
        ]
    );
}

#[test]
fn lifecycle_defaults_are_thirty_days() {
    let config = Config::load(
        &fixture("valid.toml"),
        &env(&[("KEYFRONT_TEST_PIN", "1234")]),
    )
    .expect("valid");
    assert_eq!(config.kms.destruction_window.as_secs(), 30 * 86_400);
    assert_eq!(config.kms.min_destruction_window.as_secs(), 30 * 86_400);
    assert_eq!(config.kms.scheduler_interval.as_secs(), 60);
}

#[test]
fn backups_default_to_two_in_the_morning_thirty_days_and_a_journal_next_to_the_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keyfront.toml");
    let base = "[hsm]\ntoken_label = \"t\"\npin_env = \"P\"\n[storage]\ndata_dir = \"d\"\n";
    std::fs::write(&path, base).expect("write");
    let config = Config::load(&path, &env(&[("P", "1")])).expect("valid");
    assert_eq!(config.backup.dir, Some(dir.path().join("backups")));
    assert!(config.backup.nightly);
    assert_eq!(config.backup.at_secs, 2 * 3600);
    assert_eq!(config.backup.retention_days, 30);
    assert_eq!(
        config.kms.store.journal_dir,
        Some(dir.path().join("journal"))
    );
    std::fs::write(
        &path,
        format!(
            "{base}[backup]\ntime = \"23:45\"\ndir = \"/srv/kf\"\njournal_dir = \"/mnt/j\"\nnightly = false\n"
        ),
    )
    .expect("write");
    let config = Config::load(&path, &env(&[("P", "1")])).expect("valid");
    assert_eq!(config.backup.at_secs, 23 * 3600 + 45 * 60);
    assert_eq!(config.backup.dir, Some("/srv/kf".into()));
    assert!(!config.backup.nightly);
    assert_eq!(config.kms.store.journal_dir, Some("/mnt/j".into()));
    for bad in ["24:00", "2", "02:60", "two"] {
        std::fs::write(&path, format!("{base}[backup]\ntime = \"{bad}\"\n")).expect("write");
        assert_eq!(
            problems(Config::load(&path, &env(&[("P", "1")]))),
            vec![ConfigProblem::BackupTime(bad.into())],
            "{bad}"
        );
    }
}

#[test]
fn the_postgres_backend_takes_its_connection_string_from_the_environment_or_a_private_file() {
    use keyfront::keystore::Backend;
    use secrecy::ExposeSecret;

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keyfront.toml");
    let head = "[hsm]\ntoken_label = \"t\"\npin_env = \"P\"\n[storage]\ndata_dir = \"d\"\n";
    let write = |storage: &str| std::fs::write(&path, format!("{head}{storage}")).expect("write");

    write("backend = \"postgres\"\n[storage.postgres]\nurl_env = \"KF_PG\"\n");
    let config =
        Config::load(&path, &env(&[("P", "1"), ("KF_PG", "host=db user=kf")])).expect("valid");
    let Backend::Postgres(postgres) = &config.kms.store.backend else {
        panic!("expected the postgres backend");
    };
    assert_eq!(postgres.url.expose_secret(), "host=db user=kf");
    assert_eq!(postgres.namespace, "keyfront");
    assert_eq!(postgres.pool_size, 16);
    // Node-local journals would each hold one node's commits: none on PostgreSQL.
    assert_eq!(config.kms.store.journal_dir, None);
    assert!(
        !format!("{config:?}").contains("host=db"),
        "the connection string never reaches Debug output"
    );

    assert_eq!(
        problems(Config::load(&path, &env(&[("P", "1")]))),
        vec![ConfigProblem::PostgresUrlEnvUnset("KF_PG".into())]
    );

    let url_file = dir.path().join("pg-url");
    std::fs::write(&url_file, "host=db password=hunter2\n").expect("write");
    std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    write("backend = \"postgres\"\n[storage.postgres]\nurl_file = \"pg-url\"\n");
    assert_eq!(
        problems(Config::load(&path, &env(&[("P", "1")]))),
        vec![ConfigProblem::PostgresUrlFileTooOpen(url_file.clone())]
    );
    std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let config = Config::load(&path, &env(&[("P", "1")])).expect("valid");
    assert!(
        matches!(&config.kms.store.backend, Backend::Postgres(p) if p.url.expose_secret() == "host=db password=hunter2")
    );

    write(
        "backend = \"postgres\"\n[storage.postgres]\nurl_env = \"KF_PG\"\nurl_file = \"pg-url\"\n\
         namespace = \"Bad-Name\"\npool_size = 0\nca_file = \"missing-ca.pem\"\n",
    );
    assert_eq!(
        problems(Config::load(&path, &env(&[("P", "1"), ("KF_PG", "x")]))),
        vec![
            ConfigProblem::PostgresUrlSource,
            ConfigProblem::PostgresNamespace("Bad-Name".into()),
            ConfigProblem::Zero("storage.postgres.pool_size"),
            ConfigProblem::FileMissing(
                "storage.postgres.ca_file",
                dir.path().join("missing-ca.pem")
            ),
        ]
    );

    write("backend = \"postgres\"\n");
    assert_eq!(
        problems(Config::load(&path, &env(&[("P", "1")]))),
        vec![ConfigProblem::PostgresMissing]
    );
    write("backend = \"mysql\"\n");
    assert!(matches!(
        Config::load(&path, &env(&[("P", "1")])),
        Err(ConfigError::Parse { .. })
    ));
}

#[test]
fn connection_limits_default_and_zero_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string("config.example.toml").expect("example");
    std::fs::create_dir(dir.path().join("certs")).expect("mkdir");
    for file in ["server.crt", "server.key", "ca.crt"] {
        std::fs::write(dir.path().join("certs").join(file), "").expect("write");
    }
    let without: String = text
        .lines()
        .filter(|l| !l.starts_with("max_connections") && !l.starts_with("handshake_timeout_ms"))
        .map(|l| format!("{l}\n"))
        .collect();
    let path = dir.path().join("keyfront.toml");
    std::fs::write(&path, &without).expect("write");
    let pin = env(&[("KEYFRONT_HSM_PIN", "1234")]);
    let limits = Config::load(&path, &pin)
        .expect("defaults")
        .server
        .expect("server")
        .limits;
    assert_eq!(limits.max_connections, 4096);
    assert_eq!(limits.handshake_timeout.as_secs(), 5);

    let zero = without.replace(
        "[server]\n",
        "[server]\nmax_connections = 0\nhandshake_timeout_ms = 0\n",
    );
    std::fs::write(&path, zero).expect("write");
    assert_eq!(
        problems(Config::load(&path, &pin)),
        vec![
            ConfigProblem::Zero("server.max_connections"),
            ConfigProblem::Zero("server.handshake_timeout_ms"),
        ]
    );
}

/// Issue 25, finding 5: roles that undo each other's promise (officer + app, support + app,
/// support + tenant-admin, …) are refused at load, naming the principal and why, unless the
/// principal says `dangerous_allow_role_combination = true`; data roles combine freely.
#[test]
fn roles_that_exclude_each_other_are_refused_unless_allowed_on_purpose() {
    let found = problems(Config::load(
        &fixture("role-combinations.toml"),
        &env(&[("KEYFRONT_TEST_PIN", "1")]),
    ));
    let identities: Vec<String> = found
        .iter()
        .map(|problem| match problem {
            ConfigProblem::RoleCombination(identity, ..) => identity.clone(),
            other => panic!("only role combinations: {other}"),
        })
        .collect();
    assert_eq!(
        identities,
        [
            "spiffe://t/officer-app",
            "spiffe://t/support-app",
            "spiffe://t/support-admin"
        ]
    );
    let message = found[0].to_string();
    assert!(
        message.contains("officers administer keys and never see data")
            && message.contains("dangerous_allow_role_combination"),
        "{message}"
    );
}
