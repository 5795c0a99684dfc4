//! The classic BPF program that holds a container to its own addresses on its bridge port.
//!
//! The daemon attaches it with `tc` (direct action) to the ingress of the container's host-side
//! veth, so it sees every frame the container sends before the bridge does: nothing else can
//! stop a same-node spoof, which the bridge forwards without involving overlayd. It passes a
//! frame only if:
//! - its source MAC is the container's, and it carries no VLAN tag;
//! - ARP: the sender MAC is the container's and the sender IP its own (or unspecified, a probe);
//! - IPv4: the source is its own address;
//! - IPv6: the source is the link-local address its MAC derives (modified EUI-64) or
//!   unspecified (duplicate address detection), and the packet is TCP, UDP or ICMPv6 right
//!   after the IPv6 header, or MLD behind a hop-by-hop header. Among ICMPv6, Router
//!   Advertisements and Redirects are dropped (a container is no router), and a Neighbor
//!   Advertisement only for its own link-local address.
//!
//! Everything else (other ethertypes included) is dropped. Containers get their addresses from
//! `attach` (no DHCP), so nothing else is needed.
//!
//! Pure: [`program`] returns instructions and [`tc_bytecode`] the form `tc ... bpf bytecode`
//! takes; the tests run them through a small interpreter. On tc ingress a classic program sees
//! the frame from its Ethernet header, and returns a tc verdict.

use std::net::Ipv4Addr;

use crate::ethernet::{self, Mac};
use crate::nd;

/// `TC_ACT_OK`: the frame goes on to the bridge.
pub const PASS: u32 = 0;
/// `TC_ACT_SHOT`: the frame is dropped (and counted in the clsact qdisc's drops).
pub const DROP: u32 = 2;

/// Offsets from the start of the Ethernet frame.
mod at {
    pub const SRC_MAC: u32 = 6;
    pub const ETHERTYPE: u32 = 12;
    pub const L3: u32 = 14;
    /// ARP (RFC 826): hardware and protocol types, their lengths, sender MAC and IP.
    pub const ARP_TYPES: u32 = L3;
    pub const ARP_LENS: u32 = L3 + 4;
    pub const ARP_SHA: u32 = L3 + 8;
    pub const ARP_SPA: u32 = L3 + 14;
    pub const ARP_END: u32 = L3 + 28;
    /// IPv4 source (RFC 791).
    pub const IPV4_SRC: u32 = L3 + 12;
    pub const IPV4_END: u32 = L3 + 20;
    /// IPv6 (RFC 8200 §3): next header, source; the header's end.
    pub const IPV6_NEXT: u32 = L3 + 6;
    pub const IPV6_SRC: u32 = L3 + 8;
    pub const IPV6_END: u32 = L3 + 40;
    /// ICMPv6 right after the IPv6 header: type, and a Neighbor Advertisement's target
    /// (RFC 4861 §4.4).
    pub const ICMP6_TYPE: u32 = IPV6_END;
    pub const NA_TARGET: u32 = IPV6_END + 8;
    pub const NA_END: u32 = NA_TARGET + 16;
    /// A hop-by-hop header right after the IPv6 header (RFC 8200 §4.3): next header and
    /// length in 8-byte units beyond the first 8.
    pub const HBH_NEXT: u32 = IPV6_END;
    pub const HBH_LEN: u32 = IPV6_END + 1;
}

