//! Hostile input at every port a node listens on, while legitimate traffic goes on: random
//! bytes, truncated headers, wrong VNIs and spoofed sources at the VXLAN port (from a stranger
//! and from a member's address), random and truncated frames at a container's gateway, random
//! and malformed DNS queries at the gateway's DNS server, and random bytes and malformed
//! packets at a service's published ports. Every daemon stays up, the drop counters rise, and
//! ping between containers, a VIP, a published port and a DNS lookup keep working during and
//! after. Needs root (CI runs as root).

mod netns;

use std::time::{Duration, Instant};

use netns::mesh::{RAW_SENDER, Spec, mesh_cluster_with};
use netns::{Bg, Cluster, PING_WAIT, node_addr, show, wait_until};
use serde_json::Value;

const ATTACKER: &str = "198.18.0.66";
const CLIENT: &str = "198.18.0.200";
/// Packets of each kind a sender sends; they are spread over a few seconds.
const SENT: &str = "3000";
/// How long legitimate traffic is checked while the senders run.
const DURING: Duration = Duration::from_secs(10);
/// How long the senders may take in all (they sleep 10 ms per 100 packets).
const SENDERS_WITHIN: Duration = Duration::from_secs(60);

/// Hostile traffic, argv: MODE DST COUNT [ARGS]; prints "sent COUNT MODE" when done. Each
/// packet picks one of the mode's kinds at random; 10 ms pause per 100 packets.
/// - `vxlan DST COUNT VNI`: UDP to DST:4789: random bytes, headers cut short, no I flag, an
///   unknown VNI, the right VNI with a truncated or garbage inner frame.
/// - `spoof DST COUNT VNI SRC`: the same from source address SRC (a member's), through a raw
///   socket: inner frames with foreign or multicast source MACs, ARP claiming the gateway.
/// - `frames GW_MAC COUNT GW_IP MY_IP`: Ethernet frames out of `eth0` (a container's), to the
///   gateway's MAC and to broadcast: random bytes, cut headers, truncated ARP, ARP claiming
///   the gateway's address, multicast sources, VLAN tags, and IPv4 and ICMP from the
///   container's own address to the gateway, cut short or with lying lengths.
/// - `dns DST COUNT`: UDP to DST:53: random bytes, cut headers, responses, lying counts,
///   compression loops, labels running past the end.
/// - `port DST COUNT PORT`: TCP connections to DST:PORT that send random bytes (a tenth of
///   COUNT) and random UDP datagrams to DST:PORT.
const HOSTILE: &str = r#"
import os, random, socket, struct, sys, time
mode, dst, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
rb = lambda lo, hi: os.urandom(random.randrange(lo, hi))
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16: t = (t & 0xffff) + (t >> 16)
    return ~t & 0xffff
def vx(flags, vni):
    return struct.pack("!B3xI", flags, (vni & 0xffffff) << 8)
def arp(op, smac, sip, tip):
    return (b"\xff" * 6 + smac + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, op)
            + smac + sip + b"\0" * 6 + tip)
def unicast_mac():
    return bytes([0x02]) + os.urandom(5)
def send_all(send, kinds):
    for i in range(count):
        try:
            send(random.choice(kinds)())
        except OSError:
            pass
        if i % 100 == 99:
            time.sleep(0.01)
if mode in ("vxlan", "spoof"):
    vni = int(sys.argv[4])
    gw = socket.inet_aton("198.19.6.1")
    kinds = [
        lambda: rb(0, 120),
        lambda: vx(0x08, vni)[:random.randrange(1, 8)],
        lambda: vx(0x00, vni) + rb(14, 80),
        lambda: vx(0x08, vni + random.randrange(1, 1000)) + rb(14, 80),
        lambda: vx(0x08, vni) + rb(0, 14),
        lambda: vx(0x08, vni) + b"\xff" * 6 + bytes([0x01]) + os.urandom(5) + rb(2, 60),
        lambda: vx(0x08, vni) + b"\xff" * 6 + unicast_mac() + rb(2, 60),
        lambda: vx(0x08, vni) + arp(2, unicast_mac(), gw, gw),
    ]
    if mode == "vxlan":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        send_all(lambda p: s.sendto(p, (dst, 4789)), kinds)
    else:
        src, dip = socket.inet_aton(sys.argv[5]), socket.inet_aton(dst)
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        def spoofed(p):
            udp = struct.pack("!HHHH", random.randrange(1024, 65536), 4789, 8 + len(p), 0) + p
            h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), random.getrandbits(16), 0, 64, 17, 0, src, dip)
            s.sendto(h[:10] + struct.pack("!H", csum(h)) + h[12:] + udp, (dst, 0))
        send_all(spoofed, kinds)
