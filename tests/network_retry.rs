//! A network that cannot be made on a node (here a veth squats on its bridge's name, so the TAP
//! cannot join it) is undone and retried: it does not hold up other networks, and it is
//! made as soon as the obstacle goes. Needs root (CI runs as root).

mod netns;

use std::time::Duration;

use netns::{Cluster, PING_WAIT, wait_for};

#[test]
fn a_network_that_cannot_be_made_is_retried_and_does_not_block_others() {
    let c = Cluster::new("retry", 1);
    let node = c.node(1);
    let (vni, bridge, tap) = ("4600", "ovbr-4600", "ovtap-4600");
    // A veth (this kernel may lack `dummy`) cannot be a master.
    c.exec_ok(
        &node.netns,
        &[
            "ip", "link", "add", bridge, "type", "veth", "peer", "name", "ovsquat",
        ],
    );

    let out = node.cli(&[
        "network",
        "create",
        "blocked",
        "--subnet",
        "198.19.60.0/24",
        "--vni",
        vni,
    ]);
    assert!(
        !out.status.success(),
        "network create succeeded although {bridge} is a dummy\n{}",
        netns::show(&out)
    );

    // Another network is made and used meanwhile.
    node.cli_ok(&["network", "create", "free", "--subnet", "198.19.61.0/24"]);
    let a = c.container(1, "a");
    c.attach(1, &a, "free", &[]);
    c.assert_ping(&a, "198.19.61.1", PING_WAIT);

    // Once the squatter goes, the blocked network is made: its TAP sits on its bridge.
    c.exec_ok(&node.netns, &["ip", "link", "del", bridge]);
    let b = c.container(1, "b");
    c.attach(1, &b, "blocked", &[]);
    c.assert_ping(&b, "198.19.60.1", PING_WAIT);
    wait_for(
        Duration::from_secs(10),
        &format!("{tap} on {bridge}"),
        || {
            let link = c.exec_ok(&node.netns, &["ip", "-j", "link", "show", tap]);
            if link.contains(&format!("\"master\":\"{bridge}\"")) {
                Ok(())
            } else {
                Err(link)
            }
        },
    );
}
