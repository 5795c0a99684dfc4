//! The routing mesh's kernel hooks and port reservations on one node, as plain values (pure).
//!
//! overlayd's userspace NAT reads the mesh's packets from the network's TAP. Three kinds of tc
//! filter (`u32` + `mirred`, on `clsact`) steer them there, and nothing else: the balancing
//! choice and the rewrite are overlayd's.
//!
//! - **Clients from outside** ([`Hook`] on the underlay interface, ingress): packets to the
//!   node's address (or the publish's own address) and the published port.
//! - **Clients on the node** (`lo`, egress): `curl localhost:PUB` and `curl <own address>:PUB`
//!   both leave through `lo`.
//! - **Replies of local tasks** (the network's bridge, ingress): a task answers the client's
//!   off-subnet address through the gateway, the bridge's own MAC, so the reply would enter the
//!   host's stack. Traffic to the subnet passes first, then the task's source port is steered.
//!
//! Each published port also gets a [`Reservation`]: a socket the daemon holds on it, so that no
//! other process takes the port and the kernel never picks it as an ephemeral source port (whose
//! replies the first two hooks would steal). A port's hooks go in only while it is held.
//!
//! A TCP port with `proxy=v2` gets no port hooks: the daemon's proxy listens on it (that socket
//! holds it) and connects to the task from the node's address. The reply hooks stay, for those
//! connections' replies.
//!
//! [`plan`] derives all of it from the [`View`]; `daemon::mesh_hooks` makes the kernel match.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::cluster::View;
use crate::model::{Publish, PublishMode, PublishProtocol};

/// A `clsact` hook point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// Which transport port a hook matches. `u32`'s `ip sport`/`ip dport` read the port right after
/// a 20-byte IPv4 header: packets with IP options are not matched and take their normal path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Port {
    Dst(u16),
    Src(u16),
}

/// What a matching packet does.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// Goes on as if no hook were there, and no later hook of the device sees it. Ordered before
    /// [`Action::Steer`] so that it wins over them.
    Pass,
    /// Goes to overlayd: redirected to the egress of this TAP, which overlayd reads.
    Steer { tap: String },
}

/// One tc filter.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hook {
    pub dev: String,
    pub direction: Direction,
    pub action: Action,
    pub dst: Option<Ipv4Network>,
    pub protocol: Option<PublishProtocol>,
    pub port: Option<Port>,
}

impl Hook {
    /// The filter's selector and action, as `tc filter add dev DEV DIRECTION pref P` takes them.
    ///
    /// `u32` with no action falls through to the next filter unless it is terminal, and this
    /// kernel has no `act_gact` for `action pass`: a `classid` makes it terminal, and on `clsact`
    /// a terminal match without actions lets the packet pass (TC_ACT_OK).
    pub fn tc_args(&self) -> Vec<String> {
        let mut args: Vec<String> = ["protocol", "ip", "u32"].map(String::from).into();
        let mut matches = |words: &[&str]| {
            args.push("match".into());
            args.extend(words.iter().map(|w| w.to_string()));
        };
        if let Some(dst) = self.dst {
            matches(&["ip", "dst", &dst.to_string()]);
        }
        if let Some(protocol) = self.protocol {
            matches(&["ip", "protocol", &ip_protocol(protocol).to_string(), "0xff"]);
        }
        match self.port {
            Some(Port::Dst(p)) => matches(&["ip", "dport", &p.to_string(), "0xffff"]),
            Some(Port::Src(p)) => {
                matches(&["ip", "sport", &p.to_string(), "0xffff"]);
                // Only what a container sent (its MAC starts 02:42; the source MAC sits 8 bytes
                // before the IP header): a frame overlayd hands back to the node's stack
                // carries the container's proxy MAC (06:42) and is not steered again.
                matches(&["u16", "0x0242", "0xffff", "at", "-8"]);
            }
            None => {}
        }
        match &self.action {
            Action::Pass => args.extend(["classid", "1:1"].map(String::from)),
            Action::Steer { tap } => args.extend(
                [
                    "action",
                    "mirred",
                    "egress",
                    "redirect",
                    "dev",
                    tap.as_str(),
                ]
                .map(String::from),
            ),
        }
        args
    }

    /// The TAP this hook sends to, if it steers.
    pub fn tap(&self) -> Option<&str> {
        match &self.action {
            Action::Steer { tap } => Some(tap),
            Action::Pass => None,
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.dev,
            self.direction.as_str(),
            self.tc_args().join(" ")
        )
    }
}