elif mode == "frames":
    gw_mac = bytes.fromhex(dst.replace(":", ""))
    gw_ip, my_ip = socket.inet_aton(sys.argv[4]), socket.inet_aton(sys.argv[5])
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind(("eth0", 0))
    me = s.getsockname()[4]
    def ipv4(proto, payload, cut=None, total=None):
        h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total or 20 + len(payload), 0, 0, 64, proto, 0, my_ip, gw_ip)
        h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
        return (h + payload)[:cut] if cut is not None else h + payload
    to = lambda: random.choice([gw_mac, b"\xff" * 6])
    kinds = [
        lambda: to() + me + rb(0, 100),
        lambda: (to() + me + b"\x08\x06")[:random.randrange(1, 14)],
        lambda: arp(1, me, os.urandom(4), gw_ip)[:random.randrange(14, 42)],
        lambda: arp(1, me, gw_ip, gw_ip),
        lambda: arp(2, me, gw_ip, os.urandom(4)),
        lambda: to() + bytes([0x01]) + os.urandom(5) + b"\x08\x06" + rb(0, 40),
        lambda: to() + me + b"\x08\x00" + ipv4(1, b"\x08\x00" + rb(0, 30), random.randrange(1, 40)),
        lambda: to() + me + b"\x08\x00" + ipv4(1, struct.pack("!BBH", 8, 0, random.getrandbits(16)) + rb(0, 60)),
        lambda: to() + me + b"\x08\x00" + ipv4(1, b"\x08\x00" + rb(0, 30), total=random.randrange(0, 1500)),
        lambda: to() + me + b"\x08\x00" + ipv4(random.choice([6, 17]), rb(0, 30)),
        lambda: to() + me + b"\x81\x00" + rb(0, 60),
    ]
    send_all(s.send, kinds)
elif mode == "dns":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    hdr = lambda flags, qd, an=0: struct.pack("!HHHHHH", random.getrandbits(16), flags, qd, an, 0, 0)
    kinds = [
        lambda: rb(0, 200),
        lambda: rb(0, 12),
        lambda: hdr(0x8180, 1) + b"\x06search\x00\x00\x01\x00\x01",
        lambda: hdr(0x0100, 65535),
        lambda: hdr(0x0100, 1) + b"\xc0\x0c\x00\x01\x00\x01",
        lambda: hdr(0x0100, 1) + b"\x3f" + rb(0, 20),
        lambda: hdr(0x0100, 1) + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01",
        lambda: hdr(0x0100, 1, 3) + b"\x06search\x00\x00\x01\x00\x01" + rb(0, 40),
        lambda: hdr(random.getrandbits(16) & 0x7fff, random.randrange(4)) + rb(0, 60),
    ]
    send_all(lambda p: s.sendto(p, (dst, 53)), kinds)
elif mode == "port":
    port = int(sys.argv[4])
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    def send(kind):
        if kind == "tcp":
            c = socket.create_connection((dst, port), timeout=2)
            c.sendall(rb(1, 3000))
            c.close()
        else:
            u.sendto(rb(0, 1400), (dst, port))
    send_all(send, [lambda: "udp"] * 9 + [lambda: "tcp"])
else:
    sys.exit("unknown mode " + mode)
print("sent", count, mode, flush=True)
"#;

fn counter(v: &Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or(0)
}

