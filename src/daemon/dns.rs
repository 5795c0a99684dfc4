//! DNS for containers: one UDP server per network made on this node, on the network's gateway
//! address, port 53. The bridge holds that address, so containers reach the server directly and
//! it is not on the data plane's packet path.
//!
//! The answers are [`ingress::dns`]'s; this is its driver. The reconcile loop gives each server a
//! new [`Names`] snapshot when the view's services, tasks or containers on its network change.
//! Names that are not the cluster's go to the node's own resolver (the first `nameserver` of its
//! /etc/resolv.conf, read at start) and its answer is relayed; with no resolver, or none in
//! time, the client gets SERVFAIL. Nothing is logged per query: `status --json` counts them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ingress::dns::{DropReason, Names, Verdict, answer, servfail};
use tokio::net::UdpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::api::{self, TaskState};
use crate::cluster::View;
use crate::model::{Mode, Network};

/// The resolver this node uses itself.
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// How long the node's resolver may take to answer a forwarded query. Below a stub resolver's
/// own retry time (glibc waits 5 s), so the client gets our SERVFAIL rather than giving up first.
const FORWARD_WITHIN: Duration = Duration::from_secs(2);
/// Forwarded queries waiting for the node's resolver at once, all networks together; more are
/// dropped (the client retries). Each holds a reply buffer of [`RELAY_BUF`] bytes.
const FORWARDS_IN_FLIGHT: usize = 64;
/// Largest query read. A query is a header and one question (with an OPT record): far smaller.
/// A longer datagram is cut here and then fails to parse, and gets FORMERR.
const QUERY_BUF: usize = 4096;
/// Largest relayed answer: whatever the resolver sends in one datagram.
const RELAY_BUF: usize = 65_535;
/// Pause after a failed receive, so a persistent socket error cannot spin the server.
const RECV_RETRY: Duration = Duration::from_millis(100);

/// The DNS servers of this node, by network id.
pub(super) struct Dns {
    shared: Arc<Shared>,
    servers: Mutex<BTreeMap<String, Server>>,
}

/// What every server uses.
struct Shared {
    resolver: Option<SocketAddr>,
    forward_within: Duration,
    forwards: Arc<Semaphore>,
    /// Rotates multi-address answers from query to query.
    rotation: AtomicUsize,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    answered: AtomicU64,
    forwarded: AtomicU64,
    servfail: AtomicU64,
    short: AtomicU64,
    response: AtomicU64,
    unencodable: AtomicU64,
    busy: AtomicU64,
    unsent: AtomicU64,
}

/// One network's server.
struct Server {
    names: watch::Sender<Arc<Names>>,
    /// What `names` was built from, to rebuild only on a change.
    built_from: Entries,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Ends the receive loop and closes its socket; forwards in flight finish on their own.
        self.task.abort();
    }
}

impl Dns {
    /// Servers that forward to the node's resolver as /etc/resolv.conf names it now.
    pub(super) fn new() -> Dns {
        let resolver = std::fs::read_to_string(RESOLV_CONF)
            .ok()
            .and_then(|text| first_nameserver(&text));
        match resolver {
            Some(resolver) => info!(%resolver, "DNS forwards names outside the cluster"),
            None => {
                warn!(
                    "no nameserver in {RESOLV_CONF}: DNS answers SERVFAIL for names outside the cluster"
                )
            }
        }
        Dns::with(resolver, FORWARD_WITHIN)
    }

    fn with(resolver: Option<SocketAddr>, forward_within: Duration) -> Dns {
        Dns {
            shared: Arc::new(Shared {
                resolver,
                forward_within,
                forwards: Arc::new(Semaphore::new(FORWARDS_IN_FLIGHT)),
                rotation: AtomicUsize::new(0),
                counters: Counters::default(),
            }),
            servers: Mutex::default(),
        }
    }

