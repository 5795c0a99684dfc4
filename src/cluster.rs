//! The cluster as one node sees it: members and their endpoints from gossip, networks and
//! address holders from the Raft-replicated [`Registry`].
//!
//! Pure: [`View::build`] takes each member's key-values and liveness and the registry, so the
//! rules (which endpoints count, what is refused) are tested without sockets.
//!
//! Gossip is written by every member, so everything read from it is checked before it counts:
//! an endpoint counts only if the registry gave its address to the member announcing it, with
//! the MAC derived from it; a VTEP must parse. Anything else is refused and listed in
//! [`View::refused`], never trusted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use crate::api::TaskState;
use crate::model::{Endpoint, Network, Node, NodeState, RaftRole, RaftStatus, Service, key};
use crate::registry::{Departed, Registry};
use crate::token::Secret;

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
    /// Leaving members whose tasks this member's balancer gives no new flows any more.
    pub drained: BTreeSet<String>,
    /// What it gossips as a Raft voter; none for the members that copy the registry.
    pub raft: Option<RaftStatus>,
}

/// An endpoint and the member that hosts it.
#[derive(Clone, Debug, PartialEq)]
pub struct Placed {
    pub node: String,
    pub endpoint: Endpoint,
}

/// A task of a service, as the registry records it.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskRef {
    pub service: String,
    pub network_id: String,
    pub ip: Ipv4Addr,
    pub node: String,
}

#[derive(Clone, Debug, Default)]
pub struct View {
    pub members: Vec<Member>,
    /// Networks by name.
    pub networks: BTreeMap<String, Network>,
    pub endpoints: Vec<Placed>,
    /// Services by name.
    pub services: BTreeMap<String, Service>,
    pub tasks: Vec<TaskRef>,
    /// Health checks' results, as the node running each task reports them:
    /// (network id, address) -> passing.
    pub health: BTreeMap<(String, Ipv4Addr), bool>,
    /// Gossip entries refused, as "member key: why".
    pub refused: Vec<String>,
    /// Nodes out of the cluster for good (the registry's record): never members, whatever
    /// they gossip.
    pub departed: BTreeMap<String, Departed>,
}

