//! Ethernet II: the [`Mac`] address type and a minimal frame view.
//!
//! Only what the switch needs: destination, source, EtherType and payload.
//! VLAN tags are not interpreted (the overlay carries untagged frames).

use std::fmt;
use std::str::FromStr;

/// Byte offsets of the Ethernet II header (IEEE 802.3 clause 3.1.1).
mod field {
    use core::ops::Range;
    pub const DST: Range<usize> = 0..6;
    pub const SRC: Range<usize> = 6..12;
    pub const ETHERTYPE: Range<usize> = 12..14;
    pub const PAYLOAD: usize = 14;
}

/// Length of an untagged Ethernet II header.
pub const HEADER_LEN: usize = field::PAYLOAD;

/// EtherType values the data plane looks at.
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const IPV6: u16 = 0x86dd;
}

/// A 48-bit IEEE 802 MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// `ff:ff:ff:ff:ff:ff`.
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// True for group addresses (the I/G bit), which includes broadcast.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub(crate) fn from_slice(bytes: &[u8]) -> Mac {
        let mut mac = [0; 6];
        mac.copy_from_slice(&bytes[..6]);
        Mac(mac)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mac({self})")
    }
}

/// A string that is not six colon-separated hex octets. Nothing was parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex octets like 02:42:c6:13:00:05")]
pub struct ParseMacError(String);

impl FromStr for Mac {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Mac, ParseMacError> {
        let err = || ParseMacError(s.to_owned());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for octet in &mut mac {
            let part = parts.next().ok_or_else(err)?;
            if part.is_empty() || part.len() > 2 {
                return Err(err());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Mac(mac))
    }
}

/// A frame that cannot be an Ethernet II frame. Small and `Copy`; counted, not logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Fewer bytes than an Ethernet header.
    #[error("frame shorter than an Ethernet header")]
    Short,
}

/// A read-only or read-write view of an Ethernet II frame.
#[derive(Debug, Clone, Copy)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Checks that the header fits; everything from the wire comes through here.
    pub fn new_checked(buffer: T) -> Result<Self, Malformed> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(Malformed::Short);
        }
        Ok(Frame { buffer })
    }

    pub fn dst(&self) -> Mac {
        Mac::from_slice(&self.buffer.as_ref()[field::DST])
    }

    pub fn src(&self) -> Mac {
        Mac::from_slice(&self.buffer.as_ref()[field::SRC])
    }

    pub fn ethertype(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::ETHERTYPE];
        u16::from_be_bytes([b[0], b[1]])
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    pub fn set_dst(&mut self, mac: Mac) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&mac.0);
    }

    pub fn set_src(&mut self, mac: Mac) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&mac.0);
    }
}

/// Writes an Ethernet II header into the first [`HEADER_LEN`] bytes of `out`.
pub fn emit_header(out: &mut [u8], dst: Mac, src: Mac, ethertype: u16) {
    out[field::DST].copy_from_slice(&dst.0);
    out[field::SRC].copy_from_slice(&src.0);
    out[field::ETHERTYPE].copy_from_slice(&ethertype.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_display_and_parse_round_trip() {
        let mac = Mac([0x02, 0xab, 0x00, 0x13, 0xff, 0x05]);
        assert_eq!(mac.to_string(), "02:ab:00:13:ff:05");
        assert_eq!("02:ab:00:13:ff:05".parse::<Mac>().unwrap(), mac);
        assert_eq!("02:AB:0:13:ff:5".parse::<Mac>().unwrap(), mac);
    }

    #[test]
    fn mac_parse_rejects_garbage() {
        for bad in [
            "",
            "02:ab:00:13:ff",
            "02:ab:00:13:ff:05:06",
            "02:ab:00:13:ff:xx",
            "02:ab:00:13:ff:123",
            "02::00:13:ff:05",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn multicast_bit() {
        assert!(Mac::BROADCAST.is_multicast());
        assert!(Mac([0x01, 0, 0x5e, 0, 0, 1]).is_multicast());
        assert!(Mac([0x33, 0x33, 0, 0, 0, 1]).is_multicast());
        assert!(!Mac([0x02, 0x42, 0, 0, 0, 1]).is_multicast());
    }

    #[test]
    fn frame_view() {
        let mut buf = [0u8; 20];
        emit_header(
            &mut buf,
            Mac::BROADCAST,
            Mac([2, 0, 0, 0, 0, 1]),
            ethertype::ARP,
        );
        let f = Frame::new_checked(&buf[..]).unwrap();
        assert_eq!(f.dst(), Mac::BROADCAST);
        assert_eq!(f.src(), Mac([2, 0, 0, 0, 0, 1]));
        assert_eq!(f.ethertype(), ethertype::ARP);
        assert_eq!(f.payload().len(), 6);
        assert_eq!(
            Frame::new_checked(&buf[..13]).unwrap_err(),
            Malformed::Short
        );
    }
}
