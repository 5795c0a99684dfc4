//! Egress on a 3-node cluster: a container on every node reaches a host outside the cluster (a
//! namespace on the underlay switch, no member) by ping and TCP, and the host sees the
//! container's node as the source. A container on an `--internal` network reaches nothing
//! outside, yet its own network and node as before. Neither network is reachable from the
//! other, nor from an underlay host that routes the subnet to a node, and no container reaches
//! a member's VTEP or peer port (it would speak as its node). The rules of a removed
//! network, and all of a stopped daemon's, are gone from `nft list table ip overlayd`; a daemon
//! killed and restarted has each rule once. Needs root (CI runs as root).
//!
//! The nodes start with IPv4 forwarding off and strict reverse-path filtering, the settings
//! of a host that never routed: the daemon turns forwarding on, and strict `rp_filter` passes
//! both directions.

mod netns;

use std::time::Duration;

use netns::{Cluster, PING_WAIT, node_addr, show, wait_for};

const OUTSIDE: &str = "198.18.0.200";
/// Port of the [`PEER_ECHO`] server on the outside host.
const ECHO_PORT: &str = "7100";
/// How long rules may take to follow a change of the networks.
const RULES_WAIT: Duration = Duration::from_secs(20);

/// Answers every TCP connection with the address it came from, and prints it (its log).
/// argv: PORT.
const PEER_ECHO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
while True:
    c, peer = s.accept()
    print(peer[0], flush=True)
    try:
        c.sendall((peer[0] + "\n").encode())
    except OSError:
        pass
    c.close()
"#;

/// Connects to IP PORT within TIMEOUT seconds and prints the line the server sends (the
/// server runs since before the networks exist). argv: IP PORT TIMEOUT.
const ASK_PEER: &str = "import socket, sys; \
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])); \
    print(c.makefile().readline().strip())";

/// Opens a TCP connection to IP PORT within TIMEOUT seconds. argv: IP PORT TIMEOUT.
const CONNECT: &str = "import socket, sys; \
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))";

/// Sends one UDP datagram to IP PORT. argv: IP PORT.
const UDP_SEND: &str = "import socket, sys; \
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x' * 16, (sys.argv[1], int(sys.argv[2])))";

/// `nft list table ip overlayd` on `netns`: `None` when the table does not exist.
fn overlayd_table(c: &Cluster, netns: &str) -> Option<String> {
    let out = c.exec(netns, &["nft", "list", "table", "ip", "overlayd"]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The packets counted by the rule of `table` commented `comment`.
fn counted(table: &str, comment: &str) -> u64 {
    let tail = format!("comment \"{comment}\"");
    table
        .lines()
        .find(|l| l.trim_end().ends_with(&tail))
        .and_then(|l| l.split("counter packets ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counted rule commented {comment}:\n{table}"))
}

/// The rules of `table` that name bridge `br`.
fn rules_of<'a>(table: &'a str, br: &str) -> Vec<&'a str> {
    let quoted = format!("\"{br}\"");
    table
        .lines()
        .map(str::trim)
        .filter(|l| l.contains(&quoted))
        .collect()
}

fn sysctl(c: &Cluster, netns: &str, key: &str) -> String {
    c.exec_ok(netns, &["sysctl", "-n", key]).trim().to_string()
}

