//! Each case sends a query built by hickory and reads the reply back with hickory.
use super::*;

use hickory_proto::op::Message;

const ID: u16 = 0xbeef;
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
const TASKS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 19, 0, 11),
    Ipv4Addr::new(198, 19, 0, 12),
    Ipv4Addr::new(198, 19, 0, 13),
];
const CONTAINER: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);

/// `web` in VIP mode, `db` in dnsrr mode, container `c1` with alias `cache`.
fn names() -> Names {
    let mut b = Names::builder();
    b.service_vip("web", VIP, &TASKS).unwrap();
    b.service_dnsrr("db", &TASKS).unwrap();
    b.container("c1", CONTAINER).unwrap();
    b.container("cache", CONTAINER).unwrap();
    b.build()
}

/// `name` as it reads back from the wire: absolute, with or without the trailing dot.
fn fqdn(name: &str) -> Name {
    let mut name = Name::from_ascii(name).unwrap();
    name.set_fqdn(true);
    name
}

fn message(name: &str, rtype: RecordType) -> Message {
    let mut m = Message::new(ID, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(fqdn(name), rtype));
    m
}

fn query(name: &str, rtype: RecordType) -> Vec<u8> {
    message(name, rtype).to_vec().unwrap()
}

/// The reply to `bytes`, parsed; fails the test if there is none or it does not parse.
fn reply_to(bytes: &[u8], names: &Names, rotation: usize) -> Message {
    let mut out = Vec::new();
    assert_eq!(answer(bytes, names, rotation, &mut out), Verdict::Reply);
    let reply = Message::from_vec(&out).unwrap();
    assert_eq!(reply.metadata.id, ID);
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    reply
}

fn ask(name: &str, rtype: RecordType) -> Message {
    reply_to(&query(name, rtype), &names(), 0)
}

fn addrs(reply: &Message) -> Vec<Ipv4Addr> {
    reply
        .answers
        .iter()
        .map(|r| match r.data {
            RData::A(A(a)) => a,
            ref other => panic!("not an A record: {other:?}"),
        })
        .collect()
}

/// NOERROR with no answer (NODATA): the name exists, the record does not.
fn assert_nodata(reply: &Message, case: &str) {
    assert_eq!(
        reply.metadata.response_code,
        ResponseCode::NoError,
        "{case}"
    );
    assert!(reply.answers.is_empty(), "{case}");
}

/// A header with the given flags byte (QR, opcode, AA, TC, RD) and counts, then `rest`.
fn raw(flags: u8, counts: [u16; 4], rest: &[u8]) -> Vec<u8> {
    let mut b = ID.to_be_bytes().to_vec();
    b.extend([flags, 0]);
    for c in counts {
        b.extend(c.to_be_bytes());
    }
    b.extend(rest);
    b
}

/// `web`, type A, class IN.
const QUESTION: [u8; 9] = [3, b'w', b'e', b'b', 0, 0, 1, 0, 1];

#[test]
fn vip_service_name_resolves_to_its_vip_authoritatively() {
    let reply = ask("web", RecordType::A);
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert!(reply.metadata.authoritative);
    assert!(reply.metadata.recursion_desired);
    assert_eq!(addrs(&reply), [VIP]);
    assert!(reply.answers.iter().all(|r| r.ttl == TTL));
    assert_eq!(reply.queries, message("web", RecordType::A).queries);
}

#[test]
fn dnsrr_service_name_resolves_to_every_healthy_task() {
    let reply = ask("db", RecordType::A);
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&reply), TASKS);
}

#[test]
fn tasks_name_resolves_to_every_healthy_task_in_both_modes() {
    for service in ["tasks.web", "tasks.db"] {
        assert_eq!(addrs(&ask(service, RecordType::A)), TASKS, "{service}");
    }
}

