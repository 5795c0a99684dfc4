//! No container (and no host behind an external VTEP) can take another container's address or
//! MAC: forged ARP and source MACs, sent raw from inside an attacker's namespace, change neither
//! a victim's neighbour entry nor the bridge's table, and traffic keeps reaching the real owner.
//! Needs root (CI runs as root) and python3 (the raw sender).

mod netns;

use std::thread;
use std::time::Duration;

use netns::{Attachment, Cluster, PING_WAIT, wait_for, wait_until};
use serde_json::Value;

/// Sends one Ethernet frame, given in hex, COUNT times INTERVAL seconds apart out of IFACE.
/// argv: IFACE HEX COUNT INTERVAL.
const RAW_SENDER: &str = r#"
import socket, sys, time
iface, frame, count, interval = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((iface, 0))
for i in range(count):
    s.send(frame)
    time.sleep(interval)
"#;

/// Sends one datagram, given in hex, COUNT times to DST:4789 (VXLAN), INTERVAL seconds apart.
/// argv: DST HEX COUNT INTERVAL.
const UDP_SENDER: &str = r#"
import socket, sys, time
dst, payload, count, interval = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(count):
    s.sendto(payload, (dst, 4789))
    time.sleep(interval)
"#;

fn mac_bytes(mac: &str) -> [u8; 6] {
    let mut out = [0u8; 6];
    for (o, part) in out.iter_mut().zip(mac.split(':')) {
        *o = u8::from_str_radix(part, 16).unwrap_or_else(|e| panic!("MAC {mac}: {e}"));
    }
    out
}

fn ip_bytes(ip: &str) -> [u8; 4] {
    ip.parse::<std::net::Ipv4Addr>()
        .unwrap_or_else(|e| panic!("IP {ip}: {e}"))
        .octets()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An Ethernet/IPv4 ARP frame (RFC 826).
fn arp_frame(
    dst: [u8; 6],
    src: [u8; 6],
    op: u16,
    sender: ([u8; 6], [u8; 4]),
    target: ([u8; 6], [u8; 4]),
) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sender.0);
    f.extend_from_slice(&sender.1);
    f.extend_from_slice(&target.0);
    f.extend_from_slice(&target.1);
    f.resize(60, 0);
    f
}

/// `attacker` tells `victim` (unicast reply) that `claimed`'s IP is at the attacker's MAC.
fn unicast_reply(attacker: &Attachment, victim: &Attachment, claimed: &Attachment) -> Vec<u8> {
    let a = mac_bytes(&attacker.mac);
    let v = mac_bytes(&victim.mac);
    arp_frame(
        v,
        a,
        2,
        (a, ip_bytes(&claimed.ip)),
        (v, ip_bytes(&victim.ip)),
    )
}

/// `attacker` announces to everyone (gratuitous ARP) that `claimed`'s IP is at its MAC.
fn gratuitous(attacker: &Attachment, claimed: &Attachment) -> Vec<u8> {
    let a = mac_bytes(&attacker.mac);
    let ip = ip_bytes(&claimed.ip);
    arp_frame([0xff; 6], a, 1, (a, ip), ([0; 6], ip))
}

/// A broadcast frame from source MAC `src`, of an ethertype that is not IPv4, IPv6 or ARP: with
/// bridge netfilter loaded, the bridge drops a malformed frame of those before learning from it,
/// and this one is meant to be learned.
fn broadcast_from(src: &str) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac_bytes(src));
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.resize(60, 0);
    frame
}

/// The MAC `netns` has for `ip` on eth0, if any.
fn neighbour(c: &Cluster, netns: &str, ip: &str) -> Option<String> {
    let out = c.exec_ok(netns, &["ip", "-j", "neigh", "show", ip, "dev", "eth0"]);
    let v: Value = serde_json::from_str(&out).ok()?;
    v.get(0)?["lladdr"].as_str().map(str::to_owned)
}

/// Sends `frame` 3 times from `netns`'s eth0, raw.
fn send_raw(c: &Cluster, netns: &str, frame: &[u8]) {
    c.exec_ok(
        netns,
        &["python3", "-c", RAW_SENDER, "eth0", &hex(frame), "3", "0.1"],
    );
}

/// Lets `victim` resolve and reach `owner` afresh (so it holds a neighbour entry for it, whatever
/// an earlier case did), waits out the kernel's neighbour lock time (1 s, during which even a
/// genuine update is ignored), then runs `attack`; `Err` unless the victim still maps the
/// owner's IP to the MAC overlayd answers for it and reaches it: the owner's own, or for an
/// owner on the victim's node its proxy MAC (the owner's with bit 0x04 of the first octet
/// flipped), which overlayd turns back into the owner's on the way.
/// `aa:bb:..` with bit 0x04 of the first octet flipped.
fn proxy_mac(mac: &str) -> String {
    let first = u8::from_str_radix(&mac[..2], 16).expect("a MAC") ^ 0x04;
    format!("{first:02x}{}", &mac[2..])
}

