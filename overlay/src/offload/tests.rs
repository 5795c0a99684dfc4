//! Tests of [`super`]: segments checked field by field against etherparse, split then
//! coalesce is the identity, and what is refused.

use super::*;
use etherparse::{
    IpHeaders, IpNumber, Ipv4Header, NetSlice, PacketBuilder, SlicedPacket, TcpOptionElement,
    TransportSlice,
};
use proptest::prelude::*;

const SRC4: [u8; 4] = [198, 19, 0, 5];
const DST4: [u8; 4] = [198, 19, 0, 9];
const SRC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
const DST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
const HEADROOM: usize = 8;

fn ip(v4: bool, id: u16, proto: IpNumber) -> IpHeaders {
    if v4 {
        let mut h = Ipv4Header::new(0, 64, proto, SRC4, DST4).unwrap();
        h.identification = id;
        h.dont_fragment = true;
        IpHeaders::Ipv4(h, Default::default())
    } else {
        IpHeaders::Ipv6(
            etherparse::Ipv6Header {
                next_header: proto,
                hop_limit: 64,
                source: SRC6,
                destination: DST6,
                ..Default::default()
            },
            Default::default(),
        )
    }
}

fn tcp_frame(v4: bool, payload: &[u8], seq: u32, psh: bool, id: u16, ts: bool) -> Vec<u8> {
    let mut t = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ip(ip(v4, id, IpNumber::TCP))
        .tcp(40000, 5201, seq, 512)
        .ack(777);
    if psh {
        t = t.psh();
    }
    if ts {
        t = t
            .options(&[
                TcpOptionElement::Noop,
                TcpOptionElement::Noop,
                TcpOptionElement::Timestamp(11, 22),
            ])
            .unwrap();
    }
    let mut out = Vec::new();
    t.write(&mut out, payload).unwrap();
    out
}

fn udp_frame(v4: bool, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ip(ip(v4, 9, IpNumber::UDP))
        .udp(5353, 4000);
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

/// Checks every length and checksum of `frame` with etherparse; returns the L4 payload.
fn assert_valid(frame: &[u8]) -> Vec<u8> {
    let p = SlicedPacket::from_ethernet(frame).expect("parses");
    let (src, dst): (Vec<u8>, Vec<u8>) = match p.net.as_ref().expect("ip") {
        NetSlice::Ipv4(v4) => {
            let h = v4.header().to_header();
            assert_eq!(
                h.header_checksum,
                h.calc_header_checksum(),
                "IPv4 header checksum"
            );
            assert_eq!(
                usize::from(h.total_len),
                frame.len() - 14,
                "IPv4 total length"
            );
            (h.source.to_vec(), h.destination.to_vec())
        }
        NetSlice::Ipv6(v6) => {
            let h = v6.header().to_header();
            assert_eq!(
                usize::from(h.payload_length),
                frame.len() - 54,
                "IPv6 payload length"
            );
            (h.source.to_vec(), h.destination.to_vec())
        }
        NetSlice::Arp(_) => panic!("arp"),
    };
    match p.transport.expect("l4") {
        TransportSlice::Tcp(t) => {
            let want = if src.len() == 4 {
                t.calc_checksum_ipv4(src.try_into().unwrap(), dst.try_into().unwrap())
                    .unwrap()
            } else {
                t.calc_checksum_ipv6(src.try_into().unwrap(), dst.try_into().unwrap())
                    .unwrap()
            };
            assert_eq!(t.checksum(), want, "TCP checksum");
            t.payload().to_vec()
        }
        TransportSlice::Udp(u) => {
            let h = u.to_header();
            let want = if src.len() == 4 {
                h.calc_checksum_ipv4_raw(
                    src.try_into().unwrap(),
                    dst.try_into().unwrap(),
                    u.payload(),
                )
                .unwrap()
            } else {
                h.calc_checksum_ipv6_raw(
                    src.try_into().unwrap(),
                    dst.try_into().unwrap(),
                    u.payload(),
                )
                .unwrap()
            };
            assert_eq!(h.checksum, want, "UDP checksum");
            assert_eq!(usize::from(h.length), 8 + u.payload().len());
            u.payload().to_vec()
        }
        other => panic!("unexpected {other:?}"),
    }
}

fn gso_header(frame: &[u8], gso_type: u8, mss: u16) -> vnet::Header {
    let lay = layout(frame).unwrap();
    vnet::Header {
        flags: vnet::FLAG_NEEDS_CSUM,
        gso_type,
        hdr_len: lay.hdr_len as u16,
        gso_size: mss,
        csum_start: lay.l4 as u16,
        csum_offset: if lay.proto == TCP { 16 } else { 6 },
    }
}

fn split(frame: &[u8], vh: &vnet::Header) -> Vec<Vec<u8>> {
    let mut out = vec![0u8; 256 * 1024];
    let segs = segment(frame, vh, HEADROOM, &mut out).unwrap();
    assert!(segs.len() <= out.len());
    (0..segs.count)
        .map(|i| segs.frame(&out, i, HEADROOM).to_vec())
        .collect()
}

fn payload_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 1..3000),
        (1usize..60_000).prop_map(|n| (0..n).map(|i| (i * 7 + i / 251) as u8).collect()),
    ]
}

