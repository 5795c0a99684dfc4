//! Services on a 3-node cluster: tasks with a real TCP server become healthy through the health
//! checks their nodes run, a task whose server dies turns unhealthy within about 2 s (measured and
//! printed), `service rm` is refused while tasks exist and `--force` unplugs them on their nodes,
//! bad input is refused with exit 64, one line, and nothing changed, and HTTP checks pass on 200
//! and fail on 404 from a real server. Published ports are listed (table and JSON) on every node,
//! changed with `service update`, and refused when they conflict, are out of range, are not
//! published, name an address of no node, or are held by a process on a node; a node whose
//! daemon is down does not stop a publish. Needs root (CI runs as root).

mod netns;

use std::process::Output;
use std::time::{Duration, Instant};

use netns::{Attachment, Bg, Cluster, Node, run_bounded, show, wait_for};

/// How long tasks with a passing check may take to show healthy everywhere.
const HEALTHY_WITHIN: Duration = Duration::from_secs(15);
/// The removal bound of the issue: an unhealthy task leaves every node within 2 s.
const UNHEALTHY_WITHIN: Duration = Duration::from_secs(2);
/// How long `service rm --force` may take to unplug the tasks on their nodes.
const UNPLUGGED_WITHIN: Duration = Duration::from_secs(5);
const PORT: u16 = 8080;

/// `service ls --json` on `node`, the entry named `name`.
fn service(node: &Node, name: &str) -> Result<Option<serde_json::Value>, String> {
    let all = node.try_json(&["service", "ls"])?;
    let list = all.as_array().ok_or(format!("not a list: {all}"))?;
    Ok(list.iter().find(|s| s["name"] == name).cloned())
}

/// `(healthy, total)` of service `name` as `node` sees it.
fn counts(node: &Node, name: &str) -> Result<(u64, u64), String> {
    let s = service(node, name)?.ok_or(format!("no service {name}"))?;
    Ok((
        s["tasks_healthy"].as_u64().unwrap_or(u64::MAX),
        s["tasks_total"].as_u64().unwrap_or(u64::MAX),
    ))
}

/// The state of the task at `ip` in `service ps NAME --json` on `node`.
fn task_state(node: &Node, name: &str, ip: &str) -> Result<String, String> {
    let tasks = node.try_json(&["service", "ps", name])?;
    tasks
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["ip"] == ip))
        .and_then(|t| t["state"].as_str())
        .map(str::to_owned)
        .ok_or(format!("no task {ip}: {tasks}"))
}

/// This node's id, from its own `node ls`.
fn own_id(node: &Node) -> String {
    let nodes = node.json(&["node", "ls"]);
    nodes
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["self"] == true))
        .and_then(|n| n["id"].as_str())
        .unwrap_or_else(|| panic!("node {} is not in its own node ls: {nodes}", node.index))
        .to_owned()
}