fn attack_fails(
    c: &Cluster,
    what: &str,
    victim: &Attachment,
    owner: &Attachment,
    attack: impl FnOnce(),
) -> Result<(), String> {
    c.exec_ok(&victim.netns, &["ip", "neigh", "flush", "to", &owner.ip]);
    if !wait_until(PING_WAIT, || c.ping_once(&victim.netns, &owner.ip)) {
        return Err(format!(
            "{what}: the victim did not reach {} before",
            owner.ip
        ));
    }
    thread::sleep(Duration::from_millis(1200));
    attack();
    thread::sleep(Duration::from_millis(300));
    let seen = neighbour(c, &victim.netns, &owner.ip);
    let answered = if victim.node == owner.node {
        proxy_mac(&owner.mac)
    } else {
        owner.mac.clone()
    };
    if seen.as_deref() != Some(answered.as_str()) {
        return Err(format!(
            "{what}: the victim maps {} to {seen:?}, not the owner's {answered}",
            owner.ip
        ));
    }
    if !c.ping_once(&victim.netns, &owner.ip) {
        return Err(format!("{what}: the victim no longer reaches {}", owner.ip));
    }
    Ok(())
}

/// The port (`dev`) the bridge of `vni` on `node_netns` sends `mac` to, if it has an entry.
fn fdb_port(c: &Cluster, node_netns: &str, vni: u32, mac: &str) -> Option<String> {
    let br = format!("ovbr-{vni}");
    let out = c.exec_ok(node_netns, &["bridge", "-j", "fdb", "show", "br", &br]);
    let v: Value = serde_json::from_str(&out).ok()?;
    v.as_array()?
        .iter()
        .find(|e| e["mac"] == mac && e["master"] == br.as_str())
        .and_then(|e| e["ifname"].as_str().map(str::to_owned))
}

