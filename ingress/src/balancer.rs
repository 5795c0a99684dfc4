//! The load balancer: what the data path calls for a frame to a VIP, for a connection to a
//! published port, and for a frame that may be the reply of a balanced flow. It ties the
//! [`service`] snapshot, [`conntrack`] and [`nat`] together.
//!
//! # Published ports: the client's address is kept
//! The node's stack hands a connection to a published port over ([`Origin::Host`]). It goes
//! to a task on any node with only its destination rewritten, so the task sees the client's
//! own address. The task answers that address through its gateway, and the node running it
//! hands the answer back ([`Via::Node`]): to the node the client reached, which un-NATs it and
//! sends it out of its own stack ([`Verdict::Wire`]), with the MACs the client's packet came
//! with. So the reply leaves through the node the client hit, from the address it connected
//! to. A client on the node itself (loopback) is given the node's address, since a task
//! cannot answer a loopback address.
//!
//! # Both directions of a flow, from any worker
//! A flow's first packet and its replies can be read by different data-path workers: the TAP
//! picks a queue by CPU or by the kernel's hash of the tuple it sees (the VIP), and the reply
//! arrives over VXLAN on whichever socket the sending node's hash picked (the task). No
//! steering can put both on one worker before NAT has run. So the connection table is shared
//! by all workers, in [`SHARDS`] shards, each one [`conntrack::Table`].
//!
//! A packet of a tracked flow that leaves it in its state (an established flow's data, a UDP
//! flow's next datagram: nearly all of them) takes no lock: it is looked up in the table's
//! index of atomic words and restarts the flow's timer with one atomic `fetch_max`
//! ([`conntrack::Table::find`], [`conntrack::Table::refresh`]). A flow's events take its
//! shard's lock: its first packet, a change of state (a SYN, a FIN, a RST, the first reply),
//! starting over, and the sweeps (expiry, a task's removal). So workers wait for each other
//! only on events of flows of one shard.
//!
//! A flow lives in the shard of its **client port**. Every packet of the flow carries that
//! port: as its source on the way in (client -> VIP:port), as its destination on the way back
//! (task -> client, or task -> VIP:client port in the hairpin case, where the source is
//! rewritten but the port kept). So a packet is looked up in the shard of its source port and
//! then of its destination port. A packet to a VIP is looked up in its source port's shard, a
//! packet from a task in its destination port's, and only a task calling its own VIP in both;
//! other traffic is not looked up at all.
//!
//! Nothing allocates per packet: a shard's table is allocated whole (at its full capacity) by
//! the first flow that lands in it, so a node that balances nothing holds no table at all, and
//! the snapshot is swapped whole.
//!
//! # After a restart
//! The table starts empty, and a restarted node's flows go on: a client's packet is balanced
//! again to the same task (Maglev, the same on every node), and a task's packet to a client
//! that comes first is matched to its flow by [`rederive`]. A published port's flow is picked
//! up by the client's next packet (at the entry node, whose MACs it carries, and at the task's
//! node, which learns the entry node from it); until then the entry node drops the task's
//! packets, and the client's TCP sends its own again. A TCP packet mid-stream that finds no
//! healthy task (the node does not know them yet) is dropped, not reset.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use packet::checksum::Mode;

use crate::conntrack::{self, Direction, Entry, Lookup, Nat, State, Via};
use crate::flow::Tuple;
use crate::rederive::{self, Unbalanced};
use crate::service::{Choice, Port, Service, Table};
use crate::{Protocol, nat, reject};

/// Shards of the connection table.
pub const SHARDS: usize = 64;

/// How long the flows of a task whose node is down are kept before they are reset. It takes
/// no new flows at once; a node that was restarted (`overlayd run`) is back well within this,
/// and its tasks' connections go on.
pub const DOWN_GRACE: Duration = Duration::from_secs(10);

/// A TCP flow with a packet this recent has a connection to keep ([`keeps`]).
const ACTIVE: Duration = Duration::from_secs(5);

/// Tuples the balancer remembers as no balanced flow's ([`Unbalanced`]): 512 KiB once used.
const UNBALANCED: usize = 64 * 1024;

/// What to do with a frame; the data path maps it to its own verdicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not a balanced flow (or one passing through to a task here): leave the frame alone.
    Pass,
    /// Rewritten in place: switch it by its new destination MAC.
    Rewritten,
    /// Send the frame of this length in the reply buffer back to the sender (a reset, or a
    /// port unreachable): the flow has no task to go to.
    Reply(usize),
    /// Drop it (counted in [`Stats`]).
    Drop,
    /// Rewritten in place, the reply of a published port's flow: it leaves through this
    /// node's own stack, to the client, by its (already set) MACs.
    Wire,
    /// The reply of a published port's flow that entered at the node at this underlay
    /// address: send it back there untouched.
    Return(Ipv4Addr),
}

/// Where a frame came from, as the data path knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The overlay: a container on this node, or one on another node over VXLAN.
    Overlay,
    /// This node's own stack, which steers connections to published ports to overlayd.
    Host,
    /// This node's own stack through the network's bridge, as the node reaches an endpoint.
    /// Only its connections from the node's address to a task (a `proxy=v2` port's) are the
    /// balancer's: they are tracked as they are, so that their replies come back here.
    Bridge,
    /// The node at this underlay address, which took a connection to a published port and
    /// chose a task on this node for it.
    Node(Ipv4Addr),
}

/// What every step needs to know of a packet besides its bytes.
struct Packet {
    tuple: Tuple,
    flags: u8,
    origin: Origin,
    now: Instant,
}

/// What [`Balancer::explain`] found for a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No service's business: the frame goes on as it is.
    Untouched,
    /// A flow the table tracks (its task already chosen), to this task address and port.
    Tracked { task: SocketAddrV4, state: State },
    /// A new flow to the VIP of `service`.
    Vip { service: String, choice: Choice },
    /// A new connection from the node's stack to a port `service` publishes, rewritten to
    /// `target` on the chosen task.
    Published {
        service: String,
        target: u16,
        choice: Choice,
    },
}

/// A published port's choice for a new connection ([`Balancer::publish_choice`]).
struct Published<'s> {
    service: &'s Service,
    port: Port,
    choice: Choice,
    /// `None` when no task takes it.
    nat: Option<Nat>,
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct Stats {
    /// Flows balanced to a task.
    pub flows: AtomicU64,
    /// Flows to a VIP with no healthy task, and packets of flows whose task went away,
    /// answered with a reset or a port unreachable.
    pub rejected: AtomicU64,
    /// Packets dropped: a flow the table refused (a reply tuple already in use), or a reply
    /// from a task that went away.
    pub dropped: AtomicU64,
}

pub struct Balancer {
    services: ArcSwap<Table>,
    /// Each shard's table, made by its first flow.
    shards: Box<[OnceLock<conntrack::Table>]>,
    /// Tasks' connections that are no balanced flow's.
    unbalanced: Unbalanced,
    per_shard: conntrack::Capacity,
    /// Tasks whose node is down, and when their flows are reset unless it is back
    /// ([`DOWN_GRACE`]). Control plane only.
    down: Mutex<HashMap<Ipv4Addr, Instant>>,
    timeouts: conntrack::Timeouts,
    /// The MAC of an overlay address (the cluster's convention), for the rewritten frames.
    mac_of: fn(Ipv4Addr) -> [u8; 6],
    /// This node's underlay address: the source of its own connections to published ports
    /// and where `mode=host` tasks must run.
    node: Ipv4Addr,
    /// Until when tasks' UDP datagrams are derived ([`rederive::UDP_AFTER_START`]), from the
    /// first snapshot.
    derive_udp_until: OnceLock<Instant>,
    pub stats: Stats,
    /// New flows this node sent to each task of the snapshot (its Maglev choices), found
    /// through a map swapped in with the snapshot: one relaxed add per new flow.
    chosen: ArcSwap<HashMap<Ipv4Addr, Arc<AtomicU64>>>,
}

impl Balancer {
    /// A balancer tracking up to `flows` flows (split over the shards), with no services, on the node
    /// at `node`.
    pub fn new(
        flows: u32,
        timeouts: conntrack::Timeouts,
        mac_of: fn(Ipv4Addr) -> [u8; 6],
        node: Ipv4Addr,
    ) -> Result<Balancer, conntrack::Error> {
        let per_shard = conntrack::Capacity::new(flows.div_ceil(SHARDS as u32).max(1))?;
        Ok(Balancer {
            services: ArcSwap::from_pointee(Table::default()),
            shards: (0..SHARDS).map(|_| OnceLock::new()).collect(),
            unbalanced: Unbalanced::new(UNBALANCED),
            per_shard,
            down: Mutex::new(HashMap::new()),
            timeouts,
            mac_of,
            node,
            derive_udp_until: OnceLock::new(),
            stats: Stats::default(),
            chosen: ArcSwap::default(),
        })
    }

    /// Swaps in a new snapshot. Flows to tasks that left it are marked, so their next packet
    /// is answered with a reset instead of vanishing; so are the flows of tasks that went
    /// down, once they have been down for [`DOWN_GRACE`] ([`Balancer::handle_timeout`]).
    pub fn publish(&self, next: Table, now: Instant) {
        self.derive_udp_until
            .get_or_init(|| now + rederive::UDP_AFTER_START);
        let gone = self.services.load().removed_backends(&next);
        let mut reset = Vec::new();
        {
            let mut down = lock(&self.down);
            down.retain(|&task, _| {
                let still_down = next.is_down(task);
                if !still_down && !next.is_backend(task) {
                    reset.push(task);
                }
                still_down
            });
            for task in gone {
                if next.is_down(task) {
                    down.entry(task).or_insert(now + DOWN_GRACE);
                } else {
                    reset.push(task);
                }
            }
        }
        let chosen = self.chosen.load();
        let tasks = next
            .services()
            .flat_map(|s| s.backends().iter().map(|b| b.addr));
        let chosen = tasks
            .map(|task| (task, chosen.get(&task).cloned().unwrap_or_default()))
            .collect();
        self.chosen.store(Arc::new(chosen));
        self.services.store(Arc::new(next));
        self.reset(now, &reset);
    }

