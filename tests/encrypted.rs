//! An encrypted network (`network create --encrypted`) on two nodes: containers ping and move
//! data; a capture on the underlay shows a marker a container sends on a plain network and
//! not the one it sends on the encrypted network; injected cleartext VXLAN for the encrypted
//! VNI, a forged (bit-flipped) and a replayed sealed datagram are each dropped and counted;
//! `network rotate-key` in the middle of a ping run loses nothing. Needs root (CI runs as
//! root) and tcpdump (`scripts/lib.sh` installs it).

mod netns;

use std::path::Path;
use std::time::Duration;

use netns::{Cluster, PING_WAIT, TCP_BYTES, TCP_PORT, VXLAN_SENDER};

/// 16 bytes each: `ping -p` repeats its pattern through the payload.
const PLAIN_MARKER: &[u8; 16] = b"PLAIN-MARKER-OVD";
const SEALED_MARKER: &[u8; 16] = b"SEALD-MARKER-OVD";
/// Datagrams sent of each hostile kind.
const SENT: u64 = 5;

/// Sends the datagram given in hex to `dst`:4789, `count` times.
const RAW_SENDER: &str = r#"
import socket, sys
dst, data, count = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    s.sendto(data, (dst, 4789))
"#;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The UDP payloads of a pcap file of Ethernet frames (IPv4, UDP) and their source addresses;
/// anything else is skipped.
fn udp_payloads(pcap: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let caplen = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().unwrap()) as usize;
        let Some(frame) = pcap.get(at + 16..at + 16 + caplen) else {
            break;
        };
        at += 16 + caplen;
        if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] || frame[23] != 17 {
            continue;
        }
        let udp = 14 + usize::from(frame[14] & 0x0f) * 4;
        if let Some(payload) = frame.get(udp + 8..) {
            let src = std::net::Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]);
            out.push((src.to_string(), payload.to_vec()));
        }
    }
    out
}

