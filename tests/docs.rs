//! The docs are tests: the README's "Try it" blocks, the restore drill and "Adding a principal"
//! of docs/OPERATIONS.md run as written, extracted from the markdown when the test runs (never
//! copied), against a fresh `keyfront dev`, and each line is held to what its comment says.
//!
//! A line's comment states what it does, in one of these forms:
//! - `# prints TEXT`: stdout is TEXT (a TEXT ending in `…` is a prefix); exit status 0, or the
//!   status a trailing `(exit status N)` names;
//! - `# CODE: …` with a gRPC code name (`INVALID_ARGUMENT: …`): the command fails with exit
//!   status 1 and that code; an all-capitals word right after the colon (`VERSION_DISABLED`)
//!   must be in its message too;
//! - anything else, or no comment: exit status 0.
//!
//! Every block runs in one bash process, line after line, as a reader pasting it would: what a
//! line sets (`mac=$(…)`, `export …`) is there for the next.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::dev_server::{BIN, text};

const CODES: &[&str] = &[
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// What a documented line must do.
#[derive(Debug, PartialEq)]
enum Expect {
    /// Exit status `status`, and stdout `text` (a prefix if `prefix`).
    Prints {
        text: String,
        prefix: bool,
        status: i32,
    },
    /// Exit status 1 with this gRPC code, and this reason in the message if given.
    Fails {
        code: String,
        reason: Option<String>,
    },
    /// Exit status 0.
    Succeeds,
}

/// One command of a block, as the markdown has it.
#[derive(Debug)]
struct Line {
    /// `file:line` of its first line.
    place: String,
    command: String,
    expect: Expect,
}

/// The fenced blocks of `language` in the section of `file` whose heading is `heading`.
fn blocks(file: &str, heading: &str, language: &str) -> Vec<(usize, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let markdown = std::fs::read_to_string(&path).expect("read the doc");
    let mut in_section = false;
    let mut level = 0;
    let mut found = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, raw) in markdown.lines().enumerate() {
        let trimmed = raw.trim_start();
        if current.is_none() && trimmed.starts_with('#') && !trimmed.starts_with("#!") {
            let hashes = trimmed.chars().take_while(|c| *c == '#').count();
            let title = trimmed[hashes..].trim();
            if title == heading {
                in_section = true;
                level = hashes;
                continue;
            }
            if in_section && hashes <= level {
                break;
            }
        }
        if !in_section {
            continue;
        }
        match &mut current {
            None if trimmed == format!("```{language}") => current = Some((i + 2, String::new())),
            Some(_) if trimmed == "```" => {
                found.push(current.take().expect("a block"));
            }
            Some((_, body)) => {
                // Blocks inside list items are indented; the commands are not.
                body.push_str(trimmed);
                body.push('\n');
            }
            None => {}
        }
    }
    assert!(
        !found.is_empty(),
        "{file} has no {language} block under {heading:?}"
    );
    found
}

/// A block's commands: continuation lines joined, each with its expectation.
fn lines(file: &str, (first, body): &(usize, String)) -> Vec<Line> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in body.lines().enumerate() {
        let number = first + i;
        let (start, mut text) = match pending.take() {
            Some((start, before)) => (start, format!("{before}\n{raw}")),
            None => (number, raw.to_owned()),
        };
        if text.ends_with('\\') {
            pending = Some((start, text));
            continue;
        }
        if text.trim().is_empty() || text.trim_start().starts_with('#') {
            continue;
        }
        let comment = text.find(" # ").map(|at| {
            let comment = text[at + 3..].trim().to_owned();
            text.truncate(at);
            comment
        });
        out.push(Line {
            place: format!("{file}:{start}"),
            command: text.trim_end().to_owned(),
            expect: comment.as_deref().map_or(Expect::Succeeds, expectation),
        });
    }
    out
}

