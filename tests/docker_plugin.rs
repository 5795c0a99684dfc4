//! overlayd as Docker's network and IPAM driver, with the real engine: `docker network create
//! --driver overlayd --ipam-driver overlayd` and `docker run --network` put Docker containers on
//! an overlayd network of a 2-node cluster, where they reach a container attached on the other
//! node by address, by service name and by VIP, and one of them, started with the driver option
//! `overlayd.service=web`, is a task of service `web` that the other node reaches through the
//! VIP. `docker rm` and `docker network rm` then leave nothing: no endpoint, no veth, no address
//! held (the overlayd network the plugin made is removed, which the registry refuses while an
//! address is held). A Docker network whose subnet is an existing overlayd network's adopts it,
//! and `docker network rm` leaves that one in place.
//!
//! Where things live. The plugin socket `/run/docker/plugins/overlayd.sock` is a path, seen
//! alike from every network namespace, so only one daemon per host can serve Docker: node 1
//! runs with `--docker-plugin`, node 2 is the other node, with containers attached by
//! `overlayd attach`. Node 1's daemon runs in its node namespace, and dockerd in the host's.
//! Docker moves the interface a driver names in `Join` from its own namespace into the
//! container, so the plugin makes the veth pair in its namespace (the host end goes on node
//! 1's bridge, as `attach` does it) and moves the container end to dockerd's namespace, which
//! it finds from the peer credentials of the plugin socket (`SO_PEERCRED`). A daemon in the
//! host namespace, as in production, moves nothing. Docker's embedded DNS (`127.0.0.11`)
//! forwards what it does not know to `--dns GATEWAY` from inside the container's namespace,
//! where the gateway is overlayd's DNS server.
//!
//! The image is imported from the host's busybox; containers, networks and the image are removed
//! on every exit path, before the cluster's daemons stop. Needs root. Skipped, with the reason
//! printed, only when no Docker daemon answers.

mod netns;

use std::path::Path;
use std::time::{Duration, Instant};

use netns::docker::{DockerThings, docker, docker_ok, docker_unreachable, exec};
use netns::{Cluster, show, wait_for};

const WAIT: Duration = Duration::from_secs(20);
const SUBNET: &str = "198.19.61.0/24";
const GATEWAY: &str = "198.19.61.1";
/// The subnet of a network overlayd makes first, which Docker then adopts.
const ADOPTED: &str = "198.19.62.0/24";
const SOCKET: &str = "/run/docker/plugins/overlayd.sock";

/// `docker network create` of Docker network `name` on overlayd with `subnet`, and `options`.
fn docker_network(name: &str, subnet: &str, options: &[&str]) {
    let create = [
        "network",
        "create",
        "--driver",
        "overlayd",
        "--ipam-driver",
        "overlayd",
        "--subnet",
        subnet,
    ];
    docker_ok(&[&create[..], options, &[name]].concat());
}

/// Waits until `cmd` succeeds in `container`; returns its stdout.
fn exec_until(container: &str, cmd: &str) -> String {
    wait_for(WAIT, &format!("{container}: {cmd}"), || {
        let out = exec(container, cmd);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(show(&out))
        }
    })
}

/// The answer of an HTTP server at `host` (an address or a name), from `container`; with nc,
/// since the image's busybox-static `wget` crashes in Docker containers here.
fn http_get(container: &str, host: &str) -> String {
    let get = format!(r"printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 {host} 80 | tail -n 1");
    exec_until(container, &get)
}

/// The endpoints of network `name` as `network ls` on `node` counts them, if it lists it.
fn endpoints(c: &Cluster, node: usize, name: &str) -> Option<u64> {
    let net = c.node(node).network(name).expect("network ls");
    net.map(|n| n["endpoints"].as_u64().unwrap_or(u64::MAX))
}