    /// Starts the server of `net` on its gateway address unless it runs already. Its names
    /// come with the next [`Dns::refresh`]. A server that cannot bind is logged, and the
    /// network works without DNS.
    pub(super) fn start(&self, net: &Network) {
        let mut servers = self.servers();
        if servers.contains_key(&net.id) {
            return;
        }
        let addr = SocketAddr::from((net.gateway(), 53));
        let socket = match std::net::UdpSocket::bind(addr)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .and_then(UdpSocket::from_std)
        {
            Ok(socket) => socket,
            Err(err) => {
                warn!(network = %net.name, %addr, %err, "DNS server not started: containers on this network resolve no names");
                return;
            }
        };
        // A resolver on the gateway itself would be this server: it would ask itself forever.
        let resolver = self.shared.resolver.filter(|r| r.ip() != net.gateway());
        let (names, watched) = watch::channel(Arc::new(Names::default()));
        let task = tokio::spawn(serve(
            Arc::new(socket),
            watched,
            resolver,
            self.shared.clone(),
        ));
        debug!(network = %net.name, %addr, "DNS server started");
        servers.insert(
            net.id.clone(),
            Server {
                names,
                built_from: Entries::default(),
                task,
            },
        );
    }

    /// Stops the server of network `id`, if it runs.
    pub(super) fn stop(&self, id: &str) {
        self.servers().remove(id);
    }

    /// Gives each server the names of its network in `view`, where they changed.
    pub(super) fn refresh(&self, view: &View) {
        for (id, server) in self.servers().iter_mut() {
            let Some(net) = view.networks.values().find(|n| n.id == *id) else {
                continue;
            };
            let entries = Entries::of(view, net);
            if entries != server.built_from {
                server.names.send_replace(Arc::new(entries.build()));
                server.built_from = entries;
            }
        }
    }

    pub(super) fn stats(&self) -> api::Dns {
        let c = &self.shared.counters;
        let n = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        api::Dns {
            answered: n(&c.answered),
            forwarded: n(&c.forwarded),
            servfail: n(&c.servfail),
            dropped: [
                ("short", &c.short),
                ("response", &c.response),
                ("unencodable", &c.unencodable),
                ("busy", &c.busy),
                ("unsent", &c.unsent),
            ]
            .into_iter()
            .map(|(reason, counter)| (reason.to_string(), n(counter)))
            .collect(),
        }
    }

    fn servers(&self) -> MutexGuard<'_, BTreeMap<String, Server>> {
        // Held only for map updates, which cannot panic half-way: a poisoned map is whole.
        self.servers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The names of one network, in a form that compares: services, tasks and containers sorted.
#[derive(Debug, Default, PartialEq)]
struct Entries {
    /// (name, VIP, healthy tasks) of each service in vip mode.
    vip: Vec<(String, Ipv4Addr, Vec<Ipv4Addr>)>,
    /// (name, healthy tasks) of each service in dnsrr mode.
    dnsrr: Vec<(String, Vec<Ipv4Addr>)>,
    /// (netns name or alias, address) of each container.
    containers: Vec<(String, Ipv4Addr)>,
}

impl Entries {
    fn of(view: &View, net: &Network) -> Entries {
        let mut entries = Entries::default();
        for service in view.services.values().filter(|s| s.network_id == net.id) {
            let healthy: Vec<Ipv4Addr> = view
                .tasks
                .iter()
                .filter(|t| t.service == service.name && view.task_state(t) == TaskState::Healthy)
                .map(|t| t.ip)
                .collect();
            let name = service.name.clone();
            match (service.mode, service.vip) {
                (Mode::Vip, Some(vip)) => entries.vip.push((name, vip, healthy)),
                // A vip-mode service without a VIP is not one the registry makes.
                (Mode::Vip, None) => {}
                (Mode::Dnsrr, _) => entries.dnsrr.push((name, healthy)),
            }
        }
        for placed in view.endpoints_on(net) {
            let e = &placed.endpoint;
            for name in std::iter::once(&e.netns).chain(&e.aliases) {
                entries.containers.push((name.clone(), e.ip));
            }
        }
        entries.vip.sort();
        entries.dnsrr.sort();
        entries.containers.sort();
        entries
    }