    /// Marks the flows of `tasks` so that their next packet is answered with a reset.
    fn reset(&self, now: Instant, tasks: &[Ipv4Addr]) {
        for &task in tasks {
            for table in self.tables() {
                table.lock().remove_backend(now, task);
            }
        }
    }

    /// Expires flows whose time is up, and resets those of tasks down for [`DOWN_GRACE`].
    pub fn handle_timeout(&self, now: Instant) {
        let mut due = Vec::new();
        lock(&self.down).retain(|&task, &mut at| {
            if at <= now {
                due.push(task);
            }
            at > now
        });
        self.reset(now, &due);
        for table in self.tables() {
            table.lock().handle_timeout(now);
        }
    }

    /// The services and tasks the balancer uses now.
    pub fn services(&self) -> Arc<Table> {
        self.services.load_full()
    }

    /// Flows tracked now, and flows evicted since start to make room for new ones (a full
    /// table evicts unanswered flows first, and keeps forwarding).
    pub fn flows(&self) -> (usize, u64) {
        self.tables().fold((0, 0), |(tracked, evicted), table| {
            let table = table.lock();
            let stats = table.stats();
            (
                tracked + table.len(),
                evicted + stats.evicted_embryonic + stats.evicted_oldest,
            )
        })
    }

    /// New flows sent to each task of the snapshot by this node since it became one.
    pub fn chosen(&self) -> BTreeMap<Ipv4Addr, u64> {
        self.chosen
            .load()
            .iter()
            .map(|(&task, n)| (task, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Flows tracked now by task address, read as the lock-free readers read them: the
    /// flows' events are never held up by it.
    pub fn flows_by_task(&self) -> BTreeMap<Ipv4Addr, u64> {
        let mut by_task = BTreeMap::new();
        for table in self.tables() {
            for task in table.backends() {
                *by_task.entry(task).or_default() += 1;
            }
        }
        by_task
    }

    /// The shards' tables made so far.
    fn tables(&self) -> impl Iterator<Item = &conntrack::Table> {
        self.shards.iter().filter_map(OnceLock::get)
    }

    /// Looks at an Ethernet frame that came from `origin`: sent to a VIP, on its way to a
    /// local endpoint, to a published port, or back from a task; `mode` says whether its
    /// TCP/UDP checksum is complete or an offloaded frame's partial sum. A reset or port
    /// unreachable is built into `reply`.
    pub fn process(
        &self,
        frame: &mut [u8],
        mode: Mode,
        origin: Origin,
        now: Instant,
        reply: &mut [u8],
    ) -> Verdict {
        let services = self.services.load();
        // Most frames of a network without services: no parsing at all.
        if services.is_empty() {
            return match origin {
                Origin::Overlay | Origin::Host | Origin::Bridge => Verdict::Pass,
                Origin::Node(_) => self.count_drop(),
            };
        }
        let tuple = match nat::flow(frame) {
            Ok(tuple) => tuple,
            Err(nat::Unsupported::NotIpv4 | nat::Unsupported::Protocol(_)) => {
                return Verdict::Pass;
            }
            // From the node's stack, a TCP or UDP packet too broken to take (a truncated
            // header, a fragment) is what a mesh hook steered here from anyone who can reach a
            // published port. Passed on, the switch would flood it to every node and
            // container of the network as unknown unicast.
            Err(_) if origin == Origin::Host => return self.count_drop(),
            Err(_) => return Verdict::Pass,
        };
        let packet = Packet {
            tuple,
            flags: nat::tcp_flags(frame),
            origin,
            now,
        };
        if origin == Origin::Overlay {
            return self.on_overlay(&services, frame, mode, &packet, reply);
        }
        let (src, dst) = (*packet.tuple.src.ip(), *packet.tuple.dst.ip());
        if origin == Origin::Bridge && !(src == self.node && services.is_backend(dst)) {
            return Verdict::Pass;
        }
        // A flow from the host or from another node is its client's: in its source port's shard.
        let shard = self.shard(packet.tuple.src.port());
        match self.tracked([shard, None], &packet) {
            Tracked::Flow(direction, entry) => {
                return self.follow(frame, mode, direction, &entry, reply);
            }
            Tracked::Taken => return self.count_drop(),
            Tracked::New => {}
        }
        match self.mesh_nat(&services, frame, &packet, origin, reply) {
            Ok(nat) => self.admit(frame, mode, &packet, nat, reply),
            Err(verdict) => verdict,
        }
    }

    /// What [`Balancer::process`] would do with `frame` from `origin`, and why, tracking,
    /// forgetting and counting nothing: for `overlayd trace`. A tracked flow is shown as it is
    /// tracked; a new one takes the choice the data path makes (the same functions over the
    /// same snapshot) and is rewritten as the data path would rewrite it, so that the caller
    /// can switch it on. A frame with no task to go to gets the data path's answer in
    /// `reply`. The tuples of tasks' own connections are not consulted.
    pub fn explain(
        &self,
        frame: &mut [u8],
        origin: Origin,
        now: Instant,
        reply: &mut [u8],
    ) -> (Verdict, Decision) {
        let services = self.services.load();
        let Ok(tuple) = nat::flow(frame) else {
            return (Verdict::Pass, Decision::Untouched);
        };
        let packet = Packet {
            tuple,
            flags: nat::tcp_flags(frame),
            origin,
            now,
        };
        let shards = [self.shard(tuple.src.port()), self.shard(tuple.dst.port())];
        let tracked = shards.into_iter().flatten().find_map(|shard| {
            match self.shards[shard].get()?.find(&tuple) {
                Lookup::Found(f) if reuse(f.direction, &f.entry, &packet) == Reuse::Follow => {
                    Some(f)
                }
                _ => None,
            }
        });
        if let Some(found) = tracked {
            let entry = &found.entry;
            let decision = Decision::Tracked {
                task: entry.nat().backend,
                state: entry.state(),
            };
            let verdict = if entry.is_backend_gone() {
                Verdict::Drop
            } else {
                self.rewrite(
                    frame,
                    Mode::Full,
                    found.direction,
                    entry.original(),
                    entry.nat(),
                )
                .unwrap_or(Verdict::Drop)
            };
            return (verdict, decision);
        }
        let (decision, nat) = match origin {
            Origin::Overlay => match services.service_for(*tuple.dst.ip()) {
                Some(service) => {
                    let choice = service.choose(&tuple);
                    let nat = choice.task.map(|task| vip_nat(task.addr, &tuple));
                    let service = service.name().to_owned();
                    (Decision::Vip { service, choice }, nat)
                }
                None => return (Verdict::Pass, Decision::Untouched),
            },
            Origin::Host => match self.publish_choice(&services, frame, &tuple) {
                Some(p) => {
                    let decision = Decision::Published {
                        service: p.service.name().to_owned(),
                        target: p.port.target,
                        choice: p.choice,
                    };
                    (decision, p.nat)
                }
                None => return (Verdict::Pass, Decision::Untouched),
            },
            Origin::Bridge | Origin::Node(_) => return (Verdict::Pass, Decision::Untouched),
        };
        let verdict = match nat {
            Some(nat) => self
                .rewrite(frame, Mode::Full, Direction::Original, tuple, nat)
                .unwrap_or(Verdict::Drop),
            None if tuple.proto == Protocol::Tcp && !is_syn(&packet) => Verdict::Drop,
            None => refusal(frame, tuple.proto, reply).map_or(Verdict::Drop, Verdict::Reply),
        };
        (verdict, decision)
    }

    /// A frame on the overlay: to a VIP, or maybe the reply of a flow a task got.
    fn on_overlay(
        &self,
        services: &Table,
        frame: &mut [u8],
        mode: Mode,
        packet: &Packet,
        reply: &mut [u8],
    ) -> Verdict {
        let tuple = &packet.tuple;
        let to_vip = services.service_for(*tuple.dst.ip());
        let from_task = services.is_backend(*tuple.src.ip());
        if tuple.proto == Protocol::Udp
            && to_vip.is_none()
            && services.is_backend(*tuple.dst.ip())
            && self.derives_udp(packet.now)
        {
            // A datagram to a task's own address: its answers are no VIP flow's.
            self.unbalanced
                .insert(Tuple::new(tuple.proto, tuple.dst, tuple.src));
        }
        if to_vip.is_none() && !from_task {
            return Verdict::Pass;
        }
        // The client port is the source on the way in (to a VIP), the destination on the way
        // back (from a task); a task calling its own VIP is both, so both shards are asked.
        let shards = [
            to_vip.and_then(|_| self.shard(tuple.src.port())),
            from_task.then(|| self.shard(tuple.dst.port())).flatten(),
        ];
        match self.tracked(shards, packet) {
            Tracked::Flow(direction, entry) => {
                return self.follow(frame, mode, direction, &entry, reply);
            }
            Tracked::Taken => return self.count_drop(),
            Tracked::New => {}
        }
        let Some(service) = to_vip else {
            return self.untracked_reply(services, frame, mode, packet);
        };
        let task = service.choose(tuple).task;
        if is_rst(packet) {
            // A reset for no tracked flow has nothing to reset. It may be a client's stack
            // refusing a packet `untracked_reply` took for its flow's: that tuple is no
            // balanced flow's.
            if let Some(task) = task {
                let nat = vip_nat(task.addr, tuple);
                self.unbalanced.insert(Tuple::new(
                    tuple.proto,
                    nat.backend,
                    nat.source.unwrap_or(tuple.src),
                ));
            }
            return self.count_drop();
        }
        let Some(task) = task else {
            return self.no_task(frame, packet, reply);
        };
        self.admit(frame, mode, packet, vip_nat(task.addr, tuple), reply)
    }

    /// A task's packet on the overlay that no tracked flow expects. To a client on the
    /// overlay (by its MAC: not the routing mesh's replies, which go to the gateway or the
    /// mesh's MAC), it may be the reply of a VIP flow this node tracked before it restarted:
    /// then it is un-NATed as that flow's ([`rederive`]), and the client's next packet tracks
    /// the flow again; a UDP flow, only for a while after start, is tracked again at once (its
    /// client may only listen). A SYN or a SYN-ACK starts a connection of the task's own, or
    /// one to its own address, which is remembered so that its packets pass.
    fn untracked_reply(
        &self,
        services: &Table,
        frame: &mut [u8],
        mode: Mode,
        packet: &Packet,
    ) -> Verdict {
        let tuple = &packet.tuple;
        let udp = tuple.proto == Protocol::Udp;
        if (udp && !self.derives_udp(packet.now))
            || nat::macs(frame).1 != (self.mac_of)(*tuple.dst.ip())
        {
            return Verdict::Pass;
        }
        if packet.flags & conntrack::tcp_flags::SYN != 0 {
            self.unbalanced.insert(*tuple);
            return Verdict::Pass;
        }
        if self.unbalanced.contains(tuple) {
            return Verdict::Pass;
        }
        let Some((original, nat)) = rederive::answered(services, tuple) else {
            return Verdict::Pass;
        };
        if udp {
            // Tracked from its client port's shard, as if its client had just sent.
            if let Some(shard) = self.shard(original.src.port()) {
                let _ = self
                    .table(shard, packet.now)
                    .lock()
                    .insert(packet.now, original, nat, 0);
            }
        }
        self.rewrite(frame, mode, Direction::Reply, original, nat)
            .unwrap_or_else(|| self.count_drop())
    }

    /// The table of `shard`. The first flow of the shard allocates it whole; the first time
    /// it was given is the table's time 0.
    fn table(&self, shard: usize, now: Instant) -> &conntrack::Table {
        self.shards[shard].get_or_init(|| conntrack::Table::new(self.per_shard, self.timeouts, now))
    }

    /// Whether a task's untracked UDP datagram may be a lost flow's ([`rederive`]).
    fn derives_udp(&self, now: Instant) -> bool {
        self.derive_udp_until
            .get()
            .is_some_and(|&until| now < until)
    }

    /// The NAT of a new flow from the host or another node, or what to do instead:
    /// - from this node's stack, a connection to a published port: to a task on any node,
    ///   with the client's address kept (a client on this node itself gets the node's address
    ///   instead of a loopback one, which the task could not answer);
    /// - from this node's stack through the bridge, a connection from the node's address to a
    ///   task (the `proxy=v2` proxy's): to that task, unchanged;
    /// - from the node at `node`, a published port's connection it sent to a task here:
    ///   tracked as it is, so that the task's replies go back to that node.
    fn mesh_nat(
        &self,
        services: &Table,
        frame: &[u8],
        packet: &Packet,
        origin: Origin,
        reply: &mut [u8],
    ) -> Result<Nat, Verdict> {
        let tuple = &packet.tuple;
        if let Origin::Node(node) = origin {
            if !services.is_backend(*tuple.dst.ip()) {
                return Err(self.count_drop());
            }
            return Ok(Nat {
                backend: tuple.dst,
                source: None,
                via: Via::Node(node),
            });
        }
        if origin == Origin::Bridge {
            // The node's own connection to a task (see `process`): tracked as it is, so that
            // the task's node sends the replies back here, into this node's stack (all-zero
            // MACs).
            return Ok(Nat {
                backend: tuple.dst,
                source: None,
                via: Via::Host {
                    client_mac: [0; 6],
                    node_mac: [0; 6],
                },
            });
        }
        // Not a published port: not the balancer's business.
        let published = self
            .publish_choice(services, frame, tuple)
            .ok_or(Verdict::Pass)?;
        published
            .nat
            .ok_or_else(|| self.no_task(frame, packet, reply))
    }

    /// The choice for a new connection from the node's stack to a published port, and its
    /// NAT if a task took it; `None` if `tuple` is no published port's. Pure.
    fn publish_choice<'s>(
        &self,
        services: &'s Table,
        frame: &[u8],
        tuple: &Tuple,
    ) -> Option<Published<'s>> {
        let (service, port) = services.published(tuple.proto, tuple.dst)?;
        let choice = port.choose(service, tuple, self.node);
        let (client_mac, node_mac) = nat::macs(frame);
        let nat = choice.task.map(|task| Nat {
            backend: SocketAddrV4::new(task.addr, port.target),
            // Loopback has all-zero MACs.
            source: (client_mac == [0; 6] && node_mac == [0; 6])
                .then(|| SocketAddrV4::new(self.node, tuple.src.port())),
            via: Via::Host {
                client_mac,
                node_mac,
            },
        });
        Some(Published {
            service,
            port,
            choice,
            nat,
        })
    }

    /// The tracked flow of a packet, from the first of `shards` that knows it; [`Tracked::New`]
    /// if none does, or if the packet starts the flow over ([`Reuse::Afresh`]), which forgets
    /// it. A packet that leaves its flow in its state (most of them) takes no lock: only a flow
    /// event (a change of state, starting over) or a look-up the table's writer got in the way
    /// of does.
    fn tracked(&self, shards: [Option<usize>; 2], packet: &Packet) -> Tracked {
        let [first, second] = shards;
        let second = second.filter(|s| Some(*s) != first);
        for shard in [first, second].into_iter().flatten() {
            let Some(table) = self.shards[shard].get() else {
                continue;
            };
            match table.find(&packet.tuple) {
                Lookup::Absent => continue,
                Lookup::Found(found) => match reuse(found.direction, &found.entry, packet) {
                    Reuse::Follow => {
                        if let Some(entry) = table.refresh(&found, packet.now, packet.flags) {
                            return Tracked::Flow(found.direction, entry);
                        }
                    }
                    Reuse::Taken => return Tracked::Taken,
                    Reuse::Afresh => {}
                },
                Lookup::Busy => {}
            }
            let mut table = table.lock();
            let Some((direction, entry)) = table.get(&packet.tuple) else {
                continue;
            };
            return match reuse(direction, &entry, packet) {
                Reuse::Follow => match table.track(packet.now, &packet.tuple, packet.flags) {
                    Some((direction, entry)) => Tracked::Flow(direction, entry),
                    None => Tracked::New,
                },
                Reuse::Taken => Tracked::Taken,
                Reuse::Afresh => {
                    table.forget(&packet.tuple);
                    Tracked::New
                }
            };
        }
        Tracked::New
    }

    /// Tracks a new flow in its client port's shard and applies its NAT to its first packet.
    fn admit(
        &self,
        frame: &mut [u8],
        mode: Mode,
        packet: &Packet,
        nat: Nat,
        reply: &mut [u8],
    ) -> Verdict {
        let Some(shard) = self.shard(packet.tuple.src.port()) else {
            return self.count_drop();
        };
        let mut table = self.table(shard, packet.now).lock();
        let mut inserted = table.insert(packet.now, packet.tuple, nat, packet.flags);
        if inserted == Err(conntrack::Error::ReplyClash) {
            // The task would see this flow as an older one: the same client port through
            // another node, to the same task. The new one wins if the old one is not in use.
            let answer = Tuple::new(
                packet.tuple.proto,
                nat.backend,
                nat.source.unwrap_or(packet.tuple.src),
            );
            if table
                .get(&answer)
                .is_some_and(|(_, old)| superseded(&old, packet))
            {
                table.forget(&answer);
                inserted = table.insert(packet.now, packet.tuple, nat, packet.flags);
            }
        }
        match inserted {
            Ok(entry) => {
                self.stats.flows.fetch_add(1, Ordering::Relaxed);
                // Another node chose the task of a flow it sent here; the node's own
                // connections choose none.
                if matches!(packet.origin, Origin::Overlay | Origin::Host)
                    && let Some(n) = self.chosen.load().get(nat.backend.ip())
                {
                    n.fetch_add(1, Ordering::Relaxed);
                }
                self.follow(frame, mode, Direction::Original, &entry, reply)
            }
            // Another worker tracked this flow's first packet (a retransmitted SYN) between our
            // lookup and this insert: follow its entry.
            Err(conntrack::Error::Exists(_)) => {
                match table.track(packet.now, &packet.tuple, packet.flags) {
                    Some((direction, entry)) => self.follow(frame, mode, direction, &entry, reply),
                    None => self.count_drop(),
                }
            }
            Err(_) => self.count_drop(),
        }
    }

    /// Applies a tracked flow's NAT to one of its packets.
    fn follow(
        &self,
        frame: &mut [u8],
        mode: Mode,
        direction: Direction,
        entry: &Entry,
        reply: &mut [u8],
    ) -> Verdict {
        if entry.is_backend_gone() {
            return match (direction, entry.nat().via) {
                // The node the flow entered at resets it.
                (Direction::Original, Via::Node(_)) | (Direction::Reply, _) => self.count_drop(),
                (Direction::Original, _) => self.reject(frame, entry.original().proto, reply),
            };
        }
        self.rewrite(frame, mode, direction, entry.original(), entry.nat())
            .unwrap_or_else(|| self.count_drop())
    }

    /// Applies the NAT of the flow whose first packet was `original` to one of its packets;
    /// `None` if the frame cannot be rewritten (the data path drops and counts it).
    fn rewrite(
        &self,
        frame: &mut [u8],
        mode: Mode,
        direction: Direction,
        original: Tuple,
        nat: Nat,
    ) -> Option<Verdict> {
        let rewritten = match (direction, nat.via) {
            // Passing through to a task here: the entering node did the NAT.
            (Direction::Original, Via::Node(_)) => return Some(Verdict::Pass),
            (Direction::Reply, Via::Node(node)) => return Some(Verdict::Return(node)),
            // client -> VIP:port (or node:published) becomes (source) -> task:port.
            (Direction::Original, via) => {
                nat::rewrite_dst(frame, *nat.backend.ip(), nat.backend.port(), mode)
                    .and_then(|()| match nat.source {
                        Some(s) => nat::rewrite_src(frame, *s.ip(), s.port(), mode),
                        None => Ok(()),
                    })
                    .map(|()| {
                        // A task calling its own VIP sees the VIP's MAC; a published port's
                        // flow gets its source MAC from the data path.
                        let vip_mac = (nat.source.is_some() && via == Via::Overlay)
                            .then(|| (self.mac_of)(*original.dst.ip()));
                        nat::set_macs(frame, Some((self.mac_of)(*nat.backend.ip())), vip_mac);
                    })
            }
            // task:port -> client (or -> the rewritten source) becomes VIP:port -> client.
            (Direction::Reply, via) => {
                nat::rewrite_src(frame, *original.dst.ip(), original.dst.port(), mode)
                    .and_then(|()| match nat.source {
                        Some(_) => {
                            nat::rewrite_dst(frame, *original.src.ip(), original.src.port(), mode)
                        }
                        None => Ok(()),
                    })
                    .map(|()| match via {
                        Via::Host {
                            client_mac,
                            node_mac,
                        } => nat::set_macs(frame, Some(client_mac), Some(node_mac)),
                        _ => {
                            let client_mac = nat.source.map(|_| (self.mac_of)(*original.src.ip()));
                            nat::set_macs(
                                frame,
                                client_mac,
                                Some((self.mac_of)(*original.dst.ip())),
                            );
                        }
                    })
            }
        };
        match (rewritten, nat.via) {
            (Ok(()), Via::Host { .. }) if direction == Direction::Reply => Some(Verdict::Wire),
            (Ok(()), _) => Some(Verdict::Rewritten),
            (Err(_), _) => None,
        }
    }

    /// A flow that is not tracked and has no task to go to. A new one (a SYN, or UDP) is
    /// refused. A TCP packet mid-stream is dropped instead: a node that has just restarted may
    /// not know the healthy tasks yet, and the client's TCP sends it again.
    fn no_task(&self, frame: &[u8], packet: &Packet, reply: &mut [u8]) -> Verdict {
        if packet.tuple.proto == Protocol::Tcp && !is_syn(packet) {
            return self.count_drop();
        }
        self.reject(frame, packet.tuple.proto, reply)
    }

    fn reject(&self, frame: &[u8], proto: Protocol, reply: &mut [u8]) -> Verdict {
        match refusal(frame, proto, reply) {
            Some(len) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                Verdict::Reply(len)
            }
            None => self.count_drop(),
        }
    }

