//! Rotation and eviction, with real daemons in network namespaces:
//! - `join-token --rotate`: the old token no longer joins (one line, exit 64, nothing made),
//!   the new one does, and members' containers ping each other throughout;
//! - `node rm` of a killed node: its tasks leave `service ps` and every VIP balancer, its
//!   containers' addresses go dark, and `run` on its old state dir is refused while the others
//!   still list it as removed; bad `node rm`s (unknown id, this node, a ready node) are refused;
//!   `node rm` rotates the join token, so the removed node cannot join again as a new node with
//!   the token it joined with;
//! - `node leave` of a node with a task of a 3-task service: repeated requests through the VIP
//!   from another node see no failure, and the task is gone from every node afterwards; nor
//!   do they when another task's node is stopped with SIGTERM, nor when the node that leaves
//!   is the Raft leader, after which a new leader hands out an address and a VIP;
//! - `node rm --force` of a running node: its task leaves every balancer at once, and the node
//!   runs on cut off: it says it was removed, its containers reach no member's, and members
//!   refuse its peer requests.
//!
//! Needs root (CI runs as root).

mod netns;

use std::collections::BTreeSet;
use std::fs;
use std::time::{Duration, Instant};

use netns::{Bg, CLI_TIMEOUT, Cluster, FORM_TIMEOUT, PING_WAIT, run, show, wait_until};
use serde_json::Value;

/// Exit status of a wrong request (EX_USAGE).
const EX_USAGE: i32 = 64;

/// A cluster of 3 nodes with network `app` on `subnet`, service `web` with a task `tN` on each
/// node and a client on node 1, every task healthy on every node: (cluster, VIP, client, the
/// tasks' address and server).
fn web_cluster(name: &str, subnet: &str) -> (Cluster, String, String, Vec<(String, Bg)>) {
    let c = Cluster::new(name, 3);
    c.node(1)
        .cli_ok(&["network", "create", "app", "--subnet", subnet]);
    c.wait_network_everywhere("app");
    let vip = c
        .node(1)
        .json(&["service", "create", "web", "--network", "app"])["vip"]
        .as_str()
        .expect("a VIP")
        .to_string();
    let tasks: Vec<(String, Bg)> = (1..=3)
        .map(|n| {
            let (_, attached, server) = c.httpd_task(n, &format!("t{n}"), "app", "web");
            (attached.ip, server)
        })
        .collect();
    let client = c.container(1, "client");
    c.attach(1, &client, "app", &[]);
    assert!(
        wait_until(PING_WAIT, || (1..=3).all(|n| healthy(&c, n) == (3, 3))),
        "3 healthy tasks on every node"
    );
    // Every balancer takes the view at its node's next reconcile round (250 ms).
    std::thread::sleep(Duration::from_millis(600));
    (c, vip, client, tasks)
}

/// `service ls` of `web` on node `i`: (healthy, total) tasks.
fn healthy(c: &Cluster, i: usize) -> (u64, u64) {
    let ls = c.node(i).json(&["service", "ls"]);
    (
        ls[0]["tasks_healthy"].as_u64().unwrap_or(0),
        ls[0]["tasks_total"].as_u64().unwrap_or(0),
    )
}

