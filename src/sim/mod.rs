//! A deterministic cluster simulator for the control plane: N nodes in one process, on tokio's
//! paused clock, so what is measured is the protocols' time, not this machine's CPU.
//!
//! Each node runs what the daemon runs for the control plane, on fakes where the daemon touches
//! the world:
//! - gossip: [`crate::gossip::start`] itself (chitchat, signed datagrams, the sender check),
//!   over [`net::Net`], an in-memory network with seeded loss and latency, and [`net::Clock`];
//! - the registry: the first [`MAX_VOTERS`] nodes are Raft's voters (node 0 leads): each
//!   applies the one committed log in order, every entry some seeded delay after its commit, as
//!   Raft's followers would, and gossips its status ([`key::RAFT`]). Every other node starts
//!   from the leader's registry (the answer to its join) and copies the entries a voter applied
//!   when its view shows that voter ahead ([`View::registry_ahead`]), one round trip later, as
//!   the daemon's `follow` does. Raft itself, its elections and
//!   its peer RPCs are not run;
//! - reconcile: every [`RECONCILE_EVERY`] and whenever gossip's live set changes, the node
//!   builds its [`View`] with [`Gossip::view`], makes and removes networks with
//!   [`plumbing::realise`] over a recording [`Recorder`], and publishes the tables it derives.
//!
//! Not deterministic to the bit: chitchat 0.11 picks gossip peers and orders equal deltas with
//! its own thread RNG, which cannot be seeded from outside. Everything this simulator chooses
//! (loss, latency, Raft delays, the scenario) comes from the seed.

mod net;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chitchat::ChitchatId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::cluster::View;
use crate::consensus::MAX_VOTERS;
use crate::daemon::plumbing::{self, Plumbing};
use crate::gossip::{self, Gossip, Inputs, Underlay};
use crate::model::{Network, NodeState, RaftRole, RaftStatus, key};
use crate::registry::{Command, Registry};
use crate::token::Secret;

pub use net::{Conditions, Traffic};

/// As the daemon's reconcile loop.
const RECONCILE_EVERY: Duration = Duration::from_millis(250);
/// Raft's heartbeat: a follower learns an entry is committed within one.
const RAFT_HEARTBEAT: Duration = Duration::from_millis(500);
/// A round trip to a voter for its entries: twice [`net::Conditions`]' worst latency.
const COPY_ROUND_TRIP: Duration = Duration::from_millis(10);
const VXLAN_PORT: u16 = 4789;
const GOSSIP_PORT: u16 = 7946;

/// The committed Raft log: every node applies the same entries in the same order.
#[derive(Default)]
struct Log {
    entries: Vec<(Instant, Command)>,
}

/// What a node's last reconcile round gave, in the terms nodes must agree on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Outcome {
    /// Members and their states.
    pub members: Vec<(String, NodeState)>,
    /// (network id, address, node) of every endpoint, sorted; duplicates kept.
    pub endpoints: Vec<(String, Ipv4Addr, String)>,
    /// Service -> its tasks as (address, node).
    pub tasks: BTreeMap<String, Vec<(Ipv4Addr, String)>>,
    /// VNI -> the endpoint addresses in the data plane's published table.
    pub published: BTreeMap<u32, Vec<Ipv4Addr>>,
    /// Networks made on the host, by VNI.
    pub made: BTreeSet<u32>,
    /// Ids of the networks every ready member has made: what `network create` waits for.
    pub everywhere: BTreeSet<String>,
}

impl Outcome {
    /// A hash of the whole outcome, to compare nodes' without comparing every endpoint.
    fn digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        // Fixed keys: the same outcome hashes the same in every run.
        let mut hasher = std::hash::DefaultHasher::new();
        self.hash(&mut hasher);
        hasher.finish()
    }

    /// Whether some (network, address) is held by more than one endpoint.
    pub fn has_duplicates(&self) -> bool {
        self.endpoints
            .windows(2)
            .any(|w| (&w[0].0, w[0].1) == (&w[1].0, w[1].1))
    }
}

/// A node's last outcome and its digest.
type Reconciled = (u64, Arc<Outcome>);

/// The host and data plane of a simulated node: it records what reconcile asks of them.
#[derive(Default)]
struct Recorder {
    made: Mutex<BTreeSet<u32>>,
    published: Mutex<overlay::Tables>,
}

#[async_trait::async_trait]
impl Plumbing for Recorder {
    async fn add_network(&self, net: &Network) -> anyhow::Result<()> {
        lock(&self.made).insert(net.vni);
        Ok(())
    }

