//! Real-kernel cluster harness for the integration tests.
//!
//! A [`Cluster`] is a "switch" network namespace holding a Linux bridge, and N node namespaces
//! plugged into it with a veth whose node end is `eth0` (underlay `198.18.0.<i>/24`, MTU 1500).
//! Node 1 runs `overlayd init`, the others `overlayd join` with the token node 1 handed out.
//! Containers are plain network namespaces; extra hosts on the switch (a kernel VXLAN node, a
//! non-member sender) are made with [`Cluster::host`].
//!
//! Every name starts with `ovt-<test>-<pid>-` so tests in one binary (threads, same pid) and in
//! several binaries (same test name, other pid) never clash, and `scripts/test.sh` can remove what
//! a killed run left behind (it deletes `ovt-*-<pid>-*` namespaces whose pid is gone). Interface
//! names are only ever created inside a test's own namespaces, never in the root namespace.
//!
//! Everything is undone in `Drop`, on success and on panic: daemons and helper processes are
//! killed, namespaces deleted, the temp dir removed (kept when `OVT_KEEP` is set). When the test
//! is failing, the daemon logs are printed first so a CI failure can be read from its output.
//!
//! Every wait is bounded: CLI calls time out after [`CLI_TIMEOUT`], polls take a deadline.
#![allow(dead_code)]

pub mod docker;
pub mod mesh;

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_overlayd");

/// Longest any single CLI or helper command may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a cluster may take to form (token written, every node `ready` everywhere).
pub const FORM_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a container may take to reach another one (ARP, tables published on every node).
pub const PING_WAIT: Duration = Duration::from_secs(10);

/// Port of the [`TCP_SERVER`] sinks, and how much a TCP check sends to one.
pub const TCP_PORT: u16 = 5001;
pub const TCP_BYTES: usize = 1 << 20;

/// Set (to `1`, `true`, `yes` or `on`) to run every daemon the harness starts with
/// `--no-offloads`: `scripts/test.sh` runs the netns suite once with offloads on and once with
/// them forced off, the fallback path for kernels that refuse them.
pub const NO_OFFLOADS_ENV: &str = "OVERLAYD_NO_OFFLOADS";

/// Whether this run forces the daemons' offloads off (see [`NO_OFFLOADS_ENV`]).
pub fn offloads_forced_off() -> bool {
    std::env::var(NO_OFFLOADS_ENV).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// Underlay address of node `i` (1-based).
pub fn node_addr(i: usize) -> String {
    format!("198.18.0.{i}")
}

/// Panics unless the effective uid is 0, and unless the tools the tests drive are installed.
pub fn require_root() {
    let status = fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    assert!(
        euid == "0",
        "needs root: this test builds network namespaces (euid is {euid}); run scripts/test.sh as root"
    );
    for tool in ["ip", "bridge", "ping", "python3", "nft"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "needs `{tool}` on PATH (scripts/test.sh installs it)"
        );
    }
}

/// Runs `cmd` to completion with stdin closed, collecting its output; panics if it cannot be
/// started or has not exited after `timeout` (it is killed first).
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = describe(cmd);
    run_bounded(cmd, timeout).unwrap_or_else(|| panic!("timed out after {timeout:?}: {desc}"))
}

/// Like [`run`], but returns `None` (after killing it) if the command is still running at the
/// deadline, for commands that are expected to exit and where hanging is the failure.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Option<Output> {
    let desc = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {desc}: {e}"));
    let readers = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn Read + Send>),
    ]
    .map(|pipe| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for {desc}: {e}"),
        }
    };
    let [out, err] = readers.map(|r| r.join().unwrap_or_default());
    status.map(|status| Output {
        status,
        stdout: out,
        stderr: err,
    })
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Human-readable summary of a finished command, for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "exit: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// Runs a host command (in the root namespace) and panics unless it succeeds.
pub fn sh(args: &[&str]) -> String {
    let out = run(Command::new(args[0]).args(&args[1..]), CLI_TIMEOUT);
    stdout_of_success(out, &format!("`{}`", args.join(" ")))
}

