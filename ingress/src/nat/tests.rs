//! Tests of [`super`]: rewrites checked against etherparse, Partial (offloaded) frames
//! completed after the rewrite equal to Full ones, and what is refused, unchanged.

use super::*;
use etherparse::{
    IpHeaders, IpNumber, Ipv4Header, Ipv4Options, NetSlice, PacketBuilder, SlicedPacket, TcpHeader,
    TransportSlice,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// The parts of a random Ethernet + IPv4 + TCP/UDP frame.
#[derive(Clone, Debug)]
struct Spec {
    flow: Tuple,
    ip_options: usize,
    tcp_options: usize,
    tcp_flags: u8,
    /// UDP sent without a checksum (a zero field, RFC 768).
    udp_unchecked: bool,
    payload: Vec<u8>,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        any::<bool>(),
        any::<([u8; 4], u16, [u8; 4], u16)>(),
        (0usize..=2, 0usize..=10, any::<u8>(), any::<bool>()),
        // Up to a TSO super-frame's worth, so the checksum's vector path runs too.
        prop_oneof![vec(any::<u8>(), 0..200), vec(any::<u8>(), 1400..4000)],
    )
        .prop_map(
            |(
                tcp,
                (src, sport, dst, dport),
                (ip_options, tcp_options, tcp_flags, unchecked),
                payload,
            )| {
                Spec {
                    flow: Tuple::new(
                        if tcp { Protocol::Tcp } else { Protocol::Udp },
                        SocketAddrV4::new(src.into(), sport),
                        SocketAddrV4::new(dst.into(), dport),
                    ),
                    ip_options,
                    tcp_options,
                    tcp_flags,
                    udp_unchecked: !tcp && unchecked,
                    payload,
                }
            },
        )
}

/// The frame etherparse builds for `s`, with full checksums.
fn build(s: &Spec) -> Vec<u8> {
    let f = s.flow;
    let proto = match f.proto {
        Protocol::Tcp => IpNumber::TCP,
        Protocol::Udp => IpNumber::UDP,
    };
    let mut ip = Ipv4Header::new(0, 64, proto, f.src.ip().octets(), f.dst.ip().octets()).unwrap();
    ip.dont_fragment = true;
    ip.options = Ipv4Options::try_from(&vec![1u8; s.ip_options * 4][..]).unwrap();
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ip(IpHeaders::Ipv4(ip, Default::default()));
    let mut out = Vec::new();
    match f.proto {
        Protocol::Tcp => {
            let mut t = TcpHeader::new(f.src.port(), f.dst.port(), 7, 512);
            let b = s.tcp_flags;
            (t.fin, t.syn, t.rst, t.psh, t.ack) =
                (b & 1 != 0, b & 2 != 0, b & 4 != 0, b & 8 != 0, b & 16 != 0);
            t.set_options_raw(&vec![1u8; s.tcp_options * 4]).unwrap();
            eth.tcp_header(t).write(&mut out, &s.payload).unwrap();
        }
        Protocol::Udp => eth
            .udp(f.src.port(), f.dst.port())
            .write(&mut out, &s.payload)
            .unwrap(),
    }
    if s.udp_unchecked {
        let at = field::IP + ipv4::MIN_HEADER_LEN + s.ip_options * 4 + 6;
        out[at..at + 2].fill(0);
    }
    out
}

