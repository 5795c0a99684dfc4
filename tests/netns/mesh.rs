//! Routing-mesh fixtures shared by `tests/mesh.rs` and `tests/mesh_behaviour.rs`: a cluster
//! whose service publishes ports to tasks that answer with their name and the peer they see,
//! and clients that ask them.

use std::collections::BTreeSet;
use std::time::Duration;

use super::{Bg, Cluster, PING_WAIT, show, wait_until};

/// Connections per client and node: with 3 tasks, missing one in 30 picks has odds of 3e-5.
pub const REQUESTS: usize = 30;

/// Python that defines `serve(port, handle)`: accepts TCP connections on `port` for ever and
/// runs `handle(conn, peer)` in a thread of its own for each (so a client that connects and
/// never sends holds up no one else), then closes the connection. See [`tcp_server`].
const TCP_SERVE: &str = r#"
import socket, sys, threading
def serve(port, handle):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(256)
    while True:
        c, peer = s.accept()
        threading.Thread(target=served, args=(handle, c, peer), daemon=True).start()
def served(handle, c, peer):
    try:
        handle(c, peer)
    except OSError:
        pass
    finally:
        c.close()
"#;

/// A threaded TCP server script: `body` defines a handler and calls `serve(port, handler)`
/// (see [`TCP_SERVE`]).
pub fn tcp_server(body: &str) -> String {
    format!("{TCP_SERVE}{body}")
}

/// The [`tcp_server`] body of a server on port 80 that answers every connection with
/// "NAME PEER_IP" (NAME is argv[1]) and closes.
const WHO_TCP: &str = r#"
def who(c, peer):
    c.settimeout(20)
    c.recv(1024)
    c.sendall(("HTTP/1.0 200 OK\r\n\r\n%s %s\n" % (sys.argv[1], peer[0])).encode())
serve(80, who)
"#;

/// A UDP server on port 80 that answers every datagram with "NAME PEER_IP".
pub const WHO_UDP: &str = r#"
import socket, sys
name = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 80))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(("%s %s" % (name, peer[0])).encode(), peer)
"#;

/// Asks `argv[1]:argv[2]` over UDP `argv[3]` times, from a new socket each time, and prints
/// each answer on a line.
pub const ASK_UDP: &str = r#"
import socket, sys
for _ in range(int(sys.argv[3])):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(b"who", (sys.argv[1], int(sys.argv[2])))
    print(s.recvfrom(2048)[0].decode())
    s.close()
"#;

/// How a mesh cluster is built: 3 nodes, network `app` (198.19.6.0/24), service `search`
/// publishing `publish`, a task `tN` on each node N of `tasks` running [`WHO_TCP`] and
/// [`WHO_UDP`] (and `extra_server`, if any, with the task's name as its argument), and every
/// daemon started with `daemon_args`.
pub struct Spec<'a> {
    pub publish: &'a [&'a str],
    pub tasks: &'a [usize],
    pub daemon_args: &'a [&'a str],
    pub extra_server: Option<&'a str>,
}

impl Default for Spec<'_> {
    fn default() -> Self {
        Spec {
            publish: &["9200:80", "9200:80/udp"],
            tasks: &[1, 2, 3],
            daemon_args: &[],
            extra_server: None,
        }
    }
}

/// A 3-node cluster with service `search` publishing 9200 -> 80 (TCP and UDP), one task per
/// node (`t1`..`t3`) answering its name and the peer it sees.
pub fn mesh_cluster(name: &str) -> (Cluster, Vec<Bg>) {
    mesh_cluster_with(name, &Spec::default())
}

/// The cluster `spec` describes, once every node lists every task healthy and has had time to
/// hand the view to its balancer.
pub fn mesh_cluster_with(name: &str, spec: &Spec) -> (Cluster, Vec<Bg>) {
    let c = Cluster::with_daemon_args(name, 3, spec.daemon_args);
    c.node(1)
        .cli_ok(&["network", "create", "app", "--subnet", "198.19.6.0/24"]);
    c.wait_network_everywhere("app");
    let mut create = vec!["service", "create", "search", "--network", "app"];
    for p in spec.publish {
        create.extend(["--publish", p]);
    }
    c.node(2).cli_ok(&create);
    let mut servers = Vec::new();
    for &n in spec.tasks {
        let task = format!("t{n}");
        let ns = c.container(n, &task);
        c.attach(n, &ns, "app", &["--service", "search"]);
        servers.push(c.spawn(&ns, &["python3", "-c", &tcp_server(WHO_TCP), &task]));
        servers.push(c.spawn(&ns, &["python3", "-c", WHO_UDP, &task]));
        if let Some(script) = spec.extra_server {
            servers.push(c.spawn(&ns, &["python3", "-c", script, &task]));
        }
        c.wait_listening(&ns, false, 80);
        c.wait_listening(&ns, true, 80);
    }
    let want = spec.tasks.len() as u64;
    assert!(
        wait_until(PING_WAIT, || (1..=3).all(|n| {
            c.node(n)
                .try_json(&["service", "ls"])
                .is_ok_and(|v| v[0]["tasks_healthy"].as_u64() == Some(want))
        })),
        "every node lists {want} healthy tasks"
    );
    // The balancers take the view at their node's next reconcile round (250 ms), later on a
    // loaded machine.
    std::thread::sleep(Duration::from_millis(1500));
    (c, servers)
}

