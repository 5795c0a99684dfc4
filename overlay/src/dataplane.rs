//! The data plane as the daemon sees it: start workers, add and remove networks, publish
//! tables, read statistics, shut down.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use mio::{Poll, Waker};

use crate::ethernet::Mac;
use crate::fdb::Index;
use crate::switch::DropReason;
use crate::tap;
use crate::udp::{self, SendPool};
use crate::vxlan::{self, Vni};
use crate::worker::{Control, Counters, WAKER, Worker};

/// How the data plane is started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Underlay address and UDP port to receive VXLAN on (port 4789 by default). Port 0
    /// picks a free port (see [`DataPlane::local_vtep`]).
    pub local_vtep: SocketAddrV4,
    /// Data-path threads, which is also the number of queues of every TAP (at least 1).
    pub workers: usize,
    /// Enable TAP offloads (TSO/USO/checksum) where the kernel accepts them. `false` forces
    /// them off. Not used by the plain path yet: TAPs are currently always opened without.
    pub offloads: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            local_vtep: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, vxlan::PORT),
            workers: 1,
            offloads: false,
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
    /// floods ARP for it.
    pub gateway: Ipv4Addr,
    /// Every container endpoint in the cluster on this network.
    pub endpoints: Vec<Endpoint>,
    /// Every other VTEP carrying this network: the flood list, and the only senders whose
    /// VXLAN is accepted for this VNI (checked by IP only).
    pub peers: Vec<SocketAddrV4>,
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
    /// Dropped frames and datagrams by reason ("short", "no-i-flag", "unknown-vni",
    /// "not-member", "malformed-frame", "hairpin", ...). Reasons never seen are absent.
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
    control: mpsc::Sender<Control>,
    waker: Arc<Waker>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    fn send(&self, msg: Control) -> bool {
        self.control.send(msg).is_ok() && self.waker.wake().is_ok()
    }
}

/// The running data plane: worker threads, their sockets, and the published tables.
pub struct DataPlane {
    workers: Vec<WorkerHandle>,
    tables: Arc<ArcSwap<Index>>,
    /// Control path only (add/remove network), never touched per packet.
    networks: Mutex<HashMap<Vni, String>>,
    local_vtep: SocketAddrV4,
    send_ports: Vec<u16>,
    config: Config,
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
        let send_ports = pool.ports();
        let pool = Arc::new(pool);

        // Open every socket and poller first, so a failure leaves nothing running.
        let mut addr = config.local_vtep;
        let mut prepared = Vec::with_capacity(config.workers);
        for index in 0..config.workers {
            let udp = udp::bind_receiver(addr).map_err(|source| Error::Bind { addr, source })?;
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

        let tables = Arc::new(ArcSwap::from_pointee(Index::default()));
        let mut workers: Vec<WorkerHandle> = Vec::with_capacity(config.workers);
        for (index, (udp, poll, waker)) in prepared.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let counters = Arc::new(Counters::default());
            let worker = Worker {
                poll,
                control: rx,
                udp,
                pool: pool.clone(),
                tables: tables.clone(),
                counters: counters.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("overlay-worker-{index}"))
                .spawn(move || worker.run());
            match spawned {
                Ok(thread) => workers.push(WorkerHandle {
                    control: tx,
                    waker,
                    counters,
                    thread: Some(thread),
                }),
                Err(source) => {
                    stop(&mut workers);
                    return Err(Error::Worker { index, source });
                }
            }
        }
        tracing::info!(vtep = %addr, workers = config.workers, send_sockets = send_ports.len(), "data plane started");
        Ok(DataPlane {
            workers,
            tables,
            networks: Mutex::new(HashMap::new()),
            local_vtep: addr,
            send_ports,
            config,
        })
    }

    /// The address VXLAN is received on (with the actual port if 0 was configured).
    pub fn local_vtep(&self) -> SocketAddrV4 {
        self.local_vtep
    }

    /// The outer source ports VXLAN is sent from.
    pub fn send_ports(&self) -> &[u16] {
        &self.send_ports
    }

    /// Creates TAP `tap_name` with one queue per worker and starts switching network `vni`
    /// through it. The caller then enslaves it to the bridge and sets it up.
    pub fn add_network(&self, vni: Vni, tap_name: &str) -> Result<(), Error> {
        let mut networks = self.networks.lock().unwrap_or_else(|e| e.into_inner());
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
        // Offloads stay off until the segmenting path handles them (see STATUS.md).
        queues[0].set_offload(0).map_err(tap_err)?;
        for (index, (worker, queue)) in self.workers.iter().zip(queues).enumerate() {
            if !worker.send(Control::AddQueue { vni, queue }) {
                // Undo: workers that got a queue close it again.
                self.remove_queues(vni);
                return Err(Error::WorkerGone { index });
            }
        }
        networks.insert(vni, tap_name.to_owned());
        tracing::info!(%vni, tap = tap_name, queues = self.workers.len(), "network added");
        Ok(())
    }

    /// Stops switching `vni`; every worker closes its queue, so the TAP disappears. Returns
    /// once all workers have done so. Unknown VNIs are ignored.
    pub fn remove_network(&self, vni: Vni) {
        let mut networks = self.networks.lock().unwrap_or_else(|e| e.into_inner());
        if networks.remove(&vni).is_some() {
            self.remove_queues(vni);
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
        self.tables.store(Arc::new(Index::build(&tables)));
    }

    /// Counters summed over all workers.
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        for w in &self.workers {
            let c = &w.counters;
            s.rx_frames += c.rx_frames.load(Relaxed);
            s.tx_vxlan += c.tx_vxlan.load(Relaxed);
            s.rx_vxlan += c.rx_vxlan.load(Relaxed);
            s.arp_answered += c.arp_answered.load(Relaxed);
            s.flooded += c.flooded.load(Relaxed);
            for reason in DropReason::ALL {
                let n = c.drops[reason.index()].load(Relaxed);
                if n > 0 {
                    *s.drops.entry(reason.as_str()).or_default() += n;
                }
            }
        }
        s
    }

    /// The configuration this data plane was started with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Stops and joins all workers; every TAP and socket is closed.
    pub fn shutdown(mut self) {
        stop(&mut self.workers);
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        stop(&mut self.workers);
    }
}

fn stop(workers: &mut [WorkerHandle]) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::tests::{Netns, require_root};
    use std::process::Command;

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
    fn two_data_planes_ping_through_vxlan() {
        require_root();
        let under = Netns::new("u");
        let ca = Netns::new("a");
        let cb = Netns::new("b");
        under.ip("link set lo up");
        let vni = Vni::new(4242).unwrap();
        let (a, b) = std::thread::scope(|s| {
            s.spawn(|| {
                under.enter();
                let cfg = Config {
                    local_vtep: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
                    workers: 2,
                    offloads: false,
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

        // Forget endpoints: ARP is flooded, replies are learned.
        let peers_only = |other: SocketAddrV4| Tables {
            networks: vec![NetworkTable {
                vni,
                gateway: Ipv4Addr::new(198, 19, 0, 254),
                endpoints: vec![],
                peers: vec![other],
            }],
        };
        a.publish(peers_only(b.local_vtep()));
        b.publish(peers_only(a.local_vtep()));
        let _ = Command::new("ip")
            .args(["-n", &ca.name, "neigh", "flush", "all"])
            .status();
        let _ = Command::new("ip")
            .args(["-n", &cb.name, "neigh", "flush", "all"])
            .status();
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
                endpoints: vec![],
                peers: vec![SocketAddrV4::new(Ipv4Addr::new(198, 18, 9, 9), 4789)],
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
