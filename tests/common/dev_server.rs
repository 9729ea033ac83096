//! A `keyfront dev` child process for end-to-end tests.

use std::process::{Command, Output};

/// The keyfront binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_keyfront");

/// Bytes as text, lossily.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A `keyfront dev` child process on a free port, stopped (SIGTERM) on drop.
pub struct DevServer {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<std::process::Child>,
    // stdout and stderr, read as they come: a pipe nobody drains fills at 64 KiB and then
    // blocks the server's next log line (and every worker thread that writes one).
    output: Option<Drained>,
}

/// Threads that read a child's stdout and stderr into one buffer.
struct Drained {
    buffer: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Drained {
    fn start(child: &mut std::process::Child) -> Self {
        use std::io::Read;
        let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let pipes: [Option<Box<dyn Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ];
        for mut pipe in pipes.into_iter().flatten() {
            let buffer = std::sync::Arc::clone(&buffer);
            readers.push(std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    buffer
                        .lock()
                        .expect("log buffer")
                        .extend_from_slice(&chunk[..n]);
                }
            }));
        }
        Self { buffer, readers }
    }

    /// Everything the child wrote, once it has exited.
    fn finish(self) -> String {
        for reader in self.readers {
            let _ = reader.join();
        }
        text(&self.buffer.lock().expect("log buffer"))
    }
}

impl DevServer {
    pub fn start() -> Self {
        Self::start_in(tempfile::tempdir().expect("tempdir"))
    }

    /// Starts `keyfront dev` in `dir` (new or made by an earlier run).
    pub fn start_in(dir: tempfile::TempDir) -> Self {
        Self::start_in_with_env(dir, &[])
    }

    /// [`DevServer::start_in`] with extra environment variables for the server.
    pub fn start_in_with_env(dir: tempfile::TempDir, env: &[(&str, &str)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        Self::start_in_on(dir, port, env)
    }

    /// [`DevServer::start_in_with_env`] on a given port (a restart where clients expect it).
    pub fn start_in_on(dir: tempfile::TempDir, port: u16, env: &[(&str, &str)]) -> Self {
        Self::start_with(dir, port, &[], env)
    }

    /// [`DevServer::start_in`] with extra arguments for `keyfront dev` (e.g. `--hsm`).
    pub fn start_in_with_args(dir: tempfile::TempDir, args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        Self::start_with(dir, port, args, &[])
    }

    fn start_with(dir: tempfile::TempDir, port: u16, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BIN)
            .args(["dev", "--dir"])
            .arg(dir.path())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .env_remove("SOFTHSM2_CONF")
            .env_remove("KRYOPTIC_CONF")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("keyfront dev starts");
        let output = Some(Drained::start(&mut child));
        let server = Self {
            dir,
            port,
            child: Some(child),
            output,
        };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && server
                    .pipe(b"ready?", "encrypt", &["--key", "default"])
                    .status
                    .success()
            {
                return server;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("keyfront dev did not come up");
    }

    pub fn pipe(&self, input: &[u8], command: &str, args: &[&str]) -> Output {
        use std::io::Write;
        let mut child = Command::new(BIN)
            .arg(command)
            .args(args)
            .args(["--dir"])
            .arg(self.dir.path())
            .args(["--endpoint", &format!("https://localhost:{}", self.port)])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("client runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
        child.wait_with_output().expect("client output")
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL (a real `kill -9`), then the server's stdout and stderr.
    pub fn kill9(mut self) -> (tempfile::TempDir, String) {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-KILL", &child.id().to_string()])
            .status();
        child.wait().expect("server exits");
        let logs = self.output.take().map(Drained::finish).unwrap_or_default();
        (
            std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")),
            logs,
        )
    }

    /// SIGTERM, then the server's stdout and stderr.
    pub fn stop(mut self) -> (tempfile::TempDir, String, i32) {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let status = child.wait().expect("server exits");
        let logs = self.output.take().map(Drained::finish).unwrap_or_default();
        (
            std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")),
            logs,
            status.code().unwrap_or(-1),
        )
    }
}

impl DevServer {
    /// A tonic channel to this server as one of the dev principals.
    pub async fn channel(&self, principal: &str) -> tonic::transport::Channel {
        channel(self.dir.path(), self.port, principal).await
    }
}

/// A tonic channel to a dev-style server in `dir` on `port` as `principal`.
pub async fn channel(
    dir: &std::path::Path,
    port: u16,
    principal: &str,
) -> tonic::transport::Channel {
    try_channel(dir, port, principal).await.expect("connect")
}

/// [`channel`], or the transport error when the connection fails.
pub async fn try_channel(
    dir: &std::path::Path,
    port: u16,
    principal: &str,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let read = |file: String| std::fs::read(dir.join("certs").join(file)).expect("read cert");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.crt".into())))
        .identity(Identity::from_pem(
            read(format!("{principal}.crt")),
            read(format!("{principal}.key")),
        ))
        .domain_name("localhost");
    Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
}

/// The server's overall health status (`grpc.health.v1`), if it answers.
pub async fn health(dir: &std::path::Path, port: u16) -> Option<i32> {
    let mut client =
        tonic_health::pb::health_client::HealthClient::new(channel(dir, port, "officer").await);
    client
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

/// Polls until the health status is `wanted` (1 = SERVING, 2 = NOT_SERVING); panics after 20 s.
pub async fn wait_for_health(dir: &std::path::Path, port: u16, wanted: i32) {
    for _ in 0..200 {
        if health(dir, port).await == Some(wanted) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("health never became {wanted}");
}

impl Drop for DevServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
