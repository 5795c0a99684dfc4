//! Consensus on the [`Registry`]: Raft ([openraft](https://crates.io/crates/openraft)) among the
//! first [`MAX_VOTERS`] members; later members follow as learners, each with a full copy.
//!
//! Gossip converges but does not decide: "the lowest live id decides" elects two deciders when
//! the cluster splits. Here a change counts only once a majority of the voters has it in its
//! log, so the minority side of a partition refuses changes up front (after [`COMMIT_WITHIN`])
//! instead of handing out an address, a VNI or a subnet that the majority hands out too.
//!
//! # Layout
//! - this file: the Raft node, proposing changes, and serving Raft RPCs for [`crate::peer`].
//! - [`store`]: the vote, log and registry on disk.
//! - RPCs travel as authenticated peer requests ([`crate::peer::Request::Raft`]), one
//!   exchange each, so Raft traffic is held to the same rules as every other peer request.

mod store;

use std::collections::BTreeSet;
use std::io::Cursor;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use openraft::error::{
    ClientWriteError, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::Adaptor;
use openraft::{BasicNode, ChangeMembers, Raft};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::info;

use crate::api::{Failure, Reply};
use crate::metrics::Propagation;
use crate::model::RaftRole;
use crate::peer;
use crate::registry::{Command, Proposal, Registry};
use crate::token::Secret;

pub use store::Store;

pub type NodeId = u64;

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Proposal,
        R = Reply,
);

/// Voters beyond five add latency and no safety a container cluster needs (Swarm's advice for
/// managers is the same); later members replicate the registry as learners.
pub const MAX_VOTERS: usize = 5;
/// How long a change may take to reach a majority before it is refused.
pub const COMMIT_WITHIN: Duration = Duration::from_secs(5);

/// A Raft RPC, carried by [`crate::peer`].
#[derive(Debug, Serialize, Deserialize)]
pub enum Rpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
}

/// A change proposed to the cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Change {
    Registry(Proposal),
    /// A new member: a voter while there are fewer than [`MAX_VOTERS`], else a learner.
    Join {
        node: String,
        addr: SocketAddr,
    },
    /// A member out for good: [`Command::RemoveNode`], then out of the Raft group (a learner
    /// takes a removed voter's place).
    Remove {
        node: String,
        address: Option<Ipv4Addr>,
        left: bool,
    },
}

impl Change {
    /// A registry command under a fresh proposal id: retries of this change reuse the id.
    pub fn registry(command: Command) -> Change {
        Change::Registry(Proposal::new(command))
    }
}

/// Where a change could not be made here.
#[derive(Debug)]
pub enum Elsewhere {
    /// Another member leads: propose it there.
    Leader(SocketAddr),
    /// No leader is known (an election is under way, or this node is cut off from a majority).
    NoLeader,
}

/// The Raft id of an overlayd node id (12 hex digits, so it fits).
pub fn raft_id(node: &str) -> anyhow::Result<NodeId> {
    u64::from_str_radix(node, 16).with_context(|| format!("node id {node:?} is not hex"))
}

pub struct Consensus {
    raft: Raft<TypeConfig>,
    /// Raft takes one membership change at a time; nodes joining together wait their turn.
    joining: tokio::sync::Mutex<()>,
    registry: watch::Receiver<Arc<Registry>>,
    store: Store,
}