    async fn remove_network(&self, net: &Network) {
        lock(&self.made).remove(&net.vni);
    }

    fn publish(&self, tables: overlay::Tables) {
        *lock(&self.published) = tables;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub struct Node {
    pub addr: SocketAddr,
    gossip: Arc<Gossip>,
    outcome: Arc<Mutex<Option<Reconciled>>>,
    reconcile: tokio::task::JoinHandle<()>,
    pub alive: bool,
}

pub struct Cluster {
    net: net::Net,
    secret: Secret,
    rng: StdRng,
    log: Arc<Mutex<Log>>,
    /// The leader's registry: commands are applied here first, for their replies.
    leader: Registry,
    epoch_ms: u64,
    started: Instant,
    pub nodes: Vec<Node>,
}

impl Cluster {
    pub fn new(seed: u64, conditions: Conditions) -> Cluster {
        let mut rng = StdRng::seed_from_u64(seed);
        Cluster {
            net: net::Net::new(rng.random(), conditions),
            // Random, but it changes no choice: keys and the cluster id keep their lengths.
            secret: Secret::generate(),
            rng,
            log: Arc::default(),
            leader: Registry::default(),
            epoch_ms: 1_800_000_000_000,
            started: Instant::now(),
            nodes: Vec::new(),
        }
    }

    /// What the network carried since the last call.
    pub fn take_traffic(&self) -> Traffic {
        self.net.take_traffic()
    }

    /// Commits `command` (applied by the leader now, by every node a little later) and
    /// returns the leader's reply.
    pub fn commit(&mut self, command: Command) -> crate::api::Reply {
        let reply = self.leader.apply(command.clone());
        lock(&self.log).entries.push((Instant::now(), command));
        reply
    }

    /// The id of node number `n`: 12 hex digits, as the daemon's.
    pub fn node_id(n: usize) -> String {
        format!("{:012x}", 0xa0_0000_0000u64 + n as u64)
    }

    /// The underlay address of node number `n`: 198.18.0.0/15, as every test uses.
    pub fn address(n: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, (n / 250) as u8, (n % 250 + 1) as u8)
    }

    /// Starts node number `self.nodes.len()`, gossiping `keys`, through the seed node 0 (which
    /// lets it in as a peer `Hello` would). Returns its index.
    pub async fn start_node(&mut self, keys: Vec<(String, String)>) -> usize {
        let n = self.nodes.len();
        let id = Self::node_id(n);
        let ip = Self::address(n);
        let addr = SocketAddr::from((ip, GOSSIP_PORT));
        let seeds = match self.nodes.first() {
            Some(seed) => {
                seed.gossip.admit_joiner(ip.into());
                vec![seed.addr.to_string()]
            }
            None => vec![],
        };
        let underlay = Underlay {
            datagrams: Arc::new(self.net.clone()),
            clock: Arc::new(net::Clock {
                epoch_ms: self.epoch_ms,
                started: self.started,
                skew_ms: 0,
            }),
        };
        let mut initial = vec![(
            crate::model::key::VTEP.to_string(),
            SocketAddr::from((ip, VXLAN_PORT)).to_string(),
        )];
        initial.extend(keys);
        let chitchat_id = ChitchatId::new(id.clone(), 1, addr);
        let gossip = gossip::start(chitchat_id, &self.secret, addr, seeds, initial, underlay)
            .await
            .expect("an in-memory address binds");
        let gossip = Arc::new(gossip);
        let outcome = Arc::new(Mutex::new(None));
        // Its join: a member from now on. A voter gets the registry from Raft; any other node
        // starts from the leader's, which the join's answer carries.
        let _ = self.commit(Command::AddNode {
            node: id.clone(),
            addr,
        });
        let role = match n {
            0 => Some(RaftRole::Leader),
            n if n < MAX_VOTERS => Some(RaftRole::Voter),
            _ => None,
        };
        let (registry, applied) = match role {
            Some(_) => (Arc::default(), 0),
            None => (Arc::new(self.leader.clone()), lock(&self.log).entries.len()),
        };
        let reconcile = tokio::spawn(reconcile_forever(Reconciler {
            id,
            secret: self.secret.clone(),
            gossip: gossip.clone(),
            log: self.log.clone(),
            registry,
            applied,
            role,
            published: None,
            // Seeded per node: how late, after its commit, this node applies each entry.
            raft_rng: StdRng::seed_from_u64(self.rng.random()),
            due: Vec::new(),
            outcome: outcome.clone(),
        }));
        self.nodes.push(Node {
            addr,
            gossip,
            outcome,
            reconcile,
            alive: true,
        });
        n
    }

    /// Stops node `n` at once, as a kill would: no more gossip, no more reconcile.
    pub fn kill(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        node.reconcile.abort();
        let _ = node.gossip.handle.initiate_shutdown();
        node.alive = false;
    }

    /// Sets keys of node `n`'s gossip state, as its daemon would.
    pub async fn gossip_set(&self, n: usize, set: &[(String, String)]) {
        self.nodes[n].gossip.update(set, &[]).await;
    }

    /// The last outcome of every live node, or `None` while one has none yet.
    fn outcomes(&self) -> Option<Vec<(usize, Reconciled)>> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| node.alive)
            .map(|(n, node)| Some((n, lock(&node.outcome).clone()?)))
            .collect()
    }

    /// Advances simulated time in `step`s until every live node's outcome is the same one and
    /// `done` holds for it, for at most `within`. Returns the time it took, or what the nodes
    /// disagree on.
    pub async fn converge(
        &self,
        within: Duration,
        done: impl Fn(&Outcome) -> bool,
    ) -> Result<Duration, String> {
        const STEP: Duration = Duration::from_millis(10);
        let t0 = Instant::now();
        loop {
            if let Some(outcomes) = self.outcomes() {
                let (digest, first) = &outcomes[0].1;
                if outcomes.iter().all(|(_, (d, _))| d == digest) && done(first) {
                    return Ok(t0.elapsed());
                }
            }
            if t0.elapsed() > within {
                return Err(self.disagreement());
            }
            tokio::time::sleep(STEP).await;
        }
    }

    /// Advances simulated time until node `n`'s own outcome satisfies `done`, for at most
    /// `within`; returns the time it took.
    pub async fn wait_for(
        &self,
        n: usize,
        within: Duration,
        done: impl Fn(&Outcome) -> bool,
    ) -> Option<Duration> {
        const STEP: Duration = Duration::from_millis(10);
        let t0 = Instant::now();
        while t0.elapsed() <= within {
            if lock(&self.nodes[n].outcome)
                .as_ref()
                .is_some_and(|(_, o)| done(o))
            {
                return Some(t0.elapsed());
            }
            tokio::time::sleep(STEP).await;
        }
        None
    }

    /// A short account of how the live nodes' outcomes differ.
    fn disagreement(&self) -> String {
        let Some(outcomes) = self.outcomes() else {
            return "some live node has not reconciled yet".into();
        };
        let mut kinds: Vec<(&Outcome, Vec<usize>)> = Vec::new();
        for (n, (_, o)) in &outcomes {
            match kinds.iter_mut().find(|(k, _)| *k == &**o) {
                Some((_, ns)) => ns.push(*n),
                None => kinds.push((o, vec![*n])),
            }
        }
        kinds
            .iter()
            .map(|(o, ns)| {
                let down = o
                    .members
                    .iter()
                    .filter(|(_, s)| *s != NodeState::Ready)
                    .count();
                format!(
                    "{} node(s) (e.g. {:?}): {} members ({} not ready), {} endpoints, {} tasks, {} networks made",
                    ns.len(),
                    &ns[..ns.len().min(3)],
                    o.members.len(),
                    down,
                    o.endpoints.len(),
                    o.tasks.values().map(Vec::len).sum::<usize>(),
                    o.made.len()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// One node's reconcile loop, as the daemon's, over the [`Recorder`].
struct Reconciler {
    id: String,
    secret: Secret,
    gossip: Arc<Gossip>,
    log: Arc<Mutex<Log>>,
    /// Copied on write: a changed registry is a new one to [`Gossip::view`], as in the daemon.
    registry: Arc<Registry>,
    /// Log entries applied so far.
    applied: usize,
    /// Its part in Raft: none for a node that copies the registry.
    role: Option<RaftRole>,
    /// The entries applied when it last gossiped its status (a voter).
    published: Option<usize>,
    raft_rng: StdRng,
    /// When this node applies each entry seen but not applied yet.
    due: Vec<Instant>,
    outcome: Arc<Mutex<Option<Reconciled>>>,
}

impl Reconciler {
    /// Applies the committed entries that have reached this node, in order.
    fn follow_log(&mut self) {
        let log = lock(&self.log);
        let now = Instant::now();
        while self.applied + self.due.len() < log.entries.len() {
            let committed = log.entries[self.applied + self.due.len()].0;
            let delay = self
                .raft_rng
                .random_range(0..=RAFT_HEARTBEAT.as_millis() as u64);
            let after = self.due.last().copied().unwrap_or(committed);
            self.due
                .push(after.max(committed + Duration::from_millis(delay)));
        }
        while self.due.first().is_some_and(|at| *at <= now) {
            self.due.remove(0);
            // The outcome is the leader's too; a refusal is part of the log all the same.
            let _ = Arc::make_mut(&mut self.registry).apply(log.entries[self.applied].1.clone());
            self.applied += 1;
        }
    }

    /// A voter gossips how far it applied the log, as the daemon's `follow` does.
    async fn publish_status(&mut self, role: RaftRole) {
        if self.published == Some(self.applied) {
            return;
        }
        let status = RaftStatus {
            role,
            term: 1,
            applied: self.applied as u64,
        };
        self.gossip
            .update(&[(key::RAFT.to_string(), status.to_string())], &[])
            .await;
        self.published = Some(self.applied);
    }

    /// A node that is no voter copies what a voter ahead of it applied, one round trip after
    /// its view shows one.
    async fn copy(&mut self) {
        let view = self.gossip.view(&self.registry).await;
        let Some((_, ahead)) = view.registry_ahead(Some(self.applied as u64), &self.id) else {
            return;
        };
        tokio::time::sleep(COPY_ROUND_TRIP).await;
        let log = lock(&self.log);
        while self.applied < (ahead as usize).min(log.entries.len()) {
            let _ = Arc::make_mut(&mut self.registry).apply(log.entries[self.applied].1.clone());
            self.applied += 1;
        }
    }

    /// What the view depends on: the registry, and each member's generation, key versions and
    /// liveness. While it is unchanged, so is the view: the round's work is done already.
    async fn inputs(&self) -> (usize, Inputs) {
        (self.applied, self.gossip.inputs().await)
    }

    async fn round(&mut self, realised: &mut BTreeMap<String, Network>, host: &Recorder) {
        let view = self.gossip.view(&self.registry).await;
        plumbing::realise(&view, realised, host, &self.gossip, false).await;
        let tables = view.tables(&self.id, VXLAN_PORT, &self.secret);
        if tables != *lock(&host.published) {
            host.publish(tables);
        }
        let outcome = outcome(&view, host);
        *lock(&self.outcome) = Some((outcome.digest(), Arc::new(outcome)));
    }
}

async fn reconcile_forever(mut r: Reconciler) {
    let host = Recorder::default();
    let mut realised = BTreeMap::new();
    let mut ticker = tokio::time::interval(RECONCILE_EVERY);
    let mut liveness = r.gossip.liveness().await;
    let mut last = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = liveness.changed() => {}
        }
        match r.role {
            Some(role) => {
                r.follow_log();
                r.publish_status(role).await;
            }
            None => r.copy().await,
        }
        let inputs = r.inputs().await;
        if last.as_ref() == Some(&inputs) {
            continue;
        }
        r.round(&mut realised, &host).await;
        // What the round itself gossiped (networks made) is a change of its own: the next
        // round reads it back, as the daemon's does.
        last = Some(inputs);
    }
}

fn outcome(view: &View, host: &Recorder) -> Outcome {
    let mut endpoints: Vec<(String, Ipv4Addr, String)> = view
        .endpoints
        .iter()
        .map(|p| (p.endpoint.network_id.clone(), p.endpoint.ip, p.node.clone()))
        .collect();
    endpoints.sort();
    // Without each task's state: that follows from the members' states and the endpoints,
    // compared already, and `View::task_state` scans every endpoint per task.
    let mut tasks: BTreeMap<String, Vec<(Ipv4Addr, String)>> = BTreeMap::new();
    for t in &view.tasks {
        tasks
            .entry(t.service.clone())
            .or_default()
            .push((t.ip, t.node.clone()));
    }
    tasks.values_mut().for_each(|t| t.sort());
    let published = lock(&host.published)
        .networks
        .iter()
        .map(|n| {
            let mut ips: Vec<Ipv4Addr> = n.endpoints.iter().map(|e| e.ip).collect();
            ips.sort();
            (n.vni.get(), ips)
        })
        .collect();
    Outcome {
        members: view
            .members
            .iter()
            .map(|m| (m.node.id.clone(), m.node.state))
            .collect(),
        endpoints,
        tasks,
        published,
        made: lock(&host.made).clone(),
        everywhere: view
            .networks
            .values()
            .filter(|n| {
                view.members
                    .iter()
                    .filter(|m| m.node.state == NodeState::Ready)
                    .all(|m| m.realised.contains(&n.id))
            })
            .map(|n| n.id.clone())
            .collect(),
    }
}
