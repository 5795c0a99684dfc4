//! A published port with `proxy=v2`: every node's proxy sends the task a PROXY protocol v2
//! header carrying the client's own address and port, for a task on the node the client hit
//! and on another node, also through a port bound to one node's address; a port with no task
//! resets at once; `--publish-rm` closes the port on every node. The tasks run a PROXY-aware server that answers what the header said.
//! Needs root (CI runs as root).

mod netns;

use std::collections::BTreeSet;
use std::time::Duration;

use netns::{Bg, Cluster, PING_WAIT, node_addr, wait_until};

const NODES: usize = 2;
/// Connections per client and node: with 2 tasks, missing one in 24 picks has odds of 1e-7.
const REQUESTS: usize = 24;

/// A TCP server on port 80 that reads a PROXY v2 header (TCP over IPv4) and the client's
/// first bytes, and answers "NAME SRC_IP:SRC_PORT DST_IP:DST_PORT DATA", or "NAME bad-header".
const PROXY_AWARE: &str = r#"
import socket, struct, sys
name = sys.argv[1]
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
def read(c, n):
    b = b""
    while len(b) < n:
        chunk = c.recv(n - len(b))
        if not chunk:
            raise EOFError
        b += chunk
    return b
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80))
s.listen(64)
while True:
    c, _ = s.accept()
    try:
        c.settimeout(5)
        h = read(c, 16)
        if h[:12] != SIGNATURE or h[12] != 0x21 or h[13] != 0x11:
            c.sendall(("%s bad-header\n" % name).encode())
            continue
        a = read(c, struct.unpack("!H", h[14:16])[0])
        sport, dport = struct.unpack("!HH", a[8:12])
        data = c.recv(1024).decode()
        c.sendall(("%s %s:%d %s:%d %s\n" % (name, socket.inet_ntoa(a[0:4]), sport,
                                            socket.inet_ntoa(a[4:8]), dport, data)).encode())
    except Exception:
        pass
    finally:
        c.close()
"#;

/// Connects to `argv[1]:argv[2]` `argv[3]` times, sends "hello", and prints each answer
/// followed by the client's own address and port; "reset" or "refused" when it is turned away,
/// "failed" and the error otherwise.
const ASK: &str = r#"
import socket, sys
for _ in range(int(sys.argv[3])):
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
        me = "%s:%d" % s.getsockname()
        s.sendall(b"hello")
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            b = s.recv(1024)
            if not b:
                break
            out += b
        print(out.decode().strip(), me)
        s.close()
    except ConnectionResetError:
        print("reset")
    except ConnectionRefusedError:
        print("refused")
    except OSError as e:
        print("failed", type(e).__name__)
"#;

/// One answer: (task, source in the header, destination in the header, data, client's own
/// address).
type Answer = (String, String, String, String, String);

fn parse(line: &str) -> Answer {
    let w: Vec<String> = line.split_whitespace().map(String::from).collect();
    let at = |i: usize| w.get(i).cloned().unwrap_or_default();
    (at(0), at(1), at(2), at(3), at(4))
}

fn ask(c: &Cluster, netns: &str, addr: &str, port: u16, times: usize) -> Vec<String> {
    let out = c.exec_ok(
        netns,
        &[
            "python3",
            "-c",
            ASK,
            addr,
            &port.to_string(),
            &times.to_string(),
        ],
    );
    out.lines().map(String::from).collect()
}

/// Each of `REQUESTS` connections from `netns` to `addr:port` reaches a task that read a
/// header naming the client's own address and port and `addr:9300`, then the client's bytes;
/// every task answers. Returns the answers.
fn all_tasks_read_the_client(c: &Cluster, netns: &str, addr: &str, port: u16) -> BTreeSet<Answer> {
    let answers: Vec<Answer> = ask(c, netns, addr, port, REQUESTS)
        .iter()
        .map(|l| parse(l))
        .collect();
    for (task, source, destination, data, me) in &answers {
        assert_eq!(
            (source, destination.as_str(), data.as_str()),
            (me, format!("{addr}:{port}").as_str(), "hello"),
            "task {task:?} read the client's own address and port, then its bytes: {answers:?}"
        );
    }
    let tasks: BTreeSet<&str> = answers.iter().map(|a| a.0.as_str()).collect();
    let want: BTreeSet<String> = (1..=NODES).map(|n| format!("t{n}")).collect();
    let want: BTreeSet<&str> = want.iter().map(String::as_str).collect();
    assert_eq!(tasks, want, "every task answers through {addr}");
    answers.into_iter().collect()
}

