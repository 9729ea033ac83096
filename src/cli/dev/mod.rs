//! `keyfront dev`: a complete local keyfront in one directory, made on first run and reused
//! after: a token (SoftHSM with its own SOFTHSM2_CONF, or with `--hsm kryoptic` Kryoptic with
//! its own KRYOPTIC_CONF), the key ceremony, a dev CA with server and client certificates, a
//! config, tenants `acme` and `globex` with keys `default` (DATA) and `secrets` (SECRETS);
//! then it serves.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

mod cluster;

pub use cluster::{
    CLUSTER_NAMESPACE, Cluster, ClusterNode, ensure_cluster_configs, ensure_token_copies,
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::config::{Config, ProcessEnv};
use crate::hsm::Hsm;
use crate::hsm::pkcs11::{self, Pkcs11Hsm};
use crate::keystore::Purpose;
use crate::kms::Kms;

/// The dev token's label.
pub const TOKEN_LABEL: &str = "keyfront-dev";
/// The SPIFFE trust domain of dev identities.
pub const TRUST_DOMAIN: &str = "spiffe://keyfront.dev";

/// The dev principals: certificate name, identity path, tenants, roles.
pub const PRINCIPALS: &[(&str, &str, &[&str], &[&str])] = &[
    ("acme-app", "tenant/acme/app", &["acme"], &["app"]),
    ("acme-backup", "tenant/acme/backup", &["acme"], &["backup"]),
    (
        "acme-secrets",
        "tenant/acme/secrets",
        &["acme"],
        &["secrets"],
    ),
    ("globex-app", "tenant/globex/app", &["globex"], &["app"]),
    ("backup", "backup", &["acme", "globex"], &["backup"]),
    ("officer", "officer", &["*"], &["officer"]),
    (
        "acme-admin",
        "tenant/acme/admin",
        &["acme"],
        &["tenant-admin"],
    ),
    (
        "globex-admin",
        "tenant/globex/admin",
        &["globex"],
        &["tenant-admin"],
    ),
    ("support", "support", &["*"], &["support"]),
    ("auditor", "auditor", &["*"], &["auditor"]),
];

/// SoftHSM's module on Debian.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The kind of token `keyfront dev` makes and serves from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DevHsm {
    /// SoftHSM 2 (Debian package softhsm2), with its own SOFTHSM2_CONF in DIR/hsm.
    Softhsm,
    /// Kryoptic, a PKCS#11 3.x token (scripts/kryoptic.sh builds its module), with its own
    /// KRYOPTIC_CONF in DIR/hsm.
    Kryoptic,
}

impl DevHsm {
    fn name(self) -> &'static str {
        match self {
            Self::Softhsm => "SoftHSM",
            Self::Kryoptic => "Kryoptic",
        }
    }

    /// The token's configuration file in the dev directory, and the variable that names it.
    fn conf(self, dir: &Path) -> (PathBuf, &'static str) {
        match self {
            Self::Softhsm => (dir.join("hsm/softhsm2.conf"), "SOFTHSM2_CONF"),
            Self::Kryoptic => (dir.join("hsm/kryoptic.conf"), "KRYOPTIC_CONF"),
        }
    }

    /// The kind of token a dev directory was made with, if any.
    pub fn made_in(dir: &Path) -> Option<Self> {
        [Self::Softhsm, Self::Kryoptic]
            .into_iter()
            .find(|hsm| hsm.conf(dir).0.exists())
    }
}

/// The token of a dev directory: its kind and its PKCS#11 module.
#[derive(Clone, Debug)]
pub struct DevToken {
    /// The kind.
    pub hsm: DevHsm,
    /// The module (a shared library).
    pub module: PathBuf,
}

