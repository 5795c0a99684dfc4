//! The daemon: wires gossip, the peer and API servers, the host configuration and the data plane.
//!
//! Control flow is level-triggered: [`Daemon::reconcile`] runs every [`RECONCILE_EVERY`], derives
//! the [`View`] from gossip, makes the host match it (bridges, TAPs) and publishes fresh tables to
//! the data plane. API and peer requests only change gossip state (and, for attach, the host).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chitchat::ChitchatId;
use tokio::io::BufReader;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::api::{self, Attachment, Failure, NetworkInfo};
use crate::cluster::View;
use crate::gossip::{self, Gossip};
use crate::leader::{self, Ledger};
use crate::model::{Endpoint, Network, NodeState, key};
use crate::peer;
use crate::state_dir::{self, Identity};
use crate::token::Secret;
use crate::{host, wire};

const RECONCILE_EVERY: Duration = Duration::from_millis(250);
/// How long a node waits to see its own change come back through gossip.
const CONVERGE_WITHIN: Duration = Duration::from_secs(10);
/// Underlay bytes VXLAN adds over IPv4: outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub const VXLAN_OVERHEAD: u32 = 50;

pub struct Config {
    pub advertise: Ipv4Addr,
    pub gossip_port: u16,
    pub vxlan_port: u16,
    pub state_dir: PathBuf,
    pub api: PathBuf,
    pub workers: usize,
    pub offloads: bool,
}

/// How this node enters a cluster.
pub enum Start {
    Init,
    Join {
        peer: SocketAddr,
        secret: Secret,
    },
    /// Restart the node whose identity is in the state dir.
    Resume(Identity),
}

pub struct Daemon {
    id: String,
    secret: Secret,
    config: Config,
    vtep: SocketAddrV4,
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
    /// Leader-only bookkeeping; a mutex so concurrent peer requests are decided one at a time.
    ledger: Mutex<Ledger>,
}

/// What the reconcile loop remembers between rounds.
#[derive(Default)]
struct Seen {
    published: overlay::Tables,
    members: BTreeMap<String, NodeState>,
    /// Other members' gossip addresses, as last saved to the state dir.
    peers: Vec<SocketAddr>,
}