/// The legitimate traffic: a ping from `p1` (node 1) to `p2` (node 2), `search` through its VIP
/// from `p1`, through the published port on node 2 from the underlay client, and a DNS lookup
/// of `search` from `p1`. Returns what failed.
fn legitimate(c: &Cluster, p1: &str, p2_ip: &str, vip: &str, client: &str) -> Vec<String> {
    let mut failed = Vec::new();
    // Three tries a second apart: one echo lost among thousands of hostile frames is no failure.
    let ping = c.exec(
        p1,
        &["ping", "-c", "3", "-i", "0.2", "-W", "1", "-q", p2_ip],
    );
    if !ping.status.success() {
        failed.push(format!("ping {p2_ip}: {}", show(&ping)));
    }
    for (from, url) in [
        (p1, format!("http://{vip}/")),
        (client, format!("http://{}:9200/", node_addr(2))),
    ] {
        let out = c.exec(from, &["curl", "-sS", "--max-time", "3", &url]);
        if !out.status.success() || out.stdout.is_empty() {
            failed.push(format!("curl {url} from {from}: {}", show(&out)));
        }
    }
    let dns = c.exec(p1, &["getent", "hosts", "search"]);
    if !String::from_utf8_lossy(&dns.stdout).contains(vip) {
        failed.push(format!("getent hosts search: {}", show(&dns)));
    }
    failed
}

/// What the filters on node `n`'s container ports dropped (`tc -s qdisc show`, clsact on each
/// port of the network's bridge but its TAP).
fn port_filter_drops(c: &Cluster, n: usize) -> u64 {
    let node = &c.node(n).netns;
    let bridge_ports = c.exec_ok(node, &["ip", "-j", "link", "show", "type", "veth"]);
    let ports: Value = serde_json::from_str(&bridge_ports).expect("ip -j link");
    ports
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["master"].as_str().is_some_and(|m| m.starts_with("ovbr-")))
        .filter_map(|l| l["ifname"].as_str())
        .map(|dev| {
            let out = c.exec_ok(node, &["tc", "-s", "-j", "qdisc", "show", "dev", dev]);
            let qdiscs: Value = serde_json::from_str(&out).expect("tc -j qdisc");
            qdiscs
                .as_array()
                .into_iter()
                .flatten()
                .filter(|q| q["kind"] == "clsact")
                .map(|q| q["drops"].as_u64().unwrap_or(0))
                .sum::<u64>()
        })
        .sum()
}