#[test]
fn rotation_starts_the_list_at_another_task_and_keeps_every_task() {
    let q = query("tasks.web", RecordType::A);
    let firsts: Vec<Ipv4Addr> = (0..3)
        .map(|rotation| {
            let got = addrs(&reply_to(&q, &names(), rotation));
            let mut sorted = got.clone();
            sorted.sort();
            assert_eq!(sorted, TASKS, "rotation {rotation}");
            got[0]
        })
        .collect();
    assert_eq!(firsts, TASKS);
    assert_eq!(
        addrs(&reply_to(&q, &names(), usize::MAX)),
        addrs(&reply_to(&q, &names(), 0))
    );
}

#[test]
fn service_without_healthy_tasks_is_nodata_not_nxdomain() {
    let mut b = Names::builder();
    b.service_dnsrr("idle", &[]).unwrap();
    let names = b.build();
    for name in ["idle", "tasks.idle"] {
        assert_nodata(&reply_to(&query(name, RecordType::A), &names, 7), name);
    }
}

#[test]
fn container_resolves_by_netns_name_and_by_alias() {
    assert_eq!(addrs(&ask("c1", RecordType::A)), [CONTAINER]);
    assert_eq!(addrs(&ask("cache", RecordType::A)), [CONTAINER]);
}

#[test]
fn alias_shared_by_two_containers_resolves_to_both() {
    let other = Ipv4Addr::new(198, 19, 0, 21);
    let mut b = Names::builder();
    b.container("cache", other).unwrap();
    b.container("cache", CONTAINER).unwrap();
    b.container("cache", CONTAINER).unwrap();
    let got = addrs(&reply_to(&query("cache", RecordType::A), &b.build(), 0));
    assert_eq!(got, [CONTAINER, other]);
}

#[test]
fn unknown_cluster_shaped_names_get_nxdomain() {
    for name in ["nope", "tasks.nope", "TASKS.nope", "tasks", "tasks.c1"] {
        let reply = ask(name, RecordType::A);
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::NXDomain,
            "{name}"
        );
        assert!(reply.metadata.authoritative, "{name}");
        assert!(
            reply.answers.is_empty() && reply.authorities.is_empty(),
            "{name}"
        );
    }
}

#[test]
fn other_names_are_forwarded_and_nothing_is_written() {
    let names = names();
    for name in [
        "example.com",
        "web.example.com",
        "tasks.web.example",
        ".",
        "a.tasks",
    ] {
        let mut out = vec![1, 2, 3];
        let verdict = answer(&query(name, RecordType::A), &names, 0, &mut out);
        assert_eq!(verdict, Verdict::Forward, "{name}");
        assert!(out.is_empty(), "{name}");
    }
}

#[test]
fn known_name_without_that_record_type_is_nodata() {
    for rtype in [RecordType::AAAA, RecordType::MX, RecordType::TXT] {
        for name in ["web", "tasks.db", "c1"] {
            assert_nodata(&ask(name, rtype), &format!("{name} {rtype}"));
        }
    }
}

#[test]
fn any_query_gets_the_addresses() {
    assert_eq!(addrs(&ask("web", RecordType::ANY)), [VIP]);
}

#[test]
fn other_class_is_nodata() {
    let mut m = message("web", RecordType::A);
    m.queries[0].set_query_class(DNSClass::CH);
    assert_nodata(&reply_to(&m.to_vec().unwrap(), &names(), 0), "class CH");
}

#[test]
fn lookups_ignore_case_and_the_answer_keeps_the_question_spelling() {
    let mut b = Names::builder();
    b.service_vip("Web", VIP, &TASKS).unwrap();
    let names = b.build();
    for name in ["web", "WEB", "wEb", "Tasks.WEB"] {
        let reply = reply_to(&query(name, RecordType::A), &names, 0);
        assert!(!reply.answers.is_empty(), "{name}");
        for record in &reply.answers {
            assert!(record.name.eq_case(&fqdn(name)), "{name}");
        }
    }
}

