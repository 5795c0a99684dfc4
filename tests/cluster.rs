//! A 3-node overlayd cluster in network namespaces: networks replicate, containers on every node
//! reach each other (ping and TCP), detach frees addresses, dead nodes are noticed, concurrent
//! attaches never hand out one address twice. Needs root (CI runs as root).

mod netns;

use std::sync::Barrier;
use std::thread;
use std::time::Duration;

use netns::{Attachment, Cluster, PING_WAIT, TCP_BYTES, TCP_PORT};

#[test]
fn three_nodes_every_container_pair_pings_and_transfers_then_detach_frees_the_address() {
    let c = Cluster::new("pairs", 3);
    let (net, subnet) = ("app", "198.19.1.0/24");

    // Created on node 2, visible on every node with the contract's fields.
    c.node(2)
        .cli_ok(&["network", "create", net, "--subnet", subnet]);
    c.wait_network_everywhere(net);
    for node in &c.nodes {
        let n = node.network(net).unwrap().unwrap();
        assert_eq!(n["subnet"], subnet, "node {}: {n}", node.index);
        assert_eq!(
            n["gateway"], "198.19.1.1",
            "node {}: gateway is the first host: {n}",
            node.index
        );
        assert_eq!(
            n["mtu"], 1450,
            "node {}: MTU is the 1500 underlay minus VXLAN's 50: {n}",
            node.index
        );
        assert!(
            n["vni"].as_u64().is_some_and(|v| v > 0 && v < 1 << 24),
            "node {}: vni: {n}",
            node.index
        );
    }

    // Two containers per node, each attached on its own node.
    let mut ctrs: Vec<(usize, String, Attachment)> = Vec::new();
    for node in 1..=3 {
        for side in ["a", "b"] {
            let ns = c.container(node, &format!("c{node}{side}"));
            let a = c.attach(node, &ns, net, &[]);
            ctrs.push((node, ns, a));
        }
    }
    let mut ips: Vec<&str> = ctrs.iter().map(|(_, _, a)| a.ip.as_str()).collect();
    ips.sort();
    let want: Vec<String> = (2..=7).map(|h| format!("198.19.1.{h}")).collect();
    assert_eq!(
        ips, want,
        "IPAM hands out distinct addresses from .2 upwards"
    );
    for (node, ns, a) in &ctrs {
        let eth0 = c.eth0(ns);
        assert_eq!(
            eth0,
            Some((a.ip.clone(), 24, 1450)),
            "eth0 in {ns} (attached on node {node})"
        );
        assert_eq!(
            c.default_gateway(ns).as_deref(),
            Some("198.19.1.1"),
            "default route in {ns}"
        );
    }

    // Every ordered pair: across nodes and on the same node.
    for (_, from, _) in &ctrs {
        for (_, to, a) in &ctrs {
            if from != to {
                c.assert_ping(from, &a.ip, PING_WAIT);
            }
        }
    }
    let _sinks: Vec<_> = ctrs
        .iter()
        .map(|(_, ns, _)| c.tcp_server(ns, TCP_PORT))
        .collect();
    for (_, from, _) in &ctrs {
        for (_, to, a) in &ctrs {
            if from != to {
                c.assert_tcp(from, &a.ip, TCP_PORT, TCP_BYTES);
            }
        }
    }

    // Detach c2b: its eth0 goes, nobody reaches it any more.
    let (_, gone_ns, gone) = ctrs
        .iter()
        .find(|(_, ns, _)| ns.ends_with("-c2b"))
        .unwrap()
        .clone();
    c.node(2).cli_ok(&["detach", &gone_ns, "--network", net]);
    assert_eq!(c.eth0(&gone_ns), None, "detach removes eth0 from {gone_ns}");
    let c1a = &ctrs[0].1;
    let c2a = &ctrs[2].1;
    c.assert_no_ping(c1a, &gone.ip);
    c.assert_no_ping(c2a, &gone.ip);

    // The next attach gets the freed address, and it works.
    let fresh_ns = c.container(2, "c2c");
    let fresh = c.attach(2, &fresh_ns, net, &[]);
    assert_eq!(
        fresh.ip, gone.ip,
        "the next attach reuses the address detach freed"
    );
    if fresh.mac != gone.mac {
        // The peers' kernels still map the address to the old MAC (REACHABLE for up to ~45 s);
        // that is the kernel's ARP timer, not overlayd, so start from a clean neighbour table.
        c.exec_ok(c1a, &["ip", "neigh", "flush", "all"]);
    }
    c.assert_ping(c1a, &fresh.ip, PING_WAIT);
    let _fresh_sink = c.tcp_server(&fresh_ns, TCP_PORT);
    c.assert_tcp(c1a, &fresh.ip, TCP_PORT, TCP_BYTES);
}

