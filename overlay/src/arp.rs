//! ARP for IPv4 over Ethernet (RFC 826): a view over received packets and a reply builder.
//!
//! The switch answers requests for addresses it knows from cluster state, so they are never
//! flooded across the underlay.

use std::net::Ipv4Addr;

use crate::ethernet::{self, Mac};

/// Byte offsets of an Ethernet/IPv4 ARP packet (RFC 826, "Packet format").
mod field {
    use core::ops::Range;
    pub const HTYPE: Range<usize> = 0..2;
    pub const PTYPE: Range<usize> = 2..4;
    pub const HLEN: usize = 4;
    pub const PLEN: usize = 5;
    pub const OPER: Range<usize> = 6..8;
    pub const SHA: Range<usize> = 8..14;
    pub const SPA: Range<usize> = 14..18;
    pub const THA: Range<usize> = 18..24;
    pub const TPA: Range<usize> = 24..28;
}

/// Length of an Ethernet/IPv4 ARP packet.
pub const PACKET_LEN: usize = 28;
/// Length of a complete reply frame written by [`emit_reply`].
pub const REPLY_FRAME_LEN: usize = ethernet::HEADER_LEN + PACKET_LEN;

const HTYPE_ETHERNET: u16 = 1;
const OPER_REQUEST: u16 = 1;
const OPER_REPLY: u16 = 2;

/// The ARP operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Request,
    Reply,
    Other(u16),
}

/// Why bytes are not an Ethernet/IPv4 ARP packet. Small and `Copy`; counted, not logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Fewer bytes than the 28 of an Ethernet/IPv4 ARP packet.
    #[error("shorter than an ARP packet")]
    Short,
    /// Another hardware or protocol type, or address lengths other than 6 and 4.
    #[error("not Ethernet/IPv4 ARP")]
    Unsupported,
}

/// A view of an ARP packet (the Ethernet payload).
#[derive(Debug, Clone, Copy)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Checks the length and that hardware/protocol types are Ethernet/IPv4.
    pub fn new_checked(buffer: T) -> Result<Self, Malformed> {
        let b = buffer.as_ref();
        if b.len() < PACKET_LEN {
            return Err(Malformed::Short);
        }
        if b[field::HTYPE] != HTYPE_ETHERNET.to_be_bytes()
            || b[field::PTYPE] != ethernet::ethertype::IPV4.to_be_bytes()
            || b[field::HLEN] != 6
            || b[field::PLEN] != 4
        {
            return Err(Malformed::Unsupported);
        }
        Ok(Packet { buffer })
    }

    pub fn operation(&self) -> Operation {
        let b = &self.buffer.as_ref()[field::OPER];
        match u16::from_be_bytes([b[0], b[1]]) {
            OPER_REQUEST => Operation::Request,
            OPER_REPLY => Operation::Reply,
            n => Operation::Other(n),
        }
    }

    pub fn sender_mac(&self) -> Mac {
        Mac::from_slice(&self.buffer.as_ref()[field::SHA])
    }

    pub fn sender_ip(&self) -> Ipv4Addr {
        ip(&self.buffer.as_ref()[field::SPA])
    }

    pub fn target_mac(&self) -> Mac {
        Mac::from_slice(&self.buffer.as_ref()[field::THA])
    }

    pub fn target_ip(&self) -> Ipv4Addr {
        ip(&self.buffer.as_ref()[field::TPA])
    }

    /// A gratuitous ARP announces the sender's own address (sender IP == target IP).
    pub fn is_gratuitous(&self) -> bool {
        self.sender_ip() == self.target_ip()
    }
}

