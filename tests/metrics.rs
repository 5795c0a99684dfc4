//! Observability on one 3-node cluster with a service, each daemon run with `--metrics` and
//! `--log-format json`:
//! - the Prometheus text's counters move with real traffic through a VIP (per network, per
//!   task, per peer, the control plane), and nothing but `/metrics` answers;
//! - `trace` of a VIP packet names the task that then answers a real request with the same
//!   5-tuple, and that task's node as the VTEP; an ICMP packet to the VIP is shown dropped;
//!   an unknown network and a malformed address are refused with exit 64;
//! - the log holds each cluster event (members joining, the network, tasks added, removed and
//!   unhealthy) exactly once, as a JSON line with its fields.
//!
//! Needs root (CI runs as root).

mod netns;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use netns::{Cluster, Node, PING_WAIT, wait_until};
use serde_json::Value;

const METRICS_PORT: u16 = 9464;
/// Requests through the VIP between the two scrapes.
const REQUESTS: usize = 20;

/// Every series of a scrape (`name{labels}`) with its value.
fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Node `i`'s metrics, scraped from inside its namespace: the body and how long it took.
fn scrape(c: &Cluster, i: usize, path: &str) -> (u16, String, Duration) {
    let url = format!("http://{}:{METRICS_PORT}{path}", c.node(i).addr);
    let started = Instant::now();
    let out = c.exec(
        &c.node(i).netns,
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
            &url,
        ],
    );
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "scraping {url}: {}",
        netns::show(&out)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl printed the status");
    (code.trim().parse().unwrap_or(0), body.to_owned(), took)
}

fn metrics(c: &Cluster, i: usize) -> BTreeMap<String, f64> {
    let (code, body, _) = scrape(c, i, "/metrics");
    assert_eq!(code, 200, "{body}");
    parse(&body)
}

