//! overlayd with a real container runtime: two Docker containers started with `--network none`
//! on two nodes of a 2-node cluster are attached by overlayd (through their network namespace,
//! named with `ip netns attach NAME PID`) and reach each other with ping and a TCP transfer, run
//! with `docker exec` inside the containers.
//!
//! The image is built here from the host's `busybox` (Debian `busybox-static`, which
//! `scripts/test.sh` installs) and `docker import`: no registry needed. Containers and the image
//! are removed on every exit path. Needs root (CI runs as root). Skipped, with the reason printed,
//! only when no Docker daemon answers.

mod netns;

use std::time::Duration;

use netns::docker::{DockerThings, docker_ok, docker_unreachable, exec};
use netns::{Cluster, show, wait_for};

const PING_WAIT: Duration = Duration::from_secs(15);
const TCP_PORT: u16 = 5003;
const TCP_KIB: usize = 2048;

#[test]
fn docker_containers_attached_on_two_nodes_ping_and_transfer_over_tcp() {
    if let Some(why) = docker_unreachable() {
        eprintln!("SKIPPED docker test: no Docker daemon reachable ({why})");
        return;
    }
    let c = Cluster::new("docker", 2);
    let mut d = DockerThings::new(&c.prefix, &c.dir);
    let (ca, cb) = (format!("{}-a", c.prefix), format!("{}-b", c.prefix));
    let pa = d.start(&ca);
    let pb = d.start(&cb);
    let na = c.adopt_netns("a", pa);
    let nb = c.adopt_netns("b", pb);

    c.node(1)
        .cli_ok(&["network", "create", "dock", "--subnet", "198.19.50.0/24"]);
    c.wait_network_everywhere("dock");
    let aa = c.attach(1, &na, "dock", &[]);
    let ab = c.attach(2, &nb, "dock", &[]);

    // The runtime's view: the container itself has the address overlayd gave it.
    for (ctr, a) in [(&ca, &aa), (&cb, &ab)] {
        let addrs = docker_ok(&["exec", ctr, "ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        assert!(
            addrs.contains(&format!("inet {}/", a.ip)),
            "{ctr}: eth0 inside the container lacks {}: {addrs}",
            a.ip
        );
    }

    for (from, to) in [(&ca, &ab.ip), (&cb, &aa.ip)] {
        wait_for(PING_WAIT, &format!("docker exec {from} ping {to}"), || {
            let out = exec(from, &format!("ping -c 1 -W 1 {to}"));
            if out.status.success() {
                Ok(())
            } else {
                Err(show(&out))
            }
        });
    }

    // TCP with busybox nc: b listens and writes to a file, a sends random data; same MD5 on both.
    docker_ok(&[
        "exec",
        "-d",
        &cb,
        "/bin/sh",
        "-c",
        // stdin must not hit EOF: busybox nc would half-close and the sender stop early.
        &format!("sleep 60 | nc -l -p {TCP_PORT} > /tmp/recv"),
    ]);
    let sent = exec(
        &ca,
        &format!(
            "dd if=/dev/urandom of=/tmp/send bs=1024 count={TCP_KIB} 2>/dev/null && md5sum < /tmp/send"
        ),
    );
    assert!(
        sent.status.success(),
        "making data in {ca}\n{}",
        show(&sent)
    );
    let want = String::from_utf8_lossy(&sent.stdout).trim().to_owned();
    // Retried: the listener may not be up yet, and busybox nc has no connect retry.
    wait_for(
        Duration::from_secs(15),
        &format!("nc {ca} -> {}:{TCP_PORT}", ab.ip),
        || {
            let out = exec(&ca, &format!("nc -w 5 {} {TCP_PORT} < /tmp/send", ab.ip));
            if out.status.success() {
                Ok(())
            } else {
                Err(show(&out))
            }
        },
    );
    wait_for(
        Duration::from_secs(15),
        &format!("{cb} to hold the data a sent"),
        || {
            let out = exec(&cb, "md5sum < /tmp/recv; wc -c < /tmp/recv");
            let got = String::from_utf8_lossy(&out.stdout).to_string();
            let mut lines = got.lines();
            let (sum, len) = (
                lines.next().unwrap_or("").trim(),
                lines.next().unwrap_or("").trim(),
            );
            if sum == want {
                Ok(())
            } else {
                Err(format!(
                    "received {len} of {} bytes, md5 {sum:?}, want {want:?}",
                    TCP_KIB * 1024
                ))
            }
        },
    );
}