/// Splits a USO super-frame as the kernel does (`__udp_gso_segment` with `CHECKSUM_PARTIAL`):
/// per segment the headers are copied, the IP length, IPv4 ID (+1 each) and header checksum
/// and the UDP length set, and the partial UDP checksum adjusted from the super-frame's UDP
/// length to the segment's; the checksum is then completed (as a NIC or `skb_checksum_help`).
fn kernel_split_udp(frame: &[u8], h: &vnet::Header) -> Vec<Vec<u8>> {
    let lay = layout(frame).unwrap();
    let old_len = get16(frame, lay.l4 + 4);
    let partial = get16(frame, lay.l4 + 6);
    frame[lay.hdr_len..]
        .chunks(usize::from(h.gso_size))
        .enumerate()
        .map(|(i, chunk)| {
            let mut seg = frame[..lay.hdr_len].to_vec();
            seg.extend_from_slice(chunk);
            fix_ip(&mut seg, &lay, i as u16);
            let new_len = (8 + chunk.len()) as u16;
            put16(&mut seg, lay.l4 + 4, new_len);
            let adjusted = u64::from(partial) + u64::from(!old_len) + u64::from(new_len);
            put16(&mut seg, lay.l4 + 6, checksum::fold(adjusted));
            complete_checksum(
                &mut seg,
                usize::from(h.csum_start),
                usize::from(h.csum_offset),
            )
            .unwrap();
            assert_valid(&seg);
            seg
        })
        .collect()
}