#[test]
fn hostile_input_at_every_port_is_dropped_and_counted_while_traffic_flows() {
    // Tasks on nodes 1 and 2 only: node 3's one container is the hostile one, so that the frames
    // it broadcasts (ARP claiming the gateway among them) reach no other container through its
    // node's bridge; what overlayd must stop is such frames reaching other nodes.
    let spec = Spec {
        tasks: &[1, 2],
        ..Spec::default()
    };
    let (c, _servers) = mesh_cluster_with("hostile", &spec);
    let network = c.node(1).network("app").unwrap().expect("network app");
    let vni = network["vni"].as_u64().expect("vni").to_string();
    let vip = c.node(1).json(&["service", "ls"])[0]["vip"]
        .as_str()
        .expect("search has a VIP")
        .to_string();
    let p1 = c.container(1, "p1");
    let p2 = c.container(2, "p2");
    let evil = c.container(3, "evil");
    c.attach(1, &p1, "app", &[]);
    let p2_ip = c.attach(2, &p2, "app", &[]).ip;
    let evil_ip = c.attach(3, &evil, "app", &[]).ip;
    let attacker = c.host("attacker", ATTACKER);
    let client = c.host("client", CLIENT);
    c.assert_ping(&p1, &p2_ip, PING_WAIT);
    let gateway = c
        .default_gateway(&evil)
        .expect("evil has a default gateway");
    c.assert_ping(&evil, &gateway, PING_WAIT);
    let neigh = c.exec_ok(&evil, &["ip", "-j", "neigh", "show", &gateway]);
    let gateway_mac = serde_json::from_str::<Value>(&neigh).expect("ip -j neigh")[0]["lladdr"]
        .as_str()
        .expect("the gateway's MAC is known after a ping")
        .to_string();
    let node1_mac = {
        let out = c.exec_ok(&c.node(1).netns, &["ip", "-j", "link", "show", "eth0"]);
        serde_json::from_str::<Value>(&out).expect("ip -j link")[0]["address"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let failed = legitimate(&c, &p1, &p2_ip, &vip, &client);
    assert!(failed.is_empty(), "before: {failed:#?}");
    let status = |n: usize| c.node(n).json(&["status"]);
    let before: Vec<Value> = (1..=3).map(status).collect();
    let filtered_before = port_filter_drops(&c, 3);

    let hostile = |from: &str, args: &[&str]| {
        let mut argv = vec!["python3", "-c", HOSTILE];
        argv.extend_from_slice(args);
        c.spawn(from, &argv)
    };
    let (n1, n2) = (node_addr(1), node_addr(2));
    let senders: Vec<Bg> = vec![
        // The VXLAN port: from a stranger, from a member, and from a member's address spoofed.
        hostile(&attacker, &["vxlan", &n1, SENT, &vni]),
        hostile(&c.node(3).netns, &["vxlan", &n1, SENT, &vni]),
        hostile(&attacker, &["spoof", &n1, SENT, &vni, &n2]),
        // The gateway, and the DNS server on it.
        hostile(&evil, &["frames", &gateway_mac, SENT, &gateway, &evil_ip]),
        hostile(&evil, &["dns", &gateway, SENT]),
        // The published ports: random bytes, and malformed packets below them.
        hostile(&attacker, &["port", &n1, SENT, "9200"]),
        c.spawn(
            &attacker,
            &[
                "python3", "-c", RAW_SENDER, &node1_mac, &n1, "9200", "garbage", SENT,
            ],
        ),
    ];
    let started = Instant::now();
    let mut rounds = 0;
    let mut failed_during = Vec::new();
    while started.elapsed() < DURING {
        failed_during.extend(legitimate(&c, &p1, &p2_ip, &vip, &client));
        rounds += 1;
    }
    let log = |bg: &Bg| std::fs::read_to_string(&bg.log).unwrap_or_default();
    let finished = wait_until(SENDERS_WITHIN, || {
        senders.iter().all(|s| log(s).contains("sent"))
    });
    let logs: Vec<String> = senders.iter().map(|s| log(s).trim().to_string()).collect();
    println!(
        "hostile senders ({:.1} s): {logs:#?}",
        started.elapsed().as_secs_f64()
    );
    assert!(finished, "senders did not finish within {SENDERS_WITHIN:?}");
    for n in 1..=3 {
        assert!(c.node(n).daemon_alive(), "node {n}'s daemon died");
    }
    let failed_after = legitimate(&c, &p1, &p2_ip, &vip, &client);
    println!("{rounds} rounds of legitimate traffic during the attack");
    assert!(
        failed_during.is_empty() && failed_after.is_empty(),
        "legitimate traffic failed; during: {failed_during:#?}\nafter: {failed_after:#?}"
    );

    let after: Vec<Value> = (1..=3).map(status).collect();
    let rose = |n: usize, path: &[&str]| {
        let (b, a) = (counter(&before[n - 1], path), counter(&after[n - 1], path));
        println!("node {n} {}: {b} -> {a}", path.join("."));
        a > b
    };
    let mut still = Vec::new();
    let mut expect = |n: usize, path: &[&str]| {
        if !rose(n, path) {
            still.push(format!("node {n} {}", path.join(".")));
        }
    };
    // Node 1 took the VXLAN and the published-port traffic, node 3 the frames and queries of
    // its container. A container's frames that are not its own (another source MAC or address,
    // a VLAN tag, broken ARP) never reach overlayd: the filter on its bridge port drops them.
    for reason in [
        "short",
        "no-i-flag",
        "unknown-vni",
        "not-member",
        "foreign-source",
    ] {
        expect(1, &["dataplane", "drops", reason]);
    }
    expect(1, &["dataplane", "balancer", "dropped"]);
    for reason in ["short", "response"] {
        expect(3, &["dns", "dropped", reason]);
    }
    expect(3, &["dns", "answered"]);
    let filtered_after = port_filter_drops(&c, 3);
    println!("node 3 port filter drops: {filtered_before} -> {filtered_after}");
    if filtered_after <= filtered_before {
        still.push("node 3 port filter drops".to_string());
    }
    assert!(
        still.is_empty(),
        "counters that did not rise: {still:#?}\nnode 1 after: {:#}\nnode 3 after: {:#}",
        after[0],
        after[2]
    );
}