fn ip_protocol(protocol: PublishProtocol) -> u8 {
    match protocol {
        PublishProtocol::Tcp => 6,
        PublishProtocol::Udp => 17,
    }
}

/// A port the daemon holds a socket on: TCP bound but not listening, or UDP bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Reservation {
    pub protocol: PublishProtocol,
    pub port: u16,
    /// `0.0.0.0` unless the publish names an address.
    pub addr: Ipv4Addr,
}

impl fmt::Display for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let protocol = match self.protocol {
            PublishProtocol::Tcp => "tcp",
            PublishProtocol::Udp => "udp",
        };
        if self.addr.is_unspecified() {
            write!(f, "{}/{protocol}", self.port)
        } else {
            write!(f, "{}:{}/{protocol}", self.addr, self.port)
        }
    }
}

/// A published port on this node: the service it is for and the hooks that steer it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claim {
    pub service: String,
    pub hooks: BTreeSet<Hook>,
    /// A TCP port with `proxy=v2`: the daemon's proxy listens on it, which holds it, and no
    /// hook steers it (a PROXY header is bytes in the stream, which the NAT cannot add).
    pub proxy: bool,
}

/// This node, as the hooks need it.
pub struct Host<'a> {
    pub id: &'a str,
    /// The node's advertise address and the interface that holds it.
    pub address: Ipv4Addr,
    pub underlay: &'a str,
    /// Interfaces of the addresses publishes name (`--publish ADDR:PUB:TARGET`), where this node
    /// holds them.
    pub addresses: &'a BTreeMap<Ipv4Addr, String>,
    /// Ids of the networks whose bridge and TAP exist here: hooks only go to TAPs that exist.
    pub realised: &'a BTreeSet<String>,
}

/// What this node should have.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ports: BTreeMap<Reservation, Claim>,
    /// The reply path (bridge ingress), not tied to one port.
    pub replies: BTreeSet<Hook>,
    /// Publishes that want a port another service already has here, as (service, port). The
    /// registry refuses such publishes; this only keeps the first if one slips through.
    pub conflicts: Vec<(String, Reservation)>,
}

/// Every address a publish names (`--publish ADDR:...`): the caller looks up which of them this
/// node holds before calling [`plan`].
pub fn named_addresses(view: &View) -> BTreeSet<Ipv4Addr> {
    view.services
        .values()
        .flat_map(|s| &s.publish)
        .filter_map(|p| p.addr)
        .collect()
}

/// The hooks and reservations `host` should have for the view.
///
/// A publish applies to this node when its network is realised here, when (mode=host) a task of
/// its service runs here, and when its address, if it names one, is this node's. The reply path
/// is needed only where tasks of a publishing service run.
pub fn plan(view: &View, host: &Host) -> Plan {
    let mut plan = Plan::default();
    for service in view.services.values() {
        let Some(net) = view.networks.values().find(|n| n.id == service.network_id) else {
            continue;
        };
        if !host.realised.contains(&net.id) {
            continue;
        }
        let tap = net.tap_name();
        let local_task = view
            .tasks
            .iter()
            .any(|t| t.service == service.name && t.node == host.id);
        let applying = service.publish.iter().filter(|p| {
            (p.mode == PublishMode::Ingress || local_task)
                && p.addr.is_none_or(|a| host.addresses.contains_key(&a))
        });
        for publish in applying {
            let reservation = Reservation {
                protocol: publish.protocol,
                port: publish.published,
                addr: publish.addr.unwrap_or(Ipv4Addr::UNSPECIFIED),
            };
            let proxy = publish.proxy.is_some() && publish.protocol == PublishProtocol::Tcp;
            let hooks = if proxy {
                BTreeSet::new()
            } else {
                port_hooks(publish, host, &tap)
            };
            match plan.ports.get(&reservation) {
                Some(claim)
                    if claim.service != service.name
                        || claim.hooks != hooks
                        || claim.proxy != proxy =>
                {
                    plan.conflicts.push((service.name.clone(), reservation));
                }
                Some(_) => {}
                None => {
                    let claim = Claim {
                        service: service.name.clone(),
                        hooks,
                        proxy,
                    };
                    plan.ports.insert(reservation, claim);
                }
            }
        }
        // A local task answers every publish of its service, also one whose address another
        // node holds: that node sent it the connection and waits for the answers.
        if local_task {
            let bridge = net.bridge_name();
            for publish in &service.publish {
                plan.replies.insert(Hook {
                    dev: bridge.clone(),
                    direction: Direction::Ingress,
                    action: Action::Pass,
                    dst: Some(net.subnet),
                    protocol: None,
                    port: None,
                });
                plan.replies.insert(Hook {
                    dev: bridge.clone(),
                    direction: Direction::Ingress,
                    action: Action::Steer { tap: tap.clone() },
                    dst: None,
                    protocol: Some(publish.protocol),
                    port: Some(Port::Src(publish.target)),
                });
            }
        }
    }
    plan
}

