//! Consensus on the [`Registry`]: Raft ([openraft](https://crates.io/crates/openraft)) among at
//! most [`MAX_VOTERS`] members. Every other member copies the registry from a voter
//! ([`Store::catchup`], [`Store::follow`]) when gossip shows one ahead of its own: a leader
//! that replicated to every member as a Raft learner did work that grew with the cluster, and
//! at 150 nodes on two cores its heartbeats came too late to keep its term.
//!
//! Gossip converges but does not decide: "the lowest live id decides" elects two deciders when
//! the cluster splits. Here a change counts only once a majority of the voters has it in its
//! log, so the minority side of a partition refuses changes up front (after [`COMMIT_WITHIN`])
//! instead of handing out an address, a VNI or a subnet that the majority hands out too.
//!
//! # Layout
//! - this file: the Raft node, proposing changes, and serving Raft RPCs for [`crate::peer`].
//! - [`store`]: the vote, log and registry on disk, and the copies for the other members.
//! - RPCs travel as authenticated peer requests ([`crate::peer::Request::Raft`]), so Raft
//!   traffic is held to the same rules as every other peer request; each target's on one kept
//!   connection ([`crate::peer::Session`]), as a leader sends every voter several a second.

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
use tracing::{info, warn};

use crate::api::{Failure, Reply};
use crate::metrics::Propagation;
use crate::model::{RaftRole, RaftStatus};
use crate::peer;
use crate::registry::{Command, Proposal, Registry};
use crate::token::Secret;

pub use store::{Catchup, Store};

pub type NodeId = u64;

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Proposal,
        R = Reply,
);

/// Voters beyond five add latency and no safety a container cluster needs (Swarm's advice for
/// managers is the same); later members copy the registry from them.
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
    /// A new member ([`Command::AddNode`]): also a voter while there are fewer than
    /// [`MAX_VOTERS`].
    Join {
        node: String,
        addr: SocketAddr,
    },
    /// A member out for good: [`Command::RemoveNode`], then out of the Raft group (the leader
    /// gives a removed voter's place to another live member: [`Consensus::keep_voters`]).
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

/// Why a change was not committed here (yet).
#[derive(Debug)]
pub enum Uncommitted {
    /// Another member leads: propose it there.
    Leader(SocketAddr),
    /// No leader is known (an election is under way, or this node is cut off from a majority).
    NoLeader,
    /// This node leads, but no majority of the voters confirmed the change within
    /// [`COMMIT_WITHIN`] (they are cut off, or slow). It stays in the log and may still commit,
    /// so it is not refused for good: proposed again, the same change is answered once (the
    /// registry remembers proposal ids; joins and removals change nothing the second time).
    Unconfirmed,
}

/// The Raft id of an overlayd node id (12 hex digits, so it fits).
pub fn raft_id(node: &str) -> anyhow::Result<NodeId> {
    u64::from_str_radix(node, 16).with_context(|| format!("node id {node:?} is not hex"))
}

pub struct Consensus {
    raft: Raft<TypeConfig>,
    id: NodeId,
    /// Raft takes one membership change at a time; voters added or removed together wait
    /// their turn.
    voting: tokio::sync::Mutex<()>,
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
            // openraft also gives each AppendEntries the heartbeat interval to answer in. At
            // 250 ms (and elections after 1-2 s) a loaded host missed it: 150 nodes on two
            // cores went through 13 terms in two minutes and committed nothing for 75 s.
            heartbeat_interval: 500,
            election_timeout_min: 1500,
            election_timeout_max: 3000,
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
            id: raft_id(node)?,
            voting: tokio::sync::Mutex::new(()),
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

