//! The registry: what must be unique cluster-wide (network names, subnets, VNIs, container
//! addresses, services, their VIPs and their published ports), as the state machine that Raft replicates
//! ([`crate::consensus`]).
//!
//! Pure: [`Registry::apply`] takes a committed [`Command`] and returns its reply. Every member
//! applies the same commands in the same order and reaches the same state, so each choice is
//! made once for the whole cluster. A command is committed only once a majority of the voters
//! has it, so the minority side of a partition cannot hand out anything (see the README's
//! "Partitions").

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::api::{Failure, Reply};
use crate::ipam;
use crate::model::{Health, Mode, Network, Publish, Service, check_name};
use crate::publish::{self, Unpublish};
use crate::token::JoinSecret;

/// A change to the registry. Everything random (a new network's id) is chosen before the
/// command is proposed, so applying it is deterministic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    CreateNetwork {
        id: String,
        name: String,
        subnet: Ipv4Network,
        vni: Option<u32>,
        mtu: u32,
        vteps: Vec<Ipv4Addr>,
        /// Without egress (absent in commands logged before the flag existed).
        #[serde(default)]
        internal: bool,
        /// Sealed between nodes (absent in commands logged before the flag existed).
        #[serde(default)]
        encrypted: bool,
    },
    RemoveNetwork {
        name: String,
    },
    /// Advances the key epoch of encrypted network `name` by one.
    RotateKey {
        name: String,
    },
    /// Reserve an address on `network` for an endpoint that `node` is about to create, as a
    /// task of `service` if one is named.
    Allocate {
        network: String,
        node: String,
        ip: Option<Ipv4Addr>,
        service: Option<String>,
    },
    /// Makes the container at `ip` on `network`, which `node` holds, a task of `service`: a
    /// runtime may take an address before it says what the container serves (Docker's IPAM
    /// asks for it before the endpoint's options are known).
    Enlist {
        network: String,
        node: String,
        ip: Ipv4Addr,
        service: String,
    },
    /// `node` removed its endpoint with `ip`: the address may be handed out again.
    Release {
        network_id: String,
        node: String,
        ip: Ipv4Addr,
    },
    /// A service on `network`, with a VIP from its subnet in vip mode, publishing `publish`.
    CreateService {
        name: String,
        network: String,
        mode: Mode,
        health: Option<Health>,
        #[serde(default)]
        publish: Vec<Publish>,
    },
    /// Changes the ports a service publishes: takes those `remove` names away, then adds `add`
    /// (so one update can move a port to another target).
    UpdateService {
        name: String,
        add: Vec<Publish>,
        remove: Vec<Unpublish>,
    },
    /// Removes a service; refused while it has tasks, unless `force`, which also takes their
    /// addresses back (their nodes then unplug them).
    RemoveService {
        name: String,
        force: bool,
    },
    /// Replaces the join secret: tokens holding the old one no longer join
    /// (`join-token --rotate`).
    RotateJoinToken {
        join: JoinSecret,
    },
    /// Makes `node`, reachable for peer requests at `addr`, a member. Refused for a node that
    /// departed; a member joining again (a retry, or a new address) is answered as the first.
    AddNode {
        node: String,
        addr: SocketAddr,
    },
    /// Takes `node` out of the cluster for good: every address its containers hold is taken
    /// back (its tasks leave every balancer) and its id is never a member again. `left` when
    /// the node asked for it (`node leave`), not when another member removed it (`node rm`).
    RemoveNode {
        node: String,
        address: Option<Ipv4Addr>,
        left: bool,
    },
}

/// A node that is out of the cluster for good, as `node ls` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Departed {
    /// Its underlay address when it went, if known.
    pub address: Option<Ipv4Addr>,
    /// It left (`node leave`), rather than being removed (`node rm`).
    pub left: bool,
}

/// Who holds an address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Holder {
    /// A container on `node`, a task of `service` if it names one.
    Container {
        node: String,
        service: Option<String>,
    },
    /// The VIP of a service.
    Vip { service: String },
}

