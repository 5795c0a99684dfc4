//! The routing mesh's kernel hooks on a real node: a daemon killed with hooks in place leaves
//! them behind, and its restart removes exactly those (tc `pref`s in overlayd's range) from the
//! underlay, `lo` and the networks' bridges, keeping everyone else's filters. `status` reports
//! the mesh. Needs root (CI runs as root).
//!
//! Installing and removing hooks as services publish is tested in-process against the reconciler
//! (`daemon::mesh_hooks` tests), in a namespace of its own.

mod netns;

use std::time::Duration;

use netns::{Cluster, wait_for};

const SWEEP_WAIT: Duration = Duration::from_secs(20);

/// Leftovers in overlayd's range (0xC000..=0xCFFF) as a killed run leaves them, and one filter
/// that is someone else's (pref 100).
const FILTERS: [(&str, &str, &str); 4] = [
    ("eth0", "ingress", "49168"),
    ("lo", "egress", "49168"),
    ("ovbr-4321", "ingress", "49152"),
    ("eth0", "ingress", "100"),
];

#[test]
fn a_restarted_node_removes_the_hooks_a_killed_run_left_and_only_those() {
    let c = Cluster::new("meshhk", 1);
    let node = c.node(1);
    node.cli_ok(&[
        "network",
        "create",
        "mesh",
        "--subnet",
        "198.19.61.0/24",
        "--vni",
        "4321",
    ]);
    c.wait_network_everywhere("mesh");
    let mesh = &node.json(&["status"])["mesh"];
    assert_eq!(mesh["hooks"], 0, "{mesh}");
    assert_eq!(mesh["ports"], serde_json::json!([]), "{mesh}");

    node.kill_daemon();
    for (dev, dir, pref) in FILTERS {
        let _ = c.exec(&node.netns, &["tc", "qdisc", "add", "dev", dev, "clsact"]);
        c.exec_ok(
            &node.netns,
            &[
                "tc",
                "filter",
                "add",
                "dev",
                dev,
                dir,
                "pref",
                pref,
                "protocol",
                "ip",
                "u32",
                "match",
                "ip",
                "dst",
                "198.18.0.99/32",
                "classid",
                "1:1",
            ],
        );
    }
    node.restart_daemon();
    wait_for(
        SWEEP_WAIT,
        "the restarted node to sweep our leftovers",
        || {
            node.try_json(&["status"])?;
            let left: Vec<String> = FILTERS
                .iter()
                .filter(|(dev, dir, pref)| {
                    let out = c.exec(&node.netns, &["tc", "filter", "show", "dev", dev, dir]);
                    String::from_utf8_lossy(&out.stdout).contains(&format!("pref {pref} "))
                })
                .map(|(dev, dir, pref)| format!("{dev} {dir} pref {pref}"))
                .collect();
            if left == ["eth0 ingress pref 100"] {
                Ok(())
            } else {
                Err(format!("filters left: {left:?}"))
            }
        },
    );
}