#[test]
fn trailing_dot_is_optional_in_names_and_queries() {
    let mut b = Names::builder();
    b.container("dotted.", CONTAINER).unwrap();
    b.container("plain", CONTAINER).unwrap();
    let names = b.build();
    for name in ["dotted", "dotted.", "plain", "plain."] {
        assert_eq!(
            addrs(&reply_to(&query(name, RecordType::A), &names, 0)),
            [CONTAINER]
        );
    }
}

#[test]
fn a_dot_inside_a_label_is_not_a_label_boundary() {
    let mut b = Names::builder();
    b.service_vip("web", VIP, &TASKS).unwrap();
    let names = b.build();
    // One label "tasks.web" (the dot escaped), not the two labels of the registered name.
    let escaped = query(r"tasks\.web", RecordType::A);
    let reply = reply_to(&escaped, &names, 0);
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn builder_refuses_names_dns_cannot_spell_and_adds_nothing() {
    let long_label = "a".repeat(64);
    let long_name = [
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61),
    ]
    .join(".");
    assert_eq!(long_name.len(), 253);
    for bad in ["", ".", "a..b", ".a", &long_label] {
        let mut b = Names::builder();
        assert_eq!(
            b.container(bad, CONTAINER).err(),
            Some(Error::InvalidName(bad.into()))
        );
    }
    assert!(Names::builder().container(&long_name, CONTAINER).is_ok());
    // Fits alone, but `tasks.` makes it too long: neither name is added.
    let mut b = Names::builder();
    assert!(b.service_vip(&long_name, VIP, &TASKS).is_err());
    assert!(b.build().addresses.is_empty());
}

#[test]
fn malformed_queries_get_formerr_with_their_id() {
    let cases: [(&str, Vec<u8>); 8] = [
        ("no question", raw(0x01, [0, 0, 0, 0], &[])),
        (
            "two questions",
            raw(0x01, [2, 0, 0, 0], &[QUESTION, QUESTION].concat()),
        ),
        (
            "two questions counted, one sent",
            raw(0x01, [2, 0, 0, 0], &QUESTION),
        ),
        ("question missing", raw(0x01, [1, 0, 0, 0], &[])),
        (
            "label past the end",
            raw(0x01, [1, 0, 0, 0], &[9, b'w', b'e', b'b']),
        ),
        (
            "pointer loop",
            raw(0x01, [1, 0, 0, 0], &[0xc0, 12, 0, 1, 0, 1]),
        ),
        (
            "trailing bytes",
            raw(0x01, [1, 0, 0, 0], &[&QUESTION[..], &[0xff]].concat()),
        ),
        (
            "answer count with no record",
            raw(0x01, [1, 1, 0, 0], &QUESTION),
        ),
    ];
    for (case, bytes) in cases {
        let reply = reply_to(&bytes, &names(), 0);
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::FormErr,
            "{case}"
        );
        assert!(!reply.metadata.authoritative, "{case}");
        assert!(reply.queries.is_empty(), "{case}");
    }
}

#[test]
fn every_truncation_of_a_query_is_dropped_or_formerr() {
    let names = names();
    let mut edns_query = message("web", RecordType::A);
    edns_query.set_edns(Edns::new());
    let full = edns_query.to_vec().unwrap();
    let mut out = Vec::new();
    for len in 0..full.len() {
        let verdict = answer(&full[..len], &names, 0, &mut out);
        if len < 12 {
            assert_eq!(verdict, Verdict::Drop(DropReason::Short), "{len} bytes");
        } else {
            assert_eq!(verdict, Verdict::Reply, "{len} bytes");
            let reply = Message::from_vec(&out).unwrap();
            assert_eq!(reply.metadata.id, ID);
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::FormErr,
                "{len} bytes"
            );
        }
    }
    assert_eq!(addrs(&reply_to(&full, &names, 0)), [VIP]);
}

