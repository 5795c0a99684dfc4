//! Interoperation with the Linux kernel's own VXLAN device: a plain Linux node (vxlan + bridge +
//! containers with static addresses) is a static `--vtep` of an overlayd network, and traffic
//! flows both ways. Needs root (CI runs as root).

mod netns;

use netns::{Cluster, PING_WAIT, TCP_BYTES, TCP_PORT};

/// The harness's kernel-node recipe works on its own (no overlayd involved): two kernel VXLAN
/// nodes on the switch carry ping and TCP between their containers. If this fails, the
/// interop test below fails for a reason that is not overlayd's.
#[test]
fn harness_two_kernel_vxlan_nodes_on_the_switch_carry_ping_and_tcp() {
    let c = Cluster::bare("kself", 0);
    let a = c.kernel_vxlan_node(
        "ka",
        "198.18.0.201",
        77,
        &["198.18.0.202"],
        &[("a1", "198.19.7.1/24")],
    );
    let b = c.kernel_vxlan_node(
        "kb",
        "198.18.0.202",
        77,
        &["198.18.0.201"],
        &[("b1", "198.19.7.2/24")],
    );
    c.assert_ping(&a[0], "198.19.7.2", PING_WAIT);
    c.assert_ping(&b[0], "198.19.7.1", PING_WAIT);
    let _sink = c.tcp_server(&b[0], TCP_PORT);
    c.assert_tcp(&a[0], "198.19.7.2", TCP_PORT, TCP_BYTES);
}

#[test]
fn kernel_vxlan_node_and_overlayd_containers_reach_each_other_both_ways() {
    let c = Cluster::new("kvx", 2);
    let (net, vni, kaddr) = ("mixed", 4300, "198.18.0.100");
    c.node(1).cli_ok(&[
        "network",
        "create",
        net,
        "--subnet",
        "198.19.3.0/24",
        "--vni",
        &vni.to_string(),
        "--vtep",
        kaddr,
    ]);
    let entry = c.wait_network_everywhere(net);
    assert_eq!(entry["vni"], vni, "network ls: {entry}");
    assert!(
        entry["vteps"].as_array().is_some_and(|v| v
            .iter()
            .any(|x| x.as_str().is_some_and(|s| s.starts_with(kaddr)))),
        "network ls lists the static VTEP {kaddr}: {entry}"
    );

    let vteps: Vec<String> = c.nodes.iter().map(|n| n.addr.clone()).collect();
    let vteps: Vec<&str> = vteps.iter().map(String::as_str).collect();
    let kernel = c.kernel_vxlan_node(
        "kn",
        kaddr,
        vni,
        &vteps,
        &[("k1", "198.19.3.200/24"), ("k2", "198.19.3.201/24")],
    );
    let kernel: Vec<(String, &str)> = kernel
        .into_iter()
        .zip(["198.19.3.200", "198.19.3.201"])
        .collect();

    let mut ours: Vec<(String, String)> = Vec::new();
    for node in [1, 2] {
        let ns = c.container(node, &format!("o{node}"));
        let a = c.attach(node, &ns, net, &[]);
        ours.push((ns, a.ip));
    }

    for (kns, kip) in &kernel {
        for (ons, oip) in &ours {
            c.assert_ping(kns, oip, PING_WAIT);
            c.assert_ping(ons, kip, PING_WAIT);
        }
    }
    let _sinks: Vec<_> = kernel
        .iter()
        .map(|(ns, _)| ns)
        .chain(ours.iter().map(|(ns, _)| ns))
        .map(|ns| c.tcp_server(ns, TCP_PORT))
        .collect();
    for (kns, kip) in &kernel {
        for (ons, oip) in &ours {
            c.assert_tcp(kns, oip, TCP_PORT, TCP_BYTES);
            c.assert_tcp(ons, kip, TCP_PORT, TCP_BYTES);
        }
    }
}