/// Checks both checksums of `frame` with etherparse (a zero UDP checksum stays "none").
fn assert_valid(frame: &[u8], udp_unchecked: bool) {
    let p = SlicedPacket::from_ethernet(frame).expect("parses");
    let Some(NetSlice::Ipv4(v4)) = &p.net else {
        panic!("not IPv4")
    };
    let h = v4.header().to_header();
    assert_eq!(
        h.header_checksum,
        h.calc_header_checksum(),
        "IPv4 header checksum"
    );
    let (src, dst) = (h.source, h.destination);
    match p.transport.expect("L4") {
        TransportSlice::Tcp(t) => {
            assert_eq!(
                t.checksum(),
                t.calc_checksum_ipv4(src, dst).unwrap(),
                "TCP checksum"
            )
        }
        TransportSlice::Udp(u) if udp_unchecked => assert_eq!(u.checksum(), 0, "no UDP checksum"),
        TransportSlice::Udp(u) => {
            let want = u
                .to_header()
                .calc_checksum_ipv4_raw(src, dst, u.payload())
                .unwrap();
            assert_eq!(u.checksum(), want, "UDP checksum");
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// The L4 view of a frame this file built, to set up and complete Partial checksums as a
/// sender with checksum offload and the device would.
fn with_l4(frame: &mut [u8], f: impl FnOnce(L4View<'_>, Ipv4Addr, Ipv4Addr)) {
    let mut ip = ipv4::Packet::new_checked(&mut frame[field::IP..]).unwrap();
    let (src, dst, proto) = (ip.src(), ip.dst(), ip.protocol());
    let seg = ip.payload_mut();
    let view = match proto {
        protocol::TCP => L4View::Tcp(tcp::Packet::new_checked(seg).unwrap()),
        _ => L4View::Udp(udp::Packet::new_checked(seg).unwrap()),
    };
    f(view, src, dst)
}

enum L4View<'a> {
    Tcp(tcp::Packet<&'a mut [u8]>),
    Udp(udp::Packet<&'a mut [u8]>),
}

fn to_partial(frame: &mut [u8]) {
    with_l4(frame, |v, src, dst| match v {
        L4View::Tcp(mut t) => t.fill_checksum(src, dst, Mode::Partial),
        L4View::Udp(mut u) => u.fill_checksum(src, dst, Mode::Partial),
    });
}

fn complete(frame: &mut [u8]) {
    with_l4(frame, |v, _, _| match v {
        L4View::Tcp(mut t) => t.complete_checksum(),
        L4View::Udp(mut u) => u.complete_checksum(),
    });
}

/// One rewrite: of the source (true) or destination, to an address and port.
type Op = (bool, [u8; 4], u16);

fn apply(frame: &mut [u8], ops: &[Op], mode: Mode) {
    for &(src, addr, port) in ops {
        let r = if src {
            rewrite_src(frame, addr.into(), port, mode)
        } else {
            rewrite_dst(frame, addr.into(), port, mode)
        };
        r.unwrap();
    }
}

proptest! {
    /// After any sequence of source and destination rewrites, both checksums of a TCP or UDP
    /// frame are valid (etherparse), the flow is the one written, and nothing else moved. A
    /// Partial frame (a super-frame or `NEEDS_CSUM`), completed after the same rewrites, is
    /// the same bytes.
    #[test]
    fn rewrites_keep_every_checksum_valid(s in spec(), ops in vec(any::<Op>(), 1..8)) {
        let orig = build(&s);
        assert_valid(&orig, s.udp_unchecked);
        prop_assert_eq!(flow(&orig), Ok(s.flow));
        let mut full = orig.clone();
        apply(&mut full, &ops, Mode::Full);
        assert_valid(&full, s.udp_unchecked);
        let mut want = s.flow;
        for &(src, addr, port) in &ops {
            if src {
                want.src = SocketAddrV4::new(addr.into(), port);
            } else {
                want.dst = SocketAddrV4::new(addr.into(), port);
            }
        }
        prop_assert_eq!(flow(&full), Ok(want));
        let moved = |a: &[u8], b: &[u8]| a.iter().zip(b).filter(|(x, y)| x != y).count();
        // At most both addresses and ports, and two checksums: 16 bytes.
        prop_assert!(moved(&orig, &full) <= 16);
        prop_assert_eq!(orig.len(), full.len());
        if !s.udp_unchecked {
            let mut partial = orig.clone();
            to_partial(&mut partial);
            apply(&mut partial, &ops, Mode::Partial);
            complete(&mut partial);
            prop_assert_eq!(&partial, &full);
        }
    }

    /// Damaged frames (cut short, a byte changed) never panic, and a refused one is left as
    /// it was.
    #[test]
    fn damaged_frames_are_refused_unchanged(
        s in spec(), cut in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(),
        byte: u8, mode in prop_oneof![Just(Mode::Full), Just(Mode::Partial)],
    ) {
        let mut frame = build(&s);
        frame.truncate(cut.index(frame.len() + 1));
        if !frame.is_empty() {
            let i = at.index(frame.len());
            frame[i] = byte;
        }
        let orig = frame.clone();
        let keyed = flow(&frame);
        let r = rewrite_dst(&mut frame, Ipv4Addr::new(198, 19, 0, 7), 8080, mode);
        prop_assert_eq!(r.is_ok(), keyed.is_ok());
        if r.is_err() {
            prop_assert_eq!(frame, orig);
        }
    }
}

fn frame(proto: Protocol) -> Vec<u8> {
    build(&Spec {
        flow: Tuple::new(
            proto,
            SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 5), 40000),
            SocketAddrV4::new(Ipv4Addr::new(198, 19, 1, 1), 80),
        ),
        ip_options: 0,
        tcp_options: 0,
        tcp_flags: 2,
        udp_unchecked: false,
        payload: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
    })
}

/// DNAT then un-DNAT of the reply, the way a connection to a VIP goes.
#[test]
fn dnat_and_reply() {
    let task = Ipv4Addr::new(198, 19, 0, 9);
    let mut f = frame(Protocol::Tcp);
    rewrite_dst(&mut f, task, 8080, Mode::Full).unwrap();
    let k = flow(&f).unwrap();
    assert_eq!(
        (k.dst, k.src),
        (
            SocketAddrV4::new(task, 8080),
            SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 5), 40000)
        )
    );
    assert_valid(&f, false);
    rewrite_src(&mut f, Ipv4Addr::new(198, 19, 1, 1), 80, Mode::Full).unwrap();
    assert_eq!(
        flow(&f).unwrap().src,
        SocketAddrV4::new(Ipv4Addr::new(198, 19, 1, 1), 80)
    );
    assert_valid(&f, false);
}

#[test]
fn refusals_name_the_reason() {
    let vip = Ipv4Addr::new(198, 19, 1, 1);
    let check = |mut f: Vec<u8>, want: Unsupported| {
        let orig = f.clone();
        assert_eq!(flow(&f), Err(want));
        assert_eq!(rewrite_dst(&mut f, vip, 1, Mode::Full), Err(want));
        assert_eq!(rewrite_src(&mut f, vip, 1, Mode::Partial), Err(want));
        assert_eq!(f, orig, "{want:?} changed the frame");
    };
    let good = frame(Protocol::Udp);
    check(good[..13].to_vec(), Unsupported::NotIpv4);
    let mut arp = good.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    check(arp, Unsupported::NotIpv4);
    check(
        good[..33].to_vec(),
        Unsupported::Ipv4(ipv4::Malformed::Truncated),
    );
    let mut fragment = good.clone();
    fragment[field::IP + 6] |= 0x20; // MF
    check(fragment, Unsupported::Fragment);
    let mut icmp = good.clone();
    icmp[field::IP + 9] = 1;
    check(icmp, Unsupported::Protocol(1));
    let mut short_udp = good.clone();
    short_udp[field::IP + 24..field::IP + 26].copy_from_slice(&4u16.to_be_bytes());
    check(short_udp, Unsupported::Udp(udp::Malformed::Length));
    let tcp = frame(Protocol::Tcp);
    // Total Length cut to leave 19 bytes of TCP header.
    let mut cut = tcp[..field::IP + 20 + 19].to_vec();
    cut[field::IP + 2..field::IP + 4].copy_from_slice(&39u16.to_be_bytes());
    check(cut, Unsupported::Tcp(tcp::Malformed::Truncated));
}
