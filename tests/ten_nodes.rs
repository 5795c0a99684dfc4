//! Ten real nodes on this machine, each a network namespace with its own daemon, and a service
//! with one task on every node: a client on the first and on the last node reaches all ten
//! tasks through the VIP and through the service's name. Prints how long the cluster took to
//! form, `network create` and the service to be healthy everywhere. Only five of the ten vote in
//! Raft; the others copy the registry (a restarted one too), and a voter that leaves is replaced
//! by one of them.
//! Needs root (CI runs as root).

mod netns;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use netns::{Cluster, wait_until};

const NODES: usize = 10;
/// Requests per client before every task must have answered: the chance that 10 equally likely
/// tasks leave one out of 200 picks is 10 * 0.9^200, about 7e-9.
const REQUESTS: usize = 200;
const HEALTHY_WITHIN: Duration = Duration::from_secs(30);
/// The leader checks its voters every 250 ms; making a member a voter takes a commit or two.
const VOTER_REPLACED_WITHIN: Duration = Duration::from_secs(10);

/// (address, Raft part) of every member node `n` lists as ready.
fn parts(c: &Cluster, n: usize) -> Vec<(String, String)> {
    let ls = c.node(n).try_json(&["node", "ls"]).unwrap_or_default();
    ls.as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["state"] == "ready")
        .map(|m| {
            let part = m["raft"].as_str().unwrap_or("none");
            (
                m["address"].as_str().unwrap_or("").to_string(),
                part.to_string(),
            )
        })
        .collect()
}

/// How many of `parts` vote (the leader too), and how many copy the registry.
fn voting(parts: &[(String, String)]) -> (usize, usize) {
    let votes = parts
        .iter()
        .filter(|(_, p)| p == "leader" || p == "voter")
        .count();
    let copies = parts.iter().filter(|(_, p)| p == "learner").count();
    (votes, copies)
}

#[test]
fn ten_nodes_serve_one_service_with_a_task_on_every_node() {
    let started = Instant::now();
    let c = Cluster::new("ten", NODES);
    let formed = started.elapsed();

    let started = Instant::now();
    c.node(NODES)
        .cli_ok(&["network", "create", "app", "--subnet", "198.19.10.0/24"]);
    let created = started.elapsed();

    let service = c
        .node(1)
        .json(&["service", "create", "web", "--network", "app"]);
    let vip = service["vip"].as_str().expect("a VIP").to_string();
    let started = Instant::now();
    let tasks: Vec<_> = (1..=NODES)
        .map(|n| c.httpd_task(n, &format!("t{n}"), "app", "web"))
        .collect();
    for (ns, _, _) in &tasks {
        c.wait_listening(ns, false, 80);
    }
    assert!(
        wait_until(HEALTHY_WITHIN, || c.nodes.iter().all(|node| {
            node.try_json(&["service", "ls"])
                .is_ok_and(|v| v[0]["tasks_healthy"].as_u64() == Some(NODES as u64))
        })),
        "every node lists {NODES} healthy tasks of web"
    );
    let healthy = started.elapsed();
    println!(
        "{NODES} nodes: formed in {formed:.1?}, `network create` took {created:.1?}, \
         {NODES} tasks attached and healthy on every node in {healthy:.1?}"
    );
    // A balancer takes the view at its node's next reconcile round (every 250 ms).
    std::thread::sleep(Duration::from_millis(600));

    let want: BTreeSet<String> = (1..=NODES).map(|n| format!("t{n}")).collect();
    for node in [1, NODES] {
        let client = c.container(node, &format!("client{node}"));
        c.attach(node, &client, "app", &[]);
        for target in [vip.as_str(), "web"] {
            let mut seen = BTreeSet::new();
            for i in 0..REQUESTS {
                let out = c.exec(
                    &client,
                    &[
                        "curl",
                        "-sS",
                        "--max-time",
                        "3",
                        &format!("http://{target}/"),
                    ],
                );
                assert!(
                    out.status.success(),
                    "request {i} from node {node} to {target} failed: {}",
                    netns::show(&out)
                );
                seen.insert(String::from_utf8_lossy(&out.stdout).trim().to_string());
                if seen == want {
                    println!(
                        "node {node} -> {target}: all {NODES} tasks answered within {} requests",
                        i + 1
                    );
                    break;
                }
            }
            assert_eq!(
                seen, want,
                "tasks answering node {node}'s requests to {target}"
            );
        }
    }

    // Five vote, five copy the registry, as a member that is no voter sees it too.
    assert!(
        wait_until(VOTER_REPLACED_WITHIN, || voting(&parts(&c, NODES))
            == (5, 5)),
        "5 voters and 5 learners: {:?}",
        parts(&c, NODES)
    );

    // A learner restarted in place reads its copy back and follows the registry again.
    let learner = parts(&c, 1)
        .into_iter()
        .find(|(_, part)| part == "learner")
        .and_then(|(addr, _)| c.nodes.iter().find(|n| n.addr == addr))
        .expect("a learner");
    learner.restart_daemon();
    assert!(
        wait_until(VOTER_REPLACED_WITHIN, || parts(&c, learner.index).len()
            == NODES),
        "restarted learner {} lists every member ready",
        learner.addr
    );
    c.node(1)
        .cli_ok(&["network", "create", "late", "--subnet", "198.19.11.0/24"]);
    let late = c.container(learner.index, "late");
    c.attach(learner.index, &late, "late", &[]);

    let parts_before = parts(&c, 1);
    let (voter, _) = parts_before
        .iter()
        .find(|(_, part)| part == "voter")
        .expect("a voter that does not lead");
    let leaving = c.nodes.iter().find(|n| &n.addr == voter).expect("its node");
    let started = Instant::now();
    leaving.cli_ok(&["node", "leave"]);
    let stays = if leaving.index == 1 { NODES } else { 1 };
    assert!(
        wait_until(VOTER_REPLACED_WITHIN, || {
            let now = parts(&c, stays);
            now.len() == NODES - 1 && voting(&now) == (5, 4)
        }),
        "a learner takes the place of voter {voter}: {:?}",
        parts(&c, stays)
    );
    println!(
        "voter {voter} left; 5 voters again {:.1?} after `node leave` began",
        started.elapsed()
    );
}