/// Asserts `out` is a usage refusal: exit 64, one line on stderr (besides clap's `--help`
/// hint) that mentions every one of `mentions`.
fn assert_refused(case: &str, out: Option<Output>, mentions: &[&str]) {
    let out = out.unwrap_or_else(|| panic!("{case}: still running at the deadline"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("For more information"))
        .collect();
    assert_eq!(out.status.code(), Some(64), "{case}: {}", show(&out));
    assert_eq!(lines.len(), 1, "{case}: not one line: {}", show(&out));
    for m in mentions {
        assert!(lines[0].contains(m), "{case}: no {m:?} in {}", show(&out));
    }
}

#[test]
fn tasks_are_checked_turn_unhealthy_quickly_and_force_removal_unplugs_them() {
    let c = Cluster::new("svc", 3);
    let n1 = c.node(1);
    n1.cli_ok(&["network", "create", "app", "--subnet", "198.19.20.0/24"]);
    c.wait_network_everywhere("app");
    let created = n1.json(&[
        "service",
        "create",
        "web",
        "--network",
        "app",
        "--health-tcp",
        &PORT.to_string(),
        "--health-interval",
        "300ms",
    ]);
    assert_eq!(created["mode"], "vip", "{created}");
    assert!(created["vip"].is_string(), "a VIP: {created}");

    // One task per node, each with a real TCP server on the checked port.
    let mut tasks: Vec<(usize, String, Attachment, Option<Bg>)> = Vec::new();
    for i in 1..=3 {
        let ns = c.container(i, &format!("t{i}"));
        let server = c.tcp_server(&ns, PORT);
        let a = c.attach(i, &ns, "app", &["--service", "web"]);
        tasks.push((i, ns, a, Some(server)));
    }

    let started = Instant::now();
    for node in &c.nodes {
        wait_for(HEALTHY_WITHIN, "3/3 tasks healthy", || {
            match counts(node, "web")? {
                (3, 3) => Ok(()),
                other => Err(format!("node {}: {other:?}", node.index)),
            }
        });
    }
    println!(
        "3/3 tasks healthy on every node {:?} after the last attach",
        started.elapsed()
    );

    let ps = c.node(2).json(&["service", "ps", "web"]);
    let listed = ps.as_array().unwrap_or_else(|| panic!("not a list: {ps}"));
    assert_eq!(listed.len(), 3, "{ps}");
    for (i, ns, a, _) in &tasks {
        let t = listed
            .iter()
            .find(|t| t["ip"] == a.ip.as_str())
            .unwrap_or_else(|| panic!("task {} missing from ps: {ps}", a.ip));
        assert_eq!(t["netns"], ns.as_str(), "{t}");
        assert_eq!(t["node"], own_id(c.node(*i)).as_str(), "{t}");
        assert_eq!(t["node"], a.node.as_str(), "{t}");
        assert_eq!(t["node_address"], netns::node_addr(*i).as_str(), "{t}");
        assert_eq!(t["state"], "healthy", "{t}");
    }

    // Bad input: refused, nothing changed.
    n1.cli_ok(&["network", "create", "other", "--subnet", "198.19.21.0/24"]);
    n1.cli_ok(&["network", "create", "tiny", "--subnet", "198.19.22.0/29"]);
    c.wait_network_everywhere("tiny");
    // A /29 has five addresses besides the network, gateway and broadcast: five VIPs take them.
    for k in 1..=5 {
        n1.cli_ok(&[
            "service",
            "create",
            &format!("fill{k}"),
            "--network",
            "tiny",
        ]);
    }
    let stray = c.container(1, "stray");
    // `service create api --network` followed by `rest`.
    let create =
        |rest: &[&'static str]| [&["service", "create", "api", "--network"], rest].concat();
    let cases: [(&str, Vec<&str>, &[&str]); 7] = [
        ("unknown network", create(&["nosuch"]), &["nosuch"]),
        (
            "duplicate service name",
            vec!["service", "create", "web", "--network", "app"],
            &["web", "already exists"],
        ),
        (
            "health spec without a path",
            create(&["app", "--health-http", "8080"]),
            &["PORT/PATH"],
        ),
        (
            "health check on port 0",
            create(&["app", "--health-tcp", "0"]),
            &["0"],
        ),
        (
            "health interval too short",
            create(&["app", "--health-tcp", "80", "--health-interval", "10ms"]),
            &["10ms"],
        ),
        (
            "attach --service to a service on another network",
            vec!["attach", &stray, "--network", "other", "--service", "web"],
            &["web", "app"],
        ),
        (
            "VIP exhaustion",
            create(&["tiny"]),
            &["tiny", "no free address"],
        ),
    ];
    for (case, args, mentions) in cases {
        let (services, networks) = (n1.json(&["service", "ls"]), n1.json(&["network", "ls"]));
        let out = run_bounded(&mut n1.cli_command(&args), netns::CLI_TIMEOUT);
        assert_refused(case, out, mentions);
        assert_eq!(
            n1.json(&["service", "ls"]),
            services,
            "{case}: services changed"
        );
        assert_eq!(
            n1.json(&["network", "ls"]),
            networks,
            "{case}: networks changed"
        );
    }
    assert!(
        c.eth0(&stray).is_none(),
        "the refused attach plugged {stray}"
    );

    // The server of node 2's task dies: seen unhealthy on node 1 within the bound.
    let (_, _, victim, server) = &mut tasks[1];
    drop(server.take());
    let killed = Instant::now();
    let mut last = String::new();
    while killed.elapsed() < UNHEALTHY_WITHIN * 3 {
        last = task_state(n1, "web", &victim.ip).unwrap_or_else(|e| e);
        if last == "unhealthy" {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = killed.elapsed();
    println!(
        "task {} unhealthy on another node {took:?} after its server died",
        victim.ip
    );
    assert_eq!(last, "unhealthy", "after {took:?}");
    assert!(
        took <= UNHEALTHY_WITHIN,
        "unhealthy after {took:?}, over {UNHEALTHY_WITHIN:?}"
    );
    assert_eq!(counts(n1, "web"), Ok((2, 3)));

    // Refused while tasks exist, and nothing changes.
    let before = n1.json(&["service", "ls"]);
    let out = run_bounded(
        &mut n1.cli_command(&["service", "rm", "web"]),
        netns::CLI_TIMEOUT,
    );
    assert_refused("service rm with tasks", out, &["--force", "3 task"]);
    assert_eq!(n1.json(&["service", "ls"]), before);

    // --force takes the tasks' addresses back; each node unplugs its own task.
    n1.cli_ok(&["service", "rm", "web", "--force"]);
    let removed = Instant::now();
    assert_eq!(service(n1, "web"), Ok(None));
    for (i, ns, a, _) in &tasks {
        let node = c.node(*i);
        wait_for(UNPLUGGED_WITHIN, "the task's veth removed", || {
            let left: Vec<String> = c
                .links(&node.netns)
                .into_iter()
                .filter(|l| l.starts_with("ovh"))
                .collect();
            match (left.is_empty(), c.eth0(ns)) {
                (true, None) => Ok(()),
                (_, eth0) => Err(format!(
                    "node {i}: veths {left:?}, {ns} eth0 {eth0:?} ({})",
                    a.ip
                )),
            }
        });
    }
    println!(
        "tasks unplugged on their nodes {:?} after --force",
        removed.elapsed()
    );
    let app = n1.network("app").unwrap().unwrap();
    assert_eq!(app["endpoints"], 0, "{app}");
    assert!(
        n1.log_text().contains("container unplugged"),
        "the unplug is logged"
    );

    // HTTP checks against a real server: 200 on `/` passes, 404 on a missing path fails.
    for (name, path, want) in [("docs", "/", "healthy"), ("broken", "/nosuch", "unhealthy")] {
        let spec = format!("{HTTP_PORT}{path}");
        n1.cli_ok(&[
            "service",
            "create",
            name,
            "--network",
            "app",
            "--health-http",
            &spec,
            "--health-interval",
            "300ms",
        ]);
        let ns = c.container(3, name);
        let _server = c.spawn(
            &ns,
            &["python3", "-m", "http.server", &HTTP_PORT.to_string()],
        );
        // Answering before the check starts, so "unhealthy" is the 404, not a server still
        // starting.
        let url = format!("http://127.0.0.1:{HTTP_PORT}/");
        wait_for(HEALTHY_WITHIN, "the HTTP server answers", || {
            let out = c.exec(&ns, &["curl", "-sf", "-o", "/dev/null", &url]);
            out.status.success().then_some(()).ok_or_else(|| show(&out))
        });
        let a = c.attach(3, &ns, "app", &["--service", name]);
        wait_for(
            HEALTHY_WITHIN,
            &format!("{name} {want}"),
            || match task_state(n1, name, &a.ip)? {
                state if state == want => Ok(()),
                other => Err(other),
            },
        );
    }
}

/// Port of the HTTP servers of the HTTP checks.
const HTTP_PORT: u16 = 8000;

/// Ports the published-port test uses; none has a server behind it (the data path is tested
/// elsewhere), except [`HELD`], which a plain listener holds on node 2.
const SEARCH: u16 = 9200;
const MOVED: u16 = 9300;
const HELD: u16 = 9400;

/// The PORTS cell of the row of service `name` in `service ls` (the last column).
fn ports_cell(table: &str, name: &str) -> Option<String> {
    let header = table.lines().next()?;
    let at = header.find("PORTS")?;
    let row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))?;
    Some(row.get(at..).unwrap_or_default().trim().to_owned())
}

/// `publish` of service `name` in `node`'s `service ls --json`, as `published/protocol` strings.
fn published(node: &Node, name: &str) -> Result<Vec<String>, String> {
    let s = service(node, name)?.ok_or(format!("no service {name}"))?;
    let list = s["publish"]
        .as_array()
        .ok_or(format!("no publish list: {s}"))?;
    Ok(list
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["published"],
                p["protocol"].as_str().unwrap_or("?")
            )
        })
        .collect())
}