impl Consensus {
    /// Starts this node's Raft from the state in `dir` (empty for a new node).
    pub async fn start(
        node: &str,
        dir: PathBuf,
        secret: &Secret,
        propagation: Arc<Propagation>,
    ) -> anyhow::Result<Consensus> {
        let credential = peer::Credential::Member {
            secret: secret.clone(),
            node: node.to_string(),
        };
        let config = openraft::Config {
            cluster_name: secret.cluster_id(),
            heartbeat_interval: 250,
            election_timeout_min: 1000,
            election_timeout_max: 2000,
            // Keep messages well under the peer protocol's request limit (JSON inside JSON
            // roughly doubles an entry, and a snapshot chunk's bytes are a JSON array).
            max_payload_entries: 64,
            snapshot_max_chunk_size: 16 * 1024,
            // The whole store is rewritten on each change, so keep the log short.
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(500),
            max_in_snapshot_log_to_keep: 100,
            ..Default::default()
        }
        .validate()
        .context("Raft configuration")?;
        let store = Store::open(dir, propagation)?;
        let registry = store.registry();
        let (log, machine) = Adaptor::new(store.clone());
        let network = Peers { credential };
        let raft = Raft::new(raft_id(node)?, Arc::new(config), network, log, machine)
            .await
            .context("starting Raft")?;
        Ok(Consensus {
            raft,
            joining: tokio::sync::Mutex::new(()),
            registry,
            store,
        })
    }

    /// Makes this node the single voter of a new cluster (`init`).
    pub async fn initialise(&self, node: &str, addr: SocketAddr) -> anyhow::Result<()> {
        if self.store.is_initialised() {
            return Ok(());
        }
        let members = [(raft_id(node)?, BasicNode::new(addr.to_string()))];
        self.raft
            .initialize(
                members
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            )
            .await
            .context("initialising Raft")
    }

    /// The registry as this node last applied it; it follows the leader's within a heartbeat.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.borrow().clone()
    }

    /// The Raft voters.
    fn voters(&self) -> BTreeSet<NodeId> {
        let metrics = self.raft.metrics().borrow().clone();
        metrics.membership_config.membership().voter_ids().collect()
    }

    /// `node`'s part in the Raft group, as this node knows it.
    pub fn role(&self, node: &str) -> Option<RaftRole> {
        let id = raft_id(node).ok()?;
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        if metrics.current_leader == Some(id) {
            Some(RaftRole::Leader)
        } else if membership.voter_ids().any(|v| v == id) {
            Some(RaftRole::Voter)
        } else if membership.nodes().any(|(n, _)| *n == id) {
            Some(RaftRole::Learner)
        } else {
            None
        }
    }

    /// Commits `change` if this node leads, waiting at most [`COMMIT_WITHIN`].
    pub async fn propose(&self, change: Change) -> Result<Reply, Elsewhere> {
        let written = tokio::time::timeout(COMMIT_WITHIN, async {
            match change {
                Change::Registry(proposal) => {
                    self.raft.client_write(proposal).await.map(|r| r.data)
                }
                Change::Join { node, addr } => self.add_member(&node, addr).await,
                Change::Remove {
                    node,
                    address,
                    left,
                } => self.remove_member(node, address, left).await,
            }
        })
        .await;
        match written {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(to)))) => {
                match to.leader_node.and_then(|n| n.addr.parse().ok()) {
                    Some(addr) => Err(Elsewhere::Leader(addr)),
                    None => Err(Elsewhere::NoLeader),
                }
            }
            Ok(Err(err)) => Ok(Err(Failure::runtime(format!("not committed: {err}")))),
            Err(_) => Ok(Err(Failure::runtime(format!(
                "no majority of the cluster's voters confirmed the change within {COMMIT_WITHIN:?} \
                 (this node may be cut off from them): it was not made, and is made only if a \
                 majority takes it later; check before retrying when the network is whole \
                 (`overlayd node ls` shows who is reachable)"
            )))),
        }
    }

    async fn add_member(
        &self,
        node: &str,
        addr: SocketAddr,
    ) -> Result<Reply, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>> {
        let Ok(id) = raft_id(node) else {
            return Ok(Err(Failure::usage(format!("node id {node:?} is not hex"))));
        };
        let _turn = self.joining.lock().await;
        let voters = self.voters();
        let voter = voters.len() < MAX_VOTERS && !voters.contains(&id);
        // A future voter is brought up to date before it votes; a learner catches up on its
        // own, so that a crowd of joiners waits for one commit each, not for each other's
        // replication (joins are taken one at a time).
        let added = self
            .raft
            .add_learner(id, BasicNode::new(addr.to_string()), voter)
            .await?;
        // Not blocking, `add_learner` returns once replication is set up; the next membership
        // change may start only once this one is committed.
        if let Err(err) = self
            .raft
            .wait(Some(COMMIT_WITHIN))
            .applied_index_at_least(Some(added.log_id.index), "the new learner committed")
            .await
        {
            return Ok(Err(Failure::runtime(format!(
                "adding {node} to Raft was not committed: {err}"
            ))));
        }
        if voter {
            self.raft
                .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
                .await?;
            info!(%node, %addr, "member joined Raft as a voter");
        } else {
            info!(%node, %addr, "member joined Raft as a learner");
        }
        Ok(Ok(serde_json::Value::Null))
    }

    async fn remove_member(
        &self,
        node: String,
        address: Option<Ipv4Addr>,
        left: bool,
    ) -> Result<Reply, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>> {
        let Ok(id) = raft_id(&node) else {
            return Ok(Err(Failure::usage(format!("node id {node:?} is not hex"))));
        };
        let command = Command::RemoveNode {
            node: node.clone(),
            address,
            left,
        };
        let reply = self.raft.client_write(Proposal::new(command)).await?.data;
        if reply.is_err() {
            return Ok(reply);
        }
        let _turn = self.joining.lock().await;
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: Vec<NodeId> = membership.learner_ids().collect();
        let out = if voters.contains(&id) {
            ChangeMembers::RemoveVoters([id].into())
        } else if learners.contains(&id) {
            ChangeMembers::RemoveNodes([id].into())
        } else {
            return Ok(reply);
        };
        self.raft.change_membership(out, false).await?;
        info!(%node, left, "member removed from Raft");
        // Keep as many voters as the cluster can have: a learner takes the place.
        if voters.contains(&id)
            && let Some(next) = learners.iter().find(|l| **l != id)
        {
            self.raft
                .change_membership(ChangeMembers::AddVoterIds([*next].into()), false)
                .await?;
            info!(raft_id = next, "learner promoted to voter");
        }
        Ok(reply)
    }

    /// Serves a Raft RPC from a peer; the answer is the serialised result.
    pub async fn serve(&self, rpc: Rpc) -> serde_json::Value {
        match rpc {
            Rpc::Append(rpc) => to_json(&self.raft.append_entries(rpc).await),
            Rpc::Vote(rpc) => to_json(&self.raft.vote(rpc).await),
            Rpc::Snapshot(rpc) => to_json(&self.raft.install_snapshot(rpc).await),
        }
    }

    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