/// The stdout of a command that must have succeeded; `what` names it in the panic otherwise.
fn stdout_of_success(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed\n{}", show(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `check` every 100 ms until it returns `Ok`, for at most `timeout`; panics with `what`
/// and the last error otherwise.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut tries = 0u32;
    loop {
        tries += 1;
        match check() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} ({tries} tries) waiting for {what}; last: {e}")
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Polls `cond` until it is true, for at most `timeout`; returns whether it became true.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A background process (TCP server, daemon) killed when dropped.
pub struct Bg {
    child: Child,
    what: String,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Bg {
    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One overlayd node: its namespace, files and daemon.
pub struct Node {
    pub index: usize,
    pub netns: String,
    pub addr: String,
    pub state_dir: PathBuf,
    pub api: PathBuf,
    pub log: PathBuf,
    /// Added to every daemon command line of this node (see [`Cluster::with_daemon_args`]).
    daemon_extra: Vec<String>,
    daemon: Mutex<Option<Child>>,
}

impl Node {
    /// Runs `overlayd ARGS` inside this node's namespace against its API socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        run(&mut self.cli_command(args), CLI_TIMEOUT)
    }

    /// The command [`Node::cli`] runs, for callers that spawn it themselves.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = overlayd_in(&self.netns, args);
        cmd.env("OVERLAYD_API", &self.api)
            .env_remove(NO_OFFLOADS_ENV) // a daemon setting, given to daemons as a flag
            .env("RUST_BACKTRACE", "1");
        cmd
    }

    /// Runs the CLI and panics unless it succeeds; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        stdout_of_success(
            out,
            &format!("node {}: `overlayd {}`", self.index, args.join(" ")),
        )
    }

    /// Runs the CLI with `--json` appended and parses stdout; `Err` says why not.
    pub fn try_json(&self, args: &[&str]) -> Result<Value, String> {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.cli(&args);
        if !out.status.success() {
            return Err(format!("`overlayd {}`: {}", args.join(" "), show(&out)));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "`overlayd {}` printed no JSON ({e}): {}",
                args.join(" "),
                show(&out)
            )
        })
    }

    /// Runs the CLI with `--json` appended; panics unless it succeeds with JSON on stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        self.try_json(args)
            .unwrap_or_else(|e| panic!("node {}: {e}", self.index))
    }

    /// `node ls --json` as (address, state) pairs.
    pub fn members(&self) -> Result<Vec<(String, String)>, String> {
        let v = self.try_json(&["node", "ls"])?;
        let arr = v
            .as_array()
            .ok_or_else(|| format!("node ls is not a JSON array: {v}"))?;
        Ok(arr
            .iter()
            .map(|n| (str_field(n, "address"), str_field(n, "state")))
            .collect())
    }

    /// `network ls --json`, the entry named `name` if any.
    pub fn network(&self, name: &str) -> Result<Option<Value>, String> {
        let v = self.try_json(&["network", "ls"])?;
        let arr = v
            .as_array()
            .ok_or_else(|| format!("network ls is not a JSON array: {v}"))?;
        Ok(arr.iter().find(|n| n["name"] == name).cloned())
    }

    /// `status --json`, the data-plane drop counter `reason` (0 when absent).
    pub fn drops(&self, reason: &str) -> u64 {
        let v = self.json(&["status"]);
        v["dataplane"]["drops"][reason].as_u64().unwrap_or(0)
    }

    /// Whether the daemon process is still running.
    pub fn daemon_alive(&self) -> bool {
        let mut d = lock(&self.daemon);
        matches!(d.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The daemon's pid, if it runs (`ip netns exec` execs, so this is overlayd itself).
    pub fn daemon_pid(&self) -> Option<u32> {
        lock(&self.daemon).as_ref().map(Child::id)
    }

    /// Kills the daemon with SIGKILL (a crash, not a graceful leave) and reaps it.
    pub fn kill_daemon(&self) {
        if let Some(mut c) = lock(&self.daemon).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the daemon as its supervisor would (SIGTERM: it keeps the node's data path for
    /// `run`), waits at most `timeout` for it to exit, and returns how it exited; panics (after
    /// a SIGKILL) if it has not by then.
    pub fn stop_daemon(&self, timeout: Duration) -> std::process::ExitStatus {
        self.signal_daemon("-TERM", timeout)
    }

    /// Stops the daemon for good as Ctrl-C would (SIGINT: it removes what it made on the
    /// host); as [`Node::stop_daemon`] otherwise.
    pub fn interrupt_daemon(&self, timeout: Duration) -> std::process::ExitStatus {
        self.signal_daemon("-INT", timeout)
    }

    fn signal_daemon(&self, signal: &str, timeout: Duration) -> std::process::ExitStatus {
        let mut child = lock(&self.daemon)
            .take()
            .unwrap_or_else(|| panic!("node {}: no daemon to stop", self.index));
        let pid = child.id().to_string();
        let _ = run(Command::new("kill").args([signal, &pid]), CLI_TIMEOUT);
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "node {}: overlayd did not exit within {timeout:?} of {signal}",
                        self.index
                    );
                }
            }
        }
    }

    /// Starts the daemon with `args` (`init ...`/`join ...`), output appended to the node's log.
    /// When the run forces offloads off ([`offloads_forced_off`]), `--no-offloads` is added.
    pub fn start_daemon(&self, mut args: Vec<String>) {
        if offloads_forced_off() && !args.iter().any(|a| a == "--no-offloads") {
            args.push("--no-offloads".to_owned());
        }
        args.extend(self.daemon_extra.iter().cloned());
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.log.display()));
        let err = log.try_clone().expect("cloning log handle");
        let child = overlayd_in(&self.netns, &args)
            .env_remove("OVERLAYD_API")
            // Passed as `--no-offloads` above, in whatever spelling the run used.
            .env_remove(NO_OFFLOADS_ENV)
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1") // plain logs in files and CI output
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting overlayd on node {}: {e}", self.index));
        let old = lock(&self.daemon).replace(child);
        assert!(
            old.is_none(),
            "node {}: start_daemon while a daemon runs",
            self.index
        );
    }

    /// `verb_args` followed by this node's own state dir and API socket: every daemon verb
    /// (`init`, `join`, `run`) needs both, so daemons side by side never share them.
    pub fn daemon_args(&self, verb_args: &[&str]) -> Vec<String> {
        let own = [
            "--state-dir",
            &self.state_dir.to_string_lossy(),
            "--api",
            &self.api.to_string_lossy(),
        ]
        .map(String::from);
        strings(verb_args).into_iter().chain(own).collect()
    }

    /// Kills the daemon (a crash) and restarts it in place with `overlayd run` on the same
    /// state dir and API socket: the same member, not a new node.
    pub fn restart_daemon(&self) {
        self.kill_daemon();
        self.run_daemon();
    }

    /// Starts the stopped daemon again with `overlayd run` on the same state dir and API
    /// socket.
    pub fn run_daemon(&self) {
        self.start_daemon(self.daemon_args(&["run"]));
    }

    /// The daemon log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn panic_if_dead(&self, doing: &str) {
        let exited = lock(&self.daemon).as_mut().map(|c| c.try_wait());
        if let Some(Ok(Some(status))) = exited {
            panic!(
                "node {}: overlayd exited ({status}) while {doing}; log:\n{}",
                self.index,
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// `overlayd ARGS` run inside namespace `netns`.
pub fn overlayd_in(netns: &str, args: &[impl AsRef<std::ffi::OsStr>]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, BIN]).args(args);
    cmd
}

