//! The daemon: starts and stops a node, and wires gossip, the peer and API servers, the host
//! configuration and the data plane together.
//!
//! API and peer requests only change gossip state (and, for attach and detach, the host); the
//! reconcile loop makes the host and the data plane follow.
//!
//! # Layout
//! - this file: start and stop, the API and peer servers, changes proposed through Raft.
//! - [`reconcile`]: the loop that makes bridges, TAPs and the data plane's tables match the view,
//!   through [`plumbing`] (the host and data plane as a trait, faked by the simulator).
//! - [`endpoints`]: containers on this node (attach, detach, restore after a restart).
//! - [`follow`]: the registry on the members that do not vote in Raft, and the voters' number.
//! - [`ports`]: the checks before a service publishes ports, and `service update`.
//! - [`dns`]: the DNS server on each network's gateway address.
//! - [`mesh_hooks`]: the tc filters that steer the routing mesh into overlayd, and the published
//!   ports held for it.
//! - [`docker_plugin`]: Docker's network and IPAM driver protocols (`--docker-plugin`).
//! - [`observe`]: what a metrics scrape reports, `trace` and `inspect`.
//! - [`mesh_proxy`]: the userspace proxy of the `proxy=v2` ports, which send tasks a PROXY
//!   protocol header.

mod dns;
mod docker_plugin;
mod endpoints;
mod follow;
mod health;
mod mesh_hooks;
mod mesh_proxy;
mod observe;
pub(crate) mod plumbing;
mod ports;
mod reconcile;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chitchat::ChitchatId;
use tokio::io::BufReader;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Mutex;
use tracing::{debug, error, info, warn};

use crate::api::{self, Failure, NetworkInfo, ServiceInfo, Task, TaskState};
use crate::cluster::View;
use crate::consensus::{Change, Consensus, Rpc, Uncommitted};
use crate::gossip::{self, Gossip};
use crate::model::{Endpoint, Network, Node, NodeState, key};
use crate::peer;
use crate::registry::Command;
use crate::state_dir::{self, Identity};
use crate::token::{JoinSecret, Purpose, Secret};
use crate::{egress, host, metrics, services, wire};

/// How long a node waits to see its own change come back through gossip.
const CONVERGE_WITHIN: Duration = Duration::from_secs(10);
/// How long a request naming a network this node does not know waits for its copy of the
/// registry to catch up before it is refused: `network create` returns once the network is
/// committed and made on its own node, and the others apply the commit with the leader's next
/// message (sent at once on a commit, else with the next heartbeat).
const CATCH_UP_WITHIN: Duration = Duration::from_secs(2);
/// How long the API server waits for a client to send its request.
const API_REQUEST_WITHIN: Duration = Duration::from_secs(10);
/// The reply of a member asked to commit a change while it is not the Raft leader; the asker
/// retries.
const NOT_LEADER: &str = "this node is not the leader";
/// The reply of the leader when a majority did not confirm the change in time
/// ([`Uncommitted::Unconfirmed`]); the asker retries.
const UNCONFIRMED: &str = "the leader's majority did not confirm the change in time";
/// How long a joining node keeps asking for the cluster secret and to be added. With a crowd
/// joining at once (every node of a new cluster started together) the seed may turn handshakes
/// away (its cap on handshakes under way), and the leader, which adds the joiners waiting in
/// batches, each within [`crate::consensus::COMMIT_WITHIN`], may not reach one in time: it asks
/// again. Adding a node that is already a member changes nothing.
const JOIN_WITHIN: Duration = Duration::from_secs(60);
/// Pause before asking again (see [`join_pause`]).
const JOIN_RETRY: Duration = Duration::from_millis(500);
/// How long a proposal may look for a leader that commits it: through elections, and through
/// commits slower than [`crate::consensus::COMMIT_WITHIN`] on a loaded cluster. A node cut off
/// from the majority refuses after this.
const PROPOSE_WITHIN: Duration = Duration::from_secs(12);
/// Pause between attempts to find the leader. An election takes an election timeout (1.5-3 s);
/// a short pause lets a change land soon after it ends, and an attempt costs little (a local
/// Raft check, one peer request).
const PROPOSE_RETRY: Duration = Duration::from_millis(100);
/// How often a task that panicked is restarted, at most.
const RESTART_PAUSE: Duration = Duration::from_secs(1);
/// Pause after a failed `accept` (such as EMFILE), so the server does not spin on it.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How long a leaving node waits for every other member to give its tasks no new flows.
const DRAIN_WITHIN: Duration = Duration::from_secs(5);
/// How long a leaving node keeps serving after that, so requests already on its tasks finish.
const DRAIN_GRACE: Duration = Duration::from_millis(500);
/// How long `run` waits for each member it asks whether this node is still one.
const STILL_MEMBER_WITHIN: Duration = Duration::from_secs(3);
/// Underlay bytes VXLAN adds over IPv4: outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub const VXLAN_OVERHEAD: u32 = 50;
/// What an encrypted network's datagrams add on top: the counter and the tag.
const SEAL_OVERHEAD: u32 = overlay::seal::OVERHEAD as u32;

/// The yes-or-no choices of `network create`.
struct NetworkFlags {
    internal: bool,
    encrypted: bool,
}

pub struct Config {
    pub advertise: Ipv4Addr,
    pub gossip_port: u16,
    pub vxlan_port: u16,
    pub state_dir: PathBuf,
    pub api: PathBuf,
    pub workers: usize,
    pub offloads: bool,
    /// How long an established TCP flow may idle in the balancer's table (default: Linux's).
    pub tcp_idle: Option<Duration>,
    /// Serve Docker's network and IPAM driver protocols on [`DOCKER_SOCKET`].
    pub docker_plugin: bool,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
}

pub use docker_plugin::SOCKET as DOCKER_SOCKET;

/// How the daemon stops: SIGTERM (a supervisor's stop or restart) or SIGINT (the user's
/// Ctrl-C).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// To be run again: the host keeps the node's data path, and the connections through it.
    Restartable,
    /// For good: what the node made on the host goes.
    Teardown,
}

