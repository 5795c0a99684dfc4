//! The routing mesh's kernel hooks on real nodes, read back with `tc filter show`:
//! - they follow `service create --publish`, `service update --publish-add/--publish-rm`,
//!   `mode=host` and `service rm` on every node, and leave nothing behind;
//! - a published port is held (a second bind fails); one another process holds is reported in
//!   `status` with the port and the node, gets no hooks, and is taken once it is free;
//! - a daemon stopped for good (SIGINT) removes its hooks; one killed (or stopped with SIGTERM,
//!   to be run again) leaves them, and its restart removes exactly those (tc `pref`s in overlayd's range), keeping everyone else's filters.
//!
//! Needs root (CI runs as root).

mod netns;

use std::collections::BTreeMap;
use std::time::Duration;

use netns::{Cluster, Node, wait_for};

const SWEEP_WAIT: Duration = Duration::from_secs(20);
/// Gossip, Raft and one reconcile round on every node.
const HOOKS_WAIT: Duration = Duration::from_secs(15);
/// overlayd's tc `pref`s.
const OURS: std::ops::RangeInclusive<u32> = 0xC000..=0xCFFF;
const VNI: &str = "4400";
const BRIDGE: &str = "ovbr-4400";
const TAP: &str = "ovtap-4400";
const SUBNET: &str = "198.19.62.0/24";

/// Our filters on `node`, by "DEV DIRECTION", each summed up as "pass", "tcp dport 9200",
/// "udp sport 80" (plus " dst ADDR/MASK" when it matches one). Steering filters must redirect
/// to the network's TAP.
fn hooks(c: &Cluster, node: &Node) -> Result<BTreeMap<String, Vec<String>>, String> {
    let mut all = BTreeMap::new();
    for (dev, dir) in [("eth0", "ingress"), ("lo", "egress"), (BRIDGE, "ingress")] {
        let out = c.exec(&node.netns, &["tc", "filter", "show", "dev", dev, dir]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut found = Vec::new();
        // One block per rule: its header line names the pref and a key handle (`fh 800::800`).
        for block in text.split("\nfilter ").filter(|b| b.contains("::")) {
            let pref: u32 = block
                .split_whitespace()
                .skip_while(|w| *w != "pref")
                .nth(1)
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| format!("no pref in {block:?}"))?;
            if !OURS.contains(&pref) {
                continue;
            }
            found.push(summary(block)?);
        }
        found.sort();
        if !found.is_empty() {
            all.insert(format!("{dev} {dir}"), found);
        }
    }
    Ok(all)
}

/// "tcp dport 9200 [dst A/M]" or "pass [dst A/M]" from `tc filter show`'s `match VALUE/MASK at
/// OFFSET` lines of one u32 rule.
fn summary(block: &str) -> Result<String, String> {
    let (mut protocol, mut port, mut dst) = (String::new(), String::new(), String::new());
    for line in block.lines().map(str::trim) {
        let Some(m) = line.strip_prefix("match ") else {
            continue;
        };
        let (vm, at) = m.split_once(" at ").ok_or(format!("odd match {line:?}"))?;
        let (value, mask) = vm.split_once('/').ok_or(format!("odd match {line:?}"))?;
        let value = u32::from_str_radix(value, 16).map_err(|e| e.to_string())?;
        match (at, mask) {
            ("8", "00ff0000") => {
                protocol = match value >> 16 {
                    6 => "tcp".into(),
                    17 => "udp".into(),
                    p => p.to_string(),
                }
            }
            ("20", "0000ffff") => port = format!("dport {}", value & 0xffff),
            ("20", "ffff0000") => port = format!("sport {}", value >> 16),
            // A reply hook's "sent by a container" (source MAC 02:42:..).
            ("-8", "ffff0000") if value == 0x0242_0000 => {}
            ("16", mask) => {
                let bits = u32::from_str_radix(mask, 16).map_err(|e| e.to_string())?;
                dst = format!(
                    " dst {}/{}",
                    std::net::Ipv4Addr::from(value),
                    bits.count_ones()
                )
            }
            _ => return Err(format!("unexpected match {line:?}")),
        }
    }
    if block.contains("mirred") {
        if !block.contains(&format!("Redirect to device {TAP})")) {
            return Err(format!("does not steer to {TAP}: {block:?}"));
        }
        Ok(format!("{protocol} {port}{dst}"))
    } else {
        Ok(format!("pass{dst}"))
    }
}