mod proto {
    pub const ARP_ETHERNET_IPV4: u32 = 0x0001_0800;
    pub const ARP_LENS: u32 = 0x0604;
    pub const HOP_BY_HOP: u32 = 0;
    pub const TCP: u32 = 6;
    pub const UDP: u32 = 17;
    pub const ICMPV6: u32 = 58;
    pub const ROUTER_ADVERTISEMENT: u32 = 134;
    pub const NEIGHBOR_ADVERTISEMENT: u32 = 136;
    pub const REDIRECT: u32 = 137;
    /// MLD query, report, done, and MLDv2 report (RFC 2710, RFC 3810).
    pub const MLD: [u32; 4] = [130, 131, 132, 143];
}

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// The program for a container with `mac` and `ip`.
pub fn program(mac: Mac, ip: Ipv4Addr) -> Vec<Insn> {
    use Step::*;
    let m = mac.0;
    let mac_hi = u32::from_be_bytes([m[0], m[1], m[2], m[3]]);
    let mac_lo = u32::from(u16::from_be_bytes([m[4], m[5]]));
    let ll = nd::link_local(mac).octets();
    let ll_word = |i: usize| u32::from_be_bytes([ll[i], ll[i + 1], ll[i + 2], ll[i + 3]]);
    let ip = u32::from(ip);
    let mut p = vec![
        LdVlanPresent,
        JneTo(0, L::Drop),
        Ld(W, at::SRC_MAC),
        JneTo(mac_hi, L::Drop),
        Ld(H, at::SRC_MAC + 4),
        JneTo(mac_lo, L::Drop),
        Ld(H, at::ETHERTYPE),
        JeqTo(ethernet::ethertype::ARP.into(), L::Arp),
        JeqTo(ethernet::ethertype::IPV4.into(), L::Ipv4),
        JeqTo(ethernet::ethertype::IPV6.into(), L::Ipv6),
        Ret(DROP),
        Label(L::Arp),
        LdLen,
        JltTo(at::ARP_END, L::Drop),
        Ld(W, at::ARP_TYPES),
        JneTo(proto::ARP_ETHERNET_IPV4, L::Drop),
        Ld(H, at::ARP_LENS),
        JneTo(proto::ARP_LENS, L::Drop),
        Ld(W, at::ARP_SHA),
        JneTo(mac_hi, L::Drop),
        Ld(H, at::ARP_SHA + 4),
        JneTo(mac_lo, L::Drop),
        Ld(W, at::ARP_SPA),
        JeqTo(ip, L::Pass),
        JeqTo(0, L::Pass),
        Ret(DROP),
        Label(L::Ipv4),
        LdLen,
        JltTo(at::IPV4_END, L::Drop),
        Ld(W, at::IPV4_SRC),
        JeqTo(ip, L::Pass),
        Ret(DROP),
        Label(L::Ipv6),
        LdLen,
        JltTo(at::IPV6_END, L::Drop),
        // The source: its link-local address, else all zeros.
        Ld(W, at::IPV6_SRC),
        JeqTo(ll_word(0), L::LinkLocal),
        JneTo(0, L::Drop),
    ];
    for word in 1..4 {
        p.extend([Ld(W, at::IPV6_SRC + 4 * word), JneTo(0, L::Drop)]);
    }
    p.extend([Goto(L::SourceOk), Label(L::LinkLocal)]);
    for word in 1..4 {
        p.extend([
            Ld(W, at::IPV6_SRC + 4 * word),
            JneTo(ll_word(4 * word as usize), L::Drop),
        ]);
    }
    p.extend([
        Label(L::SourceOk),
        Ld(B, at::IPV6_NEXT),
        JeqTo(proto::TCP, L::Pass),
        JeqTo(proto::UDP, L::Pass),
        JeqTo(proto::HOP_BY_HOP, L::HopByHop),
        JneTo(proto::ICMPV6, L::Drop),
        LdLen,
        JltTo(at::ICMP6_TYPE + 1, L::Drop),
        Ld(B, at::ICMP6_TYPE),
        JeqTo(proto::ROUTER_ADVERTISEMENT, L::Drop),
        JeqTo(proto::REDIRECT, L::Drop),
        JneTo(proto::NEIGHBOR_ADVERTISEMENT, L::Pass),
        LdLen,
        JltTo(at::NA_END, L::Drop),
    ]);
    for word in 0..4 {
        p.extend([
            Ld(W, at::NA_TARGET + 4 * word),
            JneTo(ll_word(4 * word as usize), L::Drop),
        ]);
    }
    p.extend([
        Ret(PASS),
        // Behind a hop-by-hop header only MLD (which needs its router alert) may follow.
        Label(L::HopByHop),
        LdLen,
        JltTo(at::HBH_LEN + 1, L::Drop),
        Ld(B, at::HBH_NEXT),
        JneTo(proto::ICMPV6, L::Drop),
        // X = offset of the ICMPv6 type: the header's end + (length + 1) * 8.
        Ld(B, at::HBH_LEN),
        AddK(1),
        MulK(8),
        AddK(at::HBH_NEXT),
        Tax,
        LdLen,
        JleXTo(L::Drop),
        LdIndB,
    ]);
    p.extend(proto::MLD.map(|t| JeqTo(t, L::Pass)));
    p.extend([
        Ret(DROP),
        Label(L::Pass),
        Ret(PASS),
        Label(L::Drop),
        Ret(DROP),
    ]);
    assemble(&p)
}

