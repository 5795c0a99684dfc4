//! The packet views every module of overlayd shares: IPv4, TCP and UDP over byte buffers, with
//! setters that keep their checksums right, and the Internet checksum they rest on.
//!
//! It sits below `overlay` (frames, offloads) and `ingress` (NAT), which do not depend on each
//! other, so that neither keeps its own offsets into someone else's header. It does no I/O,
//! allocates nothing and keeps no state: a view borrows (or owns) the caller's buffer.
//! It does not parse Ethernet or IPv6. The only packets it builds from scratch are the
//! answers to flows that have nowhere to go: a TCP reset ([`tcp::Reset`]) and an ICMP port
//! unreachable ([`icmp::Unreachable`]), behind an [`ipv4::Repr`] header.
//!
//! # Layout
//!
//! - [`checksum`]: the RFC 1071 sum (vectorised for long inputs), pseudo-headers, RFC 1624
//!   incremental updates, and [`checksum::Mode`]: whether a TCP/UDP checksum field holds the
//!   finished checksum or the partial pseudo-header sum of an offloaded frame.
//! - [`ipv4`], [`tcp`], [`udp`]: smoltcp-style views, `Packet<T: AsRef<[u8]>>` built with
//!   `new_checked`, getters, and for `T: AsMut<[u8]>` setters that update checksums
//!   incrementally. Each header's offsets are in one `mod field` citing its RFC.
//! - [`l4`]: what TCP and UDP share (ports, the pseudo-header checksum, its completion), as
//!   one [`l4::Segment`] view that [`tcp::Packet`] and [`udp::Packet`] are for their protocol.
//!
//! `unsafe` appears once, with its `// SAFETY:` line: the call of the AVX2 loop in
//! [`checksum`] after CPU detection.

pub mod checksum;
pub mod icmp;
pub mod ipv4;
pub mod l4;
pub mod tcp;
pub mod udp;

use core::ops::Range;

/// The big-endian 16-bit word at `r` (two bytes a view has checked are there).
fn get16(b: &[u8], r: Range<usize>) -> u16 {
    u16::from_be_bytes([b[r.start], b[r.start + 1]])
}

fn set16(b: &mut [u8], r: Range<usize>, v: u16) {
    b[r].copy_from_slice(&v.to_be_bytes());
}
