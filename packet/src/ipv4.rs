//! IPv4 header (RFC 791 §3.1): a view over packet bytes whose address setters keep the header
//! checksum right incrementally (RFC 1624).
//!
//! ```text
//!  0                   1                   2                   3
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Version|  IHL  |Type of Service|          Total Length         |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |         Identification        |Flags|      Fragment Offset    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |  Time to Live |    Protocol   |         Header Checksum       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                       Source Address                          |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    Destination Address                        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//! Options are skipped (IHL), not interpreted. Bytes after Total Length (Ethernet padding) are
//! not part of the packet.

use std::net::Ipv4Addr;

use crate::{checksum, get16, set16};

/// Byte offsets of the IPv4 header, RFC 791 §3.1.
mod field {
    use core::ops::Range;
    pub const VER_IHL: usize = 0;
    pub const LENGTH: Range<usize> = 2..4;
    pub const FLAGS_FRAGMENT: Range<usize> = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Range<usize> = 10..12;
    pub const SRC: Range<usize> = 12..16;
    pub const DST: Range<usize> = 16..20;
    pub const OPTIONS: usize = 20;
}

/// Length of an IPv4 header without options.
pub const MIN_HEADER_LEN: usize = field::OPTIONS;
/// The MF flag and the fragment offset (RFC 791 §3.1): any bit set makes a fragment.
const MORE_FRAGMENTS_OR_OFFSET: u16 = 0x3fff;

/// Protocol numbers (IANA "Assigned Internet Protocol Numbers") of the payloads viewed here.
pub mod protocol {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Why bytes are not an IPv4 packet. Nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Fewer bytes than a minimal header, than IHL or than Total Length says.
    #[error("truncated IPv4 packet")]
    Truncated,
    /// The version field is not 4.
    #[error("IP version is not 4")]
    Version,
    /// IHL below 5 words, or Total Length below the header length.
    #[error("IPv4 IHL or total length below the header length")]
    Length,
}

/// A view over an IPv4 packet whose header and length fields were checked.
#[derive(Debug)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Checks that `buffer` holds a whole IPv4 packet: version 4, a header of IHL words and
    /// Total Length bytes (more bytes may follow).
    pub fn new_checked(buffer: T) -> Result<Self, Malformed> {
        let b = buffer.as_ref();
        if b.len() < MIN_HEADER_LEN {
            return Err(Malformed::Truncated);
        }
        let p = Packet { buffer };
        if p.version() != 4 {
            return Err(Malformed::Version);
        }
        let (header, total) = (p.header_len(), usize::from(p.total_len()));
        if header < MIN_HEADER_LEN || total < header {
            return Err(Malformed::Length);
        }
        if p.buffer.as_ref().len() < total {
            return Err(Malformed::Truncated);
        }
        Ok(p)
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }

    /// The header length in bytes (IHL counts 32-bit words).
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }

    /// Header plus payload, in bytes.
    pub fn total_len(&self) -> u16 {
        get16(self.buffer.as_ref(), field::LENGTH)
    }

    /// True for any fragment, first or later: a later one carries no TCP/UDP header, and the
    /// first one's transport checksum covers bytes it does not hold.
    pub fn is_fragment(&self) -> bool {
        get16(self.buffer.as_ref(), field::FLAGS_FRAGMENT) & MORE_FRAGMENTS_OR_OFFSET != 0
    }

    /// The payload's protocol number (see [`protocol`]).
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }

    pub fn checksum(&self) -> u16 {
        get16(self.buffer.as_ref(), field::CHECKSUM)
    }

    pub fn src(&self) -> Ipv4Addr {
        self.addr(field::SRC)
    }

    pub fn dst(&self) -> Ipv4Addr {
        self.addr(field::DST)
    }

    fn addr(&self, at: core::ops::Range<usize>) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[at];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    /// True if the header checksum is right.
    pub fn verify_checksum(&self) -> bool {
        checksum::fold(checksum::sum(self.header())) == 0xffff
    }

    fn header(&self) -> &[u8] {
        &self.buffer.as_ref()[..self.header_len()]
    }

    /// The bytes after the header, up to Total Length.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..usize::from(self.total_len())]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the source address and updates the header checksum (RFC 1624). The TCP/UDP
    /// checksum, whose pseudo-header holds the address too, is the payload view's business:
    /// [`crate::tcp::Packet::readdress`], [`crate::udp::Packet::readdress`].
    pub fn set_src(&mut self, addr: Ipv4Addr) {
        self.set_addr(field::SRC, addr);
    }

    /// Sets the destination address; see [`Packet::set_src`].
    pub fn set_dst(&mut self, addr: Ipv4Addr) {
        self.set_addr(field::DST, addr);
    }

    fn set_addr(&mut self, at: core::ops::Range<usize>, addr: Ipv4Addr) {
        let old = self.addr(at.clone()).to_bits();
        let check = checksum::update32(self.checksum(), old, addr.to_bits());
        let b = self.buffer.as_mut();
        b[at].copy_from_slice(&addr.octets());
        set16(b, field::CHECKSUM, check);
    }

    /// Computes the header checksum from scratch (for a header built or changed wholesale;
    /// the setters here update it themselves).
    pub fn fill_checksum(&mut self) {
        set16(self.buffer.as_mut(), field::CHECKSUM, 0);
        let check = checksum::finish(checksum::sum(self.header()));
        set16(self.buffer.as_mut(), field::CHECKSUM, check);
    }

    /// The bytes after the header, up to Total Length.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let range = self.header_len()..usize::from(self.total_len());
        &mut self.buffer.as_mut()[range]
    }
}