/// Waits until `node`'s hooks are exactly these: each of `ports` (as "tcp dport 9200") steered
/// from outside (eth0, to the node's address) and from the node (lo), and if there are
/// `replies` (as "tcp sport 80"), those on the bridge after the subnet's pass.
fn wait_hooks(c: &Cluster, node: &Node, ports: &[&str], replies: &[&str], what: &str) {
    let sorted = |hooks: Vec<String>| {
        let mut hooks = hooks;
        hooks.sort();
        hooks
    };
    let mut want = BTreeMap::new();
    if !ports.is_empty() {
        let outside = ports.iter().map(|p| format!("{p} dst {}/32", node.addr));
        want.insert("eth0 ingress".to_string(), sorted(outside.collect()));
        let local = ports.iter().map(|p| p.to_string());
        want.insert("lo egress".to_string(), sorted(local.collect()));
    }
    if !replies.is_empty() {
        let pass = std::iter::once(format!("pass dst {SUBNET}"));
        let steer = replies.iter().map(|r| r.to_string());
        want.insert(
            format!("{BRIDGE} ingress"),
            sorted(pass.chain(steer).collect()),
        );
    }
    wait_for(HOOKS_WAIT, &format!("node {}: {what}", node.index), || {
        let have = hooks(c, node)?;
        if have == want {
            Ok(())
        } else {
            Err(format!("hooks {have:?}, want {want:?}"))
        }
    });
}

/// Whether a new socket in `node`'s namespace can bind `port` on 0.0.0.0 (`tcp` or `udp`).
fn bindable(c: &Cluster, node: &Node, port: u16, protocol: &str) -> bool {
    let kind = if protocol == "udp" {
        "SOCK_DGRAM"
    } else {
        "SOCK_STREAM"
    };
    let script = format!(
        "import socket; socket.socket(socket.AF_INET, socket.{kind}).bind(('0.0.0.0', {port}))"
    );
    c.exec(&node.netns, &["python3", "-c", &script])
        .status
        .success()
}

/// Network `app` and service `web` on it publishing 9200 -> 80/tcp, made through node 1.
fn publish_web(c: &Cluster) {
    let n1 = c.node(1);
    n1.cli_ok(&["network", "create", "app", "--subnet", SUBNET, "--vni", VNI]);
    c.wait_network_everywhere("app");
    let publish = ["--network", "app", "--publish", "9200:80"];
    n1.cli_ok(&[&["service", "create", "web"][..], &publish].concat());
}

