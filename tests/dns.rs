//! DNS on the network's gateway, asked by real clients in containers on each of 3 nodes: a
//! service's name gives its VIP (vip mode) or its tasks (dnsrr), `tasks.NAME` its tasks,
//! containers resolve each other by netns name and alias across nodes, an unknown name gets
//! NXDOMAIN and a malformed query FORMERR. `getent hosts` is the resolver: run with
//! `ip netns exec`, it reads the /etc/netns/NETNS/resolv.conf that `attach` writes. Needs root.
//!
//! Only names are checked, not traffic to the VIP: the VIP's data path is tested elsewhere.

mod netns;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use netns::{Cluster, show, wait_for};

/// How long names may take to reach every node's DNS (gossip, then a reconcile round).
const DNS_WAIT: Duration = Duration::from_secs(15);

const SUBNET: &str = "198.19.5.0/24";
const GATEWAY: &str = "198.19.5.1";

/// One query to SERVER:53 from inside a container; prints `rcode N` and then each A record's
/// address, one a line. argv: SERVER name NAME (type A, class IN) | SERVER raw HEX (the bytes).
const DNS_CLIENT: &str = r#"
import socket, struct, sys
server, kind, arg = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "name":
    qname = b"".join(bytes([len(l)]) + l.encode() for l in arg.split(".")) + b"\0"
    q = struct.pack("!6H", 0x4242, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!2H", 1, 1)
else:
    q = bytes.fromhex(arg)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(q, (server, 53))
r, _ = s.recvfrom(4096)
if r[:2] != q[:2]:
    sys.exit("reply id %r, query id %r" % (r[:2], q[:2]))
print("rcode", r[3] & 15)
def skip_name(i):
    while r[i] != 0 and r[i] < 0xc0:
        i += 1 + r[i]
    return i + (2 if r[i] >= 0xc0 else 1)
qd, an = struct.unpack("!2H", r[4:8])
i = 12
for _ in range(qd):
    i = skip_name(i) + 4
for _ in range(an):
    i = skip_name(i)
    rtype, _, _, rdlen = struct.unpack("!2HIH", r[i:i + 10])
    i += 10
    if rtype == 1:
        print(socket.inet_ntoa(r[i:i + rdlen]))
    i += rdlen
"#;

/// A header (id 0x4242, a standard query with one question), then a label that claims 5 bytes
/// and has 3: there is no question to read.
const MALFORMED: &str = concat!("424201000001000000000000", "05616263");

/// The addresses `getent hosts NAME` prints in `netns`, or Err with its output.
fn getent(c: &Cluster, netns: &str, name: &str) -> Result<BTreeSet<String>, String> {
    let out = c.exec(netns, &["getent", "hosts", name]);
    if !out.status.success() {
        return Err(format!("getent hosts {name} in {netns}: {}", show(&out)));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect())
}

/// (rcode, addresses) of one query with [`DNS_CLIENT`] from `netns` to the gateway.
fn ask(c: &Cluster, netns: &str, kind: &str, arg: &str) -> (u8, BTreeSet<String>) {
    let out = c.exec_ok(netns, &["python3", "-c", DNS_CLIENT, GATEWAY, kind, arg]);
    let mut lines = out.lines();
    let rcode = lines
        .next()
        .and_then(|l| l.strip_prefix("rcode "))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no rcode from the DNS client in {netns}: {out}"));
    (rcode, lines.map(String::from).collect())
}

fn set<S: AsRef<str>>(addrs: impl IntoIterator<Item = S>) -> BTreeSet<String> {
    addrs.into_iter().map(|a| a.as_ref().to_owned()).collect()
}

#[test]
fn containers_on_every_node_resolve_services_tasks_names_and_aliases_through_the_gateway() {
    let c = Cluster::new("dns", 3);
    c.node(1)
        .cli_ok(&["network", "create", "app", "--subnet", SUBNET]);
    c.wait_network_everywhere("app");
    c.node(2)
        .cli_ok(&["service", "create", "web", "--network", "app"]);
    c.node(3).cli_ok(&[
        "service",
        "create",
        "db",
        "--network",
        "app",
        "--mode",
        "dnsrr",
    ]);
    let services = c.node(1).json(&["service", "ls"]);
    let vip = services
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "web"))
        .and_then(|s| s["vip"].as_str())
        .unwrap_or_else(|| panic!("no VIP for web in {services}"))
        .to_owned();

    // On each node: a task of web and a client; db has tasks on nodes 1 and 2; the clients on
    // nodes 2 and 3 have aliases.
    let mut web_tasks = BTreeSet::new();
    let mut db_tasks = BTreeSet::new();
    let mut clients = vec![];
    for node in 1..=3 {
        let task = c.container(node, &format!("web{node}"));
        web_tasks.insert(c.attach(node, &task, "app", &["--service", "web"]).ip);
        if node < 3 {
            let task = c.container(node, &format!("db{node}"));
            db_tasks.insert(c.attach(node, &task, "app", &["--service", "db"]).ip);
        }
        let client = c.container(node, &format!("c{node}"));
        let aliases: &[&str] = match node {
            2 => &["--alias", "api"],
            3 => &["--alias", "cache", "--alias", "store"],
            _ => &[],
        };
        let ip = c.attach(node, &client, "app", aliases).ip;
        clients.push((client, ip));
    }
    let (c1, c2, c3) = (&clients[0], &clients[1], &clients[2]);

    // An alias that is not a name is refused with EX_USAGE, and nothing is plugged.
    let bad = c.container(1, "bad");
    let out = c
        .node(1)
        .cli(&["attach", &bad, "--network", "app", "--alias", "no/slash"]);
    assert_eq!(out.status.code(), Some(64), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--alias \"no/slash\""),
        "{}",
        show(&out)
    );
    assert_eq!(c.eth0(&bad), None, "a refused attach plugged {bad}");

    let resolv_conf = Path::new("/etc/netns").join(&c1.0).join("resolv.conf");
    let text = std::fs::read_to_string(&resolv_conf)
        .unwrap_or_else(|e| panic!("attach wrote no {}: {e}", resolv_conf.display()));
    assert!(
        text.lines().any(|l| l == format!("nameserver {GATEWAY}")),
        "{}: {text}",
        resolv_conf.display()
    );

    // Each client asks about the others' names: another node's container and its aliases.
    let wanted: Vec<(&str, BTreeSet<String>)> = vec![
        ("web", set([&vip])),
        ("tasks.web", web_tasks.clone()),
        ("db", db_tasks.clone()),
        ("tasks.db", db_tasks.clone()),
        (&c1.0, set([&c1.1])),
        (&c2.0, set([&c2.1])),
        ("api", set([&c2.1])),
        ("cache", set([&c3.1])),
        ("STORE", set([&c3.1])),
    ];
    for (client, _) in &clients {
        for (name, addrs) in &wanted {
            let got = wait_for(DNS_WAIT, &format!("{name} from {client}"), || {
                let got = getent(&c, client, name)?;
                if got == *addrs {
                    Ok(got)
                } else {
                    Err(format!("{got:?}, want {addrs:?}"))
                }
            });
            assert_eq!(got, *addrs);
        }
        let unknown = c.exec(client, &["getent", "hosts", "nosuchname"]);
        assert_eq!(
            unknown.status.code(),
            Some(2),
            "getent found an unknown name: {}",
            show(&unknown)
        );
        assert_eq!(
            ask(&c, client, "name", "nosuchname"),
            (3, set::<&str>([])),
            "NXDOMAIN for an unknown single-label name"
        );
        assert_eq!(
            ask(&c, client, "raw", MALFORMED).0,
            1,
            "FORMERR for a malformed query"
        );
        // The node namespaces have no route to any resolver: forwarding fails, SERVFAIL.
        assert_eq!(
            ask(&c, client, "name", "example.org").0,
            2,
            "SERVFAIL for an outside name without a reachable resolver"
        );
    }
    println!("resolved {} names from each of 3 nodes", wanted.len());

    for node in &c.nodes {
        let dns = &node.json(&["status"])["dns"];
        println!("node {} dns: {dns}", node.index);
        assert!(
            dns["answered"].as_u64().is_some_and(|n| n > 0),
            "node {}: {dns}",
            node.index
        );
        assert!(
            dns["servfail"].as_u64().is_some_and(|n| n > 0),
            "node {}: {dns}",
            node.index
        );
    }

    // Detaching the container's only network removes the resolv.conf overlayd wrote.
    c.node(1).cli_ok(&["detach", &c1.0, "--network", "app"]);
    assert!(
        !resolv_conf.exists(),
        "{} left after the last detach",
        resolv_conf.display()
    );
}