fn expectation(comment: &str) -> Expect {
    if let Some(rest) = comment.strip_prefix("prints ") {
        let (printed, status) = match rest.split_once(" (") {
            Some((printed, after)) => {
                let status = after
                    .strip_prefix("exit status ")
                    .and_then(|s| s.trim_end_matches(')').parse().ok())
                    .unwrap_or(0);
                (printed, status)
            }
            None => (rest, 0),
        };
        let prefix = printed.ends_with('…');
        return Expect::Prints {
            text: printed.trim_end_matches('…').to_owned(),
            prefix,
            status,
        };
    }
    if let Some((code, rest)) = comment.split_once(": ") {
        if CODES.contains(&code) {
            let word = rest.split_whitespace().next().unwrap_or_default();
            let reason = (word.len() > 3
                && word.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .then(|| word.to_owned());
            return Expect::Fails {
                code: code.to_owned(),
                reason,
            };
        }
    }
    Expect::Succeeds
}

/// What one command did.
struct Outcome {
    status: i32,
    stdout: String,
    stderr: String,
}

/// Runs `lines` in one bash process in `cwd` with `env` set (after `preamble`), each line's
/// output kept apart; the process group is ended afterwards (a line may start a server in the
/// background): see [`end_group`]. Returns each line's outcome and the group's leader.
fn run(cwd: &Path, env: &[(&str, String)], preamble: &str, lines: &[Line]) -> (Vec<Outcome>, i32) {
    let results = tempfile::tempdir().expect("tempdir");
    let mut script = String::from(preamble);
    script.push('\n');
    for (i, line) in lines.iter().enumerate() {
        let base = results.path().join(i.to_string());
        script.push_str(&format!(
            "{{ {}\n}} >'{}.out' 2>'{}.err' </dev/null\necho $? >'{}.rc'\n",
            line.command,
            base.display(),
            base.display(),
            base.display()
        ));
    }
    let bin_dir = Path::new(BIN).parent().expect("bin dir");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new("setsid")
        .args(["bash", "-c", &script])
        .current_dir(cwd)
        .env("PATH", path)
        .env_remove("KEYFRONT_DEV_DIR")
        .env_remove("KEYFRONT_CERT_FILE")
        .env_remove("KEYFRONT_KEY_FILE")
        .env_remove("KEYFRONT_CA_FILE")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .spawn()
        .expect("bash runs");
    let pid = child.id();
    let status = child.wait().expect("bash ends");
    assert!(
        status.success() || status.code().is_some(),
        "bash: {status}"
    );
    let outcomes: Vec<Outcome> = (0..lines.len())
        .map(|i| {
            let base = results.path().join(i.to_string());
            let read = |ext: &str| {
                std::fs::read(base.with_extension(ext))
                    .map(|b| text(&b))
                    .unwrap_or_default()
            };
            Outcome {
                status: read("rc").trim().parse().unwrap_or(-1),
                stdout: read("out"),
                stderr: read("err"),
            }
        })
        .collect();
    (outcomes, i32::try_from(pid).expect("pid"))
}

/// Ends what a block left running in the background (its process group).
fn end_group(leader: i32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(leader),
        nix::sys::signal::Signal::SIGTERM,
    );
}

/// Holds every line to its comment; the failure names each line that broke its promise.
fn check(lines: &[Line], outcomes: &[Outcome]) {
    let mut broken = Vec::new();
    for (line, outcome) in lines.iter().zip(outcomes) {
        let ok = match &line.expect {
            Expect::Prints {
                text,
                prefix,
                status,
            } => {
                let printed = outcome.stdout.trim_end();
                outcome.status == *status
                    && if *prefix {
                        printed.starts_with(text.as_str())
                    } else {
                        printed == text
                    }
            }
            Expect::Fails { code, reason } => {
                outcome.status == 1
                    && outcome.stderr.starts_with(&format!("keyfront: {code}"))
                    && reason
                        .as_ref()
                        .is_none_or(|reason| outcome.stderr.contains(reason.as_str()))
            }
            Expect::Succeeds => outcome.status == 0,
        };
        if !ok {
            broken.push(format!(
                "{}: {}\n  promised {:?}\n  exit status {}, stdout {:?}, stderr {:?}",
                line.place,
                line.command,
                line.expect,
                outcome.status,
                outcome.stdout,
                outcome.stderr
            ));
        }
    }
    assert!(
        broken.is_empty(),
        "the docs say what these lines do not:\n{}",
        broken.join("\n")
    );
}

/// A `keyfront dev` in `root/.keyfront-dev`, as the README's reader starts it.
struct Dev {
    root: tempfile::TempDir,
    port: u16,
    child: std::process::Child,
}

