//! Established TCP connections survive a restart of the daemon of the node they pass through:
//! container to container across nodes, through a service VIP, and through a published port
//! (the routing mesh), each both ways round (the restarted node holds the client, or the task;
//! the entry node, or the task's node). The daemon is stopped with SIGTERM and run again, then
//! killed with SIGKILL and run again; every connection keeps echoing with no reset and no
//! error, and every container keeps its address on the same link. UDP flows through the VIP
//! survive too: a task streams datagrams to a client that said hello once and then only
//! listens, and after both restarts the stream still reaches it (its flow re-derived by the
//! same hashing, on the restarted node of the client or of the task). Needs root (CI runs as
//! root).

mod netns;

use std::time::{Duration, Instant};

use netns::mesh::tcp_server;
use netns::{Bg, Cluster, PING_WAIT, node_addr, wait_for, wait_until};
use serde_json::Value;

/// The port every echo server listens on, and the one the service publishes it as.
const PORT: u16 = 7000;
/// The UDP port every streaming server listens on.
const UDP_PORT: u16 = 7001;
const PUBLISHED: u16 = 9300;
/// An outside client on the underlay.
const OUTSIDE: &str = "198.18.0.200";
/// Connections per path: with two tasks, each path of a VIP or a published port reaches both
/// with odds of 1 - 2/2^4.
const PER_PATH: usize = 4;
/// How long the client runs at most (the test stops it earlier through its stop file).
const CLIENT_BOUND: Duration = Duration::from_secs(150);

/// The [`tcp_server`] body of an echo server on `argv[1]`: every line it reads comes back,
/// after a first line with its name (`argv[2]`).
const ECHO: &str = r#"
def echo(c, peer):
    c.sendall(("%s\n" % sys.argv[2]).encode())
    while True:
        b = c.recv(4096)
        if not b:
            break
        c.sendall(b)
serve(int(sys.argv[1]), echo)
"#;

/// Holds one TCP connection per `LABEL=IP:PORT` argument (after `argv[1]`, the stop file and
/// `argv[2]`, the bound in seconds) and sends a numbered line on each every 200 ms, expecting it
/// back within 30 s. Ends when the stop file appears: prints `LABEL ok N TASK` for each
/// connection that never failed and `LABEL FAIL why` for each that did; exits 1 if any did.
const CLIENT: &str = r#"
import os, socket, sys, threading, time
stop, bound = sys.argv[1], time.time() + float(sys.argv[2])
results = {}
def hold(label, ip, port):
    try:
        c = socket.create_connection((ip, port), timeout=10)
        c.settimeout(30)
        f = c.makefile("rb")
        task = f.readline().decode().strip()
        n = 0
        while not os.path.exists(stop) and time.time() < bound:
            line = ("%s %d\n" % (label, n)).encode()
            c.sendall(line)
            got = f.readline()
            if got != line:
                raise OSError("sent %r, got %r" % (line, got))
            n += 1
            time.sleep(0.2)
        results[label] = "ok %d %s" % (n, task)
    except OSError as e:
        results[label] = "FAIL %s" % e
"#;

/// The end of [`CLIENT`] and [`LISTEN_UDP`]: runs their `hold` for each `LABEL=IP:PORT`
/// argument in a thread of its own, prints each result, and exits 1 if any failed.
const HOLD_EACH: &str = r#"
threads = []
for arg in sys.argv[3:]:
    label, addr = arg.split("=")
    ip, port = addr.rsplit(":", 1)
    t = threading.Thread(target=hold, args=(label, ip, int(port)))
    t.start()
    threads.append(t)
for t in threads:
    t.join()
for label in sorted(results):
    print(label, results[label])
sys.exit(1 if any(r.startswith("FAIL") for r in results.values()) else 0)
"#;

/// Streams to every peer that sends it a datagram on `argv[2]`: "NAME N" (NAME is `argv[1]`)
/// every 200 ms, for `argv[3]` seconds from its start.
const STREAM_UDP: &str = r#"
import socket, sys, threading, time
name, port, bound = sys.argv[1], int(sys.argv[2]), time.time() + float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
s.settimeout(1)
def push(peer):
    n = 0
    while time.time() < bound:
        s.sendto(("%s %d" % (name, n)).encode(), peer)
        n += 1
        time.sleep(0.2)
peers = set()
while time.time() < bound:
    try:
        data, peer = s.recvfrom(2048)
    except socket.timeout:
        continue
    if peer not in peers:
        peers.add(peer)
        threading.Thread(target=push, args=(peer,), daemon=True).start()
