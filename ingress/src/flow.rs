//! A flow's identity as conntrack and backend choice see it: protocol and both endpoints,
//! IPv4 only for now.

use crate::{Protocol, hash};
use std::net::SocketAddrV4;

const SEED_FLOW: u64 = 0x666c_6f77; // "flow"
const SEED_CLIENT: u64 = 0x636c_6e74; // "clnt"

/// One direction of a flow: (protocol, source ip:port, destination ip:port), the "tuple" of
/// Linux conntrack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub proto: Protocol,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

impl Tuple {
    pub fn new(proto: Protocol, src: SocketAddrV4, dst: SocketAddrV4) -> Tuple {
        Tuple { proto, src, dst }
    }

    /// The same flow seen from the other end.
    pub fn reversed(self) -> Tuple {
        Tuple {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
        }
    }

    /// A hash of this direction that every node computes alike (see the crate's `hash` module), to
    /// choose a backend: the same client flow to a VIP picks the same task on every node.
    pub fn stable_hash(&self) -> u64 {
        let mut b = [0u8; 13];
        b[0] = match self.proto {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        };
        b[1..5].copy_from_slice(&self.src.ip().octets());
        b[5..7].copy_from_slice(&self.src.port().to_be_bytes());
        b[7..11].copy_from_slice(&self.dst.ip().octets());
        b[11..13].copy_from_slice(&self.dst.port().to_be_bytes());
        hash::stable(SEED_FLOW, &b)
    }

    /// A hash of the source address alone, for `affinity=client-ip`: every flow of one client
    /// picks the same task, on every node.
    pub fn client_hash(&self) -> u64 {
        hash::stable(SEED_CLIENT, &self.src.ip().octets())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn t(sport: u16) -> Tuple {
        Tuple::new(
            Protocol::Tcp,
            SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 5), sport),
            SocketAddrV4::new(Ipv4Addr::new(198, 19, 255, 1), 80),
        )
    }

    #[test]
    fn reversed_twice_is_identity() {
        assert_eq!(t(40_000).reversed().reversed(), t(40_000));
        assert_ne!(t(40_000).reversed(), t(40_000));
    }

    #[test]
    fn the_client_hash_depends_on_the_client_address_only() {
        let mut other_port = t(40_001);
        other_port.dst = SocketAddrV4::new(Ipv4Addr::new(198, 19, 255, 2), 443);
        assert_eq!(t(40_000).client_hash(), other_port.client_hash());
        let mut other_client = t(40_000);
        other_client.src = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 6), 40_000);
        assert_ne!(t(40_000).client_hash(), other_client.client_hash());
    }

    #[test]
    fn hash_depends_on_every_field() {
        let base = t(40_000);
        let mut udp = base;
        udp.proto = Protocol::Udp;
        let others = [t(40_001), base.reversed(), udp];
        for o in others {
            assert_ne!(base.stable_hash(), o.stable_hash(), "{o:?}");
        }
        assert_eq!(base.stable_hash(), t(40_000).stable_hash());
    }
}
