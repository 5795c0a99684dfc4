//! The PROXY protocol version 2 header a published port with `proxy=v2` sends a task ahead of
//! the client's bytes, so that the task learns the client's address although the connection
//! comes from the node (HAProxy's proxy-protocol.txt, section 2.2).
//!
//! Only what overlayd sends is built: the `PROXY` command for TCP over IPv4, with no TLVs.

use std::net::SocketAddrV4;

/// The header's fields, at their offsets in proxy-protocol.txt §2.2.
mod field {
    use std::ops::Range;
    /// The 12-byte signature that no protocol's first bytes match.
    pub const SIGNATURE: Range<usize> = 0..12;
    /// Version (high nibble) and command (low nibble).
    pub const VERSION_COMMAND: usize = 12;
    /// Address family (high nibble) and transport protocol (low nibble).
    pub const FAMILY: usize = 13;
    /// Bytes after the 16-byte fixed part, big-endian.
    pub const LEN: Range<usize> = 14..16;
    /// `struct proxy_ipv4_addr`: source and destination address, then the two ports.
    pub const SRC_ADDR: Range<usize> = 16..20;
    pub const DST_ADDR: Range<usize> = 20..24;
    pub const SRC_PORT: Range<usize> = 24..26;
    pub const DST_PORT: Range<usize> = 26..28;
}

/// `\r\n\r\n\0\r\nQUIT\n`.
pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Version 2, command `PROXY` (the connection was relayed on behalf of another node).
pub const VERSION_2_PROXY: u8 = 0x21;
/// `AF_INET` with `STREAM`: TCP over IPv4.
pub const TCP_OVER_IPV4: u8 = 0x11;
/// A whole TCP-over-IPv4 header: the 16-byte fixed part and 12 bytes of addresses.
pub const LEN: usize = field::DST_PORT.end;

/// A connection as the header describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repr {
    /// The client's address and port.
    pub source: SocketAddrV4,
    /// The address and port the client connected to.
    pub destination: SocketAddrV4,
}

impl Repr {
    /// The header's bytes.
    pub fn emit(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        out[field::SIGNATURE].copy_from_slice(&SIGNATURE);
        out[field::VERSION_COMMAND] = VERSION_2_PROXY;
        out[field::FAMILY] = TCP_OVER_IPV4;
        let addresses = (LEN - field::LEN.end) as u16;
        out[field::LEN].copy_from_slice(&addresses.to_be_bytes());
        out[field::SRC_ADDR].copy_from_slice(&self.source.ip().octets());
        out[field::DST_ADDR].copy_from_slice(&self.destination.ip().octets());
        out[field::SRC_PORT].copy_from_slice(&self.source.port().to_be_bytes());
        out[field::DST_PORT].copy_from_slice(&self.destination.port().to_be_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    /// A reader written from the spec alone, as a task would parse the header: the signature,
    /// version 2, then the family and the length it announces.
    fn parse(bytes: &[u8]) -> Option<(Repr, usize)> {
        let fixed = bytes.get(..16)?;
        if fixed[..12] != *b"\r\n\r\n\0\r\nQUIT\n" || fixed[12] >> 4 != 2 || fixed[12] & 0xF != 1 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let addresses = bytes.get(16..16 + len)?;
        if fixed[13] != 0x11 || len < 12 {
            return None;
        }
        let addr = |at: usize| {
            Ipv4Addr::new(
                addresses[at],
                addresses[at + 1],
                addresses[at + 2],
                addresses[at + 3],
            )
        };
        let port = |at: usize| u16::from_be_bytes([addresses[at], addresses[at + 1]]);
        let repr = Repr {
            source: SocketAddrV4::new(addr(0), port(8)),
            destination: SocketAddrV4::new(addr(4), port(10)),
        };
        Some((repr, 16 + len))
    }

    #[test]
    fn the_header_is_laid_out_as_the_spec_says() {
        let header = Repr {
            source: "198.18.0.200:40000".parse().unwrap(),
            destination: "198.18.0.1:9300".parse().unwrap(),
        }
        .emit();
        #[rustfmt::skip]
        let want: [u8; 28] = [
            // signature
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
            0x21, // version 2, PROXY
            0x11, // TCP over IPv4
            0x00, 0x0C, // 12 bytes of addresses
            198, 18, 0, 200, // source address
            198, 18, 0, 1, // destination address
            0x9C, 0x40, // source port 40000
            0x24, 0x54, // destination port 9300
        ];
        assert_eq!(header, want);
    }

    proptest! {
        #[test]
        fn a_reader_of_the_spec_reads_back_what_was_built(
            src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: Vec<u8>,
        ) {
            let repr = Repr {
                source: SocketAddrV4::new(src.into(), sport),
                destination: SocketAddrV4::new(dst.into(), dport),
            };
            let mut stream = repr.emit().to_vec();
            stream.extend_from_slice(&payload);
            let (read, len) = parse(&stream).unwrap();
            prop_assert_eq!(read, repr);
            prop_assert_eq!(&stream[len..], &payload[..], "the client's bytes follow at once");
        }
    }
}