/// How this node enters a cluster.
pub enum Start {
    Init,
    Join {
        peer: SocketAddr,
        join: JoinSecret,
    },
    /// Restart the node whose identity is in the state dir.
    Resume(Identity),
}

pub struct Daemon {
    id: String,
    secret: Secret,
    /// What this node proves itself with to other members.
    credential: peer::Credential,
    /// The join token this node started with, until its registry names a rotated one.
    first_join: JoinSecret,
    /// Told once this node has left the cluster (`node leave`): the process then stops.
    left: tokio::sync::Notify,
    config: Config,
    vtep: SocketAddrV4,
    /// The interface holding the advertise address, and its MTU.
    underlay: String,
    underlay_mtu: u32,
    gossip: Gossip,
    dataplane: overlay::DataPlane,
    /// Networks realised on this host (bridge + TAP), by id.
    realised: Mutex<BTreeMap<String, Network>>,
    /// Set by [`Daemon::stop`]: nothing is realised any more.
    stopping: AtomicBool,
    /// Serialises attach/detach on this node.
    plumbing: Mutex<()>,
    /// Endpoints this node hosted before a restart, waiting for their network's bridge.
    restoring: Mutex<Vec<Endpoint>>,
    /// Raft over the registry of networks and addresses.
    consensus: Consensus,
    /// Gossip entries refused for long enough to be logged (see `reconcile`).
    gossip_refused: AtomicU64,
    /// Admission to the peer port before clients prove the token.
    peer_gate: Arc<peer::Gate>,
    /// The service load balancer the data plane calls (see [`crate::services`]).
    balancer: Arc<ingress::balancer::Balancer>,
    /// DNS servers of the realised networks.
    dns: dns::Dns,
    mesh: mesh_hooks::MeshHooks,
    /// The Docker plugin's networks and endpoints (used with `--docker-plugin` only).
    docker: docker_plugin::Plugin,
    /// How long registry changes take to be applied here (see [`metrics::Propagation`]).
    propagation: Arc<metrics::Propagation>,
}

