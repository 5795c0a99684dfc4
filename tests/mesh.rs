//! The routing mesh: a service's published port answers on every node's address, for tasks
//! on any node, and the task sees the client's own address (Swarm loses it, moby#25526).
//! Each task runs a real server that answers with its name and the peer address it sees.
//! Clients: an outside host on the underlay, and each node itself (`curl localhost:PUB`).
//! Needs root (CI runs as root).

mod netns;

use std::collections::BTreeSet;

use netns::mesh::{ASK_UDP, all_tasks_saw, curl, mesh_cluster, parse};
use netns::node_addr;

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
