//! `network rm` on a 2-node cluster: once every container is detached, the network's bridge and
//! TAP disappear from every node, not only the one that ran the command, and the same name (and
//! subnet) can be created again and carries traffic. Needs root (CI runs as root).

mod netns;

use std::time::Duration;

use netns::{Cluster, PING_WAIT, wait_for};

const CONVERGE_WAIT: Duration = Duration::from_secs(20);

#[test]
fn network_rm_removes_bridge_and_tap_on_every_node_and_the_name_can_be_reused() {
    let c = Cluster::new("netrm", 2);
    let (net, subnet) = ("cycle", "198.19.40.0/24");
    let ctrs = [c.container(1, "a"), c.container(2, "b")];

    for round in 1..=2 {
        c.node(1)
            .cli_ok(&["network", "create", net, "--subnet", subnet]);
        let entry = c.wait_network_everywhere(net);
        let vni = entry["vni"].as_u64().expect("network ls has a vni");
        let devs = [format!("ovbr-{vni}"), format!("ovtap-{vni}")];

        // One container per node, the same namespaces in both rounds (containers outlive networks).
        let a = c.attach(1, &ctrs[0], net, &[]);
        let b = c.attach(2, &ctrs[1], net, &[]);
        c.assert_ping(&ctrs[0], &b.ip, PING_WAIT);
        c.assert_ping(&ctrs[1], &a.ip, PING_WAIT);

        c.node(1).cli_ok(&["detach", &ctrs[0], "--network", net]);
        c.node(2).cli_ok(&["detach", &ctrs[1], "--network", net]);
        // Removed at once from node 2, which did not create it: the leader counts node 1's
        // detach (it was told of the release) before gossip has carried it.
        c.node(2).cli_ok(&["network", "rm", net]);

        for node in &c.nodes {
            wait_for(
                CONVERGE_WAIT,
                &format!(
                    "round {round}: node {} to forget {net} and its links",
                    node.index
                ),
                || {
                    if node.network(net)?.is_some() {
                        return Err(format!("network ls still lists {net}"));
                    }
                    let left: Vec<&String> =
                        devs.iter().filter(|d| c.has_link(&node.netns, d)).collect();
                    if left.is_empty() {
                        Ok(())
                    } else {
                        Err(format!("still has {left:?}"))
                    }
                },
            );
        }
        for ns in &ctrs {
            assert!(
                !c.links(ns).iter().any(|l| l.starts_with("eth")),
                "round {round}: {ns} keeps an interface after detach: {:?}",
                c.links(ns)
            );
        }
    }
}
