//! What TCP and UDP share, written once for [`crate::tcp`] and [`crate::udp`]: ports at the
//! same offsets (RFC 9293 §3.1, RFC 768) and a checksum over an IPv4 pseudo-header and the
//! segment, kept right through rewrites in either [`Mode`].
//!
//! [`Segment`] is the view; [`crate::tcp::Packet`] and [`crate::udp::Packet`] are it for one
//! [`Protocol`], each adding its own `new_checked` and fields. Code that treats both alike
//! (NAT) is generic over `P: Protocol`.

use core::marker::PhantomData;
use core::ops::Range;
use std::net::Ipv4Addr;

use crate::checksum::{self, Mode};
use crate::{get16, set16};

/// Byte offsets both headers share: RFC 9293 §3.1 and RFC 768 put the ports first.
pub(crate) mod field {
    use core::ops::Range;
    pub const SRC_PORT: Range<usize> = 0..2;
    pub const DST_PORT: Range<usize> = 2..4;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::tcp::Tcp {}
    impl Sealed for crate::udp::Udp {}
}

/// TCP or UDP: where the checksum is and which bytes it covers.
pub trait Protocol: sealed::Sealed {
    /// The IPv4 protocol number, summed in the pseudo-header.
    const NUMBER: u8;
    /// Where the checksum field is.
    const CHECKSUM: Range<usize>;
    /// UDP over IPv4 (RFC 768): a zero field means "no checksum", and a computed zero is sent
    /// as 0xffff, the other one's-complement zero.
    const ZERO_IS_NONE: bool;
    /// How many leading bytes of a checked buffer the checksum covers.
    fn covered(buffer: &[u8]) -> usize;
}

/// A view over a TCP segment or UDP datagram whose header was checked by the protocol's
/// `new_checked`.
#[derive(Debug)]
pub struct Segment<T: AsRef<[u8]>, P: Protocol> {
    buffer: T,
    protocol: PhantomData<P>,
}

impl<T: AsRef<[u8]>, P: Protocol> Segment<T, P> {
    /// For the protocol's `new_checked`, once it has checked `buffer`.
    pub(crate) fn checked(buffer: T) -> Self {
        Segment {
            buffer,
            protocol: PhantomData,
        }
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// The bytes the checksum covers.
    fn covered(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        &b[..P::covered(b)]
    }

    pub fn src_port(&self) -> u16 {
        get16(self.bytes(), field::SRC_PORT)
    }

    pub fn dst_port(&self) -> u16 {
        get16(self.bytes(), field::DST_PORT)
    }

    /// The checksum field: a full checksum (for UDP, 0 for none) or a partial sum, as the
    /// caller's [`Mode`] says.
    pub fn checksum(&self) -> u16 {
        get16(self.bytes(), P::CHECKSUM)
    }

    /// True if the full checksum is right for a segment from `src` to `dst`, or absent (UDP's
    /// zero).
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        let seg = self.covered();
        self.absent(Mode::Full)
            || checksum::fold(pseudo::<P>(seg, src, dst) + checksum::sum(seg)) == 0xffff
    }

    /// True where a full checksum is absent (UDP's zero), so there is nothing to keep right.
    fn absent(&self, mode: Mode) -> bool {
        mode == Mode::Full && P::ZERO_IS_NONE && self.checksum() == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>, P: Protocol> Segment<T, P> {
    fn covered_mut(&mut self) -> &mut [u8] {
        let b = self.buffer.as_mut();
        let len = P::covered(b);
        &mut b[..len]
    }

    fn set_checksum(&mut self, value: u16) {
        set16(self.buffer.as_mut(), P::CHECKSUM, value);
    }

    /// Stores a finished checksum, minding UDP's zero.
    fn set_full(&mut self, check: u16) {
        self.set_checksum(if check == 0 && P::ZERO_IS_NONE {
            0xffff
        } else {
            check
        });
    }

    /// Sets the source port; a full checksum is updated (RFC 1624) unless absent, a partial
    /// one does not cover it (the header is summed at completion).
    pub fn set_src_port(&mut self, port: u16, mode: Mode) {
        self.set_port(field::SRC_PORT, port, mode);
    }

    /// Sets the destination port; see [`Segment::set_src_port`].
    pub fn set_dst_port(&mut self, port: u16, mode: Mode) {
        self.set_port(field::DST_PORT, port, mode);
    }

    fn set_port(&mut self, at: Range<usize>, port: u16, mode: Mode) {
        if mode == Mode::Full && !self.absent(mode) {
            let old = get16(self.bytes(), at.clone());
            self.set_full(checksum::update16(self.checksum(), old, port));
        }
        set16(self.buffer.as_mut(), at, port);
    }

    /// Adjusts the checksum for an IPv4 address in the pseudo-header that changed from `old`
    /// to `new`; the caller rewrites the IPv4 header ([`crate::ipv4::Packet::set_src`]). A
    /// full checksum is updated (RFC 1624), a partial sum moves by the same difference
    /// uncomplemented, and an absent one (UDP's zero) stays absent.
    pub fn readdress(&mut self, old: Ipv4Addr, new: Ipv4Addr, mode: Mode) {
        let (old, new) = (old.to_bits(), new.to_bits());
        match mode {
            _ if self.absent(mode) => {}
            Mode::Full => self.set_full(checksum::update32(self.checksum(), old, new)),
            Mode::Partial => self.set_checksum(checksum::adjust32(self.checksum(), old, new)),
        }
    }

    /// Computes the checksum field from scratch for a segment from `src` to `dst`: the full
    /// checksum, or what a sender that leaves completion to the device stores (the folded
    /// pseudo-header sum).
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr, mode: Mode) {
        let pseudo = pseudo::<P>(self.covered(), src, dst);
        match mode {
            Mode::Full => {
                self.set_checksum(0);
                let check = checksum::finish(pseudo + checksum::sum(self.covered()));
                self.set_full(check);
            }
            Mode::Partial => self.set_checksum(checksum::fold(pseudo)),
        }
    }

    /// Completes a [`Mode::Partial`] sum into the full checksum, as the device would: the field
    /// holds the pseudo-header sum, so the sum of the segment finishes it.
    pub fn complete_checksum(&mut self) {
        let check = checksum::finish(checksum::sum(self.covered_mut()));
        self.set_full(check);
    }
}

fn pseudo<P: Protocol>(seg: &[u8], src: Ipv4Addr, dst: Ipv4Addr) -> u64 {
    // A segment is at most an IPv4 payload, so its length fits.
    checksum::pseudo_v4(src, dst, P::NUMBER, seg.len() as u32)
}
