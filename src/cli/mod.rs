//! The `keyfront` command: `init` (the key ceremony), `serve`, `dev` (a complete local
//! keyfront), `encrypt`/`decrypt` (a client), and `selfcheck` (a round trip of every operation
//! without the network), `admin` (AdminService and AccessService as a client), and `audit
//! verify` (offline), and `backup` (create, verify, restore).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
#[cfg(feature = "test-hooks")]
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, ProcessEnv};
use crate::hsm::pkcs11;

/// Exit status when `init` finds the token already initialized.
pub const EXIT_ALREADY_INITIALIZED: u8 = 3;

pub mod admin;
pub mod audit;
pub mod backup;
pub mod client;
pub mod dev;
pub mod selfcheck;
mod tables;

/// What an offline command (`init`, `selfcheck --config`) fails with: its config, or the
/// domain below it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The HSM, the store or an operation failed.
    #[error(transparent)]
    Kms(#[from] crate::kms::Error),
}

impl From<crate::hsm::Error> for Error {
    fn from(error: crate::hsm::Error) -> Self {
        Self::Kms(error.into())
    }
}

/// Exit status when the server cannot start for a reason retrying cannot fix (e.g. the PIN).
pub const EXIT_FATAL: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "keyfront",
    version,
    about = "A key management service in front of a PKCS#11 HSM"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create keyfront's keys (MWK, storage MAC, pepper, lookup, audit signing) on a token; runs once
    /// per token.
    Init {
        /// The config file naming the module, token and PIN source.
        #[arg(long)]
        config: PathBuf,
    },
    /// Prove that keyfront works, leaving nothing behind: offline with --config (the HSM, every
    /// tenant database verified, a scratch round trip of every operation), or a running
    /// server through its API (without --config).
    Selfcheck(selfcheck::SelfcheckArgs),
    /// Serve the gRPC API (TLS 1.3, client certificates required) until SIGTERM or SIGINT.
    Serve {
        /// The config file (needs a [server] section and [[principals]]).
        #[arg(long)]
        config: PathBuf,
    },
    /// Make (once) and serve a complete local keyfront in DIR: a token (SoftHSM, or Kryoptic
    /// with --hsm kryoptic), dev CA and certificates, config, tenants acme and globex.
    Dev {
        /// Instead of serving: change the dev directory.
        #[command(subcommand)]
        action: Option<DevAction>,
        /// Where everything lives.
        #[arg(long, global = true, default_value = ".keyfront-dev")]
        dir: PathBuf,
        /// Address to listen on (with --nodes: the first node's; the others take the next
        /// ports).
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: std::net::SocketAddr,
        /// Run a local cluster of this many nodes on PostgreSQL instead of one node on sled
        /// (scripts/dev-cluster.sh starts a local PostgreSQL for it).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=9))]
        nodes: u8,
        /// With --nodes: the environment variable holding the PostgreSQL connection string.
        #[arg(long, default_value = "KEYFRONT_DEV_POSTGRES_URL")]
        postgres_url_env: String,
        /// With --nodes: the PostgreSQL namespace (schema prefix) of the cluster.
        #[arg(long, default_value = dev::CLUSTER_NAMESPACE)]
        postgres_namespace: String,
        /// With --nodes: make everything, print how to run each node, and exit.
        #[arg(long)]
        prepare_only: bool,
        /// The token to make: softhsm, or kryoptic (a PKCS#11 3.x token; needs --hsm-module).
        /// Default: what DIR was made with, SoftHSM for a new DIR.
        #[arg(long, value_enum)]
        hsm: Option<dev::DevHsm>,
        /// The token's PKCS#11 module (default: SoftHSM's; for Kryoptic the path that
        /// scripts/kryoptic.sh module prints). Kept in DIR/keyfront.toml once written.
        #[arg(long)]
        hsm_module: Option<PathBuf>,
    },
    /// Encrypt stdin; prints the ciphertext in base64.
    Encrypt {
        /// The key's name.
        #[arg(long)]
        key: String,
        #[command(flatten)]
        connection: client::Connection,
    },
    /// The MAC of stdin under a MAC key; prints VERSION:BASE64MAC.
    Mac {
        /// The MAC key's name.
        #[arg(long)]
        key: String,
        #[command(flatten)]
        connection: client::Connection,
    },
    /// Check a MAC (VERSION:BASE64MAC, as `mac` prints it) of stdin; exit status 1 if invalid.
    VerifyMac {
        /// The MAC key's name.
        #[arg(long)]
        key: String,
        /// The MAC, as `keyfront mac` printed it.
        mac: String,
        #[command(flatten)]
        connection: client::Connection,
    },
    /// The signature of stdin under a SIGN key; prints VERSION:BASE64SIGNATURE.
    Sign {
        /// The SIGN key's name.
        #[arg(long)]
        key: String,
        /// stdin is the message's digest (SHA-256, or SHA-384 for ECDSA P-384), not the message.
        #[arg(long)]
        digest: bool,
        #[command(flatten)]
        connection: client::Connection,
    },
    /// Check a signature (VERSION:BASE64SIGNATURE, as `sign` prints it) of stdin; exit status 1
    /// if invalid.
    Verify {
        /// The SIGN key's name.
        #[arg(long)]
        key: String,
        /// stdin is the message's digest, not the message.
        #[arg(long)]
        digest: bool,
        /// The signature, as `keyfront sign` printed it.
        signature: String,
        #[command(flatten)]
        connection: client::Connection,
    },
    /// Print the public key (PEM) of a SIGN key's version, to verify signatures elsewhere.
    PublicKey {
        /// The SIGN key's name.
        #[arg(long)]
        key: String,
        /// The version (0: the primary).
        #[arg(long, default_value_t = 0)]
        version: u32,
        #[command(flatten)]
        connection: client::Connection,
    },
    /// Administer tenants and keys over AdminService (as an officer): one subcommand per RPC.
    Admin(admin::AdminArgs),
    /// Check audit logs offline.
    Audit(audit::AuditArgs),
    /// Snapshots: create (through the server), verify and restore (offline).
    Backup(backup::BackupArgs),
    /// Decrypt a base64 ciphertext from stdin; writes the plaintext.
    Decrypt {
        /// The key's name (optional: the ciphertext names it).
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        connection: client::Connection,
    },
}

