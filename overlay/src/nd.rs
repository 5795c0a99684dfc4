//! IPv6 Neighbor Discovery (RFC 4861): Neighbor Solicitations for endpoints' link-local
//! addresses, answered from cluster state like ARP.
//!
//! Endpoints have no IPv6 addresses in the tables, but their link-local address is derived
//! from their MAC (modified EUI-64, RFC 4291 §2.5.1 and Appendix A), so a solicitation for
//! `fe80::/64` whose interface identifier maps back to a known MAC can be answered without
//! flooding. Everything else (other targets, duplicate address detection) is left to the
//! caller, which floods it. [`parse`] also reads advertisements, so the switch can drop
//! messages that bind an endpoint's link-local address to another MAC.

use std::net::Ipv6Addr;

use crate::checksum;
use crate::ethernet::{self, Mac};

/// Offsets from the start of the Ethernet frame (IPv6 header RFC 8200 §3, NS/NA RFC 4861
/// §4.3-4.4).
mod field {
    use core::ops::Range;
    pub const IP: usize = super::ethernet::HEADER_LEN;
    pub const PAYLOAD_LEN: Range<usize> = IP + 4..IP + 6;
    pub const NEXT_HEADER: usize = IP + 6;
    pub const HOP_LIMIT: usize = IP + 7;
    pub const SRC: Range<usize> = IP + 8..IP + 24;
    pub const DST: Range<usize> = IP + 24..IP + 40;
    pub const ICMP: usize = IP + 40;
    pub const TYPE: usize = ICMP;
    pub const CODE: usize = ICMP + 1;
    pub const CHECKSUM: Range<usize> = ICMP + 2..ICMP + 4;
    /// NA: Router, Solicited, Override flags, then reserved bits.
    pub const FLAGS: Range<usize> = ICMP + 4..ICMP + 8;
    pub const TARGET: Range<usize> = ICMP + 8..ICMP + 24;
    pub const OPTIONS: usize = ICMP + 24;
}

const ICMPV6: u8 = 58;
const TYPE_SOLICITATION: u8 = 135;
const TYPE_ADVERTISEMENT: u8 = 136;
/// Option type: Source Link-Layer Address (RFC 4861 §4.6.1).
const OPTION_SOURCE_LL: u8 = 1;
/// Option type: Target Link-Layer Address (RFC 4861 §4.6.1), 8 bytes with a MAC.
const OPTION_TARGET_LL: u8 = 2;
/// NA flags: Solicited | Override.
const FLAGS_SOLICITED_OVERRIDE: u32 = 0x6000_0000;
/// ND messages are only valid with the IPv6 hop limit 255 (RFC 4861 §7.1.1).
const HOP_LIMIT: u8 = 255;
/// An NA with one Target Link-Layer Address option: 24 + 8 bytes.
const ADVERTISEMENT_LEN: usize = 32;

/// Length of the Ethernet frame [`emit_advertisement`] writes.
pub const REPLY_FRAME_LEN: usize = field::OPTIONS + 8;

/// Which Neighbor Discovery message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Solicitation,
    Advertisement,
}

/// A valid Neighbor Solicitation or Advertisement: what it says about whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    pub kind: Kind,
    /// The Ethernet source.
    pub src_mac: Mac,
    pub src_ip: Ipv6Addr,
    pub target: Ipv6Addr,
    /// The link-layer address option that binds an address to a MAC in the receiver's
    /// neighbour cache: Source (of `src_ip`) in a solicitation, Target (of `target`) in an
    /// advertisement.
    pub lladdr: Option<Mac>,
}

/// A valid Neighbor Solicitation from a host that already has an address (not DAD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Solicitation {
    pub src_mac: Mac,
    pub src_ip: Ipv6Addr,
    pub target: Ipv6Addr,
}

fn ip6(b: &[u8]) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(b);
    Ipv6Addr::from(a)
}

