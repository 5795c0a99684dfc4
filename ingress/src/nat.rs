//! NAT of an Ethernet + IPv4 + TCP/UDP frame, and the flow key ([`Tuple`]) the balancer
//! hashes.
//!
//! Pure functions over the caller's buffer, allocating nothing: [`rewrite_dst`] turns VIP:port
//! into a task's address and port (DNAT); [`rewrite_src`] turns a task's replies back into
//! VIP:port (un-DNAT) and gives a client reaching its own service a source it accepts (SNAT,
//! the hairpin case). Checksums are updated incrementally in the [`Mode`] the frame's TCP/UDP
//! checksum is in: an offloaded frame (a TSO/GSO super-frame, or any frame flagged
//! `NEEDS_CSUM`) holds a partial sum, and is rewritten once, before segmentation.
//!
//! Not here: which flows to rewrite and to what (connection tracking, backend choice), IPv6,
//! VLAN tags, IP fragments (refused: a later fragment has no ports to rewrite).

use std::net::{Ipv4Addr, SocketAddrV4};

use packet::checksum::Mode;
use packet::ipv4::{self, protocol};
use packet::l4::{self, Segment};
use packet::{tcp, udp};

use crate::Protocol;
use crate::flow::Tuple;

/// Offsets in an untagged Ethernet II header (IEEE 802.3 clause 3.1.1); the overlay carries
/// no VLAN tags.
pub(crate) mod field {
    use core::ops::Range;
    pub const DST_MAC: Range<usize> = 0..6;
    pub const SRC_MAC: Range<usize> = 6..12;
    pub const ETHERTYPE: Range<usize> = 12..14;
    pub const IP: usize = 14;
}

const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];