/// What `keyfront dev` does instead of serving.
#[derive(Debug, Subcommand)]
enum DevAction {
    /// Add a principal: a client certificate from the dev CA (DIR/certs/NAME.crt and .key), a
    /// [[principals]] entry in DIR/keyfront.toml, and a reload of the running `keyfront dev`.
    AddPrincipal {
        /// The certificate's name (DIR/certs/NAME.crt), also the last part of its identity.
        name: String,
        /// A tenant it may use (repeatable; `*` for all). Its identity is then
        /// spiffe://keyfront.dev/tenant/TENANT/NAME when there is one tenant.
        #[arg(long = "tenant")]
        tenants: Vec<String>,
        /// A role: app, backup, secrets, officer, tenant-admin, support, auditor (repeatable).
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// The identity (URI SAN), instead of the one made from the tenant and NAME.
        #[arg(long)]
        identity: Option<String>,
    },
}

/// Runs the command line and returns the process exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let result = match cli.command {
        Command::Init { config } => init(&config),
        Command::Selfcheck(args) => return selfcheck::run(args),
        Command::Serve { config } => return serve(&config),
        Command::Dev {
            action:
                Some(DevAction::AddPrincipal {
                    name,
                    tenants,
                    roles,
                    identity,
                }),
            dir,
            ..
        } => {
            let principal = dev::NewPrincipal {
                name,
                tenants,
                roles,
                identity,
            };
            return match runtime().block_on(dev::add_principal(&dir, &principal)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("keyfront dev add-principal: {error}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Dev {
            dir,
            listen,
            nodes: 1,
            hsm,
            hsm_module,
            ..
        } => return run_dev(&dir, listen, hsm, hsm_module),
        Command::Dev {
            dir,
            listen,
            nodes,
            postgres_url_env,
            postgres_namespace,
            prepare_only,
            action: None,
            hsm,
            ..
        } => {
            if hsm.is_some_and(|hsm| hsm != dev::DevHsm::Softhsm) {
                eprintln!(
                    "keyfront dev --nodes: the dev cluster runs on SoftHSM copies of one token; --hsm kryoptic runs one node"
                );
                return ExitCode::FAILURE;
            }
            let cluster = dev::Cluster {
                nodes: usize::from(nodes),
                url_env: postgres_url_env,
                namespace: postgres_namespace,
            };
            return run_dev_cluster(&dir, listen, &cluster, prepare_only);
        }
        Command::Encrypt { key, connection } => {
            return run_client(async move { client::encrypt(&connection, &key).await });
        }
        Command::Decrypt { key, connection } => {
            return run_client(async move { client::decrypt(&connection, key.as_deref()).await });
        }
        Command::Mac { key, connection } => {
            return run_client(async move { client::mac(&connection, &key).await });
        }
        Command::VerifyMac {
            key,
            mac,
            connection,
        } => {
            return run_client(async move { client::verify_mac(&connection, &key, &mac).await });
        }
        Command::Sign {
            key,
            digest,
            connection,
        } => {
            return run_client(async move { client::sign(&connection, &key, digest).await });
        }
        Command::Verify {
            key,
            digest,
            signature,
            connection,
        } => {
            return run_client(async move {
                client::verify(&connection, &key, &signature, digest).await
            });
        }
        Command::PublicKey {
            key,
            version,
            connection,
        } => {
            return run_client(async move { client::public_key(&connection, &key, version).await });
        }
        Command::Admin(args) => return run_client(admin::run(args)),
        Command::Audit(args) => return audit::run(args),
        Command::Backup(args) => return backup::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Kms(crate::Error::Hsm(crate::hsm::Error::AlreadyInitialized))) => {
            eprintln!("keyfront: the token already holds keyfront keys; init runs once per token");
            ExitCode::from(EXIT_ALREADY_INITIALIZED)
        }
        Err(error) => {
            eprintln!("keyfront: {error}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    // Invariant: building a runtime fails only when the OS refuses threads or an epoll fd,
    // in which case nothing else could run either.
    tokio::runtime::Builder::new_multi_thread()
        // Blocking-pool threads (sled commits, cold reads, HSM calls off the hot path) live
        // 5 minutes idle instead of 10 s. Each thread that exits leaves its allocator heap
        // behind. Under a steady soak the default churn let RSS creep up, while with a long
        // keep-alive it stayed flat (docs/TESTING.md, "Soak").
        .thread_keep_alive(std::time::Duration::from_secs(300))
        .enable_all()
        .build()
        .expect("tokio runtime")
}

pub(crate) fn run_client(
    command: impl Future<Output = Result<(), client::ClientError>>,
) -> ExitCode {
    match runtime().block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("keyfront: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT; the server then finishes in-flight requests.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

fn serve(path: &Path) -> ExitCode {
    let config = match Config::load(path, &ProcessEnv) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("keyfront: {error}");
            return ExitCode::FAILURE;
        }
    };
    serve_config(config, None, path)
}

/// Raises the soft limit on open files to the hard limit: each connection is a descriptor, and
/// the common soft default (1024) is below `max_connections`. Says so when even the hard limit
/// leaves too little room, since accepts then fail with EMFILE before the cap is reached.
fn raise_open_file_limit(max_connections: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
        tracing::warn!(soft, hard, "cannot raise the open-file limit");
    }
    // Databases, the audit log, the HSM and the runtime need descriptors of their own.
    let wanted = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(256);
    if hard < wanted {
        tracing::warn!(
            limit = hard,
            max_connections,
            "the open-file limit is below server.max_connections + 256; raise it (ulimit -n, LimitNOFILE=) or lower max_connections"
        );
    }
}

fn serve_config(config: Config, listen: Option<std::net::SocketAddr>, path: &Path) -> ExitCode {
    let Some(server) = &config.server else {
        eprintln!("keyfront: the config has no [server] section");
        return ExitCode::FAILURE;
    };
    let listen = listen.unwrap_or(server.listen);
    raise_open_file_limit(server.limits.max_connections);
    let result = runtime().block_on(async move {
        let listener = crate::service::tls::listen(listen)
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let mut server =
            crate::service::Server::new(config.clone()).with_config_path(path.to_path_buf());
        // Builds for tests only: simulated time shared with the test (tests/simulation.rs).
        #[cfg(feature = "test-hooks")]
        if let Some(clock) = crate::clock::FileClock::from_env() {
            tracing::warn!("test build: time comes from {}", crate::clock::FileClock::ENV);
            server = server.with_clock(Arc::new(clock));
        }
        if let Some(metrics) = config.metrics_listen {
            let listener = tokio::net::TcpListener::bind(metrics)
                .await
                .map_err(|e| format!("cannot listen on {metrics} for /metrics: {e}"))?;
            server = server.with_metrics_listener(listener);
        }
        server
            .run(listener, shutdown_signal())
            .await
            .map_err(|e| match e {
                crate::service::ServeError::Fatal(crate::Error::Hsm(crate::hsm::Error::Pin(rv))) => {
                    format!("the HSM refused the PIN ({rv:?}); check hsm.pin_env / hsm.pin_file. Not retrying: HSMs lock a PIN after failed logins")
                }
                other => other.to_string(),
            })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("keyfront: {message}");
            ExitCode::from(EXIT_FATAL)
        }
    }
}

/// ` --dir DIR` unless the client commands find `dir` by default (`./.keyfront-dev`).
fn dir_flag(dir: &Path) -> String {
    let default = std::env::current_dir().map(|cwd| cwd.join(".keyfront-dev"));
    if default.is_ok_and(|default| default == dir) {
        String::new()
    } else {
        format!(" --dir {}", dir.display())
    }
}

/// Where `keyfront dev` listens, and the client commands connect, unless told otherwise.
fn default_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 7443))
}