/// The nodes of `web`'s tasks as `service ps` on node `i` lists them.
fn task_nodes(c: &Cluster, i: usize) -> Vec<String> {
    c.node(i)
        .json(&["service", "ps", "web"])
        .as_array()
        .expect("service ps is a list")
        .iter()
        .map(|t| t["node"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// `node ls --json` on node `i`, as (id, address, state).
fn nodes(c: &Cluster, i: usize) -> Vec<(String, String, String)> {
    let field = |n: &Value, k: &str| n[k].as_str().unwrap_or_default().to_string();
    c.node(i)
        .json(&["node", "ls"])
        .as_array()
        .expect("node ls is a list")
        .iter()
        .map(|n| (field(n, "id"), field(n, "address"), field(n, "state")))
        .collect()
}

/// Node `of`'s id, as node `i` lists it.
fn id_of(c: &Cluster, i: usize, of: usize) -> String {
    nodes(c, i)
        .into_iter()
        .find(|(_, addr, _)| *addr == c.node(of).addr)
        .map(|(id, _, _)| id)
        .unwrap_or_else(|| panic!("node {i} does not list node {of}"))
}

/// The state node `i` lists node `id` in.
fn state_of(c: &Cluster, i: usize, id: &str) -> Option<String> {
    nodes(c, i)
        .into_iter()
        .find(|(n, _, _)| n == id)
        .map(|(_, _, state)| state)
}

/// Waits until node `id`'s task is gone from `service ps` and `service ls` on the nodes `on`,
/// and asserts that they list the node in `state`.
fn gone_from(c: &Cluster, on: [usize; 2], id: &str, state: &str) {
    for i in on {
        assert!(
            wait_until(PING_WAIT, || !task_nodes(c, i).iter().any(|n| n == id)
                && healthy(c, i) == (2, 2)),
            "node {id}'s task is gone from node {i}'s service ps: {:?}",
            task_nodes(c, i)
        );
        assert_eq!(state_of(c, i, id).as_deref(), Some(state), "node {i}");
    }
}

/// The names answering `n` requests from `client` to `http://vip/`; each must succeed.
fn answers(c: &Cluster, client: &str, vip: &str, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|i| {
            let out = c.exec(
                client,
                &["curl", "-sS", "--max-time", "3", &format!("http://{vip}/")],
            );
            assert!(
                out.status.success(),
                "request {i} to {vip} failed: {}",
                show(&out)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
        .collect()
}

/// Asserts that `out` failed with exit 64 and one line on stderr containing `says`.
fn refused(out: &std::process::Output, says: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EX_USAGE), "{}", show(out));
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(says), "{says:?} not in: {err}");
}

#[test]
fn a_rotated_token_lets_new_nodes_join_refuses_the_old_one_and_disturbs_no_member() {
    let c = Cluster::bare("rotate", 4);
    let first = c.node(1);
    first.start_daemon(first.daemon_args(&["init", "--advertise-addr", &first.addr]));
    let old = c.token();
    for i in 2..=3 {
        c.node(i).start_daemon(c.join_args(c.node(i), &old));
    }
    c.wait_ready(&[1, 2, 3], FORM_TIMEOUT);
    c.node(1)
        .cli_ok(&["network", "create", "app", "--subnet", "198.19.7.0/24"]);
    c.wait_network_everywhere("app");
    let (a, b) = (c.container(1, "a"), c.container(2, "b"));
    let a_ip = c.attach(1, &a, "app", &[]).ip;
    let b_ip = c.attach(2, &b, "app", &[]).ip;
    c.assert_ping(&a, &b_ip, PING_WAIT);
    // Pings a -> b all through the rotation and the joins, 5 a second.
    let mut pinger = c.spawn(&a, &["ping", "-c", "150", "-i", "0.2", "-W", "1", &b_ip]);

    let rotated = c.node(2).json(&["join-token", "--rotate"]);
    let new = rotated["token"].as_str().expect("a token").to_string();
    assert!(new.starts_with("OVL2-") && new != old, "{new} vs {old}");
    for i in 1..=3 {
        assert!(
            wait_until(PING_WAIT, || c.node(i).json(&["join-token"])["token"]
                == new.as_str()),
            "node {i} hands out the new token"
        );
    }
    let file = c.node(1).state_dir.join("join-token");
    assert!(
        wait_until(PING_WAIT, || fs::read_to_string(&file)
            .is_ok_and(|t| t.trim() == new)),
        "the state dir's join-token file follows the rotation"
    );

    // The old token: refused at once, one line, exit 64, no state dir made.
    let late = c.node(4);
    let out = run(
        &mut netns::overlayd_in(&late.netns, &c.join_args(late, &old)),
        CLI_TIMEOUT,
    );
    // The daemon logs to stderr too; its error is one line.
    let err = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(out.status.code(), Some(EX_USAGE), "{}", show(&out));
    assert!(
        errors.len() == 1 && errors[0].contains("refused the token"),
        "{err}"
    );
    assert!(!late.state_dir.join("node.json").exists(), "nothing made");

    // The new one joins, and the newcomer's containers reach the members'.
    late.start_daemon(c.join_args(late, &new));
    c.wait_ready(&[1, 2, 3, 4], FORM_TIMEOUT);
    let d = c.container(4, "d");
    let d_ip = c.attach(4, &d, "app", &[]).ip;
    c.assert_ping(&d, &a_ip, PING_WAIT);
    c.assert_ping(&b, &d_ip, PING_WAIT);
    // Members' peer requests still work: a change proposed on a follower is made everywhere.
    c.node(3)
        .cli_ok(&["network", "create", "more", "--subnet", "198.19.17.0/24"]);
    c.wait_network_everywhere("more");

    assert!(
        wait_until(Duration::from_secs(40), || !pinger.alive()),
        "the pinger ends"
    );
    let log = fs::read_to_string(&pinger.log).unwrap_or_default();
    let line = log
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {log}"));
    eprintln!("a -> b during rotation and joins: {line}");
    let count = |what: &str| -> u64 {
        line.split(',')
            .find(|part| part.contains(what))
            .and_then(|part| part.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let (sent, received) = (count("transmitted"), count("received"));
    assert_eq!(sent, 150, "{line}");
    // One late answer on a loaded machine is not a disturbance; a gap in the overlay is.
    assert!(
        received + 1 >= sent,
        "pings lost during the rotation: {line}"
    );
}

#[test]
fn a_removed_node_leaves_every_node_and_cannot_come_back() {
    let (c, vip, client, tasks) = web_cluster("evict", "198.19.8.0/24");
    let id3 = id_of(&c, 1, 3);
    let id1 = id_of(&c, 1, 1);
    let token = c.token();

    // Bad requests: refused with what to do instead, nothing changed.
    refused(&c.node(1).cli(&["node", "rm", "0123456789ab"]), "not found");
    refused(&c.node(1).cli(&["node", "rm", &id1]), "node leave");
    refused(&c.node(1).cli(&["node", "rm", &id3]), "--force");
    assert_eq!(healthy(&c, 1), (3, 3), "nothing changed");

    c.node(3).kill_daemon();
    assert!(
        wait_until(Duration::from_secs(20), || state_of(&c, 1, &id3).as_deref()
            == Some("down")),
        "node 1 sees node 3 down"
    );
    c.node(1).cli_ok(&["node", "rm", &id3]);
    gone_from(&c, [1, 2], &id3, "removed");
    std::thread::sleep(Duration::from_millis(600));
    let got = answers(&c, &client, &vip, 30);
    assert_eq!(
        got,
        BTreeSet::from(["t1".into(), "t2".into()]),
        "VIP answers"
    );
    // Before any attach: its address is free again, and the next container may get it.
    c.assert_no_ping(&client, &tasks[2].0);
    let from_2 = c.container(2, "client2");
    c.attach(2, &from_2, "app", &[]);
    c.assert_ping(&from_2, &tasks[0].0, PING_WAIT);
    assert_eq!(
        answers(&c, &from_2, &vip, 10).len(),
        2,
        "node 2's balancer has t1 and t2 only"
    );
    refused(&c.node(1).cli(&["node", "rm", &id3]), "already");

    // `run` on its old state dir: refused with a clear line, and it stays removed.
    c.node(3).start_daemon(c.node(3).daemon_args(&["run"]));
    assert!(
        wait_until(Duration::from_secs(20), || !c.node(3).daemon_alive()),
        "the removed node's `run` ends"
    );
    let log = c.node(3).log_text();
    assert!(log.contains("was removed from the cluster"), "{log}");
    for i in 1..=2 {
        assert_eq!(
            state_of(&c, i, &id3).as_deref(),
            Some("removed"),
            "node {i}"
        );
        assert_eq!(healthy(&c, i), (2, 2), "node {i}");
    }
    let departed: u64 = (1..=2)
        .map(|i| {
            c.node(i).json(&["status"])["peer_refused"]["departed"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(departed, 1, "the removed node's one Hello, refused");

    // Nor under a new identity with the token it joined with: `node rm` rotated it.
    let rotated = c.node(2).json(&["join-token"])["token"]
        .as_str()
        .expect("a token")
        .to_string();
    assert_ne!(rotated, token, "`node rm` rotates the join token");
    let node3 = c.node(3);
    fs::remove_dir_all(&node3.state_dir).expect("removing node 3's state dir");
    let _ = fs::remove_file(&node3.api);
    let out = run(
        &mut netns::overlayd_in(&node3.netns, &c.join_args(node3, &token)),
        CLI_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(EX_USAGE), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused the token"), "{err}");
    assert!(!node3.state_dir.join("node.json").exists(), "nothing made");
    assert_eq!(nodes(&c, 1).len(), 3, "no new member: {:?}", nodes(&c, 1));
}

/// Asks `argv[1]` over HTTP, a new connection each time, until the file `argv[2]` exists;
/// prints each failure (with its client port and who answered that port last), then the
/// answers by name and the failures.
const LOAD: &str = r#"
import os, socket, sys, collections, time
vip, stop = sys.argv[1], sys.argv[2]
seen, failed, ports = collections.Counter(), 0, {}
while not os.path.exists(stop):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((vip, 80))
        port = s.getsockname()[1]
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        name = data.split(b"\r\n\r\n", 1)[-1].decode().strip()
        seen[name] += 1
        ports[port] = name
    except OSError as e:
        failed += 1
        port = s.getsockname()[1]
        print("failed:", repr(e), "port", port, "before", ports.get(port), "at", time.time(), flush=True)
    finally:
        s.close()
print("answers", dict(seen), flush=True)
print("failed", failed, flush=True)
"#;

#[test]
fn a_leaving_nodes_task_leaves_every_balancer_before_it_goes() {
    let (c, vip, client, _tasks) = web_cluster("leave", "198.19.9.0/24");
    let id3 = id_of(&c, 1, 3);
    let log = under_load(&c, &client, &vip, "leave", || {
        let left = c.node(3).cli(&["node", "leave"]);
        assert!(left.status.success(), "node leave: {}", show(&left));
        assert!(
            wait_until(Duration::from_secs(10), || !c.node(3).daemon_alive()),
            "the leaving daemon stops"
        );
    });
    assert!(log.contains("'t3'"), "t3 answered before it left: {log}");

    gone_from(&c, [1, 2], &id3, "left");
    let got = answers(&c, &client, &vip, 20);
    assert_eq!(
        got,
        BTreeSet::from(["t1".into(), "t2".into()]),
        "VIP answers"
    );
    let log = c.node(3).log_text();
    assert!(
        log.contains("every member gives this node's tasks no new flows"),
        "{log}"
    );

    // SIGTERM drains too: node 2 stops under the same load, and no request fails.
    under_load(&c, &client, &vip, "sigterm", || {
        let status = c.node(2).stop_daemon(CLI_TIMEOUT);
        assert!(status.success(), "node 2 exited with {status}");
    });
    let log = c.node(2).log_text();
    assert!(
        log.contains("every member gives this node's tasks no new flows"),
        "{log}"
    );
}

#[test]
fn the_leader_leaving_hands_over_and_the_cluster_keeps_allocating() {
    let (c, vip, _client, _tasks) = web_cluster("lleave", "198.19.10.0/24");
    let address = wait_until(FORM_TIMEOUT, || c.leader(1).is_some())
        .then(|| c.leader(1))
        .flatten()
        .expect("a leader");
    let leader = (1..=3)
        .find(|&i| c.node(i).addr == address)
        .expect("the leader is a node");
    let (stay, other) = match leader {
        1 => (2, 3),
        2 => (1, 3),
        _ => (1, 2),
    };
    let id = id_of(&c, stay, leader);
    let client = c.container(stay, "stay");
    let client_ip = c.attach(stay, &client, "app", &[]).ip;
    std::thread::sleep(Duration::from_millis(600));
    let mut left = None;
    under_load(&c, &client, &vip, "leader-leave", || {
        let out = c.node(leader).cli(&["node", "leave"]);
        assert!(out.status.success(), "node leave: {}", show(&out));
        left = Some(Instant::now());
        assert!(
            wait_until(Duration::from_secs(10), || !c.node(leader).daemon_alive()),
            "the leaving daemon stops"
        );
    });
    let left = left.expect("node leave ran");
    assert!(
        wait_until(Duration::from_secs(20), || c
            .leader(stay)
            .is_some_and(|l| l != address)),
        "a new leader among the nodes that stay"
    );
    let elected = left.elapsed();
    gone_from(&c, [stay, other], &id, "left");
    // Changes still commit: an address for a new container, a VIP for a new service.
    let late = c.container(other, "late");
    let late_ip = c.attach(other, &late, "app", &[]).ip;
    let vip2 = c
        .node(stay)
        .json(&["service", "create", "web2", "--network", "app"])["vip"]
        .as_str()
        .expect("a VIP")
        .to_string();
    println!(
        "leader {leader} left: a new leader within {elected:.1?}, an address ({late_ip}) and a VIP ({vip2}) within {:.1?}",
        left.elapsed()
    );
    assert_ne!(vip2, vip);
    c.assert_ping(&late, &client_ip, PING_WAIT);
}

#[test]
fn a_running_node_removed_with_force_is_cut_off_and_its_task_leaves_every_balancer() {
    let (c, vip, client, tasks) = web_cluster("rmforce", "198.19.12.0/24");
    // A follower, so that the members' Raft is not the one disturbed.
    let victim = if c.leader(1).as_deref() == Some(c.node(3).addr.as_str()) {
        2
    } else {
        3
    };
    let stay = 5 - victim;
    let id = id_of(&c, 1, victim);
    let inside = c.container(victim, "inside");
    c.attach(victim, &inside, "app", &[]);
    c.assert_ping(&inside, &tasks[0].0, PING_WAIT);

    c.node(1).cli_ok(&["node", "rm", &id, "--force"]);
    gone_from(&c, [1, stay], &id, "removed");
    std::thread::sleep(Duration::from_millis(600));
    let expected: BTreeSet<String> = [1, stay].map(|n| format!("t{n}")).into();
    assert_eq!(answers(&c, &client, &vip, 30), expected, "VIP answers");

    // The removed node still runs, and is cut off: it learns it was removed, members refuse
    // its VXLAN and its peer requests.
    assert!(c.node(victim).daemon_alive(), "the removed daemon runs on");
    assert!(
        wait_until(PING_WAIT, || c
            .node(victim)
            .log_text()
            .contains("this node was removed from the cluster")),
        "the removed node says so"
    );
    c.assert_no_ping(&inside, &tasks[0].0);
    c.assert_no_ping(&client, &tasks[victim - 1].0);
    let out = c
        .node(victim)
        .cli(&["service", "create", "late", "--network", "app"]);
    assert!(
        !out.status.success(),
        "a removed node's change: {}",
        show(&out)
    );
    let departed: u64 = [1, stay]
        .iter()
        .map(|&i| {
            c.node(i).json(&["status"])["peer_refused"]["departed"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    println!("peer requests of the removed node refused: {departed}");
    assert!(departed >= 1, "members refuse the removed node's requests");
    assert!(
        c.node(1)
            .json(&["service", "ls"])
            .as_array()
            .is_some_and(|s| s.len() == 1),
        "its change was not made"
    );
}

/// Runs [`LOAD`] from `client` to `vip`, does `what` after 2 s, lets the load go on for 2 s
/// more, and asserts that no request failed; returns the load's output.
fn under_load(c: &Cluster, client: &str, vip: &str, name: &str, what: impl FnOnce()) -> String {
    let stop = c.dir.join(format!("stop-load-{name}"));
    let stop_arg = stop.to_string_lossy().into_owned();
    let mut load = c.spawn(client, &["python3", "-c", LOAD, vip, &stop_arg]);
    std::thread::sleep(Duration::from_secs(2));
    what();
    std::thread::sleep(Duration::from_secs(2));
    fs::write(&stop, "").expect("stop file");
    assert!(
        wait_until(Duration::from_secs(10), || !load.alive()),
        "the load ends"
    );
    let log = fs::read_to_string(&load.log).unwrap_or_default();
    eprintln!("requests through the VIP during {name}:\n{log}");
    assert!(
        log.contains("failed 0\n"),
        "requests failed during {name}: {log}"
    );
    log
}