#[test]
fn hooks_follow_the_published_ports_on_every_node_and_leave_nothing_behind() {
    let c = Cluster::new("meshpub", 2);
    let (n1, n2) = (c.node(1), c.node(2));
    publish_web(&c);
    let t1 = c.container(1, "t1");
    c.attach(1, &t1, "app", &["--service", "web"]);

    // Ingress mode: every node steers 9200; replies from port 80 only where the task runs.
    let what = "9200 steered";
    wait_hooks(&c, n1, &["tcp dport 9200"], &["tcp sport 80"], what);
    wait_hooks(&c, n2, &["tcp dport 9200"], &[], what);
    for node in [n1, n2] {
        assert!(
            !bindable(&c, node, 9200, "tcp"),
            "node {}: 9200 is held",
            node.index
        );
        let ports = &node.json(&["status"])["mesh"]["ports"];
        assert_eq!(ports[0]["port"], 9200, "{ports}");
        assert!(ports[0]["error"].is_null(), "{ports}");
    }

    n2.cli_ok(&[
        "service",
        "update",
        "web",
        "--publish-rm",
        "9200",
        "--publish-add",
        "9300:80/udp",
    ]);
    let what = "9200 gone, 9300/udp in";
    wait_hooks(&c, n1, &["udp dport 9300"], &["udp sport 80"], what);
    wait_hooks(&c, n2, &["udp dport 9300"], &[], what);
    for node in [n1, n2] {
        assert!(
            bindable(&c, node, 9200, "tcp"),
            "node {}: 9200 freed",
            node.index
        );
        assert!(
            !bindable(&c, node, 9300, "udp"),
            "node {}: 9300 held",
            node.index
        );
    }

    // mode=host: only the node running its task.
    n1.cli_ok(&[
        "service",
        "create",
        "admin",
        "--network",
        "app",
        "--publish",
        "published=9400,target=81,mode=host",
    ]);
    let t2 = c.container(2, "t2");
    c.attach(2, &t2, "app", &["--service", "admin"]);
    let ports = ["tcp dport 9400", "udp dport 9300"];
    let what = "the host-mode port where its task runs";
    wait_hooks(&c, n2, &ports, &["tcp sport 81"], what);
    assert!(bindable(&c, n1, 9400, "tcp"), "no admin task on node 1");

    for service in ["web", "admin"] {
        n1.cli_ok(&["service", "rm", service, "--force"]);
    }
    for node in [n1, n2] {
        wait_hooks(&c, node, &[], &[], "no hook left after service rm");
        let qdiscs = c.exec_ok(&node.netns, &["tc", "qdisc", "show", "dev", "lo"]);
        assert!(
            !qdiscs.contains("clsact"),
            "the clsact overlayd added on lo stays: {qdiscs}"
        );
        assert!(bindable(&c, node, 9300, "udp"));
    }
}

#[test]
fn a_port_another_process_holds_is_reported_and_taken_once_free_and_sigint_removes_the_hooks() {
    let c = Cluster::new("meshheld", 1);
    let node = c.node(1);
    publish_web(&c);
    let steered = ["tcp dport 9200"];
    wait_hooks(&c, node, &steered, &[], "9200 steered");

    // A crash, and another process takes the port before the daemon is back.
    node.kill_daemon();
    let holder = c.spawn(
        &node.netns,
        &[
            "python3",
            "-c",
            "import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 9200)); time.sleep(120)",
        ],
    );
    wait_for(HOOKS_WAIT, "the holder to bind 9200", || {
        if bindable(&c, node, 9200, "tcp") {
            Err("9200 still free".into())
        } else {
            Ok(())
        }
    });
    node.restart_daemon();
    let error = wait_for(HOOKS_WAIT, "status to report 9200 refused", || {
        let status = node.try_json(&["status"])?;
        let port = &status["mesh"]["ports"][0];
        port["error"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| format!("mesh: {}", status["mesh"]))
    });
    assert!(
        error.starts_with("port 9200/tcp on node ") && error.contains(&node.addr),
        "the error names the port and the node: {error}"
    );
    assert_eq!(
        hooks(&c, node),
        Ok(BTreeMap::new()),
        "no hooks for a port not held"
    );
    assert!(
        node.log_text().contains(&error),
        "the error is logged: {error}"
    );

    drop(holder);
    wait_hooks(&c, node, &steered, &[], "9200 held and steered once free");

    let status = node.interrupt_daemon(SWEEP_WAIT);
    assert!(status.success(), "overlayd after SIGINT: {status:?}");
    assert_eq!(
        hooks(&c, node),
        Ok(BTreeMap::new()),
        "SIGINT removes every hook"
    );
    assert!(bindable(&c, node, 9200, "tcp"), "and frees the port");
}

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
