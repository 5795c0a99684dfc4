//! Health checks of the tasks on this node: each task of a service with a check is probed every
//! `interval_ms` over its network's bridge (which holds the gateway address, so the node reaches
//! its own containers directly), and the result is gossiped as `hc/<network id>/<ip>` =
//! `healthy` | `unhealthy` ([`key::health`]). Other nodes read it through
//! [`crate::cluster::View::task_state`].
//!
//! [`Scheduler`] is the pure part: which checks are due, and what to publish, with time passed
//! in. The driver ([`Daemon::check_health_forever`]) runs the probes and writes gossip.
//!
//! # No hysteresis
//! One failed probe makes a task unhealthy and one passing probe makes it healthy again, unlike
//! Docker's default of three retries. A task that stops answering must leave every balancer
//! within 2 seconds; with the default 1 s interval, three retries alone would take 3 s. The probe
//! never crosses the underlay (it goes from the node to a container on the same bridge), so a
//! failure is the container's own, not a lost packet on the way: a flap costs one interval of
//! new flows on the other tasks, a slow reaction costs failed requests.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use super::Daemon;
use crate::cluster::View;
use crate::model::{Check, key};

/// The longest a probe may take; a shorter interval bounds it further.
const PROBE_WITHIN: Duration = Duration::from_secs(1);
/// The shortest interval run, whatever the API was given (the CLI refuses less).
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// How often the driver looks for tasks that came or went.
const TARGETS_EVERY: Duration = Duration::from_millis(250);
/// The most of an HTTP answer read: its status line is all that counts.
const HTTP_HEAD_LIMIT: usize = 4096;

/// A task: (network id, address).
pub type Task = (String, Ipv4Addr);

/// What to check on a task, and how often.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub check: Check,
    pub interval: Duration,
}

/// One check to run now; its result goes back through [`Scheduler::handle_result`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub task: Task,
    /// Tells this run from an earlier one of a task removed and added again meanwhile.
    id: u64,
    pub check: Check,
    pub timeout: Duration,
}

/// A change to this node's gossip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Publish {
    /// The task's check passes (`true`) or fails.
    State(Task, bool),
    /// The task is gone: its result no longer counts.
    Withdraw(Task),
}

#[derive(Debug)]
enum Next {
    Due(Instant),
    Running { id: u64, started: Instant },
}

#[derive(Debug)]
struct Entry {
    target: Target,
    next: Next,
    published: Option<bool>,
}

/// Which tasks are checked when, and which results are new. At most one probe per task runs at
/// a time; each starts one interval after the previous one started.
#[derive(Debug, Default)]
pub struct Scheduler {
    tasks: BTreeMap<Task, Entry>,
    next_id: u64,
    publish: VecDeque<Publish>,
}

impl Scheduler {
    /// The tasks to check from now on. A new task is checked at once; a task that is gone, or
    /// whose check changed, has its result withdrawn (a changed one starts again as new).
    pub fn set_targets(&mut self, now: Instant, targets: BTreeMap<Task, Target>) {
        self.tasks.retain(|task, entry| {
            let keep = targets.get(task) == Some(&entry.target);
            if !keep && entry.published.is_some() {
                self.publish.push_back(Publish::Withdraw(task.clone()));
            }
            keep
        });
        for (task, target) in targets {
            self.tasks.entry(task).or_insert(Entry {
                target,
                next: Next::Due(now),
                published: None,
            });
        }
    }

    /// When the next probe is due, if any task waits for one.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.tasks
            .values()
            .filter_map(|e| match e.next {
                Next::Due(at) => Some(at),
                Next::Running { .. } => None,
            })
            .min()
    }

    /// The probes due at `now`, marked running.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Probe> {
        let mut due = Vec::new();
        for (task, entry) in &mut self.tasks {
            if matches!(entry.next, Next::Due(at) if at <= now) {
                self.next_id += 1;
                entry.next = Next::Running {
                    id: self.next_id,
                    started: now,
                };
                due.push(Probe {
                    task: task.clone(),
                    id: self.next_id,
                    check: entry.target.check.clone(),
                    timeout: entry.target.interval.min(PROBE_WITHIN),
                });
            }
        }
        due
    }

    /// The result of `probe`; ignored if its task went away (or came back) meanwhile.
    pub fn handle_result(&mut self, probe: &Probe, passing: bool) {
        let Some(entry) = self.tasks.get_mut(&probe.task) else {
            return;
        };
        let Next::Running { id, started } = entry.next else {
            return;
        };
        if id != probe.id {
            return;
        }
        entry.next = Next::Due(started + entry.target.interval);
        if entry.published != Some(passing) {
            entry.published = Some(passing);
            self.publish
                .push_back(Publish::State(probe.task.clone(), passing));
        }
    }

    /// The next change to gossip, oldest first.
    pub fn poll_publish(&mut self) -> Option<Publish> {
        self.publish.pop_front()
    }
}

