//! The send batch: datagrams of one flow to one VTEP, gathered across TAP reads so that each
//! `UDP_SEGMENT` send carries a full group (see [`Batch`]). Pure bookkeeping over one buffer;
//! the worker does the sends.

use std::net::SocketAddrV4;

use crate::{offload, seal, udp};

/// Datagrams to one VTEP through one send socket, laid out back to back at one stride (the
/// last may be shorter), gathered across TAP reads: runs of equal-size frames, and the
/// segments of consecutive super-frames of one flow. A TSO super-frame of 46 segments does
/// not fit one `UDP_SEGMENT` send (at most [`udp::GSO_MAX_BYTES`]); gathered, its last
/// segments leave with the next super-frame's, so every send is a full group and the peer
/// receives full GRO batches. Full groups leave at once, the rest whenever the TAP queue is
/// drained, so the batch adds no latency.
pub(crate) struct Batch {
    pub(crate) buf: Box<[u8]>,
    pub(crate) len: usize,
    pub(crate) count: usize,
    pub(crate) stride: usize,
    pub(crate) closed: bool,
    pub(crate) socket: usize,
    pub(crate) hash: u32,
    pub(crate) to: SocketAddrV4,
}

/// Room for less than one full group plus the segments of the largest super-frame
/// ([`offload::MAX_SEGMENTS`] segments, each repeating up to 142 bytes of VXLAN, Ethernet,
/// IPv4 and TCP headers with options, plus a sealed header's and tag's extra bytes on an
/// encrypted network, around 64 KiB of payload).
const BATCH_LEN: usize =
    udp::GSO_MAX_BYTES + offload::MAX_SEGMENTS * (142 + seal::OVERHEAD) + 65_536;