/// A TCP checksum that computes to 0 stays 0 through split and coalesce, as etherparse and the
/// kernel write it (0xffff is the same one's-complement zero, but no longer the same bytes).
/// Found by the property below in CI, 1 case in 65536.
#[test]
fn a_zero_tcp_checksum_stays_zero() {
    let checksum_of = |f: &[u8]| get16(f, layout(f).unwrap().l4 + TCP_CSUM_OFFSET);
    for (len, mss) in [(100, 1000), (3000, 1000)] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
        // Raising the sequence number's low word by the checksum c adds c to the sum ~c: 0xffff.
        let c = checksum_of(&tcp_frame(true, &payload, 0, false, 1, false));
        let sup = tcp_frame(true, &payload, u32::from(c), false, 1, false);
        assert_eq!(checksum_of(&sup), 0);
        let segs = split(&sup, &gso_header(&sup, vnet::gso::TCPV4, mss));
        let mut c = Coalescer::new();
        for s in &segs {
            assert_valid(s);
            assert_eq!(c.push(s), Push::Taken);
        }
        let merged = c.finish().unwrap().to_vec();
        let (h, f) = merged.split_at(vnet::HEADER_LEN);
        let h = vnet::Header::parse(h).unwrap();
        let mut f = f.to_vec();
        if segs.len() > 1 {
            complete_checksum(
                &mut f,
                usize::from(h.csum_start),
                usize::from(h.csum_offset),
            )
            .unwrap();
        }
        assert_eq!(f, sup, "{len} bytes at mss {mss}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Split then coalesce returns the same bytes, and every segment is valid.
    #[test]
    fn split_then_coalesce_is_identity(v4: bool, payload in payload_strategy(), mss in 1u16..9000, seq: u32, psh: bool, id: u16, ts: bool) {
        let sup = tcp_frame(v4, &payload, seq, psh, id, ts);
        let vh = gso_header(&sup, if v4 { vnet::gso::TCPV4 } else { vnet::gso::TCPV6 }, mss);
        let count = payload.len().div_ceil(usize::from(mss));
        prop_assume!(count <= MAX_SEGMENTS);
        let segs = split(&sup, &vh);
        prop_assert_eq!(segs.len(), count);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let p = assert_valid(s);
            prop_assert!(p.len() <= usize::from(mss));
            if i + 1 < segs.len() {
                prop_assert_eq!(p.len(), usize::from(mss));
            }
            joined.extend(p);
        }
        prop_assert_eq!(&joined, &payload);

        let mut c = Coalescer::new();
        for s in &segs {
            prop_assert_eq!(c.push(s), Push::Taken);
        }
        let merged = c.finish().unwrap().to_vec();
        prop_assert!(c.is_empty());
        let (h, f) = merged.split_at(vnet::HEADER_LEN);
        let h = vnet::Header::parse(h).unwrap();
        let mut f = f.to_vec();
        if segs.len() > 1 {
            prop_assert_eq!(h.gso_type, vh.gso_type);
            prop_assert_eq!(h.gso_size, mss);
            prop_assert_eq!(h.hdr_len, vh.hdr_len);
            complete_checksum(&mut f, usize::from(h.csum_start), usize::from(h.csum_offset)).unwrap();
        } else {
            prop_assert_eq!(h, vnet::Header::default());
        }
        prop_assert_eq!(f, sup);
    }

    #[test]
    fn udp_segments_are_valid(v4: bool, payload in payload_strategy(), mss in 1u16..9000) {
        let sup = udp_frame(v4, &payload);
        prop_assume!(payload.len().div_ceil(usize::from(mss)) <= MAX_SEGMENTS);
        let segs = split(&sup, &gso_header(&sup, vnet::gso::UDP_L4, mss));
        let joined: Vec<u8> = segs.iter().flat_map(|s| assert_valid(s)).collect();
        prop_assert_eq!(joined, payload);
    }

    /// USO: datagrams (as a sender's kernel splits them) coalesced then split the way the
    /// kernel splits a UDP_L4 super-frame (`__udp_gso_segment`: headers copied, lengths set,
    /// the partial checksum adjusted from the super-frame's UDP length, then completed) give
    /// the same datagrams, all valid per etherparse.
    #[test]
    fn udp_coalesce_then_split_is_identity(v4: bool, payload in payload_strategy(), mss in 1u16..9000) {
        let sup = udp_frame(v4, &payload);
        let count = payload.len().div_ceil(usize::from(mss));
        prop_assume!(count <= MAX_UDP_SEGMENTS);
        let segs = split(&sup, &gso_header(&sup, vnet::gso::UDP_L4, mss));
        prop_assert_eq!(segs.len(), count);
        let mut c = Coalescer::new();
        for s in &segs {
            prop_assert_eq!(c.push(s), Push::Never, "UDP is not coalesced without USO");
            prop_assert_eq!(c.push_with(s, true), Push::Taken);
        }
        let merged = c.finish().unwrap().to_vec();
        prop_assert!(c.is_empty());
        let (h, f) = merged.split_at(vnet::HEADER_LEN);
        let h = vnet::Header::parse(h).unwrap();
        if count == 1 {
            prop_assert_eq!(h, vnet::Header::default());
            prop_assert_eq!(f, &sup[..]);
            return Ok(());
        }
        let lay = layout(&sup).unwrap();
        prop_assert_eq!(h, vnet::Header {
            flags: vnet::FLAG_NEEDS_CSUM,
            gso_type: vnet::gso::UDP_L4,
            hdr_len: lay.hdr_len as u16,
            gso_size: mss,
            csum_start: lay.l4 as u16,
            csum_offset: 6,
        });
        prop_assert_eq!(kernel_split_udp(f, &h), segs);
        let mut f = f.to_vec();
        complete_checksum(&mut f, usize::from(h.csum_start), usize::from(h.csum_offset)).unwrap();
        assert_valid(&f);
        prop_assert_eq!(f, sup);
    }

    /// Parsers of untrusted frames never panic.
    #[test]
    fn never_panics(frame in proptest::collection::vec(any::<u8>(), 0..200), gso_type: u8, gso_size: u16, start: u16, off: u16) {
        let vh = vnet::Header { flags: 1, gso_type, hdr_len: 0, gso_size, csum_start: start, csum_offset: off };
        let mut out = vec![0u8; 4096];
        let _ = segment(&frame, &vh, HEADROOM, &mut out);
        let mut c = Coalescer::new();
        let _ = c.push(&frame);
        let _ = c.push(&frame);
        let _ = c.finish();
        let _ = c.push_with(&frame, true);
        let _ = c.push_with(&frame, true);
        let _ = c.finish();
        let mut f = frame.clone();
        let _ = complete_checksum(&mut f, usize::from(start), usize::from(off));
    }
}

