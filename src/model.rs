//! What the cluster agrees on, as plain values, and how each value is keyed in the gossip state.
//!
//! Every node writes only its own keys (chitchat's rule): its VTEP, the networks it has made and
//! the endpoints it hosts. Networks and address holders are not gossiped; they live in the
//! Raft-replicated [`crate::registry`].

use std::net::{Ipv4Addr, SocketAddrV4};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::ipam::{self, Refusal};

/// An overlay network, identical on every node.
///
/// Only valid networks exist: deserialising one checks the rules `network create` checks
/// ([`Network::check`]), so a record read from a peer or from disk that breaks them is refused
/// where it is read, before anything derives a gateway, a bridge or a table from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "NetworkRecord")]
pub struct Network {
    /// Unique per creation, so a network re-created under an old name is a new network.
    pub id: String,
    pub name: String,
    pub subnet: Ipv4Network,
    pub vni: u32,
    pub mtu: u32,
    /// External VTEPs (not cluster members, e.g. a kernel vxlan device) that carry this network.
    #[serde(default)]
    pub vteps: Vec<Ipv4Addr>,
    /// No egress: its containers reach nothing outside the network but their own node
    /// (`network create --internal`, see [`crate::egress`]).
    #[serde(default)]
    pub internal: bool,
    /// Every frame between nodes is sealed (`network create --encrypted`, see
    /// `overlay::seal`).
    #[serde(default)]
    pub encrypted: bool,
    /// The key epoch of an encrypted network: `network rotate-key` advances it, and every
    /// node derives the keys of the new epoch from the cluster secret.
    #[serde(default)]
    pub key_epoch: u32,
}

/// A network as it arrives, before [`Network::check`].
#[derive(Deserialize)]
struct NetworkRecord {
    id: String,
    name: String,
    subnet: Ipv4Network,
    vni: u32,
    mtu: u32,
    #[serde(default)]
    vteps: Vec<Ipv4Addr>,
    #[serde(default)]
    internal: bool,
    #[serde(default)]
    encrypted: bool,
    #[serde(default)]
    key_epoch: u32,
}

impl TryFrom<NetworkRecord> for Network {
    type Error = Refusal;

    fn try_from(r: NetworkRecord) -> Result<Network, Refusal> {
        let net = Network {
            id: r.id,
            name: r.name,
            subnet: r.subnet,
            vni: r.vni,
            mtu: r.mtu,
            vteps: r.vteps,
            internal: r.internal,
            encrypted: r.encrypted,
            key_epoch: r.key_epoch,
        };
        net.check()?;
        Ok(net)
    }
}

/// How the name of every network's bridge starts ([`Network::bridge_name`]).
pub const BRIDGE_PREFIX: &str = "ovbr-";

/// The source ports containers' connections to the outside are masqueraded to. No service may
/// publish one: the routing mesh takes every packet to a published port before the node's
/// stack sees it, so it would take the replies of those connections too. Above the kernel's
/// ephemeral range (32768-60999), so the node's own connections do not use them either.
pub const EGRESS_PORTS: std::ops::RangeInclusive<u16> = 61_000..=65_535;

/// IPv4's minimum MTU (RFC 791), and the largest a Linux bridge takes.
const MTU_RANGE: std::ops::RangeInclusive<u32> = 576..=65_535;

impl Network {
    /// The rules every network obeys on its own, wherever it comes from (the API, a peer, the
    /// state dir). Rules against other networks (names, subnets, VNIs in use) are
    /// [`crate::ipam::admit_network`]'s.
    pub fn check(&self) -> Result<(), Refusal> {
        check_name(&self.name)?;
        ipam::check_subnet(self.subnet)?;
        ipam::check_vni(self.vni)?;
        if !MTU_RANGE.contains(&self.mtu) {
            return Err(Refusal::Mtu(self.mtu));
        }
        if self.encrypted && !self.vteps.is_empty() {
            return Err(Refusal::EncryptedVteps);
        }
        Ok(())
    }

    /// The anycast gateway: the first host address, held by the bridge on every node. A
    /// checked subnet (/29 or larger) always has one.
    pub fn gateway(&self) -> Ipv4Addr {
        gateway_of(self.subnet)
    }

    pub fn bridge_name(&self) -> String {
        format!("{BRIDGE_PREFIX}{}", self.vni)
    }

    pub fn tap_name(&self) -> String {
        format!("ovtap-{}", self.vni)
    }

