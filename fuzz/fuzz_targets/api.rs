//! Requests on the API socket: never panics, whatever a client sends. Each line is one request
//! as the daemon reads it; those that change the cluster are applied, in order, to a registry as
//! the daemon would propose them, and what the registry then holds survives a snapshot's round
//! trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlayd::api::Request;
use overlayd::registry::{Command, Registry};

/// The registry command the daemon proposes for `request` (as member `a`), if it proposes one.
fn command(request: Request, n: usize) -> Option<Command> {
    Some(match request {
        Request::NetworkCreate {
            name,
            subnet,
            vni,
            mtu,
            vteps,
            internal,
            encrypted,
        } => Command::CreateNetwork {
            id: format!("n{n}"),
            name,
            subnet,
            vni,
            mtu: mtu.unwrap_or(1450),
            vteps,
            internal,
            encrypted,
        },
        Request::NetworkRm { name } => Command::RemoveNetwork { name },
        Request::Attach {
            network,
            ip,
            service,
            ..
        } => Command::Allocate {
            network,
            node: "a".into(),
            ip,
            service,
        },
        Request::ServiceCreate {
            name,
            network,
            mode,
            health,
            publish,
        } => Command::CreateService {
            name,
            network,
            mode,
            health,
            publish,
        },
        Request::ServiceUpdate { name, add, remove } => {
            Command::UpdateService { name, add, remove }
        }
        Request::ServiceRm { name, force } => Command::RemoveService { name, force },
        _ => return None,
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut registry = Registry::default();
    for (n, line) in text.lines().take(16).enumerate() {
        let Ok(request) = serde_json::from_str::<Request>(line) else {
            continue;
        };
        if let Some(command) = command(request, n) {
            let _ = registry.apply(command);
        }
    }
    let snapshot = serde_json::to_string(&registry).expect("a registry serialises");
    let read: Registry = serde_json::from_str(&snapshot).expect("a snapshot reads back");
    assert_eq!(read, registry);
});