"#;

/// For each `LABEL=IP:PORT` argument (after the stop file and the bound in seconds): says hello
/// over UDP until the first datagram comes back, then only listens. Ends when the stop file
/// appears: prints `LABEL ok N TASK gap S` (N datagrams, the longest silence S) for each stream
/// that still flowed in its last 3 s, and `LABEL FAIL ...` for each that did not; exits 1 if
/// any did not.
const LISTEN_UDP: &str = r#"
import os, socket, sys, threading, time
stop, bound = sys.argv[1], time.time() + float(sys.argv[2])
results = {}
def hold(label, ip, port):
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.connect((ip, port))
    c.settimeout(0.5)
    got, last, gap, task = 0, None, 0.0, "?"
    while not os.path.exists(stop) and time.time() < bound:
        if got == 0:
            c.send(b"hello")
        try:
            data = c.recv(2048)
        except OSError:
            continue
        now = time.time()
        if last is not None:
            gap = max(gap, now - last)
        last, got, task = now, got + 1, data.split()[0].decode()
    if last is not None and time.time() - last < 3:
        results[label] = "ok %d %s gap %.1f s" % (got, task, gap)
    else:
        results[label] = "FAIL silent since %s after %d datagrams" % (last, got)
"#;

/// The link index and IPv4 addresses of `netns`'s `eth0`: the same link, not one made again.
fn eth0(c: &Cluster, netns: &str) -> (u64, Vec<String>) {
    let out = c.exec_ok(netns, &["ip", "-j", "-4", "addr", "show", "dev", "eth0"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{netns}: {e}: {out}"));
    let addrs = v[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or("?"), a["prefixlen"]))
        .collect();
    (v[0]["ifindex"].as_u64().unwrap_or(0), addrs)
}

#[test]
fn tcp_connections_through_the_overlay_a_vip_and_a_published_port_survive_restarts() {
    let c = Cluster::new("rflows", 3);
    c.node(1)
        .cli_ok(&["network", "create", "app", "--subnet", "198.19.8.0/24"]);
    c.wait_network_everywhere("app");
    let created = c.node(1).json(&[
        "service",
        "create",
        "echo",
        "--network",
        "app",
        "--publish",
        &format!("{PUBLISHED}:{PORT}"),
    ]);
    let vip = created["vip"].as_str().expect("a VIP").to_string();

    // Tasks on nodes 2 and 3; plain containers (clients, and a server reached by its own
    // address) on nodes 1 and 2.
    let echo = tcp_server(ECHO);
    let mut servers: Vec<Bg> = Vec::new();
    let mut containers = Vec::new();
    for n in [2, 3] {
        let task = c.container(n, &format!("t{n}"));
        c.attach(n, &task, "app", &["--service", "echo"]);
        servers.push(c.spawn(
            &task,
            &["python3", "-c", &echo, &PORT.to_string(), &format!("t{n}")],
        ));
        servers.push(c.spawn(
            &task,
            &[
                "python3",
                "-c",
                STREAM_UDP,
                &format!("t{n}"),
                &UDP_PORT.to_string(),
                &CLIENT_BOUND.as_secs().to_string(),
            ],
        ));
        containers.push(task);
    }
    let c1 = c.container(1, "c1");
    let c2 = c.container(2, "c2");
    let a1 = c.attach(1, &c1, "app", &[]);
    let a2 = c.attach(2, &c2, "app", &[]);
    for (ns, name) in [(&c1, "c1"), (&c2, "c2")] {
        servers.push(c.spawn(ns, &["python3", "-c", &echo, &PORT.to_string(), name]));
    }
    containers.extend([c1.clone(), c2.clone()]);
    let outside = c.host("outside", OUTSIDE);
    assert!(
        wait_until(PING_WAIT, || (1..=3).all(|n| {
            c.node(n)
                .try_json(&["service", "ls"])
                .is_ok_and(|v| v[0]["tasks_healthy"].as_u64() == Some(2))
        })),
        "every node lists 2 healthy tasks"
    );
    // The balancers take the view at their node's next reconcile round.
    std::thread::sleep(Duration::from_millis(1500));
    c.assert_ping(&c1, &a2.ip, PING_WAIT);
    let links_before: Vec<(u64, Vec<String>)> = containers.iter().map(|ns| eth0(&c, ns)).collect();

    // Node 2 is restarted: it holds one end of every path.
    let port = |ip: &str, p: u16| format!("{ip}:{p}");
    let mut paths: Vec<(String, &str, String)> = vec![
        // (a) across nodes, both ways.
        ("overlay-1to2".into(), &c1, port(&a2.ip, PORT)),
        ("overlay-2to1".into(), &c2, port(&a1.ip, PORT)),
    ];
    for i in 0..PER_PATH {
        // (b) through the VIP, from a client on node 2 and from one on node 1.
        paths.push((format!("vip-from2-{i}"), &c2, port(&vip, PORT)));
        paths.push((format!("vip-from1-{i}"), &c1, port(&vip, PORT)));
        // (c) through a published port, entering at node 2 and at node 3.
        paths.push((
            format!("mesh-at2-{i}"),
            &outside,
            port(&node_addr(2), PUBLISHED),
        ));
        paths.push((
            format!("mesh-at3-{i}"),
            &outside,
            port(&node_addr(3), PUBLISHED),
        ));
    }
    // (d) UDP streams through the VIP, to a client on node 2 and to one on node 1.
    let mut streams: Vec<(String, &str, String)> = Vec::new();
    for i in 0..PER_PATH {
        streams.push((format!("udp-vip-to2-{i}"), &c2, port(&vip, UDP_PORT)));
        streams.push((format!("udp-vip-to1-{i}"), &c1, port(&vip, UDP_PORT)));
    }
    let stop = c.dir.join("rflows-stop");
    // Runs `script` in `ns` over the paths of `paths` that start there.
    let client = |script: &str, ns: &str, paths: &[(String, &str, String)]| {
        let mut args = vec![
            "python3".to_string(),
            "-c".into(),
            format!("{script}{HOLD_EACH}"),
            stop.to_string_lossy().into_owned(),
            CLIENT_BOUND.as_secs().to_string(),
        ];
        args.extend(
            paths
                .iter()
                .filter(|(_, from, _)| *from == ns)
                .map(|(label, _, to)| format!("{label}={to}")),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        c.spawn(ns, &args)
    };
    let listeners = [(&c1, "udp c1"), (&c2, "udp c2")]
        .map(|(ns, what)| (client(LISTEN_UDP, ns, &streams), what));
    let clients = [&c1, &c2, &outside].map(|ns| client(CLIENT, ns, &paths));
    std::thread::sleep(Duration::from_secs(3));

    let node2 = c.node(2);
    let ready_again = |how: &str| {
        wait_for(
            Duration::from_secs(30),
            &format!("node 2 ready after {how}"),
            || {
                let members = c.node(1).members()?;
                match members.iter().filter(|(_, s)| s == "ready").count() {
                    3 => Ok(()),
                    _ => Err(format!("members {members:?}")),
                }
            },
        );
        // Connections keep echoing for a while after the restart.
        std::thread::sleep(Duration::from_secs(6));
    };
    let started = Instant::now();
    let status = node2.stop_daemon(Duration::from_secs(20));
    assert!(status.success(), "overlayd after SIGTERM: {status:?}");
    std::thread::sleep(Duration::from_secs(1));
    node2.run_daemon();
    ready_again("SIGTERM");
    println!(
        "SIGTERM + run: connections checked {:?} after the stop",
        started.elapsed()
    );

    let started = Instant::now();
    node2.kill_daemon();
    std::thread::sleep(Duration::from_secs(1));
    node2.run_daemon();
    ready_again("SIGKILL");
    println!(
        "SIGKILL + run: connections checked {:?} after the kill",
        started.elapsed()
    );

    std::fs::write(&stop, b"").expect("writing the stop file");
    let mut failures = Vec::new();
    let tcp = clients.into_iter().zip(["c1", "c2", "outside"]);
    for (mut client, what) in tcp.chain(listeners) {
        let deadline = Instant::now() + Duration::from_secs(45);
        while client.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(&client.log).unwrap_or_default();
        print!("{log}");
        if client.alive() {
            failures.push(format!(
                "{what}: still running 45 s after the stop file\n{log}"
            ));
        } else if log.contains("FAIL") || log.lines().count() == 0 {
            failures.push(format!("{what}:\n{log}"));
        }
    }
    assert!(
        failures.is_empty(),
        "connections broke:\n{}",
        failures.join("\n")
    );

    let links_after: Vec<(u64, Vec<String>)> = containers.iter().map(|ns| eth0(&c, ns)).collect();
    assert_eq!(
        links_before, links_after,
        "a container's address or link changed across the restarts"
    );
}