/// Locks `m`, also after a panic elsewhere poisoned it (cleanup must still run).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn str_field(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_owned()
}

/// What `attach --json` reported.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub netns: String,
    /// Address without prefix length.
    pub ip: String,
    pub mac: String,
    pub node: String,
}

impl Attachment {
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let ip = v["ip"]
            .as_str()
            .ok_or_else(|| format!("attach JSON has no \"ip\": {v}"))?;
        Ok(Self {
            netns: str_field(v, "netns"),
            ip: ip.split('/').next().unwrap_or(ip).to_owned(),
            mac: str_field(v, "mac"),
            node: str_field(v, "node"),
        })
    }
}

/// A switch namespace, N overlayd nodes on it, and whatever else a test adds.
pub struct Cluster {
    pub prefix: String,
    pub dir: PathBuf,
    pub switch: String,
    pub nodes: Vec<Node>,
    /// Namespaces made after the nodes (containers, extra hosts), deleted first.
    extra: Mutex<Vec<String>>,
    /// Numbers switch ports of extra hosts and helper logs.
    seq: AtomicUsize,
}

impl Cluster {
    /// Builds the switch and `n` node namespaces without starting any daemon.
    pub fn bare(name: &str, n: usize) -> Self {
        require_root();
        assert!(
            !name.is_empty() && name.len() <= 12 && name.bytes().all(|b| b.is_ascii_alphanumeric()),
            "cluster name must be 1-12 ASCII alphanumerics: {name:?}"
        );
        let prefix = format!("ovt-{name}-{}", std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let switch = format!("{prefix}-sw");
        let nodes = (1..=n)
            .map(|i| Node {
                index: i,
                netns: format!("{prefix}-n{i}"),
                addr: node_addr(i),
                state_dir: dir.join(format!("n{i}-state")),
                api: dir.join(format!("n{i}.sock")),
                log: dir.join(format!("n{i}.log")),
                daemon_extra: Vec::new(),
                daemon: Mutex::new(None),
            })
            .collect();
        // Constructed before any namespace exists so Drop cleans up a half-built cluster.
        let c = Self {
            prefix,
            dir,
            switch,
            nodes,
            extra: Mutex::new(Vec::new()),
            seq: AtomicUsize::new(0),
        };
        add_netns(&c.switch);
        ip(&["-n", &c.switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &c.switch, "link", "set", "br0", "up"]);
        for node in &c.nodes {
            add_netns(&node.netns);
            c.plug(&node.netns, &format!("n{}", node.index), &node.addr);
        }
        c
    }

    /// Builds `n` nodes, starts `init` on node 1 and `join` on the others, and waits until every
    /// node lists every node as ready.
    pub fn new(name: &str, n: usize) -> Self {
        Self::with_daemon_args(name, n, &[])
    }

    /// Like [`Cluster::new`], with `extra` added to every daemon's command line (also after a
    /// restart): a data-path setting such as `--conntrack-tcp-idle 3`.
    pub fn with_daemon_args(name: &str, n: usize, extra: &[&str]) -> Self {
        Self::with_node_args(name, n, |_| extra.to_vec())
    }

    /// Like [`Cluster::with_daemon_args`], with `extra(i)` added to node `i`'s daemon (1-based):
    /// a flag only one node may have, such as `--docker-plugin`.
    pub fn with_node_args<'a>(name: &str, n: usize, extra: impl Fn(usize) -> Vec<&'a str>) -> Self {
        let mut c = Self::bare(name, n);
        for node in &mut c.nodes {
            node.daemon_extra = strings(&extra(node.index));
        }
        let first = &c.nodes[0];
        first.start_daemon(first.daemon_args(&["init", "--advertise-addr", &first.addr]));
        let token = c.token();
        for node in &c.nodes[1..] {
            node.start_daemon(c.join_args(node, &token));
        }
        c.wait_all_ready(FORM_TIMEOUT);
        c
    }