/// Parses an Ethernet frame as a Neighbor Solicitation or Advertisement and validates it
/// (RFC 4861 §7.1: hop limit 255, code 0, length, options of non-zero length, checksum, a
/// unicast target). `None` for anything else. Cheap for other frames: the ethertype, next
/// header and ICMPv6 type are checked before anything is summed.
pub fn parse(frame: &[u8]) -> Option<Message> {
    let eth = ethernet::Frame::new_checked(frame).ok()?;
    if eth.ethertype() != ethernet::ethertype::IPV6 || frame.len() < field::OPTIONS {
        return None;
    }
    let (kind, lladdr_option) = match frame[field::TYPE] {
        TYPE_SOLICITATION => (Kind::Solicitation, OPTION_SOURCE_LL),
        TYPE_ADVERTISEMENT => (Kind::Advertisement, OPTION_TARGET_LL),
        _ => return None,
    };
    let payload_len = usize::from(u16::from_be_bytes([
        frame[field::PAYLOAD_LEN.start],
        frame[field::PAYLOAD_LEN.start + 1],
    ]));
    if frame[field::IP] >> 4 != 6
        || frame[field::NEXT_HEADER] != ICMPV6
        || frame[field::HOP_LIMIT] != HOP_LIMIT
        || payload_len < field::OPTIONS - field::ICMP
        || field::ICMP + payload_len > frame.len()
        || frame[field::CODE] != 0
    {
        return None;
    }
    let src_ip = ip6(&frame[field::SRC]);
    let dst_ip = ip6(&frame[field::DST]);
    let target = ip6(&frame[field::TARGET]);
    if target.is_multicast() {
        return None;
    }
    let icmp = &frame[field::ICMP..field::ICMP + payload_len];
    // Every option must have a non-zero length (in 8-byte units) and fit.
    let mut lladdr = None;
    let mut at = field::OPTIONS - field::ICMP;
    while at < icmp.len() {
        let len = usize::from(*icmp.get(at + 1)?) * 8;
        if len == 0 {
            return None;
        }
        if icmp[at] == lladdr_option && len == 8 {
            lladdr = Some(Mac::from_slice(icmp.get(at + 2..at + 8)?));
        }
        at += len;
    }
    if at != icmp.len() {
        return None;
    }
    let sum = checksum::pseudo_v6(src_ip, dst_ip, ICMPV6, payload_len as u32) + checksum::sum(icmp);
    if checksum::fold(sum) != 0xffff {
        return None;
    }
    Some(Message {
        kind,
        src_mac: eth.src(),
        src_ip,
        target,
        lladdr,
    })
}

impl Message {
    /// The solicitation to answer for its sender: `None` for an advertisement and for
    /// duplicate address detection (unspecified source), which must reach the owner.
    pub fn solicitation(&self) -> Option<Solicitation> {
        (self.kind == Kind::Solicitation && !self.src_ip.is_unspecified()).then_some(Solicitation {
            src_mac: self.src_mac,
            src_ip: self.src_ip,
            target: self.target,
        })
    }
}

/// The link-local address of an interface with this MAC (modified EUI-64: the
/// universal/local bit flipped, `ff:fe` in the middle).
pub fn link_local(mac: Mac) -> Ipv6Addr {
    let m = mac.0;
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m[0] ^ 0x02,
        m[1],
        m[2],
        0xff,
        0xfe,
        m[3],
        m[4],
        m[5],
    ])
}

/// The MAC a `fe80::/64` address was derived from with modified EUI-64, if it was.
pub fn link_local_mac(ip: Ipv6Addr) -> Option<Mac> {
    let o = ip.octets();
    if o[..8] != [0xfe, 0x80, 0, 0, 0, 0, 0, 0] || o[11] != 0xff || o[12] != 0xfe {
        return None;
    }
    Some(Mac([o[8] ^ 0x02, o[9], o[10], o[13], o[14], o[15]]))
}

