//! Segmentation and coalescing for the offload fast path, as pure functions over buffers.
//!
//! - [`segment`] splits a TSO/USO super-frame read from the TAP (described by its
//!   [`vnet::Header`]) into wire-sized frames laid out back to back at equal stride, each
//!   after `headroom` bytes left for the caller (the VXLAN header), with every IP and
//!   TCP/UDP checksum computed. The result goes out in one `sendmsg` with `UDP_SEGMENT`.
//! - [`Coalescer`] merges consecutive, in-order TCP segments of one flow (decapsulated from
//!   `UDP_GRO` reads) into one super-frame with a GSO virtio-net header, for one TAP write;
//!   with [`Coalescer::push_with`] also equal-size UDP datagrams of one flow (a USO
//!   super-frame, for TAPs that accepted `TUN_F_USO4|TUN_F_USO6`).
//! - [`complete_checksum`] finishes a checksum the kernel left partial (`NEEDS_CSUM`).
//!
//! Offsets in the virtio-net header count from the start of the Ethernet header (TAP mode).
//! Only untagged Ethernet, IPv4 without fragmentation and IPv6 without extension headers are
//! segmented or coalesced; anything else is left alone or refused with [`Unsupported`].

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::ethernet::{self, ethertype};
use crate::{checksum, vnet};

const L3: usize = ethernet::HEADER_LEN;
const TCP: u8 = 6;
const UDP: u8 = 17;
/// Where the checksum field sits in each L4 header.
const TCP_CSUM_OFFSET: usize = 16;
const UDP_CSUM_OFFSET: usize = 6;

/// TCP flag bits (RFC 9293 §3.1, RFC 3168).
mod flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const CWR: u8 = 0x80;
}

/// The most segments one super-frame is split into.
pub const MAX_SEGMENTS: usize = 256;
/// The largest IP packet a super-frame may carry (16-bit IP length fields).
pub const MAX_IP_LEN: usize = 65_535;
/// The most datagrams one coalesced USO super-frame holds: the kernel refuses a UDP_L4
/// virtio-net header whose payload exceeds `gso_size * UDP_MAX_SEGMENTS` (64 before 6.13).
pub const MAX_UDP_SEGMENTS: usize = 64;

/// Why a frame cannot be segmented or its checksum completed. Counted as "offload" drops.
/// Nothing was written: neither the output buffer nor the frame changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    /// Not IPv4/IPv6 carrying TCP or UDP, or a GSO type this module does not segment.
    #[error("not an IPv4/IPv6 TCP or UDP frame we can segment")]
    NotIp,
    /// The headers are truncated, or disagree with the GSO type of the virtio-net header.
    #[error("headers truncated or inconsistent with the virtio-net header")]
    Malformed,
    /// `gso_size` is zero, yields more than [`MAX_SEGMENTS`] segments, or segments longer
    /// than an IP packet can be.
    #[error("gso_size is zero or yields too many or too long segments")]
    BadGsoSize,
    /// The output buffer cannot hold all segments.
    #[error("output buffer too small")]
    NoRoom,
    /// `csum_start + csum_offset` points outside the frame.
    #[error("csum_start/csum_offset outside the frame")]
    BadCsum,
}

/// Where the headers of an IP frame end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    pub v4: bool,
    /// Offset of the TCP/UDP header (from the start of the Ethernet header).
    pub l4: usize,
    pub proto: u8,
    /// Offset of the L4 payload: Ethernet + IP + TCP/UDP header lengths.
    pub hdr_len: usize,
}

/// Finds the IP and TCP/UDP headers of `frame`.
fn layout(frame: &[u8]) -> Result<Layout, Unsupported> {
    let eth = ethernet::Frame::new_checked(frame).map_err(|_| Unsupported::Malformed)?;
    let (v4, l4, proto) = match eth.ethertype() {
        ethertype::IPV4 => {
            let p = eth.payload();
            if p.len() < 20 || p[0] >> 4 != 4 {
                return Err(Unsupported::Malformed);
            }
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if ihl < 20 || u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0 {
                return Err(Unsupported::Malformed);
            }
            (true, L3 + ihl, p[9])
        }
        ethertype::IPV6 => {
            let p = eth.payload();
            if p.len() < 40 || p[0] >> 4 != 6 {
                return Err(Unsupported::Malformed);
            }
            (false, L3 + 40, p[6])
        }
        _ => return Err(Unsupported::NotIp),
    };
    let hdr_len = match proto {
        TCP => {
            if frame.len() < l4 + 20 {
                return Err(Unsupported::Malformed);
            }
            let doff = usize::from(frame[l4 + 12] >> 4) * 4;
            if doff < 20 {
                return Err(Unsupported::Malformed);
            }
            l4 + doff
        }
        UDP => l4 + 8,
        _ => return Err(Unsupported::NotIp),
    };
    if frame.len() < hdr_len {
        return Err(Unsupported::Malformed);
    }
    Ok(Layout {
        v4,
        l4,
        proto,
        hdr_len,
    })
}