/// The instructions as `tc filter ... bpf bytecode` takes them: `N,code jt jf k,...`.
pub fn tc_bytecode(program: &[Insn]) -> String {
    let mut s = program.len().to_string();
    for i in program {
        s.push_str(&format!(",{} {} {} {}", i.code, i.jt, i.jf, i.k));
    }
    s
}

/// Jump targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum L {
    Arp,
    Ipv4,
    Ipv6,
    LinkLocal,
    SourceOk,
    HopByHop,
    Pass,
    Drop,
}

#[derive(Clone, Copy)]
enum Size {
    W,
    H,
    B,
}
use Size::{B, H, W};

/// Instructions with symbolic jump targets, resolved by [`assemble`].
#[derive(Clone, Copy)]
enum Step {
    /// A = whether the frame carried a VLAN tag (the tag is kept out of the data).
    LdVlanPresent,
    /// A = the bytes at an absolute offset.
    Ld(Size, u32),
    /// A = the byte at X.
    LdIndB,
    /// A = frame length.
    LdLen,
    AddK(u32),
    MulK(u32),
    /// X = A.
    Tax,
    JeqTo(u32, L),
    JneTo(u32, L),
    /// Jump if A < k.
    JltTo(u32, L),
    /// Jump if A <= X.
    JleXTo(L),
    Goto(L),
    Ret(u32),
    Label(L),
}

