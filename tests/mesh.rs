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
