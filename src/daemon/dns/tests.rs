use super::*;

use crate::cluster::{Member, Placed, TaskRef};
use crate::model::{Endpoint, Node, NodeState, Service};

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, last)
}

fn network(id: &str, vni: u32) -> Network {
    Network {
        id: id.into(),
        name: format!("net-{id}"),
        subnet: "198.19.0.0/24".parse().unwrap(),
        vni,
        mtu: 1450,
        vteps: vec![],
        internal: false,
        encrypted: false,
        key_epoch: 0,
    }
}

fn member(id: &str, state: NodeState) -> Member {
    Member {
        node: Node {
            id: id.into(),
            address: "198.18.0.1".parse().unwrap(),
            vtep: None,
            state,
            is_self: false,
            raft: None,
        },
        gossip: "198.18.0.1:7946".parse().unwrap(),
        realised: Default::default(),
        drained: Default::default(),
        raft: None,
    }
}

fn service(name: &str, network_id: &str, vip: Option<u8>) -> (String, Service) {
    let service = Service {
        name: name.into(),
        network_id: network_id.into(),
        mode: if vip.is_some() {
            Mode::Vip
        } else {
            Mode::Dnsrr
        },
        vip: vip.map(ip),
        health: None,
        publish: Vec::new(),
    };
    (name.into(), service)
}

fn task(service: &str, network_id: &str, last: u8, node: &str) -> TaskRef {
    TaskRef {
        service: service.into(),
        network_id: network_id.into(),
        ip: ip(last),
        node: node.into(),
    }
}

fn placed(network_id: &str, last: u8, node: &str, netns: &str, aliases: &[&str]) -> Placed {
    Placed {
        node: node.into(),
        endpoint: Endpoint {
            network_id: network_id.into(),
            ip: ip(last),
            mac: Endpoint::mac_for(ip(last)),
            netns: netns.into(),
            host_if: "ovh1".into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
        },
    }
}

/// Network `n` with service `web` (vip .2) and `db` (dnsrr) and containers, beside network `o`.
/// Node `a` is ready, `b` is down.
fn view() -> View {
    View {
        members: vec![member("a", NodeState::Ready), member("b", NodeState::Down)],
        networks: [("net-n", network("n", 4096)), ("net-o", network("o", 4097))]
            .map(|(name, net)| (name.to_string(), net))
            .into(),
        services: [
            service("web", "n", Some(2)),
            service("db", "n", None),
            service("elsewhere", "o", Some(3)),
        ]
        .into(),
        tasks: vec![
            task("web", "n", 11, "a"),
            // On a down node, and not announced yet: neither is handed out.
            task("web", "n", 12, "b"),
            task("web", "n", 13, "a"),
            task("db", "n", 14, "a"),
            task("elsewhere", "o", 15, "a"),
        ],
        endpoints: vec![
            placed("n", 11, "a", "t1", &[]),
            placed("n", 12, "b", "t2", &[]),
            placed("n", 14, "a", "d1", &["cache"]),
            placed("n", 20, "b", "c1", &["x", "y"]),
            placed("o", 15, "a", "other", &[]),
        ],
        ..View::default()
    }
}

#[test]
fn a_networks_names_are_its_services_healthy_tasks_and_containers_with_aliases() {
    let view = view();
    let entries = Entries::of(&view, &view.networks["net-n"]);
    let s = |name: &str| name.to_string();
    assert_eq!(
        entries,
        Entries {
            vip: vec![(s("web"), ip(2), vec![ip(11)])],
            dnsrr: vec![(s("db"), vec![ip(14)])],
            containers: vec![
                (s("c1"), ip(20)),
                (s("cache"), ip(14)),
                (s("d1"), ip(14)),
                (s("t1"), ip(11)),
                (s("t2"), ip(12)),
                (s("x"), ip(20)),
                (s("y"), ip(20)),
            ],
        }
    );
}