#[test]
fn killed_daemon_is_shown_down_on_the_other_nodes() {
    let c = Cluster::new("down", 3);
    for node in &c.nodes {
        let v = node.json(&["node", "ls"]);
        let list = v
            .as_array()
            .unwrap_or_else(|| panic!("node ls is not an array: {v}"));
        assert_eq!(list.len(), 3, "node {} lists 3 nodes: {v}", node.index);
        assert!(
            list.iter().all(|n| n["state"] == "ready"),
            "node {}: all ready: {v}",
            node.index
        );
        let me: Vec<_> = list.iter().filter(|n| n["self"] == true).collect();
        assert!(
            me.len() == 1 && me[0]["address"] == node.addr.as_str(),
            "node {}: exactly one entry is self, with its own address: {v}",
            node.index
        );
        let mut ids: Vec<&str> = list.iter().filter_map(|n| n["id"].as_str()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 3, "node {}: three distinct ids: {v}", node.index);
    }

    c.node(3).kill_daemon();
    let dead = c.node(3).addr.clone();
    for i in [1, 2] {
        netns::wait_for(
            Duration::from_secs(30),
            &format!("node {i} to show node 3 down"),
            || {
                let m = c.node(i).members()?;
                let down = m.iter().any(|(a, s)| *a == dead && s == "down");
                let others_ready = m
                    .iter()
                    .filter(|(a, _)| *a != dead)
                    .all(|(_, s)| s == "ready");
                if down && others_ready {
                    Ok(())
                } else {
                    Err(format!("node ls: {m:?}"))
                }
            },
        );
    }
}

#[test]
fn simultaneous_attaches_on_two_nodes_get_distinct_addresses() {
    let c = Cluster::new("race", 2);
    let net = "race";
    c.node(1)
        .cli_ok(&["network", "create", net, "--subnet", "198.19.4.0/24"]);
    c.wait_network_everywhere(net);

    let mut got: Vec<(String, Attachment)> = Vec::new();
    for round in 0..6 {
        let ns = [
            c.container(1, &format!("r{round}a")),
            c.container(2, &format!("r{round}b")),
        ];
        let barrier = Barrier::new(2);
        let outs: Vec<_> = thread::scope(|s| {
            let handles: Vec<_> = [1, 2]
                .map(|node| {
                    let (c, ns, barrier) = (&c, &ns[node - 1], &barrier);
                    s.spawn(move || {
                        let mut cmd =
                            c.node(node)
                                .cli_command(&["attach", ns, "--network", net, "--json"]);
                        barrier.wait();
                        (node, ns.clone(), netns::run(&mut cmd, netns::CLI_TIMEOUT))
                    })
                })
                .into_iter()
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (node, ns, out) in outs {
            assert!(
                out.status.success(),
                "round {round}: attach on node {node} failed\n{}",
                netns::show(&out)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "round {round}: attach --json on node {node}: {e}\n{}",
                    netns::show(&out)
                )
            });
            got.push((ns, Attachment::from_json(&v).unwrap()));
        }
    }

    let mut ips: Vec<&str> = got.iter().map(|(_, a)| a.ip.as_str()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(
        ips.len(),
        got.len(),
        "every attach got its own address: {got:?}"
    );
    for (ns, a) in &got {
        assert!(
            a.ip.starts_with("198.19.4."),
            "address inside the subnet: {a:?}"
        );
        let eth0 = c.eth0(ns).map(|(ip, _, _)| ip);
        assert_eq!(
            eth0.as_deref(),
            Some(a.ip.as_str()),
            "eth0 in {ns} carries the reported address"
        );
    }
    // A duplicate would show up as ARP confusion; every container must answer the first one.
    let first = &got[0].0;
    for (_, a) in &got[1..] {
        c.assert_ping(first, &a.ip, PING_WAIT);
    }
}