/// A command with the id its proposer gave it. A proposal that timed out may still commit;
/// its retry carries the same id, so the registry answers it with the first outcome instead of
/// applying it twice (a second address, or "already exists" for what the first created).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub id: u64,
    pub command: Command,
    /// When it was first proposed, in ms since the Unix epoch by its proposer's clock (0 in
    /// entries written before it was carried): what each node measures the time to apply it
    /// from ([`crate::metrics::Propagation`]). It changes nothing in the registry.
    #[serde(default)]
    pub proposed_ms: u64,
}

impl Proposal {
    /// `command` under a fresh random id, proposed now.
    pub fn new(command: Command) -> Proposal {
        Proposal {
            id: rand::random(),
            command,
            proposed_ms: crate::gossip::unix_ms(),
        }
    }
}

/// Outcomes remembered for retried proposals: far more than can be in flight at once.
const REMEMBERED: usize = 1024;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Registry {
    /// Networks by name. Each one passed [`Network::check`] when it was read.
    networks: BTreeMap<String, Network>,
    /// Network id -> address -> who holds it.
    addresses: BTreeMap<String, BTreeMap<Ipv4Addr, Holder>>,
    /// Services by name.
    #[serde(default)]
    services: BTreeMap<String, Service>,
    /// The last [`REMEMBERED`] proposals' ids, oldest first, and their outcomes.
    #[serde(default)]
    answered: std::collections::VecDeque<(u64, Reply)>,
    /// The join secret since the last rotation; before any, the one the cluster secret derives.
    #[serde(default)]
    join: Option<JoinSecret>,
    /// Nodes out of the cluster for good, by id.
    #[serde(default)]
    departed: BTreeMap<String, Departed>,
    /// Members by id, with their peer address: the nodes that joined and did not depart. Only a
    /// few of them vote in Raft ([`crate::consensus::MAX_VOTERS`]); the others copy this
    /// registry from the voters.
    #[serde(default)]
    members: BTreeMap<String, SocketAddr>,
}

impl Registry {
    pub fn networks(&self) -> &BTreeMap<String, Network> {
        &self.networks
    }

    pub fn services(&self) -> &BTreeMap<String, Service> {
        &self.services
    }

    /// The join secret tokens must hold, if it was ever rotated.
    pub fn join(&self) -> Option<&JoinSecret> {
        self.join.as_ref()
    }

    pub fn departed(&self) -> &BTreeMap<String, Departed> {
        &self.departed
    }

    pub fn members(&self) -> &BTreeMap<String, SocketAddr> {
        &self.members
    }

    /// Refuses `node` if it is out of the cluster, saying what to do instead.
    pub fn check_member(&self, node: &str) -> Result<(), Failure> {
        match self.departed.get(node) {
            None => Ok(()),
            Some(d) => Err(Failure::usage(format!(
                "node {node} {} the cluster and cannot come back with its old identity: \
                 remove its state dir and join it again as a new node with a current token \
                 (`overlayd join-token` on a member)",
                if d.left { "left" } else { "was removed from" }
            ))),
        }
    }

    /// Refuses service `name` unless it exists on `net`.
    fn check_service_on(&self, name: &str, net: &Network) -> Result<(), Failure> {
        let svc = known_service(&self.services, name)?;
        if svc.network_id == net.id {
            return Ok(());
        }
        let on = self
            .networks
            .values()
            .find(|n| n.id == svc.network_id)
            .map_or("another network", |n| n.name.as_str());
        Err(Failure::usage(format!(
            "service {name} is on network {on}, not {}: attach with `--network {on}`",
            net.name
        )))
    }

    /// Who holds `ip` on the network with `network_id`, if anyone.
    pub fn holder(&self, network_id: &str, ip: Ipv4Addr) -> Option<&Holder> {
        self.addresses.get(network_id)?.get(&ip)
    }

    /// The node whose container holds `ip` on the network with `network_id`, if any.
    pub fn container_node(&self, network_id: &str, ip: Ipv4Addr) -> Option<&str> {
        match self.holder(network_id, ip)? {
            Holder::Container { node, .. } => Some(node),
            Holder::Vip { .. } => None,
        }
    }

