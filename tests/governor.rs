//! The data plane's governor, end to end: an idle cluster runs steered (workers pinned, packets
//! handled on the CPU they arrived on), a bulk TCP stream between two nodes makes them spread,
//! and once the stream ends they are steered again, with traffic flowing throughout. Read from
//! `status --json` (`dataplane.layout`). Needs root, iperf3, and a machine where overlayd's
//! default of one worker per CPU can be steered (the CPUs it may use are 0..n, as in CI).

mod netns;

use std::time::{Duration, Instant};

use netns::{Cluster, Node, PING_WAIT, wait_for};

fn layout(node: &Node) -> String {
    node.json(&["status"])["dataplane"]["layout"]
        .as_str()
        .unwrap_or("absent")
        .to_owned()
}

/// `Cpus_allowed_list` of each of the node's data-path worker threads, sorted.
fn worker_cpus(node: &Node) -> Vec<String> {
    let pid = node.daemon_pid().expect("daemon running");
    let mut cpus: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("listing the daemon's threads")
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.starts_with("overlay-worker"))
        })
        .filter_map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_owned())
        })
        .collect();
    cpus.sort();
    cpus
}

/// Waits until every node reports `want`; when steered, also until each worker is pinned to
/// a CPU of its own.
fn wait_layout(c: &Cluster, want: &str, timeout: Duration) {
    for node in &c.nodes {
        wait_for(
            timeout,
            &format!("node {} layout {want}", node.index),
            || {
                let l = layout(node);
                let cpus = worker_cpus(node);
                let pinned = cpus.iter().all(|c| c.parse::<usize>().is_ok())
                    && cpus.windows(2).all(|w| w[0] != w[1]);
                match l {
                    l if l == want && (want != "steered" || pinned) => Ok(()),
                    l => Err(format!("layout is {l}, workers may run on {cpus:?}")),
                }
            },
        );
    }
}

#[test]
fn bulk_traffic_spreads_the_workers_and_quiet_steers_them_again() {
    let c = Cluster::new("gov", 2);
    if layout(c.node(1)) == "hashed" {
        eprintln!("skipped: this machine's CPUs cannot be mapped one to one onto workers");
        return;
    }
    c.node(1)
        .cli_ok(&["network", "create", "gov", "--subnet", "198.19.40.0/24"]);
    c.wait_network_everywhere("gov");
    let a = c.container(1, "a");
    let b = c.container(2, "b");
    c.attach(1, &a, "gov", &[]);
    let to = c.attach(2, &b, "gov", &[]).ip;
    c.assert_ping(&a, &to, PING_WAIT);
    wait_layout(&c, "steered", Duration::from_secs(5));

    let _server = c.spawn(&b, &["iperf3", "-s", "-1", "-p", "5201"]);
    wait_for(Duration::from_secs(10), "iperf3 server", || {
        let out = c.exec(&b, &["ss", "-Hltn", "sport = :5201"]);
        if String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            Err("not listening".into())
        } else {
            Ok(())
        }
    });
    let mut client = c.spawn(&a, &["iperf3", "-c", &to, "-p", "5201", "-t", "4"]);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(6);
    while client.alive() && Instant::now() < deadline {
        seen.push((layout(c.node(1)), layout(c.node(2))));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        seen.iter().any(|(x, y)| x == "spread" || y == "spread"),
        "a 4 s TCP stream never made a node spread its workers; samples: {seen:?}"
    );
    drop(client);

    wait_layout(&c, "steered", Duration::from_secs(5));
    c.assert_ping(&a, &to, PING_WAIT);
}
