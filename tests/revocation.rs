//! Revocation as an operator does it, with certificates made by the `openssl` command (not
//! only rcgen's, whose serials never have the top bit set): serials pasted as `openssl x509
//! -noout -serial` prints them, serials bound to the CA that issued them where several CAs are
//! trusted, and CRLs made by `openssl ca -gencrl`, each put in force by `kill -HUP` on a
//! running `keyfront dev` (issue 25, finding 1).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::dev_server::{DevServer, text};
use keyfront::service::pb;
use keyfront::service::pb::key_service_client::KeyServiceClient;
use tonic::transport::Channel;

/// A CA run with `openssl ca`, as a small site runs one.
struct OpensslCa {
    dir: PathBuf,
}

fn openssl(args: &[&str], cwd: &Path) -> String {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("openssl runs");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        text(&output.stderr)
    );
    text(&output.stdout)
}

impl OpensslCa {
    fn new(dir: &Path, name: &str) -> Self {
        std::fs::create_dir_all(dir.join("newcerts")).expect("mkdir");
        std::fs::write(dir.join("index.txt"), "").expect("index");
        std::fs::write(dir.join("crlnumber"), "1000\n").expect("crlnumber");
        std::fs::write(
            dir.join("openssl.cnf"),
            format!(
                "[ ca ]\ndefault_ca = ca_default\n\n[ ca_default ]\ndir = {}\ndatabase = $dir/index.txt\n\
                 new_certs_dir = $dir/newcerts\ncertificate = $dir/ca.crt\nprivate_key = $dir/ca.key\n\
                 serial = $dir/serial\ncrlnumber = $dir/crlnumber\ndefault_md = sha256\ndefault_days = 2\n\
                 default_crl_days = 2\npolicy = policy_any\nunique_subject = no\n\n\
                 [ policy_any ]\ncommonName = supplied\n",
                dir.display()
            ),
        )
        .expect("openssl.cnf");
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            dir,
        );
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// A client certificate for `identity` with this serial (hex), signed by `openssl ca`.
    fn issue(&self, name: &str, identity: &str, serial: &str) -> PathBuf {
        std::fs::write(self.dir.join("serial"), format!("{serial}\n")).expect("serial");
        std::fs::write(
            self.dir.join(format!("{name}.ext")),
            format!(
                "subjectAltName=URI:{identity}\nextendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n"
            ),
        )
        .expect("ext");
        openssl(
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
            &self.dir,
        );
        openssl(
            &[
                "ca",
                "-batch",
                "-config",
                "openssl.cnf",
                "-notext",
                "-in",
                &format!("{name}.csr"),
                "-out",
                &format!("{name}.crt"),
                "-extfile",
                &format!("{name}.ext"),
            ],
            &self.dir,
        );
        self.dir.join(format!("{name}.crt"))
    }

    /// The serial as the operator reads it: `serial=8A1B…`.
    fn printed_serial(&self, cert: &Path) -> String {
        openssl(
            &[
                "x509",
                "-noout",
                "-serial",
                "-in",
                cert.to_str().expect("utf-8"),
            ],
            &self.dir,
        )
        .trim()
        .to_owned()
    }

    fn revoke(&self, cert: &Path) {
        openssl(
            &[
                "ca",
                "-config",
                "openssl.cnf",
                "-revoke",
                cert.to_str().expect("utf-8"),
            ],
            &self.dir,
        );
    }

    fn crl(&self) -> PathBuf {
        openssl(
            &["ca", "-config", "openssl.cnf", "-gencrl", "-out", "crl.pem"],
            &self.dir,
        );
        self.dir.join("crl.pem")
    }
}

const TOP_BIT_SERIAL: &str = "8A1B2C3D4E5F60718293A4B5C6D7E8F9";

struct Site {
    server: DevServer,
    ca: OpensslCa,
    config: PathBuf,
    original: String,
    runtime: tokio::runtime::Runtime,
}