impl DevToken {
    /// The token for `dir`: the kind asked for, or else the one the directory was made with
    /// (SoftHSM for a new one); the module given, or else the config's, or SoftHSM's.
    ///
    /// # Errors
    /// [`DevError::Hsm`] when the directory was made with another kind, or Kryoptic is asked
    /// for without a module.
    pub fn resolve(
        dir: &Path,
        asked: Option<DevHsm>,
        module: Option<PathBuf>,
    ) -> Result<Self, DevError> {
        let made = DevHsm::made_in(dir);
        let hsm = match (asked, made) {
            (Some(asked), Some(made)) if asked != made => {
                return Err(DevError::Hsm(format!(
                    "{} holds a {} dev token; run without --hsm (or with --hsm {}), or use another --dir for {}",
                    dir.display(),
                    made.name(),
                    made.name().to_lowercase(),
                    asked.name()
                )));
            }
            (Some(hsm), _) | (None, Some(hsm)) => hsm,
            (None, None) => DevHsm::Softhsm,
        };
        let configured = configured_module(&dir.join("keyfront.toml"));
        let module = match (hsm, module.or(configured)) {
            (_, Some(module)) => module,
            (DevHsm::Softhsm, None) => PathBuf::from(SOFTHSM_MODULE),
            (DevHsm::Kryoptic, None) => {
                return Err(DevError::Hsm(
                    "--hsm kryoptic needs --hsm-module PATH, Kryoptic's PKCS#11 module: scripts/kryoptic.sh module builds it and prints its path (scripts/dev.sh --hsm kryoptic does both)".into(),
                ));
            }
        };
        Ok(Self { hsm, module })
    }
}

/// The `module` of an existing dev config's `[hsm]` section.
fn configured_module(config: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(config).ok()?;
    let value: toml::Value = text.parse().ok()?;
    value.get("hsm")?.get("module")?.as_str().map(PathBuf::from)
}

/// Why `keyfront dev` failed.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// A file could not be written or a tool could not run.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// softhsm2-util failed.
    #[error("softhsm2-util failed: {0} (is SoftHSM installed? run softhsm/install.sh)")]
    SoftHsm(String),
    /// The token cannot be made or does not match the directory.
    #[error("{0}")]
    Hsm(String),
    /// The data directory holds keys of a token that is gone.
    #[error(
        "{data} holds keys wrapped under the dev token, but the token is gone from {tokens}: a new token would hold other keys, and nothing in {data} could ever be decrypted again. Restore {tokens} from a copy, or start afresh with another --dir (or remove the directory)"
    )]
    TokenLost {
        /// The data directory.
        data: String,
        /// The token directory.
        tokens: String,
    },
    /// `add-principal` refused.
    #[error("{0}")]
    Principal(String),
    /// Certificate generation failed.
    #[error("certificates: {0}")]
    Certificates(#[from] rcgen::Error),
    /// The domain failed.
    #[error(transparent)]
    Keyfront(#[from] crate::Error),
    /// The dev config is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevError {
    let what = what.into();
    move |e| DevError::Io(what, e)
}

/// Makes sure this process runs with the dev token's configuration variable (SOFTHSM2_CONF or
/// KRYOPTIC_CONF): both tokens read it once, at C_Initialize, and keyfront never mutates its
/// own environment, so it re-executes itself with the variable set. Creates a SoftHSM token
/// first if needed (a Kryoptic token is made in-process by [`ensure_kryoptic_token`], once the
/// variable is set). Returns only when already set.
///
/// # Errors
/// [`DevError`] when the token cannot be created or the re-exec fails.
pub fn ensure_token_environment(dir: &Path, token: &DevToken) -> Result<(), DevError> {
    let (conf, variable) = token.hsm.conf(dir);
    if std::env::var_os(variable).is_some_and(|v| Path::new(&v) == conf) {
        return Ok(());
    }
    match token.hsm {
        DevHsm::Softhsm => create_token(&dir.join("hsm"), &dir.join("data"))?,
        DevHsm::Kryoptic => write_kryoptic_conf(&dir.join("hsm"))?,
    }
    let exe = std::env::current_exe().map_err(io("current executable"))?;
    let error = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(variable, &conf)
        .exec();
    Err(DevError::Io(format!("re-executing with {variable}"), error))
}

/// Kryoptic's configuration of the dev token: one slot, its store one sqlite file in
/// `hsm_dir`; and the PIN files, which the config names. Existing files stay.
fn write_kryoptic_conf(hsm_dir: &Path) -> Result<(), DevError> {
    std::fs::create_dir_all(hsm_dir).map_err(io(hsm_dir.display().to_string()))?;
    secret_file(&hsm_dir.join("pin"))?;
    secret_file(&hsm_dir.join("so-pin"))?;
    let conf = hsm_dir.join("kryoptic.conf");
    if conf.exists() {
        return Ok(());
    }
    write(
        &conf,
        &format!(
            "# Kryoptic configuration for keyfront dev: one slot, its token in one sqlite file\n\n[[slots]]\nslot = 1\ndbtype = \"sqlite\"\ndbargs = \"{}\"\n",
            hsm_dir.join("token.sql").display()
        ),
    )
}

/// Initialises the dev token on Kryoptic's slot if it is not there yet: label, SO PIN and user
/// PIN from DIR/hsm, through PKCS#11 itself (`C_InitToken`, `C_InitPIN`), as a token vendor's
/// tool would. Refuses while `data_dir` holds a store wrapped under a token that is gone.
///
/// # Errors
/// [`DevError`] for PKCS#11 failures or a lost token.
pub fn ensure_kryoptic_token(config: &Config, hsm_dir: &Path) -> Result<(), DevError> {
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    let ctx = pkcs11::context(&config.hsm.module).map_err(crate::Error::from)?;
    match pkcs11::find_token(&ctx, TOKEN_LABEL) {
        Ok(_) => return Ok(()),
        Err(crate::hsm::Error::TokenNotFound(_)) => {}
        Err(error) => return Err(crate::Error::from(error).into()),
    }
    if config.data_dir.join("system").exists() {
        return Err(DevError::TokenLost {
            data: config.data_dir.display().to_string(),
            tokens: hsm_dir.display().to_string(),
        });
    }
    let failed = |what: &str, error: cryptoki::error::Error| {
        DevError::Hsm(format!("making the Kryoptic dev token: {what}: {error}"))
    };
    let slot = ctx
        .get_slots_with_token()
        .map_err(|e| failed("C_GetSlotList", e))?
        .into_iter()
        .find(|slot| {
            ctx.get_token_info(*slot)
                .is_ok_and(|info| !info.token_initialized())
        })
        .ok_or_else(|| {
            DevError::Hsm(format!(
                "{} lists no free slot for the dev token",
                hsm_dir.join("kryoptic.conf").display()
            ))
        })?;
    let so_pin = AuthPin::from(secret_file(&hsm_dir.join("so-pin"))?);
    ctx.init_token(slot, &so_pin, TOKEN_LABEL)
        .map_err(|e| failed("C_InitToken", e))?;
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| failed("C_OpenSession", e))?;
    session
        .login(UserType::So, Some(&so_pin))
        .map_err(|e| failed("C_Login as SO", e))?;
    session
        .init_pin(&config.hsm.pin)
        .map_err(|e| failed("C_InitPIN", e))?;
    session.logout().map_err(|e| failed("C_Logout", e))?;
    println!(
        "created Kryoptic token {TOKEN_LABEL:?} in {}",
        hsm_dir.display()
    );
    Ok(())
}

