//! The node's identity on disk: which cluster it belongs to and under which id.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::api::Failure;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub node_id: String,
    pub token: String,
}

fn identity_path(dir: &Path) -> PathBuf {
    dir.join("node.json")
}

/// Refuses a state dir that already belongs to a node: a second `init` or `join` must not
/// silently make a new identity over an old one.
pub fn ensure_unused(dir: &Path) -> Result<(), Failure> {
    let path = identity_path(dir);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let owner = serde_json::from_str::<Identity>(&text)
            .map(|i| i.node_id)
            .unwrap_or_else(|_| "?".into());
        return Err(Failure::usage(format!(
            "state dir {} already belongs to node {owner}: use another --state-dir, or remove {} to start a new node",
            dir.display(),
            path.display()
        )));
    }
    Ok(())
}

pub fn save(dir: &Path, identity: &Identity) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating state dir {}", dir.display()))?;
    let path = identity_path(dir);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(
        &mut file,
        serde_json::to_string_pretty(identity)?.as_bytes(),
    )?;
    let token_path = dir.join("join-token");
    std::fs::write(&token_path, format!("{}\n", identity.token))
        .with_context(|| format!("writing {}", token_path.display()))
}