    /// The bridge MAC: the same on every node so the gateway is truly anycast.
    pub fn gateway_mac(&self) -> [u8; 6] {
        let v = self.vni.to_be_bytes();
        [0x02, 0x4f, 0x56, v[1], v[2], v[3]]
    }
}

/// The anycast gateway of a network on `subnet`: its first address, on every node.
pub fn gateway_of(subnet: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1))
}

/// Names of networks (and of anything else users name): what Docker allows, short enough for
/// logs and tables.
pub fn check_name(name: &str) -> Result<(), Refusal> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(Refusal::Name(name.to_string()))
    }
}

/// Whether `name` can name a network interface: 1 to 15 bytes (IFNAMSIZ less the NUL), none
/// of them `/`, `:` or whitespace, and not `.` or `..`.
pub fn check_ifname(name: &str) -> Result<(), String> {
    let ok = (1..=15).contains(&name.len())
        && !matches!(name, "." | "..")
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} cannot name an interface: 1 to 15 characters, no '/', ':' or whitespace"
        ))
    }
}

/// A service: a name on one network, balanced over its tasks (the containers attached with
/// `--service`), Swarm's `docker service` with the tasks started by someone else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub network_id: String,
    pub mode: Mode,
    /// The virtual IP in vip mode, taken from the network's subnet; none in dnsrr mode.
    pub vip: Option<Ipv4Addr>,
    pub health: Option<Health>,
    /// Ports published on the nodes' addresses (Swarm's `--publish`), the routing mesh.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<Publish>,
}

/// A port a service publishes (`--publish`): connections to a node's address on `published`
/// reach `target` on a task.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    pub published: u16,
    pub target: u16,
    pub protocol: PublishProtocol,
    /// `ingress`: every node answers, for tasks on any node; `host`: only nodes running a
    /// task answer, and only for their own tasks.
    #[serde(default)]
    pub mode: PublishMode,
    /// Only this address answers (`--publish ADDR:PUB:TARGET`); every address of the node
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<Ipv4Addr>,
    /// `client-ip`: one client address always lands on the same task; per flow otherwise.
    #[serde(default)]
    pub affinity: Affinity,
    /// `v2`: tasks get a PROXY protocol v2 header (TCP) instead of the client's address as
    /// the connection's source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyProtocol>,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PublishProtocol {
    #[default]
    Tcp,
    Udp,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    #[default]
    Ingress,
    Host,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Affinity {
    #[default]
    None,
    ClientIp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    V2,
}

/// How clients reach a service's tasks (Swarm's `--endpoint-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One virtual IP, balanced by overlayd over the healthy tasks.
    Vip,
    /// No VIP: the name resolves to the healthy tasks' addresses.
    Dnsrr,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Vip => "vip",
            Mode::Dnsrr => "dnsrr",
        })
    }
}

/// A task's health check, run by the daemon on the task's node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub check: Check,
    pub interval_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Check {
    /// A TCP connection to the task's port is accepted.
    Tcp { port: u16 },
    /// `GET path` on the task's port answers 2xx or 3xx.
    Http { port: u16, path: String },
}

/// A container plugged into a network on some node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub network_id: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub netns: String,
    /// Host-side veth name, so `detach` finds what `attach` made.
    pub host_if: String,
    /// Further names the container answers to in the network's DNS (`attach --alias`).
    #[serde(default)]
    pub aliases: Vec<String>,
}

impl Endpoint {
    /// Docker's convention: a locally administered MAC derived from the (cluster-unique) address.
    /// A service's VIP has the MAC of its address too.
    pub fn mac_bytes(ip: Ipv4Addr) -> [u8; 6] {
        let o = ip.octets();
        [0x02, 0x42, o[0], o[1], o[2], o[3]]
    }

    /// [`Endpoint::mac_bytes`] as the `aa:bb:..` text gossip and `ip link` use.
    pub fn mac_for(ip: Ipv4Addr) -> String {
        let m = Self::mac_bytes(ip);
        format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }

    /// The value of its gossip key ([`key::endpoint`]).
    pub fn to_gossip(&self) -> String {
        serde_json::to_string(self).expect("endpoints serialise")
    }
}

/// Gossip keys. One place, so the schema is readable at a glance.
pub mod key {
    use std::net::Ipv4Addr;

    /// `vtep` -> "198.18.0.1:4789": where this node receives VXLAN.
    pub const VTEP: &str = "vtep";
    /// `ep/<network id>/<ip>` -> JSON [`super::Endpoint`], written by the node that hosts it.
    pub const ENDPOINT_PREFIX: &str = "ep/";