#[test]
fn responses_are_dropped() {
    let mut response = message("web", RecordType::A);
    response.metadata.message_type = MessageType::Response;
    let mut out = Vec::new();
    let verdict = answer(&response.to_vec().unwrap(), &names(), 0, &mut out);
    assert_eq!(verdict, Verdict::Drop(DropReason::Response));
    assert!(out.is_empty());
}

#[test]
fn opcodes_other_than_query_get_notimp() {
    for op in [
        OpCode::Status,
        OpCode::Notify,
        OpCode::Update,
        OpCode::Unknown(15),
    ] {
        let mut m = message("web", RecordType::A);
        m.metadata.op_code = op;
        let reply = reply_to(&m.to_vec().unwrap(), &names(), 0);
        assert_eq!(reply.metadata.response_code, ResponseCode::NotImp, "{op:?}");
        assert_eq!(reply.metadata.op_code, op);
        assert!(reply.answers.is_empty(), "{op:?}");
    }
}

#[test]
fn edns_query_gets_an_opt_record_and_a_bad_version_gets_badvers() {
    let mut m = message("web", RecordType::A);
    m.set_edns(Edns::new());
    let reply = reply_to(&m.to_vec().unwrap(), &names(), 0);
    assert_eq!(
        reply.edns.as_ref().map(Edns::max_payload),
        Some(MAX_UDP_PAYLOAD)
    );
    assert_eq!(addrs(&reply), [VIP]);

    let mut edns = Edns::new();
    edns.set_version(1);
    m.set_edns(edns);
    let reply = reply_to(&m.to_vec().unwrap(), &names(), 0);
    // hickory reads code 16 back as BADSIG, which shares it with BADVERS (RFC 6891 §9).
    assert_eq!(u16::from(reply.metadata.response_code), 16);
    assert!(reply.answers.is_empty());
    assert_eq!(reply.edns.as_ref().map(Edns::version), Some(0));
}

#[test]
fn large_answers_are_cut_at_the_client_limit_with_tc() {
    let many: Vec<Ipv4Addr> = (0..200).map(|i| Ipv4Addr::new(198, 19, 1, i)).collect();
    let mut b = Names::builder();
    b.service_dnsrr("big", &many).unwrap();
    let names = b.build();
    let mut out = Vec::new();
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    for (offered, limit) in [(None, 512), (Some(1000), 1000), (Some(4096), 1232)] {
        let mut m = message("big", RecordType::A);
        if let Some(size) = offered {
            edns.set_max_payload(size);
            m.set_edns(edns.clone());
        }
        assert_eq!(
            answer(&m.to_vec().unwrap(), &names, 0, &mut out),
            Verdict::Reply
        );
        assert!(
            out.len() <= limit && out.len() > limit - 16,
            "{offered:?}: {} bytes",
            out.len()
        );
        let reply = Message::from_vec(&out).unwrap();
        assert!(reply.metadata.truncation, "{offered:?}");
        assert!(!reply.answers.is_empty(), "{offered:?}");
    }
    // A small answer is whole and not marked truncated.
    assert!(!ask("tasks.db", RecordType::A).metadata.truncation);
}

#[test]
fn servfail_echoes_the_question_and_refuses_what_answer_refuses() {
    let q = query("example.com", RecordType::A);
    let mut out = Vec::new();
    assert_eq!(servfail(&q, &mut out), Verdict::Reply);
    let reply = Message::from_vec(&out).unwrap();
    assert_eq!(reply.metadata.id, ID);
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(reply.queries, message("example.com", RecordType::A).queries);
    assert!(!reply.metadata.authoritative);

    assert_eq!(
        servfail(&q[..5], &mut out),
        Verdict::Drop(DropReason::Short)
    );
    assert_eq!(
        servfail(&raw(0x01, [0, 0, 0, 0], &[]), &mut out),
        Verdict::Reply
    );
    let reply = Message::from_vec(&out).unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
}
