//! The scale scenario: 10 networks, 2,000 endpoints (1,000 of them tasks) and 50 services on N
//! nodes; the cluster forms, a node joins, one leaves, one dies. Each event is timed from the
//! moment it happens until every live node's outcome is the same and the expected one.

use std::time::Duration;

use super::*;
use crate::model::{Endpoint, Mode, key};

const NETWORKS: usize = 10;
const SERVICES: usize = 50;
const ENDPOINTS: usize = 2_000;
/// Endpoints `0..TASKS` are tasks of service `i % SERVICES` (on network `i % NETWORKS`, as
/// that service is).
const TASKS: usize = 1_000;
const SEED: u64 = 12;
/// A lossy, slightly slow LAN.
const CONDITIONS: Conditions = Conditions {
    loss: 0.01,
    latency: (Duration::from_micros(200), Duration::from_millis(5)),
};
/// How long any event may take before the run fails, in simulated time.
const WITHIN: Duration = Duration::from_secs(30);

/// One event's figures.
struct Phase {
    name: &'static str,
    took: Duration,
    live: usize,
    traffic: Traffic,
}

impl Phase {
    fn rounds(&self) -> f64 {
        self.took.as_secs_f64() / gossip::GOSSIP_INTERVAL.as_secs_f64()
    }

    /// Bytes each live node sent per gossip round, on average over the event.
    fn bytes_per_node_round(&self) -> f64 {
        let rounds = self.rounds().max(1.0);
        self.traffic.total_bytes() as f64 / (self.live as f64 * rounds)
    }
}

/// What every node should see: `members` members, those in `down` down and the others ready,
/// `endpoints` endpoints once each, and `networks` networks made and in its tables.
fn expect<'a>(
    members: usize,
    down: &'a [&'a str],
    endpoints: usize,
    networks: usize,
) -> impl Fn(&Outcome) -> bool + 'a {
    move |o: &Outcome| {
        o.members.len() == members
            && o.members.iter().all(|(id, state)| {
                *state
                    == if down.contains(&id.as_str()) {
                        NodeState::Down
                    } else {
                        NodeState::Ready
                    }
            })
            && o.endpoints.len() == endpoints
            && !o.has_duplicates()
            && o.made.len() == networks
            && o.published.len() == networks
            && o.published.values().map(Vec::len).sum::<usize>() == endpoints + SERVICES
    }
}

/// A plain network, as `network create` proposes it.
fn create_network(id: &str, name: &str, subnet: &str) -> Command {
    Command::CreateNetwork {
        id: id.into(),
        name: name.into(),
        subnet: subnet.parse().unwrap(),
        vni: None,
        mtu: 1450,
        vteps: vec![],
        internal: false,
        encrypted: false,
    }
}

/// Runs the scenario on `nodes` nodes; panics with what the nodes disagree on if an event does
/// not converge within [`WITHIN`].
async fn scenario(nodes: usize, seed: u64) -> Vec<Phase> {
    let mut cluster = Cluster::new(seed, CONDITIONS);
    let net_name = |k: usize| format!("net{k}");
    for k in 0..NETWORKS {
        let subnet = format!("198.19.{k}.0/24");
        cluster
            .commit(create_network(
                &format!("{:016x}", k + 1),
                &net_name(k),
                &subnet,
            ))
            .unwrap();
    }
    for s in 0..SERVICES {
        cluster
            .commit(Command::CreateService {
                name: format!("svc{s}"),
                network: net_name(s % NETWORKS),
                mode: Mode::Vip,
                health: None,
                publish: vec![],
            })
            .unwrap();
    }
    let mut keys: Vec<Vec<(String, String)>> = vec![Vec::new(); nodes];
    for i in 0..ENDPOINTS {
        let node = i % nodes;
        let reply = cluster
            .commit(Command::Allocate {
                network: net_name(i % NETWORKS),
                node: Cluster::node_id(node),
                ip: None,
                service: (i < TASKS).then(|| format!("svc{}", i % SERVICES)),
            })
            .unwrap();
        let ip: Ipv4Addr = reply.as_str().unwrap().parse().unwrap();
        let endpoint = Endpoint {
            network_id: format!("{:016x}", i % NETWORKS + 1),
            ip,
            mac: Endpoint::mac_for(ip),
            netns: format!("c{i}"),
            host_if: format!("ovh{i}"),
            aliases: vec![],
        };
        keys[node].push((
            key::endpoint(&endpoint.network_id, ip),
            endpoint.to_gossip(),
        ));
    }
    let on = |node: usize| (0..ENDPOINTS).filter(|i| i % nodes == node).count();
    let mut phases = Vec::new();

    for k in keys {
        cluster.start_node(k).await;
    }
    phases.push(
        measure(
            &cluster,
            "form",
            nodes,
            expect(nodes, &[], ENDPOINTS, NETWORKS),
        )
        .await,
    );

    // `network create` returns once its node sees every ready member's bridge and TAP.
    let created = "00000000000000ff";
    cluster
        .commit(create_network(created, "created", "198.19.200.0/24"))
        .unwrap();
    let took = cluster
        .wait_for(0, WITHIN, |o| o.everywhere.contains(created))
        .await
        .expect("the new network is made everywhere");
    phases.push(Phase {
        name: "create",
        took,
        live: nodes,
        traffic: cluster.take_traffic(),
    });
    let networks = NETWORKS + 1;

    let joiner = cluster.start_node(vec![]).await;
    assert_eq!(joiner, nodes);
    let joined = expect(nodes + 1, &[], ENDPOINTS, networks);
    phases.push(measure(&cluster, "join", nodes + 1, joined).await);

    // `node leave`: announced in gossip, committed, and the process goes.
    let leaver = 1;
    cluster
        .gossip_set(leaver, &[(key::LEAVING.to_string(), String::new())])
        .await;
    cluster
        .commit(Command::RemoveNode {
            node: Cluster::node_id(leaver),
            address: Some(Cluster::address(leaver)),
            left: true,
        })
        .unwrap();
    cluster.kill(leaver);
    let left = ENDPOINTS - on(leaver);
    phases.push(measure(&cluster, "leave", nodes, expect(nodes, &[], left, networks)).await);

    let dead = 2;
    cluster.kill(dead);
    let dead_id = Cluster::node_id(dead);
    let down = [dead_id.as_str()];
    phases.push(
        measure(
            &cluster,
            "death",
            nodes - 1,
            expect(nodes, &down, left, networks),
        )
        .await,
    );
    phases
}

