//! Leader loss: the Raft leader (node 1, which made the cluster) is killed with SIGKILL in the
//! middle of a burst of concurrent attaches and service creates on the other two nodes. Every
//! request either succeeds, with an address no other container, task or VIP has, or fails
//! within a bound with a one-line error; a change acknowledged just before the kill stands; the
//! two nodes left elect a leader that takes changes again (the time from the kill until it
//! commits one is measured and printed); and once the old leader runs again, all three nodes
//! hold the same registry. Needs root (CI runs as root).

mod netns;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use netns::{Cluster, run_bounded, show, wait_for, wait_until};
use serde_json::Value;

/// Containers attached (as tasks of `burst`) on each of nodes 2 and 3.
const ATTACHES_PER_NODE: usize = 10;
/// Services created on each of nodes 2 and 3.
const SERVICES_PER_NODE: usize = 3;
/// Requests that complete before the leader is killed; the rest are in flight or queued.
const DONE_BEFORE_KILL: usize = 4;
/// The longest any request may take, queueing included: attaches on one node take turns, and
/// one caught by the election retries for at most 12 s before it gives up.
const ANSWER_WITHIN: Duration = Duration::from_secs(45);
/// The new leader must take a change within this of the kill (election timeout 1-2 s).
const FAILOVER_WITHIN: Duration = Duration::from_secs(10);

/// What one request of the burst came to.
#[derive(Debug)]
enum Outcome {
    /// An attach: the container and the address it got.
    Attached { netns: String, ip: String },
    /// A service create: the service and its VIP.
    Created { name: String, vip: String },
    /// Refused: the one-line message.
    Failed { what: String, why: String },
}

/// Runs `overlayd ARGS --json` on node `i`, bounded by [`ANSWER_WITHIN`]; panics if it hangs
/// or fails unclearly (no message, or one of several lines).
fn request(c: &Cluster, i: usize, args: &[&str]) -> Result<Value, String> {
    let mut args = args.to_vec();
    args.push("--json");
    let what = format!("node {i}: overlayd {}", args.join(" "));
    let out = run_bounded(&mut c.node(i).cli_command(&args), ANSWER_WITHIN)
        .unwrap_or_else(|| panic!("{what} hung for more than {ANSWER_WITHIN:?}"));
    if out.status.success() {
        return serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("{what} printed no JSON ({e}): {}", show(&out)));
    }
    let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(
        !why.is_empty() && !why.contains('\n'),
        "{what} failed without a one-line message: {}",
        show(&out)
    );
    Err(why)
}

/// `service ps NAME --json` on node `i` as (address, node, container), sorted.
fn tasks(c: &Cluster, i: usize, name: &str) -> Result<Vec<(String, String, String)>, String> {
    let ps = c.node(i).try_json(&["service", "ps", name])?;
    let mut tasks: Vec<_> = ps
        .as_array()
        .ok_or_else(|| format!("service ps is no list: {ps}"))?
        .iter()
        .map(|t| {
            let field = |k: &str| t[k].as_str().unwrap_or_default().to_string();
            (field("ip"), field("node"), field("netns"))
        })
        .collect();
    tasks.sort();
    Ok(tasks)
}

/// `service ls --json` on node `i` as name -> VIP.
fn vips(c: &Cluster, i: usize) -> Result<BTreeMap<String, String>, String> {
    let ls = c.node(i).try_json(&["service", "ls"])?;
    Ok(ls
        .as_array()
        .ok_or_else(|| format!("service ls is no list: {ls}"))?
        .iter()
        .map(|s| {
            let field = |k: &str| s[k].as_str().unwrap_or_default().to_string();
            (field("name"), field("vip"))
        })
        .collect())
}

