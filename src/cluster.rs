//! The cluster as one node sees it, derived from the gossip state: members, networks, endpoints.
//!
//! Pure: [`View::build`] takes each member's key-values and liveness, so the merge rules (network
//! union with tombstones, which endpoints count) are tested without sockets.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use crate::model::{Endpoint, Network, Node, NodeState, key};

/// One member's gossip state, as chitchat holds it.
pub struct MemberState<'a> {
    pub id: &'a str,
    /// Grows with every restart of the node; only the newest generation counts.
    pub generation: u64,
    pub gossip: SocketAddr,
    pub live: bool,
    pub is_self: bool,
    pub keys: Vec<(&'a str, &'a str)>,
}

#[derive(Clone, Debug)]
pub struct Member {
    pub node: Node,
    pub gossip: SocketAddr,
    /// Ids of the networks whose bridge and TAP this member has made.
    pub realised: BTreeSet<String>,
}

/// An endpoint and the member that hosts it.
#[derive(Clone, Debug, PartialEq)]
pub struct Placed {
    pub node: String,
    pub endpoint: Endpoint,
}

#[derive(Clone, Debug, Default)]
pub struct View {
    pub members: Vec<Member>,
    /// Live networks by name.
    pub networks: BTreeMap<String, Network>,
    /// Ids of removed networks.
    pub tombstones: BTreeSet<String>,
    pub endpoints: Vec<Placed>,
}

