//! VXLAN header (RFC 7348 §5): a view over received bytes and a plain value to emit.
//!
//! ```text
//!  0                   1                   2                   3
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |R|R|R|R|I|R|R|R|            Reserved                           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//! The I flag must be set; reserved bits are zero on send and ignored on receive (§5).

use std::fmt;
use std::str::FromStr;

/// Byte offsets of the VXLAN header, RFC 7348 §5.
mod field {
    use core::ops::Range;
    pub const FLAGS: usize = 0;
    pub const VNI: Range<usize> = 4..7;
    pub const INNER: usize = 8;
}

/// Length of the VXLAN header in bytes.
pub const HEADER_LEN: usize = field::INNER;
/// The I flag (bit 3 of the first octet): "the VNI is valid".
pub const FLAG_I: u8 = 0x08;
/// The IANA-assigned VXLAN UDP port (RFC 7348 §5).
pub const PORT: u16 = 4789;

/// A 24-bit VXLAN Network Identifier.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Vni(u32);

impl Vni {
    /// The largest VNI, 2^24 - 1.
    pub const MAX: u32 = 0x00ff_ffff;

    /// `None` if `vni` does not fit in 24 bits.
    pub fn new(vni: u32) -> Option<Vni> {
        (vni <= Self::MAX).then_some(Vni(vni))
    }

    pub fn get(self) -> u32 {
        self.0
    }

    /// The VNI in three bytes of a header.
    pub fn from_bytes(b: [u8; 3]) -> Vni {
        Vni(u32::from_be_bytes([0, b[0], b[1], b[2]]))
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A string that is not a number in 0..=16777215. Nothing was parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid VNI {0:?}: expected a number from 0 to 16777215")]
pub struct ParseVniError(String);

impl FromStr for Vni {
    type Err = ParseVniError;
    fn from_str(s: &str) -> Result<Vni, ParseVniError> {
        s.parse::<u32>()
            .ok()
            .and_then(Vni::new)
            .ok_or_else(|| ParseVniError(s.to_owned()))
    }
}

/// Why a datagram is not a VXLAN packet we accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Shorter than the 8-byte VXLAN header.
    #[error("shorter than a VXLAN header")]
    Short,
    /// The I flag is clear, so the VNI is not valid (RFC 7348 §5).
    #[error("I flag not set")]
    NoIFlag,
}

/// A view of a VXLAN header at the start of a UDP payload.
#[derive(Debug, Clone, Copy)]
pub struct Header<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Checks length and the I flag.
    pub fn new_checked(buffer: T) -> Result<Self, Malformed> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Malformed::Short);
        }
        if b[field::FLAGS] & FLAG_I == 0 {
            return Err(Malformed::NoIFlag);
        }
        Ok(Header { buffer })
    }

    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    pub fn vni(&self) -> Vni {
        let b = &self.buffer.as_ref()[field::VNI];
        Vni::from_bytes([b[0], b[1], b[2]])
    }

    /// The encapsulated Ethernet frame.
    pub fn inner(&self) -> &[u8] {
        &self.buffer.as_ref()[field::INNER..]
    }
}

/// The meaning of a VXLAN header: all we carry is the VNI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repr {
    pub vni: Vni,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(header: &Header<T>) -> Repr {
        Repr { vni: header.vni() }
    }

    /// Writes the header into `out[..8]`: flags = I, every reserved bit zero.
    pub fn emit(&self, out: &mut [u8]) {
        let out = &mut out[..HEADER_LEN];
        out.fill(0);
        out[field::FLAGS] = FLAG_I;
        out[field::VNI].copy_from_slice(&self.vni.0.to_be_bytes()[1..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn vni_is_24_bits() {
        assert_eq!(Vni::new(0xff_ffff).unwrap().get(), 0xff_ffff);
        assert!(Vni::new(0x100_0000).is_none());
        assert_eq!("4096".parse::<Vni>().unwrap().get(), 4096);
        assert!("16777216".parse::<Vni>().is_err());
        assert!("x".parse::<Vni>().is_err());
    }

    #[test]
    fn emit_known_bytes() {
        let mut out = [0xaa; 8];
        Repr {
            vni: Vni::new(0x123456).unwrap(),
        }
        .emit(&mut out);
        assert_eq!(out, [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
    }

    #[test]
    fn rejects_short_and_no_i_flag() {
        assert_eq!(
            Header::new_checked(&[0x08u8; 7][..]).unwrap_err(),
            Malformed::Short
        );
        assert_eq!(
            Header::new_checked(&[0u8; 8][..]).unwrap_err(),
            Malformed::NoIFlag
        );
        // Reserved bits are ignored on receive.
        let h = Header::new_checked(&[0xff, 0xff, 0xff, 0xff, 0, 0, 7, 0xff][..]).unwrap();
        assert_eq!(h.vni().get(), 7);
    }

    proptest! {
        #[test]
        fn parse_emit_round_trip(vni in 0u32..=Vni::MAX, inner in proptest::collection::vec(any::<u8>(), 0..64)) {
            let repr = Repr { vni: Vni::new(vni).unwrap() };
            let mut buf = vec![0u8; HEADER_LEN + inner.len()];
            repr.emit(&mut buf);
            buf[HEADER_LEN..].copy_from_slice(&inner);
            let header = Header::new_checked(&buf[..]).unwrap();
            prop_assert_eq!(Repr::parse(&header), repr);
            prop_assert_eq!(header.inner(), &inner[..]);
            prop_assert_eq!(header.flags(), FLAG_I);
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            if let Ok(h) = Header::new_checked(&bytes[..]) {
                let _ = (h.vni(), h.inner());
            }
        }
    }
}
