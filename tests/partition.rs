//! A partition must not hand out anything twice. The leader (node 1, which made the cluster) is
//! cut off from the other two: the majority side elects a new leader and keeps attaching and
//! creating networks; the cut-off node refuses both up front with an error that says why. After
//! the link heals, every address and VNI is unique, every acknowledged change stands, and every
//! container reaches every other. Nothing is stale or doubled after the heal: every node counts
//! each container once, lists the same tasks for a service with a task on each node (all
//! healthy), and every container's DNS names each task once and each container by its name.
//! Needs root (CI runs as root).

mod netns;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use netns::{Cluster, PING_WAIT, wait_until};

/// How long the failure detector may take to call a cut-off node down, and back up.
const NOTICE_WITHIN: Duration = Duration::from_secs(20);

/// `network ls --json` on node `i`, as (name, vni, subnet), sorted.
fn networks(c: &Cluster, i: usize) -> Vec<(String, u64, String)> {
    let mut nets: Vec<(String, u64, String)> = c
        .node(i)
        .json(&["network", "ls"])
        .as_array()
        .expect("network ls is a list")
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or_default().to_string(),
                n["vni"].as_u64().unwrap_or_default(),
                n["subnet"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    nets.sort();
    nets
}

/// Whether node `i` lists node `j` in state `state`.
fn sees(c: &Cluster, i: usize, j: usize, state: &str) -> bool {
    let addr = &c.node(j).addr;
    c.node(i)
        .members()
        .is_ok_and(|m| m.iter().any(|(a, s)| a == addr && s == state))
}

#[test]
fn a_cut_off_leader_refuses_changes_and_nothing_is_handed_out_twice() {
    let c = Cluster::new("split", 3);
    c.node(1)
        .cli_ok(&["network", "create", "red", "--subnet", "198.19.1.0/24"]);
    c.wait_network_everywhere("red");
    c.node(1)
        .cli_ok(&["service", "create", "web", "--network", "red"]);
    let before: Vec<_> = (1..=3)
        .map(|i| {
            c.attach(
                i,
                &c.container(i, &format!("c{i}")),
                "red",
                &["--service", "web"],
            )
        })
        .collect();
    let ids: Vec<String> = (1..=3)
        .map(|i| {
            c.node(i).json(&["status"])["node"]["id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();

    // Cut node 1 (the Raft leader) off the switch.
    netns::ip(&["-n", &c.switch, "link", "set", "n1", "down"]);
    assert!(
        wait_until(NOTICE_WITHIN, || sees(&c, 2, 1, "down")
            && sees(&c, 3, 1, "down")),
        "nodes 2 and 3 did not see node 1 down"
    );

    // The cut-off node refuses, within a bounded time, and says why.
    let lone = c.container(1, "lone");
    let started = Instant::now();
    let refused = c.node(1).cli(&["attach", &lone, "--network", "red"]);
    assert!(
        !refused.status.success(),
        "attach on the cut-off node succeeded: {}",
        netns::show(&refused)
    );
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("majority") && why.contains("not made"),
        "the refusal does not say why: {why}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refusal took {:?}",
        started.elapsed()
    );
    let refused = c
        .node(1)
        .cli(&["network", "create", "blue", "--subnet", "198.19.2.0/24"]);
    assert!(
        !refused.status.success(),
        "network create on the cut-off node succeeded: {}",
        netns::show(&refused)
    );

    // The majority elects a leader of its own and goes on.
    let mut during = Vec::new();
    for (i, name) in [(2, "m2"), (3, "m3")] {
        during.push(c.attach(i, &c.container(i, name), "red", &[]));
    }
    c.node(3)
        .cli_ok(&["network", "create", "blue", "--subnet", "198.19.2.0/24"]);
    c.node(2)
        .cli_ok(&["network", "create", "green", "--subnet", "198.19.3.0/24"]);

    // Heal: node 1 comes back, takes the majority's decisions, and may attach again.
    netns::ip(&["-n", &c.switch, "link", "set", "n1", "up"]);
    assert!(
        wait_until(NOTICE_WITHIN, || (1..=3)
            .all(|i| (1..=3).all(|j| sees(&c, i, j, "ready")))),
        "the cluster did not heal"
    );
    let expected = networks(&c, 2);
    assert_eq!(
        expected.iter().map(|n| n.0.as_str()).collect::<Vec<_>>(),
        ["blue", "green", "red"],
        "acknowledged creates stand"
    );
    assert!(
        wait_until(NOTICE_WITHIN, || (1..=3)
            .all(|i| networks(&c, i) == expected)),
        "nodes disagree on networks: {:?}",
        (1..=3).map(|i| networks(&c, i)).collect::<Vec<_>>()
    );
    let vnis: BTreeSet<u64> = expected.iter().map(|n| n.1).collect();
    assert_eq!(vnis.len(), expected.len(), "VNIs are unique: {expected:?}");
    let after = c.attach(1, &lone, "red", &[]);

    let all: Vec<_> = before.iter().chain(&during).chain([&after]).collect();
    let unique: BTreeSet<&str> = all.iter().map(|a| a.ip.as_str()).collect();
    assert_eq!(unique.len(), all.len(), "addresses are unique: {all:?}");
    for a in &all {
        assert!(
            ids.contains(&a.node),
            "attachment on an unknown node: {a:?}"
        );
    }
    for from in &all {
        for to in &all {
            if from.netns != to.netns {
                c.assert_ping(&from.netns, &to.ip, PING_WAIT);
            }
        }
    }

    // Nothing stale or doubled: each node counts every container once, and lists the same
    // healthy tasks, each once.
    let mut want_tasks: Vec<(String, String)> = before
        .iter()
        .map(|a| (a.ip.clone(), a.node.clone()))
        .collect();
    want_tasks.sort();
    for i in 1..=3 {
        let red = c.node(i).network("red").ok().flatten();
        assert_eq!(
            red.as_ref().and_then(|n| n["endpoints"].as_u64()),
            Some(all.len() as u64),
            "node {i} counts {red:?} endpoints on red, not {}",
            all.len()
        );
        assert!(
            wait_until(NOTICE_WITHIN, || tasks(&c, i) == want_tasks),
            "node {i} lists web's tasks as {:?}, want {want_tasks:?}",
            tasks(&c, i)
        );
    }
    // DNS: each container names web's tasks and every other container once.
    let task_ips: BTreeSet<String> = before.iter().map(|a| a.ip.clone()).collect();
    for from in &all {
        assert_eq!(
            getent(&c, &from.netns, "tasks.web"),
            task_ips,
            "tasks.web from {}",
            from.netns
        );
        for to in &all {
            assert_eq!(
                getent(&c, &from.netns, &to.netns),
                BTreeSet::from([to.ip.clone()]),
                "{} from {}",
                to.netns,
                from.netns
            );
        }
    }
}

/// Node `i`'s tasks of `web` as (address, node id), sorted; a task in any state but healthy
/// has its state in place of the node.
fn tasks(c: &Cluster, i: usize) -> Vec<(String, String)> {
    let Ok(ps) = c.node(i).try_json(&["service", "ps", "web"]) else {
        return Vec::new();
    };
    let mut tasks: Vec<(String, String)> = ps
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let field = |k: &str| t[k].as_str().unwrap_or_default().to_string();
            let node = match field("state").as_str() {
                "healthy" => field("node"),
                other => other.to_string(),
            };
            (field("ip"), node)
        })
        .collect();
    tasks.sort();
    tasks
}

/// The addresses `getent hosts NAME` prints in `netns` (its resolver is the network's DNS,
/// through the resolv.conf `attach` writes); empty when the name does not resolve.
fn getent(c: &Cluster, netns: &str, name: &str) -> BTreeSet<String> {
    let out = c.exec(netns, &["getent", "hosts", name]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}