#[test]
fn killing_the_leader_mid_burst_hands_out_nothing_twice_and_loses_nothing_acknowledged() {
    let c = Cluster::new("lloss", 3);
    assert_eq!(
        c.leader(2).as_deref(),
        Some(c.node(1).addr.as_str()),
        "node 1 leads"
    );
    c.node(2)
        .cli_ok(&["network", "create", "app", "--subnet", "198.19.20.0/24"]);
    c.wait_network_everywhere("app");
    c.node(3)
        .cli_ok(&["service", "create", "burst", "--network", "app"]);
    let containers: Vec<(usize, String)> = [2, 3]
        .iter()
        .flat_map(|&n| (0..ATTACHES_PER_NODE).map(move |k| (n, format!("b{n}x{k}"))))
        .map(|(n, name)| (n, c.container(n, &name)))
        .collect();

    let done = AtomicUsize::new(0);
    let (outcomes, acknowledged, killed, failover) = thread::scope(|s| {
        let mut burst = Vec::new();
        for (n, netns) in &containers {
            let (c, done) = (&c, &done);
            burst.push(s.spawn(move || {
                let got = request(
                    c,
                    *n,
                    &["attach", netns, "--network", "app", "--service", "burst"],
                );
                done.fetch_add(1, Ordering::Relaxed);
                match got {
                    Ok(v) => Outcome::Attached {
                        netns: netns.clone(),
                        ip: v["ip"].as_str().unwrap_or_default().to_string(),
                    },
                    Err(why) => Outcome::Failed {
                        what: format!("attach {netns}"),
                        why,
                    },
                }
            }));
        }
        for n in [2, 3] {
            for k in 0..SERVICES_PER_NODE {
                let (c, done) = (&c, &done);
                burst.push(s.spawn(move || {
                    let name = format!("s{n}x{k}");
                    let got = request(c, n, &["service", "create", &name, "--network", "app"]);
                    done.fetch_add(1, Ordering::Relaxed);
                    match got {
                        Ok(v) => Outcome::Created {
                            vip: v["vip"].as_str().unwrap_or_default().to_string(),
                            name,
                        },
                        Err(why) => Outcome::Failed {
                            what: format!("service create {name}"),
                            why,
                        },
                    }
                }));
            }
        }
        wait_for(
            Duration::from_secs(30),
            "the burst's first requests to complete",
            || match done.load(Ordering::Relaxed) {
                n if n >= DONE_BEFORE_KILL => Ok(()),
                n => Err(format!("{n} done")),
            },
        );
        // Acknowledged by the leader just before it dies: it must stand.
        let acknowledged = c
            .node(2)
            .json(&["service", "create", "acked", "--network", "app"]);
        c.node(1).kill_daemon();
        let killed = Instant::now();
        let c = &c;
        let elected = s.spawn(move || {
            wait_until(FAILOVER_WITHIN, || {
                c.leader(2).is_some_and(|l| l != c.node(1).addr)
            })
            .then(|| killed.elapsed())
        });
        let in_flight = containers.len() + 2 * SERVICES_PER_NODE - done.load(Ordering::Relaxed);
        // The next leader answers: a change proposed from node 3 commits.
        let failover = loop {
            match request(c, 3, &["service", "create", "probe", "--network", "app"]) {
                Ok(_) => break killed.elapsed(),
                Err(why) => assert!(
                    killed.elapsed() < FAILOVER_WITHIN,
                    "no leader took a change within {FAILOVER_WITHIN:?} of the kill: {why}"
                ),
            }
        };
        let elected = elected
            .join()
            .expect("leader poll")
            .map(|e| e.as_secs_f64());
        println!(
            "leader killed with {in_flight} of the burst's requests not yet answered; node 2 \
             saw a new leader {elected:.2?} s after the kill, and it committed a change {:.2} s \
             after the kill",
            failover.as_secs_f64()
        );
        let outcomes: Vec<Outcome> = burst
            .into_iter()
            .map(|t| t.join().expect("a burst request panicked"))
            .collect();
        (outcomes, acknowledged, killed, failover)
    });
    assert!(failover < FAILOVER_WITHIN);
    let new_leader = c.leader(2);
    println!(
        "new leader {new_leader:?}; burst done {:.1} s after the kill; outcomes: {outcomes:#?}",
        killed.elapsed().as_secs_f64()
    );
    assert!(
        new_leader.is_some() && new_leader != Some(c.node(1).addr.clone()),
        "a live node leads: {new_leader:?}"
    );

    // Nodes 2 and 3 agree on the registry; then node 1 runs again and agrees too.
    let agreed = |nodes: &[usize]| {
        wait_for(Duration::from_secs(20), "the nodes to agree", || {
            let views: Vec<_> = nodes
                .iter()
                .map(|&i| Ok((tasks(&c, i, "burst")?, vips(&c, i)?)))
                .collect::<Result<_, String>>()?;
            if views.windows(2).all(|w| w[0] == w[1]) {
                Ok(views[0].clone())
            } else {
                Err(format!("views differ: {views:#?}"))
            }
        })
    };
    let (registered, services) = agreed(&[2, 3]);
    c.node(1).restart_daemon();
    assert_eq!(
        agreed(&[1, 2, 3]),
        (registered.clone(), services.clone()),
        "node 1 came back with another registry"
    );

    // What was acknowledged stands, once each.
    assert_eq!(
        services.get("acked").map(String::as_str),
        acknowledged["vip"].as_str(),
        "the change acknowledged just before the kill is lost: {services:?}"
    );
    let attached: BTreeMap<&str, &str> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Attached { netns, ip } => Some((netns.as_str(), ip.as_str())),
            _ => None,
        })
        .collect();
    let listed: BTreeMap<&str, &str> = registered
        .iter()
        .map(|(ip, _, netns)| (netns.as_str(), ip.as_str()))
        .collect();
    assert_eq!(
        listed, attached,
        "the registry's tasks are exactly the acknowledged attaches"
    );
    for o in &outcomes {
        match o {
            Outcome::Created { name, vip } => assert_eq!(
                services.get(name),
                Some(vip),
                "acknowledged service {name} (VIP {vip}) is not in the registry"
            ),
            Outcome::Failed { what, .. } if what.starts_with("service create ") => {
                let name = what.trim_start_matches("service create ");
                assert!(
                    !services.contains_key(name),
                    "{name} was refused but made anyway"
                );
            }
            _ => {}
        }
    }
    let addresses: Vec<&str> = registered
        .iter()
        .map(|t| t.0.as_str())
        .chain(services.values().map(String::as_str))
        .collect();
    let unique: BTreeSet<&str> = addresses.iter().copied().collect();
    assert_eq!(
        unique.len(),
        addresses.len(),
        "an address handed out twice: {addresses:?}"
    );
    let mut failed = 0;
    for o in &outcomes {
        if let Outcome::Failed { what, why } = o {
            println!("refused: {what}: {why}");
            failed += 1;
        }
    }
    println!(
        "{} attaches and {} service creates acknowledged, {failed} refused; {} addresses, all unique",
        attached.len(),
        services.len(),
        addresses.len()
    );
}