fn run_dev(
    dir: &Path,
    listen: std::net::SocketAddr,
    hsm: Option<dev::DevHsm>,
    hsm_module: Option<PathBuf>,
) -> ExitCode {
    let prepared = (|| -> Result<(Config, PathBuf), dev::DevError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| dev::DevError::Io(dir.display().to_string(), e))?;
        let dir = std::fs::canonicalize(dir)
            .map_err(|e| dev::DevError::Io(dir.display().to_string(), e))?;
        let token = dev::DevToken::resolve(&dir, hsm, hsm_module)?;
        dev::ensure_token_environment(&dir, &token)?;
        dev::ensure_certificates(&dir.join("certs"))?;
        let path = dev::ensure_config(&dir, listen, &token.module)?;
        let config = dev::load(&path)?;
        if token.hsm == dev::DevHsm::Kryoptic {
            dev::ensure_kryoptic_token(&config, &dir.join("hsm"))?;
        }
        dev::ensure_tenants(&config)?;
        println!();
        println!(
            "keyfront dev is serving on {listen} (TLS 1.3, client certificates from {}/certs)",
            dir.display()
        );
        // The hints work as printed: they name the endpoint and directory when they are not
        // the commands' defaults.
        let mut flags = String::new();
        if listen != default_listen() {
            flags.push_str(&format!(" --endpoint https://localhost:{}", listen.port()));
        }
        flags.push_str(&dir_flag(&dir));
        println!(
            "  try:   echo hi | keyfront encrypt --key default{flags} | keyfront decrypt{flags}"
        );
        let names = dev::PRINCIPALS
            .iter()
            .map(|(name, ..)| *name)
            .collect::<Vec<_>>();
        println!("  as:    --principal {}", names.join(" | "));
        println!("  audit: {}/audit/audit.log", dir.display());
        println!(
            "  verify the audit log: keyfront audit verify --public-key @{0}/audit-public-key.hex {0}/audit/audit.log*",
            dir.display()
        );
        println!("  stop:  Ctrl-C (in-flight requests finish); reload principals: kill -HUP");
        Ok((config, path))
    })();
    match prepared {
        Ok((config, path)) => {
            // `keyfront dev add-principal` reloads this process through its pid file (the
            // pid, then where it listens).
            let pid_file = path.with_file_name(dev::PID_FILE);
            let _ = std::fs::write(
                &pid_file,
                format!(
                    "{}\nhttps://localhost:{}\n",
                    std::process::id(),
                    listen.port()
                ),
            );
            let status = serve_config(config, Some(listen), &path);
            let _ = std::fs::remove_file(&pid_file);
            status
        }
        Err(error) => {
            eprintln!("keyfront dev: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `keyfront dev --nodes N`: the dev token, certificates, N node configs on PostgreSQL, the
/// dev tenants, a token copy per node; then the nodes run as child processes until Ctrl-C or
/// SIGTERM (forwarded to them).
fn run_dev_cluster(
    dir: &Path,
    listen: std::net::SocketAddr,
    cluster: &dev::Cluster,
    prepare_only: bool,
) -> ExitCode {
    let url_env = &cluster.url_env;
    if std::env::var(url_env).map_or(true, |url| url.is_empty()) {
        eprintln!(
            "keyfront dev --nodes: set {url_env} to a PostgreSQL connection string (scripts/dev-cluster.sh starts a local PostgreSQL and sets it)"
        );
        return ExitCode::FAILURE;
    }
    let prepared = (|| -> Result<Vec<dev::ClusterNode>, dev::DevError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| dev::DevError::Io(dir.display().to_string(), e))?;
        let dir = std::fs::canonicalize(dir)
            .map_err(|e| dev::DevError::Io(dir.display().to_string(), e))?;
        let token = dev::DevToken::resolve(&dir, Some(dev::DevHsm::Softhsm), None)?;
        dev::ensure_token_environment(&dir, &token)?;
        dev::ensure_certificates(&dir.join("certs"))?;
        let nodes = dev::ensure_cluster_configs(&dir, listen, cluster)?;
        dev::ensure_tenants(&dev::load(&nodes[0].config)?)?;
        dev::ensure_token_copies(&dir, &nodes)?;
        println!();
        if prepare_only {
            for node in &nodes {
                println!(
                    "SOFTHSM2_CONF={} keyfront serve --config {}",
                    node.softhsm_conf.display(),
                    node.config.display()
                );
            }
            return Ok(nodes);
        }
        for (i, node) in nodes.iter().enumerate() {
            println!("node-{i}: serving on {}", node.listen);
        }
        let dir_flag = dir_flag(&dir);
        println!(
            "  try:   echo hi | keyfront encrypt --key default{dir_flag} --endpoint https://localhost:{} | keyfront decrypt{dir_flag} --endpoint https://localhost:{}",
            nodes[0].listen.port(),
            nodes[nodes.len() - 1].listen.port()
        );
        println!(
            "  logs:  {}/node-*/audit/audit.log; the leader lease is in {}_system.leases",
            dir.display(),
            dev::CLUSTER_NAMESPACE
        );
        println!("  stop:  Ctrl-C");
        Ok(nodes)
    })();
    let nodes = match prepared {
        Ok(nodes) => nodes,
        Err(error) => {
            eprintln!("keyfront dev: {error}");
            return ExitCode::FAILURE;
        }
    };
    if prepare_only {
        return ExitCode::SUCCESS;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(error) => {
            eprintln!("keyfront dev: current executable: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut children = Vec::new();
    for node in &nodes {
        match std::process::Command::new(&exe)
            .arg("serve")
            .arg("--config")
            .arg(&node.config)
            .env("SOFTHSM2_CONF", &node.softhsm_conf)
            .spawn()
        {
            Ok(child) => children.push(child),
            Err(error) => {
                eprintln!("keyfront dev: cannot start a node: {error}");
                stop_children(&mut children);
                return ExitCode::FAILURE;
            }
        }
    }
    runtime().block_on(async {
        tokio::select! {
            () = shutdown_signal() => {}
            () = async {
                // A node that exits on its own is reported; the others go on.
                let mut reported = vec![false; children.len()];
                loop {
                    for (i, child) in children.iter_mut().enumerate() {
                        if let (false, Ok(Some(status))) = (reported[i], child.try_wait()) {
                            eprintln!("keyfront dev: node-{i} exited ({status})");
                            reported[i] = true;
                        }
                    }
                    if reported.iter().all(|r| *r) {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            } => {}
        }
    });
    stop_children(&mut children);
    ExitCode::SUCCESS
}

/// Asks every child to finish its in-flight requests (SIGTERM), then waits for it.
fn stop_children(children: &mut [std::process::Child]) {
    for child in children.iter() {
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    for child in children.iter_mut() {
        let _ = child.wait();
    }
}

fn init(config: &Path) -> Result<(), Error> {
    let config = Config::load_offline(config, &ProcessEnv)?;
    let report = pkcs11::init_token(&config.hsm)?;
    println!(
        "initialized token {:?}: MWK generation {}",
        config.hsm.token_label, report.mwk_generation
    );
    for label in &report.labels {
        println!("  created {label}");
    }
    println!(
        "  audit public key (pass to `keyfront audit verify --public-key`): {}",
        hex::encode(&report.audit_public_key)
    );
    Ok(())
}