impl View {
    pub fn build<'a>(
        states: impl IntoIterator<Item = MemberState<'a>>,
        registry: &Registry,
    ) -> View {
        let mut view = View {
            networks: registry.networks().clone(),
            services: registry.services().clone(),
            departed: registry.departed().clone(),
            tasks: registry
                .services()
                .values()
                .flat_map(|service| {
                    registry.tasks(service).map(|(ip, node)| TaskRef {
                        service: service.name.clone(),
                        network_id: service.network_id.clone(),
                        ip,
                        node: node.to_string(),
                    })
                })
                .collect(),
            ..View::default()
        };
        let by_id: BTreeMap<&str, &Network> = registry
            .networks()
            .values()
            .map(|n| (n.id.as_str(), n))
            .collect();
        // A restarted node is a new generation; the old one lingers in gossip as a dead member
        // until it is forgotten, and must count neither as a member nor for its endpoints.
        let states: Vec<MemberState> = states.into_iter().collect();
        let mut newest: BTreeMap<&str, u64> = BTreeMap::new();
        for state in &states {
            let g = newest.entry(state.id).or_default();
            *g = (*g).max(state.generation);
        }
        for state in states.iter().filter(|s| {
            newest.get(s.id) == Some(&s.generation) && !registry.departed().contains_key(s.id)
        }) {
            let mut vtep: Option<SocketAddrV4> = None;
            let mut realised = BTreeSet::new();
            let mut drained = BTreeSet::new();
            let mut leaving = false;
            let mut raft = None;
            for &(k, v) in &state.keys {
                let checked = if k == key::VTEP {
                    v.parse()
                        .map(|addr| vtep = Some(addr))
                        .map_err(|_| "not an IPv4 address:port".to_string())
                } else if let Some(id) = k.strip_prefix(key::REALISED_PREFIX) {
                    realised.insert(id.to_string());
                    Ok(())
                } else if let Some(id) = k.strip_prefix(key::DRAINED_PREFIX) {
                    drained.insert(id.to_string());
                    Ok(())
                } else if k == key::LEAVING {
                    leaving = true;
                    Ok(())
                } else if k == key::RAFT {
                    // Whom members propose to and copy the registry from: only a member the
                    // registry knows (a removed node holds the gossip key under any id).
                    if registry.members().contains_key(state.id) {
                        v.parse().map(|status| raft = Some(status))
                    } else {
                        Err("not a member in the registry".to_string())
                    }
                } else if let Some(at) = k.strip_prefix(key::HEALTH_PREFIX) {
                    health(state.id, at, v, registry).map(|(at, passing)| {
                        view.health.insert(at, passing);
                    })
                } else if k.starts_with(key::ENDPOINT_PREFIX) {
                    endpoint(state.id, v, &by_id, registry).map(|endpoint| {
                        view.endpoints.push(Placed {
                            node: state.id.to_string(),
                            endpoint,
                        })
                    })
                } else {
                    Err("unknown key".to_string())
                };
                if let Err(why) = checked {
                    view.refused.push(format!("{} {k}: {why}", state.id));
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
                    state: match (state.live, leaving) {
                        (true, false) => NodeState::Ready,
                        (true, true) => NodeState::Leaving,
                        (false, _) => NodeState::Down,
                    },
                    is_self: state.is_self,
                    raft: match raft {
                        Some(RaftStatus { role, .. }) => Some(role),
                        None => registry
                            .members()
                            .contains_key(state.id)
                            .then_some(RaftRole::Learner),
                    },
                },
                gossip: state.gossip,
                realised,
                drained,
                raft,
            });
        }
        view.members.sort_by(|a, b| a.node.id.cmp(&b.node.id));
        let leader = view.claimed_leader().map(|m| m.node.id.clone());
        show_leader(
            view.members.iter_mut().map(|m| &mut m.node),
            leader.as_deref(),
        );
        view
    }

    /// The live member (this node too) that claims to lead in the highest term. Another claim
    /// may linger: a dead leader's key stays in gossip, an old leader's until it hears of the
    /// new term.
    fn claimed_leader(&self) -> Option<&Member> {
        self.members
            .iter()
            .filter(|m| m.node.state != NodeState::Down)
            .filter_map(|m| Some((m.raft.filter(|s| s.role == RaftRole::Leader)?.term, m)))
            .max_by_key(|(term, _)| *term)
            .map(|(_, m)| m)
    }

    /// The live voters' statuses with their peer addresses.
    fn voters(&self) -> impl Iterator<Item = (SocketAddr, RaftStatus)> + '_ {
        self.members
            .iter()
            .filter(|m| !m.node.is_self && m.node.state != NodeState::Down)
            .filter_map(|m| Some((m.gossip, m.raft?)))
    }

    /// Where to propose a change: the other member that gossip says leads.
    pub fn leader(&self) -> Option<SocketAddr> {
        self.claimed_leader()
            .filter(|m| !m.node.is_self)
            .map(|m| m.gossip)
    }

    /// Where a member that copies the registry gets what it lacks: a live voter that has
    /// applied the most, if that is past `applied` (this node's last applied index). Of the
    /// voters that are as far, `asker` (this node's id) picks one by its hash, so that the
    /// members' copies spread over the voters instead of all falling on one.
    pub fn registry_ahead(&self, applied: Option<u64>, asker: &str) -> Option<(SocketAddr, u64)> {
        let most = self.voters().map(|(_, s)| s.applied).max()?;
        if applied.is_some_and(|mine| mine >= most) {
            return None;
        }
        let furthest: Vec<SocketAddr> = self
            .voters()
            .filter(|(_, s)| s.applied == most)
            .map(|(addr, _)| addr)
            .collect();
        let pick = asker
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
        Some((furthest[pick % furthest.len()], most))
    }

    /// Where `task` stands, from its node's liveness, its endpoint in gossip and its health.
    pub fn task_state(&self, task: &TaskRef) -> TaskState {
        let node = self.members.iter().find(|m| m.node.id == task.node);
        match node.map(|m| m.node.state) {
            Some(NodeState::Ready) => {}
            Some(NodeState::Leaving) => return TaskState::Draining,
            _ => return TaskState::Down,
        }
        let announced = self.endpoints.iter().any(|p| {
            p.node == task.node
                && p.endpoint.network_id == task.network_id
                && p.endpoint.ip == task.ip
        });
        let checked = self
            .services
            .get(&task.service)
            .is_some_and(|s| s.health.is_some());
        match (announced, checked) {
            (false, _) => TaskState::Starting,
            (true, false) => TaskState::Healthy,
            (true, true) => match self.health.get(&(task.network_id.clone(), task.ip)) {
                Some(true) => TaskState::Healthy,
                Some(false) => TaskState::Unhealthy,
                None => TaskState::Starting,
            },
        }
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
    ///
    /// An encrypted network gets the keys with every other member in its key epoch, derived
    /// from `secret` ([`Secret::vxlan_key`]), and those of the next epoch to receive with (see
    /// `overlay::keyring`).
    pub fn tables(&self, self_id: &str, vxlan_port: u16, secret: &Secret) -> overlay::Tables {
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
                    .chain(
                        self.services
                            .values()
                            .filter(|s| s.network_id == net.id)
                            .filter_map(|s| s.vip)
                            .map(|vip| overlay::Endpoint {
                                mac: overlay::Mac(Endpoint::mac_bytes(vip)),
                                ip: vip,
                                location: overlay::Location::Service,
                            }),
                    )
                    .collect();
                let others = || vteps.iter().filter(|(id, _)| **id != self_id);
                let peers = others().map(|(_, vtep)| *vtep).collect();
                let sealing = net.encrypted.then(|| {
                    let (vni, epoch) = (net.vni, net.key_epoch);
                    let key = |from: &str, to: &str, epoch| {
                        overlay::seal::Key(secret.vxlan_key(from, to, vni, epoch))
                    };
                    overlay::Sealing {
                        epoch,
                        peers: others()
                            .map(|(id, vtep)| overlay::PeerKeys {
                                vtep: *vtep.ip(),
                                send: key(self_id, id, epoch),
                                receive: key(id, self_id, epoch),
                                receive_next: key(id, self_id, epoch.wrapping_add(1)),
                            })
                            .collect(),
                    }
                });
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
                    sealing,
                })
            })
            .collect();
        overlay::Tables { networks }
    }
}