impl Site {
    /// `keyfront dev`, whose client CA file holds the dev CA and an openssl CA, with principals
    /// for the openssl CA's clients.
    fn new() -> Self {
        let server = DevServer::start();
        let (dir, _, _) = server.stop();
        let ca = OpensslCa::new(&dir.path().join("openssl-ca"), "site client CA");
        let certs = dir.path().join("certs");
        let bundle = format!(
            "{}{}",
            std::fs::read_to_string(certs.join("ca.crt")).expect("dev CA"),
            std::fs::read_to_string(ca.dir.join("ca.crt")).expect("openssl CA")
        );
        std::fs::write(certs.join("clients.pem"), bundle).expect("bundle");
        let config = dir.path().join("keyfront.toml");
        let mut text = std::fs::read_to_string(&config).expect("config").replace(
            "client_ca = \"certs/ca.crt\"",
            "client_ca = \"certs/clients.pem\"",
        );
        for name in ["site-a", "site-b", "site-c", "dev-twin"] {
            text.push_str(&format!(
                "\n[[principals]]\nidentity = \"spiffe://keyfront.dev/tenant/acme/{name}\"\ntenants = [\"acme\"]\nroles = [\"app\"]\n"
            ));
        }
        std::fs::write(&config, &text).expect("config");
        let server = DevServer::start_in(dir);
        Self {
            server,
            ca,
            config,
            original: text,
            runtime: tokio::runtime::Runtime::new().expect("runtime"),
        }
    }

    /// A channel with a certificate and key from anywhere (the server's CA verifies it).
    fn channel(&self, cert: &Path) -> Result<Channel, tonic::transport::Error> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let dir = self.server.dir.path();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(
                std::fs::read(dir.join("certs/ca.crt")).expect("ca"),
            ))
            .identity(Identity::from_pem(
                std::fs::read(cert).expect("cert"),
                std::fs::read(cert.with_extension("key")).expect("key"),
            ))
            .domain_name("localhost");
        self.runtime.block_on(
            Channel::from_shared(format!("https://127.0.0.1:{}", self.server.port))
                .expect("uri")
                .tls_config(tls)
                .expect("tls")
                .connect(),
        )
    }

    fn encrypt(&self, channel: &Channel) -> Result<(), tonic::Status> {
        self.runtime
            .block_on(
                KeyServiceClient::new(channel.clone()).encrypt(pb::EncryptRequest {
                    key: "default".into(),
                    plaintext: b"x".to_vec(),
                    ..Default::default()
                }),
            )
            .map(drop)
    }

    /// A fresh connection's first Encrypt: refused at the handshake or by the request.
    fn new_connection_encrypts(&self, cert: &Path) -> bool {
        self.channel(cert)
            .is_ok_and(|channel| self.encrypt(&channel).is_ok())
    }

    /// Writes `[revocations]` and reloads; waits until `probe` says it took effect.
    fn revoke(&self, revocations: &str, mut took_effect: impl FnMut() -> bool) {
        std::fs::write(&self.config, format!("{}\n{revocations}\n", self.original))
            .expect("config");
        Command::new("kill")
            .args(["-HUP", &self.server.pid().to_string()])
            .status()
            .expect("kill -HUP");
        for _ in 0..50 {
            if took_effect() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("the reload did not take effect:\n{revocations}");
    }
}

/// A certificate from the dev CA (rcgen) with a given serial: a twin of an openssl one.
fn dev_twin(dir: &Path, serial: &[u8]) -> PathBuf {
    let certs = dir.join("certs");
    keyfront::cli::dev::issue_client_certificate_with_serial(
        &certs,
        "dev-twin",
        &["spiffe://keyfront.dev/tenant/acme/dev-twin"],
        "dev-twin",
        Some(serial),
    )
    .expect("dev twin");
    certs.join("dev-twin.crt")
}

