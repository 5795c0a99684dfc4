//! Soak: about two minutes of many concurrent connections through a VIP and through published
//! ports on every node, while tasks are added and removed every few seconds. No request may
//! fail except one that a task took and was then removed under it, and no daemon's memory may
//! grow after warm-up. Needs root (CI runs as root).
//!
//! # Removal without failures
//! A task leaves the way an orchestrator stops a container: first its health check fails (its
//! health server stops, its web server keeps serving), so that every balancer stops giving it
//! new flows; once every node lists it unhealthy and a reconcile round has passed, the requests
//! it still had have been answered, and it is detached.
//!
//! # Which task a failed request went to
//! Every task logs the client address and port of each connection it accepts, with the time;
//! every client logs each failed request's source port, start and end. A failure is the
//! removal's when the task that accepted its connection was detached while the request was
//! under way; any other failure fails the test. Both counts are printed. For one that fails
//! it, the test prints what a capture of connection starts and ends (SYN, FIN, RST) in the
//! client and in every task saw of its port: where its SYNs went, and what answered them.
//!
//! # One client port towards several nodes
//! The client on the underlay has 4096 ports to connect from ([`CLIENT_PORTS`]), so that it
//! now and then uses one port towards two nodes at once, as any busy client of several nodes
//! does: both may pick the same task, which can hold only one connection on that tuple (see
//! the balancer's `reuse`). With the kernel's full range it happened a few times in 300k
//! requests; here, in every run. Fewer ports are no use: the task's TCP keeps a closed
//! connection's tuple for a minute (TIME-WAIT), and a SYN on it from another node's client
//! socket (unrelated sequence numbers and timestamps) is turned away until the client resets
//! it, a second's delay each time; with 1024 ports, the next connection through yet another
//! node came within that second, over and over, until a request gave up after 10 s.
//!
//! # Cost
//! Runs once, in pass 1 (offloads on): with offloads forced off (pass 2) it returns at once, as
//! the data path it would drive is the one `tests/mesh.rs` and the others already cover there,
//! and two minutes more of load would only lengthen CI.

mod netns;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use netns::mesh::tcp_server;
use netns::{Bg, Cluster, PING_WAIT, node_addr, offloads_forced_off, vm_rss_kb, wait_until};
use serde_json::Value;

const CLIENT: &str = "198.18.0.200";
/// How long the clients run.
const LOAD: Duration = Duration::from_secs(120);
/// Memory is measured first this long into the load: tables and buffers are in use by then.
const WARM_UP: Duration = Duration::from_secs(20);
/// How much a daemon's resident memory may grow from warm-up to the end.
const RSS_GROWTH_KB: u64 = 8 * 1024;
/// The underlay client's ports (`net.ipv4.ip_local_port_range`): see the module's docs.
const CLIENT_PORTS: &str = "40000 44095";
/// Time between two task changes (an attach, or a drain and detach).
const CHURN_EVERY: Duration = Duration::from_secs(3);
/// Concurrent clients: through the published port (spread over the three nodes) from the
/// underlay, and through the VIP from a container on node 1 and one on node 3.
const MESH_CLIENTS: usize = 24;
const VIP_CLIENTS: usize = 16;

/// Web server on port 80: answers every connection "NAME PEER" (NAME is argv[1]) and closes;
/// logs "TIME PEER_IP:PEER_PORT" of each on stdout.
const WHO: &str = r#"
import os, time
def who(c, peer):
    os.write(1, ("%.3f %s:%d\n" % (time.time(), peer[0], peer[1])).encode())
    c.settimeout(20)
    c.recv(1024)
    c.sendall(("HTTP/1.0 200 OK\r\n\r\n%s %s\n" % (sys.argv[1], peer[0])).encode())
serve(80, who)
"#;

/// Health server on port 81: accepts and closes. Stopping it makes the task unhealthy.
const HEALTH: &str = r#"
def ok(c, peer):
    pass
