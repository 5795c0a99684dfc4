//! UDP header (RFC 768): a view over a datagram (the IPv4 payload) with port setters and an
//! address change that keep the checksum right in either [`Mode`], minding that a zero
//! checksum means "none" over IPv4.
//!
//! ```text
//!  0      7 8     15 16    23 24    31
//! +--------+--------+--------+--------+
//! |     Source      |   Destination   |
//! |      Port       |      Port       |
//! +--------+--------+--------+--------+
//! |     Length      |    Checksum     |
//! +--------+--------+--------+--------+
//! ```
//! The checksum covers the first Length bytes; bytes after them are not part of the datagram.

use crate::get16;
use crate::ipv4::protocol;
use crate::l4::{self, Segment};

/// Byte offsets of the UDP header, RFC 768 (the ports are in [`crate::l4`]).
mod field {
    use core::ops::Range;
    pub const LENGTH: Range<usize> = 4..6;
    pub const CHECKSUM: Range<usize> = 6..8;
    pub const PAYLOAD: usize = 8;
}

/// Length of the UDP header.
pub const HEADER_LEN: usize = field::PAYLOAD;

/// The UDP [`l4::Protocol`].
#[derive(Debug)]
pub enum Udp {}

impl l4::Protocol for Udp {
    const NUMBER: u8 = protocol::UDP;
    const CHECKSUM: core::ops::Range<usize> = field::CHECKSUM;
    const ZERO_IS_NONE: bool = true;
    /// The first Length bytes.
    fn covered(buffer: &[u8]) -> usize {
        usize::from(get16(buffer, field::LENGTH))
    }
}

/// A view over a UDP datagram: the shared [`Segment`] (ports, checksum) plus the fields here.
pub type Packet<T> = Segment<T, Udp>;

/// Why bytes are not a UDP datagram. Nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Fewer bytes than the header or than Length says.
    #[error("truncated UDP datagram")]
    Truncated,
    /// Length below the 8-byte header.
    #[error("UDP length below the header length")]
    Length,
}

