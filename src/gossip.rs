//! Membership and replicated state over chitchat (scuttlebutt gossip + phi-accrual failure
//! detection), on a transport that signs every datagram with the gossip key.
//!
//! chitchat itself authenticates nothing: anyone who can reach UDP 7946 could inject state, and
//! it answers every Syn, so a captured one replayed from a spoofed address used to bring a reply
//! six times its size, full of cluster state, to any victim. [`SignedSocket`] therefore:
//! - takes datagrams only from [`Senders`]: members' gossip addresses, seeds, and hosts that
//!   proved the token with a peer `Hello` moments ago (joiners, not yet members);
//! - signs `time ‖ message` with HMAC-SHA256 under the gossip key ([`Purpose::Gossip`]), and drops
//!   a datagram whose full-length tag does not verify, whose time is more than [`FRESH_WITHIN`]
//!   from ours, or that is not exactly one chitchat message.
//!
//! Every drop is counted by reason ([`Gossip::dropped`]), never logged per datagram.
//!
//! What gossip runs on is an [`Underlay`]: how datagrams travel ([`Datagrams`]: UDP in the
//! daemon, an in-memory network with loss and latency in the simulator) and the wall clock the
//! datagrams' times come from ([`WallClock`]). Signing and checking are the same over either.
//! Every other time gossip reads is tokio's (chitchat's failure detector too), which a test can
//! pause and advance.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use chitchat::transport::{Socket, Transport};
use chitchat::{
    Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, ChitchatMessage, Deserializable,
    FailureDetectorConfig, Serializable,
};
use tokio::time::Instant;
use tracing::debug;

use crate::cluster::{MemberState, View};
use crate::registry::Registry;
use crate::token::{Key, Purpose, Secret, TAG_LEN};

/// Gossip rounds are frequent so that a dead node is noticed within seconds.
pub const GOSSIP_INTERVAL: Duration = Duration::from_millis(200);
/// chitchat's datagram budget; the time and the tag are added around it.
pub const MAX_DATAGRAM: usize = 65_507;
/// Bytes of the send time that leads every signed payload: ms since the Unix epoch, big-endian.
pub const STAMP_LEN: usize = 8;
/// How far a datagram's send time may be from the receiver's clock. A datagram takes
/// milliseconds, so this is the clock skew members may have (NTP keeps them far closer), and the
/// longest a captured datagram can be replayed. Replays inside it only reach members (see
/// [`Senders`]), and chitchat's versions keep them from rolling state back.
pub const FRESH_WITHIN: Duration = Duration::from_secs(30);
/// How long a host that proved the token with a peer `Hello` may gossip before it is a member.
/// A joiner starts gossiping right after its `Hello` and is a member within a few rounds.
const JOINER_WITHIN: Duration = Duration::from_secs(60);

pub struct Gossip {
    pub handle: ChitchatHandle,
    drops: Arc<Drops>,
    /// Gossip rounds this node opened: a round sends a Syn to each peer it picks.
    syns: Arc<AtomicU64>,
    senders: Arc<Mutex<Senders>>,
    /// The last view built, and what it was built from.
    built: Arc<Mutex<Option<Built>>>,
}

/// What a [`View`] is built from, short of the keys themselves: each member's id, generation,
/// key version and liveness. While these and the registry stay the same, so does the view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Inputs(Vec<(Arc<str>, u64, u64, bool)>);

impl Inputs {
    fn of(c: &Chitchat) -> Inputs {
        let live: BTreeSet<&ChitchatId> = c.live_nodes().collect();
        Inputs(
            c.node_states()
                .iter()
                .map(|(id, s)| {
                    let live = live.contains(id);
                    (id.node_id.clone(), id.generation_id, s.max_version(), live)
                })
                .collect(),
        )
    }
}

struct Built {
    registry: Arc<Registry>,
    members: Inputs,
    view: Arc<View>,
}

impl Gossip {
    /// Datagrams dropped so far, by reason.
    pub fn dropped(&self) -> BTreeMap<String, u64> {
        self.drops.snapshot()
    }

    /// Syn messages sent so far: every gossip round sends one to each peer it picks.
    pub fn syns_sent(&self) -> u64 {
        self.syns.load(Ordering::Relaxed)
    }

