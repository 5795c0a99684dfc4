//! The leader's decisions: what must be unique cluster-wide (network names, subnets, VNIs,
//! container addresses) is decided by one member, one request at a time, against its latest view.
//!
//! Pure: [`Ledger::decide`] takes the request, the view, the time and a fresh id, and returns the
//! reply and the gossip keys to write, so the rules are tested without sockets or clocks.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::api::Failure;
use crate::cluster::{Placed, View};
use crate::ipam;
use crate::model::{Network, key};
use crate::peer::Request;

/// An address handed out whose endpoint gossip has not shown yet is held this long.
const RESERVATION_TTL: Duration = Duration::from_secs(60);

/// What the leader remembers between gossip rounds.
#[derive(Default)]
pub struct Ledger {
    /// (network id, ip) -> (node, expiry): handed out, endpoint not yet seen in gossip.
    reserved: BTreeMap<(String, Ipv4Addr), (String, Instant)>,
    /// (network id, ip, node): endpoints removed whose deletion gossip has not yet carried here.
    released: BTreeSet<(String, Ipv4Addr, String)>,
}

/// A decision: the reply, and what the leader writes into its own gossip state.
#[derive(Debug, PartialEq)]
pub struct Decision {
    pub reply: serde_json::Value,
    pub set: Vec<(String, String)>,
    pub delete: Vec<String>,
}

impl Decision {
    fn reply(reply: serde_json::Value) -> Decision {
        Decision {
            reply,
            set: vec![],
            delete: vec![],
        }
    }
}

impl Ledger {
    /// Decides `request` (anything but `Hello`). `new_id` names a new network.
    pub fn decide(
        &mut self,
        request: Request,
        view: &View,
        now: Instant,
        new_id: impl FnOnce() -> String,
    ) -> Result<Decision, Failure> {
        self.forget_settled(view, now);
        match request {
            Request::Hello => Err(Failure::runtime(
                "Hello is answered by every member, not decided",
            )),
            Request::CreateNetwork {
                name,
                subnet,
                vni,
                mtu,
                vteps,
            } => {
                let existing: Vec<Network> = view.networks.values().cloned().collect();
                let vni = ipam::admit_network(&name, subnet, vni, &existing)?;
                let net = Network {
                    id: new_id(),
                    name,
                    subnet,
                    vni,
                    mtu,
                    vteps,
                };
                Ok(Decision {
                    reply: serde_json::to_value(&net).expect("networks serialise"),
                    set: vec![(key::network(&net.name), net.to_gossip())],
                    delete: vec![],
                })
            }
            Request::RemoveNetwork { name } => {
                let net = known(view, &name)?;
                let attached = self.taken(view, net).len();
                if attached > 0 {
                    return Err(Failure::usage(format!(
                        "network {name} still has {attached} attached container(s): detach them first (`overlayd detach NETNS --network {name}`)"
                    )));
                }
                Ok(Decision {
                    reply: name.clone().into(),
                    set: vec![(key::tombstone(&net.id), String::new())],
                    delete: vec![key::network(&name)],
                })
            }
            Request::Allocate { network, node, ip } => {
                let net = known(view, &network)?;
                let ip = ipam::allocate(net, ip, &self.taken(view, net))?;
                self.reserved
                    .insert((net.id.clone(), ip), (node, now + RESERVATION_TTL));
                Ok(Decision::reply(ip.to_string().into()))
            }
            Request::Release {
                network_id,
                node,
                ip,
            } => {
                self.reserved.remove(&(network_id.clone(), ip));
                let shown = view.endpoints.iter().any(|p| {
                    p.endpoint.network_id == network_id && p.endpoint.ip == ip && p.node == node
                });
                if shown {
                    self.released.insert((network_id, ip, node));
                }
                Ok(Decision::reply(ip.to_string().into()))
            }
        }
    }

    /// Addresses in use on `net`: endpoints gossip shows, less those released since, plus those
    /// handed out but not yet seen.
    fn taken(&self, view: &View, net: &Network) -> BTreeSet<Ipv4Addr> {
        let released = |p: &&Placed| {
            self.released
                .contains(&(net.id.clone(), p.endpoint.ip, p.node.clone()))
        };
        let reserved = self.reserved.keys().filter(|(id, _)| *id == net.id);
        view.endpoints_on(net)
            .filter(|p| !released(p))
            .map(|p| p.endpoint.ip)
            .chain(reserved.map(|(_, ip)| *ip))
            .collect()
    }

    /// Drops reservations whose endpoint gossip now shows (or that expired) and releases whose
    /// deletion gossip has carried.
    fn forget_settled(&mut self, view: &View, now: Instant) {
        let present: BTreeSet<(String, Ipv4Addr, String)> = view
            .endpoints
            .iter()
            .map(|p| (p.endpoint.network_id.clone(), p.endpoint.ip, p.node.clone()))
            .collect();
        self.reserved.retain(|(id, ip), (node, expiry)| {
            *expiry > now && !present.contains(&(id.clone(), *ip, node.clone()))
        });
        self.released.retain(|r| present.contains(r));
    }
}