    /// The tasks of `service`: (network id, address, node).
    pub fn tasks<'a>(
        &'a self,
        service: &'a Service,
    ) -> impl Iterator<Item = (Ipv4Addr, &'a str)> + 'a {
        self.addresses
            .get(&service.network_id)
            .into_iter()
            .flatten()
            .filter_map(move |(ip, holder)| match holder {
                Holder::Container {
                    node,
                    service: Some(s),
                } if *s == service.name => Some((*ip, node.as_str())),
                _ => None,
            })
    }

    /// Applies a committed proposal, once: a retry of one already applied gets its outcome.
    pub fn apply_once(&mut self, proposal: Proposal) -> Reply {
        if let Some((_, reply)) = self.answered.iter().find(|(id, _)| *id == proposal.id) {
            return reply.clone();
        }
        let reply = self.apply(proposal.command);
        if self.answered.len() == REMEMBERED {
            self.answered.pop_front();
        }
        self.answered.push_back((proposal.id, reply.clone()));
        reply
    }

    pub fn apply(&mut self, command: Command) -> Reply {
        match command {
            Command::CreateNetwork {
                id,
                name,
                subnet,
                vni,
                mtu,
                vteps,
                internal,
                encrypted,
            } => {
                let existing: Vec<Network> = self.networks.values().cloned().collect();
                let vni = ipam::admit_network(&name, subnet, vni, &existing)?;
                if existing.iter().any(|n| n.id == id) {
                    return Err(Failure::usage(format!("network id {id} is in use already")));
                }
                let net = Network {
                    id,
                    name,
                    subnet,
                    vni,
                    mtu,
                    vteps,
                    internal,
                    encrypted,
                    key_epoch: 0,
                };
                net.check()?;
                let reply = json(&net);
                self.networks.insert(net.name.clone(), net);
                Ok(reply)
            }
            Command::RotateKey { name } => {
                known(&self.networks, &name)?;
                let Some(net) = self.networks.get_mut(&name).filter(|n| n.encrypted) else {
                    return Err(ipam::Refusal::NotEncrypted(name).into());
                };
                net.key_epoch = net.key_epoch.wrapping_add(1);
                Ok(json(net))
            }
            Command::RemoveNetwork { name } => {
                let net = known(&self.networks, &name)?;
                if let Some(service) = self.services.values().find(|s| s.network_id == net.id) {
                    return Err(Failure::usage(format!(
                        "network {name} still has service {}: remove it first (`overlayd service rm {}`)",
                        service.name, service.name
                    )));
                }
                let attached = self.addresses.get(&net.id).map_or(0, BTreeMap::len);
                if attached > 0 {
                    return Err(Failure::usage(format!(
                        "network {name} still has {attached} attached container(s): detach them first (`overlayd detach NETNS --network {name}`)"
                    )));
                }
                self.networks.remove(&name);
                Ok(name.into())
            }
            Command::Allocate {
                network,
                node,
                ip,
                service,
            } => {
                self.check_member(&node)?;
                let net = known(&self.networks, &network)?;
                if let Some(name) = &service {
                    self.check_service_on(name, net)?;
                }
                let ip = ipam::allocate(net, ip, &self.taken(&net.id))?;
                self.addresses
                    .entry(net.id.clone())
                    .or_default()
                    .insert(ip, Holder::Container { node, service });
                Ok(ip.to_string().into())
            }
            Command::Enlist {
                network,
                node,
                ip,
                service,
            } => {
                let net = known(&self.networks, &network)?;
                self.check_service_on(&service, net)?;
                let holder = self.addresses.get_mut(&net.id).and_then(|h| h.get_mut(&ip));
                match holder {
                    Some(Holder::Container {
                        node: holder,
                        service: task_of,
                    }) if *holder == node => {
                        *task_of = Some(service);
                        Ok(ip.to_string().into())
                    }
                    _ => Err(Failure::usage(format!(
                        "{ip} on network {network} is not a container of node {node}"
                    ))),
                }
            }
            Command::Release {
                network_id,
                node,
                ip,
            } => {
                let Some(held) = self.addresses.get_mut(&network_id) else {
                    return Ok(ip.to_string().into());
                };
                match held.get(&ip) {
                    Some(Holder::Vip { service }) => Err(Failure::usage(format!(
                        "{ip} is the VIP of service {service}: `overlayd service rm {service}` frees it"
                    ))),
                    Some(Holder::Container { node: holder, .. }) if *holder != node => {
                        Err(Failure::usage(format!(
                            "{ip} is held by node {holder}, not {node}: only its holder releases it"
                        )))
                    }
                    _ => {
                        held.remove(&ip);
                        if held.is_empty() {
                            self.addresses.remove(&network_id);
                        }
                        Ok(ip.to_string().into())
                    }
                }
            }
            Command::CreateService {
                name,
                network,
                mode,
                health,
                publish,
            } => {
                check_name(&name)?;
                if self.services.contains_key(&name) {
                    return Err(Failure::usage(format!(
                        "service {name} already exists: pick another name or `overlayd service rm {name}` first"
                    )));
                }
                let net = known(&self.networks, &network)?;
                let publish = publish::admit(&self.services, &name, &[], &publish, &[])?;
                let vip = match mode {
                    Mode::Dnsrr => None,
                    Mode::Vip => {
                        let taken = self.taken(&net.id);
                        Some(ipam::allocate(net, None, &taken).map_err(|_| {
                            Failure::usage(format!(
                                "network {network} has no free address left for the VIP of {name}: use a larger subnet"
                            ))
                        })?)
                    }
                };
                let service = Service {
                    name: name.clone(),
                    network_id: net.id.clone(),
                    mode,
                    vip,
                    health,
                    publish,
                };
                if let Some(vip) = vip {
                    self.addresses.entry(net.id.clone()).or_default().insert(
                        vip,
                        Holder::Vip {
                            service: name.clone(),
                        },
                    );
                }
                let reply = json(&service);
                self.services.insert(name, service);
                Ok(reply)
            }
            Command::UpdateService { name, add, remove } => {
                let mut service = known_service(&self.services, &name)?.clone();
                service.publish =
                    publish::admit(&self.services, &name, &service.publish, &add, &remove)?;
                let reply = json(&service);
                self.services.insert(name, service);
                Ok(reply)
            }
            Command::RemoveService { name, force } => {
                let service = known_service(&self.services, &name)?.clone();
                let tasks: Vec<Ipv4Addr> = self.tasks(&service).map(|(ip, _)| ip).collect();
                if !tasks.is_empty() && !force {
                    return Err(Failure::usage(format!(
                        "service {name} still has {} task(s): detach them first, or `overlayd service rm {name} --force` to detach them",
                        tasks.len()
                    )));
                }
                if let Some(held) = self.addresses.get_mut(&service.network_id) {
                    held.retain(|ip, _| !tasks.contains(ip) && Some(*ip) != service.vip);
                    if held.is_empty() {
                        self.addresses.remove(&service.network_id);
                    }
                }
                self.services.remove(&name);
                Ok(json(&tasks.len()))
            }
            Command::RotateJoinToken { join } => {
                let reply = json(&join.token());
                self.join = Some(join);
                Ok(reply)
            }
            Command::AddNode { node, addr } => {
                self.check_member(&node)?;
                self.members.insert(node, addr);
                Ok(serde_json::Value::Null)
            }
            Command::RemoveNode {
                node,
                address,
                left,
            } => {
                self.members.remove(&node);
                let mut released = 0;
                self.addresses.retain(|_, held| {
                    held.retain(|_, holder| {
                        let mine =
                            matches!(holder, Holder::Container { node: n, .. } if *n == node);
                        released += usize::from(mine);
                        !mine
                    });
                    !held.is_empty()
                });
                // A retry, or `node rm` racing `node leave`: the first record stands.
                self.departed
                    .entry(node)
                    .or_insert(Departed { address, left });
                Ok(json(&released))
            }
        }
    }

    /// Addresses in use on the network with `network_id`.
    fn taken(&self, network_id: &str) -> std::collections::BTreeSet<Ipv4Addr> {
        self.addresses
            .get(network_id)
            .map(|held| held.keys().copied().collect())
            .unwrap_or_default()
    }
}

