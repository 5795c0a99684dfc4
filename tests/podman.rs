//! overlayd under a real container runtime through its CNI plugin. Debian's podman, with its CNI
//! backend and `overlayd-cni` as the only plugin of two networks (both on overlayd network
//! `pods` of node 1; one with `"service": "web"`), runs busybox containers made from an image
//! imported here (`podman import`): client `a`, and `b`, a task of `web`. Node 2 holds `t2`,
//! another task of `web` (a plain namespace). `a` reaches `t2` by ping, and `web`'s VIP and
//! name (overlayd's DNS, which the plugin's result gave podman) answer from both tasks.
//! The plugin's CHECK passes on `a`'s attachment; GC of `a`'s network with no valid attachment
//! takes it away and leaves `b`'s; DEL after that, ours and podman's own, still succeeds.
//!
//! podman gets a configuration, CNI config and plugin dirs, storage and run dirs of its own in
//! the test's temp dir (CONTAINERS_CONF, --root, --runroot, --tmpdir): containers, image and
//! config go with it on every exit path. Skipped, with the reason printed, only if podman is
//! not installed and cannot be. A second test feeds the plugin bad input and reads its errors.

mod netns;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use netns::{CLI_TIMEOUT, Cluster, run, run_bounded, show, wait_for};

const PLUGIN: &str = env!("CARGO_BIN_EXE_overlayd-cni");
const PING_WAIT: Duration = Duration::from_secs(15);
/// Requests to the VIP: with 2 tasks, missing one in 30 independent picks has odds of 2e-9.
const REQUESTS: usize = 30;

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Why podman cannot be had here, or `None` once it is installed (by this test if need be).
fn podman_unavailable() -> Option<String> {
    if on_path("podman") {
        return None;
    }
    eprintln!("podman is not installed: installing podman runc busybox-static");
    for args in [
        &["update", "-qq"][..],
        &["install", "-y", "-qq", "podman", "runc", "busybox-static"],
    ] {
        let out = run_bounded(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            Duration::from_secs(600),
        );
        match out {
            Some(o) if o.status.success() => {}
            Some(o) => return Some(format!("`apt-get {}` failed: {}", args.join(" "), show(&o))),
            None => return Some(format!("`apt-get {}` took over 600 s", args.join(" "))),
        }
    }
    (!on_path("podman")).then(|| "no podman on PATH after apt-get install podman".into())
}

/// podman with everything of its own in `dir`; removes its containers and image on drop, the
/// cluster's temp dir (dropped after it) takes the rest.
struct Podman {
    dir: PathBuf,
    containers: Vec<String>,
    image: String,
    /// Whether [`IMAGE_CACHE`] is this test's to remove: it was not there before.
    own_image_cache: bool,
}

/// Where podman keeps a cache of image blobs whatever `--root` says.
const IMAGE_CACHE: &str = "/var/lib/containers";

