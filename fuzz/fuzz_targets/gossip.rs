//! What a node reads from gossip: never panics, whatever a datagram or a member's key-values
//! hold.
//!
//! - A datagram goes through the signature check as it arrives (unsigned bytes are dropped as
//!   `bad_tag`), and signed with the cluster key, so that chitchat's decoder and the checks
//!   behind the tag are reached too: a signed datagram is accepted only as exactly one message.
//! - Key-values as a member announces them (endpoints, tasks' health, VTEP, realised networks)
//!   build the cluster view and the data plane's tables; an endpoint counts only if the
//!   registry gave its address to the member announcing it.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use overlayd::cluster::{MemberState, View};
use overlayd::gossip::{Dropped, STAMP_LEN, open};
use overlayd::registry::{Command, Registry};
use overlayd::token::{Key, Purpose, Secret};

const NOW_MS: u64 = 1_800_000_000_000;

static SECRET: LazyLock<Secret> = LazyLock::new(Secret::generate);
static KEY: LazyLock<Key> = LazyLock::new(|| SECRET.key(Purpose::Gossip));

/// Network `web` (198.19.0.0/24, id `w`) whose service `api` has a VIP, with 198.19.0.10 held
/// by member `a` as a task of `api`, and 198.19.0.11 by member `b`.
static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    let mut r = overlayd_fuzz::registry_with_web();
    let ok = |r: &mut Registry, c| r.apply(c).expect("the fixture applies");
    ok(
        &mut r,
        Command::CreateService {
            name: "api".into(),
            network: "web".into(),
            mode: overlayd::model::Mode::Vip,
            health: None,
            publish: vec![],
        },
    );
    for (node, last, service) in [("a", 10, Some("api")), ("b", 11, None)] {
        ok(
            &mut r,
            Command::Allocate {
                network: "web".into(),
                node: node.into(),
                ip: Some(Ipv4Addr::new(198, 19, 0, last)),
                service: service.map(str::to_string),
            },
        );
    }
    r
});

fn datagram(data: &[u8]) {
    assert_eq!(
        open(&KEY, data, NOW_MS).err(),
        Some(Dropped::BadTag),
        "unsigned bytes verify"
    );
    let mut signed = NOW_MS.to_be_bytes().to_vec();
    signed.extend_from_slice(data);
    let tag = KEY.mac(&[&signed]);
    signed.extend_from_slice(&tag);
    match open(&KEY, &signed, NOW_MS) {
        Ok(_) | Err(Dropped::Malformed) => {}
        Err(other) => panic!("a fresh signed datagram dropped as {other:?}"),
    }
    assert!(signed.len() > STAMP_LEN);
}

/// Lines `key=value` are member `a`'s keys; a line starting with `b:` is member `b`'s.
fn key_values(text: &str) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let (keys, line) = match line.strip_prefix("b:") {
            Some(rest) => (&mut b, rest),
            None => (&mut a, line),
        };
        keys.push(line.split_once('=').unwrap_or((line, "")));
    }
    let member = |id, last, keys| MemberState {
        id,
        generation: 1,
        gossip: format!("198.18.0.{last}:7946").parse().unwrap(),
        live: true,
        is_self: id == "a",
        keys,
    };
    let view = View::build([member("a", 1, a), member("b", 2, b)], &REGISTRY);
    for placed in &view.endpoints {
        assert_eq!(
            REGISTRY.container_node(&placed.endpoint.network_id, placed.endpoint.ip),
            Some(placed.node.as_str()),
            "an endpoint counted for a member that does not hold its address"
        );
    }
    for task in &view.tasks {
        view.task_state(task);
    }
    view.tables("a", 4789, &SECRET);
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
        datagram(rest);
    } else if let Ok(text) = std::str::from_utf8(rest) {
        key_values(text);
    }
});
