//! `keyfront dev --nodes N`: a local cluster on PostgreSQL, each node in `DIR/node-<i>` with
//! its own config, data directory and audit log, and a copy of the dev token (as a network HSM
//! shared by the nodes would hold the same keys).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::{DevError, PRINCIPALS, TOKEN_LABEL, TRUST_DOMAIN, io, write};

/// The PostgreSQL namespace of the dev cluster.
pub const CLUSTER_NAMESPACE: &str = "keyfront_dev";

/// What `keyfront dev --nodes` makes.
pub struct Cluster {
    /// How many nodes.
    pub nodes: usize,
    /// The environment variable holding the PostgreSQL connection string.
    pub url_env: String,
    /// The PostgreSQL namespace.
    pub namespace: String,
}

/// One node of a dev cluster: its config, and the SoftHSM configuration of its token copy.
pub struct ClusterNode {
    /// `DIR/node-<i>/keyfront.toml`.
    pub config: PathBuf,
    /// `DIR/node-<i>/hsm/softhsm2.conf`.
    pub softhsm_conf: PathBuf,
    /// Where it listens.
    pub listen: SocketAddr,
}

/// Writes the configs of a cluster of `cluster.nodes` nodes on PostgreSQL (connection string
/// from the environment variable `cluster.url_env`), listening on consecutive ports from `listen`: node `i`
/// lives in `DIR/node-<i>` with its own data directory and audit log. Existing configs stay.
///
/// # Errors
/// [`DevError::Io`].
pub fn ensure_cluster_configs(
    dir: &Path,
    listen: SocketAddr,
    cluster: &Cluster,
) -> Result<Vec<ClusterNode>, DevError> {
    let (nodes, url_env, namespace) = (cluster.nodes, &cluster.url_env, &cluster.namespace);
    let mut made = Vec::new();
    for i in 0..nodes {
        let node_dir = dir.join(format!("node-{i}"));
        std::fs::create_dir_all(&node_dir).map_err(io(node_dir.display().to_string()))?;
        let port = u16::try_from(usize::from(listen.port()) + i).map_err(|_| {
            DevError::Io(
                "ports".into(),
                std::io::Error::other("the nodes' ports run past 65535"),
            )
        })?;
        let node_listen = SocketAddr::new(listen.ip(), port);
        let path = node_dir.join("keyfront.toml");
        if !path.exists() {
            let mut text = format!(
                "# keyfront dev cluster node {i} (made by `keyfront dev --nodes {nodes}`); config.example.toml documents every key.\n\n\
                 [hsm]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"{TOKEN_LABEL}\"\npin_file = \"../hsm/pin\"\n\n\
                 [storage]\ndata_dir = \"data\"\nbackend = \"postgres\"\n\n\
                 [storage.postgres]\nurl_env = \"{url_env}\"\nnamespace = \"{namespace}\"\n\n\
                 [server]\nlisten = \"{node_listen}\"\ncert = \"../certs/server.crt\"\nkey = \"../certs/server.key\"\nclient_ca = \"../certs/ca.crt\"\nnode_id = \"node-{i}\"\naudit_path = \"audit/audit.log\"\n"
            );
            for (name, identity, tenants, roles) in PRINCIPALS {
                let list = |items: &[&str]| {
                    items
                        .iter()
                        .map(|item| format!("\"{item}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                text.push_str(&format!(
                    "\n# {name}\n[[principals]]\nidentity = \"{TRUST_DOMAIN}/{identity}\"\ntenants = [{}]\nroles = [{}]\n",
                    list(tenants),
                    list(roles)
                ));
            }
            write(&path, &text)?;
        }
        made.push(ClusterNode {
            config: path,
            softhsm_conf: node_dir.join("hsm/softhsm2.conf"),
            listen: node_listen,
        });
    }
    Ok(made)
}

/// Gives each node a copy of the dev token (`DIR/hsm`), made once the ceremony ran: the same
/// keys on every node, as a network HSM shared by the nodes would have them. A node with a
/// copy keeps it.
///
/// # Errors
/// [`DevError::Io`].
pub fn ensure_token_copies(dir: &Path, nodes: &[ClusterNode]) -> Result<(), DevError> {
    let source = dir.join("hsm/tokens");
    for node in nodes {
        let hsm_dir = node.softhsm_conf.parent().ok_or_else(|| {
            DevError::Io("node directory".into(), std::io::ErrorKind::NotFound.into())
        })?;
        if node.softhsm_conf.exists() {
            continue;
        }
        let tokens = hsm_dir.join("tokens");
        copy_dir(&source, &tokens)?;
        write(
            &node.softhsm_conf,
            &format!(
                "# SoftHSM configuration of a keyfront dev cluster node: a copy of ../../hsm's token\ndirectories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\nslots.mechanisms = ALL\nlibrary.reset_on_fork = false\n",
                tokens.display()
            ),
        )?;
    }
    Ok(())
}

pub(super) fn copy_dir(from: &Path, to: &Path) -> Result<(), DevError> {
    std::fs::create_dir_all(to).map_err(io(to.display().to_string()))?;
    for entry in std::fs::read_dir(from).map_err(io(from.display().to_string()))? {
        let entry = entry.map_err(io(from.display().to_string()))?;
        let target = to.join(entry.file_name());
        if entry
            .file_type()
            .map_err(io(entry.path().display().to_string()))?
            .is_dir()
        {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(io(target.display().to_string()))?;
        }
    }
    Ok(())
}