impl View {
    pub fn build<'a>(states: impl IntoIterator<Item = MemberState<'a>>) -> View {
        let mut view = View::default();
        let mut seen_networks: Vec<Network> = Vec::new();
        // A restarted node is a new generation; the old one lingers in gossip as a dead member
        // until it is forgotten, and must count neither as a member nor for its endpoints.
        let states: Vec<MemberState> = states.into_iter().collect();
        let mut newest: BTreeMap<&str, u64> = BTreeMap::new();
        for state in &states {
            let g = newest.entry(state.id).or_default();
            *g = (*g).max(state.generation);
        }
        for state in states.iter().filter(|s| newest[s.id] == s.generation) {
            let mut vtep: Option<SocketAddrV4> = None;
            let mut realised = BTreeSet::new();
            for &(k, v) in &state.keys {
                if k == key::VTEP {
                    vtep = v.parse().ok();
                } else if let Some(id) = k.strip_prefix(key::REALISED_PREFIX) {
                    realised.insert(id.to_string());
                } else if k.starts_with(key::NETWORK_PREFIX) {
                    seen_networks.extend(serde_json::from_str::<Network>(v).ok());
                } else if let Some(id) = k.strip_prefix(key::TOMBSTONE_PREFIX) {
                    view.tombstones.insert(id.to_string());
                } else if k.starts_with(key::ENDPOINT_PREFIX)
                    && let Ok(endpoint) = serde_json::from_str::<Endpoint>(v)
                {
                    view.endpoints.push(Placed {
                        node: state.id.to_string(),
                        endpoint,
                    });
                }
            }
            let address = match (vtep, state.gossip) {
                (Some(v), _) => *v.ip(),
                (None, SocketAddr::V4(g)) => *g.ip(),
                (None, SocketAddr::V6(_)) => Ipv4Addr::UNSPECIFIED,
            };
            view.members.push(Member {
                node: Node {
                    id: state.id.to_string(),
                    address,
                    vtep,
                    state: if state.live {
                        NodeState::Ready
                    } else {
                        NodeState::Down
                    },
                    is_self: state.is_self,
                },
                gossip: state.gossip,
                realised,
            });
        }
        // Every node copies every network, so the same record arrives many times; a name
        // re-used after removal arrives with a new id. The lowest live id wins a (rare) clash
        // that only a leader change in mid-create could cause.
        seen_networks.sort_by(|a, b| a.id.cmp(&b.id));
        for network in seen_networks {
            if !view.tombstones.contains(&network.id) {
                view.networks.entry(network.name.clone()).or_insert(network);
            }
        }
        let live_ids: BTreeSet<&str> = view.networks.values().map(|n| n.id.as_str()).collect();
        view.endpoints
            .retain(|p| live_ids.contains(p.endpoint.network_id.as_str()));
        view.members.sort_by(|a, b| a.node.id.cmp(&b.node.id));
        view
    }

    /// What this node must set and delete among its own keys (`mine`) so that it holds a copy
    /// of every live network and every tombstone, and no copy of a removed network.
    pub fn replication(
        &self,
        mine: &BTreeMap<String, String>,
    ) -> (Vec<(String, String)>, Vec<String>) {
        let mut set: Vec<(String, String)> = self
            .networks
            .values()
            .map(|net| (key::network(&net.name), net.to_gossip()))
            .filter(|(k, v)| mine.get(k) != Some(v))
            .collect();
        set.extend(
            self.tombstones
                .iter()
                .map(|id| key::tombstone(id))
                .filter(|k| !mine.contains_key(k))
                .map(|k| (k, String::new())),
        );
        let delete = mine
            .keys()
            .filter(|k| {
                k.strip_prefix(key::NETWORK_PREFIX)
                    .is_some_and(|name| !self.networks.contains_key(name))
            })
            .cloned()
            .collect();
        (set, delete)
    }

    /// The member that decides what must be unique (networks, addresses): the live member with
    /// the lowest id, so every node that sees the same members asks the same one.
    pub fn leader(&self) -> Option<&Member> {
        self.members
            .iter()
            .find(|m| m.node.state == NodeState::Ready)
    }

    pub fn endpoints_on<'a>(
        &'a self,
        network: &'a Network,
    ) -> impl Iterator<Item = &'a Placed> + 'a {
        self.endpoints
            .iter()
            .filter(move |p| p.endpoint.network_id == network.id)
    }

    /// The data plane's tables: every member's endpoints, every other member's VTEP, and the
    /// network's static VTEPs as external ones (the only ones the data plane learns MACs from).
    ///
    /// Down members stay in: a member the failure detector wrongly calls down (a busy machine)
    /// keeps its traffic, and a really dead one loses nothing more by it. Members leave the
    /// tables when gossip forgets them.
    pub fn tables(&self, self_id: &str, vxlan_port: u16) -> overlay::Tables {
        let vteps: BTreeMap<&str, SocketAddrV4> = self
            .members
            .iter()
            .filter_map(|m| Some((m.node.id.as_str(), m.node.vtep?)))
            .collect();
        let networks = self
            .networks
            .values()
            .filter_map(|net| {
                let endpoints = self
                    .endpoints_on(net)
                    .filter_map(|p| {
                        let location = if p.node == self_id {
                            overlay::Location::Local
                        } else {
                            overlay::Location::Remote(*vteps.get(p.node.as_str())?)
                        };
                        Some(overlay::Endpoint {
                            mac: p.endpoint.mac.parse().ok()?,
                            ip: p.endpoint.ip,
                            location,
                        })
                    })
                    .collect();
                let peers = vteps
                    .iter()
                    .filter(|(id, _)| **id != self_id)
                    .map(|(_, vtep)| *vtep)
                    .collect();
                let external = net
                    .vteps
                    .iter()
                    .map(|ip| SocketAddrV4::new(*ip, vxlan_port))
                    .collect();
                Some(overlay::NetworkTable {
                    vni: overlay::Vni::new(net.vni)?,
                    gateway: net.gateway(),
                    gateway_mac: overlay::Mac(net.gateway_mac()),
                    endpoints,
                    peers,
                    external,
                })
            })
            .collect();
        overlay::Tables { networks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(id: &str, name: &str) -> String {
        serde_json::to_string(&Network {
            id: id.into(),
            name: name.into(),
            subnet: "198.19.0.0/24".parse().unwrap(),
            vni: 4096,
            mtu: 1450,
            vteps: vec!["198.18.0.9".parse().unwrap()],
        })
        .unwrap()
    }

    fn endpoint(network_id: &str, ip: &str) -> String {
        let ip: Ipv4Addr = ip.parse().unwrap();
        serde_json::to_string(&Endpoint {
            network_id: network_id.into(),
            ip,
            mac: Endpoint::mac_for(ip),
            netns: "c".into(),
            host_if: "ovh1".into(),
        })
        .unwrap()
    }

    /// (node id, live, key-values) per member; the first is this node.
    type Member = (String, bool, Vec<(String, String)>);

    struct Fixture {
        members: Vec<Member>,
    }

    impl Fixture {
        fn view(&self) -> View {
            View::build(
                self.members
                    .iter()
                    .enumerate()
                    .map(|(i, (id, live, kv))| MemberState {
                        id,
                        generation: 1,
                        gossip: format!("198.18.0.{}:7946", i + 1).parse().unwrap(),
                        live: *live,
                        is_self: i == 0,
                        keys: kv.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
                    }),
            )
        }
    }

    fn kv(pairs: &[(&str, String)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn networks_merge_and_tombstones_win() {
        let f = Fixture {
            members: vec![
                (
                    "a".into(),
                    true,
                    kv(&[
                        ("vtep", "198.18.0.1:4789".into()),
                        ("net/web", network("n1", "web")),
                    ]),
                ),
                (
                    "b".into(),
                    true,
                    kv(&[
                        ("net/web", network("n1", "web")),
                        ("net/old", network("n0", "old")),
                    ]),
                ),
                (
                    "c".into(),
                    false,
                    kv(&[
                        ("netrm/n0", String::new()),
                        ("ep/n1/198.19.0.2", endpoint("n1", "198.19.0.2")),
                    ]),
                ),
            ],
        };
        let view = f.view();
        assert_eq!(view.networks.keys().collect::<Vec<_>>(), ["web"]);
        assert_eq!(view.endpoints.len(), 1);
        assert_eq!(view.leader().unwrap().node.id, "a");
        assert_eq!(view.members[2].node.state, NodeState::Down);
    }

    #[test]
    fn only_the_newest_generation_of_a_restarted_node_counts() {
        let old_ep = endpoint("n1", "198.19.0.2");
        let new_ep = endpoint("n1", "198.19.0.3");
        let net = network("n1", "web");
        fn state<'a>(generation: u64, live: bool, net: &'a str, ep: &'a str) -> MemberState<'a> {
            MemberState {
                id: "a",
                generation,
                gossip: "198.18.0.1:7946".parse().unwrap(),
                live,
                is_self: false,
                keys: vec![("net/web", net), ("ep/n1/x", ep)],
            }
        }
        let view = View::build([
            state(1, false, &net, &old_ep),
            state(2, true, &net, &new_ep),
        ]);
        assert_eq!(view.members.len(), 1);
        assert_eq!(view.members[0].node.state, NodeState::Ready);
        let ips: Vec<String> = view
            .endpoints
            .iter()
            .map(|p| p.endpoint.ip.to_string())
            .collect();
        assert_eq!(ips, ["198.19.0.3"]);
    }

    #[test]
    fn every_node_copies_live_networks_and_tombstones_and_drops_removed_copies() {
        let f = Fixture {
            members: vec![
                ("a".into(), true, kv(&[("net/old", network("n0", "old"))])),
                (
                    "b".into(),
                    true,
                    kv(&[
                        ("net/web", network("n1", "web")),
                        ("netrm/n0", String::new()),
                    ]),
                ),
            ],
        };
        let view = f.view();
        let mine: BTreeMap<String, String> = f.members[0].2.iter().cloned().collect();
        let (set, delete) = view.replication(&mine);
        let set_keys: Vec<&str> = set.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(set_keys, ["net/web", "netrm/n0"]);
        assert_eq!(delete, ["net/old"]);
        let mine: BTreeMap<String, String> = set.into_iter().collect();
        assert_eq!(
            view.replication(&mine),
            (vec![], vec![]),
            "converged: nothing more to do"
        );
    }

    #[test]
    fn tables_keep_down_members_and_list_static_vteps_as_external() {
        let f = Fixture {
            members: vec![
                (
                    "a".into(),
                    true,
                    kv(&[
                        ("vtep", "198.18.0.1:4789".into()),
                        ("net/web", network("n1", "web")),
                        ("ep/n1/198.19.0.2", endpoint("n1", "198.19.0.2")),
                    ]),
                ),
                (
                    "b".into(),
                    true,
                    kv(&[
                        ("vtep", "198.18.0.2:4789".into()),
                        ("ep/n1/198.19.0.3", endpoint("n1", "198.19.0.3")),
                    ]),
                ),
                (
                    "c".into(),
                    false,
                    kv(&[
                        ("vtep", "198.18.0.3:4789".into()),
                        ("ep/n1/198.19.0.4", endpoint("n1", "198.19.0.4")),
                    ]),
                ),
            ],
        };
        let tables = f.view().tables("a", 4789);
        let net = &tables.networks[0];
        assert_eq!(net.gateway, "198.19.0.1".parse::<Ipv4Addr>().unwrap());
        let peers: Vec<String> = net.peers.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            peers,
            ["198.18.0.2:4789", "198.18.0.3:4789"],
            "self excluded, the down member kept"
        );
        assert_eq!(
            net.external,
            ["198.18.0.9:4789".parse::<SocketAddrV4>().unwrap()],
            "the static VTEP is external"
        );
        assert_eq!(
            net.gateway_mac,
            overlay::Mac([0x02, 0x4f, 0x56, 0, 0x10, 0])
        );
        let locations: Vec<_> = net
            .endpoints
            .iter()
            .map(|e| (e.ip.to_string(), e.location))
            .collect();
        assert_eq!(
            locations,
            [
                ("198.19.0.2".to_string(), overlay::Location::Local),
                (
                    "198.19.0.3".to_string(),
                    overlay::Location::Remote("198.18.0.2:4789".parse().unwrap())
                ),
                (
                    "198.19.0.4".to_string(),
                    overlay::Location::Remote("198.18.0.3:4789".parse().unwrap())
                ),
            ]
        );
    }
}
