//! The switching decision, as a pure function of bytes, tables and time.
//!
//! [`from_tap`] decides what to do with a frame the local bridge handed to the TAP;
//! [`from_vtep`] checks a received VXLAN datagram and learns from it. Both hold ARP and ND to
//! the IP-MAC bindings in the tables, and both hand unicast frames for local endpoints and
//! service addresses to the [`Stage`] before deciding where they go. Neither reads a clock
//! or a socket, and neither allocates: an ARP or ND answer is written into a caller buffer.
//!
//! Container ports are isolated on the bridge, so the TAP sees every frame a container sends,
//! also to a container on the same node: overlayd answers ARP and ND for local endpoints too,
//! with their [`proxy_mac`], and writes same-node unicast back to the TAP ([`Forward::Local`])
//! with the real MAC. That is what lets the stage see both directions of a same-node flow.
//! What the decisions do not cover: segmentation and coalescing ([`crate::offload`]) and
//! the I/O itself (the worker).

use std::net::SocketAddrV4;
use std::ops::Range;
use std::time::Instant;

use crate::dataplane::Location;
use crate::ethernet::{self, Frame, Mac};
use crate::fdb::{Index, Learned, Network, PeerKind};
use crate::stage::{Checksum, Origin, Stage, Verdict};
use crate::vxlan::{self, Vni};
use crate::{arp, nd, seal};

/// The reply buffer [`from_tap`] needs: the longest answer it writes.
pub const REPLY_LEN: usize = if arp::REPLY_FRAME_LEN > nd::REPLY_FRAME_LEN {
    arp::REPLY_FRAME_LEN
} else {
    nd::REPLY_FRAME_LEN
};

/// What to do with a frame read from the TAP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    /// Encapsulate and send to this VTEP.
    Remote(SocketAddrV4),
    /// Encapsulate and send a copy to every peer of the network (head-end replication).
    Flood,
    /// Write the frame back to the TAP: the bridge delivers it to a local endpoint.
    Local,
    /// Write the frame of this length, already built in the caller's reply buffer, back to the TAP.
    Reply(usize),
    /// Send the frame (rewritten by the stage) out of the node's own interfaces ([`crate::wire`]).
    Wire,
    /// Send the frame of this length, built in the caller's reply buffer, out of the node's own
    /// interfaces: the stage's answer to a frame from the node's stack.
    WireReply(usize),
    /// Count and forget.
    Drop(DropReason),
}