    /// Nodes out of the cluster for good: their gossip is no longer taken (see [`Senders`]).
    pub fn set_departed(&self, nodes: HashSet<String>) {
        lock(&self.senders).departed = nodes;
    }

    /// `ip` proved the token with a peer `Hello`: its gossip is taken for [`JOINER_WITHIN`], by
    /// which time it is a member.
    pub fn admit_joiner(&self, ip: IpAddr) {
        lock(&self.senders).admit_joiner(ip, Instant::now());
    }

    /// The cluster as this node's gossip state and `registry` show it now.
    pub async fn view(&self, registry: &Arc<Registry>) -> Arc<View> {
        let built = self.built.clone();
        self.handle
            .with_chitchat(move |c| {
                let members = Inputs::of(c);
                let mut built = built.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(last) = &*built
                    && Arc::ptr_eq(&last.registry, registry)
                    && last.members == members
                {
                    // Every reconcile round and health check asks; parsing every member's keys
                    // again was a tenth of an idle node's CPU at 100 nodes.
                    return last.view.clone();
                }
                let live: BTreeSet<&ChitchatId> = c.live_nodes().collect();
                let self_id = c.self_chitchat_id().clone();
                let view = Arc::new(View::build(
                    c.node_states().iter().map(|(id, state)| MemberState {
                        id: &id.node_id,
                        generation: id.generation_id,
                        gossip: id.gossip_advertise_addr,
                        live: live.contains(id),
                        is_self: *id == self_id,
                        keys: state.key_values().collect(),
                    }),
                    registry,
                ));
                *built = Some(Built {
                    registry: registry.clone(),
                    members,
                    view: view.clone(),
                });
                view
            })
            .await
    }

    /// What the view is built from now (see [`Inputs`]): the simulator's rounds skip their
    /// work while it stays the same.
    #[cfg(test)]
    pub(crate) async fn inputs(&self) -> Inputs {
        self.handle.with_chitchat(|c| Inputs::of(c)).await
    }

    /// This node's own keys.
    pub async fn own_keys(&self) -> BTreeMap<String, String> {
        self.handle
            .with_chitchat(|c| {
                c.self_node_state()
                    .key_values()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .await
    }

    /// Follows which members the failure detector calls live, to react to a death at once
    /// instead of at the next periodic round.
    pub async fn liveness(&self) -> Liveness {
        let watch = self.handle.with_chitchat(|c| c.live_nodes_watcher()).await;
        Liveness {
            watch,
            live: BTreeSet::new(),
        }
    }

    /// Sets and deletes keys of this node's state in one step.
    pub async fn update(&self, set: &[(String, String)], delete: &[String]) {
        if set.is_empty() && delete.is_empty() {
            return;
        }
        self.handle
            .with_chitchat(|c| {
                let me = c.self_node_state();
                for (k, v) in set {
                    me.set(k, v);
                }
                for k in delete {
                    me.delete(k);
                }
            })
            .await
    }
}

/// The members gossip calls live. chitchat's watch also fires on every change of a live
/// member's keys; [`Liveness::changed`] waits for a member to die or come back.
pub struct Liveness {
    watch: tokio::sync::watch::Receiver<BTreeMap<ChitchatId, chitchat::NodeState>>,
    live: BTreeSet<ChitchatId>,
}

impl Liveness {
    /// Returns once the set of live members differs from the last one seen; never, once
    /// gossip has stopped.
    pub async fn changed(&mut self) {
        loop {
            if self.watch.changed().await.is_err() {
                return std::future::pending().await;
            }
            let live: BTreeSet<ChitchatId> =
                self.watch.borrow_and_update().keys().cloned().collect();
            if live != self.live {
                self.live = live;
                return;
            }
        }
    }
}

/// How gossip datagrams travel, as a socket bound to one address.
#[async_trait::async_trait]
pub trait Datagrams: Send + Sync + 'static {
    async fn bind(&self, addr: SocketAddr) -> anyhow::Result<Box<dyn DatagramSocket>>;
}

/// One bound address: sends are best effort, as UDP's are.
#[async_trait::async_trait]
pub trait DatagramSocket: Send + Sync + 'static {
    async fn send_to(&mut self, datagram: &[u8], to: SocketAddr) -> std::io::Result<()>;
    /// The next datagram, copied into `buf` (longer ones are cut, as UDP cuts them).
    async fn recv_from(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)>;
}

