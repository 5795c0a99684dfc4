//! What a member reads from the peer port: never panics, whatever the other side sends.
//!
//! - The challenge: decoded as the client does (a nonce of any other length than 16 bytes is
//!   refused, by its type).
//! - A signed request or reply as it comes off the wire: refused unless its tag verifies, which
//!   random bytes never do.
//! - A body signed with the cluster key, so that the request decoder behind the tag is reached:
//!   a proposal is applied to a registry as the Raft state machine would, and what the registry
//!   then holds survives a snapshot's round trip (a follower reads it back the same).
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use overlayd::api::Failure;
use overlayd::consensus::Change;
use overlayd::peer::{Challenge, NONCE_LEN, Request, Signed, Step, nonce_of};
use overlayd::registry::{Command, Registry};
use overlayd::token::{Key, Purpose, Secret};

static KEY: LazyLock<Key> = LazyLock::new(|| Secret::generate().key(Purpose::Peer));
const NONCE: [u8; NONCE_LEN] = [7; NONCE_LEN];

/// Network `web` (198.19.0.0/24) and a container of member `a` on it.
static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    let mut r = overlayd_fuzz::registry_with_web();
    r.apply(Command::Allocate {
        network: "web".into(),
        node: "a".into(),
        ip: None,
        service: None,
    })
    .unwrap();
    r
});

fn signed_body(body: &str) {
    let signed = Signed::seal(&KEY, Step::Request, &NONCE, body.to_string());
    assert!(
        signed.open::<Request>(&KEY, Step::Reply, &NONCE).is_err(),
        "a request's tag verifies as a reply's"
    );
    let _ = signed.open::<Result<serde_json::Value, Failure>>(&KEY, Step::Request, &NONCE);
    if let Ok(Request::Propose {
        change: Change::Registry(proposal),
        ..
    }) = signed.open(&KEY, Step::Request, &NONCE)
    {
        let mut registry = REGISTRY.clone();
        let _ = registry.apply_once(proposal);
        let snapshot = serde_json::to_string(&registry).expect("a registry serialises");
        let read: Registry = serde_json::from_str(&snapshot).expect("a snapshot reads back");
        assert_eq!(read, registry);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(challenge) = serde_json::from_str::<Challenge>(text) {
                let _ = nonce_of(&challenge);
            }
        }
        1 => {
            if let Ok(signed) = serde_json::from_str::<Signed>(text) {
                assert!(signed.open::<Request>(&KEY, Step::Request, &NONCE).is_err());
            }
        }
        _ => signed_body(text),
    }
});
