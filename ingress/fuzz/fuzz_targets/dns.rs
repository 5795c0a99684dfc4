//! DNS answers: never panic, and every reply is a DNS response to the query's id, within the
//! size limit, whatever the datagram holds.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::LazyLock;

use hickory_proto::op::{Message, MessageType};
use ingress::dns::{DropReason, MAX_UDP_PAYLOAD, Names, Verdict, answer, servfail};
use libfuzzer_sys::fuzz_target;

/// A service of each mode with enough tasks to overflow a 512-byte reply, and a container.
static NAMES: LazyLock<Names> = LazyLock::new(|| {
    let tasks: Vec<Ipv4Addr> = (0..100).map(|i| Ipv4Addr::new(198, 19, 1, i)).collect();
    let mut b = Names::builder();
    b.service_vip("web", Ipv4Addr::new(198, 19, 0, 2), &tasks[..3]).unwrap();
    b.service_dnsrr("db", &tasks).unwrap();
    b.container("c1", Ipv4Addr::new(198, 19, 0, 20)).unwrap();
    b.build()
});

fn check(query: &[u8], verdict: Verdict, out: &[u8]) {
    match verdict {
        Verdict::Reply => {
            assert!(out.len() <= usize::from(MAX_UDP_PAYLOAD));
            let reply = Message::from_vec(out).expect("a reply parses");
            assert_eq!(reply.metadata.id.to_be_bytes(), query[..2]);
            assert_eq!(reply.metadata.message_type, MessageType::Response);
        }
        Verdict::Forward => assert!(out.is_empty()),
        Verdict::Drop(DropReason::Short) => assert!(query.len() < 12 && out.is_empty()),
        Verdict::Drop(DropReason::Response) => assert!(query[2] & 0x80 != 0 && out.is_empty()),
        Verdict::Drop(DropReason::Unencodable) => panic!("a parsed query must always encode"),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    let verdict = answer(data, &NAMES, data.len(), &mut out);
    check(data, verdict, &out);
    let verdict = servfail(data, &mut out);
    check(data, verdict, &out);
});
