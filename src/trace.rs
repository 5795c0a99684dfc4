//! `overlayd trace`: what this node's data plane would do with one packet, and why.
//!
//! The packet is built as the sender would put it on the wire and handed to the data path's
//! own decision, [`overlay::switch::from_tap`], with a stage that asks the balancer's
//! [`Balancer::explain`] instead of [`Balancer::process`]: the same switching, the same
//! Maglev choice over the same snapshot, the same rewrite, but no flow tracked and nothing
//! counted. What comes out is the MAC table's entry for the destination, the balancer's
//! choice and the hash that made it, and where the frame goes (a VTEP, this node, every
//! peer) or why it is dropped. Pure: the tables and the balancer are passed in.
//!
//! A sender inside the network's subnet is a container on this node: its frame carries its
//! own MAC, and the destination's (the gateway's for an address outside the subnet). A sender
//! outside it is a client of a port published on this node: its frame is what the node's
//! stack hands over, with placeholder MACs no table knows. Learned MACs (external VTEPs) are
//! the workers' own and are not consulted.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Mutex;
use std::time::Instant;

use ingress::balancer::{Balancer, Decision};
use ipnetwork::Ipv4Network;
use overlay::fdb::{Learned, Network};
use overlay::switch::{self, Forward};
use overlay::{Location, Mac};
use packet::checksum;
use serde::{Deserialize, Serialize};

use crate::model::Endpoint;
use crate::services;

/// The client port a probe comes from when none is given.
pub const CLIENT_PORT: u16 = 40000;
/// The MACs a client of a published port is given: locally administered, in no table.
const OUTSIDE_SRC_MAC: Mac = Mac([0x02, 0, 0, 0, 0, 1]);
const OUTSIDE_DST_MAC: Mac = Mac([0x02, 0, 0, 0, 0, 2]);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

/// The packet to trace: a TCP SYN, a UDP datagram or an ICMP echo request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub proto: Proto,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

impl Probe {
    /// A probe from `src` (port [`CLIENT_PORT`] unless given) to `dst`, which needs a port
    /// for TCP and UDP; ICMP takes no ports.
    pub fn new(
        proto: Proto,
        src: (Ipv4Addr, Option<u16>),
        dst: (Ipv4Addr, Option<u16>),
    ) -> Result<Probe, String> {
        let (src_port, dst_port) = match (proto, src.1, dst.1) {
            (Proto::Icmp, None, None) => (0, 0),
            (Proto::Icmp, _, _) => return Err("an ICMP probe takes no ports".into()),
            (_, _, None) => return Err(format!("DST needs a port for {proto:?}: ADDR:PORT")),
            (_, Some(0), _) | (_, _, Some(0)) => return Err("port 0 is no port".into()),
            (_, s, Some(d)) => (s.unwrap_or(CLIENT_PORT), d),
        };
        Ok(Probe {
            proto,
            src: SocketAddrV4::new(src.0, src_port),
            dst: SocketAddrV4::new(dst.0, dst_port),
        })
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.proto {
            Proto::Icmp => write!(f, "icmp {} -> {}", self.src.ip(), self.dst.ip()),
            Proto::Tcp => write!(f, "tcp {} -> {} (SYN)", self.src, self.dst),
            Proto::Udp => write!(f, "udp {} -> {}", self.src, self.dst),
        }
    }
}

/// What `overlayd trace` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    pub network: String,
    pub packet: String,
    /// The frame's destination MAC and what the MAC table says of it.
    pub mac: String,
    pub mac_entry: String,
    /// What the service stage decided, if the frame was its business.
    pub balancer: Option<Balanced>,
    /// Where the frame goes, in words.
    pub verdict: String,
    /// The VTEP it is sent to (one peer; a flood goes to every peer of the network).
    pub vtep: Option<SocketAddrV4>,
    /// Why it is dropped.
    pub drop: Option<String>,
}

/// The balancer's part of a trace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balanced {
    /// `vip` (a new flow to a service address), `published` (a new connection to a published
    /// port) or `tracked` (a flow the connection table already has).
    pub kind: String,
    pub service: Option<String>,
    /// The hash the task was chosen by (Maglev's input), in hex.
    pub hash: Option<String>,
    /// The task address and port the frame is rewritten to; `None`: no task can take it.
    pub task: Option<SocketAddrV4>,
    /// The underlay address of the node running the chosen task.
    pub task_node: Option<Ipv4Addr>,
    /// The tracked flow's state.
    pub state: Option<String>,
}