/// A health result `hc/<network id>/<ip>` -> "healthy" | "unhealthy" announced by `node`, if the
/// registry gave it that address: only a task's own node reports on it.
fn health(
    node: &str,
    at: &str,
    value: &str,
    registry: &Registry,
) -> Result<((String, Ipv4Addr), bool), String> {
    let (network_id, ip) = at.split_once('/').ok_or("not <network id>/<ip>")?;
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("{ip:?} is not an address"))?;
    if registry.container_node(network_id, ip) != Some(node) {
        return Err(format!("{ip} is not held by this member"));
    }
    let passing = match value {
        key::HEALTHY => true,
        key::UNHEALTHY => false,
        other => return Err(format!("{other:?} is not a health state")),
    };
    Ok(((network_id.to_string(), ip), passing))
}

/// An endpoint announced by `node`, if the registry gave it that address: a member cannot
/// announce (and so draw the traffic of) an address it does not hold.
fn endpoint(
    node: &str,
    value: &str,
    networks: &BTreeMap<&str, &Network>,
    registry: &Registry,
) -> Result<Endpoint, String> {
    let endpoint: Endpoint = serde_json::from_str(value).map_err(|e| format!("malformed: {e}"))?;
    if !networks.contains_key(endpoint.network_id.as_str()) {
        return Err(format!(
            "network {} is not in the registry",
            endpoint.network_id
        ));
    }
    if registry.container_node(&endpoint.network_id, endpoint.ip) != Some(node) {
        return Err(format!("{} is not held by this member", endpoint.ip));
    }
    if endpoint.mac != Endpoint::mac_for(endpoint.ip) {
        return Err(format!(
            "MAC {} is not the one of {}",
            endpoint.mac, endpoint.ip
        ));
    }
    Ok(endpoint)
}