fn pseudo(frame: &[u8], lay: &Layout, l4_len: usize) -> u64 {
    let len = l4_len as u32;
    if lay.v4 {
        let ip = |o: usize| Ipv4Addr::new(frame[o], frame[o + 1], frame[o + 2], frame[o + 3]);
        checksum::pseudo_v4(ip(L3 + 12), ip(L3 + 16), lay.proto, len)
    } else {
        let ip = |o: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&frame[o..o + 16]);
            Ipv6Addr::from(a)
        };
        checksum::pseudo_v6(ip(L3 + 8), ip(L3 + 24), lay.proto, len)
    }
}

fn csum_field(lay: &Layout) -> usize {
    lay.l4
        + if lay.proto == TCP {
            TCP_CSUM_OFFSET
        } else {
            UDP_CSUM_OFFSET
        }
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Sets the IP length fields for `frame.len()`, adds `id_add` to the IPv4 ID and
/// recomputes the IPv4 header checksum.
fn fix_ip(frame: &mut [u8], lay: &Layout, id_add: u16) {
    if lay.v4 {
        put16(frame, L3 + 2, (frame.len() - L3) as u16);
        let id = get16(frame, L3 + 4).wrapping_add(id_add);
        put16(frame, L3 + 4, id);
        put16(frame, L3 + 10, 0);
        let c = checksum::finish(checksum::sum(&frame[L3..lay.l4]));
        put16(frame, L3 + 10, c);
    } else {
        put16(frame, L3 + 4, (frame.len() - L3 - 40) as u16);
    }
}

/// The TCP/UDP checksum field value for an accumulated sum. 0x0000 and 0xffff are the same
/// one's-complement zero: UDP needs the latter (0 means "no checksum"), TCP keeps the 0 that
/// every other sender computes, so a split or joined frame is byte-for-byte the original.
fn l4_checksum_value(acc: u64, udp: bool) -> u16 {
    match checksum::finish(acc) {
        0 if udp => 0xffff,
        c => c,
    }
}

/// Computes the full TCP/UDP checksum of `frame` and stores it.
fn l4_checksum(frame: &mut [u8], lay: &Layout) {
    let at = csum_field(lay);
    put16(frame, at, 0);
    let acc = pseudo(frame, lay, frame.len() - lay.l4) + checksum::sum(&frame[lay.l4..]);
    put16(frame, at, l4_checksum_value(acc, lay.proto == UDP));
}

/// Finishes a partial checksum: sums from `csum_start` to the end (the field already holds
/// the pseudo-header sum) and stores the result at `csum_start + csum_offset`.
pub fn complete_checksum(
    frame: &mut [u8],
    csum_start: usize,
    csum_offset: usize,
) -> Result<(), Unsupported> {
    let at = csum_start
        .checked_add(csum_offset)
        .ok_or(Unsupported::BadCsum)?;
    if at + 2 > frame.len() {
        return Err(Unsupported::BadCsum);
    }
    // The field's offset tells the protocol: 6 in a UDP header, 16 in a TCP one.
    let udp = csum_offset == UDP_CSUM_OFFSET;
    put16(
        frame,
        at,
        l4_checksum_value(checksum::sum(&frame[csum_start..]), udp),
    );
    Ok(())
}

/// Where [`segment`] put its output: `count` entries at `stride` bytes apart, each
/// `headroom` + frame; all but the last `stride` long, the last `last` long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segments {
    pub count: usize,
    pub stride: usize,
    pub last: usize,
}

impl Segments {
    /// Total bytes used in the output buffer.
    pub fn len(&self) -> usize {
        (self.count - 1) * self.stride + self.last
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The `i`-th frame, without headroom.
    pub fn frame<'a>(&self, out: &'a [u8], i: usize, headroom: usize) -> &'a [u8] {
        let len = if i + 1 == self.count {
            self.last
        } else {
            self.stride
        };
        &out[i * self.stride + headroom..i * self.stride + len]
    }
}

