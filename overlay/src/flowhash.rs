//! A stable hash of the inner flow. It picks the send socket, and so the outer UDP source
//! port (RFC 7348 §5, "Source Port"; see [`crate::udp::SendPool`]).
//!
//! IPv4/IPv6 frames hash addresses, protocol and (for TCP, UDP, SCTP, UDP-Lite, unless the
//! packet is an IPv4 fragment) ports; anything else hashes the MACs and the EtherType. The
//! hash is a fixed function of those bytes, so a flow always gets the same port.

use crate::ethernet::{self, ethertype};

const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

struct Hasher(u32);

impl Hasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u32::from(b)).wrapping_mul(FNV_PRIME);
        }
    }

    /// MurmurHash3's finaliser, so that nearby inputs land far apart.
    fn finish(self) -> u32 {
        let mut h = self.0;
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }
}

fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132 | 136)
}

/// Hashes the flow of an Ethernet frame. Never panics, whatever the bytes.
pub fn hash(frame: &[u8]) -> u32 {
    let mut h = Hasher(FNV_OFFSET);
    let Ok(eth) = ethernet::Frame::new_checked(frame) else {
        h.write(frame);
        return h.finish();
    };
    let p = eth.payload();
    match eth.ethertype() {
        ethertype::IPV4 if p.len() >= 20 && p[0] >> 4 == 4 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let proto = p[9];
            h.write(&p[12..20]);
            h.write(&[proto]);
            // Fragments (MF set or offset non-zero) hash without ports, so all parts agree.
            let fragment = u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0;
            if !fragment && has_ports(proto) && ihl >= 20 && p.len() >= ihl + 4 {
                h.write(&p[ihl..ihl + 4]);
            }
        }
        ethertype::IPV6 if p.len() >= 40 && p[0] >> 4 == 6 => {
            let next = p[6];
            h.write(&p[8..40]);
            h.write(&[next]);
            if has_ports(next) && p.len() >= 44 {
                h.write(&p[40..44]);
            }
        }
        ty => {
            h.write(&frame[..12]);
            h.write(&ty.to_be_bytes());
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(src, dst, 64)
            .tcp(sport, dport, 1, 1000);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn same_flow_same_hash_regardless_of_payload_and_macs() {
        let a = tcp4([198, 19, 0, 5], [198, 19, 0, 9], 40000, 80, b"hello");
        let mut b = tcp4(
            [198, 19, 0, 5],
            [198, 19, 0, 9],
            40000,
            80,
            b"a different payload",
        );
        b[0] = 0x0a; // different dst MAC
        assert_eq!(hash(&a), hash(&b));
        let c = tcp4([198, 19, 0, 5], [198, 19, 0, 9], 40001, 80, b"hello");
        assert_ne!(hash(&a), hash(&c));
    }

    #[test]
    fn ipv6_udp_uses_ports() {
        let mk = |sport| {
            let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
                .ipv6([1; 16], [2; 16], 64)
                .udp(sport, 53);
            let mut out = Vec::new();
            b.write(&mut out, b"x").unwrap();
            out
        };
        assert_eq!(hash(&mk(1000)), hash(&mk(1000)));
        assert_ne!(hash(&mk(1000)), hash(&mk(1001)));
    }

    #[test]
    fn flows_spread_over_send_sockets() {
        let hashes: Vec<u32> = (0..1000u16)
            .map(|sport| {
                hash(&tcp4(
                    [198, 19, 0, 5],
                    [198, 19, 0, 9],
                    30000 + sport,
                    80,
                    b"",
                ))
            })
            .collect();
        let distinct: std::collections::HashSet<_> = hashes.iter().collect();
        assert!(
            distinct.len() > 990,
            "only {} distinct hashes",
            distinct.len()
        );
        // The pool picks `hash % sockets`: every one of 32 sockets gets flows, none too many.
        let mut per_socket = [0u32; 32];
        for h in &hashes {
            per_socket[*h as usize % 32] += 1;
        }
        assert!(
            per_socket.iter().all(|&n| (10..=60).contains(&n)),
            "{per_socket:?}"
        );
    }

    proptest! {
        #[test]
        fn hash_is_stable_and_total(frame in proptest::collection::vec(any::<u8>(), 0..128)) {
            prop_assert_eq!(hash(&frame), hash(&frame.clone()));
        }

        #[test]
        fn tcp_flow_stable(src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), sp in any::<u16>(), dp in any::<u16>(),
                           a in proptest::collection::vec(any::<u8>(), 0..64), b in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(hash(&tcp4(src, dst, sp, dp, &a)), hash(&tcp4(src, dst, sp, dp, &b)));
        }
    }
}
