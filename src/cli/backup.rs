//! `keyfront backup`: `create` (asks the running server for a snapshot), `verify` (offline,
//! with the audit public key or the token) and `restore` (offline, with the token, into an
//! empty data directory).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Subcommand};

use super::admin::{AdminArgs, AdminCommand};
use super::client::Endpoint;
use crate::backup::{self, Manifest};
use crate::config::{Config, ProcessEnv};
use crate::hsm::Hsm;
use crate::hsm::pkcs11::Pkcs11Hsm;

/// `keyfront backup …`
#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(subcommand)]
    command: BackupCommand,
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Ask the running server for a snapshot now (AdminService/CreateBackup, as an officer).
    Create {
        /// Where on the server's host (default: the configured backup directory, which is then
        /// pruned to the retention).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Makes a retry idempotent.
        #[arg(long, default_value = "")]
        request_id: String,
        #[command(flatten)]
        endpoint: Endpoint,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check an archive: the manifest's signature, every section's checksum, completeness.
    /// Exits 1 naming what fails.
    Verify {
        /// The archive (`keyfront-YYYYMMDDTHHMMSSZ.kfb`).
        archive: PathBuf,
        /// The audit public key (hex, or @FILE), e.g. `audit-public-key.hex` of `keyfront dev`.
        #[arg(long, conflicts_with = "config")]
        public_key: Option<String>,
        /// Or the config file: the key is read from its HSM token.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Restore an archive and the key journal into a new, empty data directory, with the same
    /// HSM token. Start keyfront on it afterwards (storage.data_dir).
    Restore {
        /// The archive.
        archive: PathBuf,
        /// The key journal's directory (default: backup.journal_dir of the config).
        #[arg(long)]
        journal: Option<PathBuf>,
        /// Restore the snapshot alone, accepting that keys, versions and destructions since it
        /// are lost (a destroyed tenant or version may come back).
        #[arg(long, conflicts_with = "journal")]
        without_journal: bool,
        /// The new data directory (must not exist or be empty).
        #[arg(long)]
        data_dir: PathBuf,
        /// The config file naming the HSM token.
        #[arg(long)]
        config: PathBuf,
    },
}

/// Runs `keyfront backup`.
pub fn run(args: BackupArgs) -> ExitCode {
    match args.command {
        BackupCommand::Create {
            out,
            request_id,
            endpoint,
            json,
        } => {
            let out = match out.map(std::path::absolute).transpose() {
                Ok(out) => out,
                Err(error) => {
                    eprintln!("keyfront: --out: {error}");
                    return ExitCode::from(2);
                }
            };
            let args = AdminArgs {
                endpoint,
                json,
                command: AdminCommand::BackupCreate {
                    out: out.map(|p| p.display().to_string()).unwrap_or_default(),
                    request_id,
                },
            };
            super::run_client(super::admin::run(args))
        }
        BackupCommand::Verify {
            archive,
            public_key,
            config,
        } => {
            let key = match (public_key, config) {
                (Some(value), _) => super::audit::parse_public_key(&value),
                (None, Some(config)) => open_hsm(&config).and_then(|(_, hsm)| {
                    crate::audit::chain::PublicKey::from_bytes(&hsm.audit_public_key())
                }),
                (None, None) => Err("give --public-key HEX|@FILE or --config FILE".to_owned()),
            };
            let key = match key {
                Ok(key) => key,
                Err(message) => {
                    eprintln!("keyfront: {message}");
                    return ExitCode::from(2);
                }
            };
            match backup::verify(&archive, &key, false) {
                Ok(verified) => {
                    println!("OK: {}", describe(&verified.manifest));
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    println!("FAILED: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        BackupCommand::Restore {
            archive,
            journal,
            without_journal,
            data_dir,
            config,
        } => {
            let (config, hsm) = match open_hsm(&config) {
                Ok(opened) => opened,
                Err(message) => {
                    eprintln!("keyfront: {message}");
                    return ExitCode::from(2);
                }
            };
            let journal = match (journal, without_journal) {
                (Some(dir), _) => Some(dir),
                (None, true) => None,
                (None, false) => match config.kms.store.journal_dir.clone() {
                    Some(dir) if dir.is_dir() => Some(dir),
                    _ => {
                        eprintln!(
                            "keyfront: no key journal found (backup.journal_dir); give --journal DIR, or --without-journal to accept losing what changed since the snapshot"
                        );
                        return ExitCode::from(2);
                    }
                },
            };
            let hsm: Arc<dyn Hsm> = Arc::new(hsm);
            match backup::restore::restore(
                &hsm,
                &archive,
                journal.as_deref(),
                &data_dir,
                config.kms.store,
            ) {
                Ok(restored) => {
                    println!("restored {}", describe(&restored.manifest));
                    println!(
                        "journal: {} commits, {} tenants created, {} updated, {} destroyed, {} entries already in the snapshot",
                        restored.replay.commits,
                        restored.replay.tenants_created,
                        restored.replay.tenants_updated,
                        restored.replay.tenants_destroyed,
                        restored.replay.skipped,
                    );
                    if restored.grants_revoked + restored.approvals_dropped > 0 {
                        println!(
                            "ended: {} support grant(s) revoked, {} pending approval(s) dropped (not journaled; ask again)",
                            restored.grants_revoked, restored.approvals_dropped
                        );
                    }
                    if restored.destroyed_again > 0 {
                        println!(
                            "destroyed again: {} tenant(s) destroyed while the snapshot was taken",
                            restored.destroyed_again
                        );
                    }
                    println!(
                        "{} tenant(s) verified in {}; start keyfront with storage.data_dir = \"{}\"",
                        restored.tenants,
                        data_dir.display(),
                        data_dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("keyfront: restore refused: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn open_hsm(path: &std::path::Path) -> Result<(Config, Pkcs11Hsm), String> {
    let config = Config::load_offline(path, &ProcessEnv).map_err(|e| e.to_string())?;
    let hsm = Pkcs11Hsm::open(&config.hsm).map_err(|e| e.to_string())?;
    Ok((config, hsm))
}

fn describe(manifest: &Manifest) -> String {
    let keys: usize = manifest.tenants.iter().map(|t| t.keys.len()).sum();
    let versions: usize = manifest
        .tenants
        .iter()
        .flat_map(|t| &t.keys)
        .map(|k| k.versions.len())
        .sum();
    format!(
        "snapshot of {} ({} tenants, {} keys, {} versions; MWK generation {}; audit head {})",
        manifest.created,
        manifest.tenants.len(),
        keys,
        versions,
        manifest.mwk_generation,
        manifest
            .audit_head
            .as_ref()
            .map_or("none".to_owned(), |h| format!("{} {}", h.seq, h.hash)),
    )
}