    fn count_drop(&self) -> Verdict {
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        Verdict::Drop
    }

    /// The shard of flows whose client port is `port` (no flow has port 0).
    fn shard(&self, port: u16) -> Option<usize> {
        (port != 0).then(|| usize::from(port) % self.shards.len())
    }
}

/// The answer to a flow that has nowhere to go, built in `reply`: a TCP reset or an ICMP port
/// unreachable; its length, `None` if `frame` cannot be answered.
fn refusal(frame: &[u8], proto: Protocol, reply: &mut [u8]) -> Option<usize> {
    match proto {
        Protocol::Tcp => reject::tcp_reset(frame, reply),
        Protocol::Udp => reject::port_unreachable(frame, reply),
    }
}

/// What a packet's look-up found.
enum Tracked {
    /// The flow it belongs to, as the packet left it.
    Flow(Direction, Entry),
    /// No flow: a new one, or one it starts over.
    New,
    /// Another node's connection holds its tuple ([`Reuse::Taken`]): it is dropped.
    Taken,
}

/// What a packet on the tuple of a tracked flow does with it.
#[derive(Debug, PartialEq, Eq)]
enum Reuse {
    /// Follows it: most packets.
    Follow,
    /// Forgets it and is balanced as a new flow's first packet.
    Afresh,
    /// Leaves it alone and is dropped.
    Taken,
}