/// Bits per second received by an iperf3 server in `server` from a 3 s client in `client`.
fn iperf(c: &Cluster, client: &str, server: &str, to: &str) -> f64 {
    let _server = c.spawn(server, &["iperf3", "-s", "-1", "-p", "5201"]);
    let listening = netns::wait_until(Duration::from_secs(10), || {
        let out = c.exec(server, &["ss", "-Hltn", "sport = :5201"]);
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    });
    assert!(listening, "iperf3 server in {server} not listening");
    let out = c.exec_ok(client, &["iperf3", "-c", to, "-p", "5201", "-t", "3", "-J"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 -J output");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("sum_received.bits_per_second")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn encrypted_network_seals_everything_refuses_the_rest_and_rotates_without_loss() {
    let c = Cluster::new("encr", 2);
    c.node(1).cli_ok(&[
        "network",
        "create",
        "plain",
        "--subnet",
        "198.19.20.0/24",
        "--vni",
        "4420",
    ]);
    let created = c.node(1).json(&[
        "network",
        "create",
        "sealed",
        "--subnet",
        "198.19.21.0/24",
        "--vni",
        "4421",
        "--encrypted",
    ]);
    assert_eq!(created["encrypted"], true, "{created}");
    assert_eq!(
        created["mtu"],
        1500 - 50 - 24,
        "sealing costs 24 bytes: {created}"
    );
    c.wait_network_everywhere("plain");
    let listed = c.wait_network_everywhere("sealed");
    assert_eq!(listed["encrypted"], true, "{listed}");
    let plain = c.node(2).network("plain").unwrap().unwrap();
    assert_eq!(plain["encrypted"], false, "{plain}");

    let (p1, p2) = (c.container(1, "p1"), c.container(2, "p2"));
    let (s1, s2) = (c.container(1, "s1"), c.container(2, "s2"));
    c.attach(1, &p1, "plain", &[]);
    let ap2 = c.attach(2, &p2, "plain", &[]);
    let as1 = c.attach(1, &s1, "sealed", &[]);
    let as2 = c.attach(2, &s2, "sealed", &[]);
    c.assert_ping(&p1, &ap2.ip, PING_WAIT);
    c.assert_ping(&s1, &as2.ip, PING_WAIT);

    // Data both ways through the sealed path (TSO super-frames, when offloads are on).
    let _sink2 = c.tcp_server(&s2, TCP_PORT);
    let _sink1 = c.tcp_server(&s1, TCP_PORT);
    for sink in [&s1, &s2] {
        netns::wait_until(Duration::from_secs(5), || {
            c.exec(
                sink,
                &["sh", "-c", &format!("ss -ltn | grep -q :{TCP_PORT}")],
            )
            .status
            .success()
        });
    }
    c.assert_tcp(&s1, &as2.ip, TCP_PORT, 4 * TCP_BYTES);

    // Throughput, plain against encrypted (printed; the ratio is for the report, not asserted).
    let plain_bps = iperf(&c, &p1, &p2, &ap2.ip);
    let sealed_bps = iperf(&c, &s1, &s2, &as2.ip);
    eprintln!(
        "iperf3 3 s, one stream: plain {:.2} Gbit/s, encrypted {:.2} Gbit/s ({:.2}x)",
        plain_bps / 1e9,
        sealed_bps / 1e9,
        sealed_bps / plain_bps
    );
    assert!(sealed_bps > 0.0);
    // Legitimate traffic lost nothing to the checks.
    for i in [1, 2] {
        for reason in ["cleartext", "forged", "no-key", "replay"] {
            assert_eq!(
                c.node(i).drops(reason),
                0,
                "node {i}: {reason} drops of legitimate traffic"
            );
        }
    }

    // A capture on node 2's underlay: markers pinged on both networks.
    let pcap = c.dir.join("underlay.pcap");
    let pcap_arg = pcap.to_str().unwrap();
    let mut dump = c.spawn(
        &c.node(2).netns,
        &[
            "tcpdump",
            "--immediate-mode",
            "-i",
            "eth0",
            "-U",
            "-n",
            "-Z",
            "root",
            "-w",
            pcap_arg,
            "udp",
            "port",
            "4789",
        ],
    );
    let started = netns::wait_until(Duration::from_secs(10), || {
        Path::new(&pcap).metadata().is_ok_and(|m| m.len() >= 24)
    });
    assert!(started, "tcpdump did not start writing {pcap_arg}");
    // tcpdump writes the file header before it has opened the interface.
    std::thread::sleep(Duration::from_millis(500));
    for (from, to, marker) in [(&p1, &ap2.ip, PLAIN_MARKER), (&s1, &as2.ip, SEALED_MARKER)] {
        let pattern = hex(marker);
        let out = c.exec(
            from,
            &[
                "ping", "-c", "3", "-i", "0.2", "-s", "200", "-p", &pattern, to,
            ],
        );
        assert!(
            out.status.success(),
            "ping {from} -> {to}: {}",
            netns::show(&out)
        );
    }
    // SIGINT: tcpdump writes out what it holds and exits.
    std::thread::sleep(Duration::from_millis(500));
    netns::sh(&["kill", "-INT", &dump.pid().to_string()]);
    let stopped = netns::wait_until(Duration::from_secs(5), || !dump.alive());
    assert!(stopped, "tcpdump did not stop on SIGINT");
    drop(dump);
    let captured = std::fs::read(&pcap).unwrap();
    let payloads = udp_payloads(&captured);
    assert!(
        payloads.iter().any(|(_, p)| contains(p, PLAIN_MARKER)),
        "the control failed: the plain network's marker is not in the capture ({} datagrams)",
        payloads.len()
    );
    assert!(
        !contains(&captured, SEALED_MARKER),
        "the encrypted network's marker is visible on the underlay"
    );
    // Node 1's sealed datagrams (its 3 echo requests at least): S flag, VNI 4421.
    let node1 = c.node(1).addr.clone();
    let sealed: Vec<&Vec<u8>> = payloads
        .iter()
        .filter(|(src, p)| {
            *src == node1 && p.len() > 32 && p[0] == 0x02 && p[4..7] == [0, 0x11, 0x45]
        })
        .map(|(_, p)| p)
        .collect();
    assert!(
        sealed.len() >= 3,
        "only {} sealed datagrams captured of {}",
        sealed.len(),
        payloads.len()
    );
    assert!(
        payloads
            .iter()
            .all(|(_, p)| !(p[0] & 0x08 != 0 && p.get(4..7) == Some(&[0, 0x11, 0x45][..]))),
        "a plain VXLAN datagram of the encrypted network was sent"
    );

    // Hostile datagrams from node 1's address (a member: only the sealing stops them).
    let target = c.node(2);
    let original = sealed.last().unwrap();
    // A bit flipped in the ciphertext, and the counter's top bit set (no sender gets there
    // before 2262): the same counter would be refused as a replay before its tag is checked.
    let mut forged = original.to_vec();
    let middle = forged.len() / 2;
    forged[middle] ^= 0x01;
    assert_eq!(forged[8] & 0x80, 0);
    forged[8] |= 0x80;
    let (forged, original) = (hex(&forged), hex(original));
    let mut failures = Vec::new();
    let cases: [(&str, Vec<&str>); 3] = [
        (
            "cleartext",
            vec![VXLAN_SENDER, &target.addr, "good", "5", "4421"],
        ),
        ("forged", vec![RAW_SENDER, &target.addr, &forged, "5"]),
        ("replay", vec![RAW_SENDER, &target.addr, &original, "5"]),
    ];
    for (reason, args) in &cases {
        let before = target.drops(reason);
        let mut cmd = vec!["python3", "-c"];
        cmd.extend(args.iter().copied());
        c.exec_ok(&c.node(1).netns, &cmd);
        let counted = netns::wait_until(Duration::from_secs(10), || {
            target.drops(reason) >= before + SENT
        });
        eprintln!(
            "{reason}: drops went {before} -> {} for {SENT} sent from {node1}",
            target.drops(reason)
        );
        if !counted {
            failures.push(format!(
                "{SENT} {reason} datagrams: drops[\"{reason}\"] went {before} -> {}; dataplane: {}",
                target.drops(reason),
                target.json(&["status"])["dataplane"]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "drop counters:\n{}",
        failures.join("\n")
    );
    assert!(target.daemon_alive());
    c.assert_ping(&s2, &as1.ip, PING_WAIT);

    // Rotation in the middle of a ping run: not one lost.
    let (out, rotated) = std::thread::scope(|s| {
        let pinger = s.spawn(|| {
            let out = c.exec(&s1, &["ping", "-c", "80", "-i", "0.05", "-W", "1", &as2.ip]);
            netns::show(&out)
        });
        std::thread::sleep(Duration::from_secs(1));
        let rotated = c.node(1).json(&["network", "rotate-key", "sealed"]);
        (pinger.join().unwrap(), rotated)
    });
    assert_eq!(rotated["key_epoch"], 1, "{rotated}");
    assert!(
        out.contains(" 0% packet loss"),
        "pings lost across the key rotation:\n{out}"
    );
    let epoch_on_2 = netns::wait_until(Duration::from_secs(10), || {
        c.node(2)
            .network("sealed")
            .ok()
            .flatten()
            .is_some_and(|n| n["key_epoch"] == 1)
    });
    assert!(epoch_on_2, "node 2 never saw key epoch 1");
    // The new keys carry data.
    c.assert_tcp(&s2, &as1.ip, TCP_PORT, TCP_BYTES);
    assert!(
        !c.node(1)
            .cli(&["network", "rotate-key", "plain"])
            .status
            .success()
    );
}