/// Lists `leader` as the leader, and any other node listed so (a stale claim) as a voter.
pub fn show_leader<'a>(nodes: impl IntoIterator<Item = &'a mut Node>, leader: Option<&str>) {
    for node in nodes {
        if leader == Some(node.id.as_str()) {
            node.raft = Some(RaftRole::Leader);
        } else if node.raft == Some(RaftRole::Leader) {
            node.raft = Some(RaftRole::Voter);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Command;

    /// A registry holding network `web` (id `w`, 198.19.0.0/24, static VTEP 198.18.0.9) and
    /// the addresses `held` as (node, last octet).
    fn registry(held: &[(&str, u8)]) -> Registry {
        let mut r = Registry::default();
        r.apply(Command::CreateNetwork {
            id: "w".into(),
            name: "web".into(),
            subnet: "198.19.0.0/24".parse().unwrap(),
            vni: None,
            mtu: 1450,
            vteps: vec!["198.18.0.9".parse().unwrap()],
            internal: false,
            encrypted: false,
        })
        .unwrap();
        for (node, last) in held {
            r.apply(Command::Allocate {
                network: "web".into(),
                node: node.to_string(),
                ip: Some(Ipv4Addr::new(198, 19, 0, *last)),
                service: None,
            })
            .unwrap();
        }
        r
    }

    fn endpoint(network_id: &str, last: u8) -> String {
        let ip = Ipv4Addr::new(198, 19, 0, last);
        serde_json::to_string(&Endpoint {
            network_id: network_id.into(),
            ip,
            mac: Endpoint::mac_for(ip),
            netns: "c".into(),
            host_if: "ovh1".into(),
            aliases: vec![],
        })
        .unwrap()
    }

    /// (node id, live, key-values) per member; the first is this node.
    type Gossip = Vec<(&'static str, bool, Vec<(&'static str, String)>)>;

    fn view(members: &Gossip, registry: &Registry) -> View {
        View::build(
            members
                .iter()
                .enumerate()
                .map(|(i, (id, live, kv))| MemberState {
                    id,
                    generation: 1,
                    gossip: format!("198.18.0.{}:7946", i + 1).parse().unwrap(),
                    live: *live,
                    is_self: i == 0,
                    keys: kv.iter().map(|(k, v)| (*k, v.as_str())).collect(),
                }),
            registry,
        )
    }

    #[test]
    fn the_leader_and_the_voter_furthest_ahead_come_from_the_live_voters_statuses() {
        let mut registry = registry(&[]);
        for node in ["a", "b", "c", "d", "e", "h"] {
            registry
                .apply(Command::AddNode {
                    node: node.into(),
                    addr: "198.18.0.1:7946".parse().unwrap(),
                })
                .unwrap();
        }
        let raft = |s: &str| vec![("raft", s.to_string())];
        let members: Gossip = vec![
            ("a", true, vec![]),
            // Dead: its claim lingers in gossip.
            ("b", false, raft("leader 3 40")),
            ("c", true, raft("voter 4 41")),
            // The old leader, not yet told of term 4.
            ("d", true, raft("leader 3 39")),
            ("e", true, raft("leader 4 42")),
            // Not a member (yet): no part in the registry.
            ("f", true, vec![]),
            // Not a member, claiming to lead: refused.
            ("g", true, raft("leader 9 99")),
            ("h", true, raft("leader x 1")),
        ];
        // Voters as far as each other share the askers.
        let even: Gossip = vec![
            ("a", true, vec![]),
            ("c", true, raft("voter 4 42")),
            ("d", true, raft("voter 4 42")),
            ("e", true, raft("leader 4 42")),
        ];
        let even = view(&even, &registry);
        let picked: BTreeSet<SocketAddr> = ["a", "b", "f", "g", "h", "x"]
            .iter()
            .filter_map(|asker| Some(even.registry_ahead(Some(7), asker)?.0))
            .collect();
        assert!(picked.len() > 1, "{picked:?}");
        let view = view(&members, &registry);
        assert_eq!(view.leader(), Some("198.18.0.5:7946".parse().unwrap()));
        let roles: Vec<Option<RaftRole>> = view.members.iter().map(|m| m.node.raft).collect();
        use RaftRole::*;
        assert_eq!(
            roles,
            [
                Some(Learner),
                Some(Voter),
                Some(Voter),
                Some(Voter),
                Some(Leader),
                None,
                None,
                Some(Learner),
            ]
        );
        for refused in ["g raft: not a member", "h raft: not `leader"] {
            assert!(
                view.refused.iter().any(|r| r.starts_with(refused)),
                "{:?}",
                view.refused
            );
        }
        let e = Some(("198.18.0.5:7946".parse().unwrap(), 42));
        assert_eq!(view.registry_ahead(None, "a"), e);
        assert_eq!(view.registry_ahead(Some(41), "a"), e);
        assert_eq!(view.registry_ahead(Some(42), "a"), None, "up to date");
        let mut nodes: Vec<Node> = view.members.iter().map(|m| m.node.clone()).collect();
        show_leader(&mut nodes, Some("c"));
        let leaders: Vec<&str> = nodes
            .iter()
            .filter(|n| n.raft == Some(Leader))
            .map(|n| n.id.as_str())
            .collect();
        assert_eq!(leaders, ["c"], "this node's Raft knows better than gossip");
    }

    #[test]
    fn networks_come_from_the_registry_and_endpoints_only_from_their_holders() {
        let registry = registry(&[("a", 2), ("b", 3)]);
        let forged_mac = endpoint("w", 3).replace(
            &Endpoint::mac_for(Ipv4Addr::new(198, 19, 0, 3)),
            "02:42:c6:13:00:02",
        );
        let members: Gossip = vec![
            (
                "a",
                true,
                vec![
                    ("vtep", "198.18.0.1:4789".into()),
                    ("ep/w/198.19.0.2", endpoint("w", 2)),
                ],
            ),
            (
                "b",
                true,
                vec![
                    ("vtep", "198.18.0.2:4789".into()),
                    ("ep/w/198.19.0.3", endpoint("w", 3)),
                    // Held by nobody, by another member, or with another MAC: refused.
                    ("ep/w/198.19.0.4", endpoint("w", 4)),
                    ("ep/w/198.19.0.2", endpoint("w", 2)),
                    ("ep/w/x", forged_mac),
                    ("ep/gone/198.19.0.3", endpoint("gone", 3)),
                ],
            ),
            (
                "c",
                false,
                vec![
                    ("vtep", "198.18.0.300:4789".into()),
                    ("ep/w/y", "{not json".into()),
                    (
                        "net/evil",
                        r#"{"id":"e","name":"evil","subnet":"198.19.9.0/32","vni":7,"mtu":1450}"#
                            .into(),
                    ),
                ],
            ),
        ];
        let view = view(&members, &registry);
        assert_eq!(view.networks.keys().collect::<Vec<_>>(), ["web"]);
        let placed: Vec<(String, String)> = view
            .endpoints
            .iter()
            .map(|p| (p.node.clone(), p.endpoint.ip.to_string()))
            .collect();
        assert_eq!(
            placed,
            [
                ("a".into(), "198.19.0.2".into()),
                ("b".into(), "198.19.0.3".into())
            ]
        );
        assert_eq!(view.refused.len(), 7, "{:#?}", view.refused);
        assert_eq!(view.members[2].node.state, NodeState::Down);
        assert_eq!(view.members[2].node.vtep, None, "a bad VTEP is not used");
    }

    #[test]
    fn a_departed_node_is_no_member_and_a_leaving_ones_tasks_drain() {
        let mut registry = registry(&[("a", 2), ("b", 3), ("c", 4)]);
        registry
            .apply(Command::RemoveNode {
                node: "c".into(),
                address: None,
                left: false,
            })
            .unwrap();
        let members: Gossip = vec![
            ("a", true, vec![("vtep", "198.18.0.1:4789".into())]),
            (
                "b",
                true,
                vec![
                    ("vtep", "198.18.0.2:4789".into()),
                    ("leaving", String::new()),
                    ("ep/w/198.19.0.3", endpoint("w", 3)),
                ],
            ),
            (
                "c",
                true,
                vec![
                    ("vtep", "198.18.0.3:4789".into()),
                    ("ep/w/198.19.0.4", endpoint("w", 4)),
                    ("drained/b", String::new()),
                ],
            ),
        ];
        let view = view(&members, &registry);
        let ids: Vec<&str> = view.members.iter().map(|m| m.node.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"], "c is out, whatever it gossips");
        assert!(view.refused.is_empty(), "{:?}", view.refused);
        assert!(view.departed.contains_key("c"));
        assert_eq!(view.members[1].node.state, NodeState::Leaving);
        let task = TaskRef {
            service: "s".into(),
            network_id: "w".into(),
            ip: Ipv4Addr::new(198, 19, 0, 3),
            node: "b".into(),
        };
        assert_eq!(view.task_state(&task), TaskState::Draining);
        let peers = &view.tables("a", 4789, &Secret::generate()).networks[0].peers;
        assert_eq!(peers.len(), 1, "c's VTEP is no peer: {peers:?}");
    }

    #[test]
    fn only_the_newest_generation_of_a_restarted_node_counts() {
        let registry = registry(&[("a", 2), ("a", 3)]);
        let (old_ep, new_ep) = (endpoint("w", 2), endpoint("w", 3));
        fn state<'a>(generation: u64, live: bool, ep: &'a str) -> MemberState<'a> {
            MemberState {
                id: "a",
                generation,
                gossip: "198.18.0.1:7946".parse().unwrap(),
                live,
                is_self: false,
                keys: vec![("ep/w/x", ep)],
            }
        }
        let view = View::build(
            [state(1, false, &old_ep), state(2, true, &new_ep)],
            &registry,
        );
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
    fn tables_keep_down_members_and_list_static_vteps_as_external() {
        let registry = registry(&[("a", 2), ("b", 3), ("c", 4)]);
        let members: Gossip = vec![
            (
                "a",
                true,
                vec![
                    ("vtep", "198.18.0.1:4789".into()),
                    ("ep/w/198.19.0.2", endpoint("w", 2)),
                ],
            ),
            (
                "b",
                true,
                vec![
                    ("vtep", "198.18.0.2:4789".into()),
                    ("ep/w/198.19.0.3", endpoint("w", 3)),
                ],
            ),
            (
                "c",
                false,
                vec![
                    ("vtep", "198.18.0.3:4789".into()),
                    ("ep/w/198.19.0.4", endpoint("w", 4)),
                ],
            ),
        ];
        let tables = view(&members, &registry).tables("a", 4789, &Secret::generate());
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

    /// Two members of an encrypted network derive matching keys: what one sends with, the
    /// other receives with, in this epoch and the next; a plain network gets none.
    #[test]
    fn an_encrypted_network_gets_matching_keys_per_member_pair() {
        let mut registry = registry(&[]);
        registry
            .apply(Command::CreateNetwork {
                id: "s".into(),
                name: "secret".into(),
                subnet: "198.19.8.0/24".parse().unwrap(),
                vni: Some(5000),
                mtu: 1426,
                vteps: vec![],
                internal: false,
                encrypted: true,
            })
            .unwrap();
        registry
            .apply(Command::RotateKey {
                name: "secret".into(),
            })
            .unwrap();
        let refused = registry.apply(Command::RotateKey { name: "web".into() });
        assert!(refused.is_err(), "a plain network has no key to rotate");
        let members: Gossip = ["a", "b"]
            .iter()
            .enumerate()
            .map(|(i, id)| {
                (
                    *id,
                    true,
                    vec![("vtep", format!("198.18.0.{}:4789", i + 1))],
                )
            })
            .collect();
        let secret = Secret::generate();
        let view = view(&members, &registry);
        let sealing = |me: &str| {
            let tables = view.tables(me, 4789, &secret);
            assert!(tables.networks[1].sealing.is_none(), "web is plain");
            tables.networks[0].sealing.clone().unwrap()
        };
        let (a, b) = (sealing("a"), sealing("b"));
        assert_eq!((a.epoch, a.peers.len()), (1, 1));
        let (a, b) = (&a.peers[0], &b.peers[0]);
        assert_eq!(a.vtep, "198.18.0.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(a.send, b.receive);
        assert_eq!(b.send, a.receive);
        assert_ne!(a.send, a.receive, "one key per direction");
        assert_eq!(
            a.receive_next.0,
            secret.vxlan_key("b", "a", 5000, 2),
            "the next epoch's"
        );
    }
}