serve(81, ok)
"#;

/// Clients: argv SECS THREADS HOST:PORT...; each of THREADS threads connects to the targets in
/// turn for SECS seconds, one `GET /` per connection, and counts the answering task. Prints one
/// JSON line: requests answered, by task, and the failures (source, target, start and end as
/// Unix times, error).
const LOAD_CLIENTS: &str = r#"
import json, socket, sys, threading, time
secs, threads = float(sys.argv[1]), int(sys.argv[2])
targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in sys.argv[3:]]
start = time.time()
lock = threading.Lock()
by_task, failures = {}, []
def one(c, target):
    c.settimeout(10)
    c.connect(target)
    c.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    while True:
        b = c.recv(4096)
        if not b:
            break
        data += b
    body = data.decode(errors="replace").split("\r\n\r\n", 1)
    if len(body) != 2 or not body[1].strip():
        raise OSError("no answer: %r" % data[:80])
    return body[1].split()[0]
def run(i):
    n = i
    while time.time() - start < secs:
        target = targets[n % len(targets)]
        n += 1
        c = socket.socket()
        began = time.time()
        try:
            task = one(c, target)
            with lock:
                by_task[task] = by_task.get(task, 0) + 1
        except Exception as e:
            try:
                src = "%s:%d" % c.getsockname()
            except OSError:
                src = "?"
            with lock:
                failures.append({"src": src, "target": "%s:%d" % target, "start": began,
                                 "end": time.time(), "error": repr(e)})
        finally:
            c.close()
ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
for t in ts:
    t.start()
for t in ts:
    t.join()
print(json.dumps({"answered": sum(by_task.values()), "by_task": by_task, "failures": failures}), flush=True)
"#;

/// A task container: its web server runs for the whole test, its health server while it is
/// meant to take flows.
struct Task {
    name: String,
    node: usize,
    netns: String,
    health: Option<Bg>,
    attached: bool,
    web: Bg,
}

impl Task {
    fn new(c: &Cluster, name: &str, node: usize) -> Task {
        let netns = c.container(node, name);
        let web = c.spawn(&netns, &["python3", "-c", &tcp_server(WHO), name]);
        Task {
            name: name.to_string(),
            node,
            netns,
            health: None,
            attached: false,
            web,
        }
    }

    fn attach(&mut self, c: &Cluster) {
        self.health = Some(c.spawn(&self.netns, &["python3", "-c", &tcp_server(HEALTH)]));
        c.attach(self.node, &self.netns, "soak", &["--service", "web"]);
        self.attached = true;
    }

    /// Fails its health check, waits until every node lists it unhealthy and a reconcile round
    /// has passed, then detaches it; returns when (as a Unix time).
    fn drain_and_detach(&mut self, c: &Cluster) -> f64 {
        self.health = None;
        let unhealthy_everywhere = wait_until(Duration::from_secs(15), || {
            (1..=3).all(|n| state_of(c, n, &self.netns).as_deref() == Some("unhealthy"))
        });
        assert!(
            unhealthy_everywhere,
            "{} not listed unhealthy on every node",
            self.name
        );
        std::thread::sleep(Duration::from_secs(1));
        let at = unix_now();
        c.node(self.node)
            .cli_ok(&["detach", &self.netns, "--network", "soak"]);
        self.attached = false;
        at
    }