/// A header to build from scratch (no options): what a reply generated here carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repr {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub payload_len: u16,
}

impl Repr {
    /// Writes the [`MIN_HEADER_LEN`]-byte header (TTL 64, don't fragment) with its checksum
    /// into `buf`, which must hold it. Returns the header length.
    pub fn emit(&self, buf: &mut [u8]) -> usize {
        let b = &mut buf[..MIN_HEADER_LEN];
        b.fill(0);
        b[field::VER_IHL] = 0x45;
        set16(b, field::LENGTH, MIN_HEADER_LEN as u16 + self.payload_len);
        set16(b, field::FLAGS_FRAGMENT, 0x4000);
        b[field::TTL] = 64;
        b[field::PROTOCOL] = self.protocol;
        b[field::SRC].copy_from_slice(&self.src.octets());
        b[field::DST].copy_from_slice(&self.dst.octets());
        let check = checksum::finish(checksum::sum(b));
        set16(b, field::CHECKSUM, check);
        MIN_HEADER_LEN
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{IpFragOffset, IpNumber, Ipv4Header, Ipv4Options};
    use proptest::collection::vec;
    use proptest::prelude::*;

    /// An IPv4 packet emitted by etherparse with `options` words of options and `pad` bytes
    /// after it (Ethernet padding).
    fn emit(src: [u8; 4], dst: [u8; 4], options: usize, payload: &[u8], pad: usize) -> Vec<u8> {
        let mut h = Ipv4Header::new(payload.len() as u16, 64, IpNumber(17), src, dst).unwrap();
        h.options = Ipv4Options::try_from(&vec![1u8; options * 4][..]).unwrap();
        h.set_payload_len(payload.len()).unwrap();
        h.header_checksum = h.calc_header_checksum();
        let mut out = h.to_bytes().to_vec();
        out.extend_from_slice(payload);
        out.resize(out.len() + pad, 0xee);
        out
    }

    proptest! {
        /// parse(emit): every getter reads what etherparse wrote, options and padding skipped.
        #[test]
        fn reads_what_etherparse_emits(
            src: [u8; 4], dst: [u8; 4], options in 0usize..=10,
            payload in vec(any::<u8>(), 0..100), pad in 0usize..8,
        ) {
            let bytes = emit(src, dst, options, &payload, pad);
            let p = Packet::new_checked(&bytes[..]).unwrap();
            prop_assert_eq!(p.version(), 4);
            prop_assert_eq!(p.header_len(), MIN_HEADER_LEN + options * 4);
            prop_assert_eq!(usize::from(p.total_len()), p.header_len() + payload.len());
            prop_assert_eq!(p.protocol(), protocol::UDP);
            prop_assert_eq!(p.src(), Ipv4Addr::from(src));
            prop_assert_eq!(p.dst(), Ipv4Addr::from(dst));
            let (h, _) = Ipv4Header::from_slice(&bytes).unwrap();
            prop_assert_eq!(p.checksum(), h.header_checksum);
            prop_assert!(p.verify_checksum());
            prop_assert_eq!(p.payload(), &payload[..]);
            prop_assert!(!p.is_fragment());
        }

        /// The address setters leave a header checksum etherparse recomputes to the same value.
        #[test]
        fn set_addresses_keep_the_header_checksum(
            src: [u8; 4], dst: [u8; 4], new_src: [u8; 4], new_dst: [u8; 4], options in 0usize..=10,
        ) {
            let mut bytes = emit(src, dst, options, b"payload", 0);
            let mut p = Packet::new_checked(&mut bytes[..]).unwrap();
            let before = p.checksum();
            p.fill_checksum();
            prop_assert_eq!(p.checksum(), before);
            p.set_src(new_src.into());
            prop_assert_eq!(p.src(), Ipv4Addr::from(new_src));
            p.set_dst(new_dst.into());
            prop_assert_eq!(p.dst(), Ipv4Addr::from(new_dst));
            let (h, payload) = Ipv4Header::from_slice(&bytes).unwrap();
            prop_assert_eq!(h.header_checksum, h.calc_header_checksum());
            prop_assert!(Packet::new_checked(&bytes[..]).unwrap().verify_checksum());
            prop_assert_eq!((h.source, h.destination), (new_src, new_dst));
            prop_assert_eq!(payload, b"payload");
        }
    }

    #[test]
    fn fragments_are_recognised() {
        let mut h = Ipv4Header::new(8, 64, IpNumber(17), [198, 19, 0, 1], [198, 19, 0, 2]).unwrap();
        h.dont_fragment = true;
        let whole = [h.to_bytes().to_vec(), vec![0; 8]].concat();
        assert!(!Packet::new_checked(&whole[..]).unwrap().is_fragment());
        h.more_fragments = true;
        let first = [h.to_bytes().to_vec(), vec![0; 8]].concat();
        assert!(Packet::new_checked(&first[..]).unwrap().is_fragment());
        h.more_fragments = false;
        h.fragment_offset = IpFragOffset::try_new(1).unwrap();
        let last = [h.to_bytes().to_vec(), vec![0; 8]].concat();
        assert!(Packet::new_checked(&last[..]).unwrap().is_fragment());
    }

    #[test]
    fn refuses_what_is_not_a_whole_packet() {
        let good = emit([198, 19, 0, 1], [198, 19, 0, 2], 1, b"12345678", 0);
        assert!(Packet::new_checked(&good[..]).is_ok());
        assert_eq!(
            Packet::new_checked(&good[..19]).unwrap_err(),
            Malformed::Truncated
        );
        // Shorter than Total Length, and than IHL.
        assert_eq!(
            Packet::new_checked(&good[..good.len() - 1]).unwrap_err(),
            Malformed::Truncated
        );
        let mut long_ihl = good.clone();
        long_ihl[0] = 0x4f;
        assert_eq!(
            Packet::new_checked(&long_ihl[..]).unwrap_err(),
            Malformed::Length
        );
        let mut v6 = good.clone();
        v6[0] = 0x65;
        assert_eq!(
            Packet::new_checked(&v6[..]).unwrap_err(),
            Malformed::Version
        );
        let mut short_ihl = good.clone();
        short_ihl[0] = 0x44;
        assert_eq!(
            Packet::new_checked(&short_ihl[..]).unwrap_err(),
            Malformed::Length
        );
        let mut short_total = good.clone();
        short_total[2..4].copy_from_slice(&23u16.to_be_bytes());
        assert_eq!(
            Packet::new_checked(&short_total[..]).unwrap_err(),
            Malformed::Length
        );
    }
}