/// Splits the super-frame `frame` (described by `vh`, a TCPv4/TCPv6/UDP_L4 GSO header) into
/// frames of at most `vh.gso_size` payload bytes, each with complete checksums, written to
/// `out` at equal stride after `headroom` bytes each. TCP sequence numbers advance, IPv4 IDs
/// increment, FIN/PSH stay on the last segment and CWR on the first only.
pub fn segment(
    frame: &[u8],
    vh: &vnet::Header,
    headroom: usize,
    out: &mut [u8],
) -> Result<Segments, Unsupported> {
    segment_with(frame, vh, (headroom, 0), out, |_| {})
}

/// [`segment`] with `(headroom, tailroom)` bytes around each frame, and `finish` called on
/// each one (headroom, frame and tailroom) right after it is built, while it is in cache: the
/// worker writes the VXLAN header there, or seals the frame in place ([`crate::seal`]).
/// [`Segments::frame`] of the result includes the tailroom.
pub fn segment_with(
    frame: &[u8],
    vh: &vnet::Header,
    (headroom, tailroom): (usize, usize),
    out: &mut [u8],
    mut finish: impl FnMut(&mut [u8]),
) -> Result<Segments, Unsupported> {
    let lay = layout(frame)?;
    let want = match vh.gso_type & !vnet::gso::ECN {
        vnet::gso::TCPV4 => (true, TCP),
        vnet::gso::TCPV6 => (false, TCP),
        vnet::gso::UDP_L4 => (lay.v4, UDP),
        _ => return Err(Unsupported::NotIp),
    };
    if (lay.v4, lay.proto) != want {
        return Err(Unsupported::Malformed);
    }
    let mss = usize::from(vh.gso_size);
    if mss == 0 {
        return Err(Unsupported::BadGsoSize);
    }
    let payload = &frame[lay.hdr_len..];
    let count = payload.len().div_ceil(mss).max(1);
    // A segment's length fields are 16 bits: IPv4's counts the IP header, IPv6's (and UDP's)
    // only what follows it.
    let counted_from = if lay.v4 { L3 } else { lay.l4 };
    if count > MAX_SEGMENTS || lay.hdr_len - counted_from + mss.min(payload.len()) > MAX_IP_LEN {
        return Err(Unsupported::BadGsoSize);
    }
    let stride = headroom + lay.hdr_len + mss + tailroom;
    let last_payload = payload.len() - (count - 1) * mss;
    let segs = Segments {
        count,
        stride,
        last: headroom + lay.hdr_len + last_payload + tailroom,
    };
    if out.len() < segs.len() {
        return Err(Unsupported::NoRoom);
    }
    let seq0 = if lay.proto == TCP {
        get32(frame, lay.l4 + 4)
    } else {
        0
    };
    for (i, chunk) in payload
        .chunks(mss)
        .chain((payload.is_empty()).then_some(&[][..]))
        .enumerate()
    {
        let start = i * stride + headroom;
        let seg = &mut out[start..start + lay.hdr_len + chunk.len()];
        seg[..lay.hdr_len].copy_from_slice(&frame[..lay.hdr_len]);
        seg[lay.hdr_len..].copy_from_slice(chunk);
        fix_ip(seg, &lay, i as u16);
        if lay.proto == TCP {
            let seq = seq0.wrapping_add((i * mss) as u32);
            seg[lay.l4 + 4..lay.l4 + 8].copy_from_slice(&seq.to_be_bytes());
            if i > 0 {
                seg[lay.l4 + 13] &= !flag::CWR;
            }
            if i + 1 < count {
                seg[lay.l4 + 13] &= !(flag::FIN | flag::PSH);
            }
        } else {
            put16(seg, lay.l4 + 4, (8 + chunk.len()) as u16);
        }
        l4_checksum(seg, &lay);
        let datagram = i * stride;
        finish(&mut out[datagram..start + lay.hdr_len + chunk.len() + tailroom]);
    }
    Ok(segs)
}

/// Merges consecutive in-order TCP segments of one flow into one GSO super-frame, and with
/// [`push_with`](Coalescer::push_with) consecutive UDP datagrams of one flow into one USO
/// super-frame (all but the last of one payload size, the last at most that size).
///
/// Feed frames with [`push`](Coalescer::push), which says what to do with a frame it did not
/// take; [`finish`](Coalescer::finish) returns the super-frame to write. The buffer is
/// allocated once.
pub struct Coalescer {
    buf: Box<[u8]>,
    len: usize,
    flow: Option<Flow>,
}