    /// The connections it accepted: (when, client address and port).
    fn accepted(&self) -> Vec<(f64, String)> {
        let log = std::fs::read_to_string(&self.web.log).unwrap_or_default();
        log.lines()
            .filter_map(|l| {
                let (at, peer) = l.split_once(' ')?;
                Some((at.parse().ok()?, peer.to_string()))
            })
            .collect()
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

/// A failed request, as its client logged it.
struct Failed {
    src: String,
    target: String,
    start: f64,
    end: f64,
    error: String,
}

impl Failed {
    fn from(v: &Value) -> Failed {
        let text = |k: &str| v[k].as_str().unwrap_or("?").to_string();
        Failed {
            src: text("src"),
            target: text("target"),
            start: v["start"].as_f64().unwrap_or(0.0),
            end: v["end"].as_f64().unwrap_or(0.0),
            error: text("error"),
        }
    }

    /// The tasks that accepted its connection while it was under way, with when.
    fn taken_by<'a>(
        &self,
        accepted: &'a HashMap<String, Vec<(f64, String)>>,
    ) -> Vec<&'a (f64, String)> {
        accepted
            .get(&self.src)
            .into_iter()
            .flatten()
            .filter(|(at, _)| (self.start..=self.end).contains(at))
            .collect()
    }
}

/// The starts and ends of TCP connections (SYN, FIN, RST) seen in one netns: what the clients
/// and tasks cannot log, such as a SYN that never reached a task, or an answer that went back
/// through another node.
struct Capture {
    name: String,
    pcap: PathBuf,
    _tcpdump: Bg,
}

impl Capture {
    fn start(c: &Cluster, name: &str, netns: &str) -> Capture {
        let pcap = c.dir.join(format!("{name}.pcap"));
        let path = pcap.to_str().expect("UTF-8 test directory");
        let flags = "tcp[tcpflags] & (tcp-syn|tcp-fin|tcp-rst) != 0";
        let argv = [
            "tcpdump", "-i", "any", "-nn", "-s", "96", "-U", "-w", path, flags,
        ];
        Capture {
            name: name.to_string(),
            _tcpdump: c.spawn(netns, &argv),
            pcap,
        }
    }
}

/// Every capture's segments of a failed request's client port, from 2 s before it started to
/// its end, in time order, each line led by the capture's name.
fn timeline(captures: &[Capture], f: &Failed) -> String {
    let port = f.src.rsplit(':').next().unwrap_or("?");
    let mut lines: Vec<(f64, String)> = Vec::new();
    for cap in captures {
        let path = cap.pcap.to_str().expect("UTF-8 test directory");
        let filter = format!("port {port}");
        let out = std::process::Command::new("tcpdump")
            .args(["-nn", "-tt", "-r", path, &filter])
            .output();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        for line in text.unwrap_or_default().lines() {
            let at: f64 = line
                .split(' ')
                .next()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0.0);
            if (f.start - 2.0..=f.end).contains(&at) {
                lines.push((at, format!("{:>6} {line}", cap.name)));
            }
        }
    }
    lines.sort_by(|a, b| a.0.total_cmp(&b.0));
    let lines: Vec<String> = lines.into_iter().map(|(_, l)| l).collect();
    format!(
        "what was seen of {} -> {}:\n{}",
        f.src,
        f.target,
        lines.join("\n")
    )
}

/// The state node `n` lists for the task in `netns`, if it lists it.
fn state_of(c: &Cluster, n: usize, netns: &str) -> Option<String> {
    let ps = c.node(n).try_json(&["service", "ps", "web"]).ok()?;
    ps.as_array()?
        .iter()
        .find(|t| t["netns"] == netns)
        .and_then(|t| t["state"].as_str().map(str::to_string))
}

fn healthy_tasks(c: &Cluster, n: usize) -> Option<u64> {
    c.node(n).try_json(&["service", "ls"]).ok()?[0]["tasks_healthy"].as_u64()
}

fn rss_of_daemons(c: &Cluster) -> Vec<u64> {
    (1..=3)
        .map(|n| vm_rss_kb(c.node(n).daemon_pid().expect("daemon runs")))
        .collect()
}

