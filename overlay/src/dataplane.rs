//! The data plane as the daemon sees it: start workers, add and remove networks, publish
//! tables, read statistics, shut down.
//!
//! Nothing here runs per packet: the workers (`worker`) do that, reading what this module
//! publishes. It creates TAPs but does not configure links (bridge, MTU, addresses).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering::Relaxed};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use mio::{Poll, Waker};

use crate::ethernet::Mac;
use crate::fdb::Index;
use crate::governor::{self, Governor, Layout};
use crate::keyring::{Keyring, Sealing};
use crate::seal;
use crate::stage::{Passthrough, Stage};
use crate::traffic::{self, NetCounters, NetworkTraffic, PeerTraffic, Peers};
use crate::udp::{self, SendPool};
use crate::vxlan::{self, Vni};
use crate::wire::Wire;
use crate::worker::{Control, Counters, WAKER, Worker};
use crate::{steer, tap};

/// How the data plane is started.
#[derive(Clone)]
pub struct Config {
    /// Underlay address and UDP port to receive VXLAN on (port 4789 by default). Port 0
    /// picks a free port (see [`DataPlane::local_vtep`]).
    pub local_vtep: SocketAddrV4,
    /// Data-path threads, which is also the number of queues of every TAP (at least 1). When
    /// it equals the CPUs the process may run on (CPUs `0..workers`), a governor pins them to
    /// their CPU under light load (see `governor`).
    pub workers: usize,
    /// The fast path: TAP offloads (checksum, TSO4/6, USO where the kernel accepts them,
    /// probed per TAP), `UDP_SEGMENT` on send, `UDP_GRO` and TCP coalescing on receive.
    /// `false` forces all of it off (one frame per read, write and datagram).
    pub offloads: bool,
    /// What rewrites frames to service addresses and their replies ([`crate::stage`]).
    pub stage: Arc<dyn Stage>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            local_vtep: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, vxlan::PORT),
            workers: 1,
            offloads: true,
            stage: Arc::new(Passthrough),
        }
    }
}

/// One immutable view of the cluster; the daemon builds it and publishes whole.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tables {
    pub networks: Vec<NetworkTable>,
}

/// Everything the data plane needs to know about one network.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkTable {
    pub vni: Vni,
    /// The anycast gateway, owned by the local Linux bridge: overlayd never answers nor
    /// floods ARP for it, and drops ARP from anyone else that claims it.
    pub gateway: Ipv4Addr,
    /// The gateway's MAC (the bridge's), the only one that may claim the gateway address.
    pub gateway_mac: Mac,
    /// Every container endpoint in the cluster on this network. Their IP-MAC bindings are
    /// enforced: ARP and ND that contradict them are dropped.
    pub endpoints: Vec<Endpoint>,
    /// Every other member's VTEP carrying this network. Each may send only from the MACs of
    /// the endpoints it hosts; nothing is learned from them.
    pub peers: Vec<SocketAddrV4>,
    /// External VTEPs (not cluster members, such as a kernel `vxlan` device): the hosts behind
    /// them are learned from their traffic. Members and external VTEPs together are the flood
    /// list and the only senders whose VXLAN is accepted for this VNI (checked by IP only).
    pub external: Vec<SocketAddrV4>,
    /// Set on an encrypted network: every datagram to and from a peer is sealed under the
    /// keys given here, and nothing else is sent or accepted ([`crate::seal`]).
    pub sealing: Option<Sealing>,
}

/// A container endpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Endpoint {
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub location: Location,
}

/// Where an endpoint lives.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Location {
    /// Behind the local bridge.
    Local,
    /// Behind this VTEP.
    Remote(SocketAddrV4),
    /// A service address (a VIP): frames to it go to the [`crate::Stage`], which rewrites
    /// them towards an endpoint.
    Service,
}