/// The service called `name`, or a refusal that says how to make it.
pub fn known_service<'a>(
    services: &'a BTreeMap<String, Service>,
    name: &str,
) -> Result<&'a Service, Failure> {
    services.get(name).ok_or_else(|| {
        Failure::usage(format!(
            "service {name} not found: create it with `overlayd service create {name} --network NET` (see `overlayd service ls`)"
        ))
    })
}

/// The network called `name`, or a refusal that says how to make it.
pub fn known<'a>(
    networks: &'a BTreeMap<String, Network>,
    name: &str,
) -> Result<&'a Network, Failure> {
    networks.get(name).ok_or_else(|| {
        Failure::usage(format!(
            "network {name} not found: create it with `overlayd network create {name} --subnet CIDR` (see `overlayd network ls`)"
        ))
    })
}

fn json<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn create(registry: &mut Registry, name: &str, subnet: &str) -> Result<Network, Failure> {
        let reply = registry.apply(Command::CreateNetwork {
            id: format!("id-{name}"),
            name: name.into(),
            subnet: subnet.parse().unwrap(),
            vni: None,
            mtu: 1450,
            vteps: vec![],
            internal: false,
            encrypted: false,
        })?;
        Ok(serde_json::from_value(reply).unwrap())
    }

    /// Commands in a Raft log written before `--internal` existed, and the networks they made,
    /// read as networks with egress.
    #[test]
    fn networks_from_before_internal_existed_have_egress() {
        let logged = r#"{"CreateNetwork":{"id":"n1","name":"web","subnet":"198.19.0.0/24","vni":null,"mtu":1450,"vteps":[]}}"#;
        let command: Command = serde_json::from_str(logged).unwrap();
        let mut registry = Registry::default();
        let made: Network = serde_json::from_value(registry.apply(command).unwrap()).unwrap();
        assert!(!made.internal);
        let mut record = serde_json::to_value(&made).unwrap();
        record.as_object_mut().unwrap().remove("internal");
        let read: Network = serde_json::from_value(record).unwrap();
        assert_eq!(read, made);
    }

    fn allocate(registry: &mut Registry, node: &str, ip: Option<&str>) -> Result<String, Failure> {
        let reply = registry.apply(Command::Allocate {
            network: "web".into(),
            node: node.into(),
            ip: ip.map(|ip| ip.parse().unwrap()),
            service: None,
        })?;
        Ok(reply.as_str().unwrap().to_string())
    }

    fn release(registry: &mut Registry, net: &Network, node: &str, ip: &str) -> Reply {
        registry.apply(Command::Release {
            network_id: net.id.clone(),
            node: node.into(),
            ip: ip.parse().unwrap(),
        })
    }

    #[test]
    fn addresses_are_handed_out_once_and_again_after_release() {
        let mut r = Registry::default();
        let web = create(&mut r, "web", "198.19.0.0/24").unwrap();
        let got: Vec<String> = ["a", "b", "a"]
            .iter()
            .map(|n| allocate(&mut r, n, None).unwrap())
            .collect();
        assert_eq!(got, ["198.19.0.2", "198.19.0.3", "198.19.0.4"]);
        assert_eq!(
            r.container_node(&web.id, "198.19.0.3".parse().unwrap()),
            Some("b")
        );
        let taken = allocate(&mut r, "c", Some("198.19.0.3")).unwrap_err();
        assert!(taken.message.contains("already in use"), "{taken}");

        let refusal = release(&mut r, &web, "a", "198.19.0.3").unwrap_err();
        assert!(refusal.message.contains("held by node b"), "{refusal}");
        release(&mut r, &web, "b", "198.19.0.3").unwrap();
        assert_eq!(allocate(&mut r, "c", None).unwrap(), "198.19.0.3");
    }

    #[test]
    fn a_network_is_removed_only_when_no_address_is_held() {
        let mut r = Registry::default();
        let web = create(&mut r, "web", "198.19.0.0/24").unwrap();
        allocate(&mut r, "a", None).unwrap();
        let rm = || Command::RemoveNetwork { name: "web".into() };
        let refusal = r.apply(rm()).unwrap_err();
        assert!(
            refusal.usage && refusal.message.contains("1 attached"),
            "{refusal}"
        );
        release(&mut r, &web, "a", "198.19.0.2").unwrap();
        r.apply(rm()).unwrap();
        assert!(r.networks().is_empty());
        // The name is free again, with a new id.
        let again = create(&mut r, "web", "198.19.0.0/24").unwrap();
        assert_eq!(again.vni, web.vni);
    }

    #[test]
    fn clashing_and_invalid_networks_are_refused_and_change_nothing() {
        let mut r = Registry::default();
        create(&mut r, "web", "198.19.0.0/24").unwrap();
        let before = r.clone();
        for (name, subnet, why) in [
            ("web", "198.19.1.0/24", "already exists"),
            ("db", "198.19.0.0/25", "overlaps"),
            ("db", "198.19.9.1/32", "too small"),
            ("-db", "198.19.9.0/24", "not allowed"),
        ] {
            let refusal = create(&mut r, name, subnet).unwrap_err();
            assert!(refusal.message.contains(why), "{name} {subnet}: {refusal}");
        }
        let refusal = allocate(&mut r, "a", Some("198.19.0.1")).unwrap_err();
        assert!(refusal.message.contains("reserved"), "{refusal}");
        let refusal = r
            .apply(Command::Allocate {
                network: "nope".into(),
                node: "a".into(),
                ip: None,
                service: None,
            })
            .unwrap_err();
        assert!(refusal.message.contains("not found"), "{refusal}");
        assert_eq!(r, before);
    }

    #[test]
    fn a_retried_proposal_gets_the_first_outcome_and_changes_nothing_more() {
        let mut r = Registry::default();
        create(&mut r, "web", "198.19.0.0/24").unwrap();
        let allocate = Proposal::new(Command::Allocate {
            network: "web".into(),
            node: "a".into(),
            ip: None,
            service: None,
        });
        let first = r.apply_once(allocate.clone());
        assert_eq!(first, Ok("198.19.0.2".into()));
        let after_first = r.clone();
        assert_eq!(
            r.apply_once(allocate),
            first,
            "the retry is answered, not applied"
        );
        assert_eq!(r, after_first);
        let other = Proposal::new(Command::Allocate {
            network: "web".into(),
            node: "a".into(),
            ip: None,
            service: None,
        });
        assert_eq!(r.apply_once(other), Ok("198.19.0.3".into()));
    }

    #[test]
    fn an_address_taken_first_becomes_a_task_only_of_its_holder_and_its_networks_service() {
        let mut r = Registry::default();
        create(&mut r, "web", "198.19.0.0/24").unwrap();
        create(&mut r, "db", "198.19.1.0/24").unwrap();
        create_service(&mut r, "search", &[]).unwrap();
        let ip: Ipv4Addr = r
            .apply(Command::Allocate {
                network: "web".into(),
                node: "a".into(),
                ip: None,
                service: None,
            })
            .unwrap()
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let enlist = |network: &str, node: &str, service: &str| Command::Enlist {
            network: network.into(),
            node: node.into(),
            ip,
            service: service.into(),
        };
        let before = r.clone();
        for (bad, says) in [
            (enlist("web", "b", "search"), "not a container of node b"),
            (enlist("web", "a", "nope"), "not found"),
            (enlist("db", "a", "search"), "is on network web"),
        ] {
            let refusal = r.apply(bad.clone()).unwrap_err();
            assert!(refusal.message.contains(says), "{bad:?}: {refusal}");
            assert_eq!(r, before, "{bad:?} changed the registry");
        }
        r.apply(enlist("web", "a", "search")).unwrap();
        let service = r.services()["search"].clone();
        assert_eq!(r.tasks(&service).collect::<Vec<_>>(), [(ip, "a")]);
    }

    #[test]
    fn a_member_is_added_once_and_a_departed_node_is_not_added_again() {
        let mut r = Registry::default();
        let (first, moved) = ("198.18.0.2:7946", "198.18.0.9:7946");
        let add = |node: &str, addr: &str| Command::AddNode {
            node: node.into(),
            addr: addr.parse().unwrap(),
        };
        r.apply(add("b", first)).unwrap();
        r.apply(add("b", moved)).unwrap();
        assert_eq!(
            r.members()["b"],
            moved.parse().unwrap(),
            "the last address counts"
        );
        let remove = Command::RemoveNode {
            node: "b".into(),
            address: None,
            left: true,
        };
        r.apply(remove).unwrap();
        assert!(r.members().is_empty());
        let refused = r.apply(add("b", first)).unwrap_err();
        assert!(refused.message.contains("left the cluster"), "{refused}");
        assert!(r.members().is_empty());
    }

    #[test]
    fn a_removed_node_loses_its_addresses_and_gets_no_new_ones() {
        let mut r = Registry::default();
        create(&mut r, "web", "198.19.0.0/24").unwrap();
        create_service(&mut r, "search", &[]).unwrap();
        for node in ["a", "b", "b"] {
            r.apply(Command::Allocate {
                network: "web".into(),
                node: node.into(),
                ip: None,
                service: Some("search".into()),
            })
            .unwrap();
        }
        let remove = Command::RemoveNode {
            node: "b".into(),
            address: Some("198.18.0.2".parse().unwrap()),
            left: false,
        };
        assert_eq!(r.apply(remove.clone()), Ok(2.into()));
        let service = r.services()["search"].clone();
        let nodes: Vec<&str> = r.tasks(&service).map(|(_, node)| node).collect();
        assert_eq!(nodes, ["a"], "b's tasks are gone, a's and the VIP stay");
        assert!(
            service
                .vip
                .is_some_and(|vip| r.holder(&service.network_id, vip).is_some())
        );
        let refused = r
            .apply(Command::Allocate {
                network: "web".into(),
                node: "b".into(),
                ip: None,
                service: None,
            })
            .unwrap_err();
        assert!(
            refused.usage && refused.message.contains("was removed"),
            "{refused}"
        );
        // A retry, or a later leave, keeps the first record.
        let left = Command::RemoveNode {
            node: "b".into(),
            address: None,
            left: true,
        };
        assert_eq!(r.apply(left), Ok(0.into()));
        assert_eq!(
            r.departed()["b"],
            Departed {
                address: Some("198.18.0.2".parse().unwrap()),
                left: false
            }
        );
        assert!(r.check_member("a").is_ok());
    }

    #[test]
    fn a_rotated_join_secret_replaces_the_first_and_survives_a_snapshot() {
        let mut r = Registry::default();
        assert!(r.join().is_none());
        let join = JoinSecret::generate();
        r.apply(Command::RotateJoinToken { join: join.clone() })
            .unwrap();
        let copy: Registry = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(copy.join(), Some(&join));
        assert!(!format!("{:?}", Command::RotateJoinToken { join }).contains("OVL2"));
    }

    #[test]
    fn a_registry_with_an_invalid_network_does_not_deserialise() {
        let mut r = Registry::default();
        create(&mut r, "web", "198.19.0.0/24").unwrap();
        let good = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Registry>(&good).unwrap(), r);
        let bad = good.replace("198.19.0.0/24", "198.19.0.0/32");
        let err = serde_json::from_str::<Registry>(&bad).unwrap_err();
        assert!(err.to_string().contains("too small"), "{err}");
    }

    fn create_service(registry: &mut Registry, name: &str, publish: &[&str]) -> Reply {
        registry.apply(Command::CreateService {
            name: name.into(),
            network: "web".into(),
            mode: Mode::Vip,
            health: None,
            publish: publish.iter().map(|p| p.parse().unwrap()).collect(),
        })
    }

    fn update_service(registry: &mut Registry, name: &str, add: &[&str], rm: &[&str]) -> Reply {
        registry.apply(Command::UpdateService {
            name: name.into(),
            add: add.iter().map(|p| p.parse().unwrap()).collect(),
            remove: rm.iter().map(|p| p.parse().unwrap()).collect(),
        })
    }

    fn ports(registry: &Registry, name: &str) -> Vec<String> {
        registry.services()[name]
            .publish
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn services_publish_ports_and_updates_change_them() {
        let mut r = Registry::default();
        create(&mut r, "web", "198.19.0.0/24").unwrap();
        let created = create_service(&mut r, "search", &["9200:80", "53:53/udp"]).unwrap();
        assert_eq!(created["publish"][0]["published"], 9200, "{created}");
        assert_eq!(ports(&r, "search"), ["*:9200->80/tcp", "*:53->53/udp"]);
        let updated = update_service(&mut r, "search", &["9300:80", "9200:81"], &["9200"]).unwrap();
        assert_eq!(
            updated["publish"].as_array().map(Vec::len),
            Some(3),
            "{updated}"
        );
        assert_eq!(
            ports(&r, "search"),
            ["*:53->53/udp", "*:9300->80/tcp", "*:9200->81/tcp"]
        );
        // A port given up is free for another service.
        update_service(&mut r, "search", &[], &["9300/tcp"]).unwrap();
        create_service(&mut r, "other", &["9300:80"]).unwrap();
        // Without ports, a service publishes none.
        create_service(&mut r, "plain", &[]).unwrap();
        assert!(r.services()["plain"].publish.is_empty());
    }

    #[test]
    fn publish_conflicts_are_refused_and_change_nothing() {
        let mut r = Registry::default();
        create(&mut r, "web", "198.19.0.0/24").unwrap();
        create_service(&mut r, "search", &["9200:80", "198.18.0.1:8080:80"]).unwrap();
        let before = r.clone();
        for (create, update, why) in [
            (
                vec!["9200:9200"],
                None,
                "port 9200/tcp is already published by service search",
            ),
            (
                vec!["198.18.0.2:9200:80"],
                None,
                "9200/tcp is already published by service search",
            ),
            (
                vec!["8080:80"],
                None,
                "8080/tcp is already published by service search",
            ),
            (
                vec!["7000:1", "7000:2"],
                None,
                "port 7000/tcp is given twice",
            ),
            (
                vec![],
                Some((vec!["9200:1"], vec![])),
                "already published by service search",
            ),
            (
                vec![],
                Some((vec!["7000:1", "7000:2"], vec![])),
                "given twice",
            ),
            (
                vec![],
                Some((vec![], vec!["7000"])),
                "service search does not publish 7000/tcp",
            ),
            (
                vec![],
                Some((vec![], vec!["9200/udp"])),
                "does not publish 9200/udp",
            ),
            (
                vec![],
                Some((vec![], vec!["198.18.0.2:8080"])),
                "does not publish 198.18.0.2:8080/tcp",
            ),
        ] {
            let refusal = match update {
                None => create_service(&mut r, "new", &create),
                Some((add, rm)) => update_service(&mut r, "search", &add, &rm),
            }
            .expect_err(why);
            assert!(refusal.usage && refusal.message.contains(why), "{refusal}");
            assert_eq!(r, before, "{why}: changed");
        }
        let refusal = update_service(&mut r, "nosuch", &["1:1"], &[]).unwrap_err();
        assert!(
            refusal.message.contains("service nosuch not found"),
            "{refusal}"
        );
        // A publish that breaks the rules on its own, as a stray proposal could carry it.
        let mut udp_proxy: Publish = "9999:1".parse().unwrap();
        udp_proxy.protocol = crate::model::PublishProtocol::Udp;
        udp_proxy.proxy = Some(crate::model::ProxyProtocol::V2);
        let refusal = r
            .apply(Command::UpdateService {
                name: "search".into(),
                add: vec![udp_proxy],
                remove: vec![],
            })
            .unwrap_err();
        assert!(refusal.message.contains("proxy=v2 needs TCP"), "{refusal}");
        assert_eq!(r, before);
    }

    proptest! {
        /// Whatever the order of allocations and releases, no address is ever held twice and
        /// every held address is inside its network and not reserved.
        #[test]
        fn addresses_stay_unique(ops in proptest::collection::vec((0u8..3, 0u8..4, proptest::option::of(2u8..9)), 1..60)) {
            let mut r = Registry::default();
            let web = create(&mut r, "web", "198.19.0.0/28").unwrap();
            let mut held: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
            for (op, node, last) in ops {
                let node = format!("n{node}");
                let ip = last.map(|l| format!("198.19.0.{l}"));
                match op {
                    0 | 1 => {
                        if let Ok(got) = allocate(&mut r, &node, ip.as_deref()) {
                            prop_assert!(held.insert(got.parse().unwrap(), node).is_none());
                        }
                    }
                    _ => {
                        if let Some(ip) = ip
                            && release(&mut r, &web, &node, &ip).is_ok()
                        {
                            let ip: Ipv4Addr = ip.parse().unwrap();
                            if held.get(&ip) == Some(&node) {
                                held.remove(&ip);
                            }
                        }
                    }
                }
                for (ip, holder) in &held {
                    prop_assert_eq!(r.container_node(&web.id, *ip), Some(holder.as_str()));
                    prop_assert!(web.subnet.contains(*ip) && *ip != web.gateway());
                }
            }
        }
    }
}
