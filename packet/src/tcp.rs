//! TCP header (RFC 9293 §3.1): a view over a segment (the IPv4 payload) with port setters and
//! an address change that keep the checksum right in either [`Mode`].
//!
//! ```text
//!  0                   1                   2                   3
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |          Source Port          |       Destination Port        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                        Sequence Number                        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    Acknowledgment Number                      |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |  Data |       |C|E|U|A|P|R|S|F|                               |
//! | Offset| Rsrvd |W|C|R|C|S|S|Y|I|            Window             |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |           Checksum            |         Urgent Pointer        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//! The view spans the whole segment because the checksum covers it; options are skipped.

use std::net::Ipv4Addr;

use crate::checksum;
use crate::ipv4::protocol;
use crate::l4::{self, Segment};

/// Byte offsets of the TCP header, RFC 9293 §3.1 (the ports are in [`crate::l4`]).
mod field {
    use core::ops::Range;
    pub const SEQ: Range<usize> = 4..8;
    pub const ACK: Range<usize> = 8..12;
    /// Data Offset in the high nibble, in 32-bit words.
    pub const DATA_OFFSET: usize = 12;
    pub const FLAGS: usize = 13;
    pub const CHECKSUM: Range<usize> = 16..18;
    pub const OPTIONS: usize = 20;
}

/// Control bits in [`field::FLAGS`] (RFC 9293 §3.1).
mod flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// Length of a TCP header without options.
pub const MIN_HEADER_LEN: usize = field::OPTIONS;

/// The TCP [`l4::Protocol`].
#[derive(Debug)]
pub enum Tcp {}

impl l4::Protocol for Tcp {
    const NUMBER: u8 = protocol::TCP;
    const CHECKSUM: core::ops::Range<usize> = field::CHECKSUM;
    const ZERO_IS_NONE: bool = false;
    /// All of it: the view spans the segment (the IPv4 payload).
    fn covered(buffer: &[u8]) -> usize {
        buffer.len()
    }
}

/// A view over a TCP segment: the shared [`Segment`] (ports, checksum) plus the fields here.
pub type Packet<T> = Segment<T, Tcp>;

/// Why bytes are not a TCP segment. Nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Fewer bytes than a minimal header or than Data Offset says.
    #[error("truncated TCP segment")]
    Truncated,
    /// Data Offset below 5 words.
    #[error("TCP data offset below the header length")]
    DataOffset,
}

impl<T: AsRef<[u8]>> Segment<T, Tcp> {
    /// Checks that `buffer` (the whole segment: the checksum covers all of it) holds a header
    /// of Data Offset words.
    pub fn new_checked(buffer: T) -> Result<Self, Malformed> {
        let b = buffer.as_ref();
        if b.len() < MIN_HEADER_LEN {
            return Err(Malformed::Truncated);
        }
        let header = usize::from(b[field::DATA_OFFSET] >> 4) * 4;
        if header < MIN_HEADER_LEN {
            return Err(Malformed::DataOffset);
        }
        if b.len() < header {
            return Err(Malformed::Truncated);
        }
        Ok(Segment::checked(buffer))
    }

    pub fn seq_number(&self) -> u32 {
        get32(&self.bytes()[field::SEQ])
    }

    pub fn ack_number(&self) -> u32 {
        get32(&self.bytes()[field::ACK])
    }

    /// The header length in bytes, options included (Data Offset counts 32-bit words).
    pub fn header_len(&self) -> usize {
        usize::from(self.bytes()[field::DATA_OFFSET] >> 4) * 4
    }

    /// The control bits (FIN, SYN, RST, PSH, ACK, URG, ECE, CWR, low bit first).
    pub fn flags(&self) -> u8 {
        self.bytes()[field::FLAGS]
    }

    fn flag(&self, bit: u8) -> bool {
        self.flags() & bit != 0
    }

    pub fn fin(&self) -> bool {
        self.flag(flag::FIN)
    }

    pub fn syn(&self) -> bool {
        self.flag(flag::SYN)
    }

    pub fn rst(&self) -> bool {
        self.flag(flag::RST)
    }

    pub fn ack(&self) -> bool {
        self.flag(flag::ACK)
    }

    pub fn payload(&self) -> &[u8] {
        &self.bytes()[self.header_len()..]
    }
}

/// A reset to build from scratch: the header without options, window 0 (RFC 9293 §3.10.7.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reset {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    /// Acknowledged sequence number, if the reset carries ACK.
    pub ack: Option<u32>,
}

impl Reset {
    /// The reset that answers `segment` (RFC 9293 §3.10.7.1): with its ACK, from that
    /// sequence number; without, acknowledging everything it carried.
    pub fn answering<T: AsRef<[u8]>>(segment: &Packet<T>) -> Reset {
        let (src_port, dst_port) = (segment.dst_port(), segment.src_port());
        if segment.ack() {
            return Reset {
                src_port,
                dst_port,
                seq: segment.ack_number(),
                ack: None,
            };
        }
        let len =
            segment.payload().len() as u32 + u32::from(segment.syn()) + u32::from(segment.fin());
        Reset {
            src_port,
            dst_port,
            seq: 0,
            ack: Some(segment.seq_number().wrapping_add(len)),
        }
    }

