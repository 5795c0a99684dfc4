//! A node's daemon crashes and is restarted in place with `overlayd run`: it rejoins as the same
//! member, its containers keep their addresses and reach the other node again, and the address
//! pool still knows those addresses are taken. Needs root (CI runs as root).

mod netns;

use std::time::Duration;

use netns::{Cluster, wait_for};

const PING_WAIT: Duration = Duration::from_secs(15);

#[test]
fn a_crashed_node_restarted_with_run_keeps_its_id_containers_and_addresses() {
    let c = Cluster::new("restart", 2);
    c.node(1)
        .cli_ok(&["network", "create", "web", "--subnet", "198.19.7.0/24"]);
    c.wait_network_everywhere("web");
    let c1 = c.container(1, "c1");
    let c2 = c.container(2, "c2");
    let a1 = c.attach(1, &c1, "web", &[]);
    let a2 = c.attach(2, &c2, "web", &[]);
    c.assert_ping(&c1, &a2.ip, PING_WAIT);
    let ids_before = c.node(1).members().unwrap();

    // A crash: SIGKILL, no clean-up; then the same state dir, restarted.
    let node2 = c.node(2);
    node2.kill_daemon();
    assert!(
        !c.ping_once(&c1, &a2.ip),
        "c2 answered while its node was down"
    );
    node2.restart_daemon();

    // The same member id, ready, listed once (the old gossip generation does not count).
    wait_for(PING_WAIT, "node 2 ready again under its old id", || {
        let members = c.node(1).members()?;
        if members == ids_before {
            Ok(())
        } else {
            Err(format!("members {members:?}, before {ids_before:?}"))
        }
    });
    c.assert_ping(&c1, &a2.ip, PING_WAIT);
    c.assert_ping(&c2, &a1.ip, PING_WAIT);
    assert!(
        node2.log_text().contains("endpoint restored"),
        "node 2's log does not say it restored its endpoint:\n{}",
        node2.log_text()
    );

    // The restored address is still taken: a new container gets another one.
    let c3 = c.container(1, "c3");
    let a3 = c.attach(1, &c3, "web", &[]);
    assert!(
        a3.ip != a1.ip && a3.ip != a2.ip,
        "address handed out twice after a restart: {} (c1 {}, c2 {})",
        a3.ip,
        a1.ip,
        a2.ip
    );
    c.assert_ping(&c3, &a2.ip, PING_WAIT);

    // A second `init` or `join` on the used state dir is still refused.
    let out = node2.cli(&[
        "init",
        "--advertise-addr",
        &node2.addr,
        "--state-dir",
        &node2.state_dir.to_string_lossy(),
        "--api",
        "/nonexistent/overlayd-test.sock",
    ]);
    assert_eq!(out.status.code(), Some(64), "second init: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("overlayd run"),
        "the refusal should point at `overlayd run`: {out:?}"
    );
}