impl Daemon {
    /// Runs the health checks of this node's tasks until the daemon ends.
    pub(super) async fn check_health_forever(self: Arc<Daemon>) {
        // Results gossiped before a restart of this loop belong to a scheduler that is gone:
        // withdraw them, and the first probes (due at once) publish afresh.
        let stale: Vec<String> = self
            .gossip
            .own_keys()
            .await
            .into_keys()
            .filter(|k| k.starts_with(key::HEALTH_PREFIX))
            .collect();
        self.gossip.update(&[], &stale).await;
        let mut scheduler = Scheduler::default();
        let (finished, mut results) = tokio::sync::mpsc::unbounded_channel::<(Probe, bool)>();
        let mut refresh = tokio::time::interval(TARGETS_EVERY);
        loop {
            let due = scheduler.poll_timeout();
            tokio::select! {
                _ = refresh.tick() => {
                    let targets = local_targets(&*self.view().await, &self.id);
                    scheduler.set_targets(Instant::now(), targets);
                }
                Some((probe, passing)) = results.recv() => scheduler.handle_result(&probe, passing),
                () = sleep_until(due) => {}
            }
            for probe in scheduler.handle_timeout(Instant::now()) {
                let finished = finished.clone();
                tokio::spawn(async move {
                    let passing = run(&probe).await;
                    let _ = finished.send((probe, passing));
                });
            }
            self.publish_health(&mut scheduler).await;
        }
    }

    async fn publish_health(&self, scheduler: &mut Scheduler) {
        let (mut set, mut delete) = (Vec::new(), Vec::new());
        while let Some(change) = scheduler.poll_publish() {
            match change {
                Publish::State((network_id, ip), passing) => {
                    let state = if passing {
                        key::HEALTHY
                    } else {
                        key::UNHEALTHY
                    };
                    // Every node logs the task's change as a cluster event (`crate::events`).
                    debug!(network_id, %ip, state, "task health published");
                    set.push((key::health(&network_id, ip), state.to_string()));
                }
                Publish::Withdraw((network_id, ip)) => {
                    debug!(network_id, %ip, "task gone; its health withdrawn");
                    delete.push(key::health(&network_id, ip));
                }
            }
        }
        self.gossip.update(&set, &delete).await;
    }
}

