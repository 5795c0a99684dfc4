//! Malformed or unauthorised VXLAN is dropped and counted by reason, and the daemon keeps
//! forwarding. Needs root (CI runs as root).

mod netns;

use std::time::Duration;

use netns::{Cluster, PING_WAIT, VXLAN_SENDER};

const SENT: u64 = 5;

#[test]
fn malformed_and_stranger_vxlan_is_dropped_by_reason_and_forwarding_goes_on() {
    let c = Cluster::new("vxdrop", 2);
    let (net, vni) = ("wire", 4242u32);
    c.node(1).cli_ok(&[
        "network",
        "create",
        net,
        "--subnet",
        "198.19.2.0/24",
        "--vni",
        &vni.to_string(),
    ]);
    c.wait_network_everywhere(net);
    let c1 = c.container(1, "c1");
    let c2 = c.container(2, "c2");
    let a1 = c.attach(1, &c1, net, &[]);
    let a2 = c.attach(2, &c2, net, &[]);
    c.assert_ping(&c1, &a2.ip, PING_WAIT);

    let target = c.node(2);
    let stranger = c.host("x", "198.18.0.50");
    let unknown_vni = (vni + 1000).to_string();
    let vni = vni.to_string();
    // (drop reason, sending namespace, packet kind, VNI in the header)
    let cases = [
        ("short", &c.node(1).netns, "short", vni.as_str()),
        ("no-i-flag", &c.node(1).netns, "no-i-flag", vni.as_str()),
        (
            "unknown-vni",
            &c.node(1).netns,
            "unknown-vni",
            unknown_vni.as_str(),
        ),
        ("not-member", &stranger, "good", vni.as_str()),
    ];
    let mut failures = Vec::new();
    for (reason, from, kind, vni) in cases {
        let before = target.drops(reason);
        c.exec_ok(
            from,
            &[
                "python3",
                "-c",
                VXLAN_SENDER,
                &target.addr,
                kind,
                &SENT.to_string(),
                vni,
            ],
        );
        let counted = netns::wait_until(Duration::from_secs(10), || {
            target.drops(reason) >= before + SENT
        });
        if !counted {
            let status = target.json(&["status"]);
            failures.push(format!(
                "{SENT} `{kind}` packets from {from}: drops[\"{reason}\"] went {before} -> {}, want +{SENT}; dataplane: {}",
                target.drops(reason),
                status["dataplane"]
            ));
        }
        assert!(
            target.daemon_alive(),
            "node 2's daemon died after `{kind}` packets"
        );
    }

    // Still forwarding, both ways.
    c.assert_ping(&c1, &a2.ip, PING_WAIT);
    c.assert_ping(&c2, &a1.ip, PING_WAIT);
    assert!(
        failures.is_empty(),
        "drop counters:\n{}",
        failures.join("\n")
    );
}