#[test]
fn the_first_address_nameserver_is_the_resolver() {
    let text = "# comment\nsearch example.org\nnameserver fe80::1%eth0\nnameserver 198.18.0.53\nnameserver 198.18.0.54\n";
    assert_eq!(
        first_nameserver(text),
        Some("198.18.0.53:53".parse().unwrap())
    );
    assert_eq!(
        first_nameserver("nameserver ::1\n"),
        Some("[::1]:53".parse().unwrap())
    );
    assert_eq!(first_nameserver("search x\n"), None);
    assert_eq!(first_nameserver("nameserver\n"), None);
}

/// A standard query for `name`, type A, class IN, id 0x1234.
fn query(name: &str) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// (rcode, answer count) of a reply to [`query`].
fn rcode_and_answers(reply: &[u8]) -> (u8, u16) {
    assert_eq!(reply[..2], [0x12, 0x34], "the query's id");
    assert!(reply[2] & 0x80 != 0, "a response");
    (reply[3] & 0x0f, u16::from_be_bytes([reply[6], reply[7]]))
}

/// A server on loopback over names with `web` -> .2, forwarding to `resolver`, and a client
/// socket connected to it.
async fn server(resolver: Option<SocketAddr>) -> (Arc<Shared>, UdpSocket) {
    let shared = Dns::with(resolver, Duration::from_millis(300)).shared;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let mut b = Names::builder();
    b.service_vip("web", ip(2), &[ip(11)]).unwrap();
    // The receiver keeps the last snapshot after the sender is gone.
    let (_, names) = watch::channel(Arc::new(b.build()));
    tokio::spawn(serve(Arc::new(socket), names, resolver, shared.clone()));
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(addr).await.unwrap();
    (shared, client)
}

/// The reply to `bytes`, or None after a second.
async fn ask(client: &UdpSocket, bytes: &[u8]) -> Option<Vec<u8>> {
    client.send(bytes).await.unwrap();
    let mut buf = vec![0; 4096];
    let len = tokio::time::timeout(Duration::from_secs(1), client.recv(&mut buf))
        .await
        .ok()?
        .unwrap();
    buf.truncate(len);
    Some(buf)
}

fn count(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

#[tokio::test]
async fn cluster_names_are_answered_and_other_names_relayed_from_the_resolver() {
    // A resolver that answers every query with the query itself, QR set and one made-up byte.
    let resolver = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let resolver_addr = resolver.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0; 512];
        while let Ok((len, from)) = resolver.recv_from(&mut buf).await {
            let mut answer = buf[..len].to_vec();
            answer[2] |= 0x80;
            answer.push(0xaa);
            let _ = resolver.send_to(&answer, from).await;
        }
    });
    let (shared, client) = server(Some(resolver_addr)).await;

    let reply = ask(&client, &query("web")).await.expect("an answer");
    assert_eq!(rcode_and_answers(&reply), (0, 1));
    let reply = ask(&client, &query("nosuch")).await.expect("an answer");
    assert_eq!(rcode_and_answers(&reply), (3, 0), "NXDOMAIN");

    let outside = query("example.org");
    let relayed = ask(&client, &outside).await.expect("the resolver's answer");
    assert_eq!(
        relayed.last(),
        Some(&0xaa),
        "relayed as the resolver sent it"
    );
    assert_eq!(relayed.len(), outside.len() + 1);

    assert_eq!(ask(&client, &[0x12]).await, None, "too short to answer");
    let c = &shared.counters;
    assert_eq!(
        (
            count(&c.answered),
            count(&c.forwarded),
            count(&c.servfail),
            count(&c.short)
        ),
        (2, 1, 0, 1)
    );
}

#[tokio::test]
async fn without_a_resolver_or_its_answer_other_names_get_servfail() {
    let (shared, client) = server(None).await;
    let reply = ask(&client, &query("example.org"))
        .await
        .expect("an answer");
    assert_eq!(rcode_and_answers(&reply), (2, 0), "SERVFAIL");

    // A resolver that never answers: SERVFAIL once the forward times out.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (shared_silent, client) = server(Some(silent.local_addr().unwrap())).await;
    let reply = ask(&client, &query("example.org"))
        .await
        .expect("an answer");
    assert_eq!(rcode_and_answers(&reply), (2, 0), "SERVFAIL");
    for shared in [shared, shared_silent] {
        let c = &shared.counters;
        assert_eq!((count(&c.servfail), count(&c.forwarded)), (1, 0));
    }
}