/// A stage that explains instead of balancing, and keeps what it found.
struct DryRun<'a> {
    balancer: &'a Balancer,
    found: Mutex<Option<Decision>>,
}

impl overlay::Stage for DryRun<'_> {
    fn rewrite(
        &self,
        frame: &mut [u8],
        _: overlay::stage::Checksum,
        origin: overlay::Origin,
        now: Instant,
        reply: &mut [u8],
    ) -> overlay::Verdict {
        let (verdict, decision) =
            self.balancer
                .explain(frame, services::balancer_origin(origin), now, reply);
        if decision != Decision::Untouched {
            *self.found.lock().unwrap_or_else(|e| e.into_inner()) = Some(decision);
        }
        services::stage_verdict(verdict)
    }
}

/// Traces `probe` through network `name` (`subnet`, switched by `net`) on this node.
pub fn trace(
    name: &str,
    subnet: Ipv4Network,
    net: &Network,
    balancer: &Balancer,
    probe: &Probe,
    now: Instant,
) -> Trace {
    let inside = |ip: Ipv4Addr| subnet.contains(ip);
    let (src, dst) = (*probe.src.ip(), *probe.dst.ip());
    let src_mac = if inside(src) {
        Mac(Endpoint::mac_bytes(src))
    } else {
        OUTSIDE_SRC_MAC
    };
    let dst_mac = match (inside(src), inside(dst)) {
        _ if dst == net.gateway() => net.gateway_mac(),
        (_, true) => Mac(Endpoint::mac_bytes(dst)),
        (true, false) => net.gateway_mac(),
        (false, false) => OUTSIDE_DST_MAC,
    };
    let mut frame = build(probe, src_mac, dst_mac);
    let mut reply = [0u8; switch::REPLY_LEN];
    let stage = DryRun {
        balancer,
        found: Mutex::new(None),
    };
    let forward = switch::from_tap(
        &mut frame,
        net,
        &Learned::default(),
        now,
        &mut reply,
        &stage,
        overlay::stage::Checksum::Full,
    );
    let decision = stage.found.into_inner().unwrap_or_else(|e| e.into_inner());
    let (verdict, vtep, drop) = match forward {
        Forward::Remote(vtep) => (
            format!("encapsulated and sent to VTEP {vtep}"),
            Some(vtep),
            None,
        ),
        Forward::Flood => (
            format!(
                "flooded to every peer of the network ({})",
                net.peers().len()
            ),
            None,
            None,
        ),
        Forward::Local if dst_mac == net.gateway_mac() && decision.is_none() => (
            "to this node's own stack through the bridge (egress or the node)".into(),
            None,
            None,
        ),
        Forward::Local => ("delivered to a container on this node".into(), None, None),
        Forward::Reply(_) | Forward::WireReply(_) => {
            (answer(probe.proto, decision.as_ref()).into(), None, None)
        }
        Forward::Wire => ("out of this node's own interfaces".into(), None, None),
        Forward::Drop(reason) => (
            format!("dropped ({})", reason.as_str()),
            None,
            Some(reason.as_str().to_owned()),
        ),
    };
    Trace {
        network: name.to_owned(),
        packet: probe.to_string(),
        mac: dst_mac.to_string(),
        mac_entry: mac_entry(net, dst_mac),
        balancer: decision.and_then(|d| balanced(d, probe.dst.port(), balancer)),
        verdict,
        vtep,
        drop,
    }
}

/// The answer the data path sends a flow with no task to go to.
fn answer(proto: Proto, decision: Option<&Decision>) -> &'static str {
    match (proto, decision) {
        (Proto::Tcp, Some(_)) => "answered with a TCP reset: no task can take it",
        (Proto::Udp, Some(_)) => "answered with ICMP port unreachable: no task can take it",
        _ => "answered by this node (ARP or ND)",
    }
}

/// What the MAC table says of `mac` on `net`.
fn mac_entry(net: &Network, mac: Mac) -> String {
    if mac == net.gateway_mac() {
        return "the gateway (this node's bridge)".into();
    }
    match net.location(mac) {
        Some(Location::Local) => "an endpoint on this node".into(),
        Some(Location::Remote(vtep)) => format!("an endpoint behind VTEP {vtep}"),
        Some(Location::Service) => "a service address (VIP): handed to the balancer".into(),
        None => "no entry".into(),
    }
}

