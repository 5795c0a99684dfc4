//! The data plane's TAP offloads are what the run asked for: on by default, and all off when the
//! daemons run with `--no-offloads` (`scripts/test.sh` runs the netns suite a second time with
//! `OVERLAYD_NO_OFFLOADS` set, which the harness turns into that flag). Checked two ways, from the
//! daemon's own log line and from the kernel (`ethtool -k` on the TAP), and traffic flows either
//! way. Needs root (CI runs as root) and `ethtool`.

mod netns;

use std::time::Duration;

use netns::{Cluster, PING_WAIT, TCP_PORT, offloads_forced_off, wait_for};

const TCP_BYTES: usize = 8 << 20;

/// The `offload=0x..` flags (TUNSETOFFLOAD) of the `network added` line for `tap` in `log`.
fn logged_offload(log: &str, tap: &str) -> Option<u32> {
    let tap_field = format!("tap=\"{tap}\"");
    log.lines()
        .rev()
        .filter(|l| l.contains("network added") && l.contains(&tap_field))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("offload=0x"))
        })
        .find_map(|hex| u32::from_str_radix(hex, 16).ok())
}

/// `ethtool -k` features of `dev` in `netns` as (name, "on"/"off") pairs.
fn features(c: &Cluster, netns: &str, dev: &str) -> Vec<(String, String)> {
    c.exec_ok(netns, &["ethtool", "-k", dev])
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_owned(), v.split_whitespace().next()?.to_owned()))
        })
        .collect()
}

fn feature<'a>(f: &'a [(String, String)], name: &str) -> &'a str {
    f.iter()
        .find(|(k, _)| k == name)
        .map_or("absent", |(_, v)| v.as_str())
}

#[test]
fn tap_offloads_match_the_requested_mode_and_tcp_flows() {
    let off = offloads_forced_off();
    eprintln!(
        "offloads {} in this run",
        if off {
            "FORCED OFF (--no-offloads)"
        } else {
            "on (probed)"
        }
    );
    let c = Cluster::new("offl", 2);
    c.node(1)
        .cli_ok(&["network", "create", "offl", "--subnet", "198.19.30.0/24"]);
    let entry = c.wait_network_everywhere("offl");
    let vni = entry["vni"].as_u64().expect("network ls has a vni");
    let tap = format!("ovtap-{vni}");

    for node in &c.nodes {
        // The TAP is made just before its data plane logs it.
        let flags = wait_for(
            Duration::from_secs(5),
            &format!(
                "node {}: a `network added ... tap=\"{tap}\" ... offload=0x..` line in the log",
                node.index
            ),
            || logged_offload(&node.log_text(), &tap).ok_or_else(|| "not logged yet".to_string()),
        );
        let f = features(&c, &node.netns, &tap);
        let (csum, tso) = (
            feature(&f, "tx-checksumming"),
            feature(&f, "tcp-segmentation-offload"),
        );
        if off {
            assert_eq!(
                flags, 0,
                "node {}: --no-offloads, yet the daemon set TAP offloads {flags:#x}",
                node.index
            );
            assert_eq!(
                (csum, tso),
                ("off", "off"),
                "node {}: --no-offloads, yet the kernel shows {tap} with tx-checksumming {csum}, TSO {tso}",
                node.index
            );
        } else {
            assert_ne!(
                flags, 0,
                "node {}: offloads on, but the kernel accepted none on {tap}: this run does not \
                 exercise the fast path (run with OVERLAYD_NO_OFFLOADS=1 on such kernels)",
                node.index
            );
            assert_eq!(
                (csum, tso),
                ("on", "on"),
                "node {}: daemon logged offloads {flags:#x} but the kernel shows {tap} with \
                 tx-checksumming {csum}, TSO {tso}",
                node.index
            );
        }
    }

    let a = c.container(1, "a");
    let b = c.container(2, "b");
    let aa = c.attach(1, &a, "offl", &[]);
    let ab = c.attach(2, &b, "offl", &[]);
    // A container's TSO super-frames fit one UDP_SEGMENT send: 44 VXLAN datagrams of
    // 8 + 14 + 1450 bytes in 65507.
    let details = c.exec_ok(&a, &["ip", "-d", "link", "show", "eth0"]);
    assert!(
        details.contains("gso_max_segs 44 "),
        "container eth0 is not capped at 44 GSO segments:\n{details}"
    );
    c.assert_ping(&a, &ab.ip, PING_WAIT);
    c.assert_ping(&b, &aa.ip, PING_WAIT);
    let _sinks = [c.tcp_server(&a, TCP_PORT), c.tcp_server(&b, TCP_PORT)];
    c.assert_tcp(&a, &ab.ip, TCP_PORT, TCP_BYTES);
    c.assert_tcp(&b, &aa.ip, TCP_PORT, TCP_BYTES);
}