/// The time signed datagrams carry, in ms since the Unix epoch.
pub trait WallClock: Send + Sync + 'static {
    fn unix_ms(&self) -> u64;
}

/// What gossip runs on.
#[derive(Clone)]
pub struct Underlay {
    pub datagrams: Arc<dyn Datagrams>,
    pub clock: Arc<dyn WallClock>,
}

impl Underlay {
    /// UDP sockets and the system clock: the daemon's.
    pub fn host() -> Underlay {
        Underlay {
            datagrams: Arc::new(Udp),
            clock: Arc::new(SystemClock),
        }
    }
}

struct Udp;

#[async_trait::async_trait]
impl Datagrams for Udp {
    async fn bind(&self, addr: SocketAddr) -> anyhow::Result<Box<dyn DatagramSocket>> {
        let socket = tokio::net::UdpSocket::bind(addr).await.with_context(|| {
            format!("binding gossip socket {addr}/udp (is another daemon using it?)")
        })?;
        Ok(Box::new(socket))
    }
}

#[async_trait::async_trait]
impl DatagramSocket for tokio::net::UdpSocket {
    async fn send_to(&mut self, datagram: &[u8], to: SocketAddr) -> std::io::Result<()> {
        tokio::net::UdpSocket::send_to(self, datagram, to)
            .await
            .map(drop)
    }

    async fn recv_from(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        tokio::net::UdpSocket::recv_from(self, buf).await
    }
}

struct SystemClock;

impl WallClock for SystemClock {
    fn unix_ms(&self) -> u64 {
        unix_ms()
    }
}

pub async fn start(
    id: ChitchatId,
    secret: &Secret,
    listen: SocketAddr,
    seeds: Vec<String>,
    initial: Vec<(String, String)>,
    underlay: Underlay,
) -> anyhow::Result<Gossip> {
    let config = ChitchatConfig {
        chitchat_id: id,
        cluster_id: secret.cluster_id(),
        gossip_interval: GOSSIP_INTERVAL,
        listen_addr: listen,
        seed_nodes: seeds,
        failure_detector_config: FailureDetectorConfig {
            phi_threshold: 8.0,
            sampling_window_size: 1000,
            max_interval: Duration::from_secs(10),
            initial_interval: GOSSIP_INTERVAL * 2,
            // Down nodes stay listed (as down) for a day, as `docker node ls` keeps them.
            dead_node_grace_period: Duration::from_secs(24 * 3600),
        },
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
    };
    let drops = Arc::new(Drops::default());
    let syns = Arc::new(AtomicU64::new(0));
    let senders = Arc::new(Mutex::new(Senders::default()));
    let transport = Signed {
        underlay,
        key: secret.key(Purpose::Gossip),
        drops: drops.clone(),
        syns: syns.clone(),
        senders: senders.clone(),
    };
    let handle = chitchat::spawn_chitchat(config, initial, &transport)
        .await
        .with_context(|| format!("starting gossip on {listen}"))?;
    tokio::spawn(follow_members(
        handle.chitchat(),
        senders.clone(),
        handle.termination_watcher(),
    ));
    Ok(Gossip {
        handle,
        drops,
        syns,
        senders,
        built: Arc::default(),
    })
}

/// Keeps [`Senders::known`] equal to the gossip addresses of every node chitchat knows (down
/// ones too: a restarted node comes back from the same address) and of the seeds, less those
/// only departed nodes use, until gossip stops.
async fn follow_members(
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    senders: Arc<Mutex<Senders>>,
    stopped: impl Future<Output = anyhow::Result<()>>,
) {
    let mut stopped = std::pin::pin!(stopped);
    let mut every = tokio::time::interval(GOSSIP_INTERVAL);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = every.tick() => {}
        }
        let departed = lock(&senders).departed.clone();
        let known: HashSet<SocketAddr> = {
            let c = chitchat.lock().await;
            let (gone, members): (Vec<&ChitchatId>, Vec<&ChitchatId>) = c
                .node_states()
                .keys()
                .partition(|id| departed.contains(&*id.node_id));
            let gone: HashSet<SocketAddr> =
                gone.iter().map(|id| id.gossip_advertise_addr).collect();
            members
                .iter()
                .map(|id| id.gossip_advertise_addr)
                .chain(
                    c.seed_nodes()
                        .into_iter()
                        .filter(|seed| !gone.contains(seed)),
                )
                .collect()
        };
        lock(&senders).known = known;
    }
}