    /// Node `i`, 1-based.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i - 1]
    }

    /// The Raft leader as node `i` sees it: its underlay address, if one leads.
    pub fn leader(&self, i: usize) -> Option<String> {
        let ls = self.node(i).try_json(&["node", "ls"]).ok()?;
        ls.as_array()?
            .iter()
            .find(|n| n["raft"] == "leader")
            .and_then(|n| n["address"].as_str().map(String::from))
    }

    /// The join token of node 1: `<state-dir>/join-token`, else the `--token TOKEN` line it printed.
    pub fn token(&self) -> String {
        let first = &self.nodes[0];
        wait_for(FORM_TIMEOUT, "node 1 to hand out a join token", || {
            first.panic_if_dead("waiting for the join token");
            // A complete file ends with a newline (one write); else read the printed line.
            if let Ok(t) = fs::read_to_string(first.state_dir.join("join-token"))
                && t.ends_with('\n')
                && !t.trim().is_empty()
            {
                return Ok(t.trim().to_owned());
            }
            token_in(&first.log_text())
                .ok_or_else(|| "no join-token file and no `--token` line yet".into())
        })
    }

    /// Kills node `i`'s daemon, wipes its state dir and API socket, and starts it again as a new
    /// node joining through node 1 (`i` >= 2).
    pub fn rejoin(&self, i: usize) {
        assert!(i >= 2, "node 1 made the cluster; only nodes 2.. can rejoin");
        let node = self.node(i);
        node.kill_daemon();
        let _ = fs::remove_dir_all(&node.state_dir);
        let _ = fs::remove_file(&node.api);
        node.start_daemon(self.join_args(node, &self.token()));
    }

    /// `join <node 1> --token TOKEN ...` for `node`, with its own state dir and API socket.
    pub fn join_args(&self, node: &Node, token: &str) -> Vec<String> {
        node.daemon_args(&[
            "join",
            &self.nodes[0].addr,
            "--token",
            token,
            "--advertise-addr",
            &node.addr,
        ])
    }

    /// Waits until every node's `node ls` shows every node, all `ready`.
    pub fn wait_all_ready(&self, timeout: Duration) {
        let all: Vec<usize> = (1..=self.nodes.len()).collect();
        self.wait_ready(&all, timeout);
    }

    /// Waits until each of the nodes `of` (1-based) lists all of them as `ready`.
    pub fn wait_ready(&self, of: &[usize], timeout: Duration) {
        let want: Vec<String> = of.iter().map(|&i| self.node(i).addr.clone()).collect();
        for node in of.iter().map(|&i| self.node(i)) {
            wait_for(
                timeout,
                &format!("node {} to list all {} nodes ready", node.index, want.len()),
                || {
                    node.panic_if_dead("waiting for the cluster to form");
                    let members = node.members()?;
                    let ready = want.iter().all(|a| {
                        members
                            .iter()
                            .any(|(addr, state)| addr == a && state == "ready")
                    });
                    if ready {
                        Ok(())
                    } else {
                        Err(format!("node ls: {members:?}"))
                    }
                },
            );
        }
    }

    /// Waits until every live node lists network `name` and has made its bridge and TAP;
    /// returns the last node's entry. `network create` returns once the network is committed
    /// and made on the node that ran it; the others make it as the commit reaches them.
    pub fn wait_network_everywhere(&self, name: &str) -> Value {
        let mut entry = Value::Null;
        for node in self.nodes.iter().filter(|n| n.daemon_alive()) {
            entry = wait_for(
                Duration::from_secs(20),
                &format!("network {name} made on node {}", node.index),
                || {
                    let entry = node
                        .network(name)?
                        .ok_or_else(|| "not listed yet".to_owned())?;
                    let vni = entry["vni"].as_u64().ok_or("no vni in network ls")?;
                    match [format!("ovbr-{vni}"), format!("ovtap-{vni}")]
                        .into_iter()
                        .find(|dev| !self.has_link(&node.netns, dev))
                    {
                        Some(dev) => Err(format!("no {dev} yet")),
                        None => Ok(entry),
                    }
                },
            );
        }
        entry
    }

    /// Creates a container namespace `<prefix>-<name>` (lo up) meant to be attached on `node`.
    pub fn container(&self, node: usize, name: &str) -> String {
        assert!(node >= 1 && node <= self.nodes.len(), "no node {node}");
        let ns = format!("{}-{name}", self.prefix);
        lock(&self.extra).push(ns.clone());
        add_netns(&ns);
        ns
    }

    /// Names the network namespace of process `pid` (a container made by a runtime such as Docker)
    /// `<prefix>-<name>` with `ip netns attach`, so overlayd can attach it like any other. The
    /// name is removed on drop (the namespace itself lives as long as the process).
    pub fn adopt_netns(&self, name: &str, pid: u32) -> String {
        let ns = format!("{}-{name}", self.prefix);
        del_netns(&ns);
        lock(&self.extra).push(ns.clone());
        ip(&["netns", "attach", &ns, &pid.to_string()]);
        ns
    }

    /// Whether link `dev` exists in namespace `netns` (`ip -n NETNS link show DEV` succeeds).
    pub fn has_link(&self, netns: &str, dev: &str) -> bool {
        run(
            Command::new("ip").args(["-n", netns, "link", "show", dev]),
            CLI_TIMEOUT,
        )
        .status
        .success()
    }

    /// A namespace plugged into the switch with underlay address `addr`/24 on `eth0` (no daemon):
    /// a kernel VXLAN node, a stranger, a would-be joiner.
    pub fn host(&self, name: &str, addr: &str) -> String {
        let ns = format!("{}-{name}", self.prefix);
        lock(&self.extra).push(ns.clone());
        add_netns(&ns);
        let port = format!("x{}", self.seq.fetch_add(1, Ordering::Relaxed));
        self.plug(&ns, &port, addr);
        ns
    }

    /// A plain Linux node on the switch at `addr`, using the kernel's own VXLAN device: `vx0`
    /// (id `vni`, dstport 4789, nolearning, head-end replication to each of `vteps` through
    /// all-zero FDB entries) on bridge `br0`, plus one container per `(name, "ip/len")` on that
    /// bridge with MTU 1450. Transmit checksum offload is off on the node's underlay port (needs
    /// `ethtool`). Returns the containers' namespaces.
    pub fn kernel_vxlan_node(
        &self,
        name: &str,
        addr: &str,
        vni: u32,
        vteps: &[&str],
        ctrs: &[(&str, &str)],
    ) -> Vec<String> {
        let k = self.host(name, addr);
        let vni = vni.to_string();
        ip(&["-n", &k, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &k, "link", "set", "br0", "up"]);
        ip(&[
            "-n",
            &k,
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "id",
            &vni,
            "dstport",
            "4789",
            "local",
            addr,
            "dev",
            "eth0",
            "nolearning",
        ]);
        for vtep in vteps {
            self.exec_ok(
                &k,
                &[
                    "bridge",
                    "fdb",
                    "append",
                    "00:00:00:00:00:00",
                    "dev",
                    "vx0",
                    "dst",
                    vtep,
                ],
            );
        }
        ip(&[
            "-n", &k, "link", "set", "vx0", "mtu", "1450", "master", "br0", "up",
        ]);
        // Like a physical NIC, the node's underlay port puts complete checksums on the wire. A veth
        // would otherwise carry the inner TCP checksum still "partial" (only valid as kernel
        // metadata), which a userspace VTEP reading a UDP socket cannot see or complete.
        self.exec_ok(&k, &["ethtool", "-K", "eth0", "tx", "off"]);
        ctrs.iter()
            .enumerate()
            .map(|(i, (cname, cidr))| {
                let ns = format!("{}-{cname}", self.prefix);
                lock(&self.extra).push(ns.clone());
                add_netns(&ns);
                let port = format!("k{i}");
                ip(&[
                    "-n", &k, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ]);
                ip(&["-n", &k, "link", "set", &port, "master", "br0", "up"]);
                ip(&["-n", &ns, "addr", "add", cidr, "dev", "eth0"]);
                ip(&["-n", &ns, "link", "set", "eth0", "mtu", "1450", "up"]);
                ns
            })
            .collect()
    }

    /// `overlayd attach NETNS --network NET [extra] --json` on node `node`; panics on failure.
    pub fn attach(&self, node: usize, netns: &str, network: &str, extra: &[&str]) -> Attachment {
        let mut args = vec!["attach", netns, "--network", network];
        args.extend_from_slice(extra);
        let v = self.node(node).json(&args);
        Attachment::from_json(&v).unwrap_or_else(|e| panic!("node {node}: {e}"))
    }

    /// Runs `args` inside namespace `netns`.
    pub fn exec(&self, netns: &str, args: &[&str]) -> Output {
        run(
            Command::new("ip").args(["netns", "exec", netns]).args(args),
            CLI_TIMEOUT,
        )
    }

    /// A container on `node` attached to `network` as a task of `service`, running busybox
    /// httpd on port 80 that answers `name`: its netns, attachment and server.
    pub fn httpd_task(
        &self,
        node: usize,
        name: &str,
        network: &str,
        service: &str,
    ) -> (String, Attachment, Bg) {
        let ns = self.container(node, name);
        let attachment = self.attach(node, &ns, network, &["--service", service]);
        let root = self.dir.join(format!("www-{name}"));
        fs::create_dir_all(&root).expect("web root");
        fs::write(root.join("index.html"), name).expect("index.html");
        let root = root.to_string_lossy().into_owned();
        let server = self.spawn(&ns, &["busybox", "httpd", "-f", "-p", "80", "-h", &root]);
        (ns, attachment, server)
    }

    /// Runs `args` inside `netns` and panics unless it succeeds; returns stdout.
    pub fn exec_ok(&self, netns: &str, args: &[&str]) -> String {
        let out = self.exec(netns, args);
        stdout_of_success(out, &format!("in {netns}: `{}`", args.join(" ")))
    }

    /// Waits until something in `netns` listens on TCP `port` (`udp`: is bound to UDP `port`),
    /// as a server just spawned takes a while to get there on a loaded machine.
    pub fn wait_listening(&self, netns: &str, udp: bool, port: u16) {
        let filter = format!("sport = :{port}");
        let flags = if udp { "-Hlun" } else { "-Hltn" };
        wait_for(
            PING_WAIT,
            &format!("a server on {netns} port {port}"),
            || {
                let out = self.exec(netns, &["ss", flags, &filter]);
                if String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                    Err("nothing there yet".to_string())
                } else {
                    Ok(())
                }
            },
        );
    }

    /// Starts `args` inside `netns` in the background; killed when the returned guard drops.
    pub fn spawn(&self, netns: &str, args: &[&str]) -> Bg {
        let what = format!("{netns}: {}", args.join(" "));
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let log_path = self.dir.join(format!("bg{n}.log"));
        let log = File::create(&log_path).expect("creating helper log");
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Bg {
            child,
            what,
            log: log_path,
        }
    }

    /// One ping from `from` to `ip` succeeds within a second.
    pub fn ping_once(&self, from: &str, ip: &str) -> bool {
        self.exec(from, &["ping", "-c", "1", "-W", "1", "-q", ip])
            .status
            .success()
    }

    /// Waits (at most `timeout`) until `from` can ping `ip`; panics with the last ping output.
    pub fn assert_ping(&self, from: &str, ip: &str, timeout: Duration) {
        wait_for(timeout, &format!("ping {from} -> {ip}"), || {
            let out = self.exec(from, &["ping", "-c", "1", "-W", "1", ip]);
            if out.status.success() {
                Ok(())
            } else {
                Err(show(&out))
            }
        });
    }

    /// Asserts that 3 pings from `from` to `ip` all go unanswered.
    pub fn assert_no_ping(&self, from: &str, ip: &str) {
        let out = self.exec(from, &["ping", "-c", "3", "-i", "0.3", "-W", "1", ip]);
        assert!(
            !out.status.success(),
            "{from} can still ping {ip}:\n{}",
            show(&out)
        );
    }

    /// Starts the checksumming TCP sink of [`TCP_SERVER`] on `port` in `netns`.
    pub fn tcp_server(&self, netns: &str, port: u16) -> Bg {
        self.spawn(netns, &["python3", "-c", TCP_SERVER, &port.to_string()])
    }

    /// Sends `bytes` random bytes from `from` to the sink at `ip:port`; panics unless the sink
    /// saw exactly those bytes (length and SHA-256).
    pub fn assert_tcp(&self, from: &str, ip: &str, port: u16, bytes: usize) {
        let out = self.exec(
            from,
            &[
                "python3",
                "-c",
                TCP_CLIENT,
                ip,
                &port.to_string(),
                &bytes.to_string(),
            ],
        );
        assert!(
            out.status.success(),
            "TCP transfer {from} -> {ip}:{port} ({bytes} B) failed\n{}",
            show(&out)
        );
    }

    /// `eth0` in `netns`: (IPv4 address, prefix length, MTU), or `None` if there is no `eth0`.
    pub fn eth0(&self, netns: &str) -> Option<(String, u64, u64)> {
        let out = self.exec(netns, &["ip", "-j", "addr", "show", "dev", "eth0"]);
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let link = v.get(0)?;
        let mtu = link["mtu"].as_u64().unwrap_or(0);
        let inet = link["addr_info"]
            .as_array()?
            .iter()
            .find(|a| a["family"] == "inet");
        Some(match inet {
            Some(a) => (
                str_field(a, "local"),
                a["prefixlen"].as_u64().unwrap_or(0),
                mtu,
            ),
            None => (String::new(), 0, mtu),
        })
    }

    /// The IPv4 default gateway in `netns`, if any.
    pub fn default_gateway(&self, netns: &str) -> Option<String> {
        let out = self.exec_ok(netns, &["ip", "-j", "-4", "route", "show", "default"]);
        let v: Value = serde_json::from_str(&out).ok()?;
        v.get(0)
            .map(|r| str_field(r, "gateway"))
            .filter(|g| !g.is_empty())
    }

    /// Names of the links in `netns`.
    pub fn links(&self, netns: &str) -> Vec<String> {
        let out = self.exec_ok(netns, &["ip", "-o", "link", "show"]);
        let mut names: Vec<String> = out
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
            .collect();
        names.sort();
        names
    }

    /// Plugs `netns` into the switch: switch port `port` <-> `eth0` with `addr`/24, MTU 1500.
    fn plug(&self, netns: &str, port: &str, addr: &str) {
        ip(&[
            "-n",
            &self.switch,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns,
        ]);
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            port,
            "master",
            "br0",
            "up",
        ]);
        ip(&["-n", netns, "link", "set", "eth0", "mtu", "1500", "up"]);
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
    }

    fn dump_logs(&self) {
        let mut s = String::new();
        for node in &self.nodes {
            let text = node.log_text();
            let tail: Vec<&str> = text.lines().rev().take(300).collect();
            let _ = writeln!(
                s,
                "===== overlayd log, node {} ({}) =====",
                node.index,
                node.log.display()
            );
            for l in tail.iter().rev() {
                let _ = writeln!(s, "{l}");
            }
        }
        eprintln!("{s}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if thread::panicking() {
            self.dump_logs();
        }
        for node in &self.nodes {
            node.kill_daemon();
        }
        let extra = std::mem::take(&mut *lock(&self.extra));
        for ns in extra.iter().rev() {
            del_netns(ns);
        }
        for node in &self.nodes {
            del_netns(&node.netns);
        }
        del_netns(&self.switch);
        if std::env::var_os("OVT_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("OVT_KEEP: kept {}", self.dir.display());
        }
    }
}

