//! `keyfront audit verify`: checks audit files offline, with the audit public key alone.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::audit::chain::PublicKey;
use crate::audit::verify::{self, Options};

/// `keyfront audit …`
#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify the hash chain and the signed checkpoints of audit files (any order: they are
    /// put in chain order). Exits 1 naming the first altered, dropped, reordered or cut line,
    /// or the first line no signed checkpoint covers.
    Verify {
        /// The audit public key (hex SEC1 point, as `keyfront init` prints it), or @FILE
        /// holding it: the checkpoints' signatures are what the files' writer cannot forge.
        #[arg(long)]
        public_key: String,
        /// Accept up to N lines at the end that no signed checkpoint covers yet: a live log
        /// (the server signs every `audit_checkpoint_lines` lines or interval), or one that a
        /// crash ended. A log closed cleanly needs none.
        #[arg(long, default_value_t = 0)]
        allow_unsigned_tail: u64,
        /// The files begin at this sequence on purpose (older files left out); the first line's
        /// link to the one before it is then not checked.
        #[arg(long)]
        from_seq: Option<u64>,
        /// A chain head (hex) recorded earlier, e.g. by a previous verify: it must be in the
        /// chain, so a log cut after it is caught.
        #[arg(long)]
        expect_head: Option<String>,
        /// Audit files: audit.log and its rotated audit.log.YYYY-MM-DD.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

/// Runs `keyfront audit`.
pub fn run(args: AuditArgs) -> ExitCode {
    let AuditCommand::Verify {
        public_key,
        expect_head,
        allow_unsigned_tail,
        from_seq,
        paths,
    } = args.command;
    let options = match options(Some(public_key), expect_head) {
        Ok(options) => Options {
            allow_unsigned_tail,
            from_seq,
            ..options
        },
        Err(message) => {
            eprintln!("keyfront: {message}");
            return ExitCode::from(2);
        }
    };
    match verify::verify(&paths, &options) {
        Ok(report) => {
            let Some(head) = report.head else {
                println!("OK: no audit lines in {} file(s)", paths.len());
                return ExitCode::SUCCESS;
            };
            println!(
                "OK: {} lines in {} file(s), seq {}..{}{}",
                report.lines,
                report.files,
                report.first_seq,
                head.seq,
                if report.first_seq == 1 {
                    " (from the start of the chain)"
                } else {
                    " (earlier files not given: the first line's prev is not checked)"
                }
            );
            println!(
                "checkpoints: {} signatures verified",
                report.checkpoints_verified
            );
            println!(
                "lines after the last signed checkpoint: {}{}",
                report.unsigned_tail,
                if report.unsigned_tail > 0 {
                    " (accepted with --allow-unsigned-tail: covered by the chain only)"
                } else {
                    ""
                }
            );
            println!("head: {}", hex::encode(head.hash));
            println!("(record the head; pass it as --expect-head next time to catch a cut tail)");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            println!("FAILED: {failure}");
            ExitCode::FAILURE
        }
    }
}

/// An audit public key given as hex or as @FILE holding the hex.
///
/// # Errors
/// A message naming `--public-key` and what is wrong.
pub(super) fn parse_public_key(value: &str) -> Result<PublicKey, String> {
    let text = match value.strip_prefix('@') {
        Some(file) => std::fs::read_to_string(file)
            .map_err(|e| format!("--public-key: cannot read {file}: {e}"))?,
        None => value.to_owned(),
    };
    let bytes = hex::decode(text.trim()).map_err(|_| "--public-key: not hex".to_owned())?;
    PublicKey::from_bytes(&bytes).map_err(|e| format!("--public-key: {e}"))
}

fn options(public_key: Option<String>, expect_head: Option<String>) -> Result<Options, String> {
    let public_key = public_key.as_deref().map(parse_public_key).transpose()?;
    let expect_head = match expect_head {
        None => None,
        Some(text) => Some(
            hex::decode(text.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or("--expect-head: not a 64-digit hex hash")?,
        ),
    };
    Ok(Options {
        allow_unsigned_tail: 0,
        from_seq: None,
        public_key,
        expect_head,
    })
}
