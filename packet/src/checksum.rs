//! The Internet checksum (RFC 1071), the TCP/UDP pseudo-headers (RFC 9293 §3.1, RFC 8200 §8.1)
//! and incremental updates (RFC 1624).
//!
//! Arithmetic over byte slices and words only: where a checksum lives in a packet is the
//! business of the views ([`crate::ipv4`], [`crate::tcp`], [`crate::udp`]) and of their users.

use std::net::{Ipv4Addr, Ipv6Addr};

/// One's-complement accumulation of `data` as big-endian 16-bit words (an odd last byte is
/// padded with zero). Add results of even-length pieces freely, then [`fold`].
///
/// Every byte of every segment passes through here once per direction, so long inputs use
/// AVX2 where the CPU has it (the same loop, vectorised four times wider than the x86-64
/// baseline SSE2: about 3x the throughput).
pub fn sum(data: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if data.len() >= 256 && std::arch::is_x86_feature_detected!("avx2") {
        #[allow(unsafe_code)]
        // SAFETY: sum_avx2 only needs AVX2, which the CPU was just found to have.
        return unsafe { sum_avx2(data) };
    }
    sum_words(data)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_avx2(data: &[u8]) -> u64 {
    sum_words(data)
}

#[inline(always)]
fn sum_words(data: &[u8]) -> u64 {
    let mut acc = 0u64;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut i = 0;
    while i + 1 < rest.len() {
        acc += u64::from(u16::from_be_bytes([rest[i], rest[i + 1]]));
        i += 2;
    }
    if i < rest.len() {
        acc += u64::from(rest[i]) << 8;
    }
    acc
}

/// Folds an accumulated sum to 16 bits with end-around carry (not complemented).
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum to store: complement of the folded sum.
pub fn finish(acc: u64) -> u16 {
    !fold(acc)
}

/// Pseudo-header sum for IPv4 (source, destination, protocol, L4 length).
pub fn pseudo_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: u32) -> u64 {
    sum(&src.octets()) + sum(&dst.octets()) + u64::from(proto) + u64::from(len)
}

/// Pseudo-header sum for IPv6 (source, destination, upper-layer length, next header).
pub fn pseudo_v6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: u32) -> u64 {
    sum(&src.octets()) + sum(&dst.octets()) + u64::from(proto) + u64::from(len)
}

/// What a TCP/UDP checksum field holds, which decides how a rewrite changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The finished checksum, as on the wire: the complement of the sum over pseudo-header,
    /// header and payload.
    Full,
    /// Only the pseudo-header sum, folded and not complemented, for a device or the kernel to
    /// complete: a frame flagged `NEEDS_CSUM` in its virtio-net header, which every TSO/GSO
    /// super-frame is. The header and payload are summed at completion, so only a change in
    /// the pseudo-header (an address) moves the field; it moves by the difference, uncomplemented.
    Partial,
}

/// RFC 1624 eqn. 3: the checksum `check` after a 16-bit word it covers changed from `old` to
/// `new`, HC' = ~(~HC + ~m + m'), without summing the packet again.
pub fn update16(check: u16, old: u16, new: u16) -> u16 {
    finish(u64::from(!check) + replaced16(old, new))
}

/// [`update16`] for a 32-bit word (an IPv4 address): both halves at once.
pub fn update32(check: u16, old: u32, new: u32) -> u16 {
    finish(u64::from(!check) + replaced32(old, new))
}

/// A [`Mode::Partial`] sum after a 32-bit word it covers changed from `old` to `new`: the same
/// difference as [`update32`], added to the sum itself since it is not complemented.
pub fn adjust32(partial: u16, old: u32, new: u32) -> u16 {
    fold(u64::from(partial) + replaced32(old, new))
}

/// ~m + m': removing `old` from a one's-complement sum is adding its complement.
fn replaced16(old: u16, new: u16) -> u64 {
    u64::from(!old) + u64::from(new)
}

fn replaced32(old: u32, new: u32) -> u64 {
    replaced16((old >> 16) as u16, (new >> 16) as u16) + replaced16(old as u16, new as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        assert_eq!(
            fold(sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7])),
            0xddf2
        );
        assert_eq!(
            fold(sum(&[0x00, 0x01, 0xf2])),
            fold(sum(&[0x00, 0x01, 0xf2, 0x00]))
        );
    }

    #[test]
    fn vector_path_equals_the_plain_loop() {
        let data: Vec<u8> = (0..9001u32).map(|i| (i * 31 + 7) as u8).collect();
        for len in [255, 256, 257, 1398, 4096, 9001] {
            assert_eq!(
                fold(sum(&data[..len])),
                fold(sum_words(&data[..len])),
                "{len}"
            );
        }
    }

    /// RFC 1624 §4's example: HC 0xdd2f, m 0x5555 -> m' 0x3285 gives HC' 0x0000 (eqn. 3; the
    /// older eqn. 2 of RFC 1141 gives the other zero, 0xffff, which no full sum produces).
    #[test]
    fn rfc1624_example() {
        assert_eq!(update16(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    proptest::proptest! {
        /// Incremental equals recomputed, for any data and any one changed word, and the partial
        /// sum moves by the same difference.
        #[test]
        fn incremental_equals_recomputed(
            mut data in proptest::collection::vec(proptest::num::u8::ANY, 8..300),
            at in 0usize..1000,
            new in proptest::num::u32::ANY,
        ) {
            let at = (at % (data.len() / 4)) * 4;
            let word = |d: &[u8]| u32::from_be_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]]);
            // All-zero data sums to the one zero no packet has (an IPv4 header is never zero):
            // keep a bit set outside the changed word.
            let keep = (at + 4) % data.len();
            data[keep] |= 1;
            let old = word(&data);
            let check = finish(sum(&data));
            let partial = fold(sum(&data));
            let old16 = (old >> 16) as u16;
            data[at..at + 2].copy_from_slice(&((new >> 16) as u16).to_be_bytes());
            proptest::prop_assert_eq!(update16(check, old16, (new >> 16) as u16), finish(sum(&data)));
            data[at..at + 4].copy_from_slice(&new.to_be_bytes());
            proptest::prop_assert_eq!(update32(check, old, new), finish(sum(&data)));
            proptest::prop_assert_eq!(adjust32(partial, old, new), fold(sum(&data)));
        }
    }

    #[test]
    fn ipv4_header_checksum_matches_etherparse() {
        let ip = etherparse::Ipv4Header::new(
            100,
            64,
            etherparse::IpNumber::UDP,
            [198, 18, 0, 1],
            [198, 18, 0, 199],
        )
        .unwrap();
        let mut h = ip.to_bytes().to_vec();
        h[10] = 0;
        h[11] = 0;
        let c = finish(sum(&h));
        assert_eq!(c, ip.calc_header_checksum());
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(fold(sum(&h)), 0xffff);
    }
}
