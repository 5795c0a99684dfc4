//! Service VIPs balanced by overlayd's own data plane: 3 nodes, a service with one task per
//! node, each task a real HTTP server (busybox httpd) answering its own name. Every
//! placement works: clients on each node (so client and task on different nodes and on the
//! same node) reach every task through the VIP, and a task reaching its own service's VIP
//! lands on every task, itself included. Needs root (CI runs as root).

mod netns;

use std::collections::BTreeSet;
use std::fs;

use netns::{Attachment, Bg, Cluster, PING_WAIT, wait_until};

/// Requests per client: with 3 tasks, missing one in 30 independent picks has odds of 3e-5.
const REQUESTS: usize = 30;

/// A task on `node` serving its own name on port 80.
fn task(c: &Cluster, node: usize, name: &str) -> (String, Attachment, Bg) {
    let ns = c.container(node, name);
    let attachment = c.attach(node, &ns, "app", &["--service", "web"]);
    let root = c.dir.join(format!("www-{name}"));
    fs::create_dir_all(&root).expect("web root");
    fs::write(root.join("index.html"), name).expect("index.html");
    let root = root.to_string_lossy().into_owned();
    let server = c.spawn(&ns, &["busybox", "httpd", "-f", "-p", "80", "-h", &root]);
    (ns, attachment, server)
}

/// The names answering `REQUESTS` requests from `client` to `http://vip/`; every one must
/// succeed.
fn answers(c: &Cluster, client: &str, vip: &str) -> BTreeSet<String> {
    (0..REQUESTS)
        .map(|i| {
            let out = c.exec(
                client,
                &["curl", "-sS", "--max-time", "3", &format!("http://{vip}/")],
            );
            if !out.status.success() {
                let dataplanes: Vec<String> = c
                    .nodes
                    .iter()
                    .map(|n| n.json(&["status"])["dataplane"].to_string())
                    .collect();
                panic!(
                    "request {i} from {client} to {vip} failed: {}\nnodes' data planes: {dataplanes:#?}",
                    netns::show(&out)
                );
            }
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
        .collect()
}

#[test]
fn a_vip_balances_over_every_task_from_every_node_and_from_a_task_itself() {
    let c = Cluster::new("vip", 3);
    c.node(1)
        .cli_ok(&["network", "create", "app", "--subnet", "198.19.5.0/24"]);
    c.wait_network_everywhere("app");
    let created = c
        .node(2)
        .json(&["service", "create", "web", "--network", "app"]);
    let vip = created["vip"]
        .as_str()
        .expect("the service has a VIP")
        .to_string();

    let tasks: Vec<_> = (1..=3).map(|n| task(&c, n, &format!("t{n}"))).collect();
    let names: BTreeSet<String> = (1..=3).map(|n| format!("t{n}")).collect();
    for (ns, a, _) in &tasks {
        assert_ne!(a.ip, vip, "a task got the VIP");
        // Each server is up before it is asked through the VIP.
        c.assert_ping(ns, &a.ip, PING_WAIT);
    }
    assert!(
        wait_until(PING_WAIT, || (1..=3).all(|n| {
            c.node(n)
                .json(&["service", "ls"])
                .as_array()
                .and_then(|s| s.first().cloned())
                .is_some_and(|s| s["tasks_healthy"] == 3)
        })),
        "every node lists 3 healthy tasks"
    );

    for node in 1..=3 {
        let client = c.container(node, &format!("client{node}"));
        c.attach(node, &client, "app", &[]);
        let t0 = std::time::Instant::now();
        let want = 3 + node as u64;
        let ok = wait_until(PING_WAIT, || {
            (1..=3).all(|n| {
                c.node(n)
                    .network("app")
                    .ok()
                    .flatten()
                    .is_some_and(|v| v["endpoints"].as_u64() == Some(want))
            })
        });
        eprintln!("endpoints everywhere after {:?}: {ok}", t0.elapsed());
        let got = answers(&c, &client, &vip);
        assert_eq!(got, names, "client on node {node} reached only {got:?}");
    }

    // A task that asks its own service lands on every task, itself too.
    let (own, _, _) = &tasks[0];
    let got = answers(&c, own, &vip);
    assert_eq!(
        got, names,
        "task t1 reached only {got:?} through its own VIP"
    );

    let status = c.node(1).json(&["status"]);
    assert!(
        status["dataplane"]["balancer"]["flows"].as_u64() > Some(0),
        "node 1 balanced no flow: {status}"
    );
}