/// What `packet` does with the tracked flow `entry` of its tuple.
///
/// A client's SYN on the tuple of a flow that has no connection to keep starts over:
/// - of any flow whose task went away: the client reuses the port of a connection that ended
///   (a busy client does within seconds), and the new connection has a live task to go to;
///   resetting it would fail a request that never went near the removed task;
/// - of a flow that never got an answer (its task may have died since: a client reusing the
///   port of a connection that timed out would keep knocking on the dead task), or that ended.
///   Such a SYN is balanced afresh, with the task, node and MACs of the new connection: the
///   old task may be draining or down since (a VIP's flow too: a busy client reused the port
///   of a connection to a leaving node's task, and timed out on it).
///
/// A retransmitted SYN of a live flow is balanced to the same task again (Maglev over the same
/// tuple and tasks).
///
/// On a task's node, a packet that another node sent on the tuple of a flow that came through
/// a different node: the client uses one port towards two nodes, which both chose this task,
/// so the task would see one tuple for two connections, and its TCP can hold only one. The
/// one in use wins ([`keeps`]): the new one's packets are dropped ([`Reuse::Taken`]), and its
/// SYN, sent again a second later, gets through once the old one has ended. Replacing it
/// instead sent the live connection's answers to the other node (the soak's 10 s timeouts
/// and resets through published ports). A SYN on a flow with no connection to keep starts
/// over with the answers going back to the new node ([`superseded`]); a UDP datagram always
/// does (UDP has no connection to keep, and a client's new socket reuses ports most often).
/// Any other TCP segment from a node that is not the flow's is a late one of a connection the
/// task no longer has on this tuple, and is dropped: taking the tuple over for it made a flow
/// "in use" of a client's unacknowledged FIN, sent again and again (its last ACK had gone to
/// the new connection's node), and that flow turned away every new SYN on the tuple for 10 s
/// (the soak's remaining timeouts).
///
/// A UDP flow whose task went away is balanced afresh at its client's next datagram (UDP has
/// no connection for the client to reset). A SYN on the tuple of any flow whose task went away,
/// a VIP's included, is balanced afresh too: a client reusing the port of a finished connection
/// to a task of a node that left would otherwise be reset.
fn reuse(direction: Direction, entry: &Entry, packet: &Packet) -> Reuse {
    if direction != Direction::Original {
        return Reuse::Follow;
    }
    if entry.is_backend_gone() && packet.tuple.proto == Protocol::Udp {
        return Reuse::Afresh;
    }
    if let (Via::Node(was), Origin::Node(now)) = (entry.nat().via, packet.origin)
        && was != now
    {
        return if superseded(entry, packet) {
            Reuse::Afresh
        } else {
            Reuse::Taken
        };
    }
    let ended = matches!(
        entry.state(),
        State::BackendGone | State::TcpSynSent | State::TcpTimeWait | State::TcpClose
    );
    if is_syn(packet) && ended {
        Reuse::Afresh
    } else {
        Reuse::Follow
    }
}

/// Whether `entry` is a TCP connection still in use at `now`: opening, open or closing, with a
/// packet within [`ACTIVE`]. One whose client went silent (its entry node died, say) is not.
fn keeps(entry: &Entry, now: Instant) -> bool {
    matches!(
        entry.state(),
        State::TcpSynSent | State::TcpEstablished | State::TcpFinWait
    ) && now.saturating_duration_since(entry.last_seen()) < ACTIVE
}

/// Whether `packet` replaces `old`, a flow with the same answer tuple that came through another
/// node (the same client port through two nodes, to the same task): a UDP datagram always (UDP
/// has no connection to keep), a TCP SYN an entry with no connection to keep ([`keeps`]);
/// else the one in use wins, and a SYN is sent again.
fn superseded(old: &Entry, packet: &Packet) -> bool {
    match packet.tuple.proto {
        Protocol::Udp => true,
        Protocol::Tcp => is_syn(packet) && !keeps(old, packet.now),
    }
}

/// Whether `packet` opens a TCP connection (SYN without ACK).
fn is_syn(packet: &Packet) -> bool {
    use conntrack::tcp_flags::{ACK, SYN};
    packet.tuple.proto == Protocol::Tcp && packet.flags & (SYN | ACK) == SYN
}

/// Whether `packet` resets a TCP connection.
fn is_rst(packet: &Packet) -> bool {
    packet.tuple.proto == Protocol::Tcp && packet.flags & conntrack::tcp_flags::RST != 0
}

/// The NAT of a flow to a VIP (`flow`, client -> VIP:port) sent to `task`: the VIP becomes the
/// task, the port is kept.
pub(crate) fn vip_nat(task: Ipv4Addr, flow: &Tuple) -> Nat {
    let client = flow.src;
    Nat {
        backend: SocketAddrV4::new(task, flow.dst.port()),
        // A task reaching its own service: give it a source that is not its own.
        source: (task == *client.ip()).then(|| SocketAddrV4::new(*flow.dst.ip(), client.port())),
        via: Via::Overlay,
    }
}

