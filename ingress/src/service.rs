//! The service table as the data path sees it: an immutable snapshot, built by the control
//! plane whenever a service, a task or a task's health changes, and swapped in whole.
//!
//! Services are keyed by VIP alone. In Swarm's VIP mode a service's VIP balances every port,
//! TCP and UDP, to the same port on the chosen task (IPVS matches a firewall mark per VIP, not
//! a port), and a VIP belongs to one service. So the per-packet question "is this to a
//! service?" is one hash lookup of the destination address, and the NAT keeps the port.
//! Published ports (the next issue) are keyed by protocol and port instead and get their own
//! map.
//!
//! Each service carries all its backends (for `service ps` and to tell a removed task from an
//! unhealthy one) and a Maglev table built over the healthy ones only: a task gets new flows
//! only while healthy, and every node, building from the same set, picks the same task for
//! the same flow.

use crate::flow::Tuple;
use crate::{Protocol, Vip, maglev};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

/// A task's health as the node running it reports it; `service ps` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Attached, its health check has not passed yet.
    Starting,
    /// Gets new flows. A task without a health check is healthy once attached.
    Healthy,
    /// Its health check fails: no new flows; flows already on it stay.
    Unhealthy,
    /// Its node is gone: no new flows; the balancer resets the flows on it once the node has
    /// stayed gone for `balancer::DOWN_GRACE` (a restarted node is back before).
    Down,
}

/// One task of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// The task's overlay address: NAT rewrites the VIP to it, keeping the port.
    pub addr: Ipv4Addr,
    /// The underlay address of the node running the task.
    pub node: Ipv4Addr,
    pub health: Health,
}

/// A port a service publishes on the nodes (the routing mesh), as the data path needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Port {
    pub protocol: Protocol,
    /// The port clients connect to, on a node's address.
    pub published: u16,
    /// The port on the task it is rewritten to.
    pub target: u16,
    /// Only connections to this address; to any address of the node otherwise.
    pub addr: Option<Ipv4Addr>,
    /// The task is chosen by the client's address alone (`affinity=client-ip`), so that a
    /// client always lands on the same one; by the whole flow otherwise.
    pub client_affinity: bool,
    /// Only this node's own tasks take the port's flows (Swarm's `mode=host`).
    pub local_only: bool,
}

/// The choice of a task for a new flow, and the hash that made it. A pure function of the
/// snapshot and the flow: the data path tracks the task it names, `overlayd trace` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub hash: u64,
    /// `None` when no task can take the flow.
    pub task: Option<Backend>,
}

impl Port {
    /// The task a new flow to this port of `service` goes to (at port `target`): by Maglev
    /// over the healthy tasks, hashing the whole flow or (`affinity=client-ip`) the client's
    /// address only, or (`mode=host`) among the healthy tasks on the node at `node`.
    pub fn choose(&self, service: &Service, flow: &Tuple, node: Ipv4Addr) -> Choice {
        let hash = if self.client_affinity {
            flow.client_hash()
        } else {
            flow.stable_hash()
        };
        let task = if self.local_only {
            service.pick_local(hash, node)
        } else {
            service.pick(hash)
        };
        Choice { hash, task }
    }
}

/// A service as the control plane describes it, input to [`Table::build`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    pub vip: Vip,
    pub backends: Vec<Backend>,
    pub ports: Vec<Port>,
}

/// Why a snapshot was not built. Nothing is built in any case; the previous snapshot stays.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Two services have the same VIP.
    #[error("services {first} and {second} both have VIP {vip}")]
    DuplicateVip {
        vip: Ipv4Addr,
        first: String,
        second: String,
    },
    /// The data path balances IPv4 only, for now.
    #[error("service {service}: VIP {vip} is not IPv4")]
    NotIpv4 { service: String, vip: IpAddr },
    /// A task address appears twice in one service.
    #[error("service {service}: task {addr} is listed twice")]
    DuplicateBackend { service: String, addr: Ipv4Addr },
    /// Two services publish the same port of the same protocol on addresses that overlap.
    #[error("services {first} and {second} both publish {port}/{protocol:?}")]
    DuplicatePort {
        protocol: Protocol,
        port: u16,
        first: String,
        second: String,
    },
    /// The Maglev table for the service's healthy tasks could not be built.
    #[error("service {service}: {source}")]
    Maglev {
        service: String,
        source: maglev::Error,
    },
}

/// One service in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    name: Box<str>,
    vip: Ipv4Addr,
    /// Every task, sorted by address.
    backends: Box<[Backend]>,
    /// The healthy tasks; the Maglev table answers positions in this slice.
    healthy: Box<[Backend]>,
    maglev: maglev::Table,
}