pub fn known<'a>(view: &'a View, name: &str) -> Result<&'a Network, Failure> {
    view.networks.get(name).ok_or_else(|| {
        Failure::usage(format!(
            "network {name} not found: create it with `overlayd network create {name} --subnet CIDR` (see `overlayd network ls`)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Endpoint;

    /// A view holding `net` and, on it, endpoints (node, address).
    fn view_with(net: &Network, endpoints: &[(&str, &str)]) -> View {
        View {
            networks: [(net.name.clone(), net.clone())].into(),
            endpoints: endpoints
                .iter()
                .map(|(node, ip)| {
                    let ip: Ipv4Addr = ip.parse().unwrap();
                    Placed {
                        node: node.to_string(),
                        endpoint: Endpoint {
                            network_id: net.id.clone(),
                            ip,
                            mac: Endpoint::mac_for(ip),
                            netns: "c".into(),
                            host_if: "ovh".into(),
                        },
                    }
                })
                .collect(),
            ..View::default()
        }
    }

    fn create(
        ledger: &mut Ledger,
        view: &View,
        name: &str,
        subnet: &str,
    ) -> Result<Network, Failure> {
        let request = Request::CreateNetwork {
            name: name.into(),
            subnet: subnet.parse().unwrap(),
            vni: None,
            mtu: 1450,
            vteps: vec![],
        };
        let d = ledger.decide(request, view, Instant::now(), || format!("id-{name}"))?;
        assert_eq!(d.set[0].0, key::network(name));
        Ok(serde_json::from_value(d.reply).unwrap())
    }

    fn allocate(
        ledger: &mut Ledger,
        view: &View,
        node: &str,
        now: Instant,
    ) -> Result<String, Failure> {
        let request = Request::Allocate {
            network: "web".into(),
            node: node.into(),
            ip: None,
        };
        let d = ledger.decide(request, view, now, || unreachable!())?;
        Ok(d.reply.as_str().unwrap().to_string())
    }

    /// `node` tells the leader it detached the endpoint with `ip` on `net`.
    fn release(ledger: &mut Ledger, view: &View, net: &Network, node: &str, ip: &str) {
        let request = Request::Release {
            network_id: net.id.clone(),
            node: node.into(),
            ip: ip.parse().unwrap(),
        };
        ledger
            .decide(request, view, Instant::now(), || unreachable!())
            .unwrap();
    }

    #[test]
    fn back_to_back_allocations_before_gossip_catches_up_never_collide() {
        let mut ledger = Ledger::default();
        let web = create(&mut ledger, &View::default(), "web", "198.19.0.0/24").unwrap();
        let view = view_with(&web, &[("a", "198.19.0.2")]);
        let now = Instant::now();
        let got: Vec<String> = ["b", "c", "b"]
            .iter()
            .map(|n| allocate(&mut ledger, &view, n, now).unwrap())
            .collect();
        assert_eq!(got, ["198.19.0.3", "198.19.0.4", "198.19.0.5"]);
        // Reservations expire if their endpoint never shows up (the attach failed part-way).
        let later = now + RESERVATION_TTL + Duration::from_secs(1);
        assert_eq!(
            allocate(&mut ledger, &view, "b", later).unwrap(),
            "198.19.0.3"
        );
    }

    #[test]
    fn a_network_is_removed_only_when_nothing_is_attached_or_reserved() {
        let mut ledger = Ledger::default();
        let web = create(&mut ledger, &View::default(), "web", "198.19.0.0/24").unwrap();
        let view = view_with(&web, &[("a", "198.19.0.2")]);
        let rm = || Request::RemoveNetwork { name: "web".into() };
        let refusal = ledger
            .decide(rm(), &view, Instant::now(), || unreachable!())
            .unwrap_err();
        assert!(
            refusal.usage && refusal.message.contains("1 attached"),
            "{refusal}"
        );

        // The detach was reported to the leader: gossip still shows the endpoint, yet rm works.
        release(&mut ledger, &view, &web, "a", "198.19.0.2");
        let d = ledger
            .decide(rm(), &view, Instant::now(), || unreachable!())
            .unwrap();
        assert_eq!(d.set, [(key::tombstone(&web.id), String::new())]);
        assert_eq!(d.delete, [key::network("web")]);

        // A reservation (an attach under way) also blocks removal.
        let empty = view_with(&web, &[]);
        allocate(&mut ledger, &empty, "b", Instant::now()).unwrap();
        assert!(
            ledger
                .decide(rm(), &empty, Instant::now(), || unreachable!())
                .is_err()
        );
    }

    #[test]
    fn released_addresses_are_handed_out_again_before_gossip_drops_them() {
        let mut ledger = Ledger::default();
        let web = create(&mut ledger, &View::default(), "web", "198.19.0.0/24").unwrap();
        let view = view_with(&web, &[("a", "198.19.0.2")]);
        release(&mut ledger, &view, &web, "a", "198.19.0.2");
        assert_eq!(
            allocate(&mut ledger, &view, "b", Instant::now()).unwrap(),
            "198.19.0.2"
        );
    }

    #[test]
    fn unknown_networks_and_clashing_creates_are_refused() {
        let mut ledger = Ledger::default();
        let web = create(&mut ledger, &View::default(), "web", "198.19.0.0/24").unwrap();
        let view = view_with(&web, &[]);
        assert!(
            create(&mut ledger, &view, "web", "198.19.1.0/24")
                .unwrap_err()
                .message
                .contains("already exists")
        );
        let request = Request::Allocate {
            network: "nope".into(),
            node: "a".into(),
            ip: None,
        };
        let refusal = ledger
            .decide(request, &view, Instant::now(), || unreachable!())
            .unwrap_err();
        assert!(
            refusal.usage && refusal.message.contains("not found"),
            "{refusal}"
        );
    }
}