fn to_json<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_default()
}

/// Raft's view of the other members: each RPC is one authenticated peer exchange.
struct Peers {
    credential: peer::Credential,
}

impl RaftNetworkFactory<TypeConfig> for Peers {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.parse().ok(),
            credential: self.credential.clone(),
        }
    }
}

struct PeerClient {
    target: NodeId,
    addr: Option<SocketAddr>,
    credential: peer::Credential,
}

type RpcError<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl PeerClient {
    async fn send<T, E>(&self, rpc: Rpc) -> Result<T, RpcError<E>>
    where
        T: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let unreachable =
            |what: String| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(what)));
        let addr = self
            .addr
            .ok_or_else(|| unreachable(format!("node {} has no usable address", self.target)))?;
        let reply = peer::call(addr, &self.credential, &peer::Request::Raft(rpc))
            .await
            .map_err(|e| unreachable(format!("{e:#}")))?
            .map_err(|failure| RPCError::Network(NetworkError::new(&failure)))?;
        let answer: Result<T, RaftError<NodeId, E>> =
            serde_json::from_value(reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcError> {
        self.send(Rpc::Append(rpc)).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcError<InstallSnapshotError>> {
        self.send(Rpc::Snapshot(rpc)).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcError> {
        self.send(Rpc::Vote(rpc)).await
    }
}