    /// The snapshot. A name DNS cannot spell (a netns name with `..`, say) is left out: no
    /// query could ask for it.
    fn build(&self) -> Names {
        let mut b = Names::builder();
        for (name, vip, healthy) in &self.vip {
            let _ = b.service_vip(name, *vip, healthy);
        }
        for (name, healthy) in &self.dnsrr {
            let _ = b.service_dnsrr(name, healthy);
        }
        for (name, ip) in &self.containers {
            let _ = b.container(name, *ip);
        }
        b.build()
    }
}

/// The first `nameserver` of a resolv.conf that is an address (a scoped IPv6 one is not).
fn first_nameserver(resolv_conf: &str) -> Option<SocketAddr> {
    resolv_conf.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            return None;
        }
        let ip: IpAddr = words.next()?.parse().ok()?;
        Some(SocketAddr::from((ip, 53)))
    })
}

/// Answers the queries arriving on `socket` until the task is aborted.
async fn serve(
    socket: Arc<UdpSocket>,
    names: watch::Receiver<Arc<Names>>,
    resolver: Option<SocketAddr>,
    shared: Arc<Shared>,
) {
    let counters = &shared.counters;
    let mut buf = vec![0; QUERY_BUF];
    let mut out = Vec::new();
    loop {
        let (len, client) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(err) => {
                debug!(%err, "DNS receive failed");
                tokio::time::sleep(RECV_RETRY).await;
                continue;
            }
        };
        let query = buf.get(..len).unwrap_or_default();
        let rotation = shared.rotation.fetch_add(1, Ordering::Relaxed);
        let verdict = answer(query, &names.borrow(), rotation, &mut out);
        match verdict {
            Verdict::Reply => {
                counters.answered.fetch_add(1, Ordering::Relaxed);
                reply(&socket, &out, client, counters).await;
            }
            Verdict::Drop(reason) => {
                let counter = match reason {
                    DropReason::Short => &counters.short,
                    DropReason::Response => &counters.response,
                    DropReason::Unencodable => &counters.unencodable,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Forward => match resolver {
                None => {
                    counters.servfail.fetch_add(1, Ordering::Relaxed);
                    if servfail(query, &mut out) == Verdict::Reply {
                        reply(&socket, &out, client, counters).await;
                    }
                }
                Some(resolver) => match shared.forwards.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let forward = Forward {
                            socket: socket.clone(),
                            client,
                            query: query.to_vec(),
                            resolver,
                            shared: shared.clone(),
                        };
                        tokio::spawn(forward.run(permit));
                    }
                    Err(_) => {
                        counters.busy.fetch_add(1, Ordering::Relaxed);
                    }
                },
            },
        }
    }
}

async fn reply(socket: &UdpSocket, bytes: &[u8], client: SocketAddr, counters: &Counters) {
    if socket.send_to(bytes, client).await.is_err() {
        counters.unsent.fetch_add(1, Ordering::Relaxed);
    }
}

/// A query on its way to the node's resolver.
struct Forward {
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    query: Vec<u8>,
    resolver: SocketAddr,
    shared: Arc<Shared>,
}

impl Forward {
    async fn run(self, _permit: OwnedSemaphorePermit) {
        let counters = &self.shared.counters;
        let relayed = tokio::time::timeout(self.shared.forward_within, self.ask()).await;
        match relayed {
            Ok(Ok(answer)) => {
                counters.forwarded.fetch_add(1, Ordering::Relaxed);
                reply(&self.socket, &answer, self.client, counters).await;
            }
            _ => {
                counters.servfail.fetch_add(1, Ordering::Relaxed);
                let mut out = Vec::new();
                if servfail(&self.query, &mut out) == Verdict::Reply {
                    reply(&self.socket, &out, self.client, counters).await;
                }
            }
        }
    }

    /// The resolver's answer: the first datagram from it with the query's id. A socket of its
    /// own per query, so no answer can be taken for another client's.
    async fn ask(&self) -> std::io::Result<Vec<u8>> {
        let local: SocketAddr = match self.resolver {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local).await?;
        socket.connect(self.resolver).await?;
        socket.send(&self.query).await?;
        let mut buf = vec![0; RELAY_BUF];
        loop {
            let len = socket.recv(&mut buf).await?;
            let answer = buf.get(..len).unwrap_or_default();
            if answer.get(..2) == self.query.get(..2) {
                return Ok(answer.to_vec());
            }
        }
    }
}

#[cfg(test)]
mod tests;