impl Daemon {
    /// Checks everything that could fail, then starts; on error nothing is left behind.
    pub async fn start(config: Config, start: Start) -> Result<Arc<Daemon>, Failure> {
        let (underlay, underlay_mtu) = host::underlay(config.advertise)
            .await
            .map_err(|e| Failure::usage(format!("{e:#}")))?;
        let new_id = || hex::encode(rand::random::<[u8; 6]>());
        let joining = match &start {
            Start::Join { peer, .. } => Some(*peer),
            _ => None,
        };
        let initialising = matches!(start, Start::Init);
        let (id, secret, first_join, seeds, restored, identity_to_create) = match start {
            Start::Init => {
                state_dir::ensure_unused(&config.state_dir)?;
                let secret = Secret::generate();
                let first_join = secret.first_join();
                (new_id(), secret, first_join, vec![], vec![], true)
            }
            Start::Join { peer, join } => {
                state_dir::ensure_unused(&config.state_dir)?;
                let secret = cluster_secret(peer, &join).await?;
                (new_id(), secret, join, vec![peer.to_string()], vec![], true)
            }
            Start::Resume(identity) => {
                let secret = Secret::from_token(&identity.token).map_err(Failure::usage)?;
                let own = SocketAddr::from((config.advertise, config.gossip_port));
                let peers: Vec<SocketAddr> = state_dir::load_peers(&config.state_dir)
                    .into_iter()
                    .filter(|p| *p != own)
                    .collect();
                let credential = peer::Credential::Member {
                    secret: secret.clone(),
                    node: identity.node_id.clone(),
                };
                still_member(&peers, &credential).await?;
                let restored = endpoints::surviving_endpoints(&config.state_dir)?;
                let first_join = secret.first_join();
                let seeds = peers.iter().map(SocketAddr::to_string).collect();
                (identity.node_id, secret, first_join, seeds, restored, false)
            }
        };
        let api_listener = bind_socket(&config.api, "pass a different --api").await?;
        let docker = match docker_plugin::Plugin::load(&config.state_dir) {
            Ok(docker) => docker,
            Err(failure) => {
                let _ = std::fs::remove_file(&config.api);
                return Err(failure);
            }
        };
        let docker_listener = if config.docker_plugin {
            match bind_socket(
                Path::new(DOCKER_SOCKET),
                "one daemon per host serves Docker: leave --docker-plugin out here",
            )
            .await
            {
                Ok(listener) => Some(listener),
                Err(failure) => {
                    let _ = std::fs::remove_file(&config.api);
                    return Err(failure);
                }
            }
        } else {
            None
        };
        let metrics_listener = match config.metrics {
            Some(addr) => match TcpListener::bind(addr).await {
                Ok(listener) => Some(Arc::new(listener)),
                Err(e) => {
                    let _ = std::fs::remove_file(&config.api);
                    return Err(Failure::runtime(format!(
                        "binding --metrics {addr}: {e} (is another process using it?)"
                    )));
                }
            },
            None => None,
        };
        let propagation = Arc::new(metrics::Propagation::new(gossip::unix_ms()));
        // Before anything else is made: a missing `nft` stops the start here, and rules a killed
        // run left are dropped (the networks' own are put back as their bridges are).
        if let Err(err) = egress::reset().await {
            let _ = std::fs::remove_file(&config.api);
            return Err(Failure::runtime(format!("{err:#}")));
        }
        let started = async {
            let gossip_addr = SocketAddr::from((config.advertise, config.gossip_port));
            let peer_listener = TcpListener::bind(gossip_addr).await.map_err(|e| {
                Failure::runtime(format!(
                    "binding {gossip_addr}/tcp for peer requests: {e} (is another daemon using it? pick --gossip-port)"
                ))
            })?;
            let vtep = SocketAddrV4::new(config.advertise, config.vxlan_port);
            let balancer = Arc::new(
                services::balancer(config.advertise, config.tcp_idle)
                    .map_err(|e| Failure::runtime(format!("sizing the connection table: {e}")))?,
            );
            let dataplane = overlay::DataPlane::start(overlay::Config {
                local_vtep: vtep,
                workers: config.workers,
                offloads: config.offloads,
                stage: Arc::new(services::Stage(balancer.clone())),
            })
            .map_err(|e| Failure::runtime(format!("starting the data plane: {e}")))?;
            let generation = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let chitchat_id = ChitchatId::new(id.clone(), generation, gossip_addr);
            // A restarted node announces the endpoints it still hosts from its first gossip
            // round, so their addresses are never seen free.
            let initial = std::iter::once((key::VTEP.to_string(), vtep.to_string()))
                .chain(
                    restored
                        .iter()
                        .map(|e| (key::endpoint(&e.network_id, e.ip), e.to_gossip())),
                )
                .collect();
            let underlay = gossip::Underlay::host();
            let gossip =
                gossip::start(chitchat_id, &secret, gossip_addr, seeds, initial, underlay).await?;
            if identity_to_create {
                let identity = Identity {
                    node_id: id.clone(),
                    token: secret.token(),
                    advertise: config.advertise,
                    gossip_port: config.gossip_port,
                    vxlan_port: config.vxlan_port,
                };
                state_dir::create(&config.state_dir, &identity, &first_join.token())?;
            }
            let consensus =
                Consensus::start(&id, config.state_dir.clone(), &secret, propagation.clone())
                    .await?;
            if initialising {
                consensus.initialise(&id, gossip_addr).await?;
            }
            Ok::<_, Failure>((peer_listener, vtep, dataplane, gossip, consensus, balancer))
        };
        let (peer_listener, vtep, dataplane, gossip, consensus, balancer) = match started.await {
            Ok(parts) => parts,
            Err(failure) => {
                let _ = std::fs::remove_file(&config.api);
                if docker_listener.is_some() {
                    let _ = std::fs::remove_file(DOCKER_SOCKET);
                }
                egress::clear().await;
                if identity_to_create {
                    state_dir::remove_new_node(&config.state_dir);
                }
                return Err(failure);
            }
        };
        let proxy = mesh_proxy::Proxy::new(balancer.clone(), config.advertise);
        let mesh = mesh_hooks::MeshHooks::start(&underlay, proxy).await;
        info!(node = %id, %vtep, %underlay, underlay_mtu, restored = restored.len(), "node started");
        let credential = peer::Credential::Member {
            secret: secret.clone(),
            node: id.clone(),
        };
        let daemon = Arc::new(Daemon {
            id,
            secret,
            credential,
            first_join,
            left: tokio::sync::Notify::new(),
            config,
            vtep,
            underlay,
            underlay_mtu,
            gossip,
            dataplane,
            realised: Mutex::default(),
            stopping: AtomicBool::new(false),
            plumbing: Mutex::default(),
            restoring: Mutex::new(restored),
            consensus,
            gossip_refused: AtomicU64::new(0),
            peer_gate: Arc::default(),
            balancer,
            dns: dns::Dns::new(),
            mesh,
            docker,
            propagation,
        });
        let api_listener = Arc::new(api_listener);
        let peer_listener = Arc::new(peer_listener);
        supervise("API server", {
            let daemon = daemon.clone();
            move || daemon.clone().serve_api(api_listener.clone())
        });
        supervise("peer server", {
            let daemon = daemon.clone();
            move || daemon.clone().serve_peers(peer_listener.clone())
        });
        if let Some(listener) = docker_listener {
            let listener = Arc::new(listener);
            info!(
                socket = DOCKER_SOCKET,
                "serving Docker as network and IPAM driver `overlayd`"
            );
            supervise("Docker plugin", {
                let daemon = daemon.clone();
                move || daemon.clone().serve_docker(listener.clone())
            });
        }
        if let Some(listener) = metrics_listener {
            let daemon = daemon.clone();
            let scrape = move || {
                let daemon = daemon.clone();
                async move { metrics::render(daemon.sample().await, &daemon.propagation) }
            };
            supervise("metrics server", move || {
                metrics::serve(listener.clone(), scrape.clone())
            });
        }
        supervise("reconcile loop", {
            let daemon = daemon.clone();
            move || daemon.clone().reconcile_forever()
        });
        supervise("health checks", {
            let daemon = daemon.clone();
            move || daemon.clone().check_health_forever()
        });
        supervise("registry follower", {
            let daemon = daemon.clone();
            move || daemon.clone().follow_forever()
        });
        let added = match joining {
            Some(seed) => daemon.join_through(seed).await,
            // The first member is in the registry as every later one is.
            None if initialising => daemon.propose(daemon.join_change()).await.map(drop),
            None => Ok(()),
        };
        if let Err(failure) = added {
            daemon.stop(Stop::Teardown).await;
            state_dir::remove_new_node(&daemon.config.state_dir);
            return Err(failure);
        }
        Ok(daemon)
    }

    /// This node's join: what makes it a member.
    fn join_change(&self) -> Change {
        Change::Join {
            node: self.id.clone(),
            addr: SocketAddr::from((self.config.advertise, self.config.gossip_port)),
        }
    }

    /// Asks `seed` to add this node, proved with the join token (the cluster secret alone adds
    /// no node), asking again while the cluster is busy, for at most [`JOIN_WITHIN`].
    async fn join_through(&self, seed: SocketAddr) -> Result<(), Failure> {
        let request = peer::Request::Propose {
            change: self.join_change(),
            forward: true,
        };
        let joiner = peer::Credential::Joiner(self.first_join.clone());
        let deadline = Instant::now() + JOIN_WITHIN;
        let mut attempt = 1u32;
        let joined = loop {
            let joined = match peer::call(seed, &joiner, &request).await {
                Ok(reply) => reply,
                Err(err) => Err(Failure::runtime(format!("{err:#}"))),
            };
            let pause = join_pause();
            match joined {
                Err(failure) if !failure.usage && Instant::now() + pause < deadline => {
                    info!(attempt, why = %failure.message, "the cluster has not added this node yet; asking again");
                    attempt += 1;
                    tokio::time::sleep(pause).await;
                }
                joined => break joined,
            }
        };
        let registry = joined.map_err(|failure| {
            Failure::runtime(format!(
                "joining through {seed}: the cluster did not add this node: {failure}"
            ))
        })?;
        // A voter has the registry from Raft already; any other member starts from this copy.
        if !self.consensus.in_group(&self.id) {
            let copy = serde_json::from_value(registry)
                .map_err(|e| Failure::runtime(format!("the registry the leader sent: {e}")))?;
            self.consensus
                .follow(copy)
                .map_err(|e| Failure::runtime(format!("{e:#}")))?;
        }
        Ok(())
    }

