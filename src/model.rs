//! What the cluster agrees on, as plain values, and how each value is keyed in the gossip state.
//!
//! Every node writes only its own keys (chitchat's rule). Networks outlive the node that created
//! them because every node copies every network it sees into its own state (a grow-only set with
//! tombstones, see [`crate::cluster`]).

use std::net::{Ipv4Addr, SocketAddrV4};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

/// An overlay network, identical on every node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
}

impl Network {
    /// The anycast gateway: the first host address, held by the bridge on every node.
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet
            .nth(1)
            .expect("validated subnets have at least 4 addresses")
    }

    /// The value of its gossip key ([`key::network`]).
    pub fn to_gossip(&self) -> String {
        serde_json::to_string(self).expect("networks serialise")
    }

    pub fn bridge_name(&self) -> String {
        format!("ovbr-{}", self.vni)
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

/// A container plugged into a network on some node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub network_id: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub netns: String,
    /// Host-side veth name, so `detach` finds what `attach` made.
    pub host_if: String,
}

impl Endpoint {
    /// Docker's convention: a locally administered MAC derived from the (cluster-unique) address.
    pub fn mac_for(ip: Ipv4Addr) -> String {
        let o = ip.octets();
        format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
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
    /// `net/<name>` -> JSON [`super::Network`].
    pub const NETWORK_PREFIX: &str = "net/";
    /// `netrm/<id>` -> "": the network with that id was removed.
    pub const TOMBSTONE_PREFIX: &str = "netrm/";
    /// `ep/<network id>/<ip>` -> JSON [`super::Endpoint`], written by the node that hosts it.
    pub const ENDPOINT_PREFIX: &str = "ep/";

    /// `up/<network id>` -> "": this node has made the network's bridge and TAP.
    pub const REALISED_PREFIX: &str = "up/";

    pub fn network(name: &str) -> String {
        format!("{NETWORK_PREFIX}{name}")
    }
    pub fn tombstone(id: &str) -> String {
        format!("{TOMBSTONE_PREFIX}{id}")
    }
    pub fn realised(network_id: &str) -> String {
        format!("{REALISED_PREFIX}{network_id}")
    }
    pub fn endpoint(network_id: &str, ip: Ipv4Addr) -> String {
        format!("{ENDPOINT_PREFIX}{network_id}/{ip}")
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Ready,
    Down,
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeState::Ready => "ready",
            NodeState::Down => "down",
        })
    }
}