#[test]
fn complete_checksum_finishes_a_partial_one() {
    let mut f = tcp_frame(true, b"some payload bytes", 1, false, 3, true);
    let lay = layout(&f).unwrap();
    let partial = checksum::fold(pseudo(&f, &lay, f.len() - lay.l4));
    put16(&mut f, lay.l4 + 16, partial);
    complete_checksum(&mut f, lay.l4, 16).unwrap();
    assert_valid(&f);
    assert_eq!(
        complete_checksum(&mut f, lay.l4, 1000),
        Err(Unsupported::BadCsum)
    );
}

#[test]
fn cwr_on_first_fin_on_last_only() {
    let mut sup = tcp_frame(true, &[1u8; 3000], 100, true, 1, false);
    let lay = layout(&sup).unwrap();
    sup[lay.l4 + 13] |= flag::CWR | flag::FIN;
    let segs = split(
        &sup,
        &gso_header(&sup, vnet::gso::TCPV4 | vnet::gso::ECN, 1000),
    );
    let flags: Vec<u8> = segs.iter().map(|s| s[lay.l4 + 13]).collect();
    assert_eq!(flags[0] & (flag::CWR | flag::FIN | flag::PSH), flag::CWR);
    assert_eq!(flags[1] & (flag::CWR | flag::FIN | flag::PSH), 0);
    assert_eq!(
        flags[2] & (flag::CWR | flag::FIN | flag::PSH),
        flag::FIN | flag::PSH
    );
    let ids: Vec<u16> = segs.iter().map(|s| get16(s, L3 + 4)).collect();
    assert_eq!(ids, [1, 2, 3]);
    let seqs: Vec<u32> = segs.iter().map(|s| get32(s, lay.l4 + 4)).collect();
    assert_eq!(seqs, [100, 1100, 2100]);
}

#[test]
fn segment_refuses_bad_input() {
    let sup = tcp_frame(true, &[0u8; 100], 1, false, 1, false);
    let vh = gso_header(&sup, vnet::gso::TCPV4, 0);
    assert_eq!(
        segment(&sup, &vh, 8, &mut [0u8; 4096]),
        Err(Unsupported::BadGsoSize)
    );
    let vh = gso_header(&sup, vnet::gso::TCPV6, 10);
    assert_eq!(
        segment(&sup, &vh, 8, &mut [0u8; 4096]),
        Err(Unsupported::Malformed)
    );
    let vh = gso_header(&sup, vnet::gso::TCPV4, 10);
    assert_eq!(
        segment(&sup, &vh, 8, &mut [0u8; 100]),
        Err(Unsupported::NoRoom)
    );
    let mut arp = [0u8; 42];
    crate::arp::emit_request(
        (crate::Mac([2, 0, 0, 0, 0, 1]), [198, 19, 0, 1].into()),
        [198, 19, 0, 2].into(),
        &mut arp,
    );
    assert_eq!(
        segment(&arp, &vh, 8, &mut [0u8; 4096]),
        Err(Unsupported::NotIp)
    );
}

#[test]
fn coalescer_keeps_flows_and_order_apart() {
    let a1 = tcp_frame(true, &[1u8; 1000], 1000, false, 1, true);
    let a2 = tcp_frame(true, &[2u8; 1000], 2000, false, 2, true);
    let a3_out_of_order = tcp_frame(true, &[3u8; 1000], 5000, false, 3, true);
    let v6 = tcp_frame(false, &[2u8; 1000], 2000, false, 2, true);
    let mut c = Coalescer::new();
    assert_eq!(c.push(&a1), Push::Taken);
    assert_eq!(c.push(&v6), Push::Later);
    assert_eq!(c.push(&a3_out_of_order), Push::Later);
    assert_eq!(c.push(&a2), Push::Taken);
    // A shorter segment is the last one.
    let short = tcp_frame(true, &[3u8; 10], 3000, false, 3, true);
    assert_eq!(c.push(&short), Push::Taken);
    let next = tcp_frame(true, &[4u8; 1000], 3010, false, 4, true);
    assert_eq!(c.push(&next), Push::Later);
    let out = c.finish().unwrap();
    assert_eq!(out.len(), vnet::HEADER_LEN + a1.len() + 1010);
    assert_eq!(c.push(&next), Push::Taken, "starts the next super-frame");
    c.finish().unwrap();

    // Bad checksum, SYN and pure ACK are not coalescable, whether or not a flow is open.
    let mut bad = a1.clone();
    let n = bad.len();
    bad[n - 1] ^= 0xff;
    let mut syn = a1.clone();
    let l4 = layout(&syn).unwrap().l4;
    syn[l4 + 13] |= flag::SYN;
    let pure_ack = tcp_frame(true, &[], 1000, false, 1, true);
    for frame in [&bad, &syn, &pure_ack] {
        assert_eq!(c.push(frame), Push::Never);
        assert!(c.is_empty());
    }
    assert_eq!(c.push(&a1), Push::Taken);
    let mut bad_a2 = a2.clone();
    let n = bad_a2.len();
    bad_a2[n - 1] ^= 0xff;
    assert_eq!(
        c.push(&bad_a2),
        Push::Never,
        "continues the flow, bad checksum"
    );
    assert_eq!(c.push(&bad), Push::Later, "refused by sequence first");
    assert_eq!(c.segments(), 1);
}