#[test]
fn containers_reach_the_outside_through_their_node_and_internal_networks_do_not() {
    let c = Cluster::new("egress", 3);
    for node in &c.nodes {
        for setting in [
            "net.ipv4.ip_forward=0",
            "net.ipv4.conf.all.rp_filter=1",
            "net.ipv4.conf.default.rp_filter=1",
        ] {
            c.exec_ok(&node.netns, &["sysctl", "-q", "-w", setting]);
        }
    }
    let outside = c.host("out", OUTSIDE);
    let echo = c.spawn(&outside, &["python3", "-c", PEER_ECHO, ECHO_PORT]);

    let n1 = c.node(1);
    n1.cli_ok(&["network", "create", "pub", "--subnet", "198.19.60.0/24"]);
    let created = n1.cli_ok(&[
        "network",
        "create",
        "priv",
        "--subnet",
        "198.19.61.0/24",
        "--internal",
    ]);
    assert!(created.contains("internal"), "create said: {created}");
    let pub_br = format!("ovbr-{}", c.wait_network_everywhere("pub")["vni"]);
    let priv_entry = c.wait_network_everywhere("priv");
    let priv_br = format!("ovbr-{}", priv_entry["vni"]);
    assert_eq!(
        priv_entry["internal"], true,
        "network ls --json: {priv_entry}"
    );
    assert_eq!(n1.network("pub").unwrap().unwrap()["internal"], false);
    let listed = n1.cli_ok(&["network", "ls"]);
    assert!(
        listed
            .lines()
            .next()
            .is_some_and(|h| h.contains("INTERNAL"))
            && listed
                .lines()
                .any(|l| l.starts_with("priv ") && l.contains(" yes ")),
        "network ls:\n{listed}"
    );

    for node in &c.nodes {
        assert_eq!(
            sysctl(&c, &node.netns, "net.ipv4.ip_forward"),
            "1",
            "node {}: the daemon did not turn forwarding on",
            node.index
        );
        let table = overlayd_table(&c, &node.netns)
            .unwrap_or_else(|| panic!("node {}: no table ip overlayd", node.index));
        let (public, internal) = (rules_of(&table, &pub_br), rules_of(&table, &priv_br));
        assert!(
            public.len() == 3
                && public
                    .iter()
                    .any(|r| r.contains("masquerade to :61000-65535")),
            "node {}: rules of {pub_br}:\n{table}",
            node.index
        );
        assert!(
            internal.len() == 2 && !internal.iter().any(|r| r.contains("masquerade")),
            "node {}: rules of {priv_br}:\n{table}",
            node.index
        );
    }

    let mut public = Vec::new();
    let mut private = Vec::new();
    for i in 1..=3 {
        let p = c.container(i, &format!("p{i}"));
        public.push((c.attach(i, &p, "pub", &[]), p));
        let q = c.container(i, &format!("q{i}"));
        private.push((c.attach(i, &q, "priv", &[]), q));
    }

    for (i, (_, ns)) in public.iter().enumerate() {
        let node = i + 1;
        c.assert_ping(ns, OUTSIDE, PING_WAIT);
        let out = c.exec(ns, &["python3", "-c", ASK_PEER, OUTSIDE, ECHO_PORT, "5"]);
        assert!(
            out.status.success(),
            "node {node}: TCP to the outside failed\n{}",
            show(&out)
        );
        let seen = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(
            seen,
            node_addr(node),
            "node {node}: the outside host saw the container as {seen}, not as its node"
        );
    }
    let log = std::fs::read_to_string(&echo.log).unwrap_or_default();
    assert!(
        !log.contains("198.19."),
        "an overlay address reached the outside host:\n{log}"
    );

    for (i, (a, ns)) in private.iter().enumerate() {
        let node = i + 1;
        c.assert_no_ping(ns, OUTSIDE);
        let out = c.exec(ns, &["python3", "-c", ASK_PEER, OUTSIDE, ECHO_PORT, "3"]);
        assert!(
            !out.status.success(),
            "node {node}: an internal container reached the outside over TCP\n{}",
            show(&out)
        );
        // Its own network and its own node still answer.
        let other = &private[(i + 1) % private.len()].0;
        c.assert_ping(ns, &other.ip, PING_WAIT);
        c.assert_ping(ns, "198.19.61.1", PING_WAIT);
        c.assert_ping(ns, &node_addr(node), PING_WAIT);
        // Nor does either network reach the other through the node they share.
        let (p, pns) = &public[i];
        c.assert_no_ping(pns, &a.ip);
        c.assert_no_ping(ns, &p.ip);
    }

    // Masqueraded, a container would speak as its node, whom the other members trust: their
    // VTEP and peer ports are out of its reach (while the outside reaches the peer port).
    let p1 = &public[0].1;
    let out = c.exec(p1, &["python3", "-c", CONNECT, &node_addr(2), "7946", "3"]);
    assert!(
        !out.status.success(),
        "a container reached node 2's peer port\n{}",
        show(&out)
    );
    c.exec_ok(
        &outside,
        &["python3", "-c", CONNECT, &node_addr(2), "7946", "3"],
    );
    let before = counted(
        &overlayd_table(&c, &n1.netns).unwrap_or_default(),
        "cluster ports",
    );
    c.exec_ok(p1, &["python3", "-c", UDP_SEND, &node_addr(2), "4789"]);
    let after = counted(
        &overlayd_table(&c, &n1.netns).unwrap_or_default(),
        "cluster ports",
    );
    assert!(
        after > before,
        "a datagram to node 2's VTEP was not dropped on node 1 ({before} -> {after})"
    );

    // An underlay host that routes the public subnet to node 1 reaches none of its containers.
    c.exec_ok(
        &outside,
        &["ip", "route", "add", "198.19.60.0/24", "via", &node_addr(1)],
    );
    c.assert_no_ping(&outside, &public[0].0.ip);

    // `network rm`: the network's rules go from every node, the other network's stay.
    for (i, (_, ns)) in private.iter().enumerate() {
        c.node(i + 1).cli_ok(&["detach", ns, "--network", "priv"]);
    }
    n1.cli_ok(&["network", "rm", "priv"]);
    for node in &c.nodes {
        wait_for(
            RULES_WAIT,
            &format!("node {} to drop the rules of {priv_br}", node.index),
            || {
                let table = overlayd_table(&c, &node.netns).unwrap_or_default();
                match (
                    rules_of(&table, &priv_br).len(),
                    rules_of(&table, &pub_br).len(),
                ) {
                    (0, 3) => Ok(()),
                    _ => Err(table),
                }
            },
        );
    }

    // Killed, the daemon cannot clean up; restarted, it has each rule once, and egress works.
    let n3 = c.node(3);
    n3.restart_daemon();
    c.wait_all_ready(Duration::from_secs(30));
    wait_for(
        RULES_WAIT,
        "node 3 to put back the rules of pub, once",
        || {
            let table = overlayd_table(&c, &n3.netns).unwrap_or_default();
            let rules = rules_of(&table, &pub_br);
            if rules.len() == 3 && table.contains("masquerade") {
                Ok(())
            } else {
                Err(table)
            }
        },
    );
    c.assert_ping(&public[2].1, OUTSIDE, PING_WAIT);

    // Stopped for good, a daemon leaves no table behind; the others keep theirs.
    let status = c.node(2).interrupt_daemon(Duration::from_secs(20));
    assert!(status.success(), "node 2's daemon exited with {status}");
    let left = overlayd_table(&c, &c.node(2).netns);
    assert!(
        left.is_none(),
        "node 2 still has table ip overlayd after stopping:\n{}",
        left.unwrap_or_default()
    );
    assert!(
        !c.ping_once(&public[1].1, OUTSIDE),
        "a container reached the outside through a stopped node"
    );
    let kept = overlayd_table(&c, &n1.netns).unwrap_or_default();
    assert_eq!(rules_of(&kept, &pub_br).len(), 3, "node 1:\n{kept}");
}