/// Times the event that just happened: until every live node agrees and `done` holds.
async fn measure(
    cluster: &Cluster,
    name: &'static str,
    live: usize,
    done: impl Fn(&Outcome) -> bool,
) -> Phase {
    match cluster.converge(WITHIN, done).await {
        Ok(took) => Phase {
            name,
            took,
            live,
            traffic: cluster.take_traffic(),
        },
        Err(why) => panic!("{name}: not converged within {WITHIN:?}: {why}"),
    }
}

/// The figures of one run, one line per event.
fn print(nodes: usize, phases: &[Phase]) {
    for p in phases {
        let t = &p.traffic;
        println!(
            "sim: {nodes:>3} nodes {:<5} converged in {:>5} ms ({:>4.1} gossip rounds); \
             {:>7.0} B/node/round; datagrams syn/synack/ack {}/{}/{}, largest {}/{}/{} B; \
             lost {}, too long for UDP {}",
            p.name,
            p.took.as_millis(),
            p.rounds(),
            p.bytes_per_node_round(),
            t.sent[0],
            t.sent[1],
            t.sent[2],
            t.largest[0],
            t.largest[1],
            t.largest[2],
            t.lost,
            t.too_long,
        );
    }
}

/// Runs the scenario on each of `sizes` nodes, prints its figures, and asserts that after a
/// join, a leave and a death every node agrees again within 3 s of simulated time, and that no
/// gossip datagram was too long for UDP.
async fn run(sizes: &[usize]) {
    for &nodes in sizes {
        let wall = std::time::Instant::now();
        let phases = scenario(nodes, SEED).await;
        print(nodes, &phases);
        println!(
            "sim: {nodes:>3} nodes took {:.1} s of wall time",
            wall.elapsed().as_secs_f64()
        );
        for p in &phases {
            if ["join", "leave", "death"].contains(&p.name) {
                assert!(
                    p.took < Duration::from_secs(3),
                    "{nodes} nodes, {}: {} ms (seed {SEED})",
                    p.name,
                    p.took.as_millis()
                );
            }
            assert_eq!(
                p.traffic.too_long, 0,
                "{nodes} nodes, {}: gossip datagrams too long for UDP",
                p.name
            );
        }
    }
}

/// The scenario at 10 nodes: what CI runs (about 11 s of wall time in a debug build).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn ten_nodes_converge_within_three_seconds_of_each_event() {
    run(&[10]).await;
}

/// The scale target at 10, 50 and 100 nodes (about 400 s of wall time in a debug build,
/// most of it the 100 nodes' view builds and registry copies).
#[tokio::test(flavor = "current_thread", start_paused = true)]
#[ignore = "minutes of wall time: cargo test --lib sim -- --ignored --nocapture"]
async fn a_hundred_nodes_converge_within_three_seconds_of_each_event() {
    run(&[10, 50, 100]).await;
}