fn assemble(steps: &[Step]) -> Vec<Insn> {
    use Step::*;
    // Index of each label's next instruction.
    let mut labels = Vec::new();
    let mut n = 0usize;
    for s in steps {
        match s {
            Label(l) => labels.push((*l, n)),
            _ => n += 1,
        }
    }
    let target = |l: L, from: usize| {
        let to = labels
            .iter()
            .find(|(x, _)| *x == l)
            .map(|(_, i)| *i)
            .unwrap_or_else(|| unreachable!("label {l:?} is placed"));
        to - from - 1
    };
    let short = |off: usize| u8::try_from(off).unwrap_or_else(|_| unreachable!("jump too far"));
    let op = |code: u32, jt: u8, jf: u8, k: u32| Insn {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let size = |s: Size| match s {
        W => libc::BPF_W,
        H => libc::BPF_H,
        B => libc::BPF_B,
    };
    let jeq = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
    let mut out = Vec::with_capacity(n);
    for s in steps {
        let here = out.len();
        out.push(match *s {
            Label(_) => continue,
            LdVlanPresent => op(
                libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
                0,
                0,
                (libc::SKF_AD_OFF + libc::SKF_AD_VLAN_TAG_PRESENT) as u32,
            ),
            Ld(s, k) => op(libc::BPF_LD | size(s) | libc::BPF_ABS, 0, 0, k),
            LdIndB => op(libc::BPF_LD | libc::BPF_B | libc::BPF_IND, 0, 0, 0),
            LdLen => op(libc::BPF_LD | libc::BPF_W | libc::BPF_LEN, 0, 0, 0),
            AddK(k) => op(libc::BPF_ALU | libc::BPF_ADD | libc::BPF_K, 0, 0, k),
            MulK(k) => op(libc::BPF_ALU | libc::BPF_MUL | libc::BPF_K, 0, 0, k),
            Tax => op(libc::BPF_MISC | libc::BPF_TAX, 0, 0, 0),
            JeqTo(k, l) => op(jeq, short(target(l, here)), 0, k),
            JneTo(k, l) => op(jeq, 0, short(target(l, here)), k),
            JltTo(k, l) => op(
                libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
                0,
                short(target(l, here)),
                k,
            ),
            JleXTo(l) => op(
                libc::BPF_JMP | libc::BPF_JGT | libc::BPF_X,
                0,
                short(target(l, here)),
                0,
            ),
            Goto(l) => op(libc::BPF_JMP | libc::BPF_JA, 0, 0, target(l, here) as u32),
            Ret(k) => op(libc::BPF_RET | libc::BPF_K, 0, 0, k),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arp;
    use crate::nd::tests::{advertisement, solicitation};
    use etherparse::PacketBuilder;
    use std::net::Ipv6Addr;

    /// The container: the MAC the `nd` test helpers send from.
    const ME: Mac = Mac([0x02, 0x42, 0xc6, 0x13, 0, 1]);
    const OTHER: Mac = Mac([0x02, 0x42, 0xc6, 0x13, 0, 9]);
    const MY_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
    const OTHER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 9);

    /// Runs a classic BPF program the way the kernel does for the opcodes [`program`] uses;
    /// a load past the end returns 0, as in the kernel.
    fn run(prog: &[Insn], frame: &[u8], vlan: bool) -> u32 {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let load = |off: usize, len: usize| -> Option<u32> {
            let b = frame.get(off..off + len)?;
            Some(b.iter().fold(0u32, |acc, &v| acc << 8 | u32::from(v)))
        };
        let ancillary = (libc::SKF_AD_OFF + libc::SKF_AD_VLAN_TAG_PRESENT) as u32;
        loop {
            let i = prog[pc];
            pc += 1;
            let code = u32::from(i.code);
            match code {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS && i.k == ancillary => {
                    a = u32::from(vlan)
                }
                c if c & 0x07 == libc::BPF_LD && c & 0xe0 == libc::BPF_ABS => {
                    let len = match c & 0x18 {
                        s if s == libc::BPF_W => 4,
                        s if s == libc::BPF_H => 2,
                        _ => 1,
                    };
                    match load(i.k as usize, len) {
                        Some(v) => a = v,
                        None => return 0,
                    }
                }
                c if c == libc::BPF_LD | libc::BPF_B | libc::BPF_IND => {
                    match load((x + i.k) as usize, 1) {
                        Some(v) => a = v,
                        None => return 0,
                    }
                }
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_LEN => a = frame.len() as u32,
                c if c == libc::BPF_ALU | libc::BPF_ADD | libc::BPF_K => a = a.wrapping_add(i.k),
                c if c == libc::BPF_ALU | libc::BPF_MUL | libc::BPF_K => a = a.wrapping_mul(i.k),
                c if c == libc::BPF_MISC | libc::BPF_TAX => x = a,
                c if c == libc::BPF_JMP | libc::BPF_JA => pc += i.k as usize,
                c if c & 0x07 == libc::BPF_JMP => {
                    let operand = if c & 0x08 == libc::BPF_X { x } else { i.k };
                    let taken = match c & 0xf0 {
                        j if j == libc::BPF_JEQ => a == operand,
                        j if j == libc::BPF_JGT => a > operand,
                        j if j == libc::BPF_JGE => a >= operand,
                        j => panic!("unexpected jump {j:#x}"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                c if c == libc::BPF_RET | libc::BPF_K => return i.k,
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    fn verdict(frame: &[u8]) -> u32 {
        run(&program(ME, MY_IP), frame, false)
    }

    fn arp_from(eth_src: Mac, sha: Mac, spa: Ipv4Addr) -> Vec<u8> {
        let mut f = vec![0u8; arp::REPLY_FRAME_LEN];
        arp::emit_request((sha, spa), OTHER_IP, &mut f);
        f[6..12].copy_from_slice(&eth_src.0);
        f
    }

    fn udp4(src_mac: Mac, src: Ipv4Addr) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(src_mac.0, OTHER.0)
            .ipv4(src.octets(), OTHER_IP.octets(), 64)
            .udp(1000, 2000)
            .write(&mut out, b"hello")
            .unwrap();
        out
    }

    fn udp6(src: Ipv6Addr) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(ME.0, OTHER.0)
            .ipv6(src.octets(), nd::link_local(OTHER).octets(), 64)
            .udp(1000, 2000)
            .write(&mut out, b"hello")
            .unwrap();
        out
    }

    /// `frame` (IPv6 + ICMPv6) with an 8-byte hop-by-hop header put in front of the ICMPv6.
    fn behind_hop_by_hop(frame: &[u8]) -> Vec<u8> {
        let l3 = at::L3 as usize;
        let mut f = frame[..l3 + 40].to_vec();
        f[l3 + 6] = 0;
        f.extend_from_slice(&[58, 0, 5, 2, 0, 0, 1, 0]); // router alert, PadN
        f.extend_from_slice(&frame[l3 + 40..]);
        f
    }

    fn with_icmp6_type(frame: &[u8], ty: u8) -> Vec<u8> {
        let mut f = frame.to_vec();
        f[at::ICMP6_TYPE as usize] = ty;
        f
    }

    #[test]
    fn passes_what_the_container_may_send() {
        let me6 = nd::link_local(ME);
        let ok = [
            ("ARP from itself", arp_from(ME, ME, MY_IP)),
            ("ARP probe", arp_from(ME, ME, Ipv4Addr::UNSPECIFIED)),
            ("IPv4 from itself", udp4(ME, MY_IP)),
            ("IPv6 from its link-local", udp6(me6)),
            (
                "NS from its link-local",
                solicitation(me6, nd::link_local(OTHER), 255),
            ),
            ("DAD", solicitation(Ipv6Addr::UNSPECIFIED, me6, 255)),
            ("NA for itself", advertisement(ME, me6, me6, ME)),
            (
                "MLD behind hop-by-hop",
                behind_hop_by_hop(&with_icmp6_type(&udp6_icmp(me6), 143)),
            ),
        ];
        for (what, frame) in ok {
            assert_eq!(verdict(&frame), PASS, "{what}");
        }
    }

    /// An ICMPv6 frame (an NS) from `src`, for type rewrites.
    fn udp6_icmp(src: Ipv6Addr) -> Vec<u8> {
        solicitation(src, nd::link_local(OTHER), 255)
    }

    #[test]
    fn drops_spoofs_and_everything_else() {
        let me6 = nd::link_local(ME);
        let other6 = nd::link_local(OTHER);
        let bad = [
            ("another source MAC", arp_from(OTHER, ME, MY_IP)),
            ("ARP claiming another IP", arp_from(ME, ME, OTHER_IP)),
            ("ARP with another sender MAC", arp_from(ME, OTHER, MY_IP)),
            ("IPv4 from another IP", udp4(ME, OTHER_IP)),
            ("IPv4 from another MAC", udp4(OTHER, MY_IP)),
            ("IPv6 from another address", udp6(other6)),
            (
                "IPv6 from a global address",
                udp6("2001:db8::1".parse().unwrap()),
            ),
            ("NA for another address", advertisement(ME, me6, other6, ME)),
            (
                "NA for another address behind hop-by-hop",
                behind_hop_by_hop(&advertisement(ME, me6, other6, ME)),
            ),
            (
                "router advertisement",
                with_icmp6_type(&udp6_icmp(me6), 134),
            ),
            ("redirect", with_icmp6_type(&udp6_icmp(me6), 137)),
            ("unknown ethertype", {
                let mut f = udp4(ME, MY_IP);
                f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
                f
            }),
        ];
        for (what, frame) in &bad {
            assert_eq!(verdict(frame), DROP, "{what}");
            // No truncation of a forbidden frame gets through either (a failed load would
            // return 0, which is PASS).
            for n in ethernet::HEADER_LEN..frame.len() {
                assert_eq!(verdict(&frame[..n]), DROP, "{what}, cut to {n} bytes");
            }
        }
        assert_eq!(
            run(&program(ME, MY_IP), &udp4(ME, MY_IP), true),
            DROP,
            "VLAN-tagged"
        );
    }

    #[test]
    fn bytecode_is_what_tc_parses() {
        let prog = program(ME, MY_IP);
        let text = tc_bytecode(&prog);
        let mut parts = text.split(',');
        assert_eq!(parts.next(), Some(prog.len().to_string().as_str()));
        assert_eq!(parts.count(), prog.len());
        assert!(prog.len() < 256, "fits a jump offset and tc's limit");
        let vlan = (libc::SKF_AD_OFF + libc::SKF_AD_VLAN_TAG_PRESENT) as u32;
        assert!(text.starts_with(&format!("{},32 0 0 {vlan},", prog.len())));
    }
}