/// Who may gossip with this node.
#[derive(Default)]
struct Senders {
    /// Members' gossip addresses and the seeds.
    known: HashSet<SocketAddr>,
    /// Ids of nodes out of the cluster for good, from the registry: their addresses are not
    /// in `known` (unless a member uses one too).
    departed: HashSet<String>,
    /// Hosts that proved the token with a peer `Hello`, by address (the `Hello` came over TCP,
    /// from another port), and when.
    joiners: HashMap<IpAddr, Instant>,
}

impl Senders {
    fn allows(&self, from: SocketAddr, now: Instant) -> bool {
        self.known.contains(&from)
            || self
                .joiners
                .get(&from.ip())
                .is_some_and(|at| now.duration_since(*at) < JOINER_WITHIN)
    }

    fn admit_joiner(&mut self, ip: IpAddr, now: Instant) {
        self.joiners
            .retain(|_, at| now.duration_since(*at) < JOINER_WITHIN);
        self.joiners.insert(ip, now);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// From an address that is not a member's, a seed's or a fresh joiner's.
    NotMember,
    /// Its tag is missing, short, or does not verify under the gossip key.
    BadTag,
    /// Signed more than [`FRESH_WITHIN`] from now: a replay, or a member's clock is off.
    Stale,
    /// Signed, but not exactly one chitchat message.
    Malformed,
}

impl Dropped {
    const ALL: [Dropped; 4] = [
        Dropped::NotMember,
        Dropped::BadTag,
        Dropped::Stale,
        Dropped::Malformed,
    ];

    fn name(self) -> &'static str {
        match self {
            Dropped::NotMember => "not_member",
            Dropped::BadTag => "bad_tag",
            Dropped::Stale => "stale",
            Dropped::Malformed => "malformed",
        }
    }
}

#[derive(Default)]
struct Drops([AtomicU64; Dropped::ALL.len()]);