/// The tasks this node checks: its own, announced (plugged in), of a service with a check.
fn local_targets(view: &View, self_id: &str) -> BTreeMap<Task, Target> {
    view.tasks
        .iter()
        .filter(|t| t.node == self_id)
        .filter(|t| {
            view.endpoints.iter().any(|p| {
                p.node == self_id && p.endpoint.network_id == t.network_id && p.endpoint.ip == t.ip
            })
        })
        .filter_map(|t| {
            let health = view.services.get(&t.service)?.health.as_ref()?;
            let target = Target {
                check: health.check.clone(),
                interval: Duration::from_millis(health.interval_ms).max(MIN_INTERVAL),
            };
            Some(((t.network_id.clone(), t.ip), target))
        })
        .collect()
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Runs one probe: whether the check passed within its timeout.
async fn run(probe: &Probe) -> bool {
    let ip = probe.task.1;
    let checked = tokio::time::timeout(probe.timeout, async {
        match &probe.check {
            Check::Tcp { port } => TcpStream::connect((ip, *port)).await.map(|_| true),
            Check::Http { port, path } => http_get(ip, *port, path).await,
        }
    })
    .await;
    match checked {
        Ok(Ok(passing)) => passing,
        Ok(Err(err)) => {
            debug!(%ip, %err, "health probe failed");
            false
        }
        Err(_) => {
            debug!(%ip, timeout = ?probe.timeout, "health probe timed out");
            false
        }
    }
}

/// `GET path HTTP/1.0`: whether the status is 2xx or 3xx.
async fn http_get(ip: Ipv4Addr, port: u16, path: &str) -> std::io::Result<bool> {
    let Some(request) = http_request(ip, port, path) else {
        return Ok(false);
    };
    let mut stream = TcpStream::connect((ip, port)).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(HTTP_HEAD_LIMIT);
    let mut limited = (&mut stream).take(HTTP_HEAD_LIMIT as u64);
    let mut chunk = [0u8; 512];
    loop {
        let n = limited.read(&mut chunk).await?;
        head.extend_from_slice(&chunk[..n]);
        if let Some(passing) = status_passes(&head) {
            return Ok(passing);
        }
        if n == 0 {
            return Ok(false);
        }
    }
}

/// The request line and headers, or `None` for a path that would break them (the CLI refuses
/// such paths; the API does not check).
fn http_request(ip: Ipv4Addr, port: u16, path: &str) -> Option<String> {
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    Some(format!(
        "GET {path} HTTP/1.0\r\nHost: {ip}:{port}\r\nUser-Agent: overlayd-health\r\nConnection: close\r\n\r\n"
    ))
}

/// Whether an answer starting with `head` passes (status 2xx or 3xx); `None` until the status
/// line is complete.
fn status_passes(head: &[u8]) -> Option<bool> {
    let end = head.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&head[..end]).ok();
    let status = line.and_then(|l| {
        let mut words = l.split_whitespace();
        let version = words.next()?;
        let code: u16 = words.next()?.parse().ok()?;
        version.starts_with("HTTP/").then_some(code)
    });
    Some(status.is_some_and(|code| (200..400).contains(&code)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn task(last: u8) -> Task {
        ("w".to_string(), Ipv4Addr::new(198, 19, 0, last))
    }

    fn tcp(interval_ms: u64) -> Target {
        Target {
            check: Check::Tcp { port: 8080 },
            interval: Duration::from_millis(interval_ms),
        }
    }

    fn targets(list: &[(u8, Target)]) -> BTreeMap<Task, Target> {
        list.iter().map(|(l, t)| (task(*l), t.clone())).collect()
    }

    fn published(s: &mut Scheduler) -> Vec<Publish> {
        std::iter::from_fn(|| s.poll_publish()).collect()
    }

    #[test]
    fn a_new_task_is_probed_at_once_then_every_interval_from_the_start_of_the_last_probe() {
        let t0 = Instant::now();
        let mut s = Scheduler::default();
        assert_eq!(s.poll_timeout(), None, "nothing to check");
        s.set_targets(t0, targets(&[(2, tcp(300))]));
        assert_eq!(s.poll_timeout(), Some(t0));
        let probes = s.handle_timeout(t0);
        assert_eq!(probes.len(), 1);
        assert_eq!(probes[0].task, task(2));
        assert_eq!(
            probes[0].timeout,
            Duration::from_millis(300),
            "bounded by the interval"
        );
        assert_eq!(s.poll_timeout(), None, "one probe at a time per task");
        assert!(s.handle_timeout(t0 + SECOND).is_empty());

        s.handle_result(&probes[0], true);
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_millis(300)));
        assert!(s.handle_timeout(t0 + Duration::from_millis(299)).is_empty());
        let again = s.handle_timeout(t0 + Duration::from_millis(300));
        assert_eq!(again.len(), 1);
        assert_ne!(again[0], probes[0], "a new run");
    }

    #[test]
    fn the_timeout_is_at_most_a_second() {
        let t0 = Instant::now();
        let mut s = Scheduler::default();
        s.set_targets(t0, targets(&[(2, tcp(5000))]));
        assert_eq!(s.handle_timeout(t0)[0].timeout, SECOND);
    }

    #[test]
    fn only_changes_are_published_and_one_result_flips_the_state() {
        let t0 = Instant::now();
        let mut s = Scheduler::default();
        s.set_targets(t0, targets(&[(2, tcp(100))]));
        let mut now = t0;
        let mut seen = Vec::new();
        for passing in [true, true, false, false, true] {
            let probes = s.handle_timeout(now);
            assert_eq!(probes.len(), 1, "at {:?}", now - t0);
            s.handle_result(&probes[0], passing);
            seen.push(published(&mut s));
            now = s.poll_timeout().unwrap();
        }
        let state = |p| vec![Publish::State(task(2), p)];
        assert_eq!(
            seen,
            [state(true), vec![], state(false), vec![], state(true)]
        );
    }

    #[test]
    fn a_task_that_goes_away_is_withdrawn_and_its_late_result_ignored() {
        let t0 = Instant::now();
        let mut s = Scheduler::default();
        s.set_targets(t0, targets(&[(2, tcp(100)), (3, tcp(100))]));
        let probes = s.handle_timeout(t0);
        assert_eq!(probes.len(), 2);
        s.handle_result(&probes[0], true);
        assert_eq!(published(&mut s), [Publish::State(task(2), true)]);

        // Task 2 (published) and task 3 (probe still running, nothing published) go away.
        s.set_targets(t0, BTreeMap::new());
        assert_eq!(published(&mut s), [Publish::Withdraw(task(2))]);
        s.handle_result(&probes[1], false);
        assert_eq!(published(&mut s), [], "the late result of a gone task");
        assert_eq!(s.poll_timeout(), None);

        // Task 3 comes back before its old probe ends: the old result does not count for it.
        s.set_targets(t0, targets(&[(3, tcp(100))]));
        let fresh = s.handle_timeout(t0);
        s.handle_result(&probes[1], false);
        assert_eq!(published(&mut s), []);
        s.handle_result(&fresh[0], true);
        assert_eq!(published(&mut s), [Publish::State(task(3), true)]);
    }

    /// A scheduler whose one task (`task(2)`) passed its first probe at `t0`, published.
    fn healthy(t0: Instant, target: Target) -> Scheduler {
        let mut s = Scheduler::default();
        s.set_targets(t0, targets(&[(2, target)]));
        let probes = s.handle_timeout(t0);
        s.handle_result(&probes[0], true);
        assert_eq!(published(&mut s), [Publish::State(task(2), true)]);
        s
    }

    #[test]
    fn a_changed_check_starts_again_as_a_new_task() {
        let t0 = Instant::now();
        let mut s = healthy(t0, tcp(100));
        let later = t0 + Duration::from_millis(50);
        s.set_targets(later, targets(&[(2, tcp(500))]));
        assert_eq!(published(&mut s), [Publish::Withdraw(task(2))]);
        assert_eq!(s.poll_timeout(), Some(later), "checked at once");
        assert_eq!(
            s.handle_timeout(later)[0].timeout,
            Duration::from_millis(500)
        );
    }

    #[test]
    fn unchanged_targets_keep_their_schedule() {
        let t0 = Instant::now();
        let mut s = healthy(t0, tcp(300));
        s.set_targets(t0 + Duration::from_millis(250), targets(&[(2, tcp(300))]));
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_millis(300)));
        assert_eq!(published(&mut s), [], "nothing new");
    }

    #[test]
    fn http_status_lines_pass_on_2xx_and_3xx_only() {
        let cases: [(&[u8], Option<bool>); 8] = [
            (b"HTTP/1.0 200 OK\r\n", Some(true)),
            (b"HTTP/1.1 302 Found\r\nLocation: /\r\n", Some(true)),
            (b"HTTP/1.1 404 Not Found\r\n", Some(false)),
            (b"HTTP/1.1 500 Oops\n", Some(false)),
            (b"HTTP/1.1 199 Early\r\n", Some(false)),
            (b"SSH-2.0-OpenSSH\r\n", Some(false)),
            (b"\xff\xfe 200\n", Some(false)),
            (b"HTTP/1.1 200 O", None),
        ];
        for (head, want) in cases {
            assert_eq!(
                status_passes(head),
                want,
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn http_requests_carry_the_host_and_refuse_paths_that_break_the_request() {
        let ip = Ipv4Addr::new(198, 19, 0, 2);
        assert_eq!(
            http_request(ip, 80, "/healthz")
                .unwrap()
                .lines()
                .take(2)
                .collect::<Vec<_>>(),
            ["GET /healthz HTTP/1.0", "Host: 198.19.0.2:80"]
        );
        for bad in ["/a b", "/a\r\nX: y", "healthz", ""] {
            assert_eq!(http_request(ip, 80, bad), None, "{bad:?}");
        }
    }
}