/// Counters summed over all workers since start.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Frames read from TAPs.
    pub rx_frames: u64,
    /// VXLAN datagrams sent (a flooded frame counts once per peer).
    pub tx_vxlan: u64,
    /// Datagrams received on the VXLAN socket, before any check.
    pub rx_vxlan: u64,
    /// ARP requests answered from cluster state.
    pub arp_answered: u64,
    /// Frames flooded to all peers.
    pub flooded: u64,
    /// TSO/USO super-frames read from a TAP and segmented (each also counts in `rx_frames`).
    pub gso_frames: u64,
    /// Coalesced super-frames (two or more TCP segments) written to a TAP.
    pub gro_frames: u64,
    /// Where workers run (see `governor`): "steered" (pinned, packets steered to the worker
    /// of their CPU), "spread" (heavy load: unpinned, flows hashed), or "hashed" (never
    /// steered: workers and CPUs do not match, or the kernel refused the programs).
    pub layout: &'static str,
    /// Dropped frames and datagrams by reason ("short", "no-i-flag", "unknown-vni",
    /// "not-member", "malformed-frame", "service", ...). Reasons never seen are absent.
    pub drops: BTreeMap<&'static str, u64>,
}

/// What went wrong in the data plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration was rejected before anything was bound or started. Nothing changed.
    #[error("invalid data plane config: {0}")]
    Config(&'static str),
    /// A VXLAN receive socket could not be bound. Everything opened so far was closed again.
    #[error("binding VXLAN socket {addr}: {source}")]
    Bind {
        addr: SocketAddrV4,
        source: io::Error,
    },
    /// Not one send socket could be bound in 49152-65535. Nothing is left open.
    #[error("binding VXLAN send sockets on {ip} (ports 49152-65535): {source}")]
    SendSockets { ip: Ipv4Addr, source: io::Error },
    /// A poller or worker thread could not be created. Nothing is left running.
    #[error("starting data-path worker {index}: {source}")]
    Worker { index: usize, source: io::Error },
    /// The TAP could not be created or one of its queues not opened. No queue was kept, so
    /// the device is gone again; the network was not added.
    #[error("creating TAP {name}: {source}")]
    Tap { name: String, source: io::Error },
    /// The network already has a TAP. Nothing changed.
    #[error("network {vni} already has TAP {tap}; remove it first")]
    NetworkExists { vni: Vni, tap: String },
    /// A worker thread has stopped (it panicked). The network was not added.
    #[error("data-path worker {index} has stopped")]
    WorkerGone { index: usize },
}

struct WorkerHandle {
    mailbox: Mailbox,
    counters: Arc<Counters>,
    /// The worker thread's id (0 until it has started), for the governor's samples.
    tid: Arc<AtomicI32>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    fn send(&self, msg: Control) -> bool {
        self.mailbox.send(msg)
    }
}

/// Where to send a worker control messages.
#[derive(Clone)]
struct Mailbox {
    control: mpsc::Sender<Control>,
    waker: Arc<Waker>,
}

impl Mailbox {
    fn send(&self, msg: Control) -> bool {
        self.control.send(msg).is_ok() && self.waker.wake().is_ok()
    }
}

/// The governor's thread: samples the workers' demand for CPU every [`governor::SAMPLE`] and
/// tells them when the layout changes. It stops when `stop` is dropped.
struct Governed {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
    /// The layout last decided, for [`DataPlane::stats`].
    steered: Arc<AtomicBool>,
}