#[test]
fn many_connections_through_vip_and_published_ports_while_tasks_come_and_go() {
    if offloads_forced_off() {
        println!("soak runs with offloads on only (pass 1); skipped");
        return;
    }
    let c = Cluster::new("soak", 3);
    c.node(1)
        .cli_ok(&["network", "create", "soak", "--subnet", "198.19.7.0/24"]);
    c.wait_network_everywhere("soak");
    c.node(2).cli_ok(&[
        "service",
        "create",
        "web",
        "--network",
        "soak",
        "--publish",
        "9300:80",
        "--health-tcp",
        "81",
        "--health-interval",
        "200ms",
    ]);
    // One stable task per node, and one per node that comes and goes.
    let mut stable: Vec<Task> = (1..=3)
        .map(|n| Task::new(&c, &format!("s{n}"), n))
        .collect();
    let mut churn: Vec<Task> = (1..=3)
        .map(|n| Task::new(&c, &format!("k{n}"), n))
        .collect();
    for task in &mut stable {
        task.attach(&c);
    }
    assert!(
        wait_until(PING_WAIT, || (1..=3)
            .all(|n| healthy_tasks(&c, n) == Some(3))),
        "every node lists the 3 stable tasks healthy"
    );
    let vip = c.node(1).json(&["service", "ls"])[0]["vip"]
        .as_str()
        .expect("web has a VIP")
        .to_string();
    let client = c.host("client", CLIENT);
    let captures: Vec<Capture> = std::iter::once(("client", client.as_str()))
        .chain(
            stable
                .iter()
                .chain(&churn)
                .map(|t| (t.name.as_str(), t.netns.as_str())),
        )
        .map(|(name, netns)| Capture::start(&c, name, netns))
        .collect();
    c.exec(
        &client,
        &[
            "sysctl",
            "-qw",
            &format!("net.ipv4.ip_local_port_range={CLIENT_PORTS}"),
        ],
    );
    let u1 = c.container(1, "u1");
    let u3 = c.container(3, "u3");
    c.attach(1, &u1, "soak", &[]);
    c.attach(3, &u3, "soak", &[]);
    // The balancers take the view at their node's next reconcile round.
    std::thread::sleep(Duration::from_millis(1500));

    let secs = LOAD.as_secs().to_string();
    let mesh_targets: Vec<String> = (1..=3).map(|n| format!("{}:9300", node_addr(n))).collect();
    let vip_target = format!("{vip}:80");
    let load = |from: &str, threads: usize, targets: &[String]| {
        let threads = threads.to_string();
        let mut argv = vec!["python3", "-c", LOAD_CLIENTS, &secs, &threads];
        argv.extend(targets.iter().map(String::as_str));
        c.spawn(from, &argv)
    };
    let clients = [
        load(&client, MESH_CLIENTS, &mesh_targets),
        load(&u1, VIP_CLIENTS, std::slice::from_ref(&vip_target)),
        load(&u3, VIP_CLIENTS, std::slice::from_ref(&vip_target)),
    ];
    let started = Instant::now();
    let mut rss_start = None;
    let (mut attaches, mut detaches) = (0, 0);
    // Each detach: (task, when as a Unix time).
    let mut removed: Vec<(String, f64)> = Vec::new();
    let mut next = 0;
    while started.elapsed() + CHURN_EVERY < LOAD {
        if rss_start.is_none() && started.elapsed() >= WARM_UP {
            rss_start = Some(rss_of_daemons(&c));
        }
        let n = churn.len();
        let task = &mut churn[next % n];
        next += 1;
        if task.attached {
            removed.push((task.name.clone(), task.drain_and_detach(&c)));
            detaches += 1;
        } else {
            task.attach(&c);
            attaches += 1;
        }
        std::thread::sleep(CHURN_EVERY);
    }
    // Leave the churned tasks as they are: the clients still run, and a drain would be one more
    // change in flight when they stop.
    let out = |bg: &Bg| std::fs::read_to_string(&bg.log).unwrap_or_default();
    let done = wait_until(
        LOAD.saturating_sub(started.elapsed()) + Duration::from_secs(30),
        || clients.iter().all(|b| out(b).contains("answered")),
    );
    let rss_end = rss_of_daemons(&c);
    let rss_start = rss_start.expect("the load outlasted its warm-up");
    let reports: Vec<Value> = clients
        .iter()
        .map(|b| serde_json::from_str(out(b).trim()).unwrap_or(Value::String(out(b))))
        .collect();
    assert!(done, "clients did not finish: {reports:#?}");
    let answered: u64 = reports
        .iter()
        .map(|r| r["answered"].as_u64().unwrap_or(0))
        .sum();
    let failures: Vec<Failed> = reports
        .iter()
        .flat_map(|r| r["failures"].as_array().into_iter().flatten())
        .map(Failed::from)
        .collect();
    // Client address and port -> (when, task) of each accepted connection.
    let mut accepted: HashMap<String, Vec<(f64, String)>> = HashMap::new();
    for task in stable.iter().chain(&churn) {
        for (at, peer) in task.accepted() {
            accepted
                .entry(peer)
                .or_default()
                .push((at, task.name.clone()));
        }
    }
    // A failure is the removal's when a task took its connection and was detached before it
    // ended.
    let (removals, unexplained): (Vec<&Failed>, Vec<&Failed>) = failures.iter().partition(|f| {
        f.taken_by(&accepted).iter().any(|(at, task)| {
            removed
                .iter()
                .any(|(gone, when)| gone == task && (*at..=f.end).contains(when))
        })
    });
    let mut by_task: BTreeMap<String, u64> = BTreeMap::new();
    for r in &reports {
        for (task, n) in r["by_task"].as_object().into_iter().flatten() {
            *by_task.entry(task.clone()).or_default() += n.as_u64().unwrap_or(0);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "soak: {answered} requests answered in {elapsed:.0} s ({:.0}/s) by {} concurrent clients; {} failed: {} to a task removed under them, {} otherwise; {attaches} attaches and {detaches} drains+detaches",
        answered as f64 / elapsed,
        MESH_CLIENTS + 2 * VIP_CLIENTS,
        failures.len(),
        removals.len(),
        unexplained.len(),
    );
    println!("answered by task: {by_task:?}");
    for n in 1..=3 {
        println!(
            "node {n} daemon VmRSS: {} kB after warm-up, {} kB at the end",
            rss_start[n - 1],
            rss_end[n - 1]
        );
    }
    for n in 1..=3 {
        assert!(c.node(n).daemon_alive(), "node {n}'s daemon died");
    }
    for n in 1..=3 {
        println!(
            "node {n} balancer: {}",
            c.node(n).json(&["status"])["dataplane"]["balancer"]
        );
    }
    let show = |f: &&Failed| {
        format!(
            "{} -> {} from {:.3} to {:.3}: {}; accepted by {:?}",
            f.src,
            f.target,
            f.start,
            f.end,
            f.error,
            f.taken_by(&accepted)
        )
    };
    for f in &removals {
        println!("failed, its task removed under it: {}", show(f));
    }
    for f in &unexplained {
        println!("{}", timeline(&captures, f));
    }
    let unexplained: Vec<String> = unexplained.iter().map(show).collect();
    println!("removals (task, Unix time): {removed:?}");
    assert!(
        unexplained.is_empty(),
        "{} of {answered} requests failed, and not to a task removed under them: {unexplained:#?}",
        unexplained.len()
    );
    for name in ["s1", "s2", "s3", "k1", "k2", "k3"] {
        assert!(
            by_task.get(name).is_some_and(|n| *n > 0),
            "{name} answered nothing: {by_task:?}"
        );
    }
    for n in 1..=3 {
        assert!(
            rss_end[n - 1] <= rss_start[n - 1] + RSS_GROWTH_KB,
            "node {n}'s daemon grew from {} kB to {} kB",
            rss_start[n - 1],
            rss_end[n - 1]
        );
    }
}