impl Dev {
    fn start() -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let child = Command::new(BIN)
            .args(["dev", "--listen", &format!("127.0.0.1:{port}")])
            .current_dir(root.path())
            .env_remove("SOFTHSM2_CONF")
            .env_remove("KEYFRONT_DEV_DIR")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("keyfront dev starts");
        let dev = Self { root, port, child };
        let ready = dev.client(&["selfcheck", "--wait", "60", "--principal", "officer"]);
        assert!(
            ready.status.success(),
            "keyfront dev did not come up: {}",
            text(&ready.stdout)
        );
        dev
    }

    fn dir(&self) -> PathBuf {
        self.root.path().join(".keyfront-dev")
    }

    fn endpoint(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    fn client(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .current_dir(self.root.path())
            .env("KEYFRONT_ENDPOINT", self.endpoint())
            .env_remove("KEYFRONT_DEV_DIR")
            .output()
            .expect("client runs")
    }

    fn client_in(&self, args: &[&str], input: &[u8]) -> std::process::Output {
        use std::io::Write;
        let mut child = Command::new(BIN)
            .args(args)
            .current_dir(self.root.path())
            .env("KEYFRONT_ENDPOINT", self.endpoint())
            .env_remove("KEYFRONT_DEV_DIR")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("client runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("stdin");
        child.wait_with_output().expect("client output")
    }

    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid")),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_comment_grammar_reads_what_the_docs_promise() {
    assert_eq!(
        expectation("prints hi"),
        Expect::Prints {
            text: "hi".into(),
            prefix: false,
            status: 0
        }
    );
    assert_eq!(
        expectation("prints invalid (exit status 1)"),
        Expect::Prints {
            text: "invalid".into(),
            prefix: false,
            status: 1
        }
    );
    assert_eq!(
        expectation("prints OK: snapshot of …"),
        Expect::Prints {
            text: "OK: snapshot of ".into(),
            prefix: true,
            status: 0
        }
    );
    assert_eq!(
        expectation("FAILED_PRECONDITION: VERSION_DESTROY_SCHEDULED"),
        Expect::Fails {
            code: "FAILED_PRECONDITION".into(),
            reason: Some("VERSION_DESTROY_SCHEDULED".into())
        }
    );
    assert_eq!(
        expectation("INVALID_ARGUMENT: decryption failed (wrong context)"),
        Expect::Fails {
            code: "INVALID_ARGUMENT".into(),
            reason: None
        }
    );
    assert_eq!(expectation("as officer: the key"), Expect::Succeeds);
}

/// The README's "Try it" (issue 24, defect 5: it once scheduled version 1 for destruction and
/// then promised that a grant decrypts what version 1 encrypted, without its context).
#[test]
fn the_readmes_try_it_runs_as_written() {
    let mut dev = Dev::start();
    let mut all = Vec::new();
    for block in blocks("README.md", "Try it", "sh") {
        all.extend(lines("README.md", &block));
    }
    assert!(all.len() > 30, "{} lines", all.len());
    let env = [("KEYFRONT_ENDPOINT", dev.endpoint())];
    let (outcomes, leader) = run(dev.root.path(), &env, "", &all);
    end_group(leader);
    check(&all, &outcomes);
    dev.stop();
}

/// docs/OPERATIONS.md's restore drill: a deployment takes a snapshot, goes on working, and
/// stops; the drill restores the snapshot and the journal on "another host" and checks it.
/// Then what was done after the snapshot is there too.
#[test]
fn the_restore_drill_runs_as_written() {
    let mut dev = Dev::start();
    let dir = dev.dir();
    let drill = dev.root.path().join("drill");
    let host = dev.root.path().join("drill-host");
    std::fs::create_dir_all(&drill).expect("mkdir");
    std::fs::create_dir_all(&host).expect("mkdir");
    // The known ciphertext of an important tenant, made before the snapshot.
    std::fs::write(drill.join("known.txt"), "the known plaintext\n").expect("write");
    let known = dev.client_in(&["encrypt", "--key", "default"], b"the known plaintext\n");
    assert!(known.status.success(), "{}", text(&known.stderr));
    std::fs::write(drill.join("known.b64"), &known.stdout).expect("write");
    let snapshot = dev.client(&["backup", "create"]);
    assert!(snapshot.status.success(), "{}", text(&snapshot.stderr));
    // After the snapshot: only the journal has these.
    for args in [
        &["admin", "rotate-key", "acme", "default"][..],
        &["admin", "create-tenant", "initech"][..],
        &["admin", "create-key", "initech", "default"][..],
    ] {
        let done = dev.client(args);
        assert!(done.status.success(), "{args:?}: {}", text(&done.stderr));
    }
    let after = dev.client_in(
        &["encrypt", "--key", "default"],
        b"written after the snapshot",
    );
    assert!(after.status.success(), "{}", text(&after.stderr));
    dev.stop();

    // The site: the deployment's config with absolute paths, as production configs have them;
    // what the restored server writes (audit log, backups, journal) stays on the drill host.
    let config = std::fs::read_to_string(dir.join("keyfront.toml")).expect("config");
    let absolute = |relative: &str| format!("\"{}\"", dir.join(relative).display());
    let site_config = config
        .replace("\"certs/", &format!("\"{}/certs/", dir.display()))
        .replace("\"hsm/pin\"", &absolute("hsm/pin"))
        .replace(
            "data_dir = \"data\"",
            &format!("data_dir = {}", absolute("data")),
        );
    std::fs::write(host.join("production.toml"), site_config).expect("write");
    let certs = dir.join("certs");
    let site = format!(
        "CONFIG={}\nBACKUPS={}\nJOURNAL={}\nRESTORED={}\nKNOWN={}\nAPP={}\n\
         export KEYFRONT_ENDPOINT={}\nexport KEYFRONT_CA_FILE={}\n\
         export KEYFRONT_CERT_FILE={} KEYFRONT_KEY_FILE={}\n",
        host.join("production.toml").display(),
        dir.join("backups").display(),
        dir.join("journal").display(),
        host.join("data-restored").display(),
        drill.join("known").display(),
        certs.join("acme-app").display(),
        dev.endpoint(),
        certs.join("ca.crt").display(),
        certs.join("officer.crt").display(),
        certs.join("officer.key").display(),
    );
    let all_blocks = blocks(
        "docs/OPERATIONS.md",
        "The restore drill, step by step",
        "sh",
    );
    assert!(
        all_blocks[0].1.starts_with("# Your site"),
        "the drill starts with the site's names"
    );
    let mut all = Vec::new();
    for block in &all_blocks[1..] {
        all.extend(lines("docs/OPERATIONS.md", block));
    }
    let env = [(
        "SOFTHSM2_CONF",
        dir.join("hsm/softhsm2.conf").display().to_string(),
    )];
    let (outcomes, leader) = run(&host, &env, &site, &all);
    if std::panic::catch_unwind(|| check(&all, &outcomes)).is_err() {
        let log = std::fs::read_to_string(host.join("restored.log")).unwrap_or_default();
        end_group(leader);
        panic!("the drill broke its promises (above); the restored server's log:\n{log}");
    }
    // The journal's part: the rotation after the snapshot (v2) and the new tenant.
    let restored = Command::new(BIN)
        .args(["decrypt", "--dir"])
        .arg(&dir)
        .args(["--endpoint", &dev.endpoint()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(&after.stdout)?;
            child.wait_with_output()
        })
        .expect("decrypt runs");
    let listing = dev.client(&["admin", "list-tenants"]);
    end_group(leader);
    assert_eq!(
        text(&restored.stdout),
        "written after the snapshot",
        "{}",
        text(&restored.stderr)
    );
    assert!(
        text(&listing.stdout).contains("initech"),
        "{}",
        text(&listing.stdout)
    );
}

/// docs/OPERATIONS.md's "Adding a principal": a client certificate made by openssl with the
/// commands as written (the dev CA standing in for the site's), the config lines as written,
/// a reload, and the new principal works.
#[test]
fn adding_a_principal_with_openssl_runs_as_written() {
    let dev = Dev::start();
    for args in [
        &["admin", "create-tenant", "initech"][..],
        &["admin", "create-key", "initech", "default"][..],
    ] {
        let done = dev.client(args);
        assert!(done.status.success(), "{args:?}: {}", text(&done.stderr));
    }
    let sections = blocks("docs/OPERATIONS.md", "Adding a principal", "sh");
    let openssl: Vec<_> = sections
        .iter()
        .filter(|(_, body)| body.contains("openssl x509 -req"))
        .collect();
    assert_eq!(openssl.len(), 1, "one openssl block");
    let all = lines("docs/OPERATIONS.md", openssl[0]);
    let (outcomes, leader) = run(dev.root.path(), &[], "", &all);
    end_group(leader);
    check(&all, &outcomes);
    let toml = blocks("docs/OPERATIONS.md", "Adding a principal", "toml");
    let config = dev.dir().join("keyfront.toml");
    let mut text_config = std::fs::read_to_string(&config).expect("config");
    text_config.push('\n');
    text_config.push_str(&toml[0].1);
    std::fs::write(&config, text_config).expect("write");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(dev.child.id()).expect("pid")),
        nix::sys::signal::Signal::SIGHUP,
    );
    let cert = dev.root.path().join("initech-app.crt");
    let key = dev.root.path().join("initech-app.key");
    let as_new = |input: &[u8], command: &str| {
        dev.client_in(
            &[
                command,
                "--cert",
                cert.to_str().expect("utf-8"),
                "--client-key",
                key.to_str().expect("utf-8"),
            ],
            input,
        )
    };
    let mut sealed = None;
    for _ in 0..50 {
        let output = dev.client_in(
            &[
                "encrypt",
                "--key",
                "default",
                "--cert",
                cert.to_str().expect("utf-8"),
                "--client-key",
                key.to_str().expect("utf-8"),
            ],
            b"hi",
        );
        if output.status.success() {
            sealed = Some(output.stdout);
            break;
        }
        // Until the reload: UNAUTHENTICATED.
        assert!(
            text(&output.stderr).contains("UNAUTHENTICATED"),
            "{}",
            text(&output.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let sealed = sealed.expect("the openssl certificate works once the config is reloaded");
    let opened = as_new(&sealed, "decrypt");
    assert_eq!(text(&opened.stdout), "hi", "{}", text(&opened.stderr));
}