/// Finds `TOKEN` in a line containing `--token TOKEN`.
pub fn token_in(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let rest = &l[l.find("--token")? + "--token".len()..];
        let t = rest
            .trim_start_matches(['=', ' '])
            .split_whitespace()
            .next()?;
        let t = t.trim_matches(|c: char| c == '"' || c == '\'' || c == '`');
        (!t.is_empty()).then(|| t.to_owned())
    })
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

/// The resident memory of process `pid` in kB (`VmRSS` of /proc/PID/status), 0 if unknown.
pub fn vm_rss_kb(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A container image of busybox alone: the host's static busybox (Debian `busybox-static`,
/// which `scripts/test.sh` installs) and one symlink per applet, built in directory `rootfs`
/// and packed as `rootfs.tar` beside it (returned), for `docker import` or `podman import`.
pub fn busybox_image_tar(rootfs: &Path) -> PathBuf {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .expect("needs busybox (apt-get install busybox-static; scripts/test.sh installs it)");
    let list = run(Command::new(busybox).arg("--list"), CLI_TIMEOUT);
    assert!(list.status.success(), "busybox --list\n{}", show(&list));
    let _ = fs::remove_dir_all(rootfs);
    for d in ["bin", "tmp", "etc", "proc", "sys", "dev"] {
        fs::create_dir_all(rootfs.join(d)).expect("making the image's directories");
    }
    fs::copy(busybox, rootfs.join("bin/busybox")).expect("copying busybox into the image");
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .expect("linking an applet");
        }
    }
    fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").expect("etc/passwd");
    let tarball = rootfs.with_extension("tar");
    let tar = run(
        Command::new("tar").args([
            "-C",
            &rootfs.to_string_lossy(),
            "-cf",
            &tarball.to_string_lossy(),
            ".",
        ]),
        CLI_TIMEOUT,
    );
    assert!(
        tar.status.success(),
        "tar of the image rootfs\n{}",
        show(&tar)
    );
    tarball
}

