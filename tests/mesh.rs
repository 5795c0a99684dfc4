//! The routing mesh: a service's published port answers on every node's address, for tasks
//! on any node, and the task sees the client's own address (Swarm loses it, moby#25526).
//! Each task runs a real server that answers with its name and the peer address it sees.
//! Clients: an outside host on the underlay, and each node itself (`curl localhost:PUB`).
//! Needs root (CI runs as root).

mod netns;

use std::collections::BTreeSet;
use std::time::Duration;

use netns::{Bg, Cluster, PING_WAIT, node_addr, wait_until};

/// Connections per client and node: with 3 tasks, missing one in 30 picks has odds of 3e-5.
const REQUESTS: usize = 30;

/// A TCP server that answers every connection with "NAME PEER_IP" and closes.
const WHO_TCP: &str = r#"
import socket, sys
name = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80))
s.listen(64)
while True:
    c, peer = s.accept()
    try:
        c.recv(1024)
        c.sendall(("HTTP/1.0 200 OK\r\n\r\n%s %s\n" % (name, peer[0])).encode())
    finally:
        c.close()
"#;

/// A UDP server that answers every datagram with "NAME PEER_IP".
const WHO_UDP: &str = r#"
import socket, sys
name = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 80))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(("%s %s" % (name, peer[0])).encode(), peer)
"#;

/// Asks `argv[1]:argv[2]` over UDP `argv[3]` times, from a new socket each time, and prints
/// each answer on a line.
const ASK_UDP: &str = r#"
import socket, sys
for _ in range(int(sys.argv[3])):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(b"who", (sys.argv[1], int(sys.argv[2])))
    print(s.recvfrom(2048)[0].decode())
    s.close()
"#;

/// A 3-node cluster with network `app` and service `search` publishing 9200 -> 80 (TCP and
/// UDP), one task per node (`t1`..`t3`) answering its name and the peer it sees.
fn mesh_cluster(name: &str) -> (Cluster, Vec<Bg>) {
    let c = Cluster::new(name, 3);
    c.node(1)
        .cli_ok(&["network", "create", "app", "--subnet", "198.19.6.0/24"]);
    c.wait_network_everywhere("app");
    c.node(2).cli_ok(&[
        "service",
        "create",
        "search",
        "--network",
        "app",
        "--publish",
        "9200:80",
        "--publish",
        "9200:80/udp",
    ]);
    let mut servers = Vec::new();
    for n in 1..=3 {
        let task = format!("t{n}");
        let ns = c.container(n, &task);
        c.attach(n, &ns, "app", &["--service", "search"]);
        servers.push(c.spawn(&ns, &["python3", "-c", WHO_TCP, &task]));
        servers.push(c.spawn(&ns, &["python3", "-c", WHO_UDP, &task]));
    }
    assert!(
        wait_until(PING_WAIT, || (1..=3).all(|n| {
            c.node(n)
                .try_json(&["service", "ls"])
                .is_ok_and(|v| v[0]["tasks_healthy"].as_u64() == Some(3))
        })),
        "every node lists 3 healthy tasks"
    );
    // The balancers take the view at their node's next reconcile round: wait until each
    // node's own port has reached every task.
    for n in 1..=3 {
        let node = &c.node(n).netns;
        let mut seen = BTreeSet::new();
        let all = wait_until(Duration::from_secs(20), || {
            let out = c.exec(
                node,
                &["curl", "-sS", "--max-time", "2", "http://localhost:9200/"],
            );
            seen.insert(parse(&String::from_utf8_lossy(&out.stdout)).0);
            ["t1", "t2", "t3"].iter().all(|t| seen.contains(*t))
        });
        assert!(all, "node {n}'s port reached only {seen:?}");
    }
    (c, servers)
}