#[test]
fn published_ports_are_listed_updated_and_refused_when_taken() {
    let c = Cluster::new("pub", 3);
    let (n1, n2) = (c.node(1), c.node(2));
    n1.cli_ok(&["network", "create", "app", "--subnet", "198.19.30.0/24"]);
    c.wait_network_everywhere("app");
    let search = format!("{SEARCH}:80");
    let created = n1.json(&[
        "service",
        "create",
        "search",
        "--network",
        "app",
        "--publish",
        &search,
        "--publish",
        "198.18.0.1:8080:80/udp,affinity=client-ip",
    ]);
    assert_eq!(created["publish"][0]["published"], SEARCH, "{created}");
    assert_eq!(created["publish"][1]["addr"], "198.18.0.1", "{created}");
    assert_eq!(created["publish"][1]["affinity"], "client-ip", "{created}");

    // Listed on every node, in the table and in JSON.
    let want = format!("*:{SEARCH}->80/tcp, 198.18.0.1:8080->80/udp");
    for node in &c.nodes {
        wait_for(CONVERGED_WITHIN, "the ports listed", || {
            let table = String::from_utf8_lossy(&node.cli(&["service", "ls"]).stdout).into_owned();
            match ports_cell(&table, "search") {
                Some(cell) if cell == want => Ok(()),
                _ => Err(format!("node {}:\n{table}", node.index)),
            }
        });
        assert_eq!(
            published(node, "search"),
            Ok(vec![format!("{SEARCH}/tcp"), "8080/udp".to_owned()])
        );
    }
    let task = c.container(2, "s1");
    c.attach(2, &task, "app", &["--service", "search"]);
    let ps = n1.cli_ok(&["service", "ps", "search"]);
    assert!(
        ps.lines().next().is_some_and(|h| h.ends_with("PORTS"))
            && ps.lines().nth(1).is_some_and(|row| row.ends_with(&want)),
        "{ps}"
    );
    let ps = n1.json(&["service", "ps", "search"]);
    assert_eq!(ps[0]["publish"][0]["published"], SEARCH, "{ps}");

    // Moved from one port to another in one update, seen on every node.
    let moved = format!("{MOVED}:80");
    let updated = n2.json(&[
        "service",
        "update",
        "search",
        "--publish-rm",
        &SEARCH.to_string(),
        "--publish-add",
        &moved,
    ]);
    assert_eq!(updated["publish"][1]["published"], MOVED, "{updated}");
    for node in &c.nodes {
        wait_for(CONVERGED_WITHIN, "the update listed", || {
            match published(node, "search")? {
                p if p == ["8080/udp".to_owned(), format!("{MOVED}/tcp")] => Ok(()),
                other => Err(format!("node {}: {other:?}", node.index)),
            }
        });
    }

    // A plain listener holds a port on node 2.
    let _holder = c.tcp_server(&n2.netns, HELD);
    wait_for(CONVERGED_WITHIN, "the listener on node 2", || {
        let port = format!("sport = :{HELD}");
        let out = c.exec(&n2.netns, &["ss", "-Hltn", &port]);
        (!out.stdout.is_empty())
            .then_some(())
            .ok_or_else(|| show(&out))
    });
    let n2_id = own_id(n2);
    let held = format!("{HELD}:80");
    let in_use = format!("port {HELD}/tcp is in use on node {n2_id} (198.18.0.2)");
    let create = |spec: &str| {
        [
            "service",
            "create",
            "other",
            "--network",
            "app",
            "--publish",
            spec,
        ]
        .map(String::from)
    };
    let update =
        |flag: &str, spec: &str| ["service", "update", "search", flag, spec].map(String::from);
    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "a port another service publishes",
            create(&moved).into(),
            vec!["port 9300/tcp is already published by service search"],
        ),
        (
            "the same port twice in one request",
            [
                &create("9500:80")[..],
                &["--publish".into(), "9500:81/tcp".into()],
            ]
            .concat(),
            vec!["port 9500/tcp is given twice"],
        ),
        (
            "a port out of range",
            create("70000:80").into(),
            vec!["70000:80", "out of range"],
        ),
        (
            "a port the service does not publish",
            update("--publish-rm", "9999").into(),
            vec!["service search does not publish 9999/tcp"],
        ),
        (
            "a bind address that is no node's",
            create("198.18.0.99:80:80").into(),
            vec!["198.18.0.99", "not the address of any node"],
        ),
        (
            "a port in use on a node (create)",
            create(&held).into(),
            vec![&in_use, "free it or publish another port"],
        ),
        (
            "a port in use on a node (update)",
            update("--publish-add", &held).into(),
            vec![&in_use],
        ),
    ];
    for (case, args, mentions) in &cases {
        let before = n1.json(&["service", "ls"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_bounded(&mut n1.cli_command(&args), netns::CLI_TIMEOUT);
        assert_refused(case, out, mentions);
        assert_eq!(
            n1.json(&["service", "ls"]),
            before,
            "{case}: services changed"
        );
    }

    // Node 3's daemon is gone: the others publish without its answer, and say so.
    c.node(3).kill_daemon();
    n1.cli_ok(&[
        "service",
        "create",
        "late",
        "--network",
        "app",
        "--publish",
        "9600:80",
    ]);
    assert_eq!(published(n1, "late"), Ok(vec!["9600/tcp".to_owned()]));
    let log = n1.log_text();
    let said = log.lines().find(|l| l.contains("publishing without"));
    let said = said.expect("node 1 does not log that it published without node 3");
    println!("with node 3 down, node 1 logged: {said}");
}

/// How long a change may take to show on every node.
const CONVERGED_WITHIN: Duration = Duration::from_secs(10);
