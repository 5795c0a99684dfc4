//! The virtio-net header that precedes every frame on a TAP opened with `IFF_VNET_HDR`
//! (`struct virtio_net_hdr` in `linux/virtio_net.h`, the legacy 10-byte form).
//!
//! With no offloads enabled every header the kernel gives us is zero and we write zeros.
//! With offloads, `gso_type`/`gso_size` describe a super-frame to be segmented and
//! `csum_start`/`csum_offset` a checksum left for us to finish. In TAP mode both offsets
//! count from the start of the Ethernet header. Fields are in native byte order (the tun
//! driver's default for the legacy header).

/// Byte offsets of `struct virtio_net_hdr`.
mod field {
    use core::ops::Range;
    pub const FLAGS: usize = 0;
    pub const GSO_TYPE: usize = 1;
    pub const HDR_LEN: Range<usize> = 2..4;
    pub const GSO_SIZE: Range<usize> = 4..6;
    pub const CSUM_START: Range<usize> = 6..8;
    pub const CSUM_OFFSET: Range<usize> = 8..10;
}

/// Length of the header on the TAP (set with `TUNSETVNETHDRSZ`).
pub const HEADER_LEN: usize = 10;

/// `flags`: the checksum at `csum_start + csum_offset` must still be completed.
pub const FLAG_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum has been validated.
pub const FLAG_DATA_VALID: u8 = 2;

/// `gso_type` values.
pub mod gso {
    pub const NONE: u8 = 0;
    pub const TCPV4: u8 = 1;
    pub const UDP: u8 = 3;
    pub const TCPV6: u8 = 4;
    pub const UDP_L4: u8 = 5;
    pub const ECN: u8 = 0x80;
}

/// The meaning of a virtio-net header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

fn get(b: &[u8], r: core::ops::Range<usize>) -> u16 {
    u16::from_ne_bytes([b[r.start], b[r.start + 1]])
}

impl Header {
    /// Parses the first [`HEADER_LEN`] bytes; `None` if there are fewer.
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_LEN {
            return None;
        }
        Some(Header {
            flags: b[field::FLAGS],
            gso_type: b[field::GSO_TYPE],
            hdr_len: get(b, field::HDR_LEN),
            gso_size: get(b, field::GSO_SIZE),
            csum_start: get(b, field::CSUM_START),
            csum_offset: get(b, field::CSUM_OFFSET),
        })
    }

    /// Writes the header into `out[..HEADER_LEN]`.
    pub fn emit(&self, out: &mut [u8]) {
        out[field::FLAGS] = self.flags;
        out[field::GSO_TYPE] = self.gso_type;
        out[field::HDR_LEN].copy_from_slice(&self.hdr_len.to_ne_bytes());
        out[field::GSO_SIZE].copy_from_slice(&self.gso_size.to_ne_bytes());
        out[field::CSUM_START].copy_from_slice(&self.csum_start.to_ne_bytes());
        out[field::CSUM_OFFSET].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }

    /// True if the frame is a GSO super-frame that must be segmented.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !gso::ECN != gso::NONE
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & FLAG_NEEDS_CSUM != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parse_emit_round_trip(flags: u8, gso_type: u8, hdr_len: u16, gso_size: u16, csum_start: u16, csum_offset: u16) {
            let h = Header { flags, gso_type, hdr_len, gso_size, csum_start, csum_offset };
            let mut b = [0u8; HEADER_LEN];
            h.emit(&mut b);
            prop_assert_eq!(Header::parse(&b), Some(h));
        }
    }

    #[test]
    fn zero_is_plain_frame() {
        let h = Header::parse(&[0; HEADER_LEN]).unwrap();
        assert!(!h.is_gso());
        assert!(!h.needs_csum());
        assert!(Header::parse(&[0; 9]).is_none());
    }
}