    /// The join secret tokens must hold now.
    fn join_secret(&self) -> JoinSecret {
        self.consensus
            .registry()
            .join()
            .cloned()
            .unwrap_or_else(|| self.first_join.clone())
    }

    /// The current join token.
    pub fn token(&self) -> String {
        self.join_secret().token()
    }

    /// Resolves once this node has left the cluster (`node leave`).
    pub async fn departed(&self) {
        self.left.notified().await;
    }

    /// Before this node goes: announces it, and waits until every other ready member's
    /// balancer gives its tasks no new flows (at most [`DRAIN_WITHIN`]), then lets flows in
    /// flight finish. A node without tasks goes at once.
    pub async fn drain(&self) {
        let view = self.view().await;
        if !view.tasks.iter().any(|t| t.node == self.id) {
            return;
        }
        let leaving = [(key::LEAVING.to_string(), String::new())];
        self.gossip.update(&leaving, &[]).await;
        let deadline = Instant::now() + DRAIN_WITHIN;
        loop {
            let view = self.view().await;
            let waiting: Vec<String> = view
                .members
                .iter()
                .filter(|m| !m.node.is_self && m.node.state == NodeState::Ready)
                .filter(|m| !m.drained.contains(&self.id))
                .map(|m| m.node.id.clone())
                .collect();
            if waiting.is_empty() {
                info!("every member gives this node's tasks no new flows");
                break;
            }
            if Instant::now() > deadline {
                warn!(
                    ?waiting,
                    "members did not confirm within {DRAIN_WITHIN:?} that they give this node's tasks no new flows; going anyway"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(DRAIN_GRACE).await;
    }

    /// Stops the node. [`Stop::Restartable`] leaves the host as it is: the bridges, the
    /// containers' links and addresses, the mesh's hooks (which drop what they steer while
    /// no TAP is there) and the egress rules, so that `overlayd run` picks the node up with
    /// every connection through it still open. [`Stop::Teardown`] removes what this node made
    /// on the host. The data-path threads end with the process, and their TAPs with them.
    pub async fn stop(&self, how: Stop) {
        if how == Stop::Teardown {
            // First: a hook that outlives its TAP drops what it steers.
            self.mesh.stop().await;
        }
        let mut realised = self.realised.lock().await;
        // Under the lock, so a reconcile round cannot make the bridges again behind us.
        self.stopping.store(true, Ordering::Relaxed);
        if how == Stop::Teardown {
            for net in std::mem::take(&mut *realised).values() {
                self.dataplane.remove_network(vni(net));
                self.dns.stop(&net.id);
                host::remove_link(&net.bridge_name()).await;
            }
            egress::clear().await;
        }
        drop(realised);
        let _ = std::fs::remove_file(&self.config.api);
        if self.config.docker_plugin {
            let _ = std::fs::remove_file(DOCKER_SOCKET);
        }
        self.consensus.shutdown().await;
        if let Err(err) = self.gossip.handle.initiate_shutdown() {
            warn!(%err, "gossip did not shut down cleanly");
        }
        info!(
            ?how,
            "node stopped; containers on this node are cut off from their networks until it runs again"
        );
    }

    /// Waits until this node's view satisfies `done`, bounded by [`CONVERGE_WITHIN`].
    async fn converge(
        &self,
        what: &str,
        done: impl Fn(&View) -> bool,
    ) -> Result<Arc<View>, Failure> {
        let deadline = Instant::now() + CONVERGE_WITHIN;
        loop {
            let view = self.view().await;
            if done(&view) {
                return Ok(view);
            }
            if Instant::now() > deadline {
                return Err(Failure::runtime(format!(
                    "{what}: not seen through gossip within {CONVERGE_WITHIN:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The view, once it holds network `name` (see [`CATCH_UP_WITHIN`]); refused after that.
    async fn view_knowing(&self, name: &str) -> Result<Arc<View>, Failure> {
        let deadline = Instant::now() + CATCH_UP_WITHIN;
        loop {
            let view = self.view().await;
            if view.networks.contains_key(name) {
                return Ok(view);
            }
            if Instant::now() > deadline {
                crate::registry::known(&view.networks, name)?;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The cluster as gossip and this node's copy of the registry show it now.
    async fn view(&self) -> Arc<View> {
        self.gossip.view(&self.consensus.registry()).await
    }

    async fn serve_api(self: Arc<Daemon>, listener: Arc<UnixListener>) {
        loop {
            let stream = accept_unix(&listener, "API").await;
            let daemon = self.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let request = tokio::time::timeout(
                    API_REQUEST_WITHIN,
                    wire::read::<api::Request, _>(&mut BufReader::new(read), api::REQUEST_LIMIT),
                )
                .await;
                let mut leaving = false;
                let reply = match request {
                    Ok(Ok(request)) => {
                        leaving = matches!(request, api::Request::NodeLeave);
                        daemon.handle_api(request).await
                    }
                    Ok(Err(err)) => Err(Failure::usage(format!("bad API request: {err:#}"))),
                    Err(_) => {
                        debug!("API client sent no request within {API_REQUEST_WITHIN:?}");
                        return;
                    }
                };
                if let Err(err) = wire::write(&mut write, &reply).await {
                    debug!(%err, "API client went away before the reply");
                }
                // Told the client first: the process stops next.
                if leaving && reply.is_ok() {
                    daemon.left.notify_one();
                }
            });
        }
    }

    async fn handle_api(&self, request: api::Request) -> api::Reply {
        use api::Request::*;
        match request {
            NodeLs => {
                let view = self.view().await;
                let departed = view.departed.iter().map(|(id, d)| Node {
                    id: id.clone(),
                    address: d.address.unwrap_or(Ipv4Addr::UNSPECIFIED),
                    vtep: None,
                    state: if d.left {
                        NodeState::Left
                    } else {
                        NodeState::Removed
                    },
                    is_self: *id == self.id,
                    raft: None,
                });
                let mut members: Vec<Node> = view.members.iter().map(|m| m.node.clone()).collect();
                // A voter's Raft knows the leader before gossip says so.
                if let Some(leader) = self.consensus.leader() {
                    crate::cluster::show_leader(&mut members, Some(&leader));
                }
                Ok(json(
                    &members.into_iter().chain(departed).collect::<Vec<_>>(),
                ))
            }
            JoinToken { rotate: false } => Ok(json(&api::JoinToken {
                token: self.token(),
            })),
            JoinToken { rotate: true } => Ok(json(&api::JoinToken {
                token: self.rotate_join_token().await?,
            })),
            NodeRm { id, force } => self.node_rm(id, force).await,
            NodeLeave => self.node_leave().await,
            NetworkLs => {
                let view = self.view().await;
                Ok(json(
                    &view
                        .networks
                        .values()
                        .map(|n| network_info(n, &view))
                        .collect::<Vec<_>>(),
                ))
            }
            NetworkCreate {
                name,
                subnet,
                vni,
                mtu,
                vteps,
                internal,
                encrypted,
            } => {
                let flags = NetworkFlags {
                    internal,
                    encrypted,
                };
                self.network_create(name, subnet, vni, mtu, vteps, flags)
                    .await
            }
            NetworkRotateKey { name } => {
                let reply = self
                    .propose(Change::registry(Command::RotateKey { name: name.clone() }))
                    .await?;
                let rotated: Network = serde_json::from_value(reply)
                    .map_err(|e| Failure::runtime(format!("leader's reply: {e}")))?;
                // Done when this node uses the new keys; the others take them from the log, and
                // take either epoch meanwhile.
                let view = self
                    .converge(&format!("rotating the key of network {name}"), |v| {
                        v.networks.get(&name) == Some(&rotated)
                    })
                    .await?;
                Ok(json(&network_info(&rotated, &view)))
            }
            NetworkRm { name } => {
                self.propose(Change::registry(Command::RemoveNetwork {
                    name: name.clone(),
                }))
                .await?;
                self.converge(&format!("removing network {name}"), |v| {
                    !v.networks.contains_key(&name)
                })
                .await?;
                Ok(json(&name))
            }
            Attach {
                netns,
                network,
                ip,
                service,
                aliases,
                ifname,
            } => {
                self.attach(netns, network, ip, service, aliases, ifname)
                    .await
            }
            ServiceCreate {
                name,
                network,
                mode,
                health,
                publish,
            } => {
                let view = self.view().await;
                // An existing name is the registry's refusal to make, ports or not.
                if !view.services.contains_key(&name) {
                    let view = self.view_knowing(&network).await?;
                    self.check_publish(&view, &name, &[], &publish, &[]).await?;
                }
                let command = Command::CreateService {
                    name: name.clone(),
                    network,
                    mode,
                    health,
                    publish,
                };
                self.propose(Change::registry(command)).await?;
                let view = self
                    .converge(&format!("creating service {name}"), |v| {
                        v.services.contains_key(&name)
                    })
                    .await?;
                service_reply(&view, &name)
            }
            ServiceUpdate { name, add, remove } => self.service_update(name, add, remove).await,
            ServiceLs => Ok(json(&service_infos(&*self.view().await))),
            ServicePs { name } => {
                let view = self.view().await;
                crate::registry::known_service(&view.services, &name)?;
                Ok(json(&tasks_of(&view, &name)))
            }
            ServiceRm { name, force } => {
                self.propose(Change::registry(Command::RemoveService {
                    name: name.clone(),
                    force,
                }))
                .await?;
                self.converge(&format!("removing service {name}"), |v| {
                    !v.services.contains_key(&name)
                })
                .await?;
                Ok(json(&name))
            }
            Detach {
                netns,
                network,
                missing_ok,
            } => self.detach(netns, network, missing_ok).await,
            Trace {
                network,
                proto,
                src,
                dst,
            } => self.trace(network, proto, src, dst).await,
            Inspect { kind, name } => self.inspect(kind, name).await,
            Status => {
                let view = self.view().await;
                let node = view
                    .members
                    .iter()
                    .find(|m| m.node.id == self.id)
                    .map(|m| m.node.clone());
                let stats = self.dataplane.stats();
                let (tracked, evicted) = self.balancer.flows();
                Ok(json(&api::Status {
                    node: node.ok_or_else(|| {
                        Failure::runtime("this node is missing from its own view")
                    })?,
                    vtep: self.vtep,
                    networks: view.networks.len(),
                    gossip_dropped: self.gossip.dropped(),
                    gossip_refused: self.gossip_refused.load(Ordering::Relaxed),
                    peer_refused: self.peer_gate.refused(),
                    dataplane: api::Dataplane {
                        offloads: self.config.offloads,
                        layout: stats.layout.to_owned(),
                        rx_frames: stats.rx_frames,
                        tx_vxlan: stats.tx_vxlan,
                        rx_vxlan: stats.rx_vxlan,
                        arp_answered: stats.arp_answered,
                        flooded: stats.flooded,
                        drops: stats
                            .drops
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect(),
                        balancer: api::Balancer {
                            tracked,
                            evicted,
                            flows: self.balancer.stats.flows.load(Ordering::Relaxed),
                            rejected: self.balancer.stats.rejected.load(Ordering::Relaxed),
                            dropped: self.balancer.stats.dropped.load(Ordering::Relaxed),
                        },
                    },
                    dns: self.dns.stats(),
                    mesh: self.mesh.status().await,
                }))
            }
        }
    }

    /// `node rm`: takes a dead or lost node out of the cluster for good.
    async fn node_rm(&self, id: String, force: bool) -> api::Reply {
        if id == self.id {
            return Err(Failure::usage(format!(
                "node {id} is this node: to take it out, run `overlayd node leave` here, or `overlayd node rm {id}` on another member"
            )));
        }
        let view = self.view().await;
        if let Some(d) = view.departed.get(&id) {
            let how = if d.left { "left" } else { "was removed from" };
            return Err(Failure::usage(format!(
                "node {id} {how} the cluster already"
            )));
        }
        let member = view.members.iter().find(|m| m.node.id == id);
        if member.is_none() && !self.consensus.registry().members().contains_key(&id) {
            return Err(Failure::usage(format!(
                "node {id} not found: `overlayd node ls` lists the members and their ids"
            )));
        }
        if let Some(m) = member
            && m.node.state != NodeState::Down
            && !force
        {
            return Err(Failure::usage(format!(
                "node {id} is {}: run `overlayd node leave` on it so its tasks move first, or pass --force to remove it anyway (its containers lose the network)",
                m.node.state
            )));
        }
        let address = member.map(|m| m.node.address);
        let change = Change::Remove {
            node: id.clone(),
            address,
            left: false,
        };
        self.propose(change).await?;
        warn!(node = %id, ?address, "node removed from the cluster");
        // It may still hold the token it joined with; its cluster secret alone adds no node
        // (see `peer::Request::permitted`).
        self.rotate_join_token().await?;
        self.converge(&format!("removing node {id}"), |v| {
            v.departed.contains_key(&id) && !v.tasks.iter().any(|t| t.node == id)
        })
        .await?;
        Ok(json(&id))
    }

    /// Commits a new join secret: the old token no longer joins. Returns the new token.
    async fn rotate_join_token(&self) -> Result<String, Failure> {
        let join = JoinSecret::generate();
        let token = join.token();
        self.propose(Change::registry(Command::RotateJoinToken { join }))
            .await?;
        info!("join token rotated; the old one no longer joins");
        Ok(token)
    }

    /// `node leave`: this node's tasks get no new flows anywhere, then it leaves the registry
    /// and Raft; the process stops once the client has the answer.
    async fn node_leave(&self) -> api::Reply {
        let view = self.view().await;
        if view.members.iter().all(|m| m.node.is_self) {
            return Err(Failure::usage(
                "this is the cluster's only node: there is nothing to leave; stop it instead",
            ));
        }
        self.drain().await;
        let change = Change::Remove {
            node: self.id.clone(),
            address: Some(self.config.advertise),
            left: true,
        };
        self.propose(change).await?;
        info!("left the cluster");
        Ok(json(&self.id))
    }

    async fn network_create(
        &self,
        name: String,
        subnet: ipnetwork::Ipv4Network,
        vni: Option<u32>,
        mtu: Option<u32>,
        vteps: Vec<Ipv4Addr>,
        NetworkFlags {
            internal,
            encrypted,
        }: NetworkFlags,
    ) -> api::Reply {
        crate::model::check_name(&name)?;
        let overhead = if encrypted {
            VXLAN_OVERHEAD + SEAL_OVERHEAD
        } else {
            VXLAN_OVERHEAD
        };
        let max_mtu = self.underlay_mtu.saturating_sub(overhead);
        let mtu = match mtu {
            None => max_mtu,
            Some(m) if m > max_mtu => {
                let what = if encrypted { "sealed VXLAN" } else { "VXLAN" };
                return Err(Failure::usage(format!(
                    "--mtu {m} does not fit: the underlay MTU is {} and {what} needs {overhead} bytes, so use at most {max_mtu}",
                    self.underlay_mtu
                )));
            }
            Some(m) if m < 576 => {
                return Err(Failure::usage(format!(
                    "--mtu {m} is below IPv4's minimum of 576"
                )));
            }
            Some(m) => m,
        };
        let reply = self
            .propose(Change::registry(Command::CreateNetwork {
                id: hex::encode(rand::random::<[u8; 8]>()),
                name: name.clone(),
                subnet,
                vni,
                mtu,
                vteps,
                internal,
                encrypted,
            }))
            .await?;
        let created: Network = serde_json::from_value(reply)
            .map_err(|e| Failure::runtime(format!("leader's reply: {e}")))?;
        // Done when committed (a majority has it) and made here. Not waiting for every node to
        // make it keeps this under a second at any size; a node that has not applied the commit
        // yet makes a request naming the network wait for it (`view_knowing`), and an attach
        // makes the bridge itself if its reconcile round has not.
        self.realise_network(&created).await?;
        let view = self
            .converge(&format!("creating network {name}"), |v| {
                v.networks.get(&name) == Some(&created)
            })
            .await?;
        Ok(json(&network_info(&created, &view)))
    }

    /// Commits `change` through the Raft leader (this node, the one its Raft names, or for a
    /// member that is no voter the one gossip names), retrying while leadership moves, for at
    /// most [`PROPOSE_WITHIN`].
    async fn propose(&self, change: Change) -> Result<serde_json::Value, Failure> {
        let deadline = Instant::now() + PROPOSE_WITHIN;
        let mut attempt = 0u32;
        // Every attempt proposes the same change (one proposal id), so one that commits late
        // and its retry are answered once.
        let why = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let here = tokio::time::timeout(left, self.consensus.propose(change.clone()));
            let leader = match here.await.unwrap_or(Err(Uncommitted::Unconfirmed)) {
                Ok(reply) => return reply,
                Err(Uncommitted::Leader(leader)) => Ok(leader),
                Err(Uncommitted::NoLeader) => {
                    self.view().await.leader().ok_or("no leader is known")
                }
                Err(Uncommitted::Unconfirmed) => {
                    Err("this node leads, but no majority of the voters confirmed it")
                }
            };
            let why = match leader {
                Ok(leader) => match self.propose_at(leader, &change, deadline).await {
                    Ok(reply) => return reply,
                    Err(why) => why,
                },
                Err(why) => why.to_string(),
            };
            attempt += 1;
            debug!(attempt, %why, "proposal not committed yet");
            if Instant::now() + PROPOSE_RETRY > deadline {
                break why;
            }
            tokio::time::sleep(PROPOSE_RETRY).await;
        };
        Err(Failure::runtime(format!(
            "no leader confirmed the change within {PROPOSE_WITHIN:?} ({why}): it was not made, \
             unless a leader that got it commits it later. A majority of the cluster's voters \
             must be reachable; `overlayd node ls` shows who is"
        )))
    }

    /// Proposes `change` to `leader`: its reply, or why it gave none. A member that is no voter
    /// copies the registry from the leader before it returns, so what it proposed is in its
    /// own registry as soon as it is committed.
    async fn propose_at(
        &self,
        leader: SocketAddr,
        change: &Change,
        deadline: Instant,
    ) -> Result<api::Reply, String> {
        let request = peer::Request::Propose {
            change: change.clone(),
            forward: false,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, peer::call(leader, &self.credential, &request)).await {
            // Our Raft named a leader that no longer leads: leadership is moving.
            Ok(Ok(Err(failure))) if failure.message == NOT_LEADER => {
                Err(format!("{leader} no longer leads"))
            }
            Ok(Ok(Err(failure))) if failure.message == UNCONFIRMED => Err(format!(
                "no majority of the voters confirmed it to leader {leader}"
            )),
            Ok(Ok(reply)) => {
                if reply.is_ok() {
                    self.copy_registry(leader).await;
                }
                Ok(reply)
            }
            Ok(Err(err)) => Err(format!("leader {leader} unreachable: {err:#}")),
            Err(_) => Err(format!("leader {leader} did not answer")),
        }
    }

    async fn serve_peers(self: Arc<Daemon>, listener: Arc<TcpListener>) {
        loop {
            let (stream, from) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(%err, "peer socket accept failed; retrying");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            };
            // Over the cap the stream is dropped here: closed at once, counted by the gate.
            let Some(slot) = self.peer_gate.admit(from) else {
                continue;
            };
            let daemon = self.clone();
            let keys = peer::Keys {
                member: self.secret.key(Purpose::Peer),
                join: self.join_secret().key(),
            };
            tokio::spawn(async move {
                let mut incoming = match peer::accept(stream, &keys, slot).await {
                    Ok(Some(incoming)) => incoming,
                    // Refused before proving the token: counted and logged by the gate.
                    Ok(None) => return,
                    Err(err) => {
                        debug!(%from, err = %format!("{err:#}"), "peer exchange failed");
                        return;
                    }
                };
                loop {
                    match incoming.next().await {
                        Ok(Some(request)) => {
                            let caller = incoming.caller.clone();
                            let reply = daemon.handle_peer(from, caller, request).await;
                            if let Err(err) = incoming.reply(&reply).await {
                                debug!(%from, %err, "peer went away before the reply");
                                return;
                            }
                        }
                        Ok(None) => return,
                        Err(err) => {
                            debug!(%from, err = %format!("{err:#}"), "peer exchange failed");
                            return;
                        }
                    }
                }
            });
        }
    }

    /// Peer requests from `from`. A joiner may only say `Hello`; a member that left or was
    /// removed may say nothing. Proposals are committed only while this node leads; the asker
    /// retries elsewhere otherwise, so a proposal is never forwarded twice.
    async fn handle_peer(
        &self,
        from: SocketAddr,
        caller: peer::Caller,
        request: peer::Request,
    ) -> peer::Reply {
        let joiner = match &caller {
            peer::Caller::Joiner => true,
            peer::Caller::Member(node) => {
                let member = self.consensus.registry().check_member(node);
                // A leader that leaves is departed before it is out of Raft: it still
                // replicates that last change. Its votes stay refused.
                let handing_over = matches!(request, peer::Request::Raft(Rpc::Append(_)))
                    && self.consensus.in_group(node);
                if !handing_over && let Err(departed) = member {
                    self.peer_gate.refuse(peer::Refusal::Departed, from.ip());
                    return Err(departed);
                }
                false
            }
        };
        request.permitted(&caller, |node| {
            self.consensus.registry().members().contains_key(node)
        })?;
        match request {
            peer::Request::Hello => {
                // A joiner proved the token and gossips next: take its gossip before it is a
                // member.
                self.gossip.admit_joiner(from.ip());
                Ok(json(&peer::Welcome {
                    cluster_id: self.secret.cluster_id(),
                    sealed: joiner.then(|| self.join_secret().seal(&self.secret)),
                }))
            }
            peer::Request::Propose {
                change,
                forward: true,
            } => self.propose(change).await,
            peer::Request::Propose { change, .. } => {
                let summary = format!("{change:?}");
                match self.consensus.propose(change).await {
                    Ok(reply) => {
                        info!(change = %summary, ok = reply.is_ok(), "committed as leader");
                        reply
                    }
                    Err(Uncommitted::Unconfirmed) => Err(Failure::runtime(UNCONFIRMED)),
                    Err(_) => Err(Failure::runtime(NOT_LEADER)),
                }
            }
            peer::Request::Raft(rpc) => Ok(self.consensus.serve(rpc).await),
            peer::Request::Registry { after } => Ok(json(&self.consensus.catchup(after))),
            peer::Request::Bindable { ports } => {
                ports::bindable(&self.id, self.config.advertise, &ports).map(|()| json(&()))
            }
        }
    }
}

/// How long a joiner waits before asking again: [`JOIN_RETRY`] and up to half a second more.
fn join_pause() -> Duration {
    JOIN_RETRY + Duration::from_millis(rand::random::<u64>() % 500)
}

/// Proves `join` to the member at `peer` and opens the cluster secret it answers with.
async fn cluster_secret(peer: SocketAddr, join: &JoinSecret) -> Result<Secret, Failure> {
    let joining = |why: String| Failure::usage(format!("joining through {peer}: {why}"));
    let joiner = peer::Credential::Joiner(join.clone());
    let deadline = Instant::now() + JOIN_WITHIN;
    let reply = loop {
        match peer::call(peer, &joiner, &peer::Request::Hello).await {
            Err(err) if peer::is_busy(&err) && Instant::now() + JOIN_RETRY < deadline => {
                info!(why = %format!("{err:#}"), "the member is busy; asking again");
                tokio::time::sleep(join_pause()).await;
            }
            reply => break reply.map_err(|e| joining(format!("{e:#}")))??,
        }
    };
    let welcome: peer::Welcome = serde_json::from_value(reply)
        .map_err(|e| joining(format!("its answer is not a welcome: {e}")))?;
    welcome
        .sealed
        .and_then(|sealed| join.open(&sealed, &welcome.cluster_id))
        .ok_or_else(|| joining("its answer holds no cluster secret sealed for this token".into()))
}

/// Refuses to restart a node that left the cluster or was removed from it: the first member
/// it knew that answers decides. When none answers (all down, or cut off), it starts.
async fn still_member(peers: &[SocketAddr], credential: &peer::Credential) -> Result<(), Failure> {
    for peer in peers {
        let hello = peer::call(*peer, credential, &peer::Request::Hello);
        match tokio::time::timeout(STILL_MEMBER_WITHIN, hello).await {
            Ok(Ok(Ok(_))) => return Ok(()),
            Ok(Ok(Err(refusal))) => {
                error!(%peer, refusal = %refusal.message, "the cluster refuses this node");
                return Err(refusal);
            }
            Ok(Err(err)) => debug!(%peer, err = %format!("{err:#}"), "member did not answer"),
            Err(_) => debug!(%peer, "member did not answer in time"),
        }
    }
    if !peers.is_empty() {
        warn!("no member this node knew answered; starting, and rejoining when they are back");
    }
    Ok(())
}

/// Runs the task `make` returns, and makes a new one if it panics, so one bad input cannot
/// leave a node without its API, its peer server or its reconcile loop. The panic itself is
/// printed by the panic hook; this logs that the task came back.
fn supervise<F, T>(name: &'static str, make: F)
where
    F: Fn() -> T + Send + 'static,
    T: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match tokio::spawn(make()).await {
                Err(err) if err.is_panic() => {
                    error!(task = name, "task panicked; restarting it");
                    tokio::time::sleep(RESTART_PAUSE).await;
                }
                _ => return,
            }
        }
    });
}

fn json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("API values serialise")
}

fn vni(net: &Network) -> overlay::Vni {
    overlay::Vni::new(net.vni).expect("Network::check keeps VNIs in range")
}

fn service_infos(view: &View) -> Vec<ServiceInfo> {
    view.services
        .values()
        .map(|s| {
            let tasks = tasks_of(view, &s.name);
            ServiceInfo {
                name: s.name.clone(),
                mode: s.mode,
                network: view
                    .networks
                    .values()
                    .find(|n| n.id == s.network_id)
                    .map_or_else(|| s.network_id.clone(), |n| n.name.clone()),
                vip: s.vip,
                health: s.health.clone(),
                tasks_healthy: tasks
                    .iter()
                    .filter(|t| t.state == TaskState::Healthy)
                    .count(),
                tasks_total: tasks.len(),
                publish: s.publish.clone(),
            }
        })
        .collect()
}

/// Service `name` as `service create` and `service update` answer with it.
fn service_reply(view: &View, name: &str) -> api::Reply {
    service_infos(view)
        .into_iter()
        .find(|s| s.name == name)
        .map(|info| json(&info))
        .ok_or_else(|| Failure::runtime(format!("service {name} vanished")))
}

/// The tasks of service `name`, as `service ps` shows them.
fn tasks_of(view: &View, name: &str) -> Vec<Task> {
    let publish = view
        .services
        .get(name)
        .map(|s| s.publish.clone())
        .unwrap_or_default();
    view.tasks
        .iter()
        .filter(|t| t.service == name)
        .map(|t| Task {
            netns: view
                .endpoints
                .iter()
                .find(|p| {
                    p.node == t.node
                        && p.endpoint.ip == t.ip
                        && p.endpoint.network_id == t.network_id
                })
                .map_or_else(String::new, |p| p.endpoint.netns.clone()),
            ip: t.ip,
            node: t.node.clone(),
            node_address: view
                .members
                .iter()
                .find(|m| m.node.id == t.node)
                .map(|m| m.node.address),
            state: view.task_state(t),
            publish: publish.clone(),
        })
        .collect()
}

fn network_info(net: &Network, view: &View) -> NetworkInfo {
    NetworkInfo {
        name: net.name.clone(),
        subnet: net.subnet,
        gateway: net.gateway(),
        vni: net.vni,
        mtu: net.mtu,
        vteps: net.vteps.clone(),
        internal: net.internal,
        encrypted: net.encrypted,
        key_epoch: net.key_epoch,
        endpoints: view.endpoints_on(net).count(),
    }
}

/// The next client of `listener`, the socket of `what`; a failed `accept` (such as EMFILE) is
/// logged and retried.
async fn accept_unix(listener: &UnixListener, what: &str) -> tokio::net::UnixStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return stream,
            Err(err) => {
                warn!(%err, "{what} socket accept failed; retrying");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

/// Binds a unix socket the daemon serves (the API's, the Docker plugin's), refusing one that a
/// running daemon still answers on; `advice` says what to do then. The socket is
/// created owner-only: `bind` makes it under the umask, so there is no moment when another user
/// could connect (a `chmod` after `bind` leaves one).
async fn bind_socket(path: &Path, advice: &str) -> Result<UnixListener, Failure> {
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(Failure::usage(format!(
            "another overlayd already serves {}: {advice}",
            path.display()
        )));
    }
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // The umask is process-wide: this runs during start-up, before this process makes any other
    // file, and puts the old mask back at once.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    bound.map_err(|e| Failure::runtime(format!("binding {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicked_task_is_started_again() {
        let runs = Arc::new(AtomicU64::new(0));
        let (done, finished) = tokio::sync::mpsc::channel::<u64>(1);
        let counter = runs.clone();
        supervise("test task", move || {
            let (runs, done) = (counter.clone(), done.clone());
            async move {
                let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                assert!(run > 1, "the first run fails");
                let _ = done.send(run).await;
            }
        });
        let mut finished = finished;
        let run = tokio::time::timeout(RESTART_PAUSE * 5, finished.recv()).await;
        assert_eq!(
            run,
            Ok(Some(2)),
            "the task was not run again after its panic"
        );
    }
}