macro_rules! drop_reasons {
    ($($(#[$doc:meta])* $name:ident => $text:literal,)*) => {
        /// Why a frame or datagram was dropped; the text is the key in [`Stats::drops`](crate::Stats).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum DropReason { $($(#[$doc])* $name,)* }

        impl DropReason {
            /// Every reason, in counter order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)*];

            /// The stable name used in statistics.
            pub fn as_str(self) -> &'static str {
                match self { $(DropReason::$name => $text,)* }
            }

            /// Index into per-worker counters.
            pub fn index(self) -> usize {
                self as usize
            }
        }
    };
}

drop_reasons! {
    /// Datagram shorter than a VXLAN header plus an Ethernet header.
    Short => "short",
    /// VXLAN header without the I flag.
    NoIFlag => "no-i-flag",
    /// VXLAN for a VNI this node does not carry.
    UnknownVni => "unknown-vni",
    /// VXLAN from an address that is not a peer of that VNI.
    NotMember => "not-member",
    /// A frame that is not valid Ethernet (or ARP), or has a multicast source.
    MalformedFrame => "malformed-frame",
    /// ARP (or an IPv6 Neighbor Solicitation) for the gateway: the bridge answers it.
    ArpLocal => "arp-local",
    /// The service stage dropped the frame, or a frame to a service address was not one it
    /// takes (not TCP or UDP over IPv4).
    Service => "service",
    /// Broadcast or unknown destination on a network without peers.
    NoPeers => "no-peers",
    /// Frame read from a TAP whose network is not in the published tables.
    UnknownNetwork => "unknown-network",
    /// Decapsulated frame with a local endpoint's or the gateway's source MAC (a loop or a
    /// spoof).
    LocalSource => "local-source",
    /// Decapsulated frame with a source MAC that is not the sender's to use: from a member, a
    /// MAC that is not one of its endpoints; from an external VTEP, a cluster endpoint's MAC.
    ForeignSource => "foreign-source",
    /// ARP that contradicts the tables: an endpoint's address with another MAC, an endpoint's
    /// MAC with another address, or the gateway's address from anyone but the bridge.
    ArpSpoof => "arp-spoof",
    /// A Neighbor Solicitation or Advertisement that speaks for an endpoint's link-local
    /// address from another MAC, or binds it to another MAC.
    NdSpoof => "nd-spoof",
    /// VXLAN for a network whose TAP is not (or no longer) open on this worker.
    NoTap => "no-tap",
    /// The TAP queue was full or refused the write.
    TapWrite => "tap-write",
    /// The UDP send failed (buffer full, no route, ...).
    UdpSend => "udp-send",
    /// A frame too big or malformed for segmentation offload.
    Offload => "offload",
    /// Sending out of the node's own interfaces failed (the reply of a connection to a
    /// published port), or the node has no socket for it.
    WireSend => "wire-send",
    /// Plain VXLAN for an encrypted network: never taken.
    Cleartext => "cleartext",
    /// A sealed datagram whose sender has no key here under its key id (an epoch not in
    /// force, a network that is not encrypted, an external VTEP), or a frame for a peer this
    /// node has no key with on an encrypted network (never sent in the clear).
    NoKey => "no-key",
    /// A sealed datagram whose tag does not verify: forged, damaged, or under another key.
    Forged => "forged",
    /// A sealed datagram whose counter was seen already or is older than the replay window.
    Replay => "replay",
}

/// Decides what to do with `frame`, read from the TAP of `net`; `checksum` says whether its
/// L4 checksum is complete or an offloaded frame's partial sum (for the stage's rewrites).
///
/// ARP and ND that contradict the tables' bindings are dropped whatever their destination.
/// An ARP or Neighbor Advertisement answer is written into `reply` (at least [`REPLY_LEN`]
/// bytes), and so is the stage's answer.
pub fn from_tap(
    frame: &mut [u8],
    net: &Network,
    learned: &Learned,
    now: Instant,
    reply: &mut [u8],
    stage: &dyn Stage,
    checksum: Checksum,
) -> Forward {
    let Ok(eth) = Frame::new_checked(&*frame) else {
        return Forward::Drop(DropReason::MalformedFrame);
    };
    let dst = eth.dst();
    let src = eth.src();
    match eth.ethertype() {
        ethernet::ethertype::ARP => {
            let Ok(packet) = arp::Packet::new_checked(eth.payload()) else {
                return Forward::Drop(DropReason::MalformedFrame);
            };
            if arp_contradicts(&packet, net) {
                return Forward::Drop(DropReason::ArpSpoof);
            }
            if dst.is_multicast() {
                return arp_from_tap(&packet, net, reply);
            }
        }
        ethernet::ethertype::IPV6 => {
            if let Some(message) = nd::parse(frame) {
                if nd_contradicts(&message, net) {
                    return Forward::Drop(DropReason::NdSpoof);
                }
                if dst.is_multicast() {
                    return nd_from_tap(&message, net, reply);
                }
            }
        }
        _ => {}
    }
    if dst.is_multicast() {
        return flood(net);
    }
    let dst = match net.location(dst) {
        None if net.location(proxy_mac(dst)) == Some(Location::Local) => {
            let real = proxy_mac(dst);
            if let Ok(mut eth) = Frame::new_checked(&mut *frame) {
                eth.set_dst(real);
            }
            real
        }
        _ => dst,
    };
    // A container's frame to the gateway reaches the TAP only when a published port's hook
    // steered it here: the reply of a connection that came from some node's own stack.
    if dst == net.gateway_mac() {
        return match stage.rewrite(frame, checksum, Origin::Overlay, now, reply) {
            // Not such a reply (a container's own connection from a published target port):
            // to the node's stack, as the bridge would have taken it, from the container's
            // proxy MAC, which the hook does not steer back.
            Verdict::Pass => {
                if let Ok(mut eth) = Frame::new_checked(&mut *frame) {
                    eth.set_src(proxy_mac(src));
                }
                Forward::Local
            }
            verdict => after_stage(verdict, frame, net, Forward::Drop(DropReason::Service)),
        };
    }
    match net.location(dst) {
        // The node's own stack through its bridge, from the node's address. The stage takes its
        // connections to tasks (a `proxy=v2` port's), which must reach tasks on other nodes and
        // come back here; the far end drops a frame from the gateway's MAC, so such a frame
        // leaves as the mesh's.
        Some(location @ (Location::Local | Location::Remote(_)))
            if src == net.gateway_mac() && from_node_address(frame, net) =>
        {
            let passed = match location {
                Location::Remote(vtep) => Forward::Remote(vtep),
                _ => Forward::Local,
            };
            let verdict = stage.rewrite(frame, checksum, Origin::Bridge, now, reply);
            if verdict == Verdict::Rewritten
                && let Ok(mut eth) = Frame::new_checked(&mut *frame)
            {
                eth.set_src(mesh_mac(net));
            }
            after_stage(verdict, frame, net, passed)
        }
        Some(location @ (Location::Local | Location::Service)) => {
            let verdict = stage.rewrite(frame, checksum, Origin::Overlay, now, reply);
            let passed = match location {
                Location::Local => Forward::Local,
                _ => Forward::Drop(DropReason::Service),
            };
            after_stage(verdict, frame, net, passed)
        }
        Some(Location::Remote(vtep)) => Forward::Remote(vtep),
        None => {
            // Neither an endpoint nor the bridge sent this: the node's stack may have steered
            // it here, a connection to a published port.
            if src != net.gateway_mac() && net.location(src).is_none() {
                match stage.rewrite(frame, checksum, Origin::Host, now, reply) {
                    Verdict::Pass => {}
                    Verdict::Rewritten => {
                        if let Ok(mut eth) = Frame::new_checked(&mut *frame) {
                            eth.set_src(mesh_mac(net));
                        }
                        let dropped = Forward::Drop(DropReason::Service);
                        return after_stage(Verdict::Rewritten, frame, net, dropped);
                    }
                    Verdict::Reply(len) => return Forward::WireReply(len),
                    _ => return Forward::Drop(DropReason::Service),
                }
            }
            match learned
                .lookup(net.vni(), dst, now)
                .and_then(|ip| net.peer(ip))
            {
                Some((vtep, _)) => Forward::Remote(vtep),
                None => flood(net),
            }
        }
    }
}

/// Whether `frame`, sent by the bridge, is IPv4 from an address other than the gateway's: the
/// node's own connection to a task. What the gateway's address sends (DNS answers, the node
/// reaching its containers) is not the stage's business and goes on as it is.
fn from_node_address(frame: &[u8], net: &Network) -> bool {
    Frame::new_checked(frame).is_ok_and(|eth| {
        eth.ethertype() == ethernet::ethertype::IPV4
            && packet::ipv4::Packet::new_checked(eth.payload())
                .is_ok_and(|ip| ip.src() != net.gateway())
    })
}

/// Where a frame goes after the stage's verdict; `passed` if the stage let it pass.
fn after_stage(verdict: Verdict, frame: &mut [u8], net: &Network, passed: Forward) -> Forward {
    match verdict {
        Verdict::Pass => passed,
        Verdict::Drop => Forward::Drop(DropReason::Service),
        Verdict::Reply(len) => Forward::Reply(len),
        Verdict::Wire => Forward::Wire,
        Verdict::Rewritten => match net.location(rewritten_dst(frame)) {
            Some(Location::Local) => Forward::Local,
            Some(Location::Remote(vtep)) => Forward::Remote(vtep),
            // A stage sends to endpoints, never to another service address.
            Some(Location::Service) | None => Forward::Drop(DropReason::Service),
        },
        Verdict::Return(node) => match (net.peer(node), Frame::new_checked(&mut *frame)) {
            (Some((vtep, PeerKind::Member)), Ok(mut eth)) => {
                eth.set_dst(mesh_mac(net));
                Forward::Remote(vtep)
            }
            _ => Forward::Drop(DropReason::Service),
        },
    }
}

/// The routing mesh's MAC on a network: the source of the frames a node sends a task on
/// another node for a connection from its own stack, and the destination of the task's
/// replies sent back to it. It is the gateway's [`proxy_mac`], which no endpoint has.
pub fn mesh_mac(net: &Network) -> Mac {
    proxy_mac(net.gateway_mac())
}

/// The MAC overlayd gives a local endpoint in its ARP and ND answers: the endpoint's own MAC
/// with bit 0x04 of the first octet flipped (still unicast, still locally administered; its
/// own inverse). The bridge has no entry for it, so a container's frame to a same-node
/// container reaches the TAP, where [`from_tap`] puts the real MAC back. The real MAC is
/// pinned to the endpoint's isolated bridge port, which another isolated port cannot reach.
pub fn proxy_mac(mac: Mac) -> Mac {
    let mut m = mac.0;
    m[0] ^= 0x04;
    Mac(m)
}

/// The destination MAC of a frame a stage rewrote (it was a whole Ethernet frame before).
fn rewritten_dst(frame: &[u8]) -> Mac {
    Frame::new_checked(frame).map_or(Mac::BROADCAST, |eth| eth.dst())
}

/// Whether an ARP packet binds an address to a MAC against the tables: the gateway's address
/// to anything but the bridge's MAC, an endpoint's address to another MAC, or an endpoint's
/// MAC to another address (a probe's unspecified sender binds nothing). Requests count too:
/// receivers update their neighbour cache from any ARP that names them.
fn arp_contradicts<T: AsRef<[u8]>>(packet: &arp::Packet<T>, net: &Network) -> bool {
    let (mac, ip) = (packet.sender_mac(), packet.sender_ip());
    if ip == net.gateway() {
        return mac != net.gateway_mac();
    }
    net.endpoint(ip).is_some_and(|ep| ep.mac != mac)
        || net
            .endpoint_by_mac(mac)
            .is_some_and(|ep| ep.ip != ip && !ip.is_unspecified())
}

/// Whether a Neighbor Solicitation or Advertisement speaks for an endpoint's link-local
/// address (the one its MAC derives) from another MAC, or binds it to another MAC: the
/// sender's address in a solicitation, the address being claimed in duplicate address
/// detection, the target in an advertisement. Addresses of no endpoint are not checked.
fn nd_contradicts(message: &nd::Message, net: &Network) -> bool {
    let claimed = match message.kind {
        nd::Kind::Solicitation if message.src_ip.is_unspecified() => message.target,
        nd::Kind::Solicitation => message.src_ip,
        nd::Kind::Advertisement => message.target,
    };
    let Some(owner) = nd::link_local_mac(claimed) else {
        return false;
    };
    net.endpoint_by_mac(owner).is_some()
        && (message.src_mac != owner || message.lladdr.is_some_and(|mac| mac != owner))
}

fn arp_from_tap<T: AsRef<[u8]>>(
    packet: &arp::Packet<T>,
    net: &Network,
    reply: &mut [u8],
) -> Forward {
    if packet.operation() != arp::Operation::Request || packet.is_gratuitous() {
        return flood(net);
    }
    let target = packet.target_ip();
    if target == net.gateway() {
        return Forward::Drop(DropReason::ArpLocal);
    }
    match net.endpoint(target) {
        Some(ep) => Forward::Reply(arp::emit_reply(
            packet,
            answer_mac(ep.mac, ep.location),
            ep.ip,
            reply,
        )),
        None => flood(net),
    }
}

/// A Neighbor Solicitation for an endpoint's EUI-64 link-local address is answered like
/// ARP; any other ND multicast (advertisements, duplicate address detection) is flooded.
fn nd_from_tap(message: &nd::Message, net: &Network, reply: &mut [u8]) -> Forward {
    let Some(ns) = message.solicitation() else {
        return flood(net);
    };
    let Some(mac) = nd::link_local_mac(ns.target) else {
        return flood(net);
    };
    match net.location(mac) {
        Some(location) => Forward::Reply(nd::emit_advertisement(
            &ns,
            answer_mac(mac, location),
            reply,
        )),
        None => flood(net),
    }
}

/// The MAC an ARP or ND answer gives for an endpoint at `location`: the proxy MAC of a local
/// one (see [`proxy_mac`]), the endpoint's own otherwise.
fn answer_mac(mac: Mac, location: Location) -> Mac {
    if location == Location::Local {
        proxy_mac(mac)
    } else {
        mac
    }
}

fn flood(net: &Network) -> Forward {
    if net.peers().is_empty() {
        Forward::Drop(DropReason::NoPeers)
    } else {
        Forward::Flood
    }
}

/// Where a frame that [`from_vtep`] accepted goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// To the TAP of this VNI.
    Tap(Vni),
    /// Out of the node's own interfaces ([`crate::wire`]): the reply of a connection to a
    /// published port that came in here, from a task on the sending node.
    Wire,
}