impl Governed {
    fn start(workers: &[WorkerHandle]) -> io::Result<Governed> {
        let mailboxes: Vec<Mailbox> = workers.iter().map(|w| w.mailbox.clone()).collect();
        let tids: Vec<Arc<AtomicI32>> = workers.iter().map(|w| w.tid.clone()).collect();
        let (stop, stopped) = mpsc::channel::<()>();
        let steered = Arc::new(AtomicBool::new(true));
        let decided = steered.clone();
        let thread = std::thread::Builder::new()
            .name("overlay-governor".into())
            .spawn(move || {
                let mut governor = Governor::default();
                for m in &mailboxes {
                    m.send(Control::Layout(governor.layout()));
                }
                // A worker that is gone or not yet started counts as idle.
                let demand = |tid: &AtomicI32| {
                    steer::thread_demand(tid.load(Relaxed)).unwrap_or(Duration::ZERO)
                };
                let mut last: Vec<Duration> = tids.iter().map(|t| demand(t)).collect();
                let mut at = Instant::now();
                while let Err(mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(governor::SAMPLE)
                {
                    let now = Instant::now();
                    let elapsed = now.duration_since(at).as_secs_f64();
                    at = now;
                    let mut busiest: f64 = 0.0;
                    for (tid, last) in tids.iter().zip(last.iter_mut()) {
                        let ran = demand(tid);
                        busiest = busiest.max(ran.saturating_sub(*last).as_secs_f64() / elapsed);
                        *last = ran;
                    }
                    if let Some(layout) = governor.observe(busiest) {
                        decided.store(layout == Layout::Steered, Relaxed);
                        // Debug: a bursty load may switch a few times a second.
                        tracing::debug!(
                            ?layout,
                            busiest = format_args!("{busiest:.2}"),
                            "data-path layout changes"
                        );
                        for m in &mailboxes {
                            m.send(Control::Layout(layout));
                        }
                    }
                }
            })?;
        Ok(Governed {
            stop,
            thread,
            steered,
        })
    }

    fn stop(self) {
        drop(self.stop);
        if self.thread.join().is_err() {
            tracing::error!("the data-path governor had panicked");
        }
    }
}

/// The running data plane: worker threads, their sockets, and the published tables.
pub struct DataPlane {
    workers: Vec<WorkerHandle>,
    /// Switches the workers between the steered and the spread layout; `None` when they
    /// cannot be steered.
    governor: Option<Governed>,
    tables: Arc<ArcSwap<Index>>,
    /// Every peer's counters, swapped in with the tables.
    peers: Arc<ArcSwap<Peers>>,
    /// Control path only (add/remove network), never touched per packet.
    networks: Mutex<HashMap<Vni, String>>,
    /// Each network's counters, one per worker (control path and metrics only).
    traffic: Mutex<HashMap<Vni, Vec<Arc<NetCounters>>>>,
    /// The sessions of encrypted networks, kept across publishes (control path only).
    keyring: Mutex<Keyring>,
    local_vtep: SocketAddrV4,
    offloads: bool,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("local_vtep", &self.local_vtep)
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl DataPlane {
    /// Binds the sockets and starts `config.workers` worker threads.
    pub fn start(config: Config) -> Result<DataPlane, Error> {
        if config.workers == 0 {
            return Err(Error::Config("workers must be at least 1"));
        }
        if config.workers > 1024 {
            return Err(Error::Config("workers must be at most 1024"));
        }
        let ip = *config.local_vtep.ip();
        let pool = SendPool::bind(ip, udp::POOL_SIZE)
            .map_err(|source| Error::SendSockets { ip, source })?;
        let send_sockets = pool.len();
        let pool = Arc::new(pool);

        // Open every socket and poller first, so a failure leaves nothing running.
        let mut addr = config.local_vtep;
        let mut prepared = Vec::with_capacity(config.workers);
        for index in 0..config.workers {
            let udp = udp::bind_receiver(addr).map_err(|source| Error::Bind { addr, source })?;
            if config.offloads
                && let Err(e) = udp::enable_gro(&udp)
            {
                tracing::warn!(error = %e, "UDP_GRO refused; receiving datagrams one by one");
            }
            if addr.port() == 0 {
                let bound = udp
                    .local_addr()
                    .map_err(|source| Error::Bind { addr, source })?;
                addr.set_port(bound.port());
            }
            let poll = Poll::new().map_err(|source| Error::Worker { index, source })?;
            let waker = Waker::new(poll.registry(), WAKER)
                .map_err(|source| Error::Worker { index, source })?;
            prepared.push((udp, poll, Arc::new(waker)));
        }
        // The steered layout needs worker i and CPU i to be the same thing, and the kernel to
        // take the steering programs (see `governor`).
        let mut tap_program = if steer::identity_cpus() != Some(config.workers) {
            tracing::info!(
                "worker count differs from the CPUs this process may use: flows are hashed to workers, none is pinned"
            );
            None
        } else {
            match steer::probe(&prepared[0].0, config.workers as u32) {
                Ok(program) => Some(program),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot steer packets to the worker of their CPU (the BPF programs need CAP_BPF or CAP_SYS_ADMIN; the governor reads /proc/self/task/*/schedstat): flows are hashed to workers, none is pinned");
                    None
                }
            }
        };
        // Replies of connections to published ports leave through the node's own interfaces.
        let wire = match Wire::open(ip) {
            Ok(wire) => Some(Arc::new(wire)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the sockets replies to published ports leave on (they need CAP_NET_RAW): published ports will not answer");
                None
            }
        };
        let steerable = tap_program.is_some();
        let tables = Arc::new(ArcSwap::from_pointee(Index::default()));
        let peers = Arc::new(ArcSwap::from_pointee(Peers::new(Instant::now())));
        let mut workers: Vec<WorkerHandle> = Vec::with_capacity(config.workers);
        for (index, (udp, poll, waker)) in prepared.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let counters = Arc::new(Counters::default());
            let tid = Arc::new(AtomicI32::new(0));
            let worker = Worker {
                poll,
                control: rx,
                udp,
                pool: pool.clone(),
                tables: tables.clone(),
                peers: peers.clone(),
                counters: counters.clone(),
                offloads: config.offloads,
                stage: config.stage.clone(),
                wire: wire.clone(),
                cpu: steerable.then_some((index, config.workers)),
                // Worker 0 attaches the per-device and per-group programs.
                steering: tap_program.take(),
            };
            let thread_tid = tid.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("overlay-worker-{index}"))
                .spawn(move || {
                    thread_tid.store(steer::current_thread_id(), Relaxed);
                    worker.run()
                });
            match spawned {
                Ok(thread) => workers.push(WorkerHandle {
                    mailbox: Mailbox { control: tx, waker },
                    counters,
                    tid,
                    thread: Some(thread),
                }),
                Err(source) => {
                    stop(&mut workers, None);
                    return Err(Error::Worker { index, source });
                }
            }
        }
        let governor = if steerable {
            match Governed::start(&workers) {
                Ok(g) => Some(g),
                Err(source) => {
                    stop(&mut workers, None);
                    return Err(Error::Worker {
                        index: config.workers,
                        source,
                    });
                }
            }
        } else {
            None
        };
        tracing::info!(vtep = %addr, workers = config.workers, steerable, send_sockets, "data plane started");
        Ok(DataPlane {
            workers,
            governor,
            tables,
            peers,
            networks: Mutex::new(HashMap::new()),
            traffic: Mutex::new(HashMap::new()),
            keyring: Mutex::new(Keyring::default()),
            local_vtep: addr,
            offloads: config.offloads,
        })
    }

    /// The address VXLAN is received on (with the actual port if 0 was configured).
    pub fn local_vtep(&self) -> SocketAddrV4 {
        self.local_vtep
    }

    /// Creates TAP `tap_name` with one queue per worker and starts switching network `vni`
    /// through it. The caller then enslaves it to the bridge and sets it up.
    pub fn add_network(&self, vni: Vni, tap_name: &str) -> Result<(), Error> {
        let mut networks = lock(&self.networks);
        if let Some(tap) = networks.get(&vni) {
            return Err(Error::NetworkExists {
                vni,
                tap: tap.clone(),
            });
        }
        if let Some(index) = self
            .workers
            .iter()
            .position(|w| w.thread.as_ref().is_none_or(|t| t.is_finished()))
        {
            return Err(Error::WorkerGone { index });
        }
        let tap_err = |source| Error::Tap {
            name: tap_name.to_owned(),
            source,
        };
        let queues = tap::Queue::open_many(tap_name, self.workers.len()).map_err(tap_err)?;
        // The offload setting is per device, so one queue is enough.
        let offload = if self.offloads {
            tap::probe_offload(&queues[0])
        } else {
            queues[0].set_offload(0).map_err(tap_err)?;
            0
        };
        let uso_flags = tap::offload::USO4 | tap::offload::USO6;
        let uso = offload & uso_flags == uso_flags;
        let traffic: Vec<Arc<NetCounters>> = self.workers.iter().map(|_| Arc::default()).collect();
        for (index, ((worker, queue), traffic)) in
            self.workers.iter().zip(queues).zip(&traffic).enumerate()
        {
            let traffic = traffic.clone();
            if !worker.send(Control::AddQueue {
                vni,
                queue,
                uso,
                traffic,
            }) {
                // Undo: workers that got a queue close it again.
                self.remove_queues(vni);
                return Err(Error::WorkerGone { index });
            }
        }
        networks.insert(vni, tap_name.to_owned());
        lock(&self.traffic).insert(vni, traffic);
        tracing::info!(%vni, tap = tap_name, queues = self.workers.len(), offload = format_args!("{offload:#x}"), "network added");
        Ok(())
    }

    /// Stops switching `vni`; every worker closes its queue, so the TAP disappears. Returns
    /// once all workers have done so. Unknown VNIs are ignored.
    pub fn remove_network(&self, vni: Vni) {
        let mut networks = lock(&self.networks);
        if networks.remove(&vni).is_some() {
            self.remove_queues(vni);
            lock(&self.traffic).remove(&vni);
            tracing::info!(%vni, "network removed");
        }
    }

    fn remove_queues(&self, vni: Vni) {
        let (done_tx, done_rx) = mpsc::channel();
        let asked = self
            .workers
            .iter()
            .filter(|w| {
                w.send(Control::Remove {
                    vni,
                    done: done_tx.clone(),
                })
            })
            .count();
        drop(done_tx);
        for _ in 0..asked {
            if done_rx.recv_timeout(Duration::from_secs(2)).is_err() {
                tracing::warn!(%vni, "a worker did not confirm closing its TAP queue");
                break;
            }
        }
    }

    /// Builds the lookup indexes for `tables` and swaps them in; workers see them on their
    /// next batch.
    pub fn publish(&self, tables: Tables) {
        let mut keyring = self.keyring.lock().unwrap_or_else(|e| e.into_inner());
        let sessions = keyring.update(&tables, Instant::now(), seal::clock_counter());
        let peers = tables
            .networks
            .iter()
            .flat_map(|n| n.peers.iter().map(|p| *p.ip()))
            .chain(
                tables
                    .networks
                    .iter()
                    .flat_map(|n| n.external.iter().map(|p| *p.ip())),
            );
        self.peers.store(Arc::new(self.peers.load().follow(peers)));
        self.tables
            .store(Arc::new(Index::build_sealed(&tables, &sessions)));
    }

    /// The tables the workers switch by now.
    pub fn index(&self) -> Arc<Index> {
        self.tables.load_full()
    }

    /// Each network's traffic since it was added on this node.
    pub fn network_traffic(&self) -> BTreeMap<Vni, NetworkTraffic> {
        lock(&self.traffic)
            .iter()
            .map(|(&vni, counters)| (vni, NetworkTraffic::sum(counters)))
            .collect()
    }

    /// VXLAN taken from each peer of the networks in the tables now.
    pub fn peer_traffic(&self) -> BTreeMap<Ipv4Addr, PeerTraffic> {
        self.peers.load().snapshot()
    }

    /// Counters summed over all workers, and the current layout.
    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            layout: match &self.governor {
                None => "hashed",
                Some(g) if g.steered.load(Relaxed) => "steered",
                Some(_) => "spread",
            },
            ..Stats::default()
        };
        for w in &self.workers {
            let c = &w.counters;
            s.rx_frames += c.rx_frames.load(Relaxed);
            s.tx_vxlan += c.tx_vxlan.load(Relaxed);
            s.rx_vxlan += c.rx_vxlan.load(Relaxed);
            s.arp_answered += c.arp_answered.load(Relaxed);
            s.flooded += c.flooded.load(Relaxed);
            s.gso_frames += c.gso_frames.load(Relaxed);
            s.gro_frames += c.gro_frames.load(Relaxed);
            traffic::add_drops(&mut s.drops, &c.drops);
        }
        s
    }

    /// Stops and joins all workers; every TAP and socket is closed.
    pub fn shutdown(mut self) {
        stop(&mut self.workers, self.governor.take());
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        stop(&mut self.workers, self.governor.take());
    }
}

/// Stops the governor first (so it sends nothing more), then the workers.
fn stop(workers: &mut [WorkerHandle], governor: Option<Governed>) {
    if let Some(g) = governor {
        g.stop();
    }
    for w in workers.iter() {
        w.send(Control::Shutdown);
    }
    for w in workers.iter_mut() {
        if let Some(t) = w.thread.take()
            && t.join().is_err()
        {
            tracing::error!("a data-path worker had panicked");
        }
    }
}

/// A control-side lock; a panic while holding one left its map whole (every change is one call).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::tests::{Netns, require_root};
    use std::process::Command;

    #[test]
    fn data_plane_can_be_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<DataPlane>();
        send_sync::<Stats>();
    }

    #[test]
    fn zero_workers_is_a_config_error() {
        let err = DataPlane::start(Config {
            workers: 0,
            ..Config::default()
        })
        .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
    }

    #[test]
    fn tap_error_names_the_tap() {
        let dp = DataPlane::start(Config {
            local_vtep: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
            ..Config::default()
        })
        .unwrap();
        let err = dp
            .add_network(Vni::new(1).unwrap(), "bad/name")
            .unwrap_err();
        assert_eq!(
            err.to_string().split(':').next().unwrap(),
            "creating TAP bad/name"
        );
        dp.shutdown();
    }

    const MAC_A: Mac = Mac([0x02, 0x42, 0xc6, 0x13, 0, 1]);
    const MAC_B: Mac = Mac([0x02, 0x42, 0xc6, 0x13, 0, 2]);
    const GATEWAY_MAC: Mac = Mac([0x02, 0x4f, 0x56, 0, 0, 0xfe]);

    fn ping(ns: &Netns, to: &str) -> bool {
        Command::new("ip")
            .args([
                "netns", "exec", &ns.name, "ping", "-c", "3", "-i", "0.2", "-W", "2", to,
            ])
            .output()
            .expect("running ping")
            .status
            .success()
    }

    /// Needs root. Two data planes on one underlay namespace (127.0.0.1, different ports);
    /// each TAP is moved into its own "container" namespace; ping crosses the overlay, first
    /// with ARP answered from cluster state, then with no endpoints known (flood + learning).
    #[test]
    fn two_data_planes_through_vxlan_offloads_off() {
        two_data_planes(false);
    }

    #[test]
    fn two_data_planes_through_vxlan_offloads_on() {
        two_data_planes(true);
    }

    /// TCP through the overlay with iperf3 (exercises TSO, GSO, GRO and coalescing when
    /// offloads are on); returns bytes received.
    fn iperf(server: &Netns, client: &Netns, to: &str) -> u64 {
        let mut srv = Command::new("ip")
            .args([
                "netns",
                "exec",
                &server.name,
                "iperf3",
                "-s",
                "-1",
                "-p",
                "5201",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("iperf3 server");
        std::thread::sleep(Duration::from_millis(300));
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &client.name,
                "iperf3",
                "-c",
                to,
                "-p",
                "5201",
                "-t",
                "2",
                "-J",
            ])
            .output()
            .expect("iperf3 client");
        let _ = srv.kill();
        let _ = srv.wait();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "iperf3 failed: {text}");
        // "bytes": N in "sum_received"
        let at = text.find("\"sum_received\"").expect("sum_received");
        let rest = &text[at..];
        if let Some(bps) = rest.find("\"bits_per_second\":") {
            let v = rest[bps + 18..]
                .trim_start()
                .split([',', '\n'])
                .next()
                .unwrap_or("?");
            eprintln!("iperf3 {} -> {to}: {v} bit/s", client.name);
        }
        let b = rest.find("\"bytes\":").unwrap() + 8;
        rest[b..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// A container sends one `UDP_SEGMENT` batch (USO through the TAP when offloads are on);
    /// the other container must receive every datagram intact.
    /// Then a burst of small datagrams (batched into `UDP_SEGMENT` sends by the worker when
    /// offloads are on) must arrive complete and in order.
    fn udp_gso_across(from: &Netns, to: &Netns) {
        const SMALL: usize = 300;
        let payload: Vec<u8> = (0..20 * 1000 + 123).map(|i| (i % 251) as u8).collect();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::scope(|s| {
            let receiver = s.spawn(|| {
                to.enter();
                let sock = std::net::UdpSocket::bind("198.19.0.2:9999").unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                ready_tx.send(()).unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 2048];
                while got.len() < payload.len() {
                    let Ok(n) = sock.recv(&mut buf) else { break };
                    assert!(n == 1000 || n == 123, "datagram of {n} bytes");
                    got.extend_from_slice(&buf[..n]);
                }
                let mut small = Vec::new();
                while small.len() < SMALL {
                    let Ok(n) = sock.recv(&mut buf) else { break };
                    assert_eq!(n, 100, "small datagram of {n} bytes");
                    small.push(u16::from_be_bytes([buf[0], buf[1]]));
                }
                assert_eq!(
                    small,
                    (0..SMALL as u16).collect::<Vec<_>>(),
                    "small datagrams lost or reordered"
                );
                got
            });
            let payload = &payload;
            s.spawn(move || {
                from.enter();
                ready_rx.recv().unwrap();
                let sock = std::net::UdpSocket::bind("198.19.0.1:0").unwrap();
                let to = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 2), 9999);
                udp::send_gso(&sock, payload, to, 1000).expect("UDP_SEGMENT send in container");
                std::thread::sleep(Duration::from_millis(100));
                // Bursts of 25, paced so that the receiving test socket (rmem_max) keeps up.
                for i in 0..SMALL as u16 {
                    let mut d = [0u8; 100];
                    d[..2].copy_from_slice(&i.to_be_bytes());
                    sock.send_to(&d, to).unwrap();
                    if i % 25 == 24 {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            });
            assert_eq!(
                &receiver.join().unwrap(),
                payload,
                "UDP GSO batch not received intact"
            );
        });
    }

    fn two_data_planes(offloads: bool) {
        require_root();
        let tag = if offloads { "on" } else { "off" };
        let under = Netns::new(&format!("u{tag}"));
        let ca = Netns::new(&format!("a{tag}"));
        let cb = Netns::new(&format!("b{tag}"));
        under.ip("link set lo up");
        let vni = Vni::new(4242).unwrap();
        let (a, b) = std::thread::scope(|s| {
            s.spawn(|| {
                under.enter();
                let cfg = Config {
                    local_vtep: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
                    workers: 2,
                    offloads,
                    ..Config::default()
                };
                let a = DataPlane::start(cfg.clone()).expect("start a");
                let b = DataPlane::start(cfg).expect("start b");
                a.add_network(vni, "ovt-a").expect("tap a");
                b.add_network(vni, "ovt-b").expect("tap b");
                assert!(matches!(
                    a.add_network(vni, "ovt-a2"),
                    Err(Error::NetworkExists { .. })
                ));
                (a, b)
            })
            .join()
            .unwrap()
        });
        under.ip(&format!("link set ovt-a netns {}", ca.name));
        under.ip(&format!("link set ovt-b netns {}", cb.name));
        for (ns, dev, mac, ip) in [
            (&ca, "ovt-a", MAC_A, "198.19.0.1/24"),
            (&cb, "ovt-b", MAC_B, "198.19.0.2/24"),
        ] {
            ns.ip(&format!("link set {dev} address {mac} mtu 1400 up"));
            ns.ip(&format!("addr add {ip} dev {dev}"));
        }

        let table =
            |me: Mac, ip_me: [u8; 4], other: Mac, ip_other: [u8; 4], other_vtep: SocketAddrV4| {
                Tables {
                    networks: vec![NetworkTable {
                        vni,
                        gateway: Ipv4Addr::new(198, 19, 0, 254),
                        gateway_mac: GATEWAY_MAC,
                        endpoints: vec![
                            Endpoint {
                                mac: me,
                                ip: ip_me.into(),
                                location: Location::Local,
                            },
                            Endpoint {
                                mac: other,
                                ip: ip_other.into(),
                                location: Location::Remote(other_vtep),
                            },
                        ],
                        peers: vec![other_vtep],
                        external: vec![],
                        sealing: None,
                    }],
                }
            };
        a.publish(table(
            MAC_A,
            [198, 19, 0, 1],
            MAC_B,
            [198, 19, 0, 2],
            b.local_vtep(),
        ));
        b.publish(table(
            MAC_B,
            [198, 19, 0, 2],
            MAC_A,
            [198, 19, 0, 1],
            a.local_vtep(),
        ));
        assert!(
            ping(&ca, "198.19.0.2"),
            "ping with known endpoints failed: a={:?} b={:?}",
            a.stats(),
            b.stats()
        );
        let (sa, sb) = (a.stats(), b.stats());
        assert!(sa.arp_answered >= 1, "{sa:?}");
        assert!(sa.tx_vxlan >= 3 && sb.tx_vxlan >= 3, "{sa:?} {sb:?}");
        assert!(sa.rx_vxlan >= 3 && sb.rx_vxlan >= 3, "{sa:?} {sb:?}");

        let bytes = iperf(&cb, &ca, "198.19.0.2");
        assert!(bytes > 1_000_000, "iperf3 moved only {bytes} bytes");
        let bytes = iperf(&ca, &cb, "198.19.0.1");
        assert!(bytes > 1_000_000, "iperf3 moved only {bytes} bytes");
        udp_gso_across(&ca, &cb);
        let (sa, sb) = (a.stats(), b.stats());
        eprintln!("offloads {offloads}: a={sa:?}\nb={sb:?}");
        for s in [&sa, &sb] {
            for reason in [
                "offload",
                "tap-write",
                "udp-send",
                "short",
                "malformed-frame",
            ] {
                assert_eq!(s.drops.get(reason), None, "{reason} drops: {s:?}");
            }
        }
        if offloads {
            // Super-frames were segmented and coalesced, both ways.
            assert!(sa.tx_vxlan > sa.rx_frames, "{sa:?}");
            for s in [&sa, &sb] {
                assert!(s.gso_frames > 0 && s.gro_frames > 0, "{s:?}");
            }
        } else {
            for s in [&sa, &sb] {
                assert!(s.gso_frames == 0 && s.gro_frames == 0, "{s:?}");
            }
        }

        // Forget endpoints, each side external to the other: ARP is flooded, replies are
        // learned.
        let peers_only = |other: SocketAddrV4| Tables {
            networks: vec![NetworkTable {
                vni,
                gateway: Ipv4Addr::new(198, 19, 0, 254),
                gateway_mac: GATEWAY_MAC,
                endpoints: vec![],
                peers: vec![],
                external: vec![other],
                sealing: None,
            }],
        };
        a.publish(peers_only(b.local_vtep()));
        b.publish(peers_only(a.local_vtep()));
        for ns in [&ca, &cb] {
            let _ = Command::new("ip")
                .args(["-n", &ns.name, "neigh", "flush", "all"])
                .status();
        }
        assert!(
            ping(&cb, "198.19.0.1"),
            "ping by flooding failed: a={:?} b={:?}",
            a.stats(),
            b.stats()
        );
        assert!(b.stats().flooded >= 1);

        // A sender that is not a peer is refused and counted.
        b.publish(Tables {
            networks: vec![NetworkTable {
                vni,
                gateway: Ipv4Addr::new(198, 19, 0, 254),
                gateway_mac: GATEWAY_MAC,
                endpoints: vec![],
                peers: vec![SocketAddrV4::new(Ipv4Addr::new(198, 18, 9, 9), 4789)],
                external: vec![],
                sealing: None,
            }],
        });
        assert!(!ping(&ca, "198.19.0.2"));
        assert!(
            b.stats().drops.get("not-member").copied().unwrap_or(0) >= 1,
            "{:?}",
            b.stats()
        );

        a.remove_network(vni);
        let gone = Command::new("ip")
            .args(["-n", &ca.name, "link", "show", "ovt-a"])
            .output()
            .unwrap();
        assert!(
            !gone.status.success(),
            "TAP still present after remove_network"
        );
        a.shutdown();
        b.shutdown();
    }
}