/// What [`Coalescer::push`] did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Push {
    /// Added to the super-frame being built.
    Taken,
    /// Does not continue the super-frame being built: finish and write that one, then push
    /// this frame again.
    Later,
    /// Not coalescable (not an in-order TCP data segment, or a UDP datagram when UDP is
    /// coalesced, with valid lengths and checksums): finish and write the super-frame being
    /// built, then write this frame as it is.
    Never,
}

#[derive(Clone, Copy, Debug)]
struct Flow {
    lay: Layout,
    gso_size: usize,
    segs: usize,
    next_seq: u32,
    closed: bool,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer::new()
    }
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("len", &self.len)
            .field("flow", &self.flow)
            .finish()
    }
}

const H: usize = vnet::HEADER_LEN;

/// The headers of a TCP segment or UDP datagram that may be coalesced (`seq` and `flags`
/// are zero for UDP).
struct Candidate {
    lay: Layout,
    seq: u32,
    flags: u8,
    payload: usize,
}

/// A segment eligible for coalescing, checksums aside: TCP, ACK set, no
/// SYN/FIN/RST/URG/CWR, or with `udp` a UDP datagram whose length field matches the frame and
/// whose checksum is not zero (absent); with payload, an IP length that matches the frame and
/// fits [`MAX_IP_LEN`].
fn candidate(frame: &[u8], udp: bool) -> Option<Candidate> {
    let lay = layout(frame).ok()?;
    let flags = match lay.proto {
        TCP => {
            let flags = frame[lay.l4 + 13];
            if flags & flag::ACK == 0
                || flags & (flag::SYN | flag::FIN | flag::RST | flag::URG | flag::CWR) != 0
            {
                return None;
            }
            flags
        }
        UDP if udp => {
            if usize::from(get16(frame, lay.l4 + 4)) != frame.len() - lay.l4
                || get16(frame, lay.l4 + 6) == 0
            {
                return None;
            }
            0
        }
        _ => return None,
    };
    let payload = frame.len() - lay.hdr_len;
    if payload == 0 {
        return None;
    }
    let ip_len = if lay.v4 {
        usize::from(get16(frame, L3 + 2))
    } else {
        usize::from(get16(frame, L3 + 4)) + 40
    };
    if ip_len != frame.len() - L3 || ip_len > MAX_IP_LEN {
        return None;
    }
    Some(Candidate {
        lay,
        seq: if lay.proto == TCP {
            get32(frame, lay.l4 + 4)
        } else {
            0
        },
        flags,
        payload,
    })
}

/// True if the IPv4 header checksum (if any) and the TCP/UDP checksum of `frame` are valid.
fn checksums_valid(frame: &[u8], lay: &Layout) -> bool {
    if lay.v4 && checksum::fold(checksum::sum(&frame[L3..lay.l4])) != 0xffff {
        return false;
    }
    let acc = pseudo(frame, lay, frame.len() - lay.l4) + checksum::sum(&frame[lay.l4..]);
    checksum::fold(acc) == 0xffff
}

/// True if `a` and `b` have the same headers apart from the fields that differ between
/// segments of one flow (lengths, IPv4 ID and checksum, TCP seq, PSH, window, checksum; UDP
/// length and checksum).
fn same_flow(a: &[u8], b: &[u8], lay: &Layout) -> bool {
    let skip: &[(usize, usize)] = if lay.v4 {
        &[(L3 + 2, L3 + 6), (L3 + 10, L3 + 12)]
    } else {
        &[(L3 + 4, L3 + 6)]
    };
    let l4 = lay.l4;
    let tcp = lay.proto == TCP;
    let tcp_skip = [(l4 + 4, l4 + 8), (l4 + 13, l4 + 18)];
    let udp_skip = [(l4 + 4, l4 + 8)];
    let l4_skip: &[(usize, usize)] = if tcp { &tcp_skip } else { &udp_skip };
    let mut pos = 0;
    for &(s, e) in skip.iter().chain(l4_skip.iter()) {
        if a[pos..s] != b[pos..s] {
            return false;
        }
        pos = e;
    }
    a[pos..lay.hdr_len] == b[pos..lay.hdr_len]
        && (!tcp || a[l4 + 13] & !flag::PSH == b[l4 + 13] & !flag::PSH)
}