impl Batch {
    pub(crate) fn new(offloads: bool) -> Batch {
        Batch {
            buf: vec![0u8; if offloads { BATCH_LEN } else { 0 }].into_boxed_slice(),
            len: 0,
            count: 0,
            stride: 0,
            closed: false,
            socket: 0,
            hash: 0,
            to: SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0),
        }
    }

    /// True if datagrams of `len` bytes (at most) to `to` through `socket` can join the batch.
    pub(crate) fn accepts(&self, socket: usize, to: SocketAddrV4, len: usize) -> bool {
        self.count > 0
            && !self.closed
            && self.socket == socket
            && self.to == to
            && len <= self.stride
            && self.len + len <= self.buf.len()
    }

    /// Starts an empty batch for datagrams of `stride` bytes.
    pub(crate) fn start(&mut self, socket: usize, hash: u32, to: SocketAddrV4, stride: usize) {
        debug_assert_eq!(self.count, 0);
        self.len = 0;
        self.stride = stride;
        self.closed = false;
        self.socket = socket;
        self.hash = hash;
        self.to = to;
    }

    /// Appends a datagram; call [`accepts`](Self::accepts) (or flush) first.
    pub(crate) fn push(&mut self, socket: usize, hash: u32, to: SocketAddrV4, datagram: &[u8]) {
        if self.count == 0 {
            self.start(socket, hash, to, datagram.len());
        }
        self.buf[self.len..self.len + datagram.len()].copy_from_slice(datagram);
        self.appended(1, datagram.len());
    }

    /// Counts `count` datagrams of `len` bytes in all that were written after the batch.
    pub(crate) fn appended(&mut self, count: usize, len: usize) {
        self.count += count;
        self.len += len;
        if self.len < self.count * self.stride {
            self.closed = true;
        }
    }

    /// What to send now, from the front of the buffer: the full groups, or with `all`
    /// everything. `None` if that is nothing.
    pub(crate) fn ready(&self, all: bool) -> Option<offload::Segments> {
        let keep = if all {
            0
        } else {
            self.count % udp::datagrams_per_send(self.stride)
        };
        let count = self.count - keep;
        if count == 0 {
            return None;
        }
        let bytes = if keep == 0 {
            self.len
        } else {
            count * self.stride
        };
        Some(offload::Segments {
            count,
            stride: self.stride,
            last: bytes - (count - 1) * self.stride,
        })
    }

    /// Forgets the datagrams [`ready`](Self::ready) returned (they were sent) and moves the
    /// rest to the front.
    pub(crate) fn consume(&mut self, sent: offload::Segments) {
        let bytes = sent.len();
        self.buf.copy_within(bytes..self.len, 0);
        self.len -= bytes;
        self.count -= sent.count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn vtep(n: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, n), 4789)
    }

    #[test]
    fn batch_takes_equal_sizes_and_one_shorter_last() {
        let mut b = Batch::new(true);
        assert!(
            !b.accepts(0, vtep(2), 100),
            "empty batch accepts nothing (push starts it)"
        );
        b.push(3, 7, vtep(2), &[1u8; 100]);
        assert!(b.accepts(3, vtep(2), 100));
        assert!(!b.accepts(4, vtep(2), 100), "other socket");
        assert!(!b.accepts(3, vtep(3), 100), "other VTEP");
        assert!(!b.accepts(3, vtep(2), 101), "bigger than the segment size");
        b.push(3, 7, vtep(2), &[2u8; 100]);
        assert!(b.accepts(3, vtep(2), 60));
        b.push(3, 7, vtep(2), &[3u8; 60]);
        assert!(
            !b.accepts(3, vtep(2), 60),
            "closed after a shorter datagram"
        );
        assert_eq!((b.count, b.stride, b.len), (3, 100, 260));
        assert_eq!(&b.buf[200..260], &[3u8; 60][..]);
        assert_eq!(b.ready(false), None, "no full group yet");
        let all = b.ready(true).unwrap();
        assert_eq!(
            (all.count, all.stride, all.last, all.len()),
            (3, 100, 60, 260)
        );

        // A fresh push after a flush restarts with the new size and key.
        b.consume(all);
        assert_eq!((b.count, b.len), (0, 0));
        b.push(1, 9, vtep(3), &[4u8; 50]);
        assert_eq!((b.count, b.stride, b.socket, b.to), (1, 50, 1, vtep(3)));
        assert!(b.accepts(1, vtep(3), 50));
    }

    #[test]
    fn batch_sends_full_groups_and_keeps_the_rest() {
        // 1472-byte datagrams (MTU 1450 TCP in VXLAN): 44 per send.
        let mut b = Batch::new(true);
        assert_eq!(b.buf.len(), BATCH_LEN);
        b.start(0, 0, vtep(2), 1472);
        for i in 0..46u8 {
            b.buf[b.len..b.len + 1472].fill(i);
            b.appended(1, 1472);
        }
        assert_eq!(udp::datagrams_per_send(b.stride), 44);
        let full = b.ready(false).unwrap();
        assert_eq!((full.count, full.len()), (44, 44 * 1472));
        b.consume(full);
        assert_eq!((b.count, b.len), (2, 2 * 1472));
        assert_eq!(b.buf[0], 44, "the rest moved to the front");
        assert_eq!(b.buf[1472], 45);
        assert!(b.accepts(0, vtep(2), 0), "the next super-frame can join");

        // A shorter last segment closes the batch; it is sent with `all`.
        b.buf[b.len..b.len + 700].fill(46);
        b.appended(1, 700);
        assert!(!b.accepts(0, vtep(2), 0));
        assert_eq!(b.ready(false), None);
        let all = b.ready(true).unwrap();
        assert_eq!((all.count, all.last), (3, 700));
        b.consume(all);
        assert_eq!((b.count, b.len), (0, 0));
    }

    #[test]
    fn batch_groups_are_bounded() {
        let mut b = Batch::new(true);
        for _ in 0..udp::GSO_MAX_SEGMENTS + 3 {
            b.push(0, 0, vtep(2), &[0u8; 10]);
        }
        assert_eq!(
            b.ready(false).unwrap().count,
            udp::GSO_MAX_SEGMENTS,
            "at most GSO_MAX_SEGMENTS"
        );
        let mut b = Batch::new(true);
        b.push(0, 0, vtep(2), &[0u8; 40_000]);
        b.push(0, 0, vtep(2), &[0u8; 40_000]);
        assert_eq!(
            b.ready(false).unwrap().count,
            2,
            "at most GSO_MAX_BYTES per send"
        );
        assert_eq!(udp::datagrams_per_send(b.stride), 1);
        assert_eq!(
            Batch::new(false).buf.len(),
            0,
            "no buffer when offloads are off"
        );
    }
}
