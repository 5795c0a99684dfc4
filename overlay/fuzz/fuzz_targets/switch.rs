//! The switch on untrusted input: Ethernet/ARP frames from the TAP and VXLAN datagrams
//! from the underlay, against a fixed table. Never panics; replies stay in their buffer.
#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::OnceLock;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use overlay::fdb::{Index, Learned};
use overlay::stage::{Checksum, Passthrough};
use overlay::switch::{Forward, from_tap, from_vtep};
use overlay::{Endpoint, Location, Mac, NetworkTable, Tables, Vni};

fn index() -> &'static Index {
    static INDEX: OnceLock<Index> = OnceLock::new();
    INDEX.get_or_init(|| {
        let vtep = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 4789);
        Index::build(&Tables {
            networks: vec![NetworkTable {
                vni: Vni::new(4096).unwrap(),
                gateway: Ipv4Addr::new(198, 19, 0, 1),
                gateway_mac: Mac([2, 0x4f, 0x56, 0, 0x10, 0]),
                endpoints: vec![
                    Endpoint { mac: Mac([2, 0, 0, 0, 0, 5]), ip: Ipv4Addr::new(198, 19, 0, 5), location: Location::Local },
                    Endpoint { mac: Mac([2, 0, 0, 0, 0, 9]), ip: Ipv4Addr::new(198, 19, 0, 9), location: Location::Remote(vtep) },
                    Endpoint { mac: Mac([2, 0, 0, 0, 0, 100]), ip: Ipv4Addr::new(198, 19, 0, 100), location: Location::Service },
                ],
                peers: vec![vtep],
                external: vec![SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 3), 4789)],
                sealing: None,
            }],
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let index = index();
    let net = index.network(Vni::new(4096).unwrap()).unwrap();
    let mut learned = Learned::with_capacity(16);
    let now = Instant::now();
    let mut reply = [0u8; overlay::switch::REPLY_LEN];
    for checksum in [Checksum::Full, Checksum::Partial] {
        let mut frame = data.to_vec();
        if let Forward::Reply(n) = from_tap(&mut frame, net, &learned, now, &mut reply, &Passthrough, checksum) {
            assert!(n <= reply.len());
        }
    }
    // A member and an external VTEP: both checks, and learning.
    for sender in [[198, 18, 0, 2], [198, 18, 0, 3]] {
        let sender = SocketAddrV4::new(sender.into(), 50000);
        let _ = from_vtep(&mut data.to_vec(), sender, index, &mut learned, now, &Passthrough, &mut reply);
    }
});
