//! The load balancer on untrusted frames, as the data path hands it any frame sent to a VIP,
//! delivered to a local container, steered from the host to a published port or sent on by
//! another node: never panics, an answer fits the reply buffer and is a whole
//! Ethernet + IPv4 frame, and a frame it passes is left as it was.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::LazyLock;
use std::time::Instant;

use ingress::Protocol;
use ingress::balancer::{Balancer, Origin, Verdict};
use ingress::service::{Backend, Health, Port, Spec, Table};
use ingress::{Vip, maglev};
use libfuzzer_sys::fuzz_target;
use packet::checksum::Mode;

fn mac_of(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [2, 0x42, o[0], o[1], o[2], o[3]]
}

/// One service at 198.19.0.100 over tasks .7 and .8, and one with no healthy task at .101:
/// new flows, tracked flows in both directions and resets are all reachable.
static BALANCER: LazyLock<Balancer> = LazyLock::new(|| {
    let b = Balancer::new(256, Default::default(), mac_of, Ipv4Addr::new(198, 18, 0, 1)).unwrap();
    let task = |last, health| Backend {
        addr: Ipv4Addr::new(198, 19, 0, last),
        node: Ipv4Addr::new(198, 18, 0, 1),
        health,
    };
    let specs = [
        Spec {
            name: "web".into(),
            vip: Vip(Ipv4Addr::new(198, 19, 0, 100).into()),
            backends: vec![task(7, Health::Healthy), task(8, Health::Healthy)],
            ports: [Protocol::Tcp, Protocol::Udp]
                .map(|protocol| Port {
                    protocol,
                    published: 9200,
                    target: 80,
                    addr: None,
                    client_affinity: false,
                    local_only: false,
                })
                .to_vec(),
        },
        Spec {
            name: "down".into(),
            vip: Vip(Ipv4Addr::new(198, 19, 0, 101).into()),
            backends: vec![task(9, Health::Unhealthy)],
            ports: Vec::new(),
        },
    ];
    b.publish(Table::build(maglev::Size::new(251).unwrap(), specs).unwrap(), Instant::now());
    b
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode_byte, frame)) = data.split_first() else {
        return;
    };
    let mode = if mode_byte & 1 == 0 { Mode::Full } else { Mode::Partial };
    let origin = match mode_byte >> 1 & 3 {
        0 => Origin::Overlay,
        1 => Origin::Host,
        _ => Origin::Node(Ipv4Addr::new(198, 18, 0, 2)),
    };
    let mut frame = frame.to_vec();
    let before = frame.clone();
    let mut reply = [0u8; 128];
    match BALANCER.process(&mut frame, mode, origin, Instant::now(), &mut reply) {
        Verdict::Pass => assert_eq!(frame, before, "a passed frame is unchanged"),
        Verdict::Reply(len) => {
            assert!(len <= reply.len());
            assert!(len >= 14 + 20, "an answer is a whole frame");
            assert_eq!(&reply[12..14], &[0x08, 0x00]);
        }
        Verdict::Rewritten | Verdict::Drop | Verdict::Wire | Verdict::Return(_) => {
            assert_eq!(frame.len(), before.len())
        }
    }
});