/// The balancer's decision for a probe to port `port`; `None` if it was not its business.
fn balanced(decision: Decision, port: u16, balancer: &Balancer) -> Option<Balanced> {
    let node_of = |task: Ipv4Addr| {
        balancer
            .services()
            .services()
            .find_map(|s| s.backend(task).map(|b| b.node))
    };
    let hex = |hash: u64| Some(format!("{hash:016x}"));
    Some(match decision {
        Decision::Untouched => return None,
        Decision::Tracked { task, state } => Balanced {
            kind: "tracked".into(),
            service: None,
            hash: None,
            task: Some(task),
            task_node: node_of(*task.ip()),
            state: Some(format!("{state:?}")),
        },
        Decision::Vip { service, choice } => Balanced {
            kind: "vip".into(),
            service: Some(service),
            hash: hex(choice.hash),
            // A VIP keeps the port.
            task: choice.task.map(|t| SocketAddrV4::new(t.addr, port)),
            task_node: choice.task.map(|t| t.node),
            state: None,
        },
        Decision::Published {
            service,
            target,
            choice,
        } => Balanced {
            kind: "published".into(),
            service: Some(service),
            hash: hex(choice.hash),
            task: choice.task.map(|t| SocketAddrV4::new(t.addr, target)),
            task_node: choice.task.map(|t| t.node),
            state: None,
        },
    })
}