#[test]
fn forged_arp_and_source_macs_take_no_address_same_node_or_cross_node() {
    let c = Cluster::new("hijack", 2);
    let (net, vni, external) = ("hj", 4400u32, "198.18.0.100");
    c.node(1).cli_ok(&[
        "network",
        "create",
        net,
        "--subnet",
        "198.19.40.0/24",
        "--vni",
        &vni.to_string(),
        "--vtep",
        external,
    ]);
    c.wait_network_everywhere(net);
    // Node 1: the victim, the owner of the claimed address, a same-node attacker.
    // Node 2: a cross-node attacker.
    let attach = |node, name: &str| {
        let ns = c.container(node, name);
        c.attach(node, &ns, net, &[])
    };
    let victim = attach(1, "victim");
    let owner = attach(1, "owner");
    let near = attach(1, "near");
    let far = attach(2, "far");
    for a in [&owner, &near, &far] {
        c.assert_ping(&victim.netns, &a.ip, PING_WAIT);
    }

    // Every case runs, and the failures are reported together.
    let mut failures = Vec::new();
    for attacker in [&near, &far] {
        let place = if attacker.node == victim.node {
            "same node"
        } else {
            "cross node"
        };
        let reply = unicast_reply(attacker, &victim, &owner);
        let garp = gratuitous(attacker, &owner);
        for (kind, frame) in [("unicast ARP reply", reply), ("gratuitous ARP", garp)] {
            let what = format!("{place}, {kind}");
            failures.extend(
                attack_fails(&c, &what, &victim, &owner, || {
                    send_raw(&c, &attacker.netns, &frame)
                })
                .err(),
            );
        }
    }

    // A host behind the external VTEP is not filtered by any port: overlayd's switch holds it
    // to the bindings, and counts the drop.
    let host = c.host("ext", external);
    let intruder = Attachment {
        netns: host.clone(),
        ip: "198.19.40.250".into(),
        mac: "02:00:c6:13:28:fa".into(),
        node: String::new(),
    };
    let spoofed_before = c.node(1).drops("arp-spoof");
    for (what, inner) in [
        (
            "external VTEP, unicast ARP reply",
            unicast_reply(&intruder, &victim, &owner),
        ),
        (
            "external VTEP, gratuitous ARP",
            gratuitous(&intruder, &owner),
        ),
    ] {
        let mut datagram = vec![0x08, 0, 0, 0];
        datagram.extend_from_slice(&(vni << 8).to_be_bytes());
        datagram.extend_from_slice(&inner);
        let node1 = c.node(1).addr.clone();
        let sent = attack_fails(&c, what, &victim, &owner, || {
            c.exec_ok(
                &host,
                &[
                    "python3",
                    "-c",
                    UDP_SENDER,
                    &node1,
                    &hex(&datagram),
                    "3",
                    "0.1",
                ],
            );
        });
        failures.extend(sent.err());
    }
    let spoofed = c.node(1).drops("arp-spoof") - spoofed_before;
    if spoofed < 6 {
        failures.push(format!(
            "node 1 counted {spoofed} arp-spoof drops, want >= 6"
        ));
    }

    // One frame with the victim's source MAC from the same-node attacker: the bridge keeps the
    // victim's MAC on the victim's port, and the owner still reaches the victim.
    let node1 = &c.node(1).netns;
    c.exec_ok(&owner.netns, &["ip", "neigh", "flush", "to", &victim.ip]);
    c.assert_ping(&owner.netns, &victim.ip, PING_WAIT);
    let port = fdb_port(&c, node1, vni, &victim.mac);
    assert!(port.is_some(), "no fdb entry for the victim {}", victim.mac);
    send_raw(&c, &near.netns, &broadcast_from(&victim.mac));
    thread::sleep(Duration::from_millis(200));
    let moved = fdb_port(&c, node1, vni, &victim.mac);
    if moved != port {
        failures.push(format!(
            "the victim's MAC moved in the bridge's table from {port:?} to {moved:?}"
        ));
    }
    if !c.ping_once(&owner.netns, &victim.ip) {
        failures.push("after the MAC spoof, the owner no longer reaches the victim".into());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `tc -s qdisc show dev DEV` on `node_netns`: whether a clsact qdisc is there, and what it dropped.
fn clsact_drops(c: &Cluster, node_netns: &str, dev: &str) -> Option<u64> {
    let out = c.exec_ok(node_netns, &["tc", "-s", "-j", "qdisc", "show", "dev", dev]);
    let v: Value = serde_json::from_str(&out).ok()?;
    v.as_array()?
        .iter()
        .find(|q| q["kind"] == "clsact")
        .map(|q| q["drops"].as_u64().unwrap_or(0))
}

#[test]
fn a_restart_puts_back_a_container_ports_filter_and_flags() {
    // Two nodes: the network comes back to the restarted one through the other's gossip.
    let c = Cluster::new("hjrestart", 2);
    let (net, vni) = ("hr", 4401u32);
    c.node(1).cli_ok(&[
        "network",
        "create",
        net,
        "--subnet",
        "198.19.41.0/24",
        "--vni",
        &vni.to_string(),
    ]);
    c.wait_network_everywhere(net);
    let spoofer = c.attach(1, &c.container(1, "spoofer"), net, &[]);
    let other = c.attach(1, &c.container(1, "other"), net, &[]);
    c.assert_ping(&spoofer.netns, &other.ip, PING_WAIT);
    let node = c.node(1).netns.clone();
    let port = fdb_port(&c, &node, vni, &spoofer.mac).expect("the spoofer's static fdb entry");
    let other_port = fdb_port(&c, &node, vni, &other.mac).expect("the other's static fdb entry");

    // Everything the port was given goes while the daemon runs (it is only applied at attach
    // and at start), then the daemon restarts.
    c.exec_ok(&node, &["tc", "qdisc", "del", "dev", &port, "clsact"]);
    c.exec_ok(
        &node,
        &["bridge", "fdb", "del", &spoofer.mac, "dev", &port, "master"],
    );
    c.exec_ok(
        &node,
        &[
            "ip",
            "link",
            "set",
            &port,
            "type",
            "bridge_slave",
            "learning",
            "on",
            "flood",
            "on",
        ],
    );
    assert_eq!(clsact_drops(&c, &node, &port), None, "the filter is gone");
    c.node(1).restart_daemon();
    wait_for(
        PING_WAIT,
        "the restarted daemon to put the filter back",
        || {
            clsact_drops(&c, &node, &port)
                .map(drop)
                .ok_or_else(|| "no clsact qdisc yet".to_owned())
        },
    );
    let flags = c.exec_ok(&node, &["bridge", "-d", "-j", "link", "show", "dev", &port]);
    let flags: Value = serde_json::from_str(&flags).expect("bridge -j link");
    assert_eq!(flags[0]["learning"], false, "learning on {port}: {flags}");
    assert_eq!(flags[0]["flood"], false, "flood on {port}: {flags}");
    assert_eq!(
        fdb_port(&c, &node, vni, &spoofer.mac).as_deref(),
        Some(port.as_str()),
        "the spoofer's static entry is back"
    );

    // And it works: a frame with the other's MAC is dropped (and counted) at the spoofer's port.
    send_raw(&c, &spoofer.netns, &broadcast_from(&other.mac));
    let drops = clsact_drops(&c, &node, &port).unwrap_or(0);
    assert!(drops >= 3, "{port} dropped {drops} frames, want >= 3");
    assert_eq!(fdb_port(&c, &node, vni, &other.mac), Some(other_port));
    c.assert_ping(&spoofer.netns, &other.ip, PING_WAIT);
}
