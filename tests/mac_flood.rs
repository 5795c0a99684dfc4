//! A flood of random source MACs neither raises what a frame costs the daemon nor fills a
//! table: from a host behind an external VTEP (whose MACs overlayd learns, within a bound, with
//! O(1) eviction), and from a container (whose bridge port learns nothing). The overlay keeps
//! working. Needs root (CI runs as root) and python3 (the senders).

mod netns;

use std::fs;
use std::time::{Duration, Instant};

use netns::{Cluster, PING_WAIT};
use serde_json::Value;

const FRAMES: u32 = 20_000;

/// Sends COUNT VXLAN datagrams (VNI) to DST:4789, each carrying a 60-byte frame to an unknown
/// unicast MAC from either one fixed source MAC or a random one per frame, paced in bursts of
/// 50 so the daemon's socket buffer does not overflow. argv: DST VNI COUNT fixed|random.
const VXLAN_FLOOD: &str = r#"
import os, socket, struct, sys, time
dst, vni, count, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
header = struct.pack("!B3xI", 0x08, vni << 8)
to = bytes.fromhex("020000000001")
fixed = bytes.fromhex("0201000000aa")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(count):
    src = fixed if mode == "fixed" else b"\x02\x01" + os.urandom(4)
    s.sendto(header + (to + src + b"\x88\xb5").ljust(60, b"\x00"), (dst, 4789))
    if i % 50 == 49:
        time.sleep(0.001)
"#;

/// Sends COUNT broadcast frames out of eth0, each from a random source MAC. argv: COUNT.
const RAW_FLOOD: &str = r#"
import os, socket, sys, time
count = int(sys.argv[1])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for i in range(count):
    s.send((b"\xff" * 6 + b"\x02\x01" + os.urandom(4) + b"\x88\xb5").ljust(60, b"\x00"))
    if i % 50 == 49:
        time.sleep(0.001)
"#;

/// User plus system CPU time of process `pid` (all its threads), from /proc/PID/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading the daemon's stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // Ticks per second (USER_HZ), as the kernel reports them.
    let hz: u64 = String::from_utf8(
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .expect("getconf CLK_TCK")
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

fn rx_vxlan(c: &Cluster) -> u64 {
    c.node(1).json(&["status"])["dataplane"]["rx_vxlan"]
        .as_u64()
        .unwrap_or(0)
}

/// Entries of `br` on `node_netns` that the bridge learned (neither static nor permanent).
fn learned_fdb_entries(c: &Cluster, node_netns: &str, br: &str) -> usize {
    let out = c.exec_ok(node_netns, &["bridge", "-j", "fdb", "show", "br", br]);
    let v: Value = serde_json::from_str(&out).expect("bridge -j fdb show");
    v.as_array()
        .expect("fdb is a JSON array")
        .iter()
        .filter(|e| e["master"] == br)
        .filter(|e| !matches!(e["state"].as_str(), Some("static" | "permanent")))
        .count()
}

#[test]
fn a_flood_of_random_source_macs_costs_flat_and_fills_no_table() {
    let c = Cluster::new("macflood", 2);
    let (net, vni, external) = ("fl", 4500u32, "198.18.0.100");
    c.node(1).cli_ok(&[
        "network",
        "create",
        net,
        "--subnet",
        "198.19.50.0/24",
        "--vni",
        &vni.to_string(),
        "--vtep",
        external,
    ]);
    c.wait_network_everywhere(net);
    let c1 = c.container(1, "c1");
    let c2 = c.container(2, "c2");
    let a1 = c.attach(1, &c1, net, &[]);
    let a2 = c.attach(2, &c2, net, &[]);
    c.assert_ping(&c1, &a2.ip, PING_WAIT);
    let pid = c.node(1).daemon_pid().expect("node 1's daemon runs");
    let host = c.host("ext", external);
    let node1 = c.node(1).addr.clone();

    // The cost of one decapsulated frame in daemon CPU time, over FRAMES sent.
    let cost_per_frame = |mode: &str| {
        let (cpu0, rx0, t0) = (cpu_time(pid), rx_vxlan(&c), Instant::now());
        c.exec_ok(
            &host,
            &[
                "python3",
                "-c",
                VXLAN_FLOOD,
                &node1,
                &vni.to_string(),
                &FRAMES.to_string(),
                mode,
            ],
        );
        // Let the daemon drain its socket.
        std::thread::sleep(Duration::from_millis(300));
        let (cpu, rx) = (cpu_time(pid) - cpu0, rx_vxlan(&c) - rx0);
        assert!(
            rx >= u64::from(FRAMES) / 2,
            "{mode}: node 1 received only {rx} of {FRAMES} datagrams"
        );
        let per = cpu / u32::try_from(rx).unwrap();
        eprintln!(
            "{mode} source MACs: {rx} datagrams received in {:?}, daemon CPU {cpu:?}, {per:?} per frame",
            t0.elapsed()
        );
        per
    };
    // Warm up (the learned entry for the fixed MAC, caches), then measure.
    cost_per_frame("fixed");
    let fixed = cost_per_frame("fixed");
    let random = cost_per_frame("random");
    let ratio = random.as_secs_f64() / fixed.as_secs_f64().max(1e-9);
    eprintln!("random / fixed per-frame cost: {ratio:.2}");
    // Every check runs, and the failures are reported together.
    let mut failures = Vec::new();
    if ratio >= 3.0 {
        failures.push(format!(
            "random source MACs cost {random:?} per frame, fixed {fixed:?}: {ratio:.2}x"
        ));
    }

    // A container floods random source MACs: its port drops them, so the bridge learns none.
    let br = format!("ovbr-{vni}");
    let node1_ns = c.node(1).netns.clone();
    let cpu0 = cpu_time(pid);
    c.exec_ok(&c1, &["python3", "-c", RAW_FLOOD, &FRAMES.to_string()]);
    let learned = learned_fdb_entries(&c, &node1_ns, &br);
    eprintln!(
        "container flood of {FRAMES} frames: daemon CPU {:?}, bridge {br} learned {learned} entries",
        cpu_time(pid) - cpu0
    );
    if learned != 0 {
        failures.push(format!("bridge {br} learned {learned} entries"));
    }

    // Still working, both ways.
    c.assert_ping(&c1, &a2.ip, PING_WAIT);
    c.assert_ping(&c2, &a1.ip, PING_WAIT);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
