//! Node death: node 3's daemon is killed with SIGKILL, and its task must leave the balancers of
//! nodes 1 and 2 within [`REMOVED_WITHIN`]. Measured two ways on each surviving node, and
//! printed: when its `service ps` first shows the task down (polled every few ms), and when the
//! last new connection from a client on that node to the VIP failed (clients open a connection
//! every few ms; one that the balancer still sends to the dead task times out). Needs root (CI
//! runs as root).

mod netns;

use std::fs;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use netns::mesh::mesh_cluster;
use netns::{Cluster, PING_WAIT, wait_until};

/// The promise: a dead node's tasks get no new connection after this.
const REMOVED_WITHIN: Duration = Duration::from_secs(2);
/// How long the clients keep connecting after the kill.
const WATCH_FOR: Duration = Duration::from_secs(6);

/// Opens a new connection to ARGV1:80 from each of 8 threads, one after the other, for ARGV2
/// seconds, each with a 0.5 s timeout (so a thread caught by the dead task is back within
/// half a second), and prints "START ok NAME" or "START failed" for each (START
/// is the Unix time it began). A connection the balancer sends to a dead task times out.
const PROBE: &str = r#"
import socket, sys, threading, time
vip, end = sys.argv[1], time.time() + float(sys.argv[2])
lock = threading.Lock()
def probe():
    while time.time() < end:
        start = time.time()
        try:
            s = socket.create_connection((vip, 80), timeout=0.5)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            answer = s.makefile().read().split()[-2]
            s.close()
            line = "%.3f ok %s" % (start, answer)
        except OSError as e:
            line = "%.3f failed %s %.3f" % (start, type(e).__name__, time.time() - start)
        with lock:
            print(line, flush=True)
        time.sleep(0.02)
threads = [threading.Thread(target=probe) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
"#;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// The state node `i`'s `service ps search` gives the task at `ip`.
fn state_of(c: &Cluster, i: usize, ip: &str) -> String {
    c.node(i)
        .try_json(&["service", "ps", "search"])
        .ok()
        .and_then(|ps| {
            ps.as_array()?
                .iter()
                .find(|t| t["ip"] == ip)
                .and_then(|t| t["state"].as_str().map(String::from))
        })
        .unwrap_or_default()
}

#[test]
fn a_dead_nodes_task_leaves_every_other_balancer_within_two_seconds() {
    let (c, _servers) = mesh_cluster("death");
    let ls = c.node(1).json(&["service", "ls"]);
    let vip = ls[0]["vip"].as_str().expect("search has a VIP").to_string();
    let ps = c.node(1).json(&["service", "ps", "search"]);
    let dead_task = ps
        .as_array()
        .expect("service ps is a list")
        .iter()
        .find(|t| t["netns"].as_str().is_some_and(|n| n.ends_with("-t3")))
        .and_then(|t| t["ip"].as_str())
        .expect("t3 is listed")
        .to_string();
    let clients: Vec<String> = [1, 2]
        .iter()
        .map(|&n| {
            let ns = c.container(n, &format!("client{n}"));
            c.attach(n, &ns, "app", &[]);
            ns
        })
        .collect();
    // Every client reaches every task before the kill (so a failure after it is the kill's).
    for ns in &clients {
        assert!(
            wait_until(PING_WAIT, || {
                let out = c.exec(ns, &["python3", "-c", PROBE, &vip, "1"]);
                let text = String::from_utf8_lossy(&out.stdout);
                ["t1", "t2", "t3"]
                    .iter()
                    .all(|t| text.contains(&format!(" ok {t}")))
                    && !text.contains("failed")
            }),
            "{ns} does not reach every task through {vip}"
        );
    }

    let probes: Vec<_> = clients
        .iter()
        .map(|ns| {
            c.spawn(
                ns,
                &[
                    "python3",
                    "-c",
                    PROBE,
                    &vip,
                    &(WATCH_FOR.as_secs_f64() + 10.0).to_string(),
                ],
            )
        })
        .collect();
    // Killed once every client is connecting (Python starts slowly on a busy machine).
    assert!(
        wait_until(Duration::from_secs(10), || probes.iter().all(|p| {
            fs::read_to_string(&p.log).is_ok_and(|l| l.matches(" ok ").count() >= 20)
        })),
        "the clients did not start connecting"
    );
    let killed_at = unix_now();
    c.node(3).kill_daemon();
    let killed = Instant::now();

    // Each survivor's view, polled side by side.
    let marked_down: Vec<Option<Duration>> = thread::scope(|s| {
        let polls: Vec<_> = [1, 2]
            .map(|n| {
                let (c, dead_task) = (&c, &dead_task);
                s.spawn(move || {
                    wait_until(Duration::from_secs(10), || {
                        state_of(c, n, dead_task) == "down"
                    })
                    .then(|| killed.elapsed())
                })
            })
            .into();
        polls
            .into_iter()
            .map(|p| p.join().expect("poll thread"))
            .collect()
    });
    let left = WATCH_FOR.saturating_sub(killed.elapsed());
    thread::sleep(left);

    let mut report = Vec::new();
    let mut slowest = Duration::ZERO;
    for ((n, probe), down) in [1, 2].iter().zip(&probes).zip(&marked_down) {
        let log = fs::read_to_string(&probe.log).unwrap_or_default();
        // (start after the kill, outcome) of each connection begun after it.
        let after: Vec<(f64, &str)> = log
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let start = words.next()?.parse::<f64>().ok()? - killed_at;
                let outcome = match (words.next()?, words.next()?) {
                    ("ok", _) => "ok",
                    (_, "TimeoutError") => "timeout",
                    _ => "other",
                };
                (start >= 0.0).then_some((start, outcome))
            })
            .collect();
        // A connection sent to the dead task is never answered: it times out.
        let last_failed = after
            .iter()
            .filter(|(_, o)| *o == "timeout")
            .map(|(t, _)| *t)
            .fold(0.0, f64::max);
        let late_ok = after
            .iter()
            .filter(|(t, o)| *o == "ok" && *t > last_failed)
            .count();
        let other: Vec<String> = log
            .lines()
            .filter(|l| l.contains("failed") && !l.contains("TimeoutError"))
            .map(String::from)
            .collect();
        if !other.is_empty() {
            println!(
                "node {n}'s client: {} connections failed otherwise than by a timeout (not \
                 sent to the dead task), first: {:?}",
                other.len(),
                other.first()
            );
        }
        let down = down.unwrap_or_else(|| panic!("node {n} never showed t3 down"));
        report.push(format!(
            "node {n}: `service ps` shows t3 down {:.2} s after the kill; last new connection \
             to the dead task started {last_failed:.2} s after it ({} connections after the \
             kill, {late_ok} answered after the last failure)",
            down.as_secs_f64(),
            after.len()
        ));
        assert!(
            late_ok > 0,
            "node {n}'s client got no answer after the kill: {log}"
        );
        slowest = slowest.max(down).max(Duration::from_secs_f64(last_failed));
    }
    for line in &report {
        println!("{line}");
    }
    assert!(
        slowest <= REMOVED_WITHIN,
        "the dead node's task left the balancers only after {slowest:?}: {report:#?}"
    );
}