/// The same steps as `softhsm/create-token.sh`, so the binary needs no checkout. Refuses to
/// make a new token while `data_dir` holds a store: its keys are wrapped under the old one.
fn create_token(hsm_dir: &Path, data_dir: &Path) -> Result<(), DevError> {
    let tokens = hsm_dir.join("tokens");
    std::fs::create_dir_all(&tokens).map_err(io(tokens.display().to_string()))?;
    let conf = hsm_dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "# SoftHSM configuration for keyfront dev\ndirectories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\nslots.mechanisms = ALL\nlibrary.reset_on_fork = false\n",
            tokens.display()
        ),
    )
    .map_err(io(conf.display().to_string()))?;
    let show = Command::new("softhsm2-util")
        .arg("--show-slots")
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .map_err(|e| DevError::SoftHsm(e.to_string()))?;
    let listing = String::from_utf8_lossy(&show.stdout);
    if listing.lines().any(|l| {
        l.trim()
            .strip_prefix("Label:")
            .is_some_and(|v| v.trim() == TOKEN_LABEL)
    }) {
        return Ok(());
    }
    if data_dir.join("system").exists() {
        return Err(DevError::TokenLost {
            data: data_dir.display().to_string(),
            tokens: tokens.display().to_string(),
        });
    }
    let pin = secret_file(&hsm_dir.join("pin"))?;
    let so_pin = secret_file(&hsm_dir.join("so-pin"))?;
    let init = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            TOKEN_LABEL,
            "--so-pin",
            &so_pin,
            "--pin",
            &pin,
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .map_err(|e| DevError::SoftHsm(e.to_string()))?;
    if !init.status.success() {
        return Err(DevError::SoftHsm(
            String::from_utf8_lossy(&init.stderr).into_owned(),
        ));
    }
    println!(
        "created SoftHSM token {TOKEN_LABEL:?} in {}",
        tokens.display()
    );
    Ok(())
}