    /// The registry as this node last applied it. A voter's follows the leader's within a
    /// heartbeat; another member's within the gossip rounds that tell it a voter is ahead.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.borrow().clone()
    }

    /// Wakes whenever this node's registry changes.
    pub fn registry_changes(&self) -> watch::Receiver<Arc<Registry>> {
        self.registry.clone()
    }

    /// The Raft voters.
    fn voters(&self) -> BTreeSet<NodeId> {
        let metrics = self.raft.metrics().borrow().clone();
        metrics.membership_config.membership().voter_ids().collect()
    }

    /// Whether `node` is in this node's Raft group (a voter, or a learner about to be one).
    pub fn in_group(&self, node: &str) -> bool {
        raft_id(node).is_ok_and(|id| self.in_group_id(id))
    }

    fn in_group_id(&self, id: NodeId) -> bool {
        let metrics = self.raft.metrics().borrow().clone();
        metrics
            .membership_config
            .membership()
            .nodes()
            .any(|(n, _)| *n == id)
    }

    /// What this node gossips as a voter ([`crate::model::key::RAFT`]); none when it is no
    /// voter (it copies the registry then).
    pub fn status(&self) -> Option<RaftStatus> {
        let metrics = self.raft.metrics().borrow().clone();
        let role = if metrics.current_leader == Some(self.id) {
            RaftRole::Leader
        } else if metrics
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == self.id)
        {
            RaftRole::Voter
        } else {
            return None;
        };
        Some(RaftStatus {
            role,
            term: metrics.current_term,
            applied: metrics.last_applied?.index,
        })
    }

    /// The node id of the leader, if this node's Raft knows one (a voter's does).
    pub fn leader(&self) -> Option<String> {
        let leader = self.raft.metrics().borrow().current_leader?;
        Some(format!("{leader:012x}"))
    }

    /// The index of the last entry this node's registry applied.
    pub fn applied_index(&self) -> Option<u64> {
        self.store.applied_index()
    }

    /// What a member whose registry applied up to `after` lacks (see [`Store::catchup`]).
    pub fn catchup(&self, after: Option<u64>) -> Catchup {
        self.store.catchup(after)
    }

    /// Applies a voter's [`Catchup`] here; refused while this node is in the Raft group, which
    /// replicates to it.
    pub fn follow(&self, catchup: Catchup) -> anyhow::Result<bool> {
        anyhow::ensure!(
            !self.in_group_id(self.id),
            "a member of the Raft group takes its registry from Raft"
        );
        self.store
            .follow(catchup)
            .map_err(|e| anyhow::anyhow!("saving the registry copied from a voter: {e}"))
    }

    /// On the leader, while there are fewer than [`MAX_VOTERS`] voters: makes the first of
    /// `live` (members that are up, in the order given) that does not vote yet a voter. A
    /// removed voter's place is taken so; joins fill the first places themselves.
    pub async fn keep_voters(&self, live: &[(String, SocketAddr)]) {
        if self.status().map(|s| s.role) != Some(RaftRole::Leader) {
            return;
        }
        let _turn = self.voting.lock().await;
        let voters = self.voters();
        if voters.len() >= MAX_VOTERS {
            return;
        }
        let Some((node, id, addr)) = live.iter().find_map(|(node, addr)| {
            let id = raft_id(node).ok()?;
            (!voters.contains(&id)).then_some((node, id, addr))
        }) else {
            return;
        };
        match self
            .add_voter(node, id, BasicNode::new(addr.to_string()))
            .await
        {
            Ok(Ok(_)) => {
                info!(%node, voters = voters.len() + 1, "member made a voter in a departed voter's place")
            }
            Ok(Err(failure)) => {
                warn!(%node, why = %failure.message, "could not make a member a voter; trying again")
            }
            Err(err) => warn!(%node, %err, "could not make a member a voter; trying again"),
        }
    }

    /// Commits `change` if this node leads, waiting at most [`COMMIT_WITHIN`].
    pub async fn propose(&self, change: Change) -> Result<Reply, Uncommitted> {
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
                    Some(addr) => Err(Uncommitted::Leader(addr)),
                    None => Err(Uncommitted::NoLeader),
                }
            }
            Ok(Err(err)) => Ok(Err(Failure::runtime(format!("not committed: {err}")))),
            Err(_) => Err(Uncommitted::Unconfirmed),
        }
    }

    /// Makes `node` a member, and a voter while there are fewer than [`MAX_VOTERS`]. Answers
    /// with the registry as applied here ([`Catchup::Whole`]): a member that is no voter trusts
    /// only members' gossip about who leads and whose registry is ahead, so it starts from the
    /// one the leader gave it, through the seed that checked its join token.
    async fn add_member(
        &self,
        node: &str,
        addr: SocketAddr,
    ) -> Result<Reply, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>> {
        let Ok(id) = raft_id(node) else {
            return Ok(Err(Failure::usage(format!("node id {node:?} is not hex"))));
        };
        let command = Command::AddNode {
            node: node.to_string(),
            addr,
        };
        let reply = self.raft.client_write(Proposal::new(command)).await?.data;
        if reply.is_err() {
            return Ok(reply);
        }
        let _turn = self.voting.lock().await;
        let voters = self.voters();
        if voters.len() >= MAX_VOTERS || voters.contains(&id) {
            info!(%node, %addr, "member joined; it copies the registry from the voters");
        } else {
            let added = self
                .add_voter(node, id, BasicNode::new(addr.to_string()))
                .await?;
            if added.is_err() {
                return Ok(added);
            }
        }
        Ok(Ok(to_json(&self.store.whole())))
    }

    /// Adds `id` as a voter: first as a learner brought up to date (a voter that cannot vote
    /// yet would count against the majority), then promoted. The caller holds `voting`.
    async fn add_voter(
        &self,
        node: &str,
        id: NodeId,
        entry: BasicNode,
    ) -> Result<Reply, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>> {
        if let Err(failure) = self.membership_settled().await {
            return Ok(Err(failure));
        }
        let addr = entry.addr.clone();
        let added = self.raft.add_learner(id, entry, true).await?;
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
        self.raft
            .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
            .await?;
        info!(%node, %addr, "member joined Raft as a voter");
        Ok(Ok(serde_json::Value::Null))
    }

    /// Waits until the last membership change is applied here. One whose proposer gave up
    /// ([`COMMIT_WITHIN`]) stays in the log until a majority has it, and Raft refuses any
    /// other change until then; waiting here lets the next one go on instead of failing.
    async fn membership_settled(&self) -> Result<(), Failure> {
        self.raft
            .wait(Some(COMMIT_WITHIN))
            .metrics(
                |m| m.membership_config.log_id() <= &m.last_applied,
                "the last membership change applied",
            )
            .await
            .map(drop)
            .map_err(|err| {
                Failure::runtime(format!(
                    "the cluster's last membership change is not committed yet: {err}"
                ))
            })
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
        if reply.is_err() || !self.in_group_id(id) {
            return Ok(reply);
        }
        let _turn = self.voting.lock().await;
        let out = if self.voters().contains(&id) {
            ChangeMembers::RemoveVoters([id].into())
        } else {
            ChangeMembers::RemoveNodes([id].into())
        };
        self.raft.change_membership(out, false).await?;
        info!(%node, left, "member removed from Raft");
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
        let session = node
            .addr
            .parse()
            .ok()
            .map(|addr| peer::Session::new(addr, self.credential.clone()));
        PeerClient { target, session }
    }
}

/// Raft's client for one target: its RPCs on one kept connection (they are safe to repeat).
struct PeerClient {
    target: NodeId,
    session: Option<peer::Session>,
}

type RpcError<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl PeerClient {
    async fn send<T, E>(&mut self, rpc: Rpc) -> Result<T, RpcError<E>>
    where
        T: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let unreachable =
            |what: String| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(what)));
        let target = self.target;
        let session = self
            .session
            .as_mut()
            .ok_or_else(|| unreachable(format!("node {target} has no usable address")))?;
        let reply = session
            .call(&peer::Request::Raft(rpc))
            .await
            .map_err(|e| unreachable(format!("{e:#}")))?
            .map_err(|failure| RPCError::Network(NetworkError::new(&failure)))?;
        let answer: Result<T, RaftError<NodeId, E>> =
            serde_json::from_value(reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
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
