//! Services in the data path: the stage the data plane calls for frames to a VIP and for
//! frames on their way to a local container ([`Stage`], over `ingress`'s balancer), and the
//! balancer's snapshot of services and tasks, derived from the view ([`specs`]).
//!
//! `overlay` and `ingress` know nothing of each other; this is where they meet.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ingress::balancer::{Balancer, Origin, Verdict};
use ingress::conntrack::Timeouts;
use ingress::service::{Backend, Health, Port, Spec};

use crate::api::TaskState;
use crate::cluster::View;
use crate::model::{Affinity, Endpoint, Publish, PublishMode, PublishProtocol};

/// Flows the balancer tracks at most, on this node (about 25 MB of tables).
pub const MAX_FLOWS: u32 = 131_072;

/// The balancer as the data plane's stage.
pub struct Stage(pub Arc<Balancer>);

impl overlay::Stage for Stage {
    fn rewrite(
        &self,
        frame: &mut [u8],
        checksum: overlay::stage::Checksum,
        origin: overlay::Origin,
        now: Instant,
        reply: &mut [u8],
    ) -> overlay::Verdict {
        stage_verdict(
            self.0
                .process(frame, checksum, balancer_origin(origin), now, reply),
        )
    }
}

/// The balancer's name for where a frame came from.
pub fn balancer_origin(origin: overlay::Origin) -> Origin {
    match origin {
        overlay::Origin::Overlay => Origin::Overlay,
        overlay::Origin::Host => Origin::Host,
        overlay::Origin::Bridge => Origin::Bridge,
        overlay::Origin::Node(node) => Origin::Node(node),
    }
}

/// The data plane's name for what the balancer decided.
pub fn stage_verdict(verdict: Verdict) -> overlay::Verdict {
    match verdict {
        Verdict::Pass => overlay::Verdict::Pass,
        Verdict::Rewritten => overlay::Verdict::Rewritten,
        Verdict::Reply(len) => overlay::Verdict::Reply(len),
        Verdict::Drop => overlay::Verdict::Drop,
        Verdict::Wire => overlay::Verdict::Wire,
        Verdict::Return(node) => overlay::Verdict::Return(node),
    }
}

/// A new balancer for the node at `node`, with the cluster's address-to-MAC convention;
/// `tcp_idle` replaces the established TCP flows' idle timeout.
pub fn balancer(
    node: Ipv4Addr,
    tcp_idle: Option<Duration>,
) -> Result<Balancer, ingress::conntrack::Error> {
    let defaults = Timeouts::default();
    let timeouts = Timeouts {
        tcp_established: tcp_idle.unwrap_or(defaults.tcp_established),
        ..defaults
    };
    Balancer::new(MAX_FLOWS, timeouts, Endpoint::mac_bytes, node)
}

/// Every vip-mode service of the view, with its tasks and their health: what the balancer
/// balances over. Sorted, so an unchanged view gives an equal list.
pub fn specs(view: &View) -> Vec<Spec> {
    let mut specs: Vec<Spec> = view
        .services
        .values()
        .filter_map(|service| {
            let vip = service.vip?;
            let backends = view
                .tasks
                .iter()
                .filter(|t| t.service == service.name)
                .map(|t| Backend {
                    addr: t.ip,
                    node: view
                        .members
                        .iter()
                        .find(|m| m.node.id == t.node)
                        .map_or(std::net::Ipv4Addr::UNSPECIFIED, |m| m.node.address),
                    health: match view.task_state(t) {
                        TaskState::Starting => Health::Starting,
                        TaskState::Healthy => Health::Healthy,
                        // Flows on it finish; new ones go elsewhere.
                        TaskState::Unhealthy | TaskState::Draining => Health::Unhealthy,
                        TaskState::Down => Health::Down,
                    },
                })
                .collect();
            Some(Spec {
                name: service.name.clone(),
                vip: ingress::Vip(vip.into()),
                backends,
                ports: service.publish.iter().map(port).collect(),
            })
        })
        .collect();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    specs
}