/// Checks a VXLAN `datagram` (the UDP payload) from `sender` and, if the sender is an external
/// VTEP, learns its inner source MAC.
///
/// A member may send only from the MACs of the endpoints the tables place behind it, or from
/// the [`mesh_mac`] (a connection to a published port it took, for an endpoint here); an
/// external VTEP from none of the cluster's. ARP and ND inside are held to the tables'
/// bindings like those from the TAP.
///
/// A unicast frame for a local endpoint goes through the stage (it may be the reply of a flow
/// the stage rewrote on its way out), with complete checksums: the sender's segmentation
/// filled them in. So does a frame to the mesh MAC, which must be the reply of a connection
/// to a published port that entered here.
///
/// The stage gets `reply` (at least [`REPLY_LEN`] bytes) as scratch: nothing is answered
/// towards the underlay.
///
/// On an encrypted network only sealed datagrams are taken ([`crate::seal`]); they are opened
/// in place first, and everything after sees the plain frame.
///
/// Returns where the datagram goes and where the inner frame is in it.
pub fn from_vtep(
    datagram: &mut [u8],
    sender: SocketAddrV4,
    index: &Index,
    learned: &mut Learned,
    now: Instant,
    stage: &dyn Stage,
    reply: &mut [u8],
) -> Result<(Delivery, Range<usize>), DropReason> {
    let (net, kind, at) = decapsulate(datagram, sender, index, now)?;
    let vni = net.vni();
    let inner = Frame::new_checked(&datagram[at.clone()]).map_err(|_| DropReason::Short)?;
    let (src, dst) = (inner.src(), inner.dst());
    if src.is_multicast() {
        return Err(DropReason::MalformedFrame);
    }
    if src == net.gateway_mac() {
        return Err(DropReason::LocalSource);
    }
    let mesh = src == mesh_mac(net);
    match (net.location(src), kind) {
        (Some(Location::Local | Location::Service), _) => return Err(DropReason::LocalSource),
        (Some(Location::Remote(vtep)), PeerKind::Member) if vtep.ip() == sender.ip() => {}
        (None, PeerKind::Member) if mesh => {}
        (None, PeerKind::External) if !mesh => {}
        _ => return Err(DropReason::ForeignSource),
    }
    match inner.ethertype() {
        ethernet::ethertype::ARP => {
            let packet = arp::Packet::new_checked(inner.payload())
                .map_err(|_| DropReason::MalformedFrame)?;
            if arp_contradicts(&packet, net) {
                return Err(DropReason::ArpSpoof);
            }
        }
        ethernet::ethertype::IPV6
            if nd::parse(&datagram[at.clone()]).is_some_and(|m| nd_contradicts(&m, net)) =>
        {
            return Err(DropReason::NdSpoof);
        }
        _ => {}
    }
    if kind == PeerKind::External {
        learned.learn(vni, src, *sender.ip(), now);
    }
    let inner = &mut datagram[at.clone()];
    if dst == mesh_mac(net) && kind == PeerKind::Member {
        return match stage.rewrite(inner, Checksum::Full, Origin::Overlay, now, reply) {
            Verdict::Wire => Ok((Delivery::Wire, at)),
            _ => Err(DropReason::Service),
        };
    }
    if net.location(dst) == Some(Location::Local) {
        let origin = if mesh {
            Origin::Node(*sender.ip())
        } else {
            Origin::Overlay
        };
        match stage.rewrite(inner, Checksum::Full, origin, now, reply) {
            Verdict::Pass | Verdict::Rewritten => {}
            _ => return Err(DropReason::Service),
        }
    } else if mesh {
        return Err(DropReason::ForeignSource);
    }
    Ok((Delivery::Tap(vni), at))
}