impl Service {
    fn build(size: maglev::Size, spec: Spec) -> Result<Service, Error> {
        let vip = match spec.vip.0 {
            IpAddr::V4(v4) => v4,
            other => {
                return Err(Error::NotIpv4 {
                    service: spec.name,
                    vip: other,
                });
            }
        };
        let mut backends = spec.backends;
        backends.sort_by_key(|b| b.addr);
        if let Some(w) = backends.windows(2).find(|w| w[0].addr == w[1].addr) {
            return Err(Error::DuplicateBackend {
                addr: w[0].addr,
                service: spec.name,
            });
        }
        let healthy: Box<[Backend]> = backends
            .iter()
            .filter(|b| b.health == Health::Healthy)
            .copied()
            .collect();
        let keys: Vec<[u8; 4]> = healthy.iter().map(|b| b.addr.octets()).collect();
        let maglev = match maglev::Table::build(size, &keys) {
            Ok(t) => t,
            Err(source) => {
                return Err(Error::Maglev {
                    service: spec.name,
                    source,
                });
            }
        };
        Ok(Service {
            name: spec.name.into(),
            vip,
            backends: backends.into(),
            healthy,
            maglev,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn vip(&self) -> Vip {
        Vip(IpAddr::V4(self.vip))
    }

    /// Every task, healthy or not, sorted by address.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The task for a new flow, from the stable hash of its original tuple
    /// ([`crate::flow::Tuple::stable_hash`]); `None` when no task is healthy (answer with a
    /// TCP RST or ICMP port unreachable). O(1), no allocation.
    pub fn pick(&self, flow_hash: u64) -> Option<Backend> {
        let i = self.maglev.lookup(flow_hash)?;
        self.healthy.get(i).copied()
    }

    /// The task a new flow to the VIP goes to: Maglev over the healthy tasks, by the stable
    /// hash of the tuple the client sent.
    pub fn choose(&self, flow: &Tuple) -> Choice {
        let hash = flow.stable_hash();
        Choice {
            hash,
            task: self.pick(hash),
        }
    }

    /// Like [`Service::pick`], among the healthy tasks on the node at `node` only (a
    /// `mode=host` port: no other node needs to agree). O(tasks), for a flow's first packet.
    pub fn pick_local(&self, flow_hash: u64, node: Ipv4Addr) -> Option<Backend> {
        let local = || self.healthy.iter().filter(|b| b.node == node);
        let count = local().count() as u64;
        if count == 0 {
            return None;
        }
        local().nth((flow_hash % count) as usize).copied()
    }

    /// The task with this address, if it is still one of the service's.
    pub fn backend(&self, addr: Ipv4Addr) -> Option<&Backend> {
        self.backends
            .binary_search_by_key(&addr, |b| b.addr)
            .ok()
            .and_then(|i| self.backends.get(i))
    }
}

/// The snapshot: every service, by VIP, and every published port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    by_vip: HashMap<Ipv4Addr, Service>,
    /// Published ports by protocol and port: each with the VIP of its service (several only
    /// when bound to different addresses).
    published: HashMap<(Protocol, u16), Vec<(Port, Ipv4Addr)>>,
    /// Every task address of every service: only packets from one can be replies of a
    /// balanced flow.
    tasks: HashSet<Ipv4Addr>,
}

impl Table {
    /// Builds the snapshot, each service's Maglev table of `size` slots. The same specs build
    /// the same table on every node, whatever their order and the order of their backends.
    pub fn build(
        size: maglev::Size,
        specs: impl IntoIterator<Item = Spec>,
    ) -> Result<Table, Error> {
        let mut by_vip: HashMap<Ipv4Addr, Service> = HashMap::new();
        let mut published: HashMap<(Protocol, u16), Vec<(Port, Ipv4Addr)>> = HashMap::new();
        for mut spec in specs {
            let ports = std::mem::take(&mut spec.ports);
            let service = Service::build(size, spec)?;
            if let Some(other) = by_vip.get(&service.vip) {
                return Err(Error::DuplicateVip {
                    vip: service.vip,
                    first: other.name.to_string(),
                    second: service.name.to_string(),
                });
            }
            for port in ports {
                let same = published
                    .entry((port.protocol, port.published))
                    .or_default();
                let overlapping = same.iter().find(|(other, _)| {
                    other.addr.is_none() || port.addr.is_none() || other.addr == port.addr
                });
                if let Some((_, vip)) = overlapping {
                    return Err(Error::DuplicatePort {
                        protocol: port.protocol,
                        port: port.published,
                        first: by_vip
                            .get(vip)
                            .map_or_else(|| service.name.to_string(), |s| s.name.to_string()),
                        second: service.name.to_string(),
                    });
                }
                same.push((port, service.vip));
            }
            by_vip.insert(service.vip, service);
        }
        let tasks = by_vip
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.addr))
            .collect();
        Ok(Table {
            by_vip,
            published,
            tasks,
        })
    }