/// `(task, peer it saw)` of `REQUESTS` HTTP requests from `netns` to `url`; each must succeed.
fn curl(c: &Cluster, netns: &str, url: &str) -> BTreeSet<(String, String)> {
    (0..REQUESTS)
        .map(|i| {
            let out = c.exec(netns, &["curl", "-sS", "--max-time", "3", url]);
            assert!(
                out.status.success(),
                "request {i} from {netns} to {url} failed: {}\ndata planes: {:#?}",
                netns::show(&out),
                c.nodes
                    .iter()
                    .map(|n| n.json(&["status"])["dataplane"].to_string())
                    .collect::<Vec<_>>()
            );
            parse(&String::from_utf8_lossy(&out.stdout))
        })
        .collect()
}

fn parse(answer: &str) -> (String, String) {
    let mut words = answer.split_whitespace();
    let task = words.next().unwrap_or_default().to_string();
    let peer = words.next().unwrap_or_default().to_string();
    (task, peer)
}

fn all_tasks_saw(answers: &BTreeSet<(String, String)>, peer: &str) {
    let tasks: BTreeSet<&str> = answers.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(tasks, BTreeSet::from(["t1", "t2", "t3"]), "{answers:?}");
    assert!(
        answers.iter().all(|(_, p)| p == peer),
        "every task saw {peer}: {answers:?}"
    );
}

#[test]
fn an_outside_client_reaches_every_task_through_every_node_and_keeps_its_address() {
    let (c, _servers) = mesh_cluster("meshout");
    let client_addr = "198.18.0.200";
    let client = c.host("client", client_addr);
    for n in 1..=3 {
        let answers = curl(&c, &client, &format!("http://{}:9200/", node_addr(n)));
        all_tasks_saw(&answers, client_addr);
        println!("through node {n}: {answers:?}");
    }
    // UDP, from a new source port each time.
    for n in 1..=3 {
        let out = c.exec_ok(
            &client,
            &["python3", "-c", ASK_UDP, &node_addr(n), "9200", "30"],
        );
        let answers: BTreeSet<(String, String)> = out.lines().map(parse).collect();
        all_tasks_saw(&answers, client_addr);
    }
}

#[test]
fn each_node_reaches_every_task_through_its_own_localhost_and_address() {
    let (c, _servers) = mesh_cluster("meshlocal");
    for n in 1..=3 {
        let node = &c.node(n).netns;
        // A loopback client is given the node's address: a task could not answer 127.0.0.1.
        let answers = curl(&c, node, "http://localhost:9200/");
        all_tasks_saw(&answers, &node_addr(n));
        let answers = curl(&c, node, &format!("http://{}:9200/", node_addr(n)));
        all_tasks_saw(&answers, &node_addr(n));
    }
}

/// A container's own connection to the outside from a port that is a published target port
/// (here 80) is not taken for a reply of the mesh: it leaves through the node like any other.
#[test]
fn a_containers_own_connection_from_a_published_target_port_still_leaves_the_node() {
    let (c, _servers) = mesh_cluster("meshown");
    let outside = c.host("outside", "198.18.0.201");
    let _echo = c.spawn(&outside, &["python3", "-c", ECHO, "7000"]);
    let plain = c.container(1, "plain");
    c.attach(1, &plain, "app", &[]);
    let said = c.exec_ok(
        &plain,
        &["python3", "-c", FROM_PORT_80, "198.18.0.201", "7000"],
    );
    let port: u16 = said
        .trim()
        .strip_prefix("hello from ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the outside host's answer: {said:?}"));
    assert!(
        (61_000..=65_535).contains(&port),
        "masqueraded to an egress port, not {port}"
    );
}

/// Answers each connection on port `argv[1]` with its first bytes and the peer's port.
const ECHO: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8)
while True:
    c, peer = s.accept()
    c.sendall(c.recv(64) + b" from %d" % peer[1])
    c.close()
"#;

/// Connects from port 80 to `argv[1]:argv[2]` (retrying while the network settles), says
/// hello and prints the answer.
const FROM_PORT_80: &str = r#"
import socket, sys, time
for attempt in range(20):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 80)); s.settimeout(2)
    try:
        s.connect((sys.argv[1], int(sys.argv[2]))); s.sendall(b"hello")
        print(s.recv(64).decode()); break
    except OSError:
        s.close(); time.sleep(0.5)
"#;