impl Podman {
    /// Writes podman's configuration into `dir`, with CNI networks `networks` (name and the
    /// plugin's keys), `overlayd-cni` their only plugin.
    fn new(dir: PathBuf, image: String, networks: &[(String, Value)]) -> Podman {
        let (conf, bin) = (dir.join("cni"), dir.join("cni-bin"));
        for d in [&conf, &bin] {
            fs::create_dir_all(d).expect("making podman's dirs");
        }
        std::os::unix::fs::symlink(PLUGIN, bin.join("overlayd-cni")).expect("linking the plugin");
        // runc: crun fails on these hosts' cgroups. cgroupfs and file events: no systemd.
        let containers_conf = format!(
            "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
             [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [{:?}]\nnetwork_config_dir = {:?}\n",
            bin.to_string_lossy(),
            conf.to_string_lossy(),
        );
        fs::write(dir.join("containers.conf"), containers_conf).expect("containers.conf");
        for (name, plugin) in networks {
            let list = json!({"cniVersion": "1.0.0", "name": name, "plugins": [plugin]});
            fs::write(conf.join(format!("{name}.conflist")), list.to_string()).expect("conflist");
        }
        Podman {
            dir,
            containers: Vec::new(),
            image,
            own_image_cache: !Path::new(IMAGE_CACHE).exists(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"));
        for (flag, sub) in [
            ("--root", "root"),
            ("--runroot", "runroot"),
            ("--tmpdir", "tmp"),
        ] {
            cmd.arg(flag).arg(self.dir.join(sub));
        }
        cmd.args(["--storage-driver", "vfs"]).args(args);
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        run(&mut self.command(args), CLI_TIMEOUT)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "`podman {}` failed\n{}",
            args.join(" "),
            show(&out)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Starts container `name` on CNI network `network` running `script`; returns its id.
    fn start(&mut self, name: &str, network: &str, script: &str) -> String {
        self.containers.push(name.to_owned());
        let image = self.image.clone();
        self.ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            network,
            &image,
            "/bin/sh",
            "-c",
            script,
        ])
    }

    fn exec(&self, container: &str, script: &str) -> Output {
        self.run(&["exec", container, "/bin/sh", "-c", script])
    }

    fn inspect(&self, container: &str, format: &str) -> String {
        self.ok(&["inspect", "--format", format, container])
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for name in &self.containers {
            let _ = run_bounded(
                &mut self.command(&["rm", "-f", "-t", "0", name]),
                CLI_TIMEOUT,
            );
        }
        let _ = run_bounded(&mut self.command(&["rmi", "-f", &self.image]), CLI_TIMEOUT);
        if self.own_image_cache {
            let _ = fs::remove_dir_all(IMAGE_CACHE);
        }
    }
}

/// Runs the plugin as a runtime would: `env` (CNI_* variables), `config` on stdin. Returns its
/// exit status and what it printed on stdout, parsed (`Null` for nothing).
fn plugin(env: &[(&str, &str)], config: &Value) -> (bool, Value) {
    let mut child = Command::new(PLUGIN)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting overlayd-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(config.to_string().as_bytes())
        .expect("writing the config");
    let deadline = Instant::now() + CLI_TIMEOUT;
    while child
        .try_wait()
        .expect("waiting for overlayd-cni")
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "overlayd-cni ran over {CLI_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("overlayd-cni output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let printed = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("overlayd-cni printed no JSON ({e}): {}", show(&out)))
    };
    (out.status.success(), printed)
}

/// The answers to `REQUESTS` HTTP requests from podman container `from` to `host` port 80,
/// each the last line of its reply (the body), made in one `podman exec`. With busybox nc: the
/// image's static busybox wget crashes (on the host too).
fn answers(p: &Podman, from: &str, host: &str) -> BTreeSet<String> {
    let script = format!(
        "for i in $(seq {REQUESTS}); do echo \"$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} 80 | tail -n 1)\"; done"
    );
    let out = p.exec(from, &script);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let bodies: Vec<&str> = text.lines().map(str::trim).collect();
    assert!(
        out.status.success() && bodies.len() == REQUESTS && !bodies.contains(&""),
        "{REQUESTS} requests {from} -> {host}:80, some unanswered\n{}",
        show(&out)
    );
    bodies.into_iter().map(str::to_owned).collect()
}

fn endpoints(c: &Cluster, node: usize) -> u64 {
    c.node(node)
        .network("pods")
        .ok()
        .flatten()
        .and_then(|n| n["endpoints"].as_u64())
        .unwrap_or(0)
}