    /// Every service, in no order.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.by_vip.values()
    }

    /// The services `task` is a task of, each with its VIP.
    pub fn services_of(&self, task: Ipv4Addr) -> impl Iterator<Item = (Ipv4Addr, &Service)> {
        self.by_vip
            .iter()
            .filter(move |(_, s)| s.backend(task).is_some())
            .map(|(vip, s)| (*vip, s))
    }

    /// Whether `task` is a task of some service whose node is down.
    pub fn is_down(&self, task: Ipv4Addr) -> bool {
        self.services_of(task)
            .any(|(_, s)| s.backend(task).is_some_and(|b| b.health == Health::Down))
    }

    /// Whether `addr` is a task of some service.
    pub fn is_backend(&self, addr: Ipv4Addr) -> bool {
        self.tasks.contains(&addr)
    }

    /// The service whose VIP is `dst`, for any port and protocol.
    pub fn service_for(&self, dst: Ipv4Addr) -> Option<&Service> {
        self.by_vip.get(&dst)
    }

    /// The published port a connection to `dst` (one of this node's addresses) is for, and
    /// its service: one bound to every address, or to `dst` itself (the two never overlap).
    pub fn published(&self, protocol: Protocol, dst: SocketAddrV4) -> Option<(&Service, Port)> {
        let ports = self.published.get(&(protocol, dst.port()))?;
        let (port, vip) = ports
            .iter()
            .find(|(p, _)| p.addr.is_none_or(|a| a == *dst.ip()))?;
        Some((self.by_vip.get(vip)?, *port))
    }

    /// The task, and the port on it, for a connection from `client` to the published port at
    /// `dst` on the node at `node`: the choice the data path makes for the same connection.
    /// `None` when `dst` is not published or no task can take it.
    pub fn pick_published(
        &self,
        protocol: Protocol,
        dst: SocketAddrV4,
        client: SocketAddrV4,
        node: Ipv4Addr,
    ) -> Option<(Backend, u16)> {
        let (service, port) = self.published(protocol, dst)?;
        let task = port
            .choose(service, &Tuple::new(protocol, client, dst), node)
            .task?;
        Some((task, port.target))
    }

    pub fn len(&self) -> usize {
        self.by_vip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_vip.is_empty()
    }

    /// Task addresses whose flows must be reset when `next` replaces this snapshot: tasks
    /// that are in no service of `next`, or are [`Health::Down`] there (the balancer resets the
    /// latter after a grace). Unhealthy tasks keep their flows. Hand each to
    /// [`crate::conntrack::Table::remove_backend`].
    pub fn removed_backends(&self, next: &Table) -> Vec<Ipv4Addr> {
        let alive: HashSet<Ipv4Addr> = next
            .by_vip
            .values()
            .flat_map(|s| s.backends.iter())
            .filter(|b| b.health != Health::Down)
            .map(|b| b.addr)
            .collect();
        let mut removed: Vec<Ipv4Addr> = self
            .by_vip
            .values()
            .flat_map(|s| s.backends.iter())
            .filter(|b| b.health != Health::Down && !alive.contains(&b.addr))
            .map(|b| b.addr)
            .collect();
        removed.sort();
        removed.dedup();
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Protocol;
    use crate::flow::Tuple;
    use proptest::prelude::*;

    const WEB: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);

    fn size() -> maglev::Size {
        maglev::Size::new(4099).unwrap()
    }

    fn task(host: u8, health: Health) -> Backend {
        Backend {
            addr: Ipv4Addr::new(198, 19, 0, host),
            node: Ipv4Addr::new(198, 18, 0, host % 3 + 1),
            health,
        }
    }

    fn web(backends: Vec<Backend>) -> Spec {
        Spec {
            name: "web".into(),
            vip: Vip(IpAddr::V4(WEB)),
            backends,
            ports: Vec::new(),
        }
    }

    fn flow(sport: u16) -> u64 {
        Tuple::new(
            Protocol::Tcp,
            SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 200), sport),
            SocketAddrV4::new(WEB, 80),
        )
        .stable_hash()
    }

    /// A snapshot with one service, `web`, and tasks 198.19.0.`host` in the given health.
    fn web_table(tasks: &[(u8, Health)]) -> Table {
        let backends = tasks.iter().map(|&(host, h)| task(host, h)).collect();
        Table::build(size(), [web(backends)]).unwrap()
    }

    /// Which task each of many flows picks.
    fn picks(service: &Service) -> Vec<Option<Ipv4Addr>> {
        (0..2000)
            .map(|p| service.pick(flow(p)).map(|b| b.addr))
            .collect()
    }

    fn port(published: u16, addr: Option<[u8; 4]>) -> Port {
        Port {
            protocol: Protocol::Tcp,
            published,
            target: 80,
            addr: addr.map(Ipv4Addr::from),
            client_affinity: false,
            local_only: false,
        }
    }

    #[test]
    fn a_published_port_is_found_by_protocol_port_and_bound_address() {
        let api = Spec {
            name: "api".into(),
            vip: Vip(IpAddr::V4(Ipv4Addr::new(198, 19, 255, 2))),
            backends: vec![],
            ports: vec![port(9300, Some([198, 18, 0, 1]))],
        };
        let web = Spec {
            ports: vec![port(9200, None), port(8080, None)],
            ..web(vec![])
        };
        let t = Table::build(size(), [web, api]).unwrap();
        let to = |a: [u8; 4], p| SocketAddrV4::new(a.into(), p);
        let name = |dst| t.published(Protocol::Tcp, dst).map(|(s, _)| s.name());
        assert_eq!(name(to([198, 18, 0, 1], 9300)), Some("api"));
        assert_eq!(name(to([198, 18, 0, 2], 9300)), None);
        assert_eq!(name(to([198, 18, 0, 2], 9200)), Some("web"));
        assert_eq!(name(to([127, 0, 0, 1], 8080)), Some("web"));
        assert_eq!(name(to([198, 18, 0, 1], 9201)), None);
        assert!(
            t.published(Protocol::Udp, to([198, 18, 0, 1], 9200))
                .is_none()
        );
    }

    #[test]
    fn a_published_connection_picks_a_healthy_task_at_the_target_port() {
        let two = Spec {
            ports: vec![port(9300, None)],
            ..web(vec![task(1, Health::Healthy), task(2, Health::Unhealthy)])
        };
        let t = Table::build(size(), [two]).unwrap();
        let node = Ipv4Addr::new(198, 18, 0, 1);
        let dst = SocketAddrV4::new(node, 9300);
        let client = |p| SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 200), p);
        for p in 40_000..40_050 {
            let picked = t.pick_published(Protocol::Tcp, dst, client(p), node);
            assert_eq!(picked, Some((task(1, Health::Healthy), 80)));
        }
        let other_port = SocketAddrV4::new(node, 9301);
        assert_eq!(
            t.pick_published(Protocol::Tcp, other_port, client(1), node),
            None
        );
        assert_eq!(t.pick_published(Protocol::Udp, dst, client(1), node), None);
        let sick = Spec {
            ports: vec![port(9300, None)],
            ..web(vec![task(2, Health::Unhealthy)])
        };
        let t = Table::build(size(), [sick]).unwrap();
        assert_eq!(t.pick_published(Protocol::Tcp, dst, client(1), node), None);
    }

    #[test]
    fn two_services_cannot_publish_one_port_on_overlapping_addresses() {
        let api = |addr| Spec {
            name: "api".into(),
            vip: Vip(IpAddr::V4(Ipv4Addr::new(198, 19, 255, 2))),
            backends: vec![],
            ports: vec![port(9200, addr)],
        };
        let web = |addr| Spec {
            ports: vec![port(9200, addr)],
            ..web(vec![])
        };
        for (a, b) in [
            (None, None),
            (Some([198, 18, 0, 1]), None),
            (None, Some([198, 18, 0, 1])),
        ] {
            assert!(matches!(
                Table::build(size(), [web(a), api(b)]),
                Err(Error::DuplicatePort { port: 9200, .. })
            ));
        }
        let apart = [web(Some([198, 18, 0, 1])), api(Some([198, 18, 0, 2]))];
        assert!(Table::build(size(), apart).is_ok());
    }

    #[test]
    fn found_by_vip_whatever_the_port_or_protocol() {
        let t = web_table(&[(1, Health::Healthy)]);
        let s = t.service_for(WEB).unwrap();
        assert_eq!((s.name(), s.vip()), ("web", Vip(IpAddr::V4(WEB))));
        assert_eq!(t.service_for(Ipv4Addr::new(198, 19, 255, 2)), None);
        assert_eq!(t.service_for(task(1, Health::Healthy).addr), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn only_healthy_tasks_get_flows() {
        let t = web_table(&[
            (1, Health::Healthy),
            (2, Health::Starting),
            (3, Health::Healthy),
            (4, Health::Unhealthy),
            (5, Health::Down),
            (6, Health::Healthy),
        ]);
        let s = t.service_for(WEB).unwrap();
        let got: HashSet<_> = picks(s).into_iter().flatten().collect();
        let healthy: HashSet<_> = [1, 3, 6]
            .map(|h| task(h, Health::Healthy).addr)
            .into_iter()
            .collect();
        assert_eq!(got, healthy);
        assert_eq!(s.backends().len(), 6);
        assert_eq!(
            s.backend(task(4, Health::Unhealthy).addr).map(|b| b.health),
            Some(Health::Unhealthy)
        );
        assert_eq!(s.backend(Ipv4Addr::new(198, 19, 0, 7)), None);
    }

    #[test]
    fn no_healthy_task_picks_none() {
        let t = web_table(&[(1, Health::Unhealthy)]);
        assert_eq!(t.service_for(WEB).unwrap().pick(flow(1)), None);
        let t = web_table(&[]);
        assert_eq!(t.service_for(WEB).unwrap().pick(flow(1)), None);
    }

    #[test]
    fn bad_specs_are_refused() {
        let other = Spec {
            name: "api".into(),
            ..web(vec![])
        };
        assert_eq!(
            Table::build(size(), [web(vec![]), other]),
            Err(Error::DuplicateVip {
                vip: WEB,
                first: "web".into(),
                second: "api".into()
            })
        );
        let v6 = Spec {
            vip: Vip("2001:db8::1".parse().unwrap()),
            ..web(vec![])
        };
        assert!(matches!(
            Table::build(size(), [v6]),
            Err(Error::NotIpv4 { .. })
        ));
        let twice = web(vec![task(1, Health::Healthy), task(1, Health::Unhealthy)]);
        assert_eq!(
            Table::build(size(), [twice]),
            Err(Error::DuplicateBackend {
                service: "web".into(),
                addr: task(1, Health::Healthy).addr
            })
        );
        let small = maglev::Size::new(2).unwrap();
        let crowded = web((1..=3).map(|h| task(h, Health::Healthy)).collect());
        assert!(matches!(
            Table::build(small, [crowded]),
            Err(Error::Maglev { .. })
        ));
    }

    #[test]
    fn removed_and_down_tasks_are_reported_once() {
        use Health::{Down, Healthy, Unhealthy};
        let before = web_table(&[(1, Healthy), (2, Healthy), (3, Healthy), (4, Healthy)]);
        let after = web_table(&[(1, Healthy), (3, Unhealthy), (4, Down)]);
        let gone = [task(2, Healthy).addr, task(4, Healthy).addr];
        assert_eq!(before.removed_backends(&after), gone);
        assert!(after.removed_backends(&after).is_empty());
        assert_eq!(before.removed_backends(&Table::default()).len(), 4);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Two nodes building from the same services listed in different orders pick the same
        /// task for every flow, and never one that is not healthy.
        #[test]
        fn every_node_picks_the_same_healthy_task(
            health in prop::collection::vec(0u8..4, 1..20),
            rotate in any::<prop::sample::Index>(),
        ) {
            let states = [Health::Starting, Health::Healthy, Health::Unhealthy, Health::Down];
            let backends: Vec<Backend> = health
                .iter()
                .enumerate()
                .map(|(i, &h)| task(i as u8 + 1, states[usize::from(h)]))
                .collect();
            let mut reordered = backends.clone();
            reordered.rotate_left(rotate.index(backends.len()));
            reordered.reverse();
            let a = Table::build(size(), [web(backends)]).unwrap();
            let b = Table::build(size(), [web(reordered)]).unwrap();
            let (a, b) = (a.service_for(WEB).unwrap(), b.service_for(WEB).unwrap());
            prop_assert_eq!(picks(a), picks(b));
            for addr in picks(a).into_iter().flatten() {
                prop_assert_eq!(a.backend(addr).map(|t| t.health), Some(Health::Healthy));
            }
            let any_healthy = a.backends().iter().any(|t| t.health == Health::Healthy);
            prop_assert_eq!(a.pick(flow(0)).is_some(), any_healthy);
        }
    }
}