fn ip(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

/// Writes a complete Ethernet frame answering `request`: "`ip` is at `mac`".
///
/// The reply goes to the requester's hardware address. `out` must hold at least
/// [`REPLY_FRAME_LEN`] bytes; returns the number of bytes written.
pub fn emit_reply<T: AsRef<[u8]>>(
    request: &Packet<T>,
    mac: Mac,
    ip: Ipv4Addr,
    out: &mut [u8],
) -> usize {
    let requester = (request.sender_mac(), request.sender_ip());
    emit(out, requester.0, OPER_REPLY, (mac, ip), requester)
}

/// Writes a complete ARP request frame (broadcast); used by tests and probes.
pub fn emit_request(sender: (Mac, Ipv4Addr), target_ip: Ipv4Addr, out: &mut [u8]) -> usize {
    let target = (Mac([0; 6]), target_ip);
    emit(out, Mac::BROADCAST, OPER_REQUEST, sender, target)
}

/// Writes an Ethernet frame to `dst` carrying an Ethernet/IPv4 ARP packet.
fn emit(
    out: &mut [u8],
    dst: Mac,
    oper: u16,
    sender: (Mac, Ipv4Addr),
    target: (Mac, Ipv4Addr),
) -> usize {
    let out = &mut out[..REPLY_FRAME_LEN];
    ethernet::emit_header(out, dst, sender.0, ethernet::ethertype::ARP);
    let arp = &mut out[ethernet::HEADER_LEN..];
    arp[field::HTYPE].copy_from_slice(&HTYPE_ETHERNET.to_be_bytes());
    arp[field::PTYPE].copy_from_slice(&ethernet::ethertype::IPV4.to_be_bytes());
    arp[field::HLEN] = 6;
    arp[field::PLEN] = 4;
    arp[field::OPER].copy_from_slice(&oper.to_be_bytes());
    arp[field::SHA].copy_from_slice(&sender.0.0);
    arp[field::SPA].copy_from_slice(&sender.1.octets());
    arp[field::THA].copy_from_slice(&target.0.0);
    arp[field::TPA].copy_from_slice(&target.1.octets());
    REPLY_FRAME_LEN
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{ArpOperation, EtherType, SlicedPacket};

    const REQUESTER: Mac = Mac([0x02, 0x42, 0xc6, 0x13, 0, 5]);
    const ANSWER: Mac = Mac([0x02, 0x42, 0xc6, 0x13, 0, 9]);

    #[test]
    fn reply_is_valid_arp() {
        let mut req = [0u8; REPLY_FRAME_LEN];
        emit_request(
            (REQUESTER, Ipv4Addr::new(198, 19, 0, 5)),
            Ipv4Addr::new(198, 19, 0, 9),
            &mut req,
        );
        let frame = ethernet::Frame::new_checked(&req[..]).unwrap();
        let request = Packet::new_checked(frame.payload()).unwrap();
        assert_eq!(request.operation(), Operation::Request);
        assert!(!request.is_gratuitous());

        let mut out = [0u8; 64];
        let n = emit_reply(&request, ANSWER, Ipv4Addr::new(198, 19, 0, 9), &mut out);
        assert_eq!(n, REPLY_FRAME_LEN);

        let parsed = SlicedPacket::from_ethernet(&out[..n]).unwrap();
        let eth = match parsed.link.unwrap() {
            etherparse::LinkSlice::Ethernet2(e) => e.to_header(),
            other => panic!("not ethernet: {other:?}"),
        };
        assert_eq!(eth.destination, REQUESTER.0);
        assert_eq!(eth.source, ANSWER.0);
        assert_eq!(eth.ether_type, EtherType::ARP);
        let arp = match parsed.net.unwrap() {
            etherparse::NetSlice::Arp(a) => a.to_packet(),
            other => panic!("not arp: {other:?}"),
        };
        assert_eq!(arp.operation, ArpOperation::REPLY);
        assert_eq!(arp.sender_hw_addr(), &ANSWER.0);
        assert_eq!(arp.sender_protocol_addr(), &[198, 19, 0, 9]);
        assert_eq!(arp.target_hw_addr(), &REQUESTER.0);
        assert_eq!(arp.target_protocol_addr(), &[198, 19, 0, 5]);
    }

    #[test]
    fn rejects_short_and_non_ipv4() {
        assert_eq!(
            Packet::new_checked(&[0u8; 27][..]).unwrap_err(),
            Malformed::Short
        );
        let mut req = [0u8; REPLY_FRAME_LEN];
        emit_request(
            (REQUESTER, Ipv4Addr::new(198, 19, 0, 5)),
            Ipv4Addr::new(198, 19, 0, 9),
            &mut req,
        );
        req[ethernet::HEADER_LEN + 5] = 16; // plen
        assert_eq!(
            Packet::new_checked(&req[ethernet::HEADER_LEN..]).unwrap_err(),
            Malformed::Unsupported
        );
    }

    #[test]
    fn gratuitous() {
        let mut req = [0u8; REPLY_FRAME_LEN];
        let ip = Ipv4Addr::new(198, 19, 0, 5);
        emit_request((REQUESTER, ip), ip, &mut req);
        assert!(
            Packet::new_checked(&req[ethernet::HEADER_LEN..])
                .unwrap()
                .is_gratuitous()
        );
    }
}