impl Coalescer {
    pub fn new() -> Coalescer {
        Coalescer {
            buf: vec![0u8; H + L3 + MAX_IP_LEN].into_boxed_slice(),
            len: 0,
            flow: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.flow.is_none()
    }

    /// How many segments the super-frame being built holds.
    pub fn segments(&self) -> usize {
        self.flow.map_or(0, |f| f.segs)
    }

    /// Adds the TCP segment `frame` to the super-frame being built, or says why not. UDP is
    /// [`Push::Never`]: the same as [`push_with`](Self::push_with)`(frame, false)`.
    pub fn push(&mut self, frame: &[u8]) -> Push {
        self.push_with(frame, false)
    }

    /// Adds `frame` to the super-frame being built, or says why not. With `udp`, UDP
    /// datagrams are coalesced too (only for a TAP that accepts USO super-frames): same
    /// headers, each payload the size of the first but the last, at most
    /// [`MAX_UDP_SEGMENTS`].
    pub fn push_with(&mut self, frame: &[u8], udp: bool) -> Push {
        let Some(c) = candidate(frame, udp) else {
            return Push::Never;
        };
        if let Some(f) = &self.flow
            && (f.closed
                || c.lay != f.lay
                || c.payload > f.gso_size
                || c.seq != f.next_seq
                || (c.lay.proto == UDP && f.segs >= MAX_UDP_SEGMENTS)
                || self.len - H - L3 + c.payload > MAX_IP_LEN
                || !same_flow(&self.buf[H..self.len], frame, &c.lay))
        {
            return Push::Later;
        }
        // Checked last, as the only pass over the payload: a frame pushed again after
        // `Later` is summed once.
        if !checksums_valid(frame, &c.lay) {
            return Push::Never;
        }
        let psh = c.flags & flag::PSH != 0;
        // UDP has no sequence: `seq` and `next_seq` stay zero.
        let next_seq = if c.lay.proto == TCP {
            c.seq.wrapping_add(c.payload as u32)
        } else {
            0
        };
        match &mut self.flow {
            None => {
                self.buf[H..H + frame.len()].copy_from_slice(frame);
                self.len = H + frame.len();
                self.flow = Some(Flow {
                    lay: c.lay,
                    gso_size: c.payload,
                    segs: 1,
                    next_seq,
                    closed: psh,
                });
            }
            Some(f) => {
                self.buf[self.len..self.len + c.payload].copy_from_slice(&frame[c.lay.hdr_len..]);
                self.len += c.payload;
                f.segs += 1;
                f.next_seq = next_seq;
                if c.payload < f.gso_size || psh {
                    f.closed = true;
                }
                if psh {
                    self.buf[H + c.lay.l4 + 13] |= flag::PSH;
                }
            }
        }
        Push::Taken
    }

    /// Completes the super-frame and returns virtio-net header + frame, ready for one TAP
    /// write; `None` if empty. A single segment goes out unchanged with a zero header; merged
    /// segments get a TCP GSO header, merged datagrams a UDP_L4 (USO) one with the UDP length
    /// of the whole super-frame, both with a partial checksum (`NEEDS_CSUM`).
    pub fn finish(&mut self) -> Option<&mut [u8]> {
        let f = self.flow.take()?;
        let (hdr, frame) = self.buf[..self.len].split_at_mut(H);
        if f.segs == 1 {
            hdr.fill(0);
            return Some(&mut self.buf[..self.len]);
        }
        let lay = f.lay;
        fix_ip(frame, &lay, 0);
        let l4_len = frame.len() - lay.l4;
        let (gso_type, csum_offset) = match (lay.proto, lay.v4) {
            (TCP, true) => (vnet::gso::TCPV4, TCP_CSUM_OFFSET),
            (TCP, false) => (vnet::gso::TCPV6, TCP_CSUM_OFFSET),
            _ => {
                // The kernel splits by `gso_size` and adjusts the checksum from this length.
                put16(frame, lay.l4 + 4, l4_len as u16);
                (vnet::gso::UDP_L4, UDP_CSUM_OFFSET)
            }
        };
        let partial = checksum::fold(pseudo(frame, &lay, l4_len));
        put16(frame, lay.l4 + csum_offset, partial);
        vnet::Header {
            flags: vnet::FLAG_NEEDS_CSUM,
            gso_type,
            hdr_len: lay.hdr_len as u16,
            gso_size: f.gso_size as u16,
            csum_start: lay.l4 as u16,
            csum_offset: csum_offset as u16,
        }
        .emit(hdr);
        Some(&mut self.buf[..self.len])
    }
}

#[cfg(test)]
mod tests;