    /// `up/<network id>` -> "": this node has made the network's bridge and TAP.
    pub const REALISED_PREFIX: &str = "up/";
    /// `hc/<network id>/<ip>` -> [`HEALTHY`] | [`UNHEALTHY`]: the last health check of a task on
    /// this node.
    pub const HEALTH_PREFIX: &str = "hc/";
    pub const HEALTHY: &str = "healthy";
    pub const UNHEALTHY: &str = "unhealthy";
    /// `leaving` -> "": this node is about to go; its tasks get no new flows.
    pub const LEAVING: &str = "leaving";
    /// `drained/<node id>` -> "": this node's balancer gives the leaving node's tasks no new
    /// flows any more (what the leaving node waits for).
    pub const DRAINED_PREFIX: &str = "drained/";
    /// `raft` -> [`super::RaftStatus`] ("leader 3 120"): written by the Raft voters only, so
    /// every other member knows whom to propose to and whose registry is ahead of its own.
    pub const RAFT: &str = "raft";

    pub fn realised(network_id: &str) -> String {
        format!("{REALISED_PREFIX}{network_id}")
    }
    pub fn endpoint(network_id: &str, ip: Ipv4Addr) -> String {
        format!("{ENDPOINT_PREFIX}{network_id}/{ip}")
    }
    pub fn health(network_id: &str, ip: Ipv4Addr) -> String {
        format!("{HEALTH_PREFIX}{network_id}/{ip}")
    }
    pub fn drained(node: &str) -> String {
        format!("{DRAINED_PREFIX}{node}")
    }
}

/// A member as `node ls` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub address: Ipv4Addr,
    pub vtep: Option<SocketAddrV4>,
    pub state: NodeState,
    #[serde(rename = "self")]
    pub is_self: bool,
    /// Its part in keeping the registry: a voter (or the leader) says so in gossip; any other
    /// member copies the registry and is listed as a learner.
    #[serde(default)]
    pub raft: Option<RaftRole>,
}

/// What a Raft voter gossips about itself ([`key::RAFT`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RaftStatus {
    /// [`RaftRole::Leader`] or [`RaftRole::Voter`].
    pub role: RaftRole,
    pub term: u64,
    /// The index of the last log entry its registry applied.
    pub applied: u64,
}

impl std::fmt::Display for RaftStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.role, self.term, self.applied)
    }
}

impl std::str::FromStr for RaftStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<RaftStatus, String> {
        let mut parts = s.split(' ');
        let role = match parts.next() {
            Some("leader") => RaftRole::Leader,
            Some("voter") => RaftRole::Voter,
            _ => return Err("not `leader|voter TERM APPLIED`".to_string()),
        };
        let mut number = || -> Result<u64, String> {
            parts
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| "not `leader|voter TERM APPLIED`".to_string())
        };
        let (term, applied) = (number()?, number()?);
        match parts.next() {
            None => Ok(RaftStatus {
                role,
                term,
                applied,
            }),
            Some(_) => Err("not `leader|voter TERM APPLIED`".to_string()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RaftRole {
    Leader,
    Voter,
    Learner,
}

impl std::fmt::Display for RaftRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RaftRole::Leader => "leader",
            RaftRole::Voter => "voter",
            RaftRole::Learner => "learner",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Ready,
    Down,
    /// Going (`node leave`, or SIGTERM): its tasks get no new flows.
    Leaving,
    /// Out for good: another member removed it (`node rm`).
    Removed,
    /// Out for good: it left (`node leave`).
    Left,
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeState::Ready => "ready",
            NodeState::Down => "down",
            NodeState::Leaving => "leaving",
            NodeState::Removed => "removed",
            NodeState::Left => "left",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_voters_status_reads_back_as_written_and_nothing_else_reads() {
        let status = RaftStatus {
            role: RaftRole::Leader,
            term: 3,
            applied: 120,
        };
        assert_eq!(status.to_string(), "leader 3 120");
        assert_eq!("leader 3 120".parse(), Ok(status));
        for bad in [
            "",
            "learner 3 120",
            "voter 3",
            "voter 3 x",
            "voter 3 120 7",
            "voter  3 120",
        ] {
            assert!(bad.parse::<RaftStatus>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn interface_names_fit_the_kernel() {
        for good in ["eth0", "net1", "a", "veth-0123456789"] {
            assert_eq!(check_ifname(good), Ok(()), "{good:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "eth/0",
            "eth:0",
            "eth 0",
            "a\n",
            "sixteen-chars-xx",
        ] {
            assert!(check_ifname(bad).is_err(), "{bad:?} taken");
        }
    }
}