/// `(task, peer it saw)` of `REQUESTS` HTTP requests from `netns` to `url`; each must succeed.
pub fn curl(c: &Cluster, netns: &str, url: &str) -> BTreeSet<(String, String)> {
    (0..REQUESTS).map(|_| ask(c, netns, url, &[])).collect()
}

/// `(task, peer it saw)` of one HTTP request from `netns` to `url`, with curl options `extra`;
/// it must succeed.
pub fn ask(c: &Cluster, netns: &str, url: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec!["curl", "-sS", "--max-time", "3"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = c.exec(netns, &args);
    assert!(
        out.status.success(),
        "request from {netns} to {url} failed: {}\ndata planes: {:#?}",
        show(&out),
        c.nodes
            .iter()
            .filter(|n| n.daemon_alive())
            .map(|n| n.json(&["status"])["dataplane"].to_string())
            .collect::<Vec<_>>()
    );
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// `(task, peer)` of an answer "NAME PEER".
pub fn parse(answer: &str) -> (String, String) {
    let mut words = answer.split_whitespace();
    let task = words.next().unwrap_or_default().to_string();
    let peer = words.next().unwrap_or_default().to_string();
    (task, peer)
}

/// Asserts that the answers came from all of `t1`..`t3`, each having seen `peer`.
pub fn all_tasks_saw(answers: &BTreeSet<(String, String)>, peer: &str) {
    let tasks: BTreeSet<&str> = answers.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(tasks, BTreeSet::from(["t1", "t2", "t3"]), "{answers:?}");
    assert!(
        answers.iter().all(|(_, p)| p == peer),
        "every task saw {peer}: {answers:?}"
    );
}

/// Raw Ethernet frames from `eth0` to DST_MAC (argv[1]) and DST_IP (argv[2]), port argv[3]:
/// KIND (argv[4]) COUNT (argv[5]) times. KINDs: `garbage` (truncated and malformed IPv4/TCP/UDP
/// headers, lying lengths, fragments, random payloads), `syn` (SYNs from spoofed addresses in
/// 198.18.128.0/17, source ports in one shard of the balancer's table: port % 64 == 7), in
/// bursts of 100 every 20 ms.
pub const RAW_SENDER: &str = r#"
import os, random, socket, struct, sys, time
dst_mac = bytes.fromhex(sys.argv[1].replace(":", ""))
dst_ip = socket.inet_aton(sys.argv[2])
port, kind, count = int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
src_mac = s.getsockname()[4]
eth = dst_mac + src_mac + b"\x08\x00"
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16: t = (t & 0xffff) + (t >> 16)
    return ~t & 0xffff
def ip(src, proto, payload, ihl=5, total=None, frag=0):
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total if total is not None else 20 + len(payload),
                    random.getrandbits(16), frag, 64, proto, 0, src, dst_ip)
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + b"\0" * (4 * ihl - 20 if ihl > 5 else 0) + payload
def tcp(src, sport, flags, payload=b""):
    t = struct.pack("!HHIIBBHHH", sport, port, random.getrandbits(32), 0, 5 << 4, flags, 65535, 0, 0) + payload
    pseudo = src + dst_ip + struct.pack("!BBH", 0, 6, len(t))
    return t[:16] + struct.pack("!H", csum(pseudo + t)) + t[18:]
me = socket.inet_aton("198.18.0.66")
def garbage():
    sport = random.randrange(1024, 65536)
    ports = struct.pack("!HH", sport, port)
    pick = random.randrange(9)
    if pick == 0: return ip(me, 6, ports)                      # TCP cut after the ports
    if pick == 1: return ip(me, 6, tcp(me, sport, 0x02)[:13])  # TCP cut before its flags
    if pick == 2: return ip(me, 6, tcp(me, sport, 0x02), total=1400)  # IP length lies (long)
    if pick == 3: return ip(me, 6, tcp(me, sport, 0x18, os.urandom(40)), total=24)  # (short)
    if pick == 4: return ip(me, 17, struct.pack("!HHHH", sport, port, 900, 0) + os.urandom(8))  # UDP length lies
    if pick == 5: return ip(me, 6, tcp(me, sport, random.getrandbits(8), os.urandom(random.randrange(200))))  # any flags
    if pick == 6: return ip(me, 6, ports + os.urandom(30), frag=0x2000)  # first fragment
    if pick == 7: return ip(me, 6, ports + os.urandom(30), frag=5)  # later fragment
    return ip(me, 6, ports + os.urandom(16), ihl=random.choice([6, 15]))  # IP options
def syn():
    src = socket.inet_aton("198.18.%d.%d" % (random.randrange(128, 256), random.randrange(1, 255)))
    sport = random.randrange(1024 // 64, 65536 // 64) * 64 + 7
    return ip(src, 6, tcp(src, sport, 0x02))
make = {"garbage": garbage, "syn": syn}[kind]
start = time.time()
for i in range(count):
    s.send(eth + make())
    if i % 100 == 99:
        time.sleep(0.02)  # spread over a few seconds, so that legitimate clients meet it
print("sent", count, kind, "in %.1f s" % (time.time() - start), flush=True)
"#;