/// Checks a datagram's header and sender, and opens it if it is sealed: the network, what the
/// sender is to it, and where the inner frame is. A sealed datagram is taken only on an
/// encrypted network, from a peer it has a key with, under a key id in force, with a tag that
/// verifies and a counter not seen before; a plain one only on a network that is not encrypted.
fn decapsulate<'a>(
    datagram: &mut [u8],
    sender: SocketAddrV4,
    index: &'a Index,
    now: Instant,
) -> Result<(&'a Network, PeerKind, Range<usize>), DropReason> {
    if seal::is_sealed(datagram) {
        let header = seal::Header::parse(datagram).map_err(|_| DropReason::Short)?;
        let net = index.network(header.vni).ok_or(DropReason::UnknownVni)?;
        let (_, kind) = net.peer(*sender.ip()).ok_or(DropReason::NotMember)?;
        let opener = net
            .keys(*sender.ip())
            .and_then(|peer| peer.opener(header.key_id, now))
            .ok_or(DropReason::NoKey)?;
        let at = opener.open(&header, datagram).map_err(|e| match e {
            seal::Refused::Malformed => DropReason::Short,
            seal::Refused::Replay => DropReason::Replay,
            seal::Refused::Forged => DropReason::Forged,
        })?;
        return Ok((net, kind, at));
    }
    let header = vxlan::Header::new_checked(&*datagram).map_err(|e| match e {
        vxlan::Malformed::Short => DropReason::Short,
        vxlan::Malformed::NoIFlag => DropReason::NoIFlag,
    })?;
    let net = index.network(header.vni()).ok_or(DropReason::UnknownVni)?;
    let (_, kind) = net.peer(*sender.ip()).ok_or(DropReason::NotMember)?;
    if net.sealed() {
        return Err(DropReason::Cleartext);
    }
    Ok((net, kind, vxlan::HEADER_LEN..datagram.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::Tables;
    use crate::ethernet::{Mac, emit_header, ethertype};
    use crate::fdb::tests::{GATEWAY_MAC, mac, table, vni, vtep};
    use crate::stage::Passthrough;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn index() -> Index {
        Index::build(&Tables {
            networks: vec![table()],
        })
    }

    /// The switch without a service stage, on a copy of `frame`.
    fn from_tap(
        frame: &[u8],
        net: &Network,
        learned: &Learned,
        now: Instant,
        reply: &mut [u8],
    ) -> Forward {
        let mut frame = frame.to_vec();
        super::from_tap(
            &mut frame,
            net,
            learned,
            now,
            reply,
            &Passthrough,
            Checksum::Full,
        )
    }

    /// `from_vtep` without a service stage, on a copy of `datagram`.
    fn from_vtep(
        datagram: &[u8],
        sender: SocketAddrV4,
        index: &Index,
        learned: &mut Learned,
        now: Instant,
    ) -> Result<Vni, DropReason> {
        super::from_vtep(
            &mut datagram.to_vec(),
            sender,
            index,
            learned,
            now,
            &Passthrough,
            &mut [0u8; REPLY_LEN],
        )
        .map(|(delivery, _)| match delivery {
            Delivery::Tap(vni) => vni,
            Delivery::Wire => panic!("a passthrough stage sends nothing out of the node"),
        })
    }

    fn frame(dst: Mac, src: Mac, ty: u16) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        emit_header(&mut f, dst, src, ty);
        f
    }

    fn arp_request(target: Ipv4Addr) -> Vec<u8> {
        let mut f = vec![0u8; arp::REPLY_FRAME_LEN];
        arp::emit_request((mac(6), Ipv4Addr::new(198, 19, 0, 6)), target, &mut f);
        f
    }

    fn tap(frame: &[u8]) -> (Forward, Vec<u8>) {
        let index = index();
        let mut reply = vec![0u8; REPLY_LEN];
        let fwd = from_tap(
            frame,
            index.network(vni(4096)).unwrap(),
            &Learned::default(),
            Instant::now(),
            &mut reply,
        );
        (fwd, reply)
    }

    /// `from_tap` on network 4096 of `index`, with what `learned` holds at `now`.
    fn tap_learned(index: &Index, learned: &Learned, now: Instant, frame: &[u8]) -> Forward {
        let net = index.network(vni(4096)).unwrap();
        from_tap(frame, net, learned, now, &mut [0u8; REPLY_LEN])
    }

    #[test]
    fn unicast_to_remote_endpoint_goes_to_its_vtep() {
        assert_eq!(
            tap(&frame(mac(9), mac(5), ethertype::IPV4)).0,
            Forward::Remote(vtep(2))
        );
    }

    /// A container learns a same-node container's proxy MAC from overlayd's ARP answer, and a
    /// frame sent to it comes back out of the TAP with the real MAC.
    #[test]
    fn a_local_endpoint_is_answered_with_its_proxy_mac_which_is_put_back_on_the_way() {
        let (fwd, reply) = tap(&arp_request(Ipv4Addr::new(198, 19, 0, 5)));
        assert_eq!(fwd, Forward::Reply(arp::REPLY_FRAME_LEN));
        let eth = Frame::new_checked(&reply[..arp::REPLY_FRAME_LEN]).unwrap();
        let answered = arp::Packet::new_checked(eth.payload())
            .unwrap()
            .sender_mac();
        assert_eq!(answered, proxy_mac(mac(5)));
        assert_ne!(answered, mac(5));

        let index = index();
        let net = index.network(vni(4096)).unwrap();
        let mut to_proxy = frame(proxy_mac(mac(5)), mac(6), ethertype::IPV4);
        let fwd = super::from_tap(
            &mut to_proxy,
            net,
            &Learned::default(),
            Instant::now(),
            &mut [0u8; REPLY_LEN],
            &Passthrough,
            Checksum::Full,
        );
        assert_eq!(fwd, Forward::Local);
        assert_eq!(Frame::new_checked(&to_proxy[..]).unwrap().dst(), mac(5));
        // A remote endpoint's MAC with that bit flipped is nobody's: flooded as unknown.
        assert_eq!(
            tap(&frame(proxy_mac(mac(9)), mac(5), ethertype::IPV4)).0,
            Forward::Flood
        );
    }

    #[test]
    fn unicast_to_local_endpoint_goes_back_to_the_tap() {
        assert_eq!(
            tap(&frame(mac(5), mac(6), ethertype::IPV4)).0,
            Forward::Local
        );
    }

    #[test]
    fn broadcast_multicast_and_unknown_unicast_flood() {
        assert_eq!(
            tap(&frame(Mac::BROADCAST, mac(5), ethertype::IPV4)).0,
            Forward::Flood
        );
        assert_eq!(
            tap(&frame(
                Mac([0x33, 0x33, 0, 0, 0, 1]),
                mac(5),
                ethertype::IPV6
            ))
            .0,
            Forward::Flood
        );
        assert_eq!(
            tap(&frame(mac(77), mac(5), ethertype::IPV4)).0,
            Forward::Flood
        );
    }

    #[test]
    fn flood_without_peers_is_dropped() {
        let mut t = table();
        t.peers.clear();
        t.external.clear();
        let index = Index::build(&Tables { networks: vec![t] });
        let fwd = from_tap(
            &frame(Mac::BROADCAST, mac(5), ethertype::IPV4),
            index.network(vni(4096)).unwrap(),
            &Learned::default(),
            Instant::now(),
            &mut [0u8; 64],
        );
        assert_eq!(fwd, Forward::Drop(DropReason::NoPeers));
    }

    #[test]
    fn short_frame_from_tap_is_malformed() {
        assert_eq!(tap(&[0u8; 13]).0, Forward::Drop(DropReason::MalformedFrame));
    }

    #[test]
    fn arp_for_remote_endpoint_is_answered() {
        let (fwd, reply) = tap(&arp_request(Ipv4Addr::new(198, 19, 0, 9)));
        assert_eq!(fwd, Forward::Reply(arp::REPLY_FRAME_LEN));
        let eth = Frame::new_checked(&reply[..arp::REPLY_FRAME_LEN]).unwrap();
        assert_eq!(eth.dst(), mac(6));
        assert_eq!(eth.src(), mac(9));
        let p = arp::Packet::new_checked(eth.payload()).unwrap();
        assert_eq!(p.operation(), arp::Operation::Reply);
        assert_eq!(p.sender_mac(), mac(9));
        assert_eq!(p.sender_ip(), Ipv4Addr::new(198, 19, 0, 9));
        assert_eq!(p.target_mac(), mac(6));
        assert_eq!(p.target_ip(), Ipv4Addr::new(198, 19, 0, 6));
    }

    #[test]
    fn arp_for_a_local_endpoint_is_answered_and_for_the_gateway_left_to_the_bridge() {
        // Container ports are isolated: the asker never reaches the local endpoint itself.
        assert_eq!(
            tap(&arp_request(Ipv4Addr::new(198, 19, 0, 5))).0,
            Forward::Reply(arp::REPLY_FRAME_LEN)
        );
        assert_eq!(
            tap(&arp_request(Ipv4Addr::new(198, 19, 0, 1))).0,
            Forward::Drop(DropReason::ArpLocal)
        );
    }

    #[test]
    fn arp_for_unknown_and_gratuitous_arp_flood() {
        assert_eq!(
            tap(&arp_request(Ipv4Addr::new(198, 19, 0, 77))).0,
            Forward::Flood
        );
        let mut garp = vec![0u8; arp::REPLY_FRAME_LEN];
        arp::emit_request(
            (mac(5), Ipv4Addr::new(198, 19, 0, 5)),
            Ipv4Addr::new(198, 19, 0, 5),
            &mut garp,
        );
        assert_eq!(tap(&garp).0, Forward::Flood);
    }

    #[test]
    fn malformed_arp_is_dropped() {
        let mut f = arp_request(Ipv4Addr::new(198, 19, 0, 9));
        f.truncate(ethernet::HEADER_LEN + 10);
        assert_eq!(tap(&f).0, Forward::Drop(DropReason::MalformedFrame));
    }

    fn datagram(vni_: u32, inner_src: Mac) -> Vec<u8> {
        let mut d = vec![0u8; vxlan::HEADER_LEN];
        vxlan::Repr { vni: vni(vni_) }.emit(&mut d);
        d.extend(frame(mac(5), inner_src, ethertype::IPV4));
        d
    }

    fn peer3() -> SocketAddrV4 {
        // Kernel VXLAN sends from a hashed source port, not 4789.
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 3), 51234)
    }

    #[test]
    fn vxlan_from_peer_is_delivered_and_learned() {
        let index = index();
        let mut learned = Learned::default();
        let now = Instant::now();
        let got = from_vtep(&datagram(4096, mac(40)), peer3(), &index, &mut learned, now);
        assert_eq!(got, Ok(vni(4096)));
        assert_eq!(
            learned.lookup(vni(4096), mac(40), now),
            Some(Ipv4Addr::new(198, 18, 0, 3))
        );
        // ... and the learned MAC is now switched to that peer's VXLAN port.
        let to_learned = frame(mac(40), mac(5), ethertype::IPV4);
        assert_eq!(
            tap_learned(&index, &learned, now, &to_learned),
            Forward::Remote(vtep(3))
        );
    }

    #[test]
    fn members_send_only_from_their_endpoints_and_nothing_is_learned_from_them() {
        let index = index();
        let mut learned = Learned::default();
        let mut from = |src: Mac, sender: SocketAddrV4| {
            from_vtep(
                &datagram(4096, src),
                sender,
                &index,
                &mut learned,
                Instant::now(),
            )
        };
        // Node 2 hosts endpoint 9, from any source port.
        let node2 = SocketAddrV4::new(*vtep(2).ip(), 50000);
        assert_eq!(from(mac(9), node2), Ok(vni(4096)));
        assert_eq!(from(mac(5), node2), Err(DropReason::LocalSource));
        assert_eq!(from(GATEWAY_MAC, node2), Err(DropReason::LocalSource));
        assert_eq!(from(mac(40), node2), Err(DropReason::ForeignSource));
        assert_eq!(from(Mac::BROADCAST, node2), Err(DropReason::MalformedFrame));
        // The external VTEP may not use a cluster endpoint's MAC.
        assert_eq!(from(mac(9), peer3()), Err(DropReason::ForeignSource));
        assert!(learned.is_empty());
    }

    /// An ARP frame from `eth_src` (also the ARP sender MAC) claiming `ip`, to `dst`:
    /// a reply when `dst` is unicast, else a gratuitous request.
    fn arp_claim(dst: Mac, eth_src: Mac, ip: Ipv4Addr) -> Vec<u8> {
        let mut f = vec![0u8; arp::REPLY_FRAME_LEN];
        if dst.is_multicast() {
            arp::emit_request((eth_src, ip), ip, &mut f);
        } else {
            let mut req = vec![0u8; arp::REPLY_FRAME_LEN];
            arp::emit_request((dst, Ipv4Addr::new(198, 19, 0, 200)), ip, &mut req);
            let req = arp::Packet::new_checked(&req[ethernet::HEADER_LEN..]).unwrap();
            arp::emit_reply(&req, eth_src, ip, &mut f);
        }
        f
    }

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, 0, n)
    }

    #[test]
    fn arp_from_tap_that_contradicts_a_binding_is_dropped() {
        let spoof = Forward::Drop(DropReason::ArpSpoof);
        // Local endpoint 5 claims remote endpoint 9's address: unicast reply, gratuitous.
        assert_eq!(tap(&arp_claim(mac(9), mac(5), ip(9))).0, spoof);
        assert_eq!(tap(&arp_claim(Mac::BROADCAST, mac(5), ip(9))).0, spoof);
        // An unknown MAC claims endpoint 9's address.
        assert_eq!(tap(&arp_claim(Mac::BROADCAST, mac(77), ip(9))).0, spoof);
        // Endpoint 5's MAC with an address that is not its own.
        assert_eq!(tap(&arp_claim(Mac::BROADCAST, mac(5), ip(77))).0, spoof);
        // The gateway's address from anyone but the bridge.
        assert_eq!(tap(&arp_claim(Mac::BROADCAST, mac(5), ip(1))).0, spoof);
        let mut ask = vec![0u8; arp::REPLY_FRAME_LEN];
        arp::emit_request((mac(5), ip(9)), ip(77), &mut ask);
        assert_eq!(tap(&ask).0, spoof, "a request binds its sender too");

        // What is true passes: the bridge asking as the gateway, an endpoint announcing
        // itself, an unknown host announcing an unbound address, a probe.
        let mut bridge = vec![0u8; arp::REPLY_FRAME_LEN];
        arp::emit_request((GATEWAY_MAC, ip(1)), ip(9), &mut bridge);
        assert_eq!(tap(&bridge).0, Forward::Reply(arp::REPLY_FRAME_LEN));
        assert_eq!(
            tap(&arp_claim(Mac::BROADCAST, mac(5), ip(5))).0,
            Forward::Flood
        );
        assert_eq!(
            tap(&arp_claim(mac(9), mac(5), ip(5))).0,
            Forward::Remote(vtep(2))
        );
        assert_eq!(
            tap(&arp_claim(Mac::BROADCAST, mac(77), ip(77))).0,
            Forward::Flood
        );
        let mut probe = vec![0u8; arp::REPLY_FRAME_LEN];
        arp::emit_request((mac(5), Ipv4Addr::UNSPECIFIED), ip(77), &mut probe);
        assert_eq!(tap(&probe).0, Forward::Flood);
    }

    fn encapsulate(vni_: u32, inner: &[u8]) -> Vec<u8> {
        let mut d = vec![0u8; vxlan::HEADER_LEN];
        vxlan::Repr { vni: vni(vni_) }.emit(&mut d);
        d.extend_from_slice(inner);
        d
    }

    /// `table()` encrypted, with keys for member .2 only: it seals to this node under
    /// `Key([2; 32])` in epoch 0.
    fn sealed_index() -> Index {
        use crate::keyring::{Keyring, PeerKeys, Sealing};
        use crate::seal::Key;
        let mut t = crate::fdb::tests::table();
        t.sealing = Some(Sealing {
            epoch: 0,
            peers: vec![PeerKeys {
                vtep: *vtep(2).ip(),
                send: Key([1; 32]),
                receive: Key([2; 32]),
                receive_next: Key([3; 32]),
            }],
        });
        let tables = Tables { networks: vec![t] };
        let sessions = Keyring::default().update(&tables, Instant::now(), 1);
        Index::build_sealed(&tables, &sessions)
    }

    fn seal_as(key: u8, key_id: u8, counter: u64, inner: &[u8]) -> Vec<u8> {
        let mut d = vec![0u8; seal::HEADER_LEN + inner.len() + seal::TAG_LEN];
        d[seal::HEADER_LEN..seal::HEADER_LEN + inner.len()].copy_from_slice(inner);
        seal::Sealer::new(&seal::Key([key; 32]), key_id, counter).seal(vni(4096), &mut d);
        d
    }

    #[test]
    fn an_encrypted_network_takes_only_what_a_member_sealed_and_only_once() {
        let sealed_net = sealed_index();
        let mut learned = Learned::default();
        let now = Instant::now();
        // From the remote endpoint .9 (behind member .2) to the local one .5.
        let inner = frame(mac(5), mac(9), ethertype::IPV4);
        let mut got = |d: &[u8], from| from_vtep(d, from, &sealed_net, &mut learned, now);
        assert_eq!(
            got(&encapsulate(4096, &inner), vtep(2)),
            Err(DropReason::Cleartext),
            "cleartext on an encrypted VNI"
        );
        let sealed = seal_as(2, 0, 7, &inner);
        let mut opened = sealed.clone();
        let (delivery, at) = super::from_vtep(
            &mut opened,
            vtep(2),
            &sealed_net,
            &mut Learned::default(),
            now,
            &Passthrough,
            &mut [0u8; REPLY_LEN],
        )
        .unwrap();
        assert_eq!(delivery, Delivery::Tap(vni(4096)));
        assert_eq!(&opened[at], &inner[..], "opened in place");
        assert_eq!(got(&sealed, vtep(2)), Err(DropReason::Replay));
        let mut forged = seal_as(2, 0, 8, &inner);
        forged[seal::HEADER_LEN + 3] ^= 0x80;
        assert_eq!(got(&forged, vtep(2)), Err(DropReason::Forged));
        assert_eq!(got(&seal_as(2, 0, 8, &inner), vtep(2)), Ok(vni(4096)));
        // Under another node's key (this node's own send key), an epoch not in force, from
        // the external VTEP (no key), from a stranger.
        assert_eq!(
            got(&seal_as(1, 0, 9, &inner), vtep(2)),
            Err(DropReason::Forged)
        );
        assert_eq!(
            got(&seal_as(2, 5, 9, &inner), vtep(2)),
            Err(DropReason::NoKey)
        );
        assert_eq!(
            got(&seal_as(2, 0, 9, &inner), peer3()),
            Err(DropReason::NoKey)
        );
        let stranger = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 77), 4789);
        assert_eq!(
            got(&seal_as(2, 0, 9, &inner), stranger),
            Err(DropReason::NotMember)
        );
        // The next epoch is taken already (a peer that rotated first).
        assert_eq!(got(&seal_as(3, 1, 1, &inner), vtep(2)), Ok(vni(4096)));
        // A sealed datagram for a network that is not encrypted.
        let plain = index();
        let d = seal_as(2, 0, 10, &inner);
        assert_eq!(
            from_vtep(&d, vtep(2), &plain, &mut learned, now),
            Err(DropReason::NoKey)
        );
    }

    #[test]
    fn arp_from_vtep_that_contradicts_a_binding_is_dropped_and_not_learned() {
        let index = index();
        let mut learned = Learned::default();
        let now = Instant::now();
        let mut from = |inner: Vec<u8>, sender: SocketAddrV4| {
            from_vtep(
                &encapsulate(4096, &inner),
                sender,
                &index,
                &mut learned,
                now,
            )
        };
        let spoof = Err(DropReason::ArpSpoof);
        // Node 2's endpoint 9 claims local endpoint 5's address: unicast reply, gratuitous.
        assert_eq!(from(arp_claim(mac(5), mac(9), ip(5)), vtep(2)), spoof);
        assert_eq!(
            from(arp_claim(Mac::BROADCAST, mac(9), ip(5)), vtep(2)),
            spoof
        );
        // A host behind the external VTEP claims endpoint 9's address, or the gateway's.
        assert_eq!(from(arp_claim(mac(5), mac(40), ip(9)), peer3()), spoof);
        assert_eq!(
            from(arp_claim(Mac::BROADCAST, mac(40), ip(1)), peer3()),
            spoof
        );
        // Announcing its own address is fine; only the external host is learned (above, the
        // spoofing one was not).
        assert_eq!(
            from(arp_claim(Mac::BROADCAST, mac(9), ip(9)), vtep(2)),
            Ok(vni(4096))
        );
        assert_eq!(
            from(arp_claim(mac(5), mac(40), ip(40)), peer3()),
            Ok(vni(4096))
        );
        assert_eq!(learned.len(), 1);
    }

    #[test]
    fn nd_that_contradicts_a_binding_is_dropped() {
        use crate::nd::{self, tests::advertisement, tests::solicitation};
        let ll = |n| nd::link_local(mac(n));
        let spoof = Forward::Drop(DropReason::NdSpoof);
        // Local endpoint 5 advertises remote endpoint 9's link-local at its own MAC.
        assert_eq!(tap(&advertisement(mac(5), ll(5), ll(9), mac(5))).0, spoof);
        // ... or from endpoint 9's MAC but binding it to 5's.
        assert_eq!(tap(&advertisement(mac(9), ll(9), ll(9), mac(5))).0, spoof);
        // A solicitation from endpoint 9's address by another MAC (the helper's, MAC 1), and
        // duplicate address detection of it by another MAC.
        assert_eq!(tap(&solicitation(ll(9), ll(77), 255)).0, spoof);
        assert_eq!(
            tap(&solicitation(Ipv6Addr::UNSPECIFIED, ll(9), 255)).0,
            spoof
        );
        // True advertisements pass; addresses of no endpoint are not checked.
        assert_eq!(
            tap(&advertisement(mac(5), ll(5), ll(5), mac(5))).0,
            Forward::Flood
        );
        assert_eq!(
            tap(&advertisement(mac(5), ll(5), ll(77), mac(5))).0,
            Forward::Flood
        );

        let index = index();
        let mut learned = Learned::default();
        let mut from_node2 = |frame: Vec<u8>| {
            let datagram = encapsulate(4096, &frame);
            from_vtep(&datagram, vtep(2), &index, &mut learned, Instant::now())
        };
        assert_eq!(
            from_node2(advertisement(mac(9), ll(9), ll(5), mac(9))),
            Err(DropReason::NdSpoof)
        );
        assert_eq!(
            from_node2(advertisement(mac(9), ll(9), ll(9), mac(9))),
            Ok(vni(4096))
        );
    }

    #[test]
    fn neighbor_solicitations_for_known_link_locals_are_answered() {
        use crate::nd::{self, tests::solicitation};
        let index = index();
        let net = index.network(vni(4096)).unwrap();
        // The helper's frames come from MAC 1, which is no endpoint.
        let asker = nd::link_local(mac(1));
        let ask = |target: Mac| {
            let mut reply = [0u8; REPLY_LEN];
            let frame = solicitation(asker, nd::link_local(target), 255);
            let fwd = from_tap(&frame, net, &Learned::default(), Instant::now(), &mut reply);
            (fwd, reply)
        };
        // Remote endpoint .9: answered with its MAC.
        let (fwd, reply) = ask(mac(9));
        assert_eq!(fwd, Forward::Reply(nd::REPLY_FRAME_LEN));
        let eth = Frame::new_checked(&reply[..nd::REPLY_FRAME_LEN]).unwrap();
        assert_eq!((eth.src(), eth.ethertype()), (mac(9), ethertype::IPV6));
        // Local endpoint: answered too (its port is isolated); unknown MAC: flooded.
        assert_eq!(ask(mac(5)).0, Forward::Reply(nd::REPLY_FRAME_LEN));
        assert_eq!(ask(mac(77)).0, Forward::Flood);
        // Duplicate address detection is never answered.
        let dad = solicitation(Ipv6Addr::UNSPECIFIED, nd::link_local(mac(77)), 255);
        assert_eq!(tap(&dad).0, Forward::Flood);
    }

    #[test]
    fn learned_vtep_that_left_is_not_used() {
        let index = index();
        let mut learned = Learned::default();
        let now = Instant::now();
        learned.learn(vni(4096), mac(40), Ipv4Addr::new(198, 18, 0, 99), now);
        let to_learned = frame(mac(40), mac(5), ethertype::IPV4);
        assert_eq!(
            tap_learned(&index, &learned, now, &to_learned),
            Forward::Flood
        );
    }

    #[test]
    fn malformed_vxlan_is_dropped_by_reason() {
        let index = index();
        let mut learned = Learned::default();
        let now = Instant::now();
        let mut check = |d: &[u8], from: SocketAddrV4, want: DropReason| {
            assert_eq!(
                from_vtep(d, from, &index, &mut learned, now),
                Err(want),
                "{want:?}"
            );
        };
        let good = datagram(4096, mac(40));
        check(&good[..7], vtep(2), DropReason::Short);
        check(&good[..vxlan::HEADER_LEN + 13], vtep(2), DropReason::Short);
        let mut no_i = good.clone();
        no_i[0] = 0;
        check(&no_i, vtep(2), DropReason::NoIFlag);
        check(&datagram(4097, mac(40)), vtep(2), DropReason::UnknownVni);
        check(&good, vtep(4), DropReason::NotMember);
        assert!(learned.is_empty());
    }

    #[test]
    fn drop_reason_names_are_unique() {
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DropReason::ALL.len());
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    /// A stage that answers every frame with `verdict` (after pointing a rewritten frame at
    /// `rewrite_to`), and remembers where each frame came from.
    struct Scripted {
        verdict: Verdict,
        rewrite_to: Mac,
        origins: std::sync::Mutex<Vec<Origin>>,
    }

    impl Scripted {
        fn new(verdict: Verdict) -> Scripted {
            Scripted {
                verdict,
                rewrite_to: mac(9),
                origins: Default::default(),
            }
        }

        fn origins(&self) -> Vec<Origin> {
            self.origins.lock().unwrap().clone()
        }
    }

    impl Stage for Scripted {
        fn rewrite(
            &self,
            f: &mut [u8],
            _: Checksum,
            o: Origin,
            _: Instant,
            _: &mut [u8],
        ) -> Verdict {
            self.origins.lock().unwrap().push(o);
            if self.verdict == Verdict::Rewritten {
                Frame::new_checked(&mut *f)
                    .unwrap()
                    .set_dst(self.rewrite_to);
            }
            self.verdict
        }
    }

    /// `from_tap` on network 4096 with `stage`; the frame as it left, and the decision.
    fn tap_with(stage: &Scripted, frame: &[u8]) -> (Forward, Vec<u8>) {
        let index = index();
        let mut frame = frame.to_vec();
        let fwd = super::from_tap(
            &mut frame,
            index.network(vni(4096)).unwrap(),
            &Learned::default(),
            Instant::now(),
            &mut [0u8; REPLY_LEN],
            stage,
            Checksum::Full,
        );
        (fwd, frame)
    }

    fn mesh() -> Mac {
        proxy_mac(GATEWAY_MAC)
    }

    /// What the node's stack steers into the TAP: from the client's MAC to the node's.
    const CLIENT_MAC: Mac = Mac([0x52, 0x54, 0, 0, 0, 1]);
    const NODE_MAC: Mac = Mac([0x52, 0x54, 0, 0, 0, 2]);

    #[test]
    fn a_connection_from_the_nodes_stack_goes_to_the_stage_and_on_from_the_mesh_mac() {
        let stage = Scripted::new(Verdict::Rewritten);
        let (fwd, out) = tap_with(&stage, &frame(NODE_MAC, CLIENT_MAC, ethertype::IPV4));
        assert_eq!(fwd, Forward::Remote(vtep(2)));
        assert_eq!(stage.origins(), [Origin::Host]);
        let eth = Frame::new_checked(&out[..]).unwrap();
        assert_eq!((eth.dst(), eth.src()), (mac(9), mesh()));

        let stage = Scripted::new(Verdict::Reply(54));
        let (fwd, _) = tap_with(&stage, &frame(NODE_MAC, CLIENT_MAC, ethertype::IPV4));
        assert_eq!(
            fwd,
            Forward::WireReply(54),
            "a reset goes back out of the node"
        );
        let stage = Scripted::new(Verdict::Pass);
        let (fwd, _) = tap_with(&stage, &frame(NODE_MAC, CLIENT_MAC, ethertype::IPV4));
        assert_eq!(fwd, Forward::Flood, "not a published port: unknown unicast");
    }

    #[test]
    fn the_nodes_stack_reaches_endpoints_through_the_stage_and_remote_ones_as_the_mesh() {
        /// An IPv4 frame from the bridge, from the node's address or the gateway's.
        fn from_bridge(dst: Mac, src: Ipv4Addr) -> Vec<u8> {
            let mut f = frame(dst, GATEWAY_MAC, ethertype::IPV4);
            let ip = packet::ipv4::Repr {
                src,
                dst: Ipv4Addr::new(198, 19, 0, 9),
                protocol: 6,
                payload_len: 20,
            };
            ip.emit(&mut f[14..]);
            f
        }
        let node = Ipv4Addr::new(198, 18, 0, 1);
        let to_remote = from_bridge(mac(9), node);
        let stage = Scripted::new(Verdict::Rewritten);
        let (fwd, out) = tap_with(&stage, &to_remote);
        assert_eq!(fwd, Forward::Remote(vtep(2)));
        assert_eq!(stage.origins(), [Origin::Bridge]);
        let eth = Frame::new_checked(&out[..]).unwrap();
        assert_eq!(
            (eth.dst(), eth.src()),
            (mac(9), mesh()),
            "the far end takes the mesh's"
        );

        let stage = Scripted::new(Verdict::Pass);
        let (fwd, out) = tap_with(&stage, &to_remote);
        assert_eq!(fwd, Forward::Remote(vtep(2)));
        assert_eq!(out, to_remote, "passed untouched");
        let to_local = from_bridge(proxy_mac(mac(5)), node);
        let (fwd, _) = tap_with(&stage, &to_local);
        assert_eq!(fwd, Forward::Local);
        assert_eq!(stage.origins(), [Origin::Bridge, Origin::Bridge]);
        // From the gateway's address: as before, never the host's.
        let gateway = Ipv4Addr::new(198, 19, 0, 1);
        let stage = Scripted::new(Verdict::Drop);
        let (fwd, _) = tap_with(&stage, &from_bridge(mac(9), gateway));
        assert_eq!(fwd, Forward::Remote(vtep(2)));
        let (fwd, _) = tap_with(&stage, &from_bridge(proxy_mac(mac(5)), gateway));
        assert_eq!(fwd, Forward::Drop(DropReason::Service));
        assert_eq!(stage.origins(), [Origin::Overlay]);

        let stage = Scripted::new(Verdict::Reply(54));
        let (fwd, _) = tap_with(&stage, &to_remote);
        assert_eq!(fwd, Forward::Reply(54), "a reset goes back into the bridge");
    }

    #[test]
    fn the_bridges_own_unknown_unicast_is_not_taken_for_the_nodes_stack() {
        let stage = Scripted::new(Verdict::Drop);
        let (fwd, _) = tap_with(&stage, &frame(NODE_MAC, GATEWAY_MAC, ethertype::IPV4));
        assert_eq!(fwd, Forward::Flood);
        assert!(stage.origins().is_empty());
    }

    #[test]
    fn a_tasks_frame_to_the_gateway_leaves_the_node_or_returns_to_the_node_it_came_from() {
        let task_to_gateway = frame(GATEWAY_MAC, mac(5), ethertype::IPV4);
        let stage = Scripted::new(Verdict::Wire);
        assert_eq!(tap_with(&stage, &task_to_gateway).0, Forward::Wire);
        assert_eq!(stage.origins(), [Origin::Overlay]);

        let stage = Scripted::new(Verdict::Return(*vtep(2).ip()));
        let (fwd, out) = tap_with(&stage, &task_to_gateway);
        assert_eq!(fwd, Forward::Remote(vtep(2)));
        assert_eq!(Frame::new_checked(&out[..]).unwrap().dst(), mesh());
        // Only to members: an external VTEP gets nothing of the mesh.
        let stage = Scripted::new(Verdict::Return(*vtep(3).ip()));
        assert_eq!(
            tap_with(&stage, &task_to_gateway).0,
            Forward::Drop(DropReason::Service)
        );
        // Not a reply of the mesh: the node's stack takes it, from the proxy MAC.
        let stage = Scripted::new(Verdict::Pass);
        let (fwd, out) = tap_with(&stage, &task_to_gateway);
        assert_eq!(fwd, Forward::Local);
        let eth = Frame::new_checked(&out[..]).unwrap();
        assert_eq!((eth.dst(), eth.src()), (GATEWAY_MAC, proxy_mac(mac(5))));
    }

    fn vtep_with(
        stage: &Scripted,
        inner: &[u8],
        sender: SocketAddrV4,
    ) -> Result<Delivery, DropReason> {
        super::from_vtep(
            &mut encapsulate(4096, inner),
            sender,
            &index(),
            &mut Learned::default(),
            Instant::now(),
            stage,
            &mut [0u8; REPLY_LEN],
        )
        .map(|(delivery, _)| delivery)
    }

    #[test]
    fn a_member_may_send_a_local_endpoint_a_connection_from_the_mesh_mac() {
        let stage = Scripted::new(Verdict::Pass);
        let to_task = frame(mac(5), mesh(), ethertype::IPV4);
        assert_eq!(
            vtep_with(&stage, &to_task, vtep(2)),
            Ok(Delivery::Tap(vni(4096)))
        );
        assert_eq!(stage.origins(), [Origin::Node(*vtep(2).ip())]);
        assert_eq!(
            vtep_with(&stage, &to_task, peer3()),
            Err(DropReason::ForeignSource),
            "not an external VTEP"
        );
        let elsewhere = frame(mac(9), mesh(), ethertype::IPV4);
        assert_eq!(
            vtep_with(&stage, &elsewhere, vtep(2)),
            Err(DropReason::ForeignSource)
        );
    }

    #[test]
    fn a_reply_to_the_mesh_mac_leaves_the_node_only_if_the_stage_says_so() {
        let reply = frame(mesh(), mac(9), ethertype::IPV4);
        let stage = Scripted::new(Verdict::Wire);
        assert_eq!(vtep_with(&stage, &reply, vtep(2)), Ok(Delivery::Wire));
        assert_eq!(stage.origins(), [Origin::Overlay]);
        let stage = Scripted::new(Verdict::Pass);
        assert_eq!(vtep_with(&stage, &reply, vtep(2)), Err(DropReason::Service));
    }
}