/// The control plane's state. A thread that panicked while holding it left it consistent
/// (every change is made in one call that does not unwind halfway), so it is used as it is.
fn lock<T>(state: &Mutex<T>) -> MutexGuard<'_, T> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{Backend, Health, Port, Spec};
    use crate::{Vip, maglev};
    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

    fn mac_of(ip: Ipv4Addr) -> [u8; 6] {
        let o = ip.octets();
        [2, 0x42, o[0], o[1], o[2], o[3]]
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, 0, last)
    }

    const VIP: u8 = 100;

    /// A balancer with one service at .100 over tasks at `tasks` (healthy).
    fn balancer(tasks: &[u8]) -> Balancer {
        let b = Balancer::new(1024, conntrack::Timeouts::default(), mac_of, NODE).unwrap();
        b.publish(table(tasks), Instant::now());
        b
    }

    fn table(tasks: &[u8]) -> Table {
        published(tasks, Port { ..PUBLISHED })
    }

    /// The service at .100 over `tasks` (task .N runs on node 198.18.0.N % 2 + 1, so
    /// [`NODE`] runs the odd ones), publishing `port`.
    fn published(tasks: &[u8], port: Port) -> Table {
        let backends = tasks
            .iter()
            .map(|&t| Backend {
                addr: ip(t),
                node: Ipv4Addr::new(198, 18, 0, t % 2 + 1),
                health: Health::Healthy,
            })
            .collect();
        let spec = Spec {
            name: "web".into(),
            vip: Vip(ip(VIP).into()),
            backends,
            ports: vec![port],
        };
        Table::build(maglev::Size::new(251).unwrap(), [spec]).unwrap()
    }

    const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 40000);
    const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];
    const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    /// 9200/tcp on every address of the node, to port 80, per flow, on any node.
    const PUBLISHED: Port = Port {
        protocol: Protocol::Tcp,
        published: 9200,
        target: 80,
        addr: None,
        client_affinity: false,
        local_only: false,
    };

    fn at(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(addr, port)
    }

    fn run_from(b: &Balancer, origin: Origin, f: &mut [u8]) -> Verdict {
        b.process(f, Mode::Full, origin, Instant::now(), &mut [0u8; 128])
    }

    #[test]
    fn a_published_port_reaches_a_task_with_the_client_address_and_answers_from_the_node() {
        let b = balancer(&[7, 8, 9]);
        let mut syn = frame((CLIENT_MAC, NODE_MAC), CLIENT, at(NODE, 9200), Some(true));
        assert_eq!(run_from(&b, Origin::Host, &mut syn), Verdict::Rewritten);
        let (_, dst_mac, src, task) = seen(&syn);
        assert_eq!(src, CLIENT, "the task sees the client's own address");
        assert_eq!((task.port(), dst_mac), (80, mac_of(*task.ip())));

        let mut answer = frame((mac_of(*task.ip()), [0; 6]), task, CLIENT, Some(false));
        assert_eq!(run_from(&b, Origin::Overlay, &mut answer), Verdict::Wire);
        let (src_mac, dst_mac, src, dst) = seen(&answer);
        assert_eq!((src, dst), (at(NODE, 9200), CLIENT));
        assert_eq!((src_mac, dst_mac), (NODE_MAC, CLIENT_MAC));
    }

    #[test]
    fn a_client_on_the_node_itself_is_given_the_nodes_address() {
        let b = balancer(&[7]);
        let local = at(Ipv4Addr::LOCALHOST, 41000);
        let mut syn = frame(
            ([0; 6], [0; 6]),
            local,
            at(Ipv4Addr::LOCALHOST, 9200),
            Some(true),
        );
        assert_eq!(run_from(&b, Origin::Host, &mut syn), Verdict::Rewritten);
        let (_, _, src, task) = seen(&syn);
        assert_eq!((src, task), (at(NODE, 41000), at(ip(7), 80)));

        let mut answer = frame((mac_of(ip(7)), [0; 6]), task, src, Some(false));
        assert_eq!(run_from(&b, Origin::Overlay, &mut answer), Verdict::Wire);
        let (src_mac, dst_mac, src, dst) = seen(&answer);
        assert_eq!((src, dst), (at(Ipv4Addr::LOCALHOST, 9200), local));
        assert_eq!((src_mac, dst_mac), ([0; 6], [0; 6]), "back over loopback");
    }

    #[test]
    fn a_flow_another_node_sent_here_passes_and_its_answers_go_back_to_that_node() {
        let b = balancer(&[7]);
        let entry = Ipv4Addr::new(198, 18, 0, 3);
        let mut syn = frame(
            (CLIENT_MAC, mac_of(ip(7))),
            CLIENT,
            at(ip(7), 80),
            Some(true),
        );
        let before = syn.clone();
        assert_eq!(run_from(&b, Origin::Node(entry), &mut syn), Verdict::Pass);
        assert_eq!(syn, before);
        let mut answer = frame((mac_of(ip(7)), [0; 6]), at(ip(7), 80), CLIENT, Some(false));
        let before = answer.clone();
        assert_eq!(
            run_from(&b, Origin::Overlay, &mut answer),
            Verdict::Return(entry)
        );
        assert_eq!(answer, before);
        assert_eq!(b.flows(), (1, 0));
    }

    #[test]
    fn the_proxy_of_a_port_picks_the_task_the_data_path_picks() {
        let ports = [
            PUBLISHED,
            Port {
                client_affinity: true,
                ..PUBLISHED
            },
            Port {
                local_only: true,
                ..PUBLISHED
            },
        ];
        for port in ports {
            let b = Balancer::new(1024, conntrack::Timeouts::default(), mac_of, NODE).unwrap();
            b.publish(published(&[6, 7, 8, 9], port), Instant::now());
            let clients: Vec<SocketAddrV4> = (1..=40)
                .map(|c| at(Ipv4Addr::new(198, 18, 1, c), 30000 + u16::from(c)))
                .collect();
            let table = b.services();
            let picked: Vec<Ipv4Addr> = clients
                .iter()
                .map(|&c| {
                    let picked = table.pick_published(Protocol::Tcp, at(NODE, 9200), c, NODE);
                    let (task, target) = picked.unwrap();
                    assert_eq!(target, 80);
                    task.addr
                })
                .collect();
            assert_eq!(picked, landings(&b, clients.into_iter()), "{port:?}");
        }
    }

    #[test]
    fn the_nodes_own_connection_to_a_task_is_tracked_and_answered_into_its_stack() {
        let b = balancer(&[7]);
        let proxy = at(NODE, 45000);
        let mut syn = frame((NODE_MAC, mac_of(ip(7))), proxy, at(ip(7), 80), Some(true));
        assert_eq!(run_from(&b, Origin::Bridge, &mut syn), Verdict::Rewritten);
        let (_, dst_mac, src, dst) = seen(&syn);
        assert_eq!((src, dst, dst_mac), (proxy, at(ip(7), 80), mac_of(ip(7))));
        let mut answer = frame((mac_of(ip(7)), NODE_MAC), at(ip(7), 80), proxy, Some(false));
        assert_eq!(run_from(&b, Origin::Overlay, &mut answer), Verdict::Wire);
        let (src_mac, dst_mac, src, dst) = seen(&answer);
        assert_eq!((src, dst), (at(ip(7), 80), proxy));
        assert_eq!(
            (src_mac, dst_mac),
            ([0; 6], [0; 6]),
            "into the node's stack"
        );

        let gateway = at(Ipv4Addr::new(198, 19, 0, 1), 45001);
        let mut other = frame(
            (NODE_MAC, mac_of(ip(7))),
            gateway,
            at(ip(7), 80),
            Some(true),
        );
        assert_eq!(run_from(&b, Origin::Bridge, &mut other), Verdict::Pass);
        let mut stranger = frame((NODE_MAC, mac_of(ip(5))), proxy, at(ip(5), 80), Some(true));
        assert_eq!(run_from(&b, Origin::Bridge, &mut stranger), Verdict::Pass);
        // An egress reply the node forwards to a container, to a port that is published.
        let outside = at(Ipv4Addr::new(198, 18, 5, 5), 443);
        let mut forwarded = frame(
            (NODE_MAC, mac_of(ip(7))),
            outside,
            at(ip(7), 9200),
            Some(false),
        );
        assert_eq!(run_from(&b, Origin::Bridge, &mut forwarded), Verdict::Pass);
        let mut fragment = syn.clone();
        fragment[14 + 7] = 1;
        assert_eq!(run_from(&b, Origin::Bridge, &mut fragment), Verdict::Pass);
        assert_eq!(b.flows(), (1, 0));
    }

    #[test]
    fn a_client_port_reused_through_another_node_after_its_connection_ended_answers_there() {
        let b = balancer(&[7]);
        let (first, second) = (Ipv4Addr::new(198, 18, 0, 3), Ipv4Addr::new(198, 18, 0, 4));
        let task = at(ip(7), 80);
        let syn = frame((CLIENT_MAC, mac_of(ip(7))), CLIENT, task, Some(true));
        let answer = frame((mac_of(ip(7)), [0; 6]), task, CLIENT, Some(false));
        assert_eq!(
            run_from(&b, Origin::Node(first), &mut syn.clone()),
            Verdict::Pass
        );
        assert_eq!(
            run_from(&b, Origin::Overlay, &mut answer.clone()),
            Verdict::Return(first)
        );
        // The client resets the connection (RST|ACK), then reuses its port through `second`.
        let mut rst = frame((CLIENT_MAC, mac_of(ip(7))), CLIENT, task, Some(false));
        rst[14 + 20 + 13] = 0x14;
        assert_eq!(run_from(&b, Origin::Node(first), &mut rst), Verdict::Pass);
        assert_eq!(
            run_from(&b, Origin::Node(second), &mut syn.clone()),
            Verdict::Pass
        );
        assert_eq!(
            run_from(&b, Origin::Overlay, &mut answer.clone()),
            Verdict::Return(second)
        );
        assert_eq!(b.flows(), (1, 0), "the old flow's entry was replaced");
    }

    /// The soak's failures: a client used one port towards two nodes at once, both chose
    /// this task, and the second connection's SYN took the first one's entry, whose answers
    /// then went to the second node.
    #[test]
    fn a_client_port_in_use_through_one_node_is_not_taken_by_another_until_it_is_idle() {
        let b = balancer(&[7]);
        let (first, second) = (Ipv4Addr::new(198, 18, 0, 3), Ipv4Addr::new(198, 18, 0, 4));
        let task = at(ip(7), 80);
        let syn = frame((CLIENT_MAC, mac_of(ip(7))), CLIENT, task, Some(true));
        let data = frame((CLIENT_MAC, mac_of(ip(7))), CLIENT, task, Some(false));
        let answer = frame((mac_of(ip(7)), [0; 6]), task, CLIENT, Some(false));
        let at_time = |origin, f: &[u8], now| {
            b.process(&mut f.to_vec(), Mode::Full, origin, now, &mut [0u8; 128])
        };
        let start = Instant::now();
        assert_eq!(at_time(Origin::Node(first), &syn, start), Verdict::Pass);
        assert_eq!(
            at_time(Origin::Overlay, &answer, start),
            Verdict::Return(first)
        );
        assert_eq!(at_time(Origin::Node(first), &data, start), Verdict::Pass);
        // The same tuple through the other node, while the first connection is in use.
        let soon = start + ACTIVE / 2;
        assert_eq!(at_time(Origin::Node(second), &syn, soon), Verdict::Drop);
        assert_eq!(at_time(Origin::Node(second), &data, soon), Verdict::Drop);
        assert_eq!(
            at_time(Origin::Overlay, &answer, soon),
            Verdict::Return(first)
        );
        // The first connection went silent (its node died, say): the SYN sent again wins.
        let idle = soon + ACTIVE;
        assert_eq!(at_time(Origin::Node(second), &syn, idle), Verdict::Pass);
        assert_eq!(
            at_time(Origin::Overlay, &answer, idle),
            Verdict::Return(second)
        );
        assert_eq!(b.stats.dropped.load(Ordering::Relaxed), 2);
    }

    /// The soak's last timeouts: a connection through `first` ended, and the same client port's
    /// SYN through `second` took the tuple before the task's last ACK had gone back; the
    /// client, never acknowledged, sent its FIN through `first` again and again. Those late
    /// FINs took the tuple back, and every new SYN on it was turned away while they came.
    #[test]
    fn a_late_fin_through_another_node_does_not_take_the_tuple_from_new_connections() {
        let b = balancer(&[7]);
        let [first, second, third] = [3, 4, 5].map(|n| Ipv4Addr::new(198, 18, 0, n));
        let task = at(ip(7), 80);
        let syn = frame((CLIENT_MAC, mac_of(ip(7))), CLIENT, task, Some(true));
        let answer = frame((mac_of(ip(7)), [0; 6]), task, CLIENT, Some(false));
        let with_fin = |mut f: Vec<u8>| {
            f[14 + 20 + 13] = 0x11; // FIN|ACK
            f
        };
        let fin = with_fin(frame(
            (CLIENT_MAC, mac_of(ip(7))),
            CLIENT,
            task,
            Some(false),
        ));
        let task_fin = with_fin(answer.clone());
        let go = |origin, f: &[u8]| run_from(&b, origin, &mut f.to_vec());
        assert_eq!(go(Origin::Node(first), &syn), Verdict::Pass);
        assert_eq!(go(Origin::Overlay, &task_fin), Verdict::Return(first));
        assert_eq!(go(Origin::Node(first), &fin), Verdict::Pass);
        assert_eq!(go(Origin::Node(second), &syn), Verdict::Pass);
        assert_eq!(go(Origin::Node(first), &fin), Verdict::Drop, "a late FIN");
        assert_eq!(go(Origin::Overlay, &answer), Verdict::Return(second));
        // The second connection ends; a SYN through a third node gets the tuple at once.
        assert_eq!(go(Origin::Overlay, &task_fin), Verdict::Return(second));
        assert_eq!(go(Origin::Node(second), &fin), Verdict::Pass);
        assert_eq!(go(Origin::Node(first), &fin), Verdict::Drop, "a late FIN");
        assert_eq!(go(Origin::Node(third), &syn), Verdict::Pass);
        assert_eq!(go(Origin::Overlay, &answer), Verdict::Return(third));
    }

    #[test]
    fn a_syn_on_a_flow_whose_task_went_away_goes_to_a_live_task() {
        let b = balancer(&[7, 8]);
        let syn = frame((CLIENT_MAC, NODE_MAC), CLIENT, at(NODE, 9200), Some(true));
        let mut first = syn.clone();
        assert_eq!(run_from(&b, Origin::Host, &mut first), Verdict::Rewritten);
        let other = if *seen(&first).3.ip() == ip(7) { 8 } else { 7 };
        b.publish(table(&[other]), Instant::now());
        // The client gave up and reuses its port: not reset, not sent to the gone task.
        let mut again = syn;
        assert_eq!(run_from(&b, Origin::Host, &mut again), Verdict::Rewritten);
        assert_eq!(seen(&again).3, at(ip(other), 80));
    }

    #[test]
    fn a_broken_packet_from_the_host_is_dropped_and_anything_not_tcp_or_udp_passes() {
        let b = balancer(&[7]);
        let syn = frame((CLIENT_MAC, NODE_MAC), CLIENT, at(NODE, 9200), Some(true));
        // Cut inside the TCP header, and a later fragment (offset 8 bytes).
        let mut cut = syn[..14 + 20 + 8].to_vec();
        let mut fragment = syn.clone();
        fragment[14 + 7] = 1;
        for broken in [&mut cut, &mut fragment] {
            assert_eq!(run_from(&b, Origin::Host, broken), Verdict::Drop);
        }
        assert_eq!(b.stats.dropped.load(Ordering::Relaxed), 2);
        let mut icmp = syn.clone();
        icmp[14 + 9] = 1;
        assert_eq!(run_from(&b, Origin::Host, &mut icmp), Verdict::Pass);
        let mut arp = syn;
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(run_from(&b, Origin::Host, &mut arp), Verdict::Pass);
    }

    #[test]
    fn a_udp_client_port_reused_through_another_node_answers_through_that_node() {
        let b = balancer(&[7]);
        let (one, two) = (Ipv4Addr::new(198, 18, 0, 3), Ipv4Addr::new(198, 18, 0, 4));
        let to_task = || frame((CLIENT_MAC, mac_of(ip(7))), CLIENT, at(ip(7), 80), None);
        let answer = || frame((mac_of(ip(7)), [0; 6]), at(ip(7), 80), CLIENT, None);
        assert_eq!(
            run_from(&b, Origin::Node(one), &mut to_task()),
            Verdict::Pass
        );
        assert_eq!(
            run_from(&b, Origin::Overlay, &mut answer()),
            Verdict::Return(one)
        );
        // The client's next socket got the same port, and went through the other node.
        assert_eq!(
            run_from(&b, Origin::Node(two), &mut to_task()),
            Verdict::Pass
        );
        assert_eq!(
            run_from(&b, Origin::Overlay, &mut answer()),
            Verdict::Return(two)
        );
        assert_eq!(b.flows(), (1, 0));
    }

    #[test]
    fn a_client_port_that_ended_through_another_node_can_reach_the_same_task_here() {
        let b = balancer(&[7]);
        let other = Ipv4Addr::new(198, 18, 0, 3);
        // Through the other node, to task .7 here: tracked as passing through, then ended.
        let mut through = frame(
            (CLIENT_MAC, mac_of(ip(7))),
            CLIENT,
            at(ip(7), 80),
            Some(true),
        );
        assert_eq!(
            run_from(&b, Origin::Node(other), &mut through),
            Verdict::Pass
        );
        let mut rst = frame(
            (CLIENT_MAC, mac_of(ip(7))),
            CLIENT,
            at(ip(7), 80),
            Some(false),
        );
        rst[14 + 20 + 13] = 0x04; // RST (the checksum does not matter to the balancer)
        run_from(&b, Origin::Node(other), &mut rst);
        // The same client port, now through this node, lands on the same task.
        let mut syn = frame((CLIENT_MAC, NODE_MAC), CLIENT, at(NODE, 9200), Some(true));
        assert_eq!(run_from(&b, Origin::Host, &mut syn), Verdict::Rewritten);
        let mut answer = frame((mac_of(ip(7)), [0; 6]), at(ip(7), 80), CLIENT, Some(false));
        assert_eq!(run_from(&b, Origin::Overlay, &mut answer), Verdict::Wire);
    }

    #[test]
    fn an_unpublished_port_from_the_host_is_passed_on_untouched() {
        let b = balancer(&[7]);
        let mut syn = frame((CLIENT_MAC, NODE_MAC), CLIENT, at(NODE, 9201), Some(true));
        assert_eq!(run_from(&b, Origin::Host, &mut syn), Verdict::Pass);
        let mut udp = frame((CLIENT_MAC, NODE_MAC), CLIENT, at(NODE, 9200), None);
        assert_eq!(run_from(&b, Origin::Host, &mut udp), Verdict::Pass);
    }

    /// The task each of `clients` (client address, port) lands on through the port.
    fn landings(b: &Balancer, clients: impl Iterator<Item = SocketAddrV4>) -> Vec<Ipv4Addr> {
        clients
            .map(|client| {
                let mut syn = frame((CLIENT_MAC, NODE_MAC), client, at(NODE, 9200), Some(true));
                assert_eq!(run_from(b, Origin::Host, &mut syn), Verdict::Rewritten);
                *seen(&syn).3.ip()
            })
            .collect()
    }

    #[test]
    fn client_affinity_keeps_a_client_on_one_task_and_spreads_clients() {
        let b = Balancer::new(1024, conntrack::Timeouts::default(), mac_of, NODE).unwrap();
        let port = Port {
            client_affinity: true,
            ..PUBLISHED
        };
        b.publish(published(&[7, 8, 9], port), Instant::now());
        let one = landings(&b, (0..50).map(|p| at(*CLIENT.ip(), 30000 + p)));
        assert!(one.iter().all(|t| *t == one[0]), "{one:?}");
        let many = landings(
            &b,
            (1..=60).map(|c| at(Ipv4Addr::new(198, 18, 1, c), 30000)),
        );
        let distinct: std::collections::HashSet<_> = many.into_iter().collect();
        assert_eq!(distinct.len(), 3);
    }

    #[test]
    fn a_host_mode_port_lands_only_on_this_nodes_tasks() {
        let b = Balancer::new(1024, conntrack::Timeouts::default(), mac_of, NODE).unwrap();
        let port = Port {
            local_only: true,
            ..PUBLISHED
        };
        // NODE (198.18.0.2) runs the odd tasks.
        b.publish(published(&[6, 7, 8, 9], port), Instant::now());
        let got = landings(&b, (0..60).map(|p| at(*CLIENT.ip(), 30000 + p)));
        let distinct: std::collections::HashSet<_> = got.into_iter().collect();
        assert_eq!(distinct, [ip(7), ip(9)].into_iter().collect());
    }

    #[test]
    fn a_udp_flow_to_a_removed_task_moves_to_a_live_one_at_once() {
        let b = balancer(&[7, 8]);
        let client = at(ip(5), 5353);
        let send = |b: &Balancer| {
            let mut f = frame(
                (mac_of(ip(5)), mac_of(ip(VIP))),
                client,
                at(ip(VIP), 53),
                None,
            );
            assert_eq!(run(b, &mut f), Verdict::Rewritten);
            *seen(&f).3.ip()
        };
        let first = send(&b);
        let left = if first == ip(7) { 8 } else { 7 };
        b.publish(table(&[left]), Instant::now());
        assert_eq!(send(&b), ip(left));
    }

    fn tcp(from: (u8, u16), to: (u8, u16), syn: bool) -> Vec<u8> {
        frame(
            (mac_of(ip(from.0)), mac_of(ip(to.0))),
            SocketAddrV4::new(ip(from.0), from.1),
            SocketAddrV4::new(ip(to.0), to.1),
            Some(syn),
        )
    }

    /// A TCP frame (`Some(syn)`) or a UDP one (`None`) with these MACs (source,
    /// destination) and addresses.
    fn frame(
        macs: ([u8; 6], [u8; 6]),
        src: SocketAddrV4,
        dst: SocketAddrV4,
        tcp: Option<bool>,
    ) -> Vec<u8> {
        let b =
            PacketBuilder::ethernet2(macs.0, macs.1).ipv4(src.ip().octets(), dst.ip().octets(), 64);
        let mut f = Vec::new();
        match tcp {
            Some(syn) => {
                let b = b.tcp(src.port(), dst.port(), 1, 512);
                let b = if syn { b.syn() } else { b.ack(1) };
                b.write(&mut f, b"x").unwrap();
            }
            None => b.udp(src.port(), dst.port()).write(&mut f, b"x").unwrap(),
        }
        f
    }

    /// (src mac, dst mac, src, dst) of a frame, after checking both checksums with etherparse.
    fn seen(f: &[u8]) -> ([u8; 6], [u8; 6], SocketAddrV4, SocketAddrV4) {
        let p = SlicedPacket::from_ethernet(f).unwrap();
        let Some(NetSlice::Ipv4(v4)) = &p.net else {
            panic!("not IPv4")
        };
        let h = v4.header().to_header();
        assert_eq!(h.calc_header_checksum(), h.header_checksum);
        let (sport, dport) = match &p.transport {
            Some(TransportSlice::Tcp(t)) => {
                let sum = t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap();
                assert_eq!(sum, t.checksum());
                (t.source_port(), t.destination_port())
            }
            Some(TransportSlice::Udp(u)) => {
                let sum = u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap();
                assert_eq!(sum, u.checksum());
                (u.source_port(), u.destination_port())
            }
            _ => panic!("neither TCP nor UDP"),
        };
        let (mut src_mac, mut dst_mac) = ([0; 6], [0; 6]);
        dst_mac.copy_from_slice(&f[..6]);
        src_mac.copy_from_slice(&f[6..12]);
        (
            src_mac,
            dst_mac,
            SocketAddrV4::new(h.source.into(), sport),
            SocketAddrV4::new(h.destination.into(), dport),
        )
    }

    fn run(b: &Balancer, f: &mut [u8]) -> Verdict {
        b.process(
            f,
            Mode::Full,
            Origin::Overlay,
            Instant::now(),
            &mut [0u8; 128],
        )
    }

    /// A UDP datagram between overlay addresses, with their MACs.
    fn udp(from: (u8, u16), to: (u8, u16)) -> Vec<u8> {
        frame(
            (mac_of(ip(from.0)), mac_of(ip(to.0))),
            SocketAddrV4::new(ip(from.0), from.1),
            SocketAddrV4::new(ip(to.0), to.1),
            None,
        )
    }

    #[test]
    fn a_task_streaming_udp_to_its_client_through_a_vip_is_heard_again_after_a_restart() {
        let before = balancer(&[7, 8]);
        let mut first = udp((5, 40000), (VIP, 80));
        assert_eq!(run(&before, &mut first), Verdict::Rewritten);
        let task = seen(&first).3.ip().octets()[3];
        let other = if task == 7 { 8 } else { 7 };
        // Restarted: nothing tracked, and the client only listens.
        let after = balancer(&[7, 8]);
        let mut pushed = udp((task, 80), (5, 40000));
        assert_eq!(run(&after, &mut pushed), Verdict::Rewritten);
        assert_eq!(seen(&pushed).2, SocketAddrV4::new(ip(VIP), 80));
        assert_eq!(after.flows(), (1, 0), "tracked again");
        // Tracked, it outlives the time after start that datagrams are derived in.
        let late = Instant::now() + rederive::UDP_AFTER_START + Duration::from_secs(1);
        let mut again = udp((task, 80), (5, 40000));
        let verdict = after.process(&mut again, Mode::Full, Origin::Overlay, late, &mut [0; 128]);
        assert_eq!(verdict, Verdict::Rewritten);
        // The task the VIP would not pick for that client is not taken for its flow.
        let mut stranger = udp((other, 80), (5, 40000));
        assert_eq!(run(&after, &mut stranger), Verdict::Pass);
        assert_eq!(seen(&stranger).2, SocketAddrV4::new(ip(other), 80));
    }

    #[test]
    fn udp_to_a_tasks_own_address_and_udp_long_after_start_is_not_derived() {
        let b = balancer(&[7]);
        // A client talking to the task's own address: the answers pass as they are.
        let mut direct = udp((5, 40001), (7, 80));
        assert_eq!(run(&b, &mut direct), Verdict::Pass);
        let mut answer = udp((7, 80), (5, 40001));
        assert_eq!(run(&b, &mut answer), Verdict::Pass);
        assert_eq!(seen(&answer).2, SocketAddrV4::new(ip(7), 80));
        // Long after start, an untracked datagram is no lost flow's.
        let late = Instant::now() + rederive::UDP_AFTER_START + Duration::from_secs(1);
        let mut pushed = udp((7, 80), (5, 40002));
        let verdict = b.process(
            &mut pushed,
            Mode::Full,
            Origin::Overlay,
            late,
            &mut [0; 128],
        );
        assert_eq!(verdict, Verdict::Pass);
        assert_eq!(b.flows(), (0, 0));
    }

    #[test]
    fn a_flow_to_the_vip_goes_to_a_task_and_its_reply_comes_from_the_vip() {
        let b = balancer(&[7, 8, 9]);
        let mut out = tcp((5, 40000), (VIP, 80), true);
        assert_eq!(run(&b, &mut out), Verdict::Rewritten);
        let (src_mac, dst_mac, src, task) = seen(&out);
        assert!([7, 8, 9].map(ip).contains(task.ip()), "{task}");
        assert_eq!(
            (task.port(), dst_mac, src_mac),
            (80, mac_of(*task.ip()), mac_of(ip(5)))
        );
        assert_eq!(
            src,
            SocketAddrV4::new(ip(5), 40000),
            "the client address is kept"
        );

        let last = task.ip().octets()[3];
        let mut back = tcp((last, 80), (5, 40000), false);
        assert_eq!(run(&b, &mut back), Verdict::Rewritten);
        let (src_mac, dst_mac, src, dst) = seen(&back);
        assert_eq!(src, SocketAddrV4::new(ip(VIP), 80));
        assert_eq!(dst, SocketAddrV4::new(ip(5), 40000));
        assert_eq!((src_mac, dst_mac), (mac_of(ip(VIP)), mac_of(ip(5))));
        assert_eq!(b.flows(), (1, 0));
    }

    /// A TCP segment with `flags` (of [`conntrack::tcp_flags`]) between overlay addresses.
    fn segment(from: (u8, u16), to: (u8, u16), flags: u8) -> Vec<u8> {
        use conntrack::tcp_flags::{ACK, RST, SYN};
        let b = PacketBuilder::ethernet2(mac_of(ip(from.0)), mac_of(ip(to.0)))
            .ipv4(ip(from.0).octets(), ip(to.0).octets(), 64)
            .tcp(from.1, to.1, 1, 512);
        let b = if flags & SYN != 0 { b.syn() } else { b };
        let b = if flags & ACK != 0 { b.ack(1) } else { b };
        let b = if flags & RST != 0 { b.rst() } else { b };
        let mut f = Vec::new();
        b.write(&mut f, b"x").unwrap();
        f
    }

    /// The task a SYN from `client` to the VIP lands on through `b`.
    fn connect(b: &Balancer, client: (u8, u16)) -> u8 {
        let mut syn = tcp(client, (VIP, 80), true);
        assert_eq!(run(b, &mut syn), Verdict::Rewritten);
        seen(&syn).3.ip().octets()[3]
    }

    #[test]
    fn a_restarted_nodes_vip_flow_goes_on_whichever_end_speaks_first() {
        let task = connect(&balancer(&[7, 8, 9]), (5, 40000));
        // The node restarted: an empty table, the same services.
        let b = balancer(&[7, 8, 9]);
        let mut back = tcp((task, 80), (5, 40000), false);
        assert_eq!(run(&b, &mut back), Verdict::Rewritten);
        let (src_mac, _, src, dst) = seen(&back);
        assert_eq!((src, dst), (at(ip(VIP), 80), at(ip(5), 40000)));
        assert_eq!(src_mac, mac_of(ip(VIP)));
        let mut on = tcp((5, 40000), (VIP, 80), false);
        assert_eq!(run(&b, &mut on), Verdict::Rewritten);
        assert_eq!(seen(&on).3, at(ip(task), 80), "the same task as before");
        assert_eq!(b.flows(), (1, 0), "tracked again from the client's packet");

        // A task calling its own VIP, the same way.
        connect(&balancer(&[7]), (7, 41000));
        let b = balancer(&[7]);
        let mut back = tcp((7, 80), (VIP, 41000), false);
        assert_eq!(run(&b, &mut back), Verdict::Rewritten);
        assert_eq!(
            seen(&back).2..=seen(&back).3,
            at(ip(VIP), 80)..=at(ip(7), 41000)
        );
    }

    #[test]
    fn a_connection_to_a_tasks_own_address_passes_untouched() {
        use conntrack::tcp_flags::{ACK, RST, SYN};
        let b = balancer(&[7]);
        // Seen from its start: the SYN-ACK marks it.
        for flags in [SYN | ACK, ACK, ACK] {
            let mut f = segment((7, 80), (5, 40000), flags);
            assert_eq!(run(&b, &mut f), Verdict::Pass);
        }
        // Seen mid-stream (made before a restart): taken for the VIP's, then refuted by the
        // client's reset to the VIP, which goes nowhere; the task's TCP sends again.
        let mut f = segment((7, 80), (5, 40001), ACK);
        assert_eq!(run(&b, &mut f), Verdict::Rewritten);
        let mut refusal = segment((5, 40001), (VIP, 80), RST);
        assert_eq!(run(&b, &mut refusal), Verdict::Drop);
        let mut again = segment((7, 80), (5, 40001), ACK);
        assert_eq!(run(&b, &mut again), Verdict::Pass);
        assert_eq!(seen(&again).2, at(ip(7), 80));
        // Not to a client's MAC (the routing mesh's replies): not derived.
        let mut mesh = segment((7, 80), (5, 40002), ACK);
        mesh[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        assert_eq!(run(&b, &mut mesh), Verdict::Pass);
    }

    #[test]
    fn a_down_tasks_flows_are_kept_for_the_grace_and_reset_after() {
        let with = |health| {
            let spec = Spec {
                name: "web".into(),
                vip: Vip(ip(VIP).into()),
                backends: vec![Backend {
                    addr: ip(7),
                    node: NODE,
                    health,
                }],
                ports: Vec::new(),
            };
            Table::build(maglev::Size::new(251).unwrap(), [spec]).unwrap()
        };
        let b = balancer(&[7]);
        let t0 = Instant::now();
        connect(&b, (5, 40000));
        let send = |b: &Balancer, now| {
            let mut f = tcp((5, 40000), (VIP, 80), false);
            b.process(&mut f, Mode::Full, Origin::Overlay, now, &mut [0u8; 128])
        };
        // Down and back (a restart) within the grace: the flow goes on.
        b.publish(with(Health::Down), t0);
        assert_eq!(send(&b, t0), Verdict::Rewritten);
        b.publish(with(Health::Healthy), t0 + DOWN_GRACE / 2);
        b.handle_timeout(t0 + DOWN_GRACE * 2);
        assert_eq!(send(&b, t0 + DOWN_GRACE * 2), Verdict::Rewritten);
        // Down for good: reset once the grace is over.
        let t1 = t0 + DOWN_GRACE * 2;
        b.publish(with(Health::Down), t1);
        b.handle_timeout(t1 + DOWN_GRACE / 2);
        assert_eq!(send(&b, t1 + DOWN_GRACE / 2), Verdict::Rewritten);
        b.handle_timeout(t1 + DOWN_GRACE);
        assert!(matches!(send(&b, t1 + DOWN_GRACE), Verdict::Reply(_)));
    }

    #[test]
    fn a_task_reaching_its_own_vip_lands_on_itself_from_the_vip_and_gets_its_answer() {
        let b = balancer(&[7]);
        let mut out = tcp((7, 40000), (VIP, 80), true);
        assert_eq!(run(&b, &mut out), Verdict::Rewritten);
        let (src_mac, dst_mac, src, dst) = seen(&out);
        assert_eq!(dst, SocketAddrV4::new(ip(7), 80));
        assert_eq!(
            src,
            SocketAddrV4::new(ip(VIP), 40000),
            "not its own address"
        );
        assert_eq!((src_mac, dst_mac), (mac_of(ip(VIP)), mac_of(ip(7))));
        // Its answer goes to VIP:40000 and comes back as VIP:80 -> itself.
        let mut back = tcp((7, 80), (VIP, 40000), false);
        assert_eq!(run(&b, &mut back), Verdict::Rewritten);
        let (src_mac, dst_mac, src, dst) = seen(&back);
        assert_eq!(
            (src, dst),
            (
                SocketAddrV4::new(ip(VIP), 80),
                SocketAddrV4::new(ip(7), 40000)
            )
        );
        assert_eq!((src_mac, dst_mac), (mac_of(ip(VIP)), mac_of(ip(7))));
    }

    #[test]
    fn no_healthy_task_or_a_removed_one_is_answered_with_a_reset() {
        let b = balancer(&[]);
        let mut out = [0u8; 128];
        let mut syn = tcp((5, 40000), (VIP, 80), true);
        assert!(matches!(
            b.process(
                &mut syn,
                Mode::Full,
                Origin::Overlay,
                Instant::now(),
                &mut out
            ),
            Verdict::Reply(54)
        ));

        let b = balancer(&[7]);
        let mut first = tcp((5, 40001), (VIP, 80), true);
        assert_eq!(run(&b, &mut first), Verdict::Rewritten);
        b.publish(table(&[]), Instant::now());
        let mut next = tcp((5, 40001), (VIP, 80), false);
        assert!(matches!(
            b.process(
                &mut next,
                Mode::Full,
                Origin::Overlay,
                Instant::now(),
                &mut out
            ),
            Verdict::Reply(54)
        ));
        assert_eq!(b.stats.rejected.load(Ordering::Relaxed), 1);
        // A new connection from the same port (a SYN) is no packet of the dead flow.
        b.publish(table(&[8]), Instant::now());
        let mut reused = tcp((5, 40001), (VIP, 80), true);
        assert_eq!(run(&b, &mut reused), Verdict::Rewritten);
        assert_eq!(seen(&reused).3.ip(), &ip(8));
    }

    /// The eviction test's failure: a busy client reused the port of an unanswered connection
    /// to a task that is unhealthy (draining, down) since; its new connection hung on that
    /// task instead of going to a live one.
    #[test]
    fn a_syn_to_the_vip_on_a_port_whose_old_task_takes_no_new_flows_goes_to_a_live_task() {
        let b = balancer(&[7, 8]);
        let mut first = tcp((5, 40003), (VIP, 80), true);
        assert_eq!(run(&b, &mut first), Verdict::Rewritten);
        let old = *seen(&first).3.ip();
        let unhealthy = |t: u8| Backend {
            addr: ip(t),
            node: Ipv4Addr::new(198, 18, 0, t % 2 + 1),
            health: if ip(t) == old {
                Health::Unhealthy
            } else {
                Health::Healthy
            },
        };
        let spec = Spec {
            name: "web".into(),
            vip: Vip(ip(VIP).into()),
            backends: [7, 8].map(unhealthy).to_vec(),
            ports: vec![Port { ..PUBLISHED }],
        };
        b.publish(
            Table::build(maglev::Size::new(251).unwrap(), [spec]).unwrap(),
            Instant::now(),
        );
        let mut again = tcp((5, 40003), (VIP, 80), true);
        assert_eq!(run(&b, &mut again), Verdict::Rewritten);
        assert_ne!(
            seen(&again).3.ip(),
            &old,
            "the SYN went to the task taking no new flows"
        );
    }

    /// The soak test's failure: a client calling a VIP many times a second reuses a port of a
    /// connection that went to a task removed since; its new connection was reset.
    #[test]
    fn a_syn_to_the_vip_on_a_port_whose_old_flow_lost_its_task_goes_to_a_live_task() {
        let b = balancer(&[7, 8]);
        let mut first = tcp((5, 40002), (VIP, 80), true);
        assert_eq!(run(&b, &mut first), Verdict::Rewritten);
        let other = if *seen(&first).3.ip() == ip(7) { 8 } else { 7 };
        b.publish(table(&[other]), Instant::now());
        let mut again = tcp((5, 40002), (VIP, 80), true);
        assert_eq!(run(&b, &mut again), Verdict::Rewritten);
        assert_eq!(seen(&again).3, at(ip(other), 80));
        assert_eq!(b.stats.rejected.load(Ordering::Relaxed), 0);
        // Not a SYN: the old connection's next packet is still reset.
        b.publish(table(&[]), Instant::now());
        let mut next = tcp((5, 40002), (VIP, 80), false);
        assert!(matches!(run(&b, &mut next), Verdict::Reply(_)));
    }

    #[test]
    fn traffic_that_is_not_a_services_passes_untouched() {
        let b = balancer(&[7]);
        let mut plain = tcp((5, 40000), (6, 80), true);
        let before = plain.clone();
        assert_eq!(run(&b, &mut plain), Verdict::Pass);
        assert_eq!(plain, before);
        // From a task, but no tracked flow: its own connection elsewhere.
        for syn in [true, false] {
            let mut own = tcp((7, 80), (6, 5555), syn);
            assert_eq!(run(&b, &mut own), Verdict::Pass);
        }
        assert_eq!(b.flows(), (0, 0));
    }

    /// An established flow's packets, both ways, and those of a task's own connection take no
    /// lock: with every shard's lock held here, another thread still forwards them. A worker
    /// that took a lock would wait for ever; the test gives it 10 s.
    #[test]
    fn an_established_flows_packets_take_no_lock() {
        let b = Arc::new(balancer(&[7, 8, 9]));
        let flows: Vec<(u16, SocketAddrV4)> = (0..100u16)
            .map(|i| {
                let mut syn = tcp((5, 30000 + i), (VIP, 80), true);
                assert_eq!(run(&b, &mut syn), Verdict::Rewritten);
                let task = seen(&syn).3;
                // The task's first answer establishes the flow (a state change: locked).
                let mut answer = tcp((task.ip().octets()[3], 80), (5, 30000 + i), false);
                assert_eq!(run(&b, &mut answer), Verdict::Rewritten);
                // A connection to task 7's own address, seen from its SYN-ACK.
                assert_eq!(
                    run(&b, &mut tcp((7, 80), (5, 40000 + i), true)),
                    Verdict::Pass
                );
                (30000 + i, task)
            })
            .collect();
        let held: Vec<_> = b.tables().map(|table| table.lock()).collect();
        assert!(held.len() > 1, "the flows are spread over shards");
        let (done, finished) = std::sync::mpsc::channel();
        let worker = {
            let b = b.clone();
            std::thread::spawn(move || {
                for (port, task) in flows {
                    let mut out = tcp((5, port), (VIP, 80), false);
                    assert_eq!(run(&b, &mut out), Verdict::Rewritten);
                    assert_eq!(seen(&out).3, task);
                    let mut back = tcp((task.ip().octets()[3], 80), (5, port), false);
                    assert_eq!(run(&b, &mut back), Verdict::Rewritten);
                    assert_eq!(seen(&back).2, SocketAddrV4::new(ip(VIP), 80));
                    let mut own = tcp((7, 80), (5, port + 10000), false);
                    assert_eq!(run(&b, &mut own), Verdict::Pass);
                }
                done.send(()).unwrap();
            })
        };
        finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a packet of an established flow waited for a shard's lock");
        drop(held);
        worker.join().unwrap();
        assert_eq!(b.flows(), (100, 0));
    }

    /// The two directions of each flow go through different threads (as two workers would),
    /// all at once: every reply finds its flow.
    #[test]
    fn both_directions_find_their_flow_from_different_threads() {
        let b = balancer(&[7, 8, 9]);
        let tasks: Vec<SocketAddrV4> = (0..200u16)
            .map(|i| {
                let mut f = tcp((5, 30000 + i), (VIP, 80), true);
                assert_eq!(run(&b, &mut f), Verdict::Rewritten);
                seen(&f).3
            })
            .collect();
        std::thread::scope(|s| {
            for half in [0u16, 1] {
                let (b, tasks) = (&b, &tasks);
                s.spawn(move || {
                    for i in (half..200).step_by(2) {
                        let task = tasks[usize::from(i)];
                        let mut back = tcp((task.ip().octets()[3], 80), (5, 30000 + i), false);
                        assert_eq!(run(b, &mut back), Verdict::Rewritten);
                        assert_eq!(seen(&back).2, SocketAddrV4::new(ip(VIP), 80));
                    }
                });
            }
        });
    }
}