/// Writes the Neighbor Advertisement answering `ns` for the endpoint with `mac` (Solicited
/// and Override set, with its link-layer address) into `out`; returns the frame length
/// ([`REPLY_FRAME_LEN`]).
pub fn emit_advertisement(ns: &Solicitation, mac: Mac, out: &mut [u8]) -> usize {
    let out = &mut out[..REPLY_FRAME_LEN];
    ethernet::emit_header(out, ns.src_mac, mac, ethernet::ethertype::IPV6);
    // Version 6, traffic class and flow label 0.
    out[field::IP..field::IP + 4].copy_from_slice(&[0x60, 0, 0, 0]);
    out[field::PAYLOAD_LEN].copy_from_slice(&(ADVERTISEMENT_LEN as u16).to_be_bytes());
    out[field::NEXT_HEADER] = ICMPV6;
    out[field::HOP_LIMIT] = HOP_LIMIT;
    out[field::SRC].copy_from_slice(&ns.target.octets());
    out[field::DST].copy_from_slice(&ns.src_ip.octets());
    out[field::TYPE] = TYPE_ADVERTISEMENT;
    out[field::CODE] = 0;
    out[field::CHECKSUM].fill(0);
    out[field::FLAGS].copy_from_slice(&FLAGS_SOLICITED_OVERRIDE.to_be_bytes());
    out[field::TARGET].copy_from_slice(&ns.target.octets());
    out[field::OPTIONS] = OPTION_TARGET_LL;
    out[field::OPTIONS + 1] = 1; // in units of 8 bytes
    out[field::OPTIONS + 2..field::OPTIONS + 8].copy_from_slice(&mac.0);
    let sum = checksum::pseudo_v6(ns.target, ns.src_ip, ICMPV6, ADVERTISEMENT_LEN as u32)
        + checksum::sum(&out[field::ICMP..]);
    out[field::CHECKSUM].copy_from_slice(&checksum::finish(sum).to_be_bytes());
    REPLY_FRAME_LEN
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use etherparse::{Icmpv6Type, PacketBuilder, SlicedPacket, TransportSlice};

    const ASKER: Mac = Mac([0x02, 0x42, 0xc6, 0x13, 0, 1]);

    fn parse_solicitation(frame: &[u8]) -> Option<Solicitation> {
        parse(frame)?.solicitation()
    }
    const ENDPOINT: Mac = Mac([0x02, 0x42, 0xc6, 0x13, 0, 2]);

    /// An NS built by etherparse (valid checksum) from ASKER, to the target's solicited-node
    /// multicast address.
    pub fn solicitation(src: Ipv6Addr, target: Ipv6Addr, hop_limit: u8) -> Vec<u8> {
        let t = target.octets();
        let solicited_node = [
            0xff02,
            0,
            0,
            0,
            0,
            1,
            0xff00 | u16::from(t[13]),
            u16::from_be_bytes([t[14], t[15]]),
        ];
        let dst = Ipv6Addr::from(solicited_node);
        let mut payload = t.to_vec();
        payload.extend_from_slice(&[1, 1]); // Source Link-Layer Address option
        payload.extend_from_slice(&ASKER.0);
        let mut out = Vec::new();
        PacketBuilder::ethernet2(ASKER.0, [0x33, 0x33, 0xff, t[13], t[14], t[15]])
            .ipv6(src.octets(), dst.octets(), hop_limit)
            .icmpv6(Icmpv6Type::NeighborSolicitation)
            .write(&mut out, &payload)
            .unwrap();
        out
    }

    /// An unsolicited NA (to all nodes, Override set) from `eth_src`, for `target` at `lladdr`.
    pub fn advertisement(eth_src: Mac, src: Ipv6Addr, target: Ipv6Addr, lladdr: Mac) -> Vec<u8> {
        let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
        let mut payload = target.octets().to_vec();
        payload.extend_from_slice(&[OPTION_TARGET_LL, 1]);
        payload.extend_from_slice(&lladdr.0);
        let flags = etherparse::icmpv6::NeighborAdvertisementHeader {
            router: false,
            solicited: false,
            r#override: true,
        };
        let mut out = Vec::new();
        PacketBuilder::ethernet2(eth_src.0, [0x33, 0x33, 0, 0, 0, 1])
            .ipv6(src.octets(), all_nodes.octets(), HOP_LIMIT)
            .icmpv6(Icmpv6Type::NeighborAdvertisement(flags))
            .write(&mut out, &payload)
            .unwrap();
        out
    }

    #[test]
    fn eui64_round_trip_rfc4291() {
        // RFC 4291 App. A: 00:00:5e:... style MAC gets the U/L bit flipped.
        let mac = Mac([0x00, 0x00, 0x5e, 0x10, 0x20, 0x30]);
        assert_eq!(
            link_local(mac),
            "fe80::200:5eff:fe10:2030".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(link_local_mac(link_local(ENDPOINT)), Some(ENDPOINT));
        assert_eq!(link_local_mac("fe80::1".parse().unwrap()), None);
        assert_eq!(
            link_local_mac("2001:db8::200:5eff:fe10:2030".parse().unwrap()),
            None
        );
    }

    #[test]
    fn answers_with_a_valid_advertisement() {
        let me = link_local(ASKER);
        let ns =
            parse_solicitation(&solicitation(me, link_local(ENDPOINT), 255)).expect("valid NS");
        assert_eq!(
            ns,
            Solicitation {
                src_mac: ASKER,
                src_ip: me,
                target: link_local(ENDPOINT)
            }
        );
        let mut out = [0u8; 128];
        let n = emit_advertisement(&ns, ENDPOINT, &mut out);
        let p = SlicedPacket::from_ethernet(&out[..n]).expect("etherparse parses the NA");
        let eth = p.link.as_ref().unwrap().to_header().unwrap();
        let etherparse::LinkHeader::Ethernet2(eth) = eth else {
            panic!("not Ethernet II")
        };
        assert_eq!((eth.source, eth.destination), (ENDPOINT.0, ASKER.0));
        let Some(etherparse::NetSlice::Ipv6(ip)) = &p.net else {
            panic!("not IPv6")
        };
        let h = ip.header();
        assert_eq!(
            (h.source_addr(), h.destination_addr(), h.hop_limit()),
            (link_local(ENDPOINT), me, 255)
        );
        let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else {
            panic!("not ICMPv6")
        };
        assert!(
            icmp.is_checksum_valid(h.source(), h.destination()),
            "ICMPv6 checksum"
        );
        assert_eq!(
            icmp.icmp_type(),
            Icmpv6Type::NeighborAdvertisement(etherparse::icmpv6::NeighborAdvertisementHeader {
                router: false,
                solicited: true,
                r#override: true
            })
        );
        let body = icmp.payload();
        assert_eq!(&body[..16], &link_local(ENDPOINT).octets());
        assert_eq!(&body[16..24], &[2, 1, 0x02, 0x42, 0xc6, 0x13, 0, 2]);
        // Our own parser reads it as an advertisement binding the target to the endpoint.
        assert_eq!(parse_solicitation(&out[..n]), None);
        assert_eq!(
            parse(&out[..n]),
            Some(Message {
                kind: Kind::Advertisement,
                src_mac: ENDPOINT,
                src_ip: link_local(ENDPOINT),
                target: link_local(ENDPOINT),
                lladdr: Some(ENDPOINT),
            })
        );
        // ... and a solicitation as binding its sender to the source link-layer option.
        let m = parse(&solicitation(me, link_local(ENDPOINT), 255)).unwrap();
        assert_eq!((m.kind, m.lladdr), (Kind::Solicitation, Some(ASKER)));
    }

    #[test]
    fn refuses_invalid_and_dad() {
        let target = link_local(ENDPOINT);
        assert!(
            parse_solicitation(&solicitation(Ipv6Addr::UNSPECIFIED, target, 255)).is_none(),
            "DAD"
        );
        assert!(
            parse_solicitation(&solicitation(link_local(ASKER), target, 64)).is_none(),
            "hop limit"
        );
        let mut bad = solicitation(link_local(ASKER), target, 255);
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(parse_solicitation(&bad).is_none(), "checksum");
        let mut zero_option = solicitation(link_local(ASKER), target, 255);
        // Length 1 -> 0, and the last MAC byte (also a low byte) + 1: the checksum still holds.
        let at = zero_option.len() - 7;
        zero_option[at] = 0;
        *zero_option.last_mut().unwrap() += 1;
        assert!(
            parse_solicitation(&zero_option).is_none(),
            "option of length 0"
        );
        let good = solicitation(link_local(ASKER), target, 255);
        for n in 0..good.len() {
            let _ = parse_solicitation(&good[..n]);
        }
    }
}