/// A published port as the balancer takes it.
fn port(publish: &Publish) -> Port {
    Port {
        protocol: match publish.protocol {
            PublishProtocol::Tcp => ingress::Protocol::Tcp,
            PublishProtocol::Udp => ingress::Protocol::Udp,
        },
        published: publish.published,
        target: publish.target,
        addr: publish.addr,
        client_affinity: publish.affinity == Affinity::ClientIp,
        local_only: publish.mode == PublishMode::Host,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
    use ingress::maglev;
    use ingress::service::Table;
    use overlay::stage::Checksum;
    use overlay::{Stage as _, Verdict, offload, vnet};
    use proptest::prelude::*;

    use super::*;

    const CLIENT: [u8; 4] = [198, 19, 0, 5];
    const TASK: [u8; 4] = [198, 19, 0, 7];
    const VIP: [u8; 4] = [198, 19, 0, 100];
    /// Where the TCP header and its checksum field start in these frames.
    const CSUM_START: usize = 14 + 20;
    const CSUM_OFFSET: usize = 16;

    fn stage() -> Stage {
        let balancer = balancer(Ipv4Addr::new(198, 18, 0, 1), None).unwrap();
        let spec = Spec {
            name: "web".into(),
            vip: ingress::Vip(Ipv4Addr::from(VIP).into()),
            backends: vec![Backend {
                addr: TASK.into(),
                node: Ipv4Addr::new(198, 18, 0, 1),
                health: Health::Healthy,
            }],
            ports: Vec::new(),
        };
        let table = Table::build(maglev::Size::new(251).unwrap(), [spec]).unwrap();
        balancer.publish(table, Instant::now());
        Stage(Arc::new(balancer))
    }

    /// A TCP frame with full checksums, or with the partial pseudo-header sum an offloaded
    /// frame carries.
    fn frame(from: ([u8; 4], u16), to: ([u8; 4], u16), payload: &[u8], partial: bool) -> Vec<u8> {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(
            Endpoint::mac_bytes(from.0.into()),
            Endpoint::mac_bytes(to.0.into()),
        )
        .ipv4(from.0, to.0, 64)
        .tcp(from.1, to.1, 1000, 65535)
        .ack(1)
        .write(&mut f, payload)
        .unwrap();
        if partial {
            let len = (f.len() - CSUM_START) as u32;
            let pseudo = packet::checksum::pseudo_v4(from.0.into(), to.0.into(), 6, len);
            let at = CSUM_START + CSUM_OFFSET;
            f[at..at + 2].copy_from_slice(&packet::checksum::fold(pseudo).to_be_bytes());
        }
        f
    }

    /// (source, destination) of a frame whose IPv4 and TCP checksums etherparse finds valid.
    fn valid(f: &[u8]) -> ([u8; 4], [u8; 4]) {
        let p = SlicedPacket::from_ethernet(f).unwrap();
        let Some(NetSlice::Ipv4(ip)) = &p.net else {
            panic!("not IPv4")
        };
        let h = ip.header().to_header();
        assert_eq!(h.calc_header_checksum(), h.header_checksum, "IPv4 checksum");
        let Some(TransportSlice::Tcp(t)) = &p.transport else {
            panic!("not TCP")
        };
        let want = t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap();
        assert_eq!(want, t.checksum(), "TCP checksum");
        (h.source, h.destination)
    }

    proptest! {
        /// A TSO super-frame to the VIP, and a task's super-frame reply, are rewritten once by
        /// the stage with their partial checksums adjusted: completed as the kernel completes
        /// them (a super-frame written back to the TAP), and cut into segments (one sent to
        /// another node), every checksum is valid.
        #[test]
        fn super_frames_are_rewritten_once_and_every_segment_checks(
            len in 1usize..20_000, mss in 536u16..1450, reply: bool,
        ) {
            let stage = stage();
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut reply_buf = [0u8; 128];
            let now = Instant::now();
            let mut syn = frame((CLIENT, 40000), (VIP, 80), b"", false);
            prop_assert_eq!(stage.rewrite(&mut syn, Checksum::Full, overlay::Origin::Overlay, now, &mut reply_buf), Verdict::Rewritten);
            let (mut super_frame, want) = if reply {
                (frame((TASK, 80), (CLIENT, 40000), &payload, true), (VIP, CLIENT))
            } else {
                (frame((CLIENT, 40000), (VIP, 80), &payload, true), (CLIENT, TASK))
            };
            prop_assert_eq!(
                stage.rewrite(&mut super_frame, Checksum::Partial, overlay::Origin::Overlay, now, &mut reply_buf),
                Verdict::Rewritten
            );

            let mut completed = super_frame.clone();
            offload::complete_checksum(&mut completed, CSUM_START, CSUM_OFFSET).unwrap();
            prop_assert_eq!(valid(&completed), want);

            let vh = vnet::Header {
                flags: vnet::FLAG_NEEDS_CSUM,
                gso_type: vnet::gso::TCPV4,
                hdr_len: (CSUM_START + 20) as u16,
                gso_size: mss,
                csum_start: CSUM_START as u16,
                csum_offset: CSUM_OFFSET as u16,
            };
            let mut out = vec![0u8; 2 * (len + 64 * 64)];
            let segments = offload::segment(&super_frame, &vh, 0, &mut out).unwrap();
            for i in 0..segments.count {
                prop_assert_eq!(valid(segments.frame(&out, i, 0)), want);
            }
        }
    }
}
