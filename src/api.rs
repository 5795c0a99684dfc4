//! The local API: what the CLI asks the daemon on its unix socket, and what comes back.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

use anyhow::Context;
use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use tokio::io::BufReader;
use tokio::net::UnixStream;

use crate::model::{Health, Mode, Publish};
use crate::publish::Unpublish;
use crate::wire;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    NodeLs,
    /// Takes node `id` out of the cluster for good; refused while it is ready unless `force`.
    NodeRm {
        id: String,
        force: bool,
    },
    /// This node leaves the cluster: its tasks leave the balancers first, then it goes.
    NodeLeave,
    /// The join token; a new one first if `rotate`.
    JoinToken {
        rotate: bool,
    },
    NetworkCreate {
        name: String,
        subnet: Ipv4Network,
        vni: Option<u32>,
        mtu: Option<u32>,
        vteps: Vec<Ipv4Addr>,
        /// No egress (`--internal`).
        #[serde(default)]
        internal: bool,
        /// Sealed between nodes (`--encrypted`).
        #[serde(default)]
        encrypted: bool,
    },
    NetworkRotateKey {
        name: String,
    },
    NetworkLs,
    NetworkRm {
        name: String,
    },
    Attach {
        netns: String,
        network: String,
        ip: Option<Ipv4Addr>,
        /// Attach as a task of this service.
        service: Option<String>,
        /// Further DNS names of the container on this network.
        #[serde(default)]
        aliases: Vec<String>,
        /// The container's interface name; by default its first free `ethN`. A runtime that
        /// names it (CNI's `CNI_IFNAME`) passes it here.
        #[serde(default)]
        ifname: Option<String>,
    },
    Detach {
        netns: String,
        network: String,
        /// Succeed (with `null`) when `netns` is not attached there, or the network is gone: a
        /// runtime's teardown may come twice, or after `network rm` (CNI's `DEL`).
        #[serde(default)]
        missing_ok: bool,
    },
    Status,
    ServiceCreate {
        name: String,
        network: String,
        mode: Mode,
        health: Option<Health>,
        /// Ports to publish (`--publish`).
        #[serde(default)]
        publish: Vec<Publish>,
    },
    /// Changes the ports a service publishes: `remove` first, then `add`.
    ServiceUpdate {
        name: String,
        add: Vec<Publish>,
        remove: Vec<Unpublish>,
    },
    ServiceLs,
    ServicePs {
        name: String,
    },
    ServiceRm {
        name: String,
        force: bool,
    },
    /// What this node's data plane would do with a packet on `network` (nothing is sent).
    Trace {
        network: String,
        proto: crate::trace::Proto,
        src: (Ipv4Addr, Option<u16>),
        dst: (Ipv4Addr, Option<u16>),
    },
    /// The whole state of one network, service or node, as this node sees it.
    Inspect {
        kind: Inspect,
        name: String,
    },
}

/// What `inspect` looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Inspect {
    Network,
    Service,
    /// A node by id or address.
    Node,
}

/// Why a request did not happen. Nothing was changed when a `Failure` comes back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub message: String,
    /// The request itself was wrong (exit 64, EX_USAGE), rather than the system failing (exit 1).
    pub usage: bool,
}

impl Failure {
    pub fn usage(message: impl std::fmt::Display) -> Failure {
        Failure {
            message: message.to_string(),
            usage: true,
        }
    }
    pub fn runtime(message: impl std::fmt::Display) -> Failure {
        Failure {
            message: message.to_string(),
            usage: false,
        }
    }
}

impl From<crate::ipam::Refusal> for Failure {
    fn from(refusal: crate::ipam::Refusal) -> Failure {
        Failure::usage(refusal)
    }
}

impl From<crate::publish::Refusal> for Failure {
    fn from(refusal: crate::publish::Refusal) -> Failure {
        Failure::usage(refusal)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Failure {
        Failure::runtime(format!("{err:#}"))
    }
}

pub type Reply = Result<serde_json::Value, Failure>;

/// Where the daemon listens and its clients (the CLI, `overlayd-cni`) call, unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/overlayd.sock";

/// Longest request the daemon reads from an API client: the largest, `network create` with its
/// `--vtep` list, is well under this.
pub const REQUEST_LIMIT: usize = 64 << 10;
/// Longest reply the CLI reads: lists grow with the cluster.
const REPLY_LIMIT: usize = 1 << 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub name: String,
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    pub mtu: u32,
    pub vteps: Vec<Ipv4Addr>,
    /// No egress: containers reach nothing outside the network but their node.
    #[serde(default)]
    pub internal: bool,
    /// Sealed between nodes.
    #[serde(default)]
    pub encrypted: bool,
    /// The key epoch of an encrypted network (0 until the first `network rotate-key`).
    #[serde(default)]
    pub key_epoch: u32,
    /// Endpoints on this network, cluster-wide.
    pub endpoints: usize,
}

/// A service as `service ls` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    pub mode: Mode,
    pub network: String,
    pub vip: Option<Ipv4Addr>,
    pub health: Option<Health>,
    pub tasks_healthy: usize,
    pub tasks_total: usize,
    /// The ports it publishes (the routing mesh).
    #[serde(default)]
    pub publish: Vec<Publish>,
}