    /// Writes the [`MIN_HEADER_LEN`]-byte header into `buf` with its checksum for a segment
    /// from `src` to `dst`. Returns the header length.
    pub fn emit(&self, buf: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr) -> usize {
        let b = &mut buf[..MIN_HEADER_LEN];
        b.fill(0);
        b[l4::field::SRC_PORT].copy_from_slice(&self.src_port.to_be_bytes());
        b[l4::field::DST_PORT].copy_from_slice(&self.dst_port.to_be_bytes());
        b[field::SEQ].copy_from_slice(&self.seq.to_be_bytes());
        b[field::ACK].copy_from_slice(&self.ack.unwrap_or(0).to_be_bytes());
        b[field::DATA_OFFSET] = (MIN_HEADER_LEN as u8 / 4) << 4;
        b[field::FLAGS] = flag::RST | if self.ack.is_some() { flag::ACK } else { 0 };
        Segment::<&mut [u8], Tcp>::checked(b).fill_checksum(src, dst, checksum::Mode::Full);
        MIN_HEADER_LEN
    }
}

fn get32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::Mode;
    use etherparse::TcpHeader;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn emit(h: &TcpHeader, payload: &[u8]) -> Vec<u8> {
        [h.to_bytes().to_vec(), payload.to_vec()].concat()
    }

    fn header() -> impl Strategy<Value = TcpHeader> {
        (
            any::<[u16; 2]>(),
            any::<[u32; 2]>(),
            any::<u8>(),
            0usize..=10,
        )
            .prop_map(|([sport, dport], [seq, ack], flags, options)| {
                let mut h = TcpHeader::new(sport, dport, seq, 1024);
                h.acknowledgment_number = ack;
                (h.fin, h.syn, h.rst, h.ack) = (
                    flags & 1 != 0,
                    flags & 2 != 0,
                    flags & 4 != 0,
                    flags & 16 != 0,
                );
                h.set_options_raw(&vec![1u8; options * 4]).unwrap();
                h
            })
    }

    proptest! {
        /// parse(emit): every getter reads what etherparse wrote, options skipped.
        #[test]
        fn reads_what_etherparse_emits(h in header(), payload in vec(any::<u8>(), 0..64)) {
            let bytes = emit(&h, &payload);
            let p = Packet::new_checked(&bytes[..]).unwrap();
            prop_assert_eq!((p.src_port(), p.dst_port()), (h.source_port, h.destination_port));
            prop_assert_eq!((p.seq_number(), p.ack_number()), (h.sequence_number, h.acknowledgment_number));
            prop_assert_eq!((p.fin(), p.syn(), p.rst(), p.ack()), (h.fin, h.syn, h.rst, h.ack));
            prop_assert_eq!(p.header_len(), h.header_len());
            prop_assert_eq!(p.checksum(), h.checksum);
            prop_assert_eq!(p.payload(), &payload[..]);
        }

        /// Full mode: ports and addresses rewritten one at a time leave the checksum etherparse
        /// computes for the new segment. Partial mode: the same rewrites of the pseudo-header
        /// sum, completed, give the same bytes.
        #[test]
        fn rewrites_keep_the_checksum_in_both_modes(
            h in header(), payload in vec(any::<u8>(), 0..600),
            addrs: [[u8; 4]; 4], ports: [u16; 2],
        ) {
            let [src, dst, new_src, new_dst] = addrs.map(Ipv4Addr::from);
            let mut full = emit(&h, &payload);
            Packet::new_checked(&mut full[..]).unwrap().fill_checksum(src, dst, Mode::Full);
            let mut partial = full.clone();
            Packet::new_checked(&mut partial[..]).unwrap().fill_checksum(src, dst, Mode::Partial);
            for (bytes, mode) in [(&mut full, Mode::Full), (&mut partial, Mode::Partial)] {
                let mut p = Packet::new_checked(&mut bytes[..]).unwrap();
                p.set_src_port(ports[0], mode);
                p.readdress(src, new_src, mode);
                p.set_dst_port(ports[1], mode);
                p.readdress(dst, new_dst, mode);
            }
            Packet::new_checked(&mut partial[..]).unwrap().complete_checksum();
            prop_assert_eq!(&full, &partial);
            let (t, rest) = TcpHeader::from_slice(&full).unwrap();
            prop_assert_eq!((t.source_port, t.destination_port), (ports[0], ports[1]));
            prop_assert_eq!(t.checksum, t.calc_checksum_ipv4_raw(new_src.octets(), new_dst.octets(), rest).unwrap());
            prop_assert!(Packet::new_checked(&full[..]).unwrap().verify_checksum(new_src, new_dst));
        }
    }

    #[test]
    fn refuses_what_is_not_a_whole_header() {
        let mut h = TcpHeader::new(1, 2, 3, 4);
        h.set_options_raw(&[1; 8]).unwrap();
        let good = emit(&h, b"");
        assert!(Packet::new_checked(&good[..]).is_ok());
        assert_eq!(
            Packet::new_checked(&good[..19]).unwrap_err(),
            Malformed::Truncated
        );
        assert_eq!(
            Packet::new_checked(&good[..27]).unwrap_err(),
            Malformed::Truncated
        );
        let mut short = good.clone();
        short[field::DATA_OFFSET] = 4 << 4;
        assert_eq!(
            Packet::new_checked(&short[..]).unwrap_err(),
            Malformed::DataOffset
        );
    }
}