/// Reads a random secret file, creating it (mode 600) if absent.
fn secret_file(path: &Path) -> Result<String, DevError> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        if !existing.trim().is_empty() {
            return Ok(existing.trim().to_owned());
        }
    }
    let value = hex::encode(rand::random::<[u8; 8]>());
    write_private(path, &value)?;
    Ok(value)
}

/// Writes the dev CA and certificates that do not exist yet.
///
/// # Errors
/// [`DevError`] for I/O or certificate failures.
pub fn ensure_certificates(certs: &Path) -> Result<(), DevError> {
    std::fs::create_dir_all(certs).map_err(io(certs.display().to_string()))?;
    let ca_key_path = certs.join("ca.key");
    let ca_key = match std::fs::read_to_string(&ca_key_path) {
        Ok(pem) => KeyPair::from_pem(&pem)?,
        Err(_) => {
            let key = KeyPair::generate()?;
            write_private(&ca_key_path, &key.serialize_pem())?;
            let cert = ca_params()?.self_signed(&key)?;
            write(&certs.join("ca.crt"), &cert.pem())?;
            key
        }
    };
    let issuer = Issuer::new(ca_params()?, ca_key);
    let server = certs.join("server.crt");
    if !server.exists() {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
        params
            .distinguished_name
            .push(DnType::CommonName, "keyfront dev server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        issue(certs, "server", &params, &issuer)?;
    }
    for (name, path, _, _) in PRINCIPALS {
        if certs.join(format!("{name}.crt")).exists() {
            continue;
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, *name);
        params.subject_alt_names = vec![SanType::URI(format!("{TRUST_DOMAIN}/{path}").try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        issue(certs, name, &params, &issuer)?;
    }
    Ok(())
}

/// Issues a client certificate from the dev CA in `certs` with these URI SANs and CN, written
/// as `certs/NAME.crt` and `certs/NAME.key` (for tests and for adding dev principals).
///
/// # Errors
/// [`DevError`] if the CA is missing or signing fails.
pub fn issue_client_certificate(
    certs: &Path,
    name: &str,
    uris: &[&str],
    common_name: &str,
) -> Result<(), DevError> {
    issue_client_certificate_with_serial(certs, name, uris, common_name, None)
}

/// [`issue_client_certificate`] with a given serial number (big-endian octets; tests of
/// revocation by serial), instead of a random one.
///
/// # Errors
/// As [`issue_client_certificate`].
pub fn issue_client_certificate_with_serial(
    certs: &Path,
    name: &str,
    uris: &[&str],
    common_name: &str,
    serial: Option<&[u8]>,
) -> Result<(), DevError> {
    let ca_key = std::fs::read_to_string(certs.join("ca.key")).map_err(io("dev CA key"))?;
    let issuer = Issuer::new(ca_params()?, KeyPair::from_pem(&ca_key)?);
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    for uri in uris {
        params
            .subject_alt_names
            .push(SanType::URI((*uri).try_into()?));
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.serial_number = serial.map(rcgen::SerialNumber::from_slice);
    issue(certs, name, &params, &issuer)
}

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "keyfront dev CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn issue(
    certs: &Path,
    name: &str,
    params: &CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(), DevError> {
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    write_private(&certs.join(format!("{name}.key")), &key.serialize_pem())?;
    write(&certs.join(format!("{name}.crt")), &cert.pem())
}

fn write(path: &Path, text: &str) -> Result<(), DevError> {
    std::fs::write(path, text).map_err(io(path.display().to_string()))
}

fn write_private(path: &Path, text: &str) -> Result<(), DevError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path.display().to_string()))?;
    file.write_all(text.as_bytes())
        .map_err(io(path.display().to_string()))
}

/// Writes `keyfront.toml` if absent.
///
/// # Errors
/// [`DevError::Io`].
pub fn ensure_config(dir: &Path, listen: SocketAddr, module: &Path) -> Result<PathBuf, DevError> {
    let path = dir.join("keyfront.toml");
    if path.exists() {
        return Ok(path);
    }
    // A TOML string, quoted and escaped.
    let module = toml::Value::String(module.display().to_string());
    let mut text = format!(
        "# keyfront dev configuration (made by `keyfront dev`); config.example.toml documents every key.\n\n\
         [hsm]\nmodule = {module}\ntoken_label = \"{TOKEN_LABEL}\"\npin_file = \"hsm/pin\"\n\n\
         [storage]\ndata_dir = \"data\"\n\n\
         [server]\nlisten = \"{listen}\"\ncert = \"certs/server.crt\"\nkey = \"certs/server.key\"\nclient_ca = \"certs/ca.crt\"\nnode_id = \"dev\"\naudit_path = \"audit/audit.log\"\n"
    );
    for (name, path, tenants, roles) in PRINCIPALS {
        let list = |items: &[&str]| {
            items
                .iter()
                .map(|i| format!("\"{i}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        text.push_str(&format!(
            "\n# {name}\n[[principals]]\nidentity = \"{TRUST_DOMAIN}/{path}\"\ntenants = [{}]\nroles = [{}]\n",
            list(tenants),
            list(roles)
        ));
    }
    write(&path, &text)?;
    Ok(path)
}

/// Runs the ceremony if the token has no keys yet, and creates the dev tenants and keys that
/// do not exist. The store is closed again before serving (sled locks its files).
///
/// # Errors
/// HSM or storage errors.
pub fn ensure_tenants(config: &Config) -> Result<(), DevError> {
    let hsm = match Pkcs11Hsm::open(&config.hsm) {
        Err(crate::hsm::Error::NotInitialized(_)) => {
            let report = pkcs11::init_token(&config.hsm).map_err(crate::Error::from)?;
            println!(
                "ran the key ceremony on token {TOKEN_LABEL:?}: {}",
                report.labels.join(", ")
            );
            Pkcs11Hsm::open(&config.hsm).map_err(crate::Error::from)?
        }
        other => other.map_err(crate::Error::from)?,
    };
    // For `keyfront audit verify --public-key @DIR/audit-public-key.hex`.
    let public_key = config.data_dir.with_file_name("audit-public-key.hex");
    write(
        &public_key,
        &format!("{}\n", hex::encode(hsm.audit_public_key())),
    )?;
    let kms = Kms::open(
        Arc::new(hsm) as Arc<dyn Hsm>,
        &config.data_dir,
        config.kms.clone(),
    )?;
    for tenant in ["acme", "globex"] {
        let name = tenant.parse().map_err(|_| crate::Error::TooLarge)?;
        let id = match kms
            .store()
            .tenant_by_name(&name)
            .map_err(crate::Error::from)?
        {
            Some(record) => record.id,
            None => {
                println!("created tenant {tenant}");
                kms.create_tenant(&name)?.id
            }
        };
        for (key, purpose) in [
            ("default", Purpose::Data),
            ("secrets", Purpose::Secrets),
            ("mac", Purpose::Mac(crate::hsm::MacAlgorithm::HmacSha256)),
            (
                "signing",
                Purpose::Sign(crate::hsm::SignAlgorithm::EcdsaP256Sha256),
            ),
        ] {
            let key = key.parse().map_err(|_| crate::Error::TooLarge)?;
            if matches!(kms.key(id, &key), Err(crate::Error::KeyNotFound(_))) {
                kms.create_key(id, &key, purpose)?;
                println!("created key {tenant}/{key} ({purpose})");
            }
        }
    }
    Ok(())
}

/// Loads the dev config.
///
/// # Errors
/// [`crate::config::ConfigError`].
pub fn load(path: &Path) -> Result<Config, crate::config::ConfigError> {
    Config::load(path, &ProcessEnv)
}

/// The file in the dev directory holding the pid of the `keyfront dev` that serves it.
pub const PID_FILE: &str = "keyfront.pid";

/// A principal to add to a dev directory (`keyfront dev add-principal`).
#[derive(Debug)]
pub struct NewPrincipal {
    /// The certificate's name, and the last part of the default identity.
    pub name: String,
    /// Its tenants (`*`: all).
    pub tenants: Vec<String>,
    /// Its roles, as the config names them.
    pub roles: Vec<String>,
    /// The identity, if not the default one.
    pub identity: Option<String>,
}

/// Adds a principal to the dev directory `dir`: a client certificate from its CA, a
/// `[[principals]]` entry in its config (checked: an entry that makes the config invalid is
/// taken back), and, when `keyfront dev` is serving the directory, a reload (SIGHUP) that is
/// waited for: the new identity is known to the server when this returns.
///
/// # Errors
/// [`DevError::Principal`] for a name or identity in use or an invalid entry; I/O errors.
pub async fn add_principal(dir: &Path, principal: &NewPrincipal) -> Result<(), DevError> {
    let refuse = |why: String| Err(DevError::Principal(why));
    let name = &principal.name;
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return refuse(format!(
            "{name:?}: a name is lower-case letters, digits and -"
        ));
    }
    let config_path = dir.join("keyfront.toml");
    let certs = dir.join("certs");
    let before = std::fs::read_to_string(&config_path).map_err(io(format!(
        "{} (make the dev directory first: keyfront dev --dir {})",
        config_path.display(),
        dir.display()
    )))?;
    if certs.join(format!("{name}.crt")).exists() {
        return refuse(format!(
            "{}/{name}.crt exists already: pick another name",
            certs.display()
        ));
    }
    let identity =
        principal
            .identity
            .clone()
            .unwrap_or_else(|| match principal.tenants.as_slice() {
                [tenant] if tenant != "*" => format!("{TRUST_DOMAIN}/tenant/{tenant}/{name}"),
                _ => format!("{TRUST_DOMAIN}/{name}"),
            });
    if before.contains(&format!("identity = \"{identity}\"")) {
        return refuse(format!("{identity} is a principal already"));
    }
    let list = |items: &[String]| {
        items
            .iter()
            .map(|i| format!("\"{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let after = format!(
        "{before}\n# {name} (keyfront dev add-principal)\n[[principals]]\nidentity = \"{identity}\"\ntenants = [{}]\nroles = [{}]\n",
        list(&principal.tenants),
        list(&principal.roles)
    );
    write(&config_path, &after)?;
    if let Err(error) = Config::load(&config_path, &ProcessEnv) {
        write(&config_path, &before)?;
        return refuse(format!(
            "the entry would make the config invalid, so it was not added: {error}"
        ));
    }
    issue_client_certificate(&certs, name, &[&identity], name)?;
    println!("added principal {name}: {identity}");
    println!(
        "  certificate: {0}/{name}.crt and {0}/{name}.key",
        certs.display()
    );
    let Some((pid, endpoint)) = serving(dir) else {
        println!(
            "  keyfront dev is not serving {}: the principal counts from its next start",
            dir.display()
        );
        return Ok(());
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .map_err(|e| DevError::Io(format!("reloading keyfront dev (pid {pid})"), e.into()))?;
    // Known once the server tells the new identity PERMISSION_DENIED (or OK) instead of
    // UNAUTHENTICATED for a call it may not make; that call changes nothing.
    let endpoint = super::client::Endpoint {
        endpoint,
        dir: dir.to_path_buf(),
        principal: Some(name.clone()),
        cert: None,
        client_key: None,
        ca: None,
    };
    for _ in 0..50 {
        if let Ok(channel) = endpoint.channel(name).await {
            let answer = crate::service::pb::admin_service_client::AdminServiceClient::new(channel)
                .list_tenants(crate::service::pb::ListTenantsRequest {
                    page_size: 1,
                    page_token: String::new(),
                })
                .await;
            if !matches!(&answer, Err(status) if status.code() == tonic::Code::Unauthenticated) {
                println!(
                    "  reloaded the running keyfront dev (pid {pid}); try: keyfront encrypt --key default --principal {name} --dir {}",
                    dir.display()
                );
                return Ok(());
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    refuse(format!(
        "sent SIGHUP to keyfront dev (pid {pid}), but it does not know {identity} after 5 s: see its log"
    ))
}

/// The pid and endpoint of the `keyfront dev` serving `dir`, if it is running.
fn serving(dir: &Path) -> Option<(i32, String)> {
    let text = std::fs::read_to_string(dir.join(PID_FILE)).ok()?;
    let mut lines = text.lines();
    let pid: i32 = lines.next()?.trim().parse().ok()?;
    let endpoint = lines.next()?.trim().to_owned();
    // A pid file left by a `kill -9` may name another process by now.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains("keyfront") && cmdline.contains("dev")).then_some((pid, endpoint))
}