/// A task as `service ps` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Task {
    pub netns: String,
    pub ip: Ipv4Addr,
    pub node: String,
    pub node_address: Option<Ipv4Addr>,
    pub state: TaskState,
    /// The ports its service publishes: each reaches this task (from any node, or from its own
    /// node in host mode).
    #[serde(default)]
    pub publish: Vec<Publish>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Attached; its health check has not passed yet.
    Starting,
    /// Gets new flows: its check passes, or it has none.
    Healthy,
    /// Its check fails: no new flows.
    Unhealthy,
    /// Its node is leaving: no new flows, flows on it finish.
    Draining,
    /// Its node is down, or its container is not seen in gossip.
    Down,
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TaskState::Starting => "starting",
            TaskState::Healthy => "healthy",
            TaskState::Unhealthy => "unhealthy",
            TaskState::Draining => "draining",
            TaskState::Down => "down",
        })
    }
}

/// What `join-token` answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinToken {
    pub token: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attachment {
    pub netns: String,
    pub network: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub node: String,
    /// The container's interface on the network.
    pub ifname: String,
    pub subnet: Ipv4Network,
    /// The network's gateway: this node's bridge, which also answers DNS.
    pub gateway: Ipv4Addr,
    /// Whether the attach gave the container its default route, via the gateway (only when it
    /// had none yet).
    pub default_route: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub node: crate::model::Node,
    pub vtep: SocketAddrV4,
    pub networks: usize,
    /// Gossip datagrams dropped, by reason (`bad_tag`, `stale`, `malformed`, `not_member`).
    pub gossip_dropped: BTreeMap<String, u64>,
    /// Gossip entries of members refused (and logged) because they break the registry's rules:
    /// an endpoint whose address the member does not hold, a malformed value.
    pub gossip_refused: u64,
    /// Connections to the peer port closed before the client proved the token, by reason
    /// (`busy`, `slow`, `malformed`, `wrong_token`).
    pub peer_refused: BTreeMap<String, u64>,
    pub dataplane: Dataplane,
    pub dns: Dns,
    /// The routing mesh's kernel hooks and published ports on this node.
    pub mesh: Mesh,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Mesh {
    /// tc filters installed that steer mesh packets into overlayd.
    pub hooks: usize,
    /// Published ports that apply to this node: held (reserved, hooks in) or, with an error,
    /// refused (no hooks).
    pub ports: Vec<PublishedPort>,
    /// The proxy of the `proxy=v2` ports.
    #[serde(default)]
    pub proxy: MeshProxy,
}

/// Counts of the `proxy=v2` proxy since start.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MeshProxy {
    /// Connections taken and relayed (or tried).
    pub connections: u64,
    /// Relayed now.
    pub active: u64,
    /// Reset because the node relays its most connections already.
    pub refused: u64,
    /// Reset because no healthy task could take them.
    pub no_task: u64,
    /// Reset because the task was not reached in time or refused, or failed to accept.
    pub failed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PublishedPort {
    pub port: u16,
    pub protocol: crate::model::PublishProtocol,
    /// The one address it is published on, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<Ipv4Addr>,
    pub service: String,
    /// Why this node does not hold it (and so does not answer on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The DNS servers on this node's gateway addresses, all networks together.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Dns {
    /// Queries answered from the cluster's names (including NXDOMAIN and FORMERR).
    pub answered: u64,
    /// Queries for other names relayed to the node's resolver and answered by it.
    pub forwarded: u64,
    /// Queries for other names answered SERVFAIL: no resolver, or it did not answer in time.
    pub servfail: u64,
    /// Datagrams that got no answer, by reason (`short`, `response`, `unencodable`, `busy`:
    /// too many forwarded queries in flight, `unsent`: the reply could not be sent).
    pub dropped: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Dataplane {
    /// Whether TAP and UDP offloads were asked for (each TAP keeps what its kernel accepts).
    pub offloads: bool,
    /// Where the workers run: "steered" (light load: pinned, each packet handled on the CPU
    /// it arrived on), "spread" (heavy load), or "hashed" (never steered: `--workers` is not
    /// one per CPU, or the kernel refused the steering programs).
    pub layout: String,
    pub rx_frames: u64,
    pub tx_vxlan: u64,
    pub rx_vxlan: u64,
    pub arp_answered: u64,
    pub flooded: u64,
    pub drops: BTreeMap<String, u64>,
    /// Service flows tracked now and since start.
    pub balancer: Balancer,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Balancer {
    /// Flows in the connection table now.
    pub tracked: usize,
    /// Flows evicted to make room since start (unanswered ones first).
    pub evicted: u64,
    /// Flows balanced to a task since start.
    pub flows: u64,
    /// Packets answered with a reset or port unreachable: no healthy task, or their task went.
    pub rejected: u64,
    /// Packets dropped by the balancer.
    pub dropped: u64,
}

/// Sends one request to the daemon behind `socket` and waits for its reply.
pub async fn call(socket: &Path, request: &Request) -> anyhow::Result<Reply> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "connecting to the overlayd API at {} (is the daemon running? start it with `overlayd init` or `overlayd join`, or point --api / OVERLAYD_API at its socket)",
            socket.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    wire::write(&mut write, request).await?;
    wire::read(&mut BufReader::new(read), REPLY_LIMIT)
        .await
        .context("reading the daemon's reply")
}
