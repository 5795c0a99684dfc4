//! ICMPv4 Destination Unreachable (RFC 792): the one ICMP message overlayd sends, when a UDP
//! datagram to a service has no task to go to.
//!
//! ```text
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |   Type (3)    |     Code      |          Checksum             |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                             unused                            |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |      Internet Header + 64 bits of Original Data Datagram      |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use crate::{checksum, set16};

mod field {
    use core::ops::Range;
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: Range<usize> = 2..4;
    pub const ORIGINAL: usize = 8;
}

pub const HEADER_LEN: usize = field::ORIGINAL;
const DESTINATION_UNREACHABLE: u8 = 3;
/// Code 3: the destination's transport has no listener on that port.
pub const PORT_UNREACHABLE: u8 = 3;

/// A Destination Unreachable message to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unreachable<'a> {
    pub code: u8,
    /// The offending datagram's IP header and the first 8 bytes of its payload.
    pub original: &'a [u8],
}

impl Unreachable<'_> {
    /// The message's length.
    pub fn len(&self) -> usize {
        HEADER_LEN + self.original.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the message with its checksum into `buf`, which must hold [`Unreachable::len`]
    /// bytes. Returns that length.
    pub fn emit(&self, buf: &mut [u8]) -> usize {
        let b = &mut buf[..self.len()];
        b[..HEADER_LEN].fill(0);
        b[field::TYPE] = DESTINATION_UNREACHABLE;
        b[field::CODE] = self.code;
        b[field::ORIGINAL..].copy_from_slice(self.original);
        let check = checksum::finish(checksum::sum(b));
        set16(b, field::CHECKSUM, check);
        b.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_unreachable_checksums_to_zero() {
        let original = [
            0x45u8, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8,
        ];
        let mut buf = [0xffu8; 64];
        let message = Unreachable {
            code: PORT_UNREACHABLE,
            original: &original,
        };
        let n = message.emit(&mut buf);
        assert_eq!(n, 28);
        assert_eq!(&buf[..2], &[3, 3]);
        assert_eq!(&buf[4..8], &[0; 4]);
        assert_eq!(&buf[8..n], &original);
        assert_eq!(checksum::fold(checksum::sum(&buf[..n])), 0xffff);
    }
}