impl Drops {
    fn count(&self, why: Dropped) {
        self.0[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> BTreeMap<String, u64> {
        Dropped::ALL
            .iter()
            .map(|why| {
                (
                    why.name().to_owned(),
                    self.0[*why as usize].load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

/// chitchat's transport: every message signed on the way out and checked on the way in.
struct Signed {
    underlay: Underlay,
    key: Key,
    drops: Arc<Drops>,
    syns: Arc<AtomicU64>,
    senders: Arc<Mutex<Senders>>,
}

#[async_trait::async_trait]
impl Transport for Signed {
    async fn open(&self, listen: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        Ok(Box::new(SignedSocket {
            socket: self.underlay.datagrams.bind(listen).await?,
            clock: self.underlay.clock.clone(),
            key: self.key.clone(),
            drops: self.drops.clone(),
            syns: self.syns.clone(),
            senders: self.senders.clone(),
            send_buf: Vec::with_capacity(DATAGRAM_LEN),
            recv_buf: vec![0; DATAGRAM_LEN].into_boxed_slice(),
        }))
    }
}

const DATAGRAM_LEN: usize = STAMP_LEN + MAX_DATAGRAM + TAG_LEN;

struct SignedSocket {
    socket: Box<dyn DatagramSocket>,
    clock: Arc<dyn WallClock>,
    key: Key,
    drops: Arc<Drops>,
    syns: Arc<AtomicU64>,
    senders: Arc<Mutex<Senders>>,
    send_buf: Vec<u8>,
    recv_buf: Box<[u8]>,
}

/// The wall clock in ms since the Unix epoch: the time datagrams carry (and proposals).
pub fn unix_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// Writes `sent_ms ‖ message ‖ tag` into `buf`; the receiver checks it with [`open`].
fn seal(key: &Key, sent_ms: u64, message: &ChitchatMessage, buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&sent_ms.to_be_bytes());
    message.serialize(buf);
    let tag = key.mac(&[buf]);
    buf.extend_from_slice(&tag);
}

/// The message of a datagram that is signed under `key`, fresh at `now_ms`, and exactly one
/// chitchat message.
pub fn open(key: &Key, datagram: &[u8], now_ms: u64) -> Result<ChitchatMessage, Dropped> {
    let split = datagram.len().checked_sub(TAG_LEN).ok_or(Dropped::BadTag)?;
    let (signed, tag) = datagram.split_at(split);
    if !key.verify(&[signed], tag) {
        return Err(Dropped::BadTag);
    }
    let (stamp, mut rest) = signed
        .split_first_chunk::<STAMP_LEN>()
        .ok_or(Dropped::Malformed)?;
    let skew = now_ms.abs_diff(u64::from_be_bytes(*stamp));
    if u128::from(skew) > FRESH_WITHIN.as_millis() {
        return Err(Dropped::Stale);
    }
    let message = ChitchatMessage::deserialize(&mut rest).map_err(|_| Dropped::Malformed)?;
    // Bytes after the message would be signed but unread: whoever made the tag meant other bytes.
    if !rest.is_empty() {
        return Err(Dropped::Malformed);
    }
    Ok(message)
}

#[async_trait::async_trait]
impl Socket for SignedSocket {
    async fn send(&mut self, to: SocketAddr, message: ChitchatMessage) -> anyhow::Result<()> {
        if matches!(message, ChitchatMessage::Syn { .. }) {
            self.syns.fetch_add(1, Ordering::Relaxed);
        }
        seal(
            &self.key,
            self.clock.unix_ms(),
            &message,
            &mut self.send_buf,
        );
        // A peer that is down makes sends fail transiently; chitchat retries next round.
        if let Err(err) = self.socket.send_to(&self.send_buf, to).await {
            debug!(peer = %to, %err, "gossip send failed");
        }
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let (len, from_addr) = match self.socket.recv_from(&mut self.recv_buf).await {
                Ok(got) => got,
                Err(err) => {
                    debug!(%err, "gossip recv failed");
                    continue;
                }
            };
            // The sender first: a stranger costs no HMAC, and is never answered.
            let verdict = if lock(&self.senders).allows(from_addr, Instant::now()) {
                open(&self.key, &self.recv_buf[..len], self.clock.unix_ms())
            } else {
                Err(Dropped::NotMember)
            };
            match verdict {
                Ok(message) => return Ok((from_addr, message)),
                Err(why) => self.drops.count(why),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, NodeState, key};
    use crate::peer;

    async fn node(name: &str, secret: &Secret, seeds: &[SocketAddr]) -> (Gossip, SocketAddr) {
        let addr = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let id = ChitchatId::new(name.to_string(), 1, addr);
        let seeds = seeds.iter().map(|s| s.to_string()).collect();
        let gossip = start(id, secret, addr, seeds, vec![], Underlay::host());
        (gossip.await.unwrap(), addr)
    }

    /// Polls `done` over the views of `nodes` until it holds for all, for at most 15 s.
    async fn converge(nodes: &[&Gossip], what: &str, done: impl Fn(&View) -> bool) {
        converge_with(nodes, &Arc::default(), what, done).await
    }

    async fn converge_with(
        nodes: &[&Gossip],
        registry: &Arc<Registry>,
        what: &str,
        done: impl Fn(&View) -> bool,
    ) {
        for _ in 0..300 {
            let mut all = true;
            for node in nodes {
                all &= done(&*node.view(registry).await);
            }
            if all {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("not converged within 15 s: {what}");
    }

    fn states(view: &View) -> Vec<(String, NodeState)> {
        view.members
            .iter()
            .map(|m| (m.node.id.clone(), m.node.state))
            .collect()
    }

    fn dropped(node: &Gossip, why: Dropped) -> u64 {
        node.dropped()[why.name()]
    }

    /// Three members on loopback: state spreads to all, a stranger with another secret never
    /// gets in, and a stopped member is seen down by the others.
    /// A member (it holds the token) writes state that breaks the rules: an endpoint whose
    /// address the registry gave to someone else, one with a forged MAC, a garbage VTEP, and the
    /// /32 network that once panicked every node's reconcile loop. The other member refuses each,
    /// keeps its own endpoint, and still builds its tables.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalid_state_from_a_member_is_refused_and_the_view_stays_usable() {
        use crate::registry::Command;
        let secret = Secret::generate();
        let (a, a_addr) = node("a", &secret, &[]).await;
        let (b, b_addr) = node("b", &secret, &[a_addr]).await;
        a.admit_joiner(b_addr.ip());
        let mut registry = Registry::default();
        let web = registry
            .apply(Command::CreateNetwork {
                id: "w".into(),
                name: "web".into(),
                subnet: "198.19.0.0/24".parse().unwrap(),
                vni: None,
                mtu: 1450,
                vteps: vec![],
                internal: false,
                encrypted: false,
            })
            .unwrap();
        let allocate = |node: &str| Command::Allocate {
            network: "web".into(),
            node: node.into(),
            ip: None,
            service: None,
        };
        registry.apply(allocate("a")).unwrap();
        let registry = Arc::new(registry);
        let held_by_a = Endpoint {
            network_id: "w".into(),
            ip: "198.19.0.2".parse().unwrap(),
            mac: Endpoint::mac_for("198.19.0.2".parse().unwrap()),
            netns: "c".into(),
            host_if: "ovh1".into(),
            aliases: vec![],
        };
        let forged_mac = Endpoint {
            mac: "02:42:c6:13:00:09".into(),
            ..held_by_a.clone()
        };
        a.update(&[("ep/w/198.19.0.2".into(), held_by_a.to_gossip())], &[])
            .await;
        let evil_net = web.to_string().replace("198.19.0.0/24", "198.19.7.0/32");
        b.update(
            &[
                ("vtep".into(), "not an address".into()),
                ("ep/w/198.19.0.2".into(), held_by_a.to_gossip()),
                ("ep/w/x".into(), forged_mac.to_gossip()),
                ("net/evil".into(), evil_net),
            ],
            &[],
        )
        .await;
        converge_with(&[&a], &registry, "b's entries seen and refused", |v| {
            v.refused.iter().filter(|r| r.starts_with("b ")).count() == 4
        })
        .await;
        let view = a.view(&registry).await;
        let placed: Vec<(&str, String)> = view
            .endpoints
            .iter()
            .map(|p| (p.node.as_str(), p.endpoint.ip.to_string()))
            .collect();
        assert_eq!(placed, [("a", "198.19.0.2".to_string())]);
        assert_eq!(view.networks.keys().collect::<Vec<_>>(), ["web"]);
        let tables = view.tables("a", 4789, &crate::token::Secret::generate());
        assert_eq!(tables.networks.len(), 1);
        assert!(
            tables.networks[0].peers.is_empty(),
            "b's garbage VTEP became a peer"
        );
    }

    #[tokio::test]
    async fn a_view_is_built_again_only_when_a_key_or_the_registry_changed() {
        let (a, _) = node("a", &Secret::generate(), &[]).await;
        let registry = Arc::new(Registry::default());
        let first = a.view(&registry).await;
        assert!(
            Arc::ptr_eq(&first, &a.view(&registry).await),
            "nothing changed"
        );
        a.update(&[(key::LEAVING.into(), String::new())], &[]).await;
        let keyed = a.view(&registry).await;
        assert!(!Arc::ptr_eq(&first, &keyed), "a key changed");
        assert_eq!(keyed.members[0].node.state, NodeState::Leaving);
        let copy = Arc::new((*registry).clone());
        assert!(
            !Arc::ptr_eq(&keyed, &a.view(&copy).await),
            "another registry (each apply makes a new one)"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_converge_strangers_stay_out_and_failures_are_seen() {
        let secret = Secret::generate();
        let (a, a_addr) = node("a", &secret, &[]).await;
        let (b, _) = node("b", &secret, &[a_addr]).await;
        let (c, _) = node("c", &secret, &[a_addr]).await;
        let (stranger, x_addr) = node("x", &Secret::generate(), &[a_addr]).await;

        b.update(&[("up/web".into(), String::new())], &[]).await;
        let all_ready = |v: &View| {
            states(v)
                == [
                    ("a".into(), NodeState::Ready),
                    ("b".into(), NodeState::Ready),
                    ("c".into(), NodeState::Ready),
                ]
        };
        // b and c are no members of a yet: they are let in as after a peer `Hello` (all nodes
        // share 127.0.0.1, so this lets the stranger's datagrams reach the tag check too).
        a.admit_joiner(a_addr.ip());
        converge(&[&a, &b, &c], "three ready members", all_ready).await;
        let on_a = a
            .handle
            .with_chitchat(|ch| {
                ch.node_states()
                    .keys()
                    .map(|id| id.node_id.to_string())
                    .collect::<Vec<_>>()
            })
            .await;
        assert!(
            on_a.iter().all(|id| id != "x"),
            "the stranger's state reached a member: {on_a:?}"
        );
        assert!(
            dropped(&a, Dropped::BadTag) > 0,
            "the stranger's datagrams were not counted: {:?} (from {x_addr})",
            a.dropped()
        );
        assert!(
            stranger.view(&Arc::default()).await.members.len() == 1,
            "the stranger learnt of members"
        );

        c.handle.initiate_shutdown().unwrap();
        converge(&[&a, &b], "c seen down", |v| {
            states(v).contains(&("c".into(), NodeState::Down))
        })
        .await;
    }

    /// A Syn with an empty digest, built from chitchat's wire format: magic 45139 (LE), version
    /// 0, type 0, digest (u16 count), cluster id (u16 length + bytes).
    fn syn(cluster_id: &str) -> ChitchatMessage {
        let mut bytes = vec![0x53, 0xb0, 0, 0, 0, 0];
        bytes.extend_from_slice(&(cluster_id.len() as u16).to_le_bytes());
        bytes.extend_from_slice(cluster_id.as_bytes());
        ChitchatMessage::deserialize(&mut &bytes[..]).unwrap()
    }

    #[test]
    fn sealed_datagrams_open_only_whole_fresh_and_under_the_same_key() {
        let secret = Secret::generate();
        let key = secret.key(Purpose::Gossip);
        let now = 1_700_000_000_000;
        let message = syn(&secret.cluster_id());
        let mut buf = Vec::new();
        seal(&key, now, &message, &mut buf);
        assert_eq!(open(&key, &buf, now + 1_000), Ok(syn(&secret.cluster_id())));

        let other = Secret::generate().key(Purpose::Gossip);
        assert_eq!(open(&other, &buf, now), Err(Dropped::BadTag));
        assert_eq!(
            open(&secret.key(Purpose::Peer), &buf, now),
            Err(Dropped::BadTag),
            "the peer key does not sign gossip"
        );
        let mut flipped = buf.clone();
        flipped[STAMP_LEN + 1] ^= 1;
        assert_eq!(open(&key, &flipped, now), Err(Dropped::BadTag));
        assert_eq!(open(&key, &buf[..TAG_LEN - 1], now), Err(Dropped::BadTag));
        let truncated = [&buf[..buf.len() - TAG_LEN], &buf[buf.len() - 16..]].concat();
        assert_eq!(
            open(&key, &truncated, now),
            Err(Dropped::BadTag),
            "a truncated tag is refused"
        );

        // Signed, but with bytes after the message.
        let mut signed = buf[..buf.len() - TAG_LEN].to_vec();
        signed.extend_from_slice(b"trailing");
        let tag = key.mac(&[&signed]);
        signed.extend_from_slice(&tag);
        assert_eq!(open(&key, &signed, now), Err(Dropped::Malformed));
    }

    /// Issue 8, finding 6: a captured datagram replayed later is refused.
    #[test]
    fn replays_outside_the_window_are_refused_either_way() {
        let secret = Secret::generate();
        let key = secret.key(Purpose::Gossip);
        let sent = 1_700_000_000_000;
        let mut buf = Vec::new();
        seal(&key, sent, &syn(&secret.cluster_id()), &mut buf);
        let window = FRESH_WITHIN.as_millis() as u64;
        assert!(open(&key, &buf, sent + window).is_ok());
        assert!(
            open(&key, &buf, sent - window).is_ok(),
            "a clock slightly behind"
        );
        assert_eq!(open(&key, &buf, sent + window + 1), Err(Dropped::Stale));
        assert_eq!(open(&key, &buf, sent - window - 1), Err(Dropped::Stale));
    }

    /// A TCP server that plays a member for one exchange, sending `nonce` as its challenge, and
    /// returns every line the client sent.
    async fn fake_peer(nonce: Vec<u8>) -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let challenge = format!("{{\"nonce\":\"{}\"}}\n", hex::encode(&nonce));
            stream.write_all(challenge.as_bytes()).await.unwrap();
            let mut lines = tokio::io::BufReader::new(stream).lines();
            let mut got = Vec::new();
            while let Ok(Ok(Some(line))) =
                tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await
            {
                got.push(line);
            }
            got
        });
        (addr, sent)
    }

    /// Issue 8, finding 1: a member that dials a fake peer (a wrong address typed in `join`)
    /// must not sign anything the fake can send as gossip. The fake's "nonce" is the gossip
    /// payload it wants accepted, or as much of it as a nonce of the right length holds.
    #[tokio::test]
    async fn a_fake_peers_challenge_cannot_be_turned_into_gossip() {
        let secret = Secret::generate();
        let key = secret.key(Purpose::Gossip);
        let now = SystemClock.unix_ms();
        let mut wanted = now.to_be_bytes().to_vec();
        syn(&secret.cluster_id()).serialize(&mut wanted);
        let same_length = wanted[..peer::NONCE_LEN].to_vec();
        for nonce in [wanted, same_length] {
            let (addr, sent) = fake_peer(nonce.clone()).await;
            let member = peer::Credential::Member {
                secret: secret.clone(),
                node: "0a0b0c0d0e0f".into(),
            };
            let answer = peer::call(addr, &member, &peer::Request::Hello).await;
            let sent = sent.await.unwrap();
            assert!(answer.is_err(), "the fake cannot answer");
            // Every tag the client sent, behind the nonce alone or the nonce and what it signed.
            for line in &sent {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                let tag = hex::decode(v["tag"].as_str().unwrap()).unwrap();
                let body = v["body"].as_str().unwrap_or_default().as_bytes();
                for payload in [nonce.clone(), [&nonce[..], body].concat()] {
                    let datagram = [payload, tag.clone()].concat();
                    assert!(
                        open(&key, &datagram, now).is_err(),
                        "the client's answer {line} is a valid gossip datagram"
                    );
                }
            }
            if nonce.len() != peer::NONCE_LEN {
                let err = format!("{:#}", answer.unwrap_err());
                assert!(err.contains("not an overlayd member"), "{err}");
                assert_eq!(
                    sent,
                    Vec::<String>::new(),
                    "an odd challenge is not answered"
                );
            }
        }
    }

    /// Whether anything arrives on `socket` within a second.
    async fn answered(socket: &tokio::net::UdpSocket) -> bool {
        let mut buf = vec![0; DATAGRAM_LEN];
        let wait = socket.recv_from(&mut buf);
        tokio::time::timeout(Duration::from_secs(1), wait)
            .await
            .is_ok()
    }

    /// Issue 8, finding 6: a member's own datagram, replayed from an address that is no
    /// member's, gets no answer (it is counted); the same datagram from a seed does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gossip_is_answered_only_to_members_seeds_and_joiners() {
        let secret = Secret::generate();
        let seed = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (a, a_addr) = node("a", &secret, &[seed.local_addr().unwrap()]).await;
        // a gossips to its seed: capture one of its (fresh, signed) Syns.
        let mut buf = vec![0; DATAGRAM_LEN];
        let (len, _) = tokio::time::timeout(Duration::from_secs(5), seed.recv_from(&mut buf))
            .await
            .expect("a gossips to its seed")
            .unwrap();
        let captured = buf[..len].to_vec();

        // A host on another address (on loopback, another IP of 127/8).
        let stranger = tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap();
        stranger.send_to(&captured, a_addr).await.unwrap();
        assert!(!answered(&stranger).await, "a non-member was answered");
        assert!(dropped(&a, Dropped::NotMember) > 0, "{:?}", a.dropped());

        // The same datagram from a sender a accepts is answered (a SynAck).
        a.admit_joiner(stranger.local_addr().unwrap().ip());
        stranger.send_to(&captured, a_addr).await.unwrap();
        assert!(
            answered(&stranger).await,
            "a joiner that said Hello was not answered"
        );
    }
}