/// A cluster with network `app`, service `api` publishing 9300 -> 80 with `proxy=v2`, and one
/// PROXY-aware task per node (`t1`, `t2`).
fn proxy_cluster(name: &str) -> (Cluster, Vec<Bg>) {
    let c = Cluster::new(name, NODES);
    c.node(1)
        .cli_ok(&["network", "create", "app", "--subnet", "198.19.7.0/24"]);
    c.wait_network_everywhere("app");
    c.node(1).cli_ok(&[
        "service",
        "create",
        "api",
        "--network",
        "app",
        "--publish",
        "9300:80,proxy=v2",
    ]);
    let mut servers = Vec::new();
    for n in 1..=NODES {
        let task = format!("t{n}");
        let ns = c.container(n, &task);
        c.attach(n, &ns, "app", &["--service", "api"]);
        servers.push(c.spawn(&ns, &["python3", "-c", PROXY_AWARE, &task]));
    }
    assert!(
        wait_until(PING_WAIT, || (1..=NODES).all(|n| {
            c.node(n)
                .try_json(&["service", "ls"])
                .is_ok_and(|v| v[0]["tasks_healthy"].as_u64() == Some(NODES as u64))
        })),
        "every node lists every task healthy"
    );
    // The balancers take the view at their node's next reconcile round.
    std::thread::sleep(Duration::from_millis(600));
    (c, servers)
}

fn proxy_status(c: &Cluster, n: usize) -> serde_json::Value {
    c.node(n).json(&["status"])["mesh"]["proxy"].clone()
}

#[test]
fn tasks_on_every_node_read_the_clients_own_address_in_a_proxy_v2_header() {
    let (c, _servers) = proxy_cluster("meshproxy");
    let client_addr = "198.18.0.200";
    let client = c.host("client", client_addr);
    for n in 1..=NODES {
        let answers = all_tasks_read_the_client(&c, &client, &node_addr(n), 9300);
        assert!(answers.iter().all(|a| a.4.starts_with(client_addr)));
        println!("through node {n}: {answers:?}");
        // No tc hook steers the port: the proxy, not the packet mesh, answers it.
        let filters = c.exec_ok(
            &c.node(n).netns,
            &["tc", "filter", "show", "dev", "eth0", "ingress"],
        );
        assert!(
            !filters.contains("9300") && !filters.contains("0x2454"),
            "{filters}"
        );
        let status = proxy_status(&c, n);
        assert!(
            status["connections"].as_u64() >= Some(REQUESTS as u64),
            "node {n}: {status}"
        );
        assert_eq!(status["failed"], 0, "node {n}: {status}");
    }
    // The node itself is a client too.
    for n in 1..=NODES {
        let answers = all_tasks_read_the_client(&c, &c.node(n).netns, &node_addr(n), 9300);
        assert!(answers.iter().all(|a| a.4.starts_with(&node_addr(n))));
    }

    // A port with no task: reset at once, and counted.
    c.node(1).cli_ok(&[
        "service",
        "create",
        "empty",
        "--network",
        "app",
        "--publish",
        "9301:80,proxy=v2",
    ]);
    for n in 1..=NODES {
        let mut lines = Vec::new();
        let reset = wait_until(PING_WAIT, || {
            lines = ask(&c, &client, &node_addr(n), 9301, 1);
            lines == ["reset"]
        });
        assert!(reset, "node {n}: a port with no task resets: {lines:?}");
        let status = proxy_status(&c, n);
        assert!(status["no_task"].as_u64() >= Some(1), "node {n}: {status}");
    }

    // 9300 moves to node 1's address: it closes on every node, and only node 1 listens on the
    // new port and reaches the task on node 2 too, which no other publish answers through.
    c.node(2).cli_ok(&[
        "service",
        "update",
        "api",
        "--publish-rm",
        "9300",
        "--publish-add",
        &format!("{}:9302:80,proxy=v2", node_addr(1)),
    ]);
    for n in 1..=NODES {
        let mut lines = Vec::new();
        let closed = wait_until(PING_WAIT, || {
            lines = ask(&c, &client, &node_addr(n), 9300, 1);
            lines == ["refused"]
        });
        assert!(
            closed,
            "node {n}: 9300 closed after --publish-rm: {lines:?}"
        );
        let listening = c.exec_ok(&c.node(n).netns, &["ss", "-Htln", "sport = :9300"]);
        assert!(listening.trim().is_empty(), "node {n}: {listening}");
    }
    let mut lines = Vec::new();
    let open = wait_until(PING_WAIT, || {
        lines = ask(&c, &client, &node_addr(1), 9302, 1);
        lines.len() == 1 && lines[0].starts_with('t')
    });
    assert!(open, "node 1 answers on its address: {lines:?}");
    // Node 2 holds no port now, yet its task's replies to node 1 go back through the mesh.
    let mut mesh = serde_json::Value::Null;
    let replies = wait_until(PING_WAIT, || {
        mesh = c.node(2).json(&["status"])["mesh"].clone();
        let ports = mesh["ports"].as_array().cloned().unwrap_or_default();
        mesh["hooks"] == 2 && ports.iter().all(|p| p["service"] != "api")
    });
    assert!(replies, "node 2 keeps the reply hooks only: {mesh}");
    all_tasks_read_the_client(&c, &client, &node_addr(1), 9302);
    assert_eq!(ask(&c, &client, &node_addr(2), 9302, 1), ["refused"]);
}
