//! What a node keeps on disk so that it can be restarted (`overlayd run`) as the same member:
//! its identity, the members it last knew (seeds to rejoin through) and the endpoints it hosts.
//!
//! Files are small JSON documents, replaced atomically (write, then rename).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::api::Failure;
use crate::model::Endpoint;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub node_id: String,
    /// The cluster secret (`OVL1-` and hex), never a join token.
    pub token: String,
    pub advertise: Ipv4Addr,
    pub gossip_port: u16,
    pub vxlan_port: u16,
}

const IDENTITY: &str = "node.json";
const JOIN_TOKEN: &str = "join-token";
const PEERS: &str = "peers.json";
const ENDPOINTS: &str = "endpoints.json";
/// The Raft vote, log and registry ([`crate::consensus`]).
const RAFT: &str = "raft.json";
/// The Docker networks the plugin serves ([`crate::docker`]).
const DOCKER: &str = "docker.json";

/// Refuses a state dir that already belongs to a node: a second `init` or `join` must not
/// silently make a new identity over an old one.
pub fn ensure_unused(dir: &Path) -> Result<(), Failure> {
    match load_identity(dir) {
        Err(_) if !dir.join(IDENTITY).exists() => Ok(()),
        found => {
            let owner = found.map(|i| i.node_id).unwrap_or_else(|_| "?".into());
            Err(Failure::usage(format!(
                "state dir {} already belongs to node {owner}: restart that node with `overlayd run --state-dir {}`, use another --state-dir, or remove {} to start a new node",
                dir.display(),
                dir.display(),
                dir.join(IDENTITY).display()
            )))
        }
    }
}

pub fn load_identity(dir: &Path) -> Result<Identity, Failure> {
    read(&dir.join(IDENTITY)).map_err(|err| {
        Failure::usage(format!(
            "no node to restart in state dir {}: {err:#} (start a node with `overlayd init` or `overlayd join`)",
            dir.display()
        ))
    })
}

/// Writes the identity of a new node, and the join token beside it for scripts.
pub fn create(dir: &Path, identity: &Identity, join_token: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating state dir {}", dir.display()))?;
    write(&dir.join(IDENTITY), identity)?;
    save_join_token(dir, join_token)
}

/// Writes the current join token for scripts (`join-token` in the state dir), replaced when
/// it is rotated.
pub fn save_join_token(dir: &Path, token: &str) -> anyhow::Result<()> {
    replace(&dir.join(JOIN_TOKEN), format!("{token}\n").as_bytes())
}

/// Removes what [`create`] and the node wrote into `dir`, and `dir` itself if that leaves it
/// empty: a new node whose start failed leaves nothing behind, and nothing of the user's is
/// touched.
pub fn remove_new_node(dir: &Path) {
    for file in [IDENTITY, JOIN_TOKEN, PEERS, ENDPOINTS, RAFT, DOCKER] {
        let path = dir.join(file);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("tmp"));
    }
    let _ = std::fs::remove_dir(dir);
}

/// Members' gossip addresses; missing or unreadable means none are known.
pub fn load_peers(dir: &Path) -> Vec<SocketAddr> {
    read(&dir.join(PEERS)).unwrap_or_default()
}

pub fn save_peers(dir: &Path, peers: &[SocketAddr]) -> anyhow::Result<()> {
    write(&dir.join(PEERS), &peers)
}

/// The endpoints this node hosted; missing means none.
pub fn load_endpoints(dir: &Path) -> anyhow::Result<Vec<Endpoint>> {
    let path = dir.join(ENDPOINTS);
    if !path.exists() {
        return Ok(Vec::new());
    }
    read(&path)
}

pub fn save_endpoints(dir: &Path, endpoints: &[Endpoint]) -> anyhow::Result<()> {
    write(&dir.join(ENDPOINTS), &endpoints)
}

/// The Docker plugin's networks; missing means none.
pub fn load_docker<T: DeserializeOwned + Default>(dir: &Path) -> anyhow::Result<T> {
    let path = dir.join(DOCKER);
    if !path.exists() {
        return Ok(T::default());
    }
    read(&path)
}

pub fn save_docker<T: Serialize>(dir: &Path, networks: &T) -> anyhow::Result<()> {
    write(&dir.join(DOCKER), networks)
}

/// The node's Raft state, or `None` for a node that has none yet.
pub fn load_raft<T: DeserializeOwned>(dir: &Path) -> anyhow::Result<Option<T>> {
    let path = dir.join(RAFT);
    if !path.exists() {
        return Ok(None);
    }
    read(&path).map(Some)
}

/// Compact, unlike the other files: it is rewritten on every Raft change and read by no one.
pub fn save_raft<T: Serialize>(dir: &Path, raft: &T) -> anyhow::Result<()> {
    replace(&dir.join(RAFT), &serde_json::to_vec(raft)?)
}

fn read<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn write<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    replace(path, serde_json::to_string_pretty(value)?.as_bytes())
}

/// Replaces `path` with `bytes` atomically and durably. Readable only by root: the identity
/// holds the cluster secret.
fn replace(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp: PathBuf = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::io::Write::write_all(&mut file, bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    // The rename is durable only once the directory is: Raft's vote must survive a power loss.
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_used_state_dir_is_refused_and_an_empty_one_has_nothing_to_restart() {
        let dir = std::env::temp_dir().join(format!("ovstate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(ensure_unused(&dir).is_ok());
        assert!(
            load_identity(&dir)
                .unwrap_err()
                .message
                .contains("overlayd init")
        );
        let identity = Identity {
            node_id: "n1".into(),
            token: "OVL1-x".into(),
            advertise: Ipv4Addr::new(198, 18, 0, 1),
            gossip_port: 7946,
            vxlan_port: 4789,
        };
        create(&dir, &identity, "OVL2-x").unwrap();
        let refusal = ensure_unused(&dir).unwrap_err();
        assert!(
            refusal.usage && refusal.message.contains("node n1"),
            "{refusal}"
        );
        assert_eq!(load_identity(&dir).unwrap().node_id, "n1");
        assert!(load_peers(&dir).is_empty());
        let peers: Vec<SocketAddr> = vec!["198.18.0.2:7946".parse().unwrap()];
        save_peers(&dir, &peers).unwrap();
        assert_eq!(load_peers(&dir), peers);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
