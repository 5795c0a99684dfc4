//! Answers for flows that have nowhere to go: a TCP reset, or an ICMP port unreachable for
//! UDP, sent back to the client from the address it tried (the VIP), so that it fails at once
//! instead of waiting for a timeout (DESIGN.md: no silent blackholes).
//!
//! Pure: each builds the whole Ethernet frame into the caller's buffer and returns its length,
//! or `None` if the frame is not one it answers or the buffer is too small.

use packet::icmp::{self, Unreachable};
use packet::ipv4::{self, protocol};
use packet::tcp;

use crate::nat::field;

const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];

/// A reset answering the TCP segment in `frame` (never a reset to a reset).
pub fn tcp_reset(frame: &[u8], out: &mut [u8]) -> Option<usize> {
    let ip = ipv4::Packet::new_checked(frame.get(field::IP..)?).ok()?;
    if ip.protocol() != protocol::TCP || ip.is_fragment() {
        return None;
    }
    let segment = tcp::Packet::new_checked(ip.payload()).ok()?;
    if segment.rst() {
        return None;
    }
    let len = field::IP + ipv4::MIN_HEADER_LEN + tcp::MIN_HEADER_LEN;
    let out = out.get_mut(..len)?;
    ethernet(frame, out);
    let (src, dst) = (ip.dst(), ip.src());
    let at = field::IP;
    ipv4::Repr {
        src,
        dst,
        protocol: protocol::TCP,
        payload_len: tcp::MIN_HEADER_LEN as u16,
    }
    .emit(&mut out[at..]);
    tcp::Reset::answering(&segment).emit(&mut out[at + ipv4::MIN_HEADER_LEN..], src, dst);
    Some(len)
}

/// A port unreachable answering the UDP datagram in `frame`: its IP header and first 8 bytes
/// go back inside, as RFC 792 asks.
pub fn port_unreachable(frame: &[u8], out: &mut [u8]) -> Option<usize> {
    let ip = ipv4::Packet::new_checked(frame.get(field::IP..)?).ok()?;
    if ip.protocol() != protocol::UDP || ip.is_fragment() {
        return None;
    }
    let quoted = frame.get(field::IP..field::IP + ip.header_len() + 8)?;
    let message = Unreachable {
        code: icmp::PORT_UNREACHABLE,
        original: quoted,
    };
    let len = field::IP + ipv4::MIN_HEADER_LEN + message.len();
    let out = out.get_mut(..len)?;
    ethernet(frame, out);
    let at = field::IP;
    ipv4::Repr {
        src: ip.dst(),
        dst: ip.src(),
        protocol: protocol::ICMP,
        payload_len: message.len() as u16,
    }
    .emit(&mut out[at..]);
    message.emit(&mut out[at + ipv4::MIN_HEADER_LEN..]);
    Some(len)
}

/// The reply's Ethernet header: back to the sender, from the MAC it sent to.
fn ethernet(frame: &[u8], out: &mut [u8]) {
    out[field::DST_MAC].copy_from_slice(&frame[field::SRC_MAC]);
    out[field::SRC_MAC].copy_from_slice(&frame[field::DST_MAC]);
    out[field::ETHERTYPE].copy_from_slice(&ETHERTYPE_IPV4);
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

    const CLIENT_MAC: [u8; 6] = [2, 0x42, 198, 19, 0, 5];
    const VIP_MAC: [u8; 6] = [2, 0x42, 198, 19, 0, 100];

    fn tcp_frame(syn: bool, ack: Option<u32>, payload: &[u8]) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2(CLIENT_MAC, VIP_MAC)
            .ipv4([198, 19, 0, 5], [198, 19, 0, 100], 64)
            .tcp(40000, 80, 1000, 512);
        if syn {
            b = b.syn();
        }
        if let Some(n) = ack {
            b = b.ack(n);
        }
        let mut f = Vec::new();
        b.write(&mut f, payload).unwrap();
        f
    }

    /// (source, destination, ports, seq, ack, rst, ack flag) of a reset, checked by etherparse.
    type Reset = ([u8; 4], [u8; 4], (u16, u16), u32, u32, bool, bool);

    fn parse_reset(f: &[u8]) -> Reset {
        let p = SlicedPacket::from_ethernet(f).unwrap();
        let Some(NetSlice::Ipv4(ip)) = &p.net else {
            panic!("not IPv4")
        };
        let Some(TransportSlice::Tcp(t)) = &p.transport else {
            panic!("not TCP")
        };
        let (src, dst) = (ip.header().source(), ip.header().destination());
        let ip_header = ip.header().to_header();
        assert_eq!(
            t.to_header()
                .calc_checksum_ipv4(&ip_header, t.payload())
                .unwrap(),
            t.checksum()
        );
        assert!(ip.header().to_header().calc_header_checksum() == ip.header().header_checksum());
        (
            src,
            dst,
            (t.source_port(), t.destination_port()),
            t.sequence_number(),
            t.acknowledgment_number(),
            t.rst(),
            t.ack(),
        )
    }

    #[test]
    fn a_syn_gets_a_reset_acknowledging_it_from_the_vip() {
        let mut out = [0u8; 128];
        let n = tcp_reset(&tcp_frame(true, None, b""), &mut out).unwrap();
        assert_eq!(n, 54);
        assert_eq!(&out[..6], &CLIENT_MAC);
        assert_eq!(&out[6..12], &VIP_MAC);
        assert_eq!(
            parse_reset(&out[..n]),
            (
                [198, 19, 0, 100],
                [198, 19, 0, 5],
                (80, 40000),
                0,
                1001,
                true,
                true
            )
        );
    }

    #[test]
    fn a_segment_with_ack_gets_a_reset_from_its_ack_number() {
        let mut out = [0u8; 128];
        let n = tcp_reset(&tcp_frame(false, Some(777), b"hello"), &mut out).unwrap();
        let (.., seq, _, rst, ack) = parse_reset(&out[..n]);
        assert_eq!((seq, rst, ack), (777, true, false));
    }

    #[test]
    fn resets_udp_and_short_buffers_get_nothing() {
        let mut out = [0u8; 128];
        let mut rst = tcp_frame(false, Some(1), b"");
        rst[14 + 20 + 13] |= 0x04;
        assert_eq!(tcp_reset(&rst, &mut out), None);
        assert_eq!(tcp_reset(&tcp_frame(true, None, b""), &mut out[..40]), None);
        assert_eq!(tcp_reset(&[0u8; 20], &mut out), None);
    }

    #[test]
    fn a_udp_datagram_gets_a_port_unreachable_quoting_it() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, VIP_MAC)
            .ipv4([198, 19, 0, 5], [198, 19, 0, 100], 64)
            .udp(40000, 53)
            .write(&mut f, b"query bytes")
            .unwrap();
        let mut out = [0u8; 128];
        let n = port_unreachable(&f, &mut out).unwrap();
        assert_eq!(n, 14 + 20 + 8 + 28);
        {
            let p = SlicedPacket::from_ethernet(&out[..n]).unwrap();
            let Some(NetSlice::Ipv4(ip)) = &p.net else {
                panic!("not IPv4")
            };
            assert_eq!(ip.header().source(), [198, 19, 0, 100]);
            assert_eq!(ip.header().destination(), [198, 19, 0, 5]);
        }
        let icmp = &out[34..n];
        assert_eq!(&icmp[..2], &[3, 3]);
        assert_eq!(&icmp[8..], &f[14..14 + 28]);
        assert_eq!(tcp_reset(&f, &mut out), None, "UDP gets no reset");
    }
}