/// Runs `ip ARGS` in the root namespace; panics unless it succeeds.
pub fn ip(args: &[&str]) {
    let out = run(Command::new("ip").args(args), CLI_TIMEOUT);
    assert!(
        out.status.success(),
        "`ip {}` failed\n{}",
        args.join(" "),
        show(&out)
    );
}

fn add_netns(ns: &str) {
    // A namespace of this name can only be a leftover of a killed run with a reused pid.
    del_netns(ns);
    ip(&["netns", "add", ns]);
    ip(&["-n", ns, "link", "set", "lo", "up"]);
}

fn del_netns(ns: &str) {
    if Path::new("/run/netns").join(ns).exists() {
        let _ = run_bounded(Command::new("ip").args(["netns", "del", ns]), CLI_TIMEOUT);
    }
    // `attach` writes the container's resolv.conf there; `ip netns del` leaves it.
    let _ = fs::remove_dir_all(Path::new("/etc/netns").join(ns));
}

/// A TCP sink: accepts connections, reads to EOF, answers "<bytes> <sha256>\n".
/// argv: PORT. Runs until killed.
pub const TCP_SERVER: &str = r#"
import hashlib, socket, sys, threading
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
def serve(c):
    c.settimeout(30)
    h, n = hashlib.sha256(), 0
    try:
        while True:
            b = c.recv(65536)
            if not b:
                break
            h.update(b)
            n += len(b)
        c.sendall(("%d %s\n" % (n, h.hexdigest())).encode())
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Client for [`TCP_SERVER`]: sends N random bytes and checks the sink's length and hash.
/// argv: IP PORT N. Retries connecting for 15 s (the sink may still be starting).
pub const TCP_CLIENT: &str = r#"
import hashlib, os, socket, sys, time
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = os.urandom(n)
deadline = time.time() + 15
while True:
    try:
        c = socket.create_connection((ip, port), timeout=5)
        break
    except OSError as e:
        if time.time() > deadline:
            sys.exit("connect %s:%d: %s" % (ip, port, e))
        time.sleep(0.2)