impl<T: AsRef<[u8]>> Segment<T, Udp> {
    /// Checks that `buffer` holds a header and Length bytes (more may follow: they are not
    /// part of the datagram).
    pub fn new_checked(buffer: T) -> Result<Self, Malformed> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Malformed::Truncated);
        }
        let len = usize::from(get16(b, field::LENGTH));
        if len < HEADER_LEN {
            return Err(Malformed::Length);
        }
        if b.len() < len {
            return Err(Malformed::Truncated);
        }
        Ok(Segment::checked(buffer))
    }

    /// The Length field: header plus payload, in bytes.
    pub fn length(&self) -> u16 {
        get16(self.bytes(), field::LENGTH)
    }

    pub fn payload(&self) -> &[u8] {
        &self.bytes()[HEADER_LEN..usize::from(self.length())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::Mode;
    use etherparse::UdpHeader;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const SRC: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 5);
    const DST: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 9);

    /// A datagram with etherparse's checksum, and `pad` bytes after it.
    fn emit(sport: u16, dport: u16, payload: &[u8], pad: usize) -> Vec<u8> {
        let mut h = UdpHeader {
            source_port: sport,
            destination_port: dport,
            length: 0,
            checksum: 0,
        };
        h.length = (HEADER_LEN + payload.len()) as u16;
        h.checksum = h
            .calc_checksum_ipv4_raw(SRC.octets(), DST.octets(), payload)
            .unwrap();
        let mut out = [h.to_bytes().to_vec(), payload.to_vec()].concat();
        out.resize(out.len() + pad, 0xee);
        out
    }

    proptest! {
        /// parse(emit): every getter reads what etherparse wrote; bytes after Length are not
        /// part of the datagram.
        #[test]
        fn reads_what_etherparse_emits(ports: [u16; 2], payload in vec(any::<u8>(), 0..64), pad in 0usize..8) {
            let bytes = emit(ports[0], ports[1], &payload, pad);
            let p = Packet::new_checked(&bytes[..]).unwrap();
            prop_assert_eq!((p.src_port(), p.dst_port()), (ports[0], ports[1]));
            prop_assert_eq!(usize::from(p.length()), HEADER_LEN + payload.len());
            prop_assert_eq!(p.checksum(), u16::from_be_bytes([bytes[6], bytes[7]]));
            prop_assert_eq!(p.payload(), &payload[..]);
            prop_assert!(p.verify_checksum(SRC, DST));
        }

        /// The port and address setters keep a full checksum right (checked by etherparse and
        /// never the reserved zero), a Partial sum completes to the same bytes, and an absent
        /// checksum (zero) stays absent.
        #[test]
        fn rewrites_keep_the_checksum_in_both_modes(
            ports: [u16; 2], payload in vec(any::<u8>(), 0..600), pad in 0usize..4,
            new_src: [u8; 4], new_dst: [u8; 4],
        ) {
            let (new_src, new_dst) = (Ipv4Addr::from(new_src), Ipv4Addr::from(new_dst));
            let mut full = emit(1, 2, &payload, pad);
            let mut partial = full.clone();
            Packet::new_checked(&mut partial[..]).unwrap().fill_checksum(SRC, DST, Mode::Partial);
            let mut absent = full.clone();
            absent[field::CHECKSUM].fill(0);
            for (bytes, mode) in [(&mut full, Mode::Full), (&mut partial, Mode::Partial), (&mut absent, Mode::Full)] {
                let mut p = Packet::new_checked(&mut bytes[..]).unwrap();
                p.readdress(DST, new_dst, mode);
                p.set_src_port(ports[0], mode);
                p.set_dst_port(ports[1], mode);
                p.readdress(SRC, new_src, mode);
            }
            Packet::new_checked(&mut partial[..]).unwrap().complete_checksum();
            prop_assert_eq!(&full, &partial);
            let (u, rest) = UdpHeader::from_slice(&full).unwrap();
            let payload_after = &rest[..payload.len()];
            prop_assert_eq!((u.source_port, u.destination_port), (ports[0], ports[1]));
            prop_assert_eq!(u.checksum, u.calc_checksum_ipv4_raw(new_src.octets(), new_dst.octets(), payload_after).unwrap());
            prop_assert_eq!(&absent[field::CHECKSUM], &[0, 0]);
            prop_assert_eq!(&absent[..6], &full[..6]);
        }
    }

    /// A datagram whose checksum computes to zero is sent with 0xffff (RFC 768), both when
    /// filled and when a rewrite lands on zero.
    #[test]
    fn a_zero_sum_is_sent_as_ffff() {
        let mut bytes = emit(1, 2, &[0, 0], 0);
        let c = Packet::new_checked(&bytes[..]).unwrap().checksum();
        // The payload word equal to the checksum makes the whole sum 0xffff: checksum zero.
        bytes[HEADER_LEN..].copy_from_slice(&c.to_be_bytes());
        let mut p = Packet::new_checked(&mut bytes[..]).unwrap();
        p.fill_checksum(SRC, DST, Mode::Full);
        assert_eq!(p.checksum(), 0xffff);
        assert!(p.verify_checksum(SRC, DST));
        // Port 1 -> 2 and back: the update passes through a different sum and returns to zero.
        p.set_src_port(2, Mode::Full);
        p.set_src_port(1, Mode::Full);
        assert_eq!(p.checksum(), 0xffff);
    }

    #[test]
    fn refuses_what_is_not_a_whole_datagram() {
        let good = emit(1, 2, b"1234", 0);
        assert!(Packet::new_checked(&good[..]).is_ok());
        assert_eq!(
            Packet::new_checked(&good[..7]).unwrap_err(),
            Malformed::Truncated
        );
        assert_eq!(
            Packet::new_checked(&good[..11]).unwrap_err(),
            Malformed::Truncated
        );
        let mut short = good.clone();
        short[field::LENGTH].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(
            Packet::new_checked(&short[..]).unwrap_err(),
            Malformed::Length
        );
    }
}