/// An IPv6 packet can be 40 bytes longer than [`MAX_IP_LEN`] (its length field leaves out
/// the fixed header); such a segment is not coalesced, and not copied past the buffer.
#[test]
fn coalescer_refuses_ipv6_packets_longer_than_its_buffer() {
    let payload = vec![7u8; MAX_IP_LEN - 20];
    let jumbo = tcp_frame(false, &payload, 1, false, 0, false);
    assert_eq!(jumbo.len(), L3 + 40 + MAX_IP_LEN);
    assert_eq!(Coalescer::new().push(&jumbo), Push::Never);
}

/// A super-frame whose `gso_size` is not smaller than its payload yields one segment as long
/// as the frame; if that is longer than an IPv4 length field counts, it is refused rather than
/// sent with a wrapped length.
#[test]
fn segment_refuses_segments_longer_than_an_ip_packet() {
    let mut sup = tcp_frame(true, &[0u8; 100], 1, false, 1, false);
    sup.resize(L3 + MAX_IP_LEN + 1, 0);
    let vh = gso_header(&sup, vnet::gso::TCPV4, u16::MAX);
    assert_eq!(
        segment(&sup, &vh, HEADROOM, &mut vec![0u8; 2 * sup.len()]),
        Err(Unsupported::BadGsoSize)
    );
    // One byte less fits exactly.
    sup.truncate(L3 + MAX_IP_LEN);
    let segs = split(&sup, &vh);
    assert_eq!(segs.len(), 1);
    assert_eq!(usize::from(get16(&segs[0], L3 + 2)), MAX_IP_LEN);
}

#[test]
fn udp_coalescer_keeps_flows_sizes_and_limits() {
    let d = |payload: &[u8], port: u16| {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ip(ip(true, 9, IpNumber::UDP))
            .udp(5353, port);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    };
    let a = d(&[1u8; 1000], 4000);
    let other_port = d(&[1u8; 1000], 4001);
    let bigger = d(&[1u8; 1001], 4000);
    let shorter = d(&[2u8; 10], 4000);
    let tcp = tcp_frame(true, &[1u8; 1000], 1000, false, 1, true);
    let mut c = Coalescer::new();
    assert_eq!(c.push(&a), Push::Never, "no UDP without USO");
    assert_eq!(c.push_with(&a, true), Push::Taken);
    assert_eq!(c.push_with(&other_port, true), Push::Later);
    assert_eq!(c.push_with(&tcp, true), Push::Later);
    assert_eq!(c.push_with(&bigger, true), Push::Later);
    assert_eq!(c.push_with(&a, true), Push::Taken);
    assert_eq!(
        c.push_with(&shorter, true),
        Push::Taken,
        "a shorter one ends it"
    );
    assert_eq!(c.push_with(&a, true), Push::Later);
    assert_eq!(c.segments(), 3);
    let out = c.finish().unwrap();
    assert_eq!(out.len(), vnet::HEADER_LEN + a.len() + 1010);

    // No checksum (zero), a bad checksum, a UDP length that disagrees, or no payload: never.
    let mut no_csum = a.clone();
    let l4 = layout(&a).unwrap().l4;
    put16(&mut no_csum, l4 + 6, 0);
    let mut bad = a.clone();
    let n = bad.len();
    bad[n - 1] ^= 0xff;
    let mut bad_len = a.clone();
    put16(&mut bad_len, l4 + 4, 100);
    let empty = d(&[], 4000);
    for frame in [&no_csum, &bad, &bad_len, &empty] {
        assert_eq!(c.push_with(frame, true), Push::Never);
        assert!(c.is_empty());
    }

    // At most MAX_UDP_SEGMENTS datagrams (small ones, far below MAX_IP_LEN).
    let small = d(&[3u8; 100], 4000);
    for _ in 0..MAX_UDP_SEGMENTS {
        assert_eq!(c.push_with(&small, true), Push::Taken);
    }
    assert_eq!(c.push_with(&small, true), Push::Later);
    let h = vnet::Header::parse(c.finish().unwrap()).unwrap();
    assert_eq!((h.gso_type, h.gso_size), (vnet::gso::UDP_L4, 100));
}