/// The probe as an Ethernet frame with complete checksums.
fn build(probe: &Probe, src_mac: Mac, dst_mac: Mac) -> Vec<u8> {
    const ETH: usize = 14;
    const IP: usize = 20;
    let (protocol, l4_len) = match probe.proto {
        Proto::Tcp => (6u8, 20usize),
        Proto::Udp => (17, 8),
        Proto::Icmp => (1, 8),
    };
    let mut frame = vec![0u8; ETH + IP + l4_len];
    frame[0..6].copy_from_slice(&dst_mac.0);
    frame[6..12].copy_from_slice(&src_mac.0);
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let (src, dst) = (*probe.src.ip(), *probe.dst.ip());
    packet::ipv4::Repr {
        src,
        dst,
        protocol,
        payload_len: l4_len as u16,
    }
    .emit(&mut frame[ETH..]);
    let l4 = &mut frame[ETH + IP..];
    let check_at = match probe.proto {
        Proto::Tcp => {
            l4[0..2].copy_from_slice(&probe.src.port().to_be_bytes());
            l4[2..4].copy_from_slice(&probe.dst.port().to_be_bytes());
            l4[4..8].copy_from_slice(&1u32.to_be_bytes());
            l4[12] = 5 << 4;
            l4[13] = 0x02; // SYN
            l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
            16
        }
        Proto::Udp => {
            l4[0..2].copy_from_slice(&probe.src.port().to_be_bytes());
            l4[2..4].copy_from_slice(&probe.dst.port().to_be_bytes());
            l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            6
        }
        Proto::Icmp => {
            l4[0] = 8; // echo request
            2
        }
    };
    let pseudo = match probe.proto {
        Proto::Icmp => 0,
        _ => checksum::pseudo_v4(src, dst, protocol, l4_len as u32),
    };
    let check = checksum::finish(pseudo + checksum::sum(l4));
    l4[check_at..check_at + 2].copy_from_slice(&check.to_be_bytes());
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use ingress::service::{Backend, Health, Spec, Table};
    use ingress::{Vip, conntrack, maglev};
    use overlay::fdb::Index;
    use overlay::{NetworkTable, Tables, Vni};

    const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const FAR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 4789);
    const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 9, 100);

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, 9, last)
    }

    fn subnet() -> Ipv4Network {
        "198.19.9.0/24".parse().unwrap()
    }

    /// Client .5 here, tasks .10 (here) and .11 (behind FAR), VIP .100.
    fn setup(healthy: bool) -> (Index, Balancer) {
        let endpoint = |last, location| overlay::Endpoint {
            mac: Mac(Endpoint::mac_bytes(ip(last))),
            ip: ip(last),
            location,
        };
        let tables = Tables {
            networks: vec![NetworkTable {
                vni: Vni::new(9).unwrap(),
                gateway: ip(1),
                gateway_mac: Mac([0x02, 0x42, 0, 0, 0, 9]),
                endpoints: vec![
                    endpoint(5, Location::Local),
                    endpoint(10, Location::Local),
                    endpoint(11, Location::Remote(FAR)),
                    endpoint(100, Location::Service),
                ],
                peers: vec![FAR],
                external: vec![],
                sealing: None,
            }],
        };
        let health = if healthy {
            Health::Healthy
        } else {
            Health::Unhealthy
        };
        let balancer = Balancer::new(
            1024,
            conntrack::Timeouts::default(),
            Endpoint::mac_bytes,
            NODE,
        )
        .unwrap();
        let spec = Spec {
            name: "web".into(),
            vip: Vip(VIP.into()),
            backends: vec![
                Backend {
                    addr: ip(10),
                    node: NODE,
                    health,
                },
                Backend {
                    addr: ip(11),
                    node: *FAR.ip(),
                    health,
                },
            ],
            ports: vec![],
        };
        let table = Table::build(maglev::DEFAULT_SIZE, [spec]).unwrap();
        balancer.publish(table, Instant::now());
        (Index::build(&tables), balancer)
    }

    fn run(index: &Index, balancer: &Balancer, probe: Probe) -> Trace {
        let net = index.network(Vni::new(9).unwrap()).unwrap();
        trace("app", subnet(), net, balancer, &probe, Instant::now())
    }

    fn tcp(src_port: u16, dst: Ipv4Addr, port: u16) -> Probe {
        Probe::new(Proto::Tcp, (ip(5), Some(src_port)), (dst, Some(port))).unwrap()
    }

    #[test]
    fn a_vip_probe_names_the_task_maglev_picks_and_where_it_goes() {
        let (index, balancer) = setup(true);
        let mut seen = std::collections::BTreeSet::new();
        for port in 40000..40040 {
            let t = run(&index, &balancer, tcp(port, VIP, 80));
            let b = t.balancer.clone().expect("the balancer took it");
            let tuple = ingress::flow::Tuple::new(
                ingress::Protocol::Tcp,
                SocketAddrV4::new(ip(5), port),
                SocketAddrV4::new(VIP, 80),
            );
            let chosen = balancer.services().service_for(VIP).unwrap().choose(&tuple);
            assert_eq!(b.kind, "vip");
            assert_eq!(b.hash, Some(format!("{:016x}", chosen.hash)));
            let task = chosen.task.unwrap();
            assert_eq!(b.task_node, Some(task.node));
            assert_eq!(b.task, Some(SocketAddrV4::new(task.addr, 80)));
            assert!(t.mac_entry.contains("service address"), "{t:?}");
            if task.addr == ip(11) {
                assert_eq!(t.vtep, Some(FAR), "{t:?}");
            } else {
                assert_eq!(t.vtep, None);
                assert_eq!(t.verdict, "delivered to a container on this node");
            }
            seen.insert(task.addr);
        }
        assert_eq!(seen.len(), 2, "40 client ports reach both tasks");
        // Explaining tracked nothing.
        assert_eq!(balancer.flows().0, 0);
    }

    #[test]
    fn a_probe_to_an_endpoint_shows_its_mac_entry_and_vtep() {
        let (index, balancer) = setup(true);
        let t = run(&index, &balancer, tcp(40000, ip(11), 22));
        assert_eq!(t.vtep, Some(FAR));
        assert_eq!(t.mac_entry, format!("an endpoint behind VTEP {FAR}"));
        assert_eq!(t.balancer, None);
        let icmp = Probe::new(Proto::Icmp, (ip(5), None), (ip(10), None)).unwrap();
        let t = run(&index, &balancer, icmp);
        assert_eq!(t.verdict, "delivered to a container on this node");
    }

    #[test]
    fn a_vip_without_healthy_tasks_is_refused_and_an_icmp_probe_to_it_dropped() {
        let (index, balancer) = setup(false);
        let t = run(&index, &balancer, tcp(40000, VIP, 80));
        assert_eq!(t.balancer.as_ref().unwrap().task_node, None);
        assert!(t.verdict.contains("TCP reset"), "{t:?}");
        let icmp = Probe::new(Proto::Icmp, (ip(5), None), (VIP, None)).unwrap();
        let t = run(&index, &balancer, icmp);
        assert_eq!(t.drop.as_deref(), Some("service"), "{t:?}");
        assert_eq!(
            balancer
                .stats
                .rejected
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn probes_need_ports_for_tcp_and_udp_and_none_for_icmp() {
        let a = (ip(5), None);
        assert!(Probe::new(Proto::Tcp, a, (VIP, None)).is_err());
        assert!(Probe::new(Proto::Udp, a, (VIP, Some(0))).is_err());
        assert!(Probe::new(Proto::Icmp, a, (VIP, Some(80))).is_err());
        let p = Probe::new(Proto::Udp, a, (VIP, Some(53))).unwrap();
        assert_eq!(p.src.port(), CLIENT_PORT);
    }
}