/// The finding as the reviewer made it: a serial with its top bit set, pasted as openssl
/// prints it, did not revoke (the DER content has a leading 00). Now it does, bound to its
/// issuer, on a connection already open too; the dev CA's certificate with the same serial
/// number is not touched; a bare serial while two CAs are trusted, or one that is not a
/// serial, is refused with the form expected, and the running rules stay.
#[test]
fn a_serial_with_its_top_bit_set_revokes_as_openssl_prints_it() {
    let site = Site::new();
    let a = site.ca.issue(
        "site-a",
        "spiffe://keyfront.dev/tenant/acme/site-a",
        TOP_BIT_SERIAL,
    );
    let printed = site.ca.printed_serial(&a);
    assert_eq!(printed, format!("serial={TOP_BIT_SERIAL}"));
    let twin = dev_twin(
        site.server.dir.path(),
        &hex::decode(TOP_BIT_SERIAL).expect("hex"),
    );
    let open_a = site.channel(&a).expect("connect");
    site.encrypt(&open_a).expect("site-a works");
    let open_twin = site.channel(&twin).expect("connect");
    site.encrypt(&open_twin).expect("the dev twin works");

    // Ambiguous with two CAs, and not a serial at all: refused at load, nothing changes.
    for bad in [
        format!("[revocations]\nserials = [\"{printed}\"]"),
        "[revocations]\nserials = [\"CN=site-a\"]".to_owned(),
    ] {
        let problems = keyfront::config::Config::load(
            &{
                let path = site.server.dir.path().join("bad.toml");
                std::fs::write(&path, format!("{}\n{bad}\n", site.original)).expect("write");
                path
            },
            &keyfront::config::ProcessEnv,
        )
        .expect_err("refused")
        .to_string();
        assert!(
            problems.contains("ambiguous") || problems.contains("is not a certificate serial"),
            "{problems}"
        );
    }
    site.revoke(&format!("[revocations]\nserials = [\"{printed}\"]"), || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        true
    });
    site.encrypt(&open_a)
        .expect("an invalid config changed nothing");

    // Bound to the openssl CA, pasted as printed: revoked, on the open connection too.
    site.revoke(
        &format!(
            "[[revocations.by_issuer]]\nissuer = \"openssl-ca/ca.crt\"\nserials = [\"{printed}\"]"
        ),
        || site.encrypt(&open_a).is_err(),
    );
    let status = site.encrypt(&open_a).expect_err("revoked");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
    assert!(!site.new_connection_encrypts(&a), "a new connection too");
    site.encrypt(&open_twin)
        .expect("the same serial from another CA is not revoked");
    assert!(site.new_connection_encrypts(&twin));
}

/// A CRL made by `openssl ca -gencrl`: after `kill -HUP` the revoked certificate is refused on
/// its open connection (judged per request) and at the handshake of a new one; the CA's
/// other certificates go on; a CRL of a CA the server does not trust is refused at load.
#[test]
fn a_crl_from_openssl_ca_revokes_on_reload() {
    let site = Site::new();
    let b = site
        .ca
        .issue("site-b", "spiffe://keyfront.dev/tenant/acme/site-b", "F1");
    let c = site
        .ca
        .issue("site-c", "spiffe://keyfront.dev/tenant/acme/site-c", "80");
    let open_b = site.channel(&b).expect("connect");
    site.encrypt(&open_b).expect("site-b works");
    site.ca.revoke(&b);
    let crl = site.ca.crl();
    assert!(crl.exists());
    site.revoke(
        "[revocations]\ncrl_files = [\"openssl-ca/crl.pem\"]",
        || site.encrypt(&open_b).is_err(),
    );
    let status = site.encrypt(&open_b).expect_err("revoked by the CRL");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        site.channel(&b)
            .map_or(true, |channel| site.encrypt(&channel).is_err()),
        "a new connection of a revoked certificate fails"
    );
    assert!(site.new_connection_encrypts(&c), "the CA's others go on");

    let stranger = OpensslCa::new(&site.server.dir.path().join("stranger-ca"), "stranger");
    let crl = stranger.crl();
    let path = site.server.dir.path().join("bad.toml");
    std::fs::write(
        &path,
        format!(
            "{}\n[revocations]\ncrl_files = [\"{}\"]\n",
            site.original,
            crl.display()
        ),
    )
    .expect("write");
    let problems = keyfront::config::Config::load(&path, &keyfront::config::ProcessEnv)
        .expect_err("refused")
        .to_string();
    assert!(
        problems.contains("not issued and signed by a CA"),
        "{problems}"
    );
}