/// The hooks that steer one published port: from outside on the interface holding the address,
/// from the node itself on `lo`.
fn port_hooks(publish: &Publish, host: &Host, tap: &str) -> BTreeSet<Hook> {
    let steer = |dev: &str, direction, dst: Option<Ipv4Addr>| Hook {
        dev: dev.to_string(),
        direction,
        action: Action::Steer {
            tap: tap.to_string(),
        },
        dst: dst.map(Ipv4Network::from),
        protocol: Some(publish.protocol),
        port: Some(Port::Dst(publish.published)),
    };
    let (outside_dev, outside_dst) = match publish.addr {
        Some(addr) => (host.addresses.get(&addr).map(String::as_str), addr),
        None => (Some(host.underlay), host.address),
    };
    let mut hooks = BTreeSet::new();
    // An address on `lo` (127.0.0.1, say) is reached from the node only: `lo` egress has it.
    if let Some(dev) = outside_dev.filter(|d| *d != "lo") {
        hooks.insert(steer(dev, Direction::Ingress, Some(outside_dst)));
    }
    hooks.insert(steer("lo", Direction::Egress, publish.addr));
    hooks
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cluster::TaskRef;
    use crate::model::{Affinity, Mode, Network, Service};

    const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

    pub(crate) fn network(id: &str, vni: u32, subnet: &str) -> Network {
        Network {
            id: id.into(),
            name: format!("net-{id}"),
            subnet: subnet.parse().unwrap(),
            vni,
            mtu: 1450,
            vteps: vec![],
            internal: false,
            encrypted: false,
            key_epoch: 0,
        }
    }

    pub(crate) fn publish(published: u16, target: u16, protocol: PublishProtocol) -> Publish {
        Publish {
            published,
            target,
            protocol,
            mode: PublishMode::Ingress,
            addr: None,
            affinity: Affinity::None,
            proxy: None,
        }
    }

    /// Networks `a` (vni 100) and `b` (vni 200), both realised here, and `services` as
    /// (name, network id, publishes, nodes of its tasks).
    fn view(services: Vec<(&str, &str, Vec<Publish>, Vec<&str>)>) -> View {
        let mut view = View::default();
        for net in [
            network("a", 100, "198.19.1.0/24"),
            network("b", 200, "198.19.2.0/24"),
        ] {
            view.networks.insert(net.name.clone(), net);
        }
        for (i, (name, network_id, publish, nodes)) in services.into_iter().enumerate() {
            for (j, node) in nodes.into_iter().enumerate() {
                view.tasks.push(TaskRef {
                    service: name.into(),
                    network_id: network_id.into(),
                    ip: Ipv4Addr::new(198, 19, 9, (10 * i + j + 2) as u8),
                    node: node.into(),
                });
            }
            let service = Service {
                name: name.into(),
                network_id: network_id.into(),
                mode: Mode::Vip,
                vip: None,
                health: None,
                publish,
            };
            view.services.insert(name.into(), service);
        }
        view
    }

    fn plan_on(view: &View, addresses: &[(Ipv4Addr, &str)], realised: &[&str]) -> Plan {
        let addresses = addresses.iter().map(|(a, d)| (*a, d.to_string())).collect();
        let realised = realised.iter().map(|s| s.to_string()).collect();
        plan(
            view,
            &Host {
                id: "me",
                address: NODE,
                underlay: "eth0",
                addresses: &addresses,
                realised: &realised,
            },
        )
    }

    /// Every hook of the plan as its tc line, sorted.
    fn lines(plan: &Plan) -> Vec<String> {
        let mut lines: Vec<String> = plan
            .ports
            .values()
            .flat_map(|c| &c.hooks)
            .chain(&plan.replies)
            .map(Hook::to_string)
            .collect();
        lines.sort();
        lines
    }

    fn tcp(port: u16) -> Reservation {
        Reservation {
            protocol: PublishProtocol::Tcp,
            port,
            addr: Ipv4Addr::UNSPECIFIED,
        }
    }

    #[test]
    fn an_ingress_publish_is_steered_on_every_node_and_replies_only_where_tasks_run() {
        let v = view(vec![(
            "search",
            "a",
            vec![publish(9200, 80, PublishProtocol::Tcp)],
            vec!["other"],
        )]);
        let p = plan_on(&v, &[], &["a", "b"]);
        assert_eq!(p.ports.keys().copied().collect::<Vec<_>>(), [tcp(9200)]);
        assert_eq!(p.ports[&tcp(9200)].service, "search");
        assert_eq!(
            lines(&p),
            [
                "eth0 ingress: protocol ip u32 match ip dst 198.18.0.1/32 match ip protocol 6 0xff match ip dport 9200 0xffff action mirred egress redirect dev ovtap-100",
                "lo egress: protocol ip u32 match ip protocol 6 0xff match ip dport 9200 0xffff action mirred egress redirect dev ovtap-100",
            ],
            "no task here: no reply hooks"
        );
        let v = view(vec![(
            "search",
            "a",
            vec![publish(9200, 80, PublishProtocol::Tcp)],
            vec!["me", "other"],
        )]);
        let p = plan_on(&v, &[], &["a"]);
        let replies: Vec<String> = p.replies.iter().map(Hook::to_string).collect();
        assert_eq!(
            replies,
            [
                "ovbr-100 ingress: protocol ip u32 match ip dst 198.19.1.0/24 classid 1:1",
                "ovbr-100 ingress: protocol ip u32 match ip protocol 6 0xff match ip sport 80 0xffff match u16 0x0242 0xffff at -8 action mirred egress redirect dev ovtap-100",
            ],
            "the subnet passes, ordered before the steering"
        );
    }

    #[test]
    fn a_proxy_port_is_held_for_the_proxy_without_port_hooks_but_with_reply_hooks() {
        let mut proxied = publish(9300, 80, PublishProtocol::Tcp);
        proxied.proxy = Some(crate::model::ProxyProtocol::V2);
        let v = view(vec![("api", "a", vec![proxied], vec!["me"])]);
        let p = plan_on(&v, &[], &["a"]);
        let claim = &p.ports[&tcp(9300)];
        assert!(claim.proxy);
        assert!(claim.hooks.is_empty(), "{:?}", claim.hooks);
        let plain = view(vec![(
            "api",
            "a",
            vec![publish(9300, 80, PublishProtocol::Tcp)],
            vec!["me"],
        )]);
        let plain = plan_on(&plain, &[], &["a"]);
        assert!(!plain.ports[&tcp(9300)].proxy);
        assert!(!plain.ports[&tcp(9300)].hooks.is_empty());
        assert_eq!(
            p.replies, plain.replies,
            "the proxy's connections to a task here are answered through the mesh"
        );
    }

    #[test]
    fn host_mode_applies_only_where_a_task_runs() {
        let mut host_mode = publish(8080, 80, PublishProtocol::Tcp);
        host_mode.mode = PublishMode::Host;
        let elsewhere = view(vec![("web", "a", vec![host_mode.clone()], vec!["other"])]);
        assert_eq!(plan_on(&elsewhere, &[], &["a"]), Plan::default());
        let here = view(vec![("web", "a", vec![host_mode], vec!["me"])]);
        let p = plan_on(&here, &[], &["a"]);
        assert_eq!(p.ports.keys().copied().collect::<Vec<_>>(), [tcp(8080)]);
        assert_eq!(p.replies.len(), 2);
    }

    #[test]
    fn nothing_goes_to_a_network_not_made_here() {
        let v = view(vec![(
            "search",
            "a",
            vec![publish(9200, 80, PublishProtocol::Tcp)],
            vec!["me"],
        )]);
        assert_eq!(plan_on(&v, &[], &["b"]), Plan::default());
    }

    #[test]
    fn an_address_bound_publish_is_steered_on_the_interface_holding_it_and_only_there() {
        let addr = Ipv4Addr::new(198, 18, 7, 7);
        let mut bound = publish(53, 5353, PublishProtocol::Udp);
        bound.addr = Some(addr);
        let v = view(vec![("dns", "b", vec![bound], vec!["me"])]);
        let elsewhere = plan_on(&v, &[], &["b"]);
        assert_eq!(elsewhere.ports.len(), 0, "not this node's address: no port");
        assert_eq!(
            elsewhere.replies.len(),
            2,
            "the node holding it sends the task here connections: its answers go back"
        );
        let p = plan_on(&v, &[(addr, "eth1")], &["b"]);
        let held = Reservation {
            protocol: PublishProtocol::Udp,
            port: 53,
            addr,
        };
        assert_eq!(p.ports.keys().copied().collect::<Vec<_>>(), [held]);
        assert_eq!(held.to_string(), "198.18.7.7:53/udp");
        let hooks: Vec<String> = p.ports[&held].hooks.iter().map(Hook::to_string).collect();
        assert_eq!(
            hooks,
            [
                "eth1 ingress: protocol ip u32 match ip dst 198.18.7.7/32 match ip protocol 17 0xff match ip dport 53 0xffff action mirred egress redirect dev ovtap-200",
                "lo egress: protocol ip u32 match ip dst 198.18.7.7/32 match ip protocol 17 0xff match ip dport 53 0xffff action mirred egress redirect dev ovtap-200",
            ]
        );
        let loopback = Ipv4Addr::LOCALHOST;
        let mut local = publish(9000, 80, PublishProtocol::Tcp);
        local.addr = Some(loopback);
        let v = view(vec![("admin", "a", vec![local], vec![])]);
        let p = plan_on(&v, &[(loopback, "lo")], &["a"]);
        assert_eq!(
            lines(&p),
            [
                "lo egress: protocol ip u32 match ip dst 127.0.0.1/32 match ip protocol 6 0xff match ip dport 9000 0xffff action mirred egress redirect dev ovtap-100"
            ],
            "an address on lo gets no ingress hook"
        );
    }

    #[test]
    fn services_sharing_a_target_port_share_reply_hooks_per_protocol() {
        let v = view(vec![
            (
                "one",
                "a",
                vec![
                    publish(9200, 80, PublishProtocol::Tcp),
                    publish(9200, 80, PublishProtocol::Udp),
                ],
                vec!["me"],
            ),
            (
                "two",
                "a",
                vec![publish(9300, 80, PublishProtocol::Tcp)],
                vec!["me"],
            ),
            (
                "three",
                "b",
                vec![publish(9400, 80, PublishProtocol::Tcp)],
                vec!["me"],
            ),
        ]);
        let p = plan_on(&v, &[], &["a", "b"]);
        assert_eq!(p.ports.len(), 4, "{:?}", p.ports.keys());
        let replies: Vec<String> = p.replies.iter().map(Hook::to_string).collect();
        assert_eq!(
            replies,
            [
                "ovbr-100 ingress: protocol ip u32 match ip dst 198.19.1.0/24 classid 1:1",
                "ovbr-100 ingress: protocol ip u32 match ip protocol 6 0xff match ip sport 80 0xffff match u16 0x0242 0xffff at -8 action mirred egress redirect dev ovtap-100",
                "ovbr-100 ingress: protocol ip u32 match ip protocol 17 0xff match ip sport 80 0xffff match u16 0x0242 0xffff at -8 action mirred egress redirect dev ovtap-100",
                "ovbr-200 ingress: protocol ip u32 match ip dst 198.19.2.0/24 classid 1:1",
                "ovbr-200 ingress: protocol ip u32 match ip protocol 6 0xff match ip sport 80 0xffff match u16 0x0242 0xffff at -8 action mirred egress redirect dev ovtap-200",
            ]
        );
        assert!(p.conflicts.is_empty());
    }

    #[test]
    fn a_port_published_twice_goes_to_the_first_service_and_the_other_is_a_conflict() {
        let v = view(vec![
            (
                "alpha",
                "a",
                vec![publish(9200, 80, PublishProtocol::Tcp)],
                vec![],
            ),
            (
                "beta",
                "b",
                vec![publish(9200, 81, PublishProtocol::Tcp)],
                vec![],
            ),
        ]);
        let p = plan_on(&v, &[], &["a", "b"]);
        assert_eq!(p.ports[&tcp(9200)].service, "alpha");
        assert!(
            p.ports[&tcp(9200)]
                .hooks
                .iter()
                .all(|h| h.tap() == Some("ovtap-100"))
        );
        assert_eq!(p.conflicts, [("beta".to_string(), tcp(9200))]);
    }
}