c.settimeout(20)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
r = b""
while not r.endswith(b"\n"):
    b = c.recv(1024)
    if not b:
        break
    r += b
want = "%d %s" % (n, hashlib.sha256(data).hexdigest())
if r.decode(errors="replace").strip() != want:
    sys.exit("sink saw %r, sent %s" % (r, want))
print("ok", n)
"#;

/// Sends raw UDP payloads to DST:4789 (VXLAN port). argv: DST KIND COUNT VNI, where KIND is
/// `short` (4 bytes), `no-i-flag` (flags 0), `unknown-vni` / `good` (I flag set, VNI as given),
/// each with a 60-byte inner ARP request.
pub const VXLAN_SENDER: &str = r#"
import socket, struct, sys
dst, kind, count, vni = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
inner = (b"\xff" * 6 + bytes.fromhex("020000000099") + b"\x08\x06"
         + bytes.fromhex("0001080006040001") + bytes.fromhex("020000000099")
         + socket.inet_aton("198.19.250.99") + b"\x00" * 6 + socket.inet_aton("198.19.250.1"))
inner = inner.ljust(60, b"\x00")
def header(flags):
    return struct.pack("!B3xI", flags, vni << 8)
if kind == "short":
    pkt = b"\x08\x00\x00\x00"
elif kind == "no-i-flag":
    pkt = header(0x00) + inner
elif kind in ("unknown-vni", "good"):
    pkt = header(0x08) + inner
else:
    sys.exit("unknown kind " + kind)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    s.sendto(pkt, (dst, 4789))
print("sent", count, kind)
"#;