#[test]
fn podman_containers_on_overlayd_reach_another_node_by_ping_vip_and_name() {
    if let Some(why) = podman_unavailable() {
        eprintln!("SKIPPED podman test: podman cannot be installed ({why})");
        return;
    }
    let started = Instant::now();
    let c = Cluster::new("podman", 2);
    c.node(1)
        .cli_ok(&["network", "create", "pods", "--subnet", "198.19.60.0/24"]);
    c.wait_network_everywhere("pods");
    let service = c
        .node(1)
        .json(&["service", "create", "web", "--network", "pods"]);
    let vip = service["vip"].as_str().expect("web has a VIP").to_owned();
    let (_, t2, _server) = c.httpd_task(2, "t2", "pods", "web");

    let socket = c.node(1).api.to_string_lossy().into_owned();
    let (net, net_web) = (c.prefix.clone(), format!("{}-web", c.prefix));
    let plain = json!({"type": "overlayd-cni", "network": "pods", "socket": socket});
    let web =
        json!({"type": "overlayd-cni", "network": "pods", "service": "web", "socket": socket});
    let mut p = Podman::new(
        c.dir.join("podman"),
        format!("localhost/{}:busybox", c.prefix),
        &[(net.clone(), plain.clone()), (net_web.clone(), web)],
    );
    let tarball = netns::busybox_image_tar(&c.dir.join("rootfs"));
    p.ok(&["import", &tarball.to_string_lossy(), &p.image.clone()]);
    println!(
        "podman import: {}",
        p.ok(&["images", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}"])
    );

    let (a, b) = (format!("{}-a", c.prefix), format!("{}-b", c.prefix));
    let t = Instant::now();
    let id_a = p.start(&a, &net, "exec sleep 600");
    println!("podman run {a} on {net}: {:?}", t.elapsed());
    p.start(
        &b,
        &net_web,
        "mkdir -p /www && echo b > /www/index.html && exec httpd -f -p 80 -h /www",
    );

    // The runtime's view and the container's agree with what overlayd gave it.
    let ip_a = p.inspect(
        &a,
        &format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}"),
    );
    let mac_a = p.inspect(
        &a,
        &format!("{{{{(index .NetworkSettings.Networks \"{net}\").MacAddress}}}}"),
    );
    let gateway = p.inspect(
        &a,
        &format!("{{{{(index .NetworkSettings.Networks \"{net}\").Gateway}}}}"),
    );
    println!("podman inspect {a}: ip {ip_a}, mac {mac_a}, gateway {gateway}");
    assert_eq!(gateway, "198.19.60.1");
    let eth0 = String::from_utf8_lossy(
        &p.exec(&a, "ip -o addr show dev eth0; ip -o link show dev eth0")
            .stdout,
    )
    .to_string();
    assert!(
        eth0.contains(&format!("inet {ip_a}/24")) && eth0.contains(&mac_a),
        "eth0 in {a} is not what podman reports ({ip_a}, {mac_a}): {eth0}"
    );
    let resolv = p.ok(&["exec", &a, "cat", "/etc/resolv.conf"]);
    assert!(
        resolv.contains("nameserver 198.19.60.1"),
        "{a}'s resolv.conf: {resolv}"
    );
    let tasks = c.node(2).json(&["service", "ps", "web"]);
    let task_ips: BTreeSet<&str> = tasks
        .as_array()
        .expect("service ps is a list")
        .iter()
        .filter_map(|t| t["ip"].as_str())
        .collect();
    let ip_b = p.inspect(
        &b,
        &format!("{{{{(index .NetworkSettings.Networks \"{net_web}\").IPAddress}}}}"),
    );
    assert_eq!(
        task_ips,
        BTreeSet::from([t2.ip.as_str(), ip_b.as_str()]),
        "web's tasks: {tasks}"
    );
    wait_for(PING_WAIT, "both tasks of web healthy on node 1", || {
        let ps = c.node(1).json(&["service", "ps", "web"]);
        let healthy = ps
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["state"] == "healthy")
            .count();
        if healthy == 2 {
            Ok(())
        } else {
            Err(ps.to_string())
        }
    });
    // A balancer takes the view at its node's next reconcile round (every 250 ms).
    std::thread::sleep(Duration::from_millis(600));

    let t = Instant::now();
    wait_for(
        PING_WAIT,
        &format!("podman exec {a} ping {} (node 2)", t2.ip),
        || {
            let out = p.exec(&a, &format!("ping -c 1 -W 1 {}", t2.ip));
            if out.status.success() {
                Ok(())
            } else {
                Err(show(&out))
            }
        },
    );
    println!("{a} pings t2 on node 2 after {:?}", t.elapsed());
    let both = BTreeSet::from(["b".to_string(), "t2".to_string()]);
    let by_vip = answers(&p, &a, &vip);
    let by_name = answers(&p, &a, "web");
    println!("{REQUESTS} requests each: VIP {vip} answered by {by_vip:?}, name web by {by_name:?}");
    assert_eq!(by_vip, both);
    assert_eq!(by_name, both);

    // CHECK, with the result podman's CNI library cached as prevResult.
    let netns_a = p.inspect(&a, "{{.NetworkSettings.SandboxKey}}");
    let cached: Value = serde_json::from_str(
        &fs::read_to_string(format!("/var/lib/cni/results/{net}-{id_a}-eth0"))
            .expect("libcni's cached result of the ADD"),
    )
    .expect("cached result is JSON");
    let mut config = plain.clone();
    config["cniVersion"] = json!("1.0.0");
    config["name"] = json!(net);
    config["prevResult"] = cached["result"].clone();
    let env = |command| {
        [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", id_a.as_str()),
            ("CNI_NETNS", netns_a.as_str()),
            ("CNI_IFNAME", "eth0"),
        ]
    };
    assert_eq!(
        plugin(&env("CHECK"), &config),
        (true, Value::Null),
        "CHECK of {a}"
    );

    // GC of a's network, nothing valid: a's attachment goes, b's (another network) stays.
    let before = endpoints(&c, 1);
    let mut gc = plain.clone();
    gc["cniVersion"] = json!("1.1.0");
    gc["name"] = json!(net);
    gc["cni.dev/valid-attachments"] = json!([]);
    assert_eq!(
        plugin(&[("CNI_COMMAND", "GC")], &gc),
        (true, Value::Null),
        "GC"
    );
    assert!(
        !p.exec(&a, "ip link show dev eth0").status.success(),
        "{a} keeps eth0 after GC"
    );
    assert!(
        p.exec(&b, "ip link show dev eth0").status.success(),
        "GC of {net} took {b}'s eth0"
    );
    wait_for(PING_WAIT, "node 1 to count one endpoint less", || {
        let now = endpoints(&c, 1);
        if now + 1 == before {
            Ok(())
        } else {
            Err(format!("{before} before, {now} now"))
        }
    });
    let (ok, err) = plugin(&env("CHECK"), &config);
    assert!(!ok && err["code"] == 3, "CHECK after GC: {err}");

    // DEL of what GC removed succeeds, ours and podman's.
    assert_eq!(
        plugin(&env("DEL"), &config),
        (true, Value::Null),
        "DEL after GC"
    );
    let rm = p.run(&["rm", "-f", "-t", "0", &a]);
    assert!(rm.status.success(), "podman rm {a}\n{}", show(&rm));
    assert!(
        !String::from_utf8_lossy(&rm.stderr).contains("overlayd"),
        "podman rm: {}",
        show(&rm)
    );
    let rm = p.run(&["rm", "-f", "-t", "0", &b]);
    assert!(rm.status.success(), "podman rm {b}\n{}", show(&rm));
    wait_for(PING_WAIT, "node 1 to count only t2", || {
        let now = endpoints(&c, 1);
        if now == 1 {
            Ok(())
        } else {
            Err(format!("{now} endpoints"))
        }
    });
    let left: Vec<String> = fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    for cni_net in [&net, &net_web] {
        let prefix = overlayd::cni::netns_prefix(cni_net);
        assert!(
            !left.iter().any(|n| n.starts_with(&prefix)),
            "names of {cni_net} left: {left:?}"
        );
    }
    println!("podman test took {:?}", started.elapsed());
}

