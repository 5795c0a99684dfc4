//! NAT on untrusted frames: `flow` and both rewrites never panic, and a refused frame is left
//! unchanged. A frame that parses, given valid checksums first, keeps them valid through a
//! rewrite in Full mode; given a Partial sum instead, the same rewrite then completion gives
//! the same bytes. The first 7 input bytes choose the rewrite: side, address, port.
#![no_main]

use std::net::Ipv4Addr;

use ingress::nat::{flow, rewrite_dst, rewrite_src};
use libfuzzer_sys::fuzz_target;
use packet::checksum::Mode;
use packet::ipv4::{self, protocol};
use packet::l4::{self, Segment};
use packet::{tcp, udp};

/// Where the IPv4 header starts: after an untagged Ethernet header.
const IP: usize = 14;

/// What to do with a frame's TCP/UDP checksum.
#[derive(Clone, Copy)]
enum Checksum {
    Fill(Mode),
    Complete,
    Verify,
}

/// Applies `op` to the IPv4 header and TCP/UDP checksums of a frame `flow` accepted; true if
/// both are valid afterwards.
fn checksums(frame: &mut [u8], op: Checksum) -> bool {
    let Ok(mut ip) = ipv4::Packet::new_checked(&mut frame[IP..]) else {
        unreachable!("flow parsed it")
    };
    if let Checksum::Fill(_) = op {
        ip.fill_checksum();
    }
    let (src, dst, proto) = (ip.src(), ip.dst(), ip.protocol());
    let ip_ok = ip.verify_checksum();
    let seg = ip.payload_mut();
    let l4_ok = match proto {
        protocol::TCP => tcp::Packet::new_checked(seg)
            .map(|t| transport(t, op, src, dst))
            .ok(),
        _ => udp::Packet::new_checked(seg)
            .map(|u| transport(u, op, src, dst))
            .ok(),
    };
    ip_ok && l4_ok.expect("flow parsed it")
}

fn transport<P: l4::Protocol>(
    mut seg: Segment<&mut [u8], P>,
    op: Checksum,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) -> bool {
    match op {
        Checksum::Fill(mode) => seg.fill_checksum(src, dst, mode),
        Checksum::Complete => seg.complete_checksum(),
        Checksum::Verify => {}
    }
    seg.verify_checksum(src, dst)
}

fuzz_target!(|data: &[u8]| {
    let Some((&[side, a, b, c, d, p0, p1], frame)) = data.split_first_chunk::<7>() else {
        return;
    };
    let (addr, port) = (Ipv4Addr::new(a, b, c, d), u16::from_be_bytes([p0, p1]));
    let rewrite = |f: &mut [u8], mode| {
        if side & 1 != 0 {
            rewrite_src(f, addr, port, mode)
        } else {
            rewrite_dst(f, addr, port, mode)
        }
    };
    let parsed = flow(frame).is_ok();
    for mode in [Mode::Full, Mode::Partial] {
        let mut f = frame.to_vec();
        let r = rewrite(&mut f, mode);
        assert_eq!(r.is_ok(), parsed, "rewrite and flow agree on what parses");
        if r.is_err() {
            assert_eq!(f, frame, "a refused frame is unchanged");
        }
    }
    if !parsed {
        return;
    }
    let mut full = frame.to_vec();
    checksums(&mut full, Checksum::Fill(Mode::Full));
    let mut partial = full.clone();
    checksums(&mut partial, Checksum::Fill(Mode::Partial));
    assert!(rewrite(&mut full, Mode::Full).is_ok());
    assert!(rewrite(&mut partial, Mode::Partial).is_ok());
    assert!(
        checksums(&mut full, Checksum::Verify),
        "checksums valid after a Full rewrite"
    );
    checksums(&mut partial, Checksum::Complete);
    assert_eq!(
        partial, full,
        "a completed Partial rewrite equals the Full one"
    );
});