/// The `ovh…` links (host ends of container veths) in `netns`, or in the host's namespace.
fn veths(c: &Cluster, netns: Option<&str>) -> Vec<String> {
    let links = match netns {
        Some(ns) => c.links(ns),
        None => std::fs::read_dir("/sys/class/net")
            .map(|d| {
                d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default(),
    };
    links.into_iter().filter(|l| l.starts_with("ovh")).collect()
}

#[test]
fn docker_containers_on_an_overlayd_network_reach_the_other_node_by_address_name_and_vip() {
    if let Some(why) = docker_unreachable() {
        eprintln!("SKIPPED docker plugin test: no Docker daemon reachable ({why})");
        return;
    }
    assert!(
        std::os::unix::net::UnixStream::connect(SOCKET).is_err(),
        "another overlayd serves Docker at {SOCKET} already"
    );
    let started = Instant::now();
    let c = Cluster::with_node_args("dockplug", 2, |i| {
        if i == 1 {
            vec!["--docker-plugin"]
        } else {
            vec![]
        }
    });
    // Dropped before the cluster: `docker network rm` needs the plugin.
    let mut d = DockerThings::new(&c.prefix, &c.dir);
    let host_veths_before = veths(&c, None);

    let dnet = format!("{}-net", c.prefix);
    d.networks.push(dnet.clone());
    // Bad input: a one-line refusal that says what to change, and nothing made.
    for (args, says) in [
        (
            vec!["--driver", "overlayd", "--subnet", SUBNET],
            "--ipam-driver overlayd",
        ),
        (
            vec!["--driver", "overlayd", "--ipam-driver", "overlayd"],
            "--subnet",
        ),
    ] {
        let out = docker(&[&["network", "create"], &args[..], &[&dnet]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: {}",
            show(&out)
        );
    }
    assert_eq!(c.node(1).json(&["network", "ls"]), serde_json::json!([]));
    let unknown = netns::run(
        std::process::Command::new("curl").args([
            "-s",
            "--unix-socket",
            SOCKET,
            "-d",
            r#"{"NetworkID": "nope", "EndpointID": "nope", "SandboxKey": "", "Options": {}}"#,
            "http://plugin/NetworkDriver.Join",
        ]),
        netns::CLI_TIMEOUT,
    );
    let unknown = String::from_utf8_lossy(&unknown.stdout);
    assert!(
        unknown.contains(r#""Err":"Docker network nope is not"#),
        "{unknown}"
    );
    let t = Instant::now();
    docker_network(&dnet, SUBNET, &["-o", "overlayd.network=dock"]);
    println!("docker network create: {:?}", t.elapsed());
    // Made cluster-wide, with overlayd's gateway.
    let net = c.wait_network_everywhere("dock");
    assert_eq!(net["subnet"], SUBNET, "{net}");
    assert_eq!(net["gateway"], GATEWAY, "{net}");

    c.node(1)
        .cli_ok(&["service", "create", "web", "--network", "dock"]);
    let vip = c.node(1).json(&["service", "ls"])[0]["vip"]
        .as_str()
        .expect("web has a VIP")
        .to_owned();
    let (_t1, peer, _httpd) = c.httpd_task(2, "t1", "dock", "web");

    // A Docker task of `web` (driver option), serving HTTP, and a plain Docker client.
    let (task, client) = (format!("{}-task", c.prefix), format!("{}-client", c.prefix));
    let net_arg = |opt: &str| format!("name={dnet}{opt}");
    for (name, network) in [
        (&task, net_arg(",driver-opt=overlayd.service=web")),
        (&client, net_arg("")),
    ] {
        let t = Instant::now();
        d.run(name, &["--network", &network, "--dns", GATEWAY]);
        println!("docker run {name}: {:?}", t.elapsed());
    }
    exec_until(&task, "mkdir -p /www && echo docker-task > /www/index.html");
    docker_ok(&["exec", "-d", &task, "httpd", "-f", "-p", "80", "-h", "/www"]);

    // Each container has the address overlayd's registry gave it, the MAC derived from it, and
    // the gateway's default route.
    let tasks = c.node(1).json(&["service", "ps", "web"]);
    let tasks = tasks.as_array().expect("service ps is a list");
    println!("service ps web: {tasks:?}");
    let docker_task = tasks
        .iter()
        .find(|t| {
            t["netns"]
                .as_str()
                .is_some_and(|n| n.starts_with("docker-"))
        })
        .unwrap_or_else(|| panic!("the Docker container is no task of web: {tasks:?}"));
    let task_ip = docker_task["ip"].as_str().unwrap().to_owned();
    let eth0 = exec_until(
        &task,
        "ip -o -4 addr show dev eth0; ip link show dev eth0; ip route",
    );
    assert!(eth0.contains(&format!("inet {task_ip}/24")), "{eth0}");
    let octets: Vec<String> = task_ip
        .split('.')
        .map(|o| format!("{:02x}", o.parse::<u8>().unwrap()))
        .collect();
    assert!(
        eth0.contains(&format!("link/ether 02:42:{}", octets.join(":"))),
        "{eth0}"
    );
    assert!(eth0.contains(&format!("default via {GATEWAY}")), "{eth0}");
    assert_eq!(endpoints(&c, 2, "dock"), Some(3), "node 2 sees all three");

    // By address, both ways across the nodes.
    let t = Instant::now();
    exec_until(&client, &format!("ping -c 1 -W 1 {}", peer.ip));
    println!(
        "first ping docker client -> node 2 container: {:?}",
        t.elapsed()
    );
    assert_eq!(http_get(&client, &peer.ip), "t1");
    let peer_get = |url: &str| {
        wait_for(WAIT, &format!("node 2 container: curl {url}"), || {
            let out = c.exec(&peer.netns, &["curl", "-s", "-m", "3", url]);
            if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
            } else {
                Err(show(&out))
            }
        })
    };
    assert_eq!(peer_get(&format!("http://{task_ip}/")), "docker-task");

    // By name: Docker's embedded DNS forwards to overlayd's on the gateway.
    let resolved = exec_until(&client, "nslookup web");
    assert!(resolved.contains(&vip), "web resolves to {vip}: {resolved}");
    // By VIP and by name: both tasks answer, the other node's and the Docker one.
    for host in [vip.as_str(), "web"] {
        let seen: Vec<String> = (0..12).map(|_| http_get(&client, host)).collect();
        println!("http://{host}/ from the Docker client: {seen:?}");
        for want in ["t1", "docker-task"] {
            assert!(
                seen.iter().any(|a| a == want),
                "{host}: no answer from {want}: {seen:?}"
            );
        }
    }
    // The other node balances to the Docker task too.
    let seen: Vec<String> = (0..12)
        .map(|_| peer_get(&format!("http://{vip}/")))
        .collect();
    println!("VIP from node 2: {seen:?}");
    assert!(seen.iter().any(|a| a == "docker-task"), "{seen:?}");

    // Removal leaves nothing: endpoints leave the cluster, veths go, addresses come back.
    let t = Instant::now();
    for name in [&task, &client] {
        docker_ok(&["rm", "-f", name]);
    }
    d.containers.clear();
    wait_for(WAIT, "the Docker containers to leave the cluster", || {
        let seen = (endpoints(&c, 1, "dock"), endpoints(&c, 2, "dock"));
        let tasks = c.node(2).json(&["service", "ps", "web"]);
        let n = tasks.as_array().map_or(0, Vec::len);
        if seen == (Some(1), Some(1)) && n == 1 {
            Ok(())
        } else {
            Err(format!("endpoints {seen:?}, {n} tasks"))
        }
    });
    println!(
        "docker rm -> endpoints gone on both nodes: {:?}",
        t.elapsed()
    );
    assert_eq!(
        veths(&c, Some(&c.node(1).netns)),
        Vec::<String>::new(),
        "node 1's veths"
    );
    assert_eq!(
        veths(&c, None),
        host_veths_before,
        "veths in the host namespace"
    );

    c.node(2)
        .cli_ok(&["detach", &peer.netns, "--network", "dock"]);
    c.node(1).cli_ok(&["service", "rm", "web"]);
    docker_ok(&["network", "rm", &dnet]);
    d.networks.clear();
    // The registry removes a network only when no address on it is held.
    wait_for(
        WAIT,
        "overlayd network dock to go on both nodes",
        || match (endpoints(&c, 1, "dock"), endpoints(&c, 2, "dock")) {
            (None, None) => Ok(()),
            seen => Err(format!("still listed: {seen:?}")),
        },
    );
    assert!(
        !docker(&["network", "inspect", &dnet]).status.success(),
        "Docker still has {dnet}"
    );

    // An overlayd network that exists already is adopted by its subnet, and stays after
    // `docker network rm`.
    c.node(2)
        .cli_ok(&["network", "create", "made", "--subnet", ADOPTED]);
    c.wait_network_everywhere("made");
    let made = c.container(2, "m1");
    let m1 = c.attach(2, &made, "made", &[]);
    let dmade = format!("{}-made", c.prefix);
    d.networks.push(dmade.clone());
    docker_network(&dmade, ADOPTED, &[]);
    let guest = format!("{}-guest", c.prefix);
    d.run(&guest, &["--network", &dmade]);
    exec_until(&guest, &format!("ping -c 1 -W 1 {}", m1.ip));
    docker_ok(&["rm", "-f", &guest]);
    docker_ok(&["network", "rm", &dmade]);
    d.containers.clear();
    d.networks.clear();
    wait_for(WAIT, "the guest to leave network made", || {
        match (endpoints(&c, 1, "made"), endpoints(&c, 2, "made")) {
            (Some(1), Some(1)) => Ok(()),
            seen => Err(format!("endpoints {seen:?}")),
        }
    });
    assert!(Path::new(SOCKET).exists(), "the plugin socket is served");
    drop(d);
    c.node(1).interrupt_daemon(WAIT);
    assert!(
        !Path::new(SOCKET).exists(),
        "the socket went with the daemon"
    );
    println!("whole test: {:?}", started.elapsed());
}