/// The plugin's answers to bad input: CNI's error JSON with the spec's code on stdout, a
/// failing exit, and nothing left behind.
#[test]
fn bad_cni_input_gets_the_specs_error_codes() {
    let add = |netns: &'static str| {
        [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "ovt-badcni"),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
        ]
    };
    let config = json!({
        "cniVersion": "1.0.0", "name": "ovt-badcni", "type": "overlayd-cni",
        "network": "pods", "socket": "/nonexistent/overlayd.sock",
    });
    let code = |env: &[(&str, &str)], config: &Value| {
        let (ok, out) = plugin(env, config);
        assert!(!ok, "succeeded: {out}");
        assert!(
            out["msg"].is_string() && out["cniVersion"].is_string(),
            "{out}"
        );
        out["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no code: {out}"))
    };
    assert_eq!(code(&[], &config), 4, "no CNI_COMMAND");
    assert_eq!(code(&add("/run/netns/x")[..3], &config), 4, "no CNI_IFNAME");
    let mut no_network = config.clone();
    no_network.as_object_mut().unwrap().remove("network");
    assert_eq!(code(&add("/run/netns/x"), &no_network), 7, "no network key");
    let mut old = config.clone();
    old["cniVersion"] = json!("0.4.0");
    assert_eq!(code(&add("/run/netns/x"), &old), 1, "cniVersion 0.4.0");
    assert_eq!(
        code(&add("/nonexistent/netns"), &config),
        3,
        "no such netns"
    );
    // No daemon: try again later, and the name ADD made for the namespace is gone again.
    assert_eq!(code(&add("/proc/self/ns/net"), &config), 11, "no daemon");
    let name = overlayd::cni::netns_name(
        "ovt-badcni",
        &overlayd::cni::Target {
            container_id: "ovt-badcni".into(),
            ifname: "eth0".into(),
        },
    );
    assert!(
        !Path::new("/run/netns").join(&name).exists(),
        "{name} left behind"
    );
    let del = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "ovt-badcni"),
        ("CNI_IFNAME", "eth0"),
    ];
    assert_eq!(code(&del, &config), 11, "DEL with no daemon");
    let (ok, version) = plugin(
        &[("CNI_COMMAND", "VERSION")],
        &json!({"cniVersion": "1.0.0"}),
    );
    assert!(ok, "VERSION: {version}");
    assert_eq!(version["supportedVersions"], json!(["1.0.0", "1.1.0"]));
}