/// Why a frame is not rewritten or keyed. Nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    /// Not an untagged IPv4 frame (ARP, IPv6, a VLAN tag), or shorter than an Ethernet header.
    #[error("not an IPv4 frame")]
    NotIpv4,
    #[error(transparent)]
    Ipv4(#[from] ipv4::Malformed),
    /// An IP fragment: the first one's checksum covers bytes it does not hold, later ones
    /// have no ports.
    #[error("IPv4 fragment")]
    Fragment,
    /// IPv4 carrying neither TCP nor UDP.
    #[error("IPv4 protocol {0} is neither TCP nor UDP")]
    Protocol(u8),
    #[error(transparent)]
    Tcp(#[from] tcp::Malformed),
    #[error(transparent)]
    Udp(#[from] udp::Malformed),
}

/// The 5-tuple of an Ethernet + IPv4 + TCP/UDP frame, as it is on the wire (the direction is
/// the caller's business).
pub fn flow(frame: &[u8]) -> Result<Tuple, Unsupported> {
    let ip = unfragmented(&frame[ipv4_start(frame)?..])?;
    let (proto, (sport, dport)) = match ip.protocol() {
        protocol::TCP => (
            Protocol::Tcp,
            ports(tcp::Packet::new_checked(ip.payload())?),
        ),
        protocol::UDP => (
            Protocol::Udp,
            ports(udp::Packet::new_checked(ip.payload())?),
        ),
        other => return Err(Unsupported::Protocol(other)),
    };
    Ok(Tuple::new(
        proto,
        SocketAddrV4::new(ip.src(), sport),
        SocketAddrV4::new(ip.dst(), dport),
    ))
}

/// The TCP flags of an Ethernet + IPv4 + TCP frame (FIN, SYN, RST, ACK, as on the wire); 0
/// for anything else.
pub fn tcp_flags(frame: &[u8]) -> u8 {
    let Ok(ip) = ipv4_start(frame).and_then(|at| unfragmented(&frame[at..])) else {
        return 0;
    };
    if ip.protocol() != protocol::TCP {
        return 0;
    }
    tcp::Packet::new_checked(ip.payload()).map_or(0, |t| t.flags())
}

/// The source and destination MACs of an Ethernet frame (zero if it is too short to hold
/// them; callers have parsed the frame already).
pub fn macs(frame: &[u8]) -> ([u8; 6], [u8; 6]) {
    let mut src = [0; 6];
    let mut dst = [0; 6];
    if frame.len() >= field::IP {
        src.copy_from_slice(&frame[field::SRC_MAC]);
        dst.copy_from_slice(&frame[field::DST_MAC]);
    }
    (src, dst)
}

/// Sets the Ethernet destination and source MACs that are given (after a rewrite, the frame
/// goes to the new address's MAC, and comes from the VIP's).
pub fn set_macs(frame: &mut [u8], dst: Option<[u8; 6]>, src: Option<[u8; 6]>) {
    if frame.len() < field::IP {
        return;
    }
    if let Some(mac) = dst {
        frame[field::DST_MAC].copy_from_slice(&mac);
    }
    if let Some(mac) = src {
        frame[field::SRC_MAC].copy_from_slice(&mac);
    }
}

/// DNAT: sets the destination address and port (VIP:port -> task:port), keeping the IPv4
/// header checksum and the TCP/UDP checksum (in `mode`) right.
pub fn rewrite_dst(
    frame: &mut [u8],
    addr: Ipv4Addr,
    port: u16,
    mode: Mode,
) -> Result<(), Unsupported> {
    rewrite(frame, Side::Dst, addr, port, mode)
}

/// Un-DNAT of a reply (task:port -> VIP:port) and SNAT of the hairpin case: sets the source
/// address and port; see [`rewrite_dst`].
pub fn rewrite_src(
    frame: &mut [u8],
    addr: Ipv4Addr,
    port: u16,
    mode: Mode,
) -> Result<(), Unsupported> {
    rewrite(frame, Side::Src, addr, port, mode)
}

#[derive(Clone, Copy)]
enum Side {
    Src,
    Dst,
}

fn rewrite(
    frame: &mut [u8],
    side: Side,
    addr: Ipv4Addr,
    port: u16,
    mode: Mode,
) -> Result<(), Unsupported> {
    let at = ipv4_start(frame)?;
    let mut ip = unfragmented(&mut frame[at..])?;
    let old = match side {
        Side::Src => ip.src(),
        Side::Dst => ip.dst(),
    };
    // Every header is checked before the first byte changes.
    match ip.protocol() {
        protocol::TCP => rewrite_l4(
            tcp::Packet::new_checked(ip.payload_mut())?,
            side,
            old,
            addr,
            port,
            mode,
        ),
        protocol::UDP => rewrite_l4(
            udp::Packet::new_checked(ip.payload_mut())?,
            side,
            old,
            addr,
            port,
            mode,
        ),
        other => return Err(Unsupported::Protocol(other)),
    }
    match side {
        Side::Src => ip.set_src(addr),
        Side::Dst => ip.set_dst(addr),
    }
    Ok(())
}

fn rewrite_l4<P: l4::Protocol>(
    mut seg: Segment<&mut [u8], P>,
    side: Side,
    old: Ipv4Addr,
    addr: Ipv4Addr,
    port: u16,
    mode: Mode,
) {
    seg.readdress(old, addr, mode);
    match side {
        Side::Src => seg.set_src_port(port, mode),
        Side::Dst => seg.set_dst_port(port, mode),
    }
}

fn ports<P: l4::Protocol>(seg: Segment<&[u8], P>) -> (u16, u16) {
    (seg.src_port(), seg.dst_port())
}

/// Where the IPv4 packet of an untagged Ethernet frame starts.
fn ipv4_start(frame: &[u8]) -> Result<usize, Unsupported> {
    match frame.get(field::ETHERTYPE) {
        Some(t) if t == ETHERTYPE_IPV4 => Ok(field::IP),
        _ => Err(Unsupported::NotIpv4),
    }
}

fn unfragmented<T: AsRef<[u8]>>(bytes: T) -> Result<ipv4::Packet<T>, Unsupported> {
    let ip = ipv4::Packet::new_checked(bytes)?;
    if ip.is_fragment() {
        return Err(Unsupported::Fragment);
    }
    Ok(ip)
}

#[cfg(test)]
mod tests;