impl Daemon {
    /// Checks everything that could fail, then starts; on error nothing is left behind.
    pub async fn start(config: Config, start: Start) -> Result<Arc<Daemon>, Failure> {
        let underlay_mtu = host::underlay_mtu(config.advertise)
            .await
            .map_err(|e| Failure::usage(format!("{e:#}")))?;
        let new_id = || hex::encode(rand::random::<[u8; 6]>());
        let (id, secret, seeds, restored, identity_to_create) = match start {
            Start::Init => {
                state_dir::ensure_unused(&config.state_dir)?;
                (new_id(), Secret::generate(), vec![], vec![], true)
            }
            Start::Join { peer, secret } => {
                state_dir::ensure_unused(&config.state_dir)?;
                match peer::call(peer, &secret, &peer::Request::Hello).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(failure)) => return Err(failure),
                    Err(err) => {
                        return Err(Failure::usage(format!("joining through {peer}: {err:#}")));
                    }
                }
                (new_id(), secret, vec![peer.to_string()], vec![], true)
            }
            Start::Resume(identity) => {
                let secret = Secret::from_token(&identity.token).map_err(Failure::usage)?;
                let own = SocketAddr::from((config.advertise, config.gossip_port));
                let seeds = state_dir::load_peers(&config.state_dir)
                    .into_iter()
                    .filter(|p| *p != own)
                    .map(|p| p.to_string())
                    .collect();
                let restored = surviving_endpoints(&config.state_dir)?;
                (identity.node_id, secret, seeds, restored, false)
            }
        };
        let api_listener = bind_api(&config.api).await?;
        let started = async {
            let gossip_addr = SocketAddr::from((config.advertise, config.gossip_port));
            let peer_listener = TcpListener::bind(gossip_addr).await.map_err(|e| {
                Failure::runtime(format!(
                    "binding {gossip_addr}/tcp for peer requests: {e} (is another daemon using it? pick --gossip-port)"
                ))
            })?;
            let vtep = SocketAddrV4::new(config.advertise, config.vxlan_port);
            let dataplane = overlay::DataPlane::start(overlay::Config {
                local_vtep: vtep,
                workers: config.workers,
                offloads: config.offloads,
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
                        .map(|e| (key::endpoint(&e.network_id, e.ip), endpoint_json(e))),
                )
                .collect();
            let gossip = gossip::start(chitchat_id, &secret, gossip_addr, seeds, initial).await?;
            if identity_to_create {
                let identity = Identity {
                    node_id: id.clone(),
                    token: secret.token(),
                    advertise: config.advertise,
                    gossip_port: config.gossip_port,
                    vxlan_port: config.vxlan_port,
                };
                state_dir::create(&config.state_dir, &identity)?;
            }
            Ok::<_, Failure>((peer_listener, vtep, dataplane, gossip))
        };
        let (peer_listener, vtep, dataplane, gossip) = match started.await {
            Ok(parts) => parts,
            Err(failure) => {
                let _ = std::fs::remove_file(&config.api);
                return Err(failure);
            }
        };
        info!(node = %id, %vtep, underlay_mtu, restored = restored.len(), "node started");
        let daemon = Arc::new(Daemon {
            id,
            secret,
            config,
            vtep,
            underlay_mtu,
            gossip,
            dataplane,
            realised: Mutex::default(),
            stopping: AtomicBool::new(false),
            plumbing: Mutex::default(),
            restoring: Mutex::new(restored),
            ledger: Mutex::default(),
        });
        tokio::spawn(daemon.clone().serve_api(api_listener));
        tokio::spawn(daemon.clone().serve_peers(peer_listener));
        tokio::spawn(daemon.clone().reconcile_forever());
        Ok(daemon)
    }

    pub fn token(&self) -> String {
        self.secret.token()
    }

    /// Stops the data plane and removes what this node made on the host.
    /// The data-path threads end with the process.
    pub async fn stop(&self) {
        let mut realised = self.realised.lock().await;
        // Under the lock, so a reconcile round cannot make the bridges again behind us.
        self.stopping.store(true, Ordering::Relaxed);
        for net in std::mem::take(&mut *realised).values() {
            self.dataplane.remove_network(vni(net));
            host::remove_link(&net.bridge_name()).await;
        }
        let _ = std::fs::remove_file(&self.config.api);
        if let Err(err) = self.gossip.handle.initiate_shutdown() {
            warn!(%err, "gossip did not shut down cleanly");
        }
        info!(
            "node stopped; containers on this node are cut off from their networks until it runs again"
        );
    }

    /// Waits until this node's view satisfies `done`, bounded by [`CONVERGE_WITHIN`].
    async fn converge(&self, what: &str, done: impl Fn(&View) -> bool) -> Result<View, Failure> {
        let deadline = Instant::now() + CONVERGE_WITHIN;
        loop {
            let view = self.gossip.view().await;
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

    async fn reconcile_forever(self: Arc<Daemon>) {
        let mut seen = Seen::default();
        let mut ticker = tokio::time::interval(RECONCILE_EVERY);
        loop {
            ticker.tick().await;
            if let Err(err) = self.reconcile(&mut seen).await {
                warn!(err = %format!("{err:#}"), "reconcile failed; retrying");
            }
        }
    }

    async fn reconcile(&self, seen: &mut Seen) -> anyhow::Result<()> {
        let view = self.gossip.view().await;
        for m in &view.members {
            let (id, address, state) = (&m.node.id, m.node.address, m.node.state);
            match seen.members.insert(id.clone(), state) {
                // A member is heard of before the failure detector has its heartbeats: it
                // counts as joined once it is first seen ready.
                None if state == NodeState::Down => {
                    seen.members.remove(id);
                }
                None => info!(node = %id, %address, "member joined"),
                Some(before) if before != state => {
                    info!(node = %id, %address, %state, "member state changed")
                }
                Some(_) => {}
            }
        }
        let peers: Vec<SocketAddr> = view
            .members
            .iter()
            .filter(|m| !m.node.is_self)
            .map(|m| m.gossip)
            .collect();
        if peers != seen.peers {
            state_dir::save_peers(&self.config.state_dir, &peers)?;
            seen.peers = peers;
        }
        self.replicate(&view).await;
        self.realise(&view).await?;
        self.restore(&view).await;
        let tables = view.tables(&self.id, self.config.vxlan_port);
        if tables != seen.published {
            debug!(networks = tables.networks.len(), "publishing tables");
            self.dataplane.publish(tables.clone());
            seen.published = tables;
        }
        Ok(())
    }

    /// Puts endpoints that survived a restart back on their bridge once it exists again; drops
    /// those whose network was removed meanwhile.
    async fn restore(&self, view: &View) {
        let mut restoring = self.restoring.lock().await;
        if restoring.is_empty() {
            return;
        }
        let realised = self.realised.lock().await;
        let mut changed = false;
        let mut pending = Vec::new();
        for endpoint in restoring.drain(..) {
            if let Some(net) = realised.get(&endpoint.network_id) {
                match host::enslave(&endpoint.host_if, net).await {
                    Ok(()) => {
                        info!(netns = %endpoint.netns, network = %net.name, ip = %endpoint.ip, "endpoint restored")
                    }
                    Err(err) => {
                        warn!(netns = %endpoint.netns, err = %format!("{err:#}"), "endpoint not restored; its container is cut off")
                    }
                }
            } else if view.tombstones.contains(&endpoint.network_id) {
                host::remove_link(&endpoint.host_if).await;
                let gone = key::endpoint(&endpoint.network_id, endpoint.ip);
                self.gossip.update(&[], &[gone]).await;
                changed = true;
                info!(netns = %endpoint.netns, ip = %endpoint.ip, "network removed while this node was down; endpoint unplugged");
            } else {
                pending.push(endpoint);
            }
        }
        *restoring = pending;
        drop(realised);
        if changed {
            self.persist_endpoints().await;
        }
    }

    /// Writes this node's endpoints to the state dir, for `overlayd run` after a restart.
    async fn persist_endpoints(&self) {
        let endpoints: Vec<Endpoint> = self
            .gossip
            .own_keys()
            .await
            .iter()
            .filter(|(k, _)| k.starts_with(key::ENDPOINT_PREFIX))
            .filter_map(|(_, v)| serde_json::from_str(v).ok())
            .collect();
        if let Err(err) = state_dir::save_endpoints(&self.config.state_dir, &endpoints) {
            warn!(err = %format!("{err:#}"), "endpoints not saved: a restart will not restore them");
        }
    }

    /// Keeps a copy of every live network and every tombstone in this node's own state, so both
    /// survive the node that wrote them.
    async fn replicate(&self, view: &View) {
        let (set, delete) = view.replication(&self.gossip.own_keys().await);
        if !set.is_empty() || !delete.is_empty() {
            self.gossip.update(&set, &delete).await;
        }
    }

    /// Makes this host's bridges and TAPs match the view's networks.
    async fn realise(&self, view: &View) -> anyhow::Result<()> {
        let mut realised = self.realised.lock().await;
        if self.stopping.load(Ordering::Relaxed) {
            return Ok(());
        }
        let wanted: BTreeMap<&str, &Network> =
            view.networks.values().map(|n| (n.id.as_str(), n)).collect();
        let gone: Vec<String> = realised
            .keys()
            .filter(|id| !wanted.contains_key(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            let net = realised.remove(&id).expect("listed above");
            self.dataplane.remove_network(vni(&net));
            host::remove_link(&net.bridge_name()).await;
            self.gossip.update(&[], &[key::realised(&id)]).await;
            info!(network = %net.name, vni = net.vni, "network removed from this node");
        }
        for (id, net) in wanted {
            if realised.contains_key(id) {
                continue;
            }
            host::ensure_bridge(net).await?;
            self.dataplane
                .add_network(vni(net), &net.tap_name())
                .with_context(|| format!("creating the TAP of network {}", net.name))?;
            host::enslave(&net.tap_name(), net).await?;
            info!(network = %net.name, vni = net.vni, subnet = %net.subnet, mtu = net.mtu, "network ready on this node");
            self.gossip
                .update(&[(key::realised(id), String::new())], &[])
                .await;
            realised.insert(id.to_string(), net.clone());
        }
        Ok(())
    }

    async fn serve_api(self: Arc<Daemon>, listener: UnixListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let daemon = self.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let reply = match wire::read::<api::Request, _>(&mut BufReader::new(read)).await {
                    Ok(request) => daemon.handle_api(request).await,
                    Err(err) => Err(Failure::usage(format!("bad API request: {err:#}"))),
                };
                if let Err(err) = wire::write(&mut write, &reply).await {
                    debug!(%err, "API client went away before the reply");
                }
            });
        }
    }

    async fn handle_api(&self, request: api::Request) -> api::Reply {
        use api::Request::*;
        match request {
            NodeLs => Ok(json(
                &self
                    .gossip
                    .view()
                    .await
                    .members
                    .into_iter()
                    .map(|m| m.node)
                    .collect::<Vec<_>>(),
            )),
            JoinToken => Ok(json(&self.secret.token())),
            NetworkLs => {
                let view = self.gossip.view().await;
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
            } => self.network_create(name, subnet, vni, mtu, vteps).await,
            NetworkRm { name } => {
                self.ask_leader(&peer::Request::RemoveNetwork { name: name.clone() })
                    .await?;
                self.converge(&format!("removing network {name}"), |v| {
                    !v.networks.contains_key(&name)
                })
                .await?;
                Ok(json(&name))
            }
            Attach { netns, network, ip } => self.attach(netns, network, ip).await,
            Detach { netns, network } => self.detach(netns, network).await,
            Status => {
                let view = self.gossip.view().await;
                let node = view
                    .members
                    .iter()
                    .find(|m| m.node.id == self.id)
                    .map(|m| m.node.clone());
                let stats = self.dataplane.stats();
                Ok(json(&api::Status {
                    node: node.ok_or_else(|| {
                        Failure::runtime("this node is missing from its own view")
                    })?,
                    vtep: self.vtep,
                    networks: view.networks.len(),
                    gossip_rejected: self.gossip.rejected.load(Ordering::Relaxed),
                    dataplane: api::Dataplane {
                        offloads: self.config.offloads,
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
                    },
                }))
            }
        }
    }

    async fn network_create(
        &self,
        name: String,
        subnet: ipnetwork::Ipv4Network,
        vni: Option<u32>,
        mtu: Option<u32>,
        vteps: Vec<Ipv4Addr>,
    ) -> api::Reply {
        validate_name(&name)?;
        let max_mtu = self.underlay_mtu.saturating_sub(VXLAN_OVERHEAD);
        let mtu = match mtu {
            None => max_mtu,
            Some(m) if m > max_mtu => {
                return Err(Failure::usage(format!(
                    "--mtu {m} does not fit: the underlay MTU is {} and VXLAN needs {VXLAN_OVERHEAD} bytes, so use at most {max_mtu}",
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
            .ask_leader(&peer::Request::CreateNetwork {
                name: name.clone(),
                subnet,
                vni,
                mtu,
                vteps,
            })
            .await?;
        let created: Network = serde_json::from_value(reply)
            .map_err(|e| Failure::runtime(format!("leader's reply: {e}")))?;
        // Done when every ready member has made the bridge and TAP, so the network can be used
        // on any node the moment this returns.
        let view = self
            .converge(&format!("creating network {name} on every node"), |v| {
                v.networks.get(&name) == Some(&created)
                    && v.members
                        .iter()
                        .filter(|m| m.node.state == NodeState::Ready)
                        .all(|m| m.realised.contains(&created.id))
            })
            .await?;
        Ok(json(&network_info(&created, &view)))
    }

    async fn attach(&self, netns: String, network: String, ip: Option<Ipv4Addr>) -> api::Reply {
        let _plumbing = self.plumbing.lock().await;
        if !host::netns_exists(&netns) {
            return Err(Failure::usage(format!(
                "network namespace {netns} not found: create it with `ip netns add {netns}` (see `ip netns list`)"
            )));
        }
        let view = self.gossip.view().await;
        let net = leader::known(&view, &network)?.clone();
        // The reconcile loop may not have made the bridge yet for a network created just now.
        self.realise(&view).await?;
        if view
            .endpoints_on(&net)
            .any(|p| p.node == self.id && p.endpoint.netns == netns)
        {
            return Err(Failure::usage(format!(
                "{netns} is already attached to network {network}"
            )));
        }
        let reply = self
            .ask_leader(&peer::Request::Allocate {
                network: network.clone(),
                node: self.id.clone(),
                ip,
            })
            .await?;
        let ip: Ipv4Addr = serde_json::from_value(reply)
            .map_err(|e| Failure::runtime(format!("leader's reply: {e}")))?;
        let mac = Endpoint::mac_for(ip);
        let host_if = format!("ovh{}", hex::encode(rand::random::<[u8; 4]>()));
        let plugged = host::plug(&host::Plug {
            net: &net,
            netns: &netns,
            host_if: &host_if,
            ip,
            mac: &mac,
        })
        .await;
        if let Err(err) = plugged {
            self.release(&net, ip).await;
            return Err(err.into());
        }
        let endpoint = Endpoint {
            network_id: net.id.clone(),
            ip,
            mac: mac.clone(),
            netns: netns.clone(),
            host_if,
        };
        self.gossip
            .update(
                &[(key::endpoint(&net.id, ip), endpoint_json(&endpoint))],
                &[],
            )
            .await;
        self.persist_endpoints().await;
        info!(%netns, network = %net.name, %ip, %mac, "container attached");
        Ok(json(&Attachment {
            netns,
            network,
            ip,
            mac,
            node: self.id.clone(),
        }))
    }

    async fn detach(&self, netns: String, network: String) -> api::Reply {
        let _plumbing = self.plumbing.lock().await;
        let view = self.gossip.view().await;
        let net = leader::known(&view, &network)?;
        let same_name: Vec<_> = view
            .endpoints_on(net)
            .filter(|p| p.endpoint.netns == netns)
            .collect();
        let Some(placed) = same_name.iter().find(|p| p.node == self.id) else {
            return Err(Failure::usage(match same_name.first() {
                Some(p) => format!(
                    "{netns} is attached to network {network} on node {}, not this one: run detach there",
                    p.node
                ),
                None => format!("{netns} is not attached to network {network}"),
            }));
        };
        host::remove_link(&placed.endpoint.host_if).await;
        self.gossip
            .update(&[], &[key::endpoint(&net.id, placed.endpoint.ip)])
            .await;
        self.persist_endpoints().await;
        self.release(net, placed.endpoint.ip).await;
        info!(%netns, network = %net.name, ip = %placed.endpoint.ip, "container detached");
        Ok(json(&placed.endpoint.ip))
    }

    /// Tells the leader an address is free again; if it is unreachable, its reservation expires.
    async fn release(&self, net: &Network, ip: Ipv4Addr) {
        let request = peer::Request::Release {
            network_id: net.id.clone(),
            node: self.id.clone(),
            ip,
        };
        if let Err(failure) = self.ask_leader(&request).await {
            warn!(%ip, network = %net.name, %failure, "leader not told of a released address; it frees it on its own later");
        }
    }

    /// Sends a request to the current leader, retrying while leadership is changing.
    async fn ask_leader(&self, request: &peer::Request) -> Result<serde_json::Value, Failure> {
        let mut last = None;
        for attempt in 0..5 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
            }
            let view = self.gossip.view().await;
            let Some(leader) = view.leader() else {
                continue;
            };
            match peer::call(leader.gossip, &self.secret, request).await {
                Ok(reply) => return reply,
                Err(err) => {
                    warn!(leader = %leader.node.id, attempt, err = %format!("{err:#}"), "leader unreachable");
                    last = Some(err);
                }
            }
        }
        Err(Failure::runtime(format!(
            "no leader answered: {:#}",
            last.unwrap_or_else(|| anyhow::anyhow!("no live member"))
        )))
    }

    async fn serve_peers(self: Arc<Daemon>, listener: TcpListener) {
        loop {
            let Ok((stream, from)) = listener.accept().await else {
                continue;
            };
            let daemon = self.clone();
            tokio::spawn(async move {
                match peer::accept(stream, &daemon.secret).await {
                    Ok(Some((request, responder))) => {
                        let reply = daemon.handle_peer(request).await;
                        if let Err(err) = responder.reply(&reply).await {
                            debug!(%from, %err, "peer went away before the reply");
                        }
                    }
                    Ok(None) => warn!(%from, "peer request with a wrong token refused"),
                    Err(err) => debug!(%from, err = %format!("{err:#}"), "peer exchange failed"),
                }
            });
        }
    }

    /// Peer requests. Those that change cluster state are decided here only while this node is
    /// the leader, one at a time, against the latest view.
    async fn handle_peer(&self, request: peer::Request) -> peer::Reply {
        if matches!(request, peer::Request::Hello) {
            return Ok(json(&self.secret.cluster_id()));
        }
        let mut ledger = self.ledger.lock().await;
        let view = self.gossip.view().await;
        if view.leader().map(|m| m.node.id.as_str()) != Some(self.id.as_str()) {
            return Err(Failure::runtime("this node is not the leader; retry"));
        }
        let summary = format!("{request:?}");
        let new_id = || hex::encode(rand::random::<[u8; 8]>());
        let decision = ledger.decide(request, &view, Instant::now(), new_id)?;
        if !decision.set.is_empty() || !decision.delete.is_empty() {
            self.gossip.update(&decision.set, &decision.delete).await;
            info!(request = %summary, "decided as leader");
        }
        Ok(decision.reply)
    }
}

fn endpoint_json(endpoint: &Endpoint) -> String {
    serde_json::to_string(endpoint).expect("endpoints serialise")
}

/// Endpoints saved before a restart whose host-side veth still exists; the others' containers
/// went away while overlayd was down.
fn surviving_endpoints(dir: &std::path::Path) -> Result<Vec<Endpoint>, Failure> {
    let (alive, gone): (Vec<Endpoint>, Vec<Endpoint>) =
        state_dir::load_endpoints(dir)?.into_iter().partition(|e| {
            std::path::Path::new("/sys/class/net")
                .join(&e.host_if)
                .exists()
        });
    for e in &gone {
        info!(netns = %e.netns, ip = %e.ip, "container went away while this node was down; its address is free again");
    }
    Ok(alive)
}

fn json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("API values serialise")
}

fn vni(net: &Network) -> overlay::Vni {
    overlay::Vni::new(net.vni).expect("admitted networks have valid VNIs")
}

fn network_info(net: &Network, view: &View) -> NetworkInfo {
    NetworkInfo {
        name: net.name.clone(),
        subnet: net.subnet,
        gateway: net.gateway(),
        vni: net.vni,
        mtu: net.mtu,
        vteps: net.vteps.clone(),
        endpoints: view.endpoints_on(net).count(),
    }
}

fn validate_name(name: &str) -> Result<(), Failure> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(Failure::usage(format!(
            "network name {name:?} is not allowed: use 1 to 64 letters, digits, '-', '_' or '.'"
        )))
    }
}

/// Binds the API socket, refusing one that a running daemon still answers on.
async fn bind_api(path: &std::path::Path) -> Result<UnixListener, Failure> {
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(Failure::usage(format!(
            "another overlayd already serves the API at {}: pass a different --api",
            path.display()
        )));
    }
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| Failure::runtime(format!("binding the API socket {}: {e}", path.display())))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    Ok(listener)
}