/// The sum of every series of `name` whose labels contain all of `labels`.
fn sum(m: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    m.iter()
        .filter(|(series, _)| {
            series.split('{').next() == Some(name) && labels.iter().all(|l| series.contains(l))
        })
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn metrics_trace_and_event_logs_on_a_cluster_with_a_service() {
    let metrics_addr = format!("0.0.0.0:{METRICS_PORT}");
    let c = Cluster::with_daemon_args(
        "metrics",
        3,
        &["--metrics", &metrics_addr, "--log-format", "json"],
    );
    c.node(1)
        .cli_ok(&["network", "create", "app", "--subnet", "198.19.7.0/24"]);
    c.wait_network_everywhere("app");
    let created = c.node(3).json(&[
        "service",
        "create",
        "web",
        "--network",
        "app",
        "--health-tcp",
        "80",
        "--health-interval",
        "300ms",
    ]);
    let vip = created["vip"].as_str().expect("a VIP").to_owned();
    let (_, a2, t2) = c.httpd_task(2, "t2", "app", "web");
    let (ns3, a3, _t3) = c.httpd_task(3, "t3", "app", "web");
    let client = c.container(1, "client");
    c.attach(1, &client, "app", &[]);
    // A member's frames from a MAC the receiving node does not know yet are dropped.
    assert!(
        wait_until(PING_WAIT, || (1..=3).all(|n| {
            c.node(n)
                .network("app")
                .ok()
                .flatten()
                .is_some_and(|v| v["endpoints"].as_u64() == Some(3))
        })),
        "the client is not known on every node"
    );
    assert!(
        wait_until(PING_WAIT, || {
            let m = metrics(&c, 1);
            sum(&m, "overlayd_task_health", &[r#"state="healthy""#]) == 2.0
        }),
        "node 1's metrics never showed both tasks healthy"
    );
    // The balancer takes the view at the next reconcile round.
    std::thread::sleep(Duration::from_millis(600));

    let before = metrics(&c, 1);
    for i in 0..REQUESTS {
        let out = c.exec(
            &client,
            &["curl", "-sS", "--max-time", "3", &format!("http://{vip}/")],
        );
        assert!(out.status.success(), "request {i}: {}", netns::show(&out));
    }
    let (code, body, took) = scrape(&c, 1, "/metrics");
    assert_eq!(code, 200);
    let after = parse(&body);
    println!("sample scrape of node 1 after {REQUESTS} requests (took {took:?}):");
    for line in body.lines().filter(|l| {
        !l.starts_with('#')
            && (l.contains("app")
                || l.contains("web")
                || l.contains("peer")
                || l.contains("members"))
    }) {
        println!("  {line}");
    }

    let moved = |name: &str, labels: &[&str]| {
        let (b, a) = (sum(&before, name, labels), sum(&after, name, labels));
        println!("{name}{labels:?}: {b} -> {a}");
        a - b
    };
    let app = r#"network="app""#;
    assert!(
        moved("overlayd_network_frames_total", &[app, r#"direction="in""#])
            >= REQUESTS as f64 * 3.0
    );
    assert!(
        moved(
            "overlayd_network_frames_total",
            &[app, r#"direction="out""#]
        ) >= REQUESTS as f64 * 3.0
    );
    assert!(
        moved("overlayd_network_bytes_total", &[app, r#"direction="in""#])
            >= REQUESTS as f64 * 200.0
    );
    assert!(
        moved("overlayd_network_bytes_total", &[app, r#"direction="out""#])
            >= REQUESTS as f64 * 200.0
    );
    // Every request is a new connection: one Maglev choice each, to either task.
    assert_eq!(
        moved("overlayd_task_connections_total", &[r#"service="web""#]),
        REQUESTS as f64
    );
    assert_eq!(moved("overlayd_balancer_flows_total", &[]), REQUESTS as f64);
    for peer in [&c.node(2).addr, &c.node(3).addr] {
        let label = format!(r#"peer="{peer}""#);
        assert!(moved("overlayd_peer_vxlan_datagrams_total", &[&label]) > 0.0);
        let seen = sum(
            &after,
            "overlayd_peer_last_seen_timestamp_seconds",
            &[&label],
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            (now - seen).abs() < 30.0,
            "peer {peer} last seen {seen}, now {now}"
        );
    }
    assert_eq!(sum(&after, "overlayd_members", &[r#"state="ready""#]), 3.0);
    assert!(moved("overlayd_gossip_rounds_total", &[]) > 0.0);

    // Every node applied the network, the service and the three attaches after it started.
    for i in 1..=3 {
        let m = metrics(&c, i);
        let count = sum(&m, "overlayd_registry_apply_delay_seconds_count", &[]);
        let total = sum(&m, "overlayd_registry_apply_delay_seconds_sum", &[]);
        println!(
            "node {i}: {count} registry changes applied, mean {:.1} ms from proposal to apply here",
            total / count * 1000.0
        );
        assert!(count >= 5.0, "node {i} counted {count} applied changes");
    }

    let (code, _, _) = scrape(&c, 1, "/other");
    assert_eq!(code, 404);

    // trace: the task a VIP packet is shown to go to is the one that answers that 5-tuple.
    let names = [
        (a2.ip.clone(), "t2", &c.node(2).addr),
        (a3.ip.clone(), "t3", &c.node(3).addr),
    ];
    let client_ip = c.node(1).json(&["inspect", "network", "app"])["endpoints"]
        .as_array()
        .and_then(|eps| {
            eps.iter()
                .find(|e| e["endpoint"]["netns"] == client.as_str())
                .and_then(|e| e["endpoint"]["ip"].as_str().map(str::to_owned))
        })
        .expect("inspect network lists the client");
    for port in [41001u16, 41002, 41003, 41004] {
        let src = format!("{client_ip}:{port}");
        let dst = format!("{vip}:80");
        let t = c.node(1).json(&["trace", "app", &src, &dst]);
        let task = t["balancer"]["task"]
            .as_str()
            .expect("a chosen task")
            .to_owned();
        let (_, name, node) = names
            .iter()
            .find(|(ip, _, _)| task == format!("{ip}:80"))
            .unwrap_or_else(|| panic!("trace chose {task}, no task of web: {t}"));
        assert_eq!(t["vtep"], format!("{node}:4789"), "{t}");
        let answered = c.exec_ok(
            &client,
            &[
                "curl",
                "-sS",
                "--max-time",
                "3",
                "--local-port",
                &port.to_string(),
                &format!("http://{vip}/"),
            ],
        );
        println!(
            "trace {src} -> {dst}: task {task} (hash {}), VTEP {}; the real request was answered by {}",
            t["balancer"]["hash"],
            t["vtep"],
            answered.trim()
        );
        assert_eq!(answered.trim(), *name, "trace said {t}");
    }
    println!(
        "sample trace:\n{}",
        c.node(1).cli_ok(&[
            "trace",
            "app",
            &format!("{client_ip}:41001"),
            &format!("{vip}:80")
        ])
    );
    let dropped = c
        .node(1)
        .json(&["trace", "app", &client_ip, &vip, "--proto", "icmp"]);
    assert_eq!(dropped["drop"], "service", "{dropped}");
    for bad in [
        vec!["trace", "nosuchnet", "198.19.7.5", "198.19.7.6:80"],
        vec!["trace", "app", "198.19.7.5", "not-an-address"],
        vec!["trace", "app", "198.19.7.5", "198.19.7.6"],
    ] {
        let out = c.node(1).cli(&bad);
        assert_eq!(
            out.status.code(),
            Some(64),
            "{bad:?}: {}",
            netns::show(&out)
        );
    }
    let service = c.node(1).json(&["inspect", "service", "web"]);
    assert_eq!(
        service["tasks"].as_array().map(Vec::len),
        Some(2),
        "{service}"
    );
    let node = c.node(1).json(&["inspect", "node", &c.node(2).addr]);
    assert_eq!(node["tasks"][0]["ip"], a2.ip.as_str(), "{node}");

    // Events: a task detached, another's server stopped (its check fails).
    c.node(3).cli_ok(&["detach", &ns3, "--network", "app"]);
    drop(t2);
    let ids = node_ids(c.node(1));
    let wanted = [
        (
            "member_joined",
            vec![("node", ids[&c.node(2).addr].as_str())],
        ),
        (
            "member_joined",
            vec![("node", ids[&c.node(3).addr].as_str())],
        ),
        (
            "network_created",
            vec![("network", "app"), ("subnet", "198.19.7.0/24")],
        ),
        (
            "task_added",
            vec![("service", "web"), ("task", a2.ip.as_str())],
        ),
        (
            "task_added",
            vec![("service", "web"), ("task", a3.ip.as_str())],
        ),
        (
            "task_removed",
            vec![
                ("task", a3.ip.as_str()),
                ("node", ids[&c.node(3).addr].as_str()),
            ],
        ),
        (
            "task_unhealthy",
            vec![
                ("task", a2.ip.as_str()),
                ("node", ids[&c.node(2).addr].as_str()),
            ],
        ),
    ];
    let started = Instant::now();
    let all_there = wait_until(Duration::from_secs(10), || {
        let events = events(c.node(1));
        wanted
            .iter()
            .all(|(name, fields)| matching(&events, name, fields) >= 1)
    });
    let events = events(c.node(1));
    assert!(all_there, "node 1's events: {events:#?}");
    println!(
        "every event logged on node 1 within {:?} of the last change",
        started.elapsed()
    );
    for (name, fields) in &wanted {
        let n = matching(&events, name, fields);
        assert_eq!(n, 1, "{name} {fields:?} logged {n} times: {events:#?}");
    }
    for e in &events {
        println!("event: {e}");
    }
}

/// Node id by address, from `node ls` on `node`.
fn node_ids(node: &Node) -> BTreeMap<String, String> {
    node.json(&["node", "ls"])
        .as_array()
        .expect("node ls is a list")
        .iter()
        .map(|n| {
            let field = |k: &str| n[k].as_str().unwrap_or_default().to_owned();
            (field("address"), field("id"))
        })
        .collect()
}

/// The JSON log lines of `node` that carry an `event` field.
fn events(node: &Node) -> Vec<Value> {
    node.log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("event").is_some())
        .collect()
}

/// How many of `events` are `name` with every field of `fields` as given.
fn matching(events: &[Value], name: &str, fields: &[(&str, &str)]) -> usize {
    events
        .iter()
        .filter(|e| e["event"] == name && fields.iter().all(|(k, v)| e[*k] == *v))
        .count()
}
